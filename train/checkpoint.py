"""Atomic, rotating, self-validating DeepSpeed checkpoints with everything a bit-exact resume needs.

Layout under a stage's `checkpoints/` folder:

    step_00000040/          one checkpoint: DeepSpeed's model/optimizer/scheduler files,
                            `trainer_state_rank{r}.json` per rank, and `manifest.json`
    latest                  the tag of the newest checkpoint written (a hint for people only)
    zero_to_fp32.py         DeepSpeed's tools that consolidate a checkpoint into one state dict
    zero_to_torch.py        (`python zero_to_fp32.py . out/ --tag step_00000040`)
    .partial/               where a checkpoint is written before it is complete

A checkpoint is written under `.partial/`; every rank adds its trainer state (plain JSON) and
the sizes and SHA-256 digests of its share of the files; after a barrier rank 0 writes
`manifest.json` last, renames the folder into place and then replaces `latest`.

On resume the checkpoint folders on disk are the truth, not `latest`: the newest folder whose
manifest matches every file (sizes and digests) is loaded. A folder that fails is skipped with a
`CheckpointSkippedWarning` naming it and why; if checkpoints exist but none is valid, resume
stops with `CheckpointError` instead of starting the stage again from step 0.

Nothing loaded from a run folder runs code: the trainer state is JSON, and DeepSpeed's files are
read with `torch.load(weights_only=True)` and an allow-list of the few DeepSpeed classes they hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import DistributedContext, barrier

logger = logging.getLogger(__name__)

LATEST = "latest"
PARTIAL = ".partial"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
TAG_PREFIX = "step_"
# Scripts DeepSpeed's rank 0 copies into the folder it saves to (here `.partial/`). They read the
# checkpoint tags beside them, so they are moved up to the checkpoints' own folder.
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointError(RuntimeError):
    """A stage has checkpoints but none can be resumed from; the message says which and why."""


class CheckpointSkippedWarning(UserWarning):
    """A checkpoint failed validation and an older one is tried instead."""


def step_tag(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a `step_XXXXXXXX` folder name; None for anything else."""
    digits = tag[len(TAG_PREFIX) :]
    return int(digits) if tag.startswith(TAG_PREFIX) and digits.isdigit() else None


def trainer_state_name(rank: int) -> str:
    return f"trainer_state_rank{rank}.json"


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step may draw from, on this rank, as plain JSON values."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".tmp")
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _checkpoint_files(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but its manifest, as sorted relative paths."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _deepspeed_safe_globals() -> list[Any]:
    """The DeepSpeed classes its own optimizer-state files pickle (found by loading them with
    `weights_only=True`); only these are allowed besides tensors and builtin containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_weights_only(path: str | os.PathLike, map_location: Any = None) -> Any:
    """`torch.load` that refuses to run code: tensors, builtin containers and the allow-list only."""
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def make_checkpoint_loads_safe(engine: Any) -> None:
    """Route DeepSpeed's checkpoint reads (model, optimizer, scheduler) through `load_weights_only`.

    DeepSpeed 0.19.8 reads every file of a checkpoint through `engine.checkpoint_engine.load`,
    which calls `torch.load(weights_only=False)`; this replaces that one method on the engine.
    """
    engine.checkpoint_engine.load = load_weights_only


class CheckpointManager:
    """Saves, validates and finds the checkpoints of one stage, keeping the newest `keep_last`."""

    def __init__(self, root: Path, keep_last: int, context: DistributedContext) -> None:
        self.root = root
        self.keep_last = keep_last
        self.context = context
        self.saved_steps: set[int] = set()  # steps this process saved

    def checkpoint_tags(self) -> list[str]:
        """Checkpoint folders on disk, newest first (whether valid or not)."""
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if p.is_dir() and tag_step(p.name) is not None]
        return sorted(tags, key=lambda tag: tag_step(tag) or 0, reverse=True)

    def save(self, engine: Any, step: int, trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint `step` (a collective call: every rank must enter it).

        `trainer_state` must be JSON-able. A folder of the same step left by an earlier attempt
        (say, a newer checkpoint that failed validation and was resumed past) is replaced.
        """
        tag = step_tag(step)
        final = self.root / tag
        partial_root = self.root / PARTIAL
        staging = partial_root / tag
        if self.context.is_main:
            shutil.rmtree(staging, ignore_errors=True)  # debris of a crashed save
            partial_root.mkdir(parents=True, exist_ok=True)
        barrier()
        engine.save_checkpoint(str(partial_root), tag=tag, save_latest=False)
        _write_atomically(staging / trainer_state_name(self.context.rank), json.dumps(trainer_state))
        barrier()
        # Every rank hashes its share of the files, so a large optimizer state is read once, in parallel.
        # The digest parts go beside the folder, not in it, so that every rank lists the same files.
        files = _checkpoint_files(staging)
        share = {
            name: {"bytes": (staging / name).stat().st_size, "sha256": file_digest(staging / name)}
            for name in files[self.context.rank :: self.context.world_size]
        }
        _write_atomically(partial_root / f"{tag}.digests.rank{self.context.rank}.json", json.dumps(share))
        barrier()
        if self.context.is_main:
            entries: dict[str, Any] = {}
            for rank in range(self.context.world_size):
                part = partial_root / f"{tag}.digests.rank{rank}.json"
                entries.update(json.loads(part.read_text()))
                part.unlink()
            if sorted(entries) != files:
                raise RuntimeError(f"checkpoint {staging}: the ranks hashed {sorted(entries)}, the folder has {files}")
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "world_size": self.context.world_size,
                "files": entries,
            }
            _write_atomically(staging / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
            if final.exists():
                stale = partial_root / f"{tag}.replaced"
                shutil.rmtree(stale, ignore_errors=True)
                os.rename(final, stale)
                if step not in self.saved_steps:  # else the stage's closing save, which records its final evaluation
                    logger.warning("checkpoint %s existed from an earlier attempt; replaced", final)
                os.rename(staging, final)
                shutil.rmtree(stale)
            else:
                os.rename(staging, final)
            _write_atomically(self.root / LATEST, tag)
            self._move_recovery_scripts(partial_root)
            self._remove_old(keep=tag)
            logger.info("checkpoint %s saved", final)
        self.saved_steps.add(step)
        barrier()
        return final

    def _move_recovery_scripts(self, partial_root: Path) -> None:
        """Move DeepSpeed's recovery scripts from where it wrote them up beside the checkpoints."""
        for script in RECOVERY_SCRIPTS:
            written = partial_root / script
            if written.is_file():
                os.replace(written, self.root / script)

    def validate(self, tag: str) -> str | None:
        """Why checkpoint `tag` cannot be used by this world, or None when it is complete and intact.

        Rank `r` checks every `world_size`-th file from `r` (the caller combines the ranks' answers).
        """
        folder = self.root / tag
        manifest_path = folder / MANIFEST
        if not manifest_path.is_file():
            return f"no {MANIFEST} (an incomplete save, or written by an older version)"
        try:
            manifest = json.loads(manifest_path.read_text())
            files: dict[str, dict[str, Any]] = manifest["files"]
            saved_world = int(manifest["world_size"])
        except (ValueError, KeyError, TypeError) as error:
            return f"unreadable {MANIFEST}: {error}"
        if saved_world != self.context.world_size:
            return (
                f"saved by {saved_world} ranks, this run has {self.context.world_size} "
                "(resume with the same number of ranks)"
            )
        for rank in range(self.context.world_size):
            if trainer_state_name(rank) not in files:
                return f"the manifest lists no {trainer_state_name(rank)}"
        for name in sorted(files)[self.context.rank :: self.context.world_size]:
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != files[name]["bytes"]:
                return f"{name} has {size} bytes, the manifest says {files[name]['bytes']} (truncated or replaced)"
            if file_digest(path) != files[name]["sha256"]:
                return f"{name} does not match its SHA-256 digest in the manifest (corrupt)"
        own_state = folder / trainer_state_name(self.context.rank)
        try:
            _check_trainer_state(json.loads(own_state.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            return f"{own_state.name} is not a valid trainer state: {error!r}"
        return None

    def newest_valid_tag(self) -> str | None:
        """The newest checkpoint every rank finds valid (a collective call); None when there are none.

        Raises `CheckpointError` when checkpoints exist but none is valid.
        """
        tags = self.checkpoint_tags()
        reasons: dict[str, str] = {}
        for tag in tags:
            reason = self.validate(tag)
            flag = torch.tensor([0 if reason else 1], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # valid only if valid on every rank
            if flag.item():
                return tag
            reason = reason or "failed validation on another rank (see its warning)"
            reasons[tag] = reason
            warnings.warn(f"checkpoint {self.root / tag} skipped: {reason}", CheckpointSkippedWarning, stacklevel=2)
        if tags:
            listed = "; ".join(f"{tag}: {why}" for tag, why in reasons.items())
            raise CheckpointError(
                f"{self.root} has checkpoints but none can be resumed from ({listed}). The stage is not restarted "
                "from step 0: repair or restore a checkpoint, or move the checkpoints folder away to start over"
            )
        return None

    def load(self, engine: Any) -> dict[str, Any] | None:
        """Restore the newest valid checkpoint into `engine`; return this rank's trainer state."""
        tag = self.newest_valid_tag()
        if tag is None:
            return None
        make_checkpoint_loads_safe(engine)
        try:
            engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except Exception as error:
            raise CheckpointError(
                f"checkpoint {self.root / tag} passed validation but DeepSpeed could not load it ({error!r}); "
                "move that folder away to resume from the next older checkpoint"
            ) from error
        state = json.loads((self.root / tag / trainer_state_name(self.context.rank)).read_text())
        logger.info("resumed from checkpoint %s (step %d)", self.root / tag, state["step"])
        return {**state, "path": str(self.root / tag)}

    def _remove_old(self, keep: str) -> None:
        """Keep the newest `keep_last` checkpoints up to `keep`. Folders newer than `keep` belong to
        an attempt that was resumed past (they failed validation) and are removed too, so that
        they can never be mistaken for this attempt's checkpoints."""
        kept_step = tag_step(keep) or 0
        tags = self.checkpoint_tags()
        superseded = [tag for tag in tags if (tag_step(tag) or 0) > kept_step]
        older = [tag for tag in tags if (tag_step(tag) or 0) <= kept_step]
        for tag in superseded + older[self.keep_last :]:
            if tag != keep:
                shutil.rmtree(self.root / tag)


def _check_trainer_state(state: Any) -> None:
    """The keys a resume reads; raises `ValueError`/`KeyError`/`TypeError` naming what is wrong."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a JSON object, got {type(state).__name__}")
    for key in ("step", "stage_state", "data", "rng"):
        if key not in state:
            raise KeyError(key)
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ValueError(f"step {state['step']!r} is not a step count")
