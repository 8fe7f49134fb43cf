"""Command line of the launchers: pick stages from a recipe and run them in order.

    deepspeed [--num_gpus N | --hostfile H] launch/pretrain.py RECIPE [--stage NAME] [key=value ...]
    python launch/pretrain.py RECIPE ...          # the same code path, one process

A stage whose export exists is done and skipped; a stage with checkpoints resumes from the
newest one. So re-running the same command after a crash continues where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal

from tqdm.contrib.logging import logging_redirect_tqdm

from data.build import load_source
from data.errors import BadRecordTally
from data.offline import stay_offline
from data.readers import iter_lm_texts
from data.tokenization import load_tokenizer

from .checkpoint import CheckpointError
from .config import (
    Recipe,
    RecipeError,
    StageConfig,
    check_local_paths,
    check_world_size,
    load_recipe,
)
from .data_stream import build_config_for, prepare_sources
from .distributed import (
    DistributedContext,
    barrier,
    broadcast_failure,
    init_distributed,
    shutdown_distributed,
)
from .export_files import is_complete_export
from .run_lock import RunFolderLock, RunFolderLockedError
from .stage_recipe import (
    StageRecipeChangedError,
    check_stage_recipe,
    record_stage_recipe,
)
from .tokenizer import prepare_tokenizer
from .trainer import (
    DivergenceError,
    NonFiniteLossError,
    StageTrainer,
    export_dir,
    stage_dir,
)

logger = logging.getLogger("msa_train")

Phase = Literal["pretrain", "sft", "all"]

# The shell's exit status for a process ended by Ctrl-C (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130


class StageInterruptedError(KeyboardInterrupt):
    """Ctrl-C during a stage, with where it stopped (`step` None: before training began)."""

    def __init__(self, stage: str, step: int | None, total_steps: int | None) -> None:
        super().__init__(stage, step, total_steps)
        self.stage, self.step, self.total_steps = stage, step, total_steps

    def where(self) -> str:
        if self.step is None:
            return f"while stage {self.stage} was starting"
        return f"in stage {self.stage} at step {self.step} of {self.total_steps}"


def parse_arguments(argv: list[str], phase: Phase) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"launch/{'run_all' if phase == 'all' else phase}.py",
        description=f"Run the {'' if phase == 'all' else phase + ' '}stages of an MSA training recipe.",
    )
    parser.add_argument("recipe", type=Path, help="recipe YAML, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.cpt_warmup.budget.steps=5")
    parser.add_argument("--stage", help="run (or resume) only this stage")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser.parse_intermixed_args(argv)


def select_stages(recipe: Recipe, phase: Phase, stage_name: str | None) -> list[StageConfig]:
    if stage_name is not None:
        return [recipe.stage(stage_name)]
    stages = [stage for stage in recipe.stages if phase == "all" or stage.phase == phase]
    if not stages:
        raise RecipeError(f"the recipe has no {phase} stages")
    return stages


def previous_export(recipe: Recipe, stage: StageConfig, run_dir: Path) -> Path | None:
    index = recipe.stages.index(stage)
    if index == 0:
        return None
    path = export_dir(run_dir, recipe.stages[index - 1].name)
    if stage.init_from == "previous" and not is_complete_export(path):
        raise RuntimeError(
            f"stage {stage.name} starts from the export of {recipe.stages[index - 1].name}, "
            f"which does not exist yet ({path}); run that stage first"
        )
    return path


def tokenizer_texts(recipe: Recipe, tokenizer_dir: Path, limit: int) -> Iterator[str]:
    """Text to train a tiny tokenizer on: the first `limit` texts of each `lm` source, and the
    first `limit` documents, queries and answers of each retrieval source.

    A generator, so the sources are read only when a tokenizer is actually trained (not on a
    resume, where it already exists).
    """
    for name in recipe.data.sources:
        build = build_config_for(recipe, name, tokenizer_dir)
        tally = BadRecordTally(skip_bad_records=build.skip_bad_records)
        if build.source.kind == "lm":
            yield from itertools.islice(iter_lm_texts(build.source.path, build.source.text_field, tally=tally), limit)
            continue
        dataset = load_source(build.source, tally)
        yield from (doc.full_text() for doc in dataset.corpus[:limit])
        yield from (f"{record.query} {record.answer or ''}" for record in dataset.records[:limit])


def special_strings(recipe: Recipe, tokenizer_dir: Path) -> list[str]:
    """Template strings of every source that must be single tokens."""
    strings: list[str] = []
    for name in recipe.data.sources:
        strings += build_config_for(recipe, name, tokenizer_dir).template.special_strings()
    return list(dict.fromkeys(strings))


def prepare_recipe_tokenizer(
    recipe: Recipe, tokenizer_dir: Path, source: str | Path | None = None, texts: Iterable[str] | None = None
) -> None:
    """`recipe`'s tokenizer in `tokenizer_dir` (kept if already there), every source's template
    strings single tokens: loaded from `source` (default `tokenizer.path`), else the recipe's tiny
    BPE trained on `texts` (default: its sources' documents, queries and answers)."""
    tiny = recipe.tokenizer.train_tiny
    source = recipe.tokenizer.path if source is None else str(source)
    if source is None and texts is None and tiny is not None:
        texts = tokenizer_texts(recipe, tokenizer_dir, tiny.sample_records)
    prepare_tokenizer(
        tokenizer_dir,
        special_strings(recipe, tokenizer_dir),
        source,
        texts if source is None else None,
        tiny.vocab_size if tiny else 0,
        tiny.individual_digits if tiny else False,
    )


def prepare_run(recipe: Recipe, stages: list[StageConfig], run_dir: Path, context: DistributedContext) -> Path:
    """Tokenizer and data builds, made by rank 0 while the other ranks wait. Returns the tokenizer folder."""
    tokenizer_dir = run_dir / "tokenizer"
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        prepare_recipe_tokenizer(recipe, tokenizer_dir)
        sources = list(dict.fromkeys(name for stage in stages for name in [*stage.sources, *stage.eval.sources]))
        prepare_sources(recipe, sources, run_dir, tokenizer_dir)
    barrier()
    return tokenizer_dir


def check_stage_recipes(recipe: Recipe, stages: list[StageConfig], run_dir: Path, context: DistributedContext) -> None:
    """Every stage folder that exists was made with the stages' current settings (rank 0 reads;
    every rank raises `StageRecipeChangedError` if not)."""
    failure = None
    if context.is_main:
        try:
            for stage in stages:
                check_stage_recipe(stage_dir(run_dir, stage.name), recipe, stage)
        except StageRecipeChangedError as error:
            failure = error
    if broadcast_failure(failure is not None, context):
        raise failure or StageRecipeChangedError("a stage folder was made with other settings (rank 0 says which)")


def run_stages(recipe: Recipe, stages: list[StageConfig], context: DistributedContext) -> None:
    run_dir = Path(recipe.run.output_dir)
    check_stage_recipes(recipe, stages, run_dir, context)
    tokenizer_dir = prepare_run(recipe, stages, run_dir, context)
    vocab_size = load_tokenizer(tokenizer_dir).vocab_size
    for stage in stages:
        run_stage(recipe, stage, run_dir, tokenizer_dir, vocab_size, context)


def run_stage(
    recipe: Recipe, stage: StageConfig, run_dir: Path, tokenizer_dir: Path, vocab_size: int, context: DistributedContext
) -> Path:
    """Train `stage` of `recipe` from its starting point (the previous stage's export or the
    backbone) and return its export; a stage whose export is complete is skipped. The one stage
    step of `run_stages`, public for drivers that change a recipe between stages."""
    destination = export_dir(run_dir, stage.name)
    if is_complete_export(destination):
        logger.info("stage %s is done (%s); skipping", stage.name, destination)
        return destination
    if context.is_main:
        record_stage_recipe(stage_dir(run_dir, stage.name), recipe, stage)
    trainer = None
    try:
        trainer = StageTrainer(
            recipe, stage, run_dir, tokenizer_dir, vocab_size, previous_export(recipe, stage, run_dir), context
        )
        trainer.run()
    except StageInterruptedError:
        raise
    except KeyboardInterrupt:
        step = None if trainer is None else trainer.state.step
        raise StageInterruptedError(stage.name, step, None if trainer is None else trainer.total_steps) from None
    return destination


def lock_run_folder(run_dir: Path, context: DistributedContext) -> RunFolderLock | None:
    """Rank 0 takes the run folder's lock (returned; None on other ranks). When it cannot, every
    rank raises `RunFolderLockedError`, so that none waits for the others at a barrier."""
    lock = RunFolderLock(run_dir) if context.is_main else None
    failure = None
    if lock is not None:
        try:
            lock.acquire()
        except RunFolderLockedError as error:
            failure = error
    if broadcast_failure(failure is not None, context):
        raise failure or RunFolderLockedError(f"{run_dir} is in use by another launch (rank 0 says which)")
    return lock


def configure_logging(rank: int) -> None:
    """Rank 0 logs INFO, the other ranks WARNING; transformers' own progress bars stay off (the
    stage's bar is the one to watch)."""
    import transformers

    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    transformers.utils.logging.disable_progress_bar()


@contextlib.contextmanager
def launcher_output(rank: int) -> Iterator[None]:
    """Logging configured for a launcher, with log lines written through tqdm so that they never
    tear a progress bar (DeepSpeed's logger has a console handler of its own)."""
    configure_logging(rank)
    with logging_redirect_tqdm([logging.getLogger(), logging.getLogger("DeepSpeed")]):
        yield


def stop_on_interrupt(entry: Callable[[], int]) -> int:
    """`entry()`, or one line and exit code 130 on Ctrl-C instead of a traceback: where the run
    stopped, and that the same command resumes it (finished stages are skipped, the stopped one
    continues from its newest checkpoint)."""
    try:
        return entry()
    except KeyboardInterrupt as interrupt:
        if int(os.environ.get("RANK", "0")) == 0:
            where = (
                interrupt.where()
                if isinstance(interrupt, StageInterruptedError)
                else "while preparing the run (tokenizer, data builds)"
            )
            logger.warning(
                "interrupted %s; run the same command again to resume (finished stages are skipped, "
                "a stopped stage continues from its newest checkpoint)",
                where,
            )
        return INTERRUPTED_EXIT_CODE


def main(phase: Phase, argv: list[str] | None = None) -> int:
    """Entry point of `launch/pretrain.py`, `launch/sft.py` and `launch/run_all.py`."""
    args = parse_arguments(sys.argv[1:] if argv is None else argv, phase)
    with launcher_output(int(os.environ.get("RANK", "0"))):
        return stop_on_interrupt(lambda: run_launch(phase, args))


def run_launch(phase: Phase, args: argparse.Namespace) -> int:
    """Validate the recipe, take the run folder and run the chosen stages; the exit code."""
    try:
        # Validated before the process group, the model or the data exist.
        recipe = load_recipe(args.recipe, args.overrides)
        stages = select_stages(recipe, phase, args.stage)
        check_world_size(recipe, stages, int(os.environ.get("WORLD_SIZE", "1")))
        if not recipe.run.allow_network:
            check_local_paths(recipe, stages)
    except RecipeError as error:
        logger.error("%s", error)
        return 2
    stay_offline(recipe.run.allow_network)
    context = init_distributed()
    try:
        lock = lock_run_folder(Path(recipe.run.output_dir), context)
        try:
            run_stages(recipe, stages, context)
        finally:
            if lock is not None:
                lock.release()
    except (NonFiniteLossError, DivergenceError) as error:
        logger.error("%s", error)
        return 3
    except (RunFolderLockedError, CheckpointError, StageRecipeChangedError) as error:
        logger.error("%s", error)
        return 4
    shutdown_distributed()
    return 0


def dense_baseline_main(argv: list[str] | None = None) -> int:
    """Entry point of `launch/dense_baseline.py`: one stage's rows through the plain backbone."""
    from .dense_baseline import run_dense_baseline

    parser = argparse.ArgumentParser(prog="launch/dense_baseline.py", description=run_dense_baseline.__doc__)
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    parser.add_argument("--stage", required=True, help="the stage whose rows, batch and DeepSpeed set-up to use")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the stage budget)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)

    def run() -> int:
        try:
            recipe = load_recipe(args.recipe, args.overrides)
            stage = recipe.stage(args.stage)
        except RecipeError as error:
            logger.error("%s", error)
            return 2
        stay_offline(recipe.run.allow_network)
        context = init_distributed()
        tokenizer_dir = prepare_run(recipe, [stage], Path(recipe.run.output_dir), context)
        run_dense_baseline(recipe, stage, load_tokenizer(tokenizer_dir).vocab_size, args.steps, context)
        return 0

    with launcher_output(int(os.environ.get("RANK", "0"))):
        return stop_on_interrupt(run)
