"""Runs stay off the network unless the recipe opts in (`run.allow_network: true`).

Hugging Face Hub and `datasets` lookups (a backbone name that is not a folder, download-count
telemetry) and W&B's error reporting are switched off through their environment variables,
which child processes (data-build workers, ranks) inherit, and through the module constants
of the libraries already imported, which read those variables only once.
"""

from __future__ import annotations

import importlib
import os
import sys

OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_UPDATE_DOWNLOAD_COUNTS": "0",
    "WANDB_ERROR_REPORTING": "false",
}


def stay_offline(allow_network: bool) -> None:
    """Switch the Hub, `datasets` and W&B telemetry off for this process and its children,
    unless `allow_network`. W&B in `online` mode still syncs: that mode is its own opt-in."""
    if allow_network:
        return
    os.environ.update(OFFLINE_ENVIRONMENT)
    hub_constants = importlib.import_module("huggingface_hub.constants")
    hub_constants.HF_HUB_OFFLINE = True
    hub_constants.HF_HUB_DISABLE_TELEMETRY = True
    if "datasets" in sys.modules:
        datasets_config = importlib.import_module("datasets.config")
        datasets_config.HF_HUB_OFFLINE = True
        datasets_config.HF_DATASETS_OFFLINE = True
        datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = False
