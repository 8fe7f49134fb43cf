"""The processes of a GPU-scale run: one worker per variant and slot (train, then evaluate), the
CPU data builds beside them, deadlines, and the command line (`python -m experiments.gpu`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import __doc__ as package_doc
from .evaluation import qa_template
from .plan import (
    ABLATIONS,
    DEFAULT_RECIPE,
    NIAH_SUBTASKS,
    REPO,
    SIZE_MULTIPLES,
    SNAPSHOT_EVERY_S,
    VARIANTS,
    assign_worker_slots,
    free_ports,
    kv_generator_options,
    longest_row,
    recorded_stage_steps,
    recorded_training_seconds,
    smoke_overrides,
    variant_overrides,
    warn_if_fixed_steps_leave_no_evaluation,
    write_json_atomic,
)
from .report import aggregate, write_progress_snapshot
from .training import prepare_shared_tokenizer, prepare_variant
from .worker import run_worker

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Job:
    variant: str
    slot: int  # GPU index, or -1 for a CPU slot
    queue: int  # the worker queue it waits in: one per `--gpus` entry, so a repeated GPU index shares that GPU
    run_dir: Path
    spec_path: Path
    log_path: Path
    prep: subprocess.Popen | None = None
    process: subprocess.Popen | None = None
    hard_deadline: float = 0.0
    started: float = 0.0
    finished: float = 0.0


def child_env(device: str, slot: int, port: int, threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        TOKENIZERS_PARALLELISM="false",
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WANDB_MODE="disabled",
    )
    if device == "cuda":
        # Workers tokenise memories of up to a million tokens per sample; nothing forks after that.
        env.update(CUDA_VISIBLE_DEVICES=str(slot), DS_ACCELERATOR="cuda", TOKENIZERS_PARALLELISM="true")
    else:
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    return env


def launch(mode: str, spec_path: Path, log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "ab") as log:  # the child holds its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "experiments.gpu", mode, str(spec_path)],
            cwd=str(REPO),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen | None, wait_s: float = 5.0) -> None:
    """End a child we started, and its own children (it leads its process group)."""
    if process is None or process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_driver(args: argparse.Namespace) -> int:
    t0 = time.time()
    from train.api import load_recipe

    budget_s = args.time_budget * 60.0
    end_all = t0 + budget_s - args.aggregation_reserve
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    recipe_path = args.recipe.resolve()
    user_overrides = list(args.overrides)
    base = load_recipe(recipe_path, user_overrides)
    if args.smoke:
        user_overrides = [*smoke_overrides(base), *user_overrides]
        base = load_recipe(recipe_path, user_overrides)
    variants = list(args.variants or (("main", "global_positions") if args.smoke else ABLATIONS))
    if device == "cuda":
        slots = list(args.gpus) if args.gpus else list(range(__import__("torch").cuda.device_count()))
        if not slots:
            raise SystemExit("no GPU visible; pass --device cpu (or --smoke) to run on the CPU")
    else:
        slots = [-1 - i for i in range(max(1, args.parallel))]
    work_dir = args.work_dir.resolve()
    results_dir = args.results_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    row = longest_row(base)
    fixed_steps = (
        recorded_stage_steps(args.steps_from, [stage.name for stage in base.stages]) if args.steps_from else None
    )
    if fixed_steps:
        logger.info("steps per stage from %s: %s", args.steps_from, fixed_steps)
    logger.info(
        "variants %s on %s slots %s; budget %.1f min; longest row %d", variants, device, slots, args.time_budget, row
    )

    tokenizer_dir = work_dir / "tokenizer"
    started = time.time()
    prepare_shared_tokenizer(base, tokenizer_dir)
    tokenizer_s = time.time() - started

    cpu_count = os.cpu_count() or 2
    parallel = min(len(slots), len(variants))
    threads = args.threads or (max(1, min(8, cpu_count // max(parallel, 1))) if device == "cuda" else 1)
    build_workers = args.build_workers or max(1, min(16, cpu_count // max(len(variants), 1)))
    ports = free_ports(len(variants))
    queues: dict[int, list[Job]] = {queue: [] for queue in range(len(slots))}
    workers_per_gpu = {slot: slots.count(slot) for slot in slots}
    jobs: list[Job] = []
    for variant, (slot, queue) in zip(variants, assign_worker_slots(len(variants), slots)):
        run_dir = work_dir / variant / "run"
        if run_dir.exists() and not args.resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        job = Job(variant, slot, queue, run_dir, work_dir / variant / "spec.json", work_dir / variant / "worker.log")
        job.log_path.unlink(missing_ok=True)
        queues[queue].append(job)
        jobs.append(job)
    eval_reserve_s = args.eval_reserve if args.eval_reserve is not None else (120.0 if device == "cuda" else 40.0)
    if fixed_steps and not args.resume:
        longest_queue = max(len(queue) for queue in queues.values())
        warn_if_fixed_steps_leave_no_evaluation(
            *recorded_training_seconds(args.steps_from),
            (end_all - time.time()) / longest_queue,
            max(workers_per_gpu.values()),
            eval_reserve_s,
        )
    eval_settings = {
        "size_multiples": list(SIZE_MULTIPLES),
        "niah_subtasks": list(args.niah_subtasks[:2] if args.smoke else args.niah_subtasks),
        "kv_generator": kv_generator_options(base),
        "template": qa_template(base),
        "niah_samples": 1 if args.smoke else args.niah_samples,
        "memory_on_gpu": args.memory_on_gpu,
        "qa_questions": 4 if args.smoke else args.qa_questions,
        "max_batch_tokens": 65536 if device == "cuda" else 8192,
        "assumed_encode_tokens_per_s": 150_000.0 if device == "cuda" else 20_000.0,
        "assumed_question_s": 0.4 if device == "cuda" else 0.3,
        "margin_s": 5.0,
    }

    def spec_for(job: Job, index: int, slot_end: float) -> dict:
        variant_ovr = variant_overrides(base, job.variant)
        eval_reserve = min(eval_reserve_s, 0.35 * (slot_end - time.time()))  # queued variants get shorter slots
        return {
            "variant": job.variant,
            "recipe": str(recipe_path),
            "run_dir": str(job.run_dir),
            "overrides": [*user_overrides, *variant_ovr, f"run.output_dir={job.run_dir}"],
            "tokenizer_source": str(tokenizer_dir),
            "build_workers": build_workers,
            "device": device,
            "threads": threads,
            "train_deadline": slot_end - eval_reserve,
            "end_deadline": slot_end,
            "assumed_tokens_per_s": (
                args.assumed_tokens_per_s / workers_per_gpu[job.slot] if device == "cuda" else 3000.0
            ),
            "stage_overhead_s": 20.0 if device == "cuda" else 8.0,
            "max_step_scale": 1.0 if args.smoke else args.max_step_scale,
            "min_steps": 2 if args.smoke else 5,
            "longest_row": row,
            "eval": eval_settings,
            "fixed_steps": fixed_steps,
            "port": ports[index],
        }

    # Data builds for every variant start now, on the CPU, beside the first workers.
    for index, job in enumerate(jobs):
        write_json_atomic(job.spec_path, spec_for(job, index, end_all))
        job.prep = launch(
            "--prep", job.spec_path, work_dir / job.variant / "prep.log", child_env("cpu", -1, ports[index], 1)
        )

    def start(job: Job) -> None:
        now = time.time()
        waiting = len([j for j in queues[job.queue] if j.process is None])
        slot_end = now + (end_all - now) / max(waiting, 1)
        index = jobs.index(job)
        spec = spec_for(job, index, slot_end)
        write_json_atomic(job.spec_path, spec)
        job.hard_deadline = slot_end + args.grace
        job.started = now
        job.process = launch(
            "--worker", job.spec_path, job.log_path, child_env(device, job.slot, ports[index], threads)
        )
        logger.info(
            "started %s on %s until %s (train until %s)",
            job.variant,
            f"GPU {job.slot}" if job.slot >= 0 else "CPU",
            time.strftime("%H:%M:%S", time.localtime(slot_end)),
            time.strftime("%H:%M:%S", time.localtime(spec["train_deadline"])),
        )

    last_snapshot = time.time()
    try:
        while True:
            if time.time() - last_snapshot > SNAPSHOT_EVERY_S:
                write_progress_snapshot(jobs, args, device, row, t0, results_dir)
                last_snapshot = time.time()
            for queue in queues.values():
                running = [j for j in queue if j.process is not None and j.process.poll() is None]
                if running:
                    job = running[0]
                    if time.time() > job.hard_deadline:
                        logger.warning("%s ran past its deadline: stopping it", job.variant)
                        stop(job.process)
                    continue
                waiting = [j for j in queue if j.process is None]
                if waiting and time.time() < end_all - 30:
                    start(waiting[0])
            for job in jobs:
                if job.process is not None and job.process.poll() is not None and not job.finished:
                    job.finished = time.time()
                    logger.info(
                        "%s finished (exit %s) after %.0f s",
                        job.variant,
                        job.process.returncode,
                        job.finished - job.started,
                    )
            pending = [j for j in jobs if j.process is None and time.time() < end_all - 30]
            active = [j for j in jobs if j.process is not None and j.process.poll() is None]
            if not pending and not active:
                break
            time.sleep(1.0)
    finally:
        for job in jobs:
            stop(job.process)
            stop(job.prep)

    results = aggregate(jobs, base, device, row, args, t0, tokenizer_s, results_dir, work_dir)
    return 0 if all(v.get("status") == "ok" for v in results["variants"].values()) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.gpu", description=package_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="recipe key=value overrides for every variant")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument(
        "--results-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "msa_experiments",
        help="where the JSON, plots and log go (default: outside the repository)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "msa_gpu_experiment")
    parser.add_argument("--name", help="file stem of the outputs (default gpu_scale, or gpu_scale_smoke)")
    parser.add_argument(
        "--gpus",
        type=int,
        nargs="*",
        help="GPU indices, one worker each at a time (default: all); repeat an index to run several "
        "variants at once on that GPU, e.g. --gpus 0 0 0 0",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        choices=VARIANTS,
        help="default: main and the three ablations (main and global_positions with --smoke)",
    )
    parser.add_argument("--time-budget", type=float, default=7.0, help="minutes of wall clock for everything")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--parallel", type=int, default=1, help="variants at once on the CPU")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="toy scale on the CPU (a 4-layer model, 768/1536-token rows, 2-3 steps per stage)",
    )
    parser.add_argument(
        "--assumed-tokens-per-s",
        type=float,
        default=100_000.0,
        help="training throughput per GPU assumed before the first stage is measured",
    )
    parser.add_argument(
        "--max-step-scale", type=float, default=2.0, help="at most this many times the recipe's steps when time allows"
    )
    parser.add_argument(
        "--eval-reserve",
        type=float,
        help="seconds kept for evaluation (default 120 on GPUs, 40 on the CPU; at most 35%% of a variant's time)",
    )
    parser.add_argument("--aggregation-reserve", type=float, default=20.0, help="seconds kept for plots and JSON")
    parser.add_argument(
        "--grace", type=float, default=15.0, help="seconds past its deadline before a worker is stopped"
    )
    parser.add_argument("--niah-samples", type=int, default=2, help="samples per NIAH subtask and memory size")
    parser.add_argument(
        "--niah-subtasks",
        nargs="+",
        default=list(NIAH_SUBTASKS),
        metavar="SUBTASK",
        help=f"eval/niah.py subtasks (default: {' '.join(NIAH_SUBTASKS)})",
    )
    parser.add_argument("--qa-questions", type=int, default=16, help="questions per held-out QA memory")
    parser.add_argument("--threads", type=int, help="torch threads per worker")
    parser.add_argument("--build-workers", type=int, help="processes per variant for the data builds")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        metavar="JSON",
        help="earlier runs' gpu_scale JSON files whose other variants join this run's table and plots",
    )
    parser.add_argument("--resume", action="store_true", help="keep existing run folders (finished stages are skipped)")
    parser.add_argument(
        "--memory-on-gpu",
        action="store_true",
        help="evaluation keeps each encoded memory on the GPU instead of the host (about 25 GB at 1M "
        "tokens for the 320M model): no copies to the host and back",
    )
    parser.add_argument(
        "--steps-from",
        type=Path,
        metavar="JSON",
        help="train each stage for the steps variant main trained in this earlier results file "
        "(ablations matched to main on any card); the time budget then bounds only evaluation",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--worker"], ["--prep"]):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if argv[0] == "--prep":
            prepare_variant(json.loads(Path(argv[1]).read_text()))
            return 0
        return run_worker(Path(argv[1]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_intermixed_args(argv)
    return run_driver(args)
