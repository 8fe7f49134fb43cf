"""Launching the trainer from tests: tiny-recipe overrides, subprocess runs, metrics reading."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes" / "tiny.yaml"


def launcher_env() -> dict[str, str]:
    """CPU DeepSpeed, quiet W&B, and no thread oversubscription on a small shared machine."""
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_SILENT="true")
    env.pop("WANDB_API_KEY", None)
    # In-process trainer tests leave their own process group's variables behind; a child
    # inheriting them would try to join that group instead of forming its own.
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def free_port() -> int:
    """A TCP port that was free a moment ago: the kernel picks it when binding port 0. Another
    process could take it before the rendezvous binds it, but no two tests share a fixed port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(entry: str, ranks: int, recipe: Path, args: list[str]) -> list[str]:
    """`python launch/<entry>.py` for one rank, `deepspeed --num_gpus N launch/<entry>.py` otherwise."""
    script = str(REPO / "launch" / f"{entry}.py")
    if ranks == 1:
        return [sys.executable, script, str(recipe), *args]
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        script,
        str(recipe),
        *args,
    ]


def run_launcher(
    entry: str, args: list[str], ranks: int = 1, recipe: Path = TINY_RECIPE, timeout: float = 600
) -> subprocess.CompletedProcess:
    return subprocess.run(
        launch_command(entry, ranks, recipe, args),
        cwd=REPO,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_launcher(entry: str, args: list[str], ranks: int, log_path: Path) -> subprocess.Popen:
    """A launcher in its own process group, so that the whole group can be killed at once."""
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            launch_command(entry, ranks, TINY_RECIPE, args),
            cwd=REPO,
            env=launcher_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank it started (its own process group)."""
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def step_losses(metrics_path: Path) -> dict[int, float]:
    """Training loss per optimizer step from a stage's metrics.jsonl (eval records skipped)."""
    losses = {}
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            losses[record["step"]] = record["loss"]
    return losses


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None, poll: float = 0.1) -> None:  # noqa: ANN001
    """Poll `condition()` until it is true; fail early if `process` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the run exited with {process.returncode} before the condition held")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(poll)


@contextmanager
def single_process_world() -> Iterator[object]:
    """A world of one process for in-process trainer tests. The process group outlives the
    test (DeepSpeed caches its groups, so it cannot be rebuilt in the same process), but the
    environment variables it needs are restored, so that later subprocesses start clean."""
    from train.distributed import init_distributed

    saved = dict(os.environ)
    try:
        yield init_distributed()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def make_stage_trainer(run_dir: Path, context, overrides: list[str]):  # noqa: ANN001, ANN201
    """An in-process `StageTrainer` for the tiny recipe's cpt_warmup stage, data and tokenizer prepared."""
    from data.tokenization import load_tokenizer
    from train.config import load_recipe
    from train.runner import prepare_run
    from train.trainer import StageTrainer

    recipe = load_recipe(
        TINY_RECIPE,
        [f"run.output_dir={run_dir}", "stages.cpt_warmup.eval.sources={}", "tracking.progress_bar=false", *overrides],
    )
    stage = recipe.stage("cpt_warmup")
    tokenizer_dir = prepare_run(recipe, [stage], run_dir, context)
    return StageTrainer(recipe, stage, run_dir, tokenizer_dir, load_tokenizer(tokenizer_dir).vocab_size, None, context)


def failure_report(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-8000:]}"
