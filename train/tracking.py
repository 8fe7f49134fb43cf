"""Metrics: a local `metrics.jsonl` per stage, mirrored to Weights & Biases (rank 0 only)."""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Keys of a training record that `stage_curves` keeps; an evaluation record holds the first six as `eval/<key>`.
CURVE_KEYS = (
    "loss",
    "lm_loss",
    "aux_loss",
    "recall@1",
    "recall@5",
    "recall@10",
    "tokens_per_s_per_device",
    "mfu",
    "memory_gb",
)


def wandb_key_configured() -> bool:
    """True when W&B has credentials: WANDB_API_KEY, or an api.wandb.ai entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(setting: str) -> str:
    """`auto` becomes `online` with a key and `offline` without one."""
    if setting != "auto":
        return setting
    return "online" if wandb_key_configured() else "offline"


def _json_safe(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsFileError(ValueError):
    """A `metrics.jsonl` line that is not a JSON record and is not the torn last line of a kill."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl`. A last line without its newline that does not parse was
    torn by a kill in the middle of a write: it is dropped with a warning. Any other bad line is
    a `MetricsFileError` naming the file and line."""
    text = path.read_text()
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):  # no newline after it: the write was cut short
                logger.warning("%s:%d: dropped a torn last line (%s)", path, number, error)
                continue
            raise MetricsFileError(
                f"{path}:{number}: not a metrics record ({error}); fix or remove the line"
            ) from error
        records.append(record)
    return records


class MetricsLogger:
    """Appends one JSON line per logged step and forwards the same record to W&B."""

    def __init__(
        self,
        stage_dir: Path,
        wandb_mode: str,
        project: str,
        run_name: str,
        config: dict[str, Any],
        wandb_run_id: str | None,
    ) -> None:
        self.path = stage_dir / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run = None
        self.wandb_mode = wandb_mode
        self.resumed_wandb_run = wandb_run_id is not None
        if wandb_mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=project,
                name=run_name,
                id=wandb_run_id,
                resume="allow" if wandb_run_id else None,
                mode=wandb_mode,
                dir=str(stage_dir),
                config=config,
                # W&B's own banner and end-of-run history table would interleave with the trainer's
                # log and progress bar; the trainer logs the run's id and folder itself.
                settings=wandb.Settings(quiet=True),
            )
            logger.info("W&B run %s (%s) in %s", self.run.id, wandb_mode, stage_dir / "wandb")

    @property
    def wandb_run_id(self) -> str | None:
        return self.run.id if self.run is not None else None

    def resume_at(self, step: int) -> None:
        """Drop records past `step` (work lost when a run died after its last checkpoint) and, for a
        resumed offline W&B run, log the kept ones again.

        An offline W&B run buffers in a service process that a SIGKILL of the launch takes down with
        it, so the steps it had not written yet are lost, while `metrics.jsonl` has every one. A
        resumed offline run is a new offline folder with the same run id: logging the kept records
        into it makes that folder hold the stage's whole history, the one to `wandb sync`.
        """
        if not self.path.is_file():
            return
        kept = [record for record in read_metrics(self.path) if record["step"] <= step]
        staging = self.path.with_suffix(".tmp")
        staging.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(staging, self.path)
        if self.run is not None and self.wandb_mode == "offline" and self.resumed_wandb_run:
            for record in kept:
                self.run.log(record, step=record["step"])

    def log(self, record: dict[str, Any]) -> None:
        record = {key: _json_safe(value) for key, value in record.items()}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.run is not None:
            self.run.log(record, step=record["step"])

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def read_stage_metrics(stage_dir: Path) -> list[dict[str, Any]]:
    """The records of a stage's `metrics.jsonl` in order ([] when the stage logged nothing yet)."""
    path = stage_dir / METRICS_FILE
    return read_metrics(path) if path.is_file() else []


def stage_curves(run_dir: Path, stage_names: list[str]) -> list[dict[str, Any]]:
    """Per stage that logged: its training records and its held-out evaluation records, each
    reduced to `CURVE_KEYS` (None where a record lacks one). Evaluations also keep recall@1 per
    router layer: the mean hides a layer that stops routing."""
    curves = []
    for name in stage_names:
        records = read_stage_metrics(run_dir / "stages" / name)
        if not records:
            continue
        train = [{"step": r["step"], **{k: r.get(k) for k in CURVE_KEYS}} for r in records if "loss" in r]
        evals = [
            {
                "step": r["step"],
                **{k: r.get(f"eval/{k}") for k in CURVE_KEYS[:6]},
                **{k.removeprefix("eval/"): v for k, v in r.items() if k.startswith("eval/recall@1/layer_")},
            }
            for r in records
            if "eval/loss" in r
        ]
        curves.append({"stage": name, "train": train, "eval": evals})
    return curves
