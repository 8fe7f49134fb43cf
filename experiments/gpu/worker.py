"""One variant's worker process: wait for its data, train its stages, evaluate its last export,
writing `result.json` throughout (the driver reads it, even from a worker it had to stop)."""

from __future__ import annotations

import json
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from .evaluation import evaluate_variant
from .plan import read_json, write_json_atomic
from .training import train_variant

logger = logging.getLogger(__name__)


def run_worker(spec_path: Path) -> int:
    """One variant on one device: wait for its data, train the stages, evaluate; `result.json` throughout."""
    import torch

    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    run_dir = Path(spec["run_dir"])
    result: dict[str, Any] = {
        "variant": spec["variant"],
        "overrides": spec["overrides"],
        "status": "running",
        "errors": [],
        "stages": [],
        "eval": {},
        "device": spec["device"],
        "timing": {"started": time.time()},
    }
    if torch.cuda.is_available() and spec["device"].startswith("cuda"):
        result["device_name"] = torch.cuda.get_device_name(0)
    earlier_stages = {s["stage"]: s for s in (read_json(run_dir / "result.json") or {}).get("stages", [])}
    save = lambda: write_json_atomic(run_dir / "result.json", result)  # noqa: E731
    save()
    export = None
    try:
        export = train_variant(spec, result, save, earlier_stages)
    except Exception:
        result["errors"].append(f"training: {traceback.format_exc()}")
        logger.exception("training failed")
        from train.api import export_dir, is_complete_export

        exports = [export_dir(run_dir, s["stage"]) for s in result["stages"]]
        complete = [e for e in exports if is_complete_export(e)]
        export = complete[-1] if complete else None
    result["timing"]["train_end"] = time.time()
    save()
    if export is not None:
        try:
            evaluate_variant(export, spec, result, save)
        except Exception:
            result["errors"].append(f"evaluation: {traceback.format_exc()}")
            logger.exception("evaluation failed")
    else:
        result["errors"].append("no complete export to evaluate")
    result["timing"]["end"] = time.time()
    result["status"] = "ok" if not result["errors"] and not result["eval"].get("errors") else "errors"
    save()
    return 0 if result["status"] == "ok" else 1
