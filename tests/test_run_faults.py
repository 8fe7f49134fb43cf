"""Fault injection on a stage's run folder, in-process on one CPU rank under DeepSpeed.

One reference run (4 steps, a checkpoint after every step) is made once; each test damages a
copy of its folder the way a kill, a disk or an attacker would, and checks that resume uses the
newest valid checkpoint, gives the reference's losses, or stops with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from train_runs import (
    TINY_RECIPE,
    make_stage_trainer,
    single_process_world,
    step_losses,
)

from train import checkpoint as checkpoint_module
from train import trainer as trainer_module
from train.checkpoint import CheckpointError, CheckpointSkippedWarning
from train.config import DivergenceConfig, load_recipe
from train.distributed import DistributedContext
from train.stage_recipe import (
    StageRecipeChangedError,
    check_stage_recipe,
    record_stage_recipe,
)
from train.tracking import MetricsFileError, read_metrics
from train.trainer import DivergenceError, DivergenceMonitor

STEPS = 4
OVERRIDES = [
    f"stages.cpt_warmup.budget.steps={STEPS}",
    "stages.cpt_warmup.checkpoint_every_steps=1",
    "checkpoint.keep_last=4",
    "checkpoint.save_final=false",
    "tracking.wandb=disabled",
]
STAGE = Path("stages/cpt_warmup")
CHECKPOINTS = STAGE / "checkpoints"


def tag(step: int) -> str:
    return f"step_{step:08d}"


@pytest.fixture(scope="module")
def context() -> Iterator[DistributedContext]:
    with single_process_world() as world:
        yield world


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, context: DistributedContext) -> Path:
    """A finished 4-step run with checkpoints at steps 1-4 (its export removed, so it can resume)."""
    run_dir = tmp_path_factory.mktemp("reference")
    make_stage_trainer(run_dir, context, OVERRIDES).run()
    shutil.rmtree(run_dir / STAGE / "export")
    assert sorted(p.name for p in (run_dir / CHECKPOINTS).glob("step_*")) == [tag(s) for s in range(1, STEPS + 1)]
    return run_dir


@pytest.fixture
def run_dir(reference: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(reference, copy)
    return copy


def resumed_step(run_dir: Path, context: DistributedContext) -> int:
    trainer = make_stage_trainer(run_dir, context, OVERRIDES)
    trainer.resume()
    return trainer.state.step


def forge_manifest_entry(run_dir: Path, step: int, name: str) -> None:
    """Make the manifest agree with a replaced file, as an attacker who controls the folder would."""
    folder = run_dir / CHECKPOINTS / tag(step)
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("latest", ["missing", "dangling", "empty", "older"])
def test_latest_is_only_a_hint(run_dir: Path, context: DistributedContext, latest: str) -> None:
    path = run_dir / CHECKPOINTS / "latest"
    if latest == "missing":
        path.unlink()
    else:
        # "older": a kill between renaming step 4 into place and writing `latest`.
        path.write_text({"dangling": tag(9), "empty": "", "older": tag(3)}[latest])
    assert resumed_step(run_dir, context) == STEPS


def test_truncated_model_file_falls_back_and_resumes_exactly(
    run_dir: Path, reference: Path, context: DistributedContext
) -> None:
    model_file = run_dir / CHECKPOINTS / tag(STEPS) / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])
    trainer = make_stage_trainer(run_dir, context, OVERRIDES)
    with pytest.warns(CheckpointSkippedWarning, match=f"{tag(STEPS)}.*mp_rank_00_model_states.pt"):
        trainer.run()
    # Step 4 retrained from the step-3 checkpoint gives the reference run's loss, and replaces the bad folder.
    assert step_losses(run_dir / STAGE / "metrics.jsonl") == step_losses(reference / STAGE / "metrics.jsonl")
    assert (run_dir / CHECKPOINTS / tag(STEPS)).is_dir()
    assert trainer.checkpoints.validate(tag(STEPS)) is None


@pytest.mark.parametrize("damage", ["garbage", "forged"])
def test_corrupt_trainer_state_falls_back(run_dir: Path, context: DistributedContext, damage: str) -> None:
    (run_dir / CHECKPOINTS / tag(STEPS) / "trainer_state_rank0.json").write_text('{"step": 4, "da')
    if damage == "forged":  # the digest matches; the content is still not a trainer state
        forge_manifest_entry(run_dir, STEPS, "trainer_state_rank0.json")
    with pytest.warns(CheckpointSkippedWarning, match=f"{tag(STEPS)}.*trainer_state_rank0.json"):
        assert resumed_step(run_dir, context) == STEPS - 1


def test_no_valid_checkpoint_is_an_error_not_a_restart(run_dir: Path, context: DistributedContext) -> None:
    for step in range(1, STEPS + 1):
        (run_dir / CHECKPOINTS / tag(step) / "manifest.json").unlink()
    with pytest.warns(CheckpointSkippedWarning), pytest.raises(CheckpointError, match="none can be resumed"):
        resumed_step(run_dir, context)


class _Exploit:
    """Unpickling this calls os.system, which writes a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_pickle_is_never_executed(
    run_dir: Path, tmp_path: Path, context: DistributedContext, victim: str
) -> None:
    marker = tmp_path / "pwned"
    folder = run_dir / CHECKPOINTS / tag(STEPS)
    (folder / victim).write_bytes(pickle.dumps(_Exploit(marker)))
    forge_manifest_entry(run_dir, STEPS, victim)
    # The trainer state of older versions was a pickle; a file of that name is never opened now.
    (folder / "trainer_state_rank0.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=f"{tag(STEPS)}.*could not load"):
        resumed_step(run_dir, context)
    assert not marker.exists()


def test_kill_between_rename_and_latest_resumes_from_the_renamed_checkpoint(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = checkpoint_module._write_atomically

    def crash_before_latest_of_step_2(path: Path, text: str) -> None:
        if path.name == "latest" and text == tag(2):
            raise KeyboardInterrupt  # the process dies here
        write(path, text)

    monkeypatch.setattr(checkpoint_module, "_write_atomically", crash_before_latest_of_step_2)
    with pytest.raises(KeyboardInterrupt):
        make_stage_trainer(tmp_path, context, OVERRIDES).run()
    monkeypatch.undo()
    assert (tmp_path / CHECKPOINTS / "latest").read_text() == tag(1)
    assert resumed_step(tmp_path, context) == 2


def test_torn_metrics_line_resumes(run_dir: Path, reference: Path, context: DistributedContext) -> None:
    shutil.rmtree(run_dir / CHECKPOINTS / tag(STEPS))
    metrics = run_dir / STAGE / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"step": 5, "loss": 0.12')  # a kill in the middle of a write
    make_stage_trainer(run_dir, context, OVERRIDES).run()
    assert step_losses(metrics) == step_losses(reference / STAGE / "metrics.jsonl")


def test_bad_metrics_line_in_the_middle_is_an_error(run_dir: Path, context: DistributedContext) -> None:
    metrics = run_dir / STAGE / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "not json", *lines[1:]]) + "\n")
    with pytest.raises(MetricsFileError, match="metrics.jsonl:2"):
        make_stage_trainer(run_dir, context, OVERRIDES).run()


def test_logged_lr_is_the_one_the_step_used(reference: Path) -> None:
    # tiny.yaml's cpt_warmup: router LR 3e-3 with 2 warm-up steps, so step 1 trains at half of it.
    records = [json.loads(line) for line in (reference / STAGE / "metrics.jsonl").read_text().splitlines()]
    router_lr = {record["step"]: record["lr/router"] for record in records if "lr/router" in record}
    assert router_lr[1] == pytest.approx(1.5e-3) and router_lr[2] == pytest.approx(3e-3)


def test_gradient_norm_divergence_stops_without_saving_the_diverged_step(
    tmp_path: Path, context: DistributedContext
) -> None:
    trainer = make_stage_trainer(tmp_path, context, [*OVERRIDES, "stages.cpt_warmup.divergence.max_grad_norm=1e-9"])
    with pytest.raises(DivergenceError, match="step 1 diverged: gradient norm"):
        trainer.run()
    assert trainer.checkpoints.checkpoint_tags() == []
    assert not (tmp_path / STAGE / "export").exists()


def test_divergence_warn_policy_counts_and_goes_on(tmp_path: Path, context: DistributedContext) -> None:
    trainer = make_stage_trainer(
        tmp_path,
        context,
        [
            *OVERRIDES,
            "stages.cpt_warmup.budget.steps=2",
            "stages.cpt_warmup.divergence.max_grad_norm=1e-9",
            "stages.cpt_warmup.divergence.policy=warn",
        ],
    )
    trainer.run()
    records = [json.loads(line) for line in (tmp_path / STAGE / "metrics.jsonl").read_text().splitlines()]
    assert [record["diverged_steps"] for record in records] == [1, 2]


def test_loss_spike_is_measured_against_the_recent_mean() -> None:
    monitor = DivergenceMonitor(DivergenceConfig(loss_spike_factor=2.0, window_steps=3))
    assert [monitor.check(loss, 1.0) for loss in (1.0, 1.2, 0.8, 1.9)] == [None] * 4  # 1.9 < 2 x 1.0
    assert "loss 4.5 > divergence.loss_spike_factor 2.0" in monitor.check(4.5, 1.0)
    assert monitor.check(2.5, 1.0) is None  # a flagged loss does not raise the mean (1.2, 0.8, 1.9)


def test_rerun_with_changed_settings_is_refused(tmp_path: Path) -> None:
    original = load_recipe(TINY_RECIPE)
    stage = original.stage("cpt_warmup")
    record_stage_recipe(tmp_path, original, stage)
    free_to_change = load_recipe(
        TINY_RECIPE, ["stages.cpt_warmup.checkpoint_every_steps=7", "stages.cpt_warmup.divergence.policy=warn"]
    )
    check_stage_recipe(tmp_path, free_to_change, free_to_change.stage("cpt_warmup"))
    changed = load_recipe(TINY_RECIPE, ["stages.cpt_warmup.param_groups.0.lr=1e-3"])
    with pytest.raises(StageRecipeChangedError, match=r"stage.param_groups.0.lr: 0.003 -> 0.001\)"):
        check_stage_recipe(tmp_path, changed, changed.stage("cpt_warmup"))


def test_other_world_size_is_a_clear_error(run_dir: Path, context: DistributedContext) -> None:
    for step in range(1, STEPS + 1):
        manifest_path = run_dir / CHECKPOINTS / tag(step) / "manifest.json"
        manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "world_size": 2}))
    with (
        pytest.warns(CheckpointSkippedWarning),
        pytest.raises(CheckpointError, match="saved by 2 ranks, this run has 1"),
    ):
        resumed_step(run_dir, context)


def test_kill_during_export_does_not_repeat_the_final_eval(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*OVERRIDES, "checkpoint.save_final=true", "stages.cpt_warmup.budget.steps=2"]

    def killed_export(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    trainer = make_stage_trainer(tmp_path, context, overrides)
    trainer.stage.eval.sources = {"kv_retrieval": 1.0}
    trainer.stage.eval.micro_batches = 1
    monkeypatch.setattr(trainer_module, "export_stage", killed_export)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    resumed = make_stage_trainer(tmp_path, context, overrides)
    resumed.stage.eval.sources = {"kv_retrieval": 1.0}
    resumed.stage.eval.micro_batches = 1
    resumed.run()
    records = [json.loads(line) for line in (tmp_path / STAGE / "metrics.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records if "eval/loss" in record] == [2]
    assert (tmp_path / STAGE / "export" / "model.safetensors").is_file()


def test_wandb_run_id_survives_a_kill_before_the_first_checkpoint(
    tmp_path: Path, context: DistributedContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [*OVERRIDES, "tracking.wandb=offline", "stages.cpt_warmup.checkpoint_every_steps=100"]
    trainer = make_stage_trainer(tmp_path, context, overrides)

    def killed_step() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "_train_step", killed_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    first_run = trainer.state.wandb_run_id
    assert first_run and trainer.checkpoints.checkpoint_tags() == []
    resumed = make_stage_trainer(tmp_path, context, [*overrides, "stages.cpt_warmup.budget.steps=1"])
    resumed.run()
    assert resumed.state.wandb_run_id == first_run


def test_data_cursor_past_the_end_is_a_clear_error(run_dir: Path, context: DistributedContext) -> None:
    name = "trainer_state_rank0.json"
    path = run_dir / CHECKPOINTS / tag(STEPS) / name
    state = json.loads(path.read_text())
    state["data"]["sources"][0]["cursor"] = 10**9
    path.write_text(json.dumps(state))
    forge_manifest_entry(run_dir, STEPS, name)
    with pytest.raises(CheckpointError, match=f"{tag(STEPS)}.*cursor = 1000000000 is past the end"):
        resumed_step(run_dir, context)


class _FakeWandbRun:
    def __init__(self, run_id: str | None) -> None:
        self.id = run_id or "fresh"
        self.logged: list[int] = []

    def log(self, record: dict, step: int) -> None:
        self.logged.append(step)

    def finish(self) -> None:
        pass


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_a_resumed_offline_wandb_run_gets_the_kept_steps_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """A SIGKILL takes W&B's buffering service down with the launch; `metrics.jsonl` has every step. A
    resumed offline run (a new offline folder, same id) is given the kept steps again; an online run,
    whose server kept what it received, is not."""
    import types

    from train.tracking import MetricsLogger

    runs: list[_FakeWandbRun] = []

    def init(**kwargs: object) -> _FakeWandbRun:
        runs.append(_FakeWandbRun(kwargs["id"]))
        return runs[-1]

    fake = types.SimpleNamespace(init=init, Settings=lambda **kwargs: kwargs)
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    stage = tmp_path / "stage"
    first = MetricsLogger(stage, mode, "p", "r", {}, None)
    for step in range(1, 6):
        first.log({"step": step, "loss": 1.0 / step})
    # Killed after step 5 with the newest checkpoint at step 3: resume there, under the same run id.
    resumed = MetricsLogger(stage, mode, "p", "r", {}, first.wandb_run_id)
    resumed.resume_at(3)
    assert [r["step"] for r in read_metrics(stage / "metrics.jsonl")] == [1, 2, 3]
    assert runs[1].logged == ([1, 2, 3] if mode == "offline" else [])
