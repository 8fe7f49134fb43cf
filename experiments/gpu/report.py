"""The results of a run: per-variant curves and checks, the summary table, plots, the log, the
JSON written while it runs and at the end, and merging earlier runs' variants."""

from __future__ import annotations

import argparse
import logging
import os
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from train.tracking import stage_curves

from .plan import LOG_TAIL_LINES, RECALL_KS, SIZE_MULTIPLES, VARIANT_TITLES, read_json, size_label, write_json_atomic
from .stats import acceptance

if TYPE_CHECKING:
    from .driver import Job

logger = logging.getLogger(__name__)


def summary_table(results: dict[str, Any]) -> str:
    row = results["longest_row"]
    head = (
        "| variant | status | steps per stage | train s | final LM loss (eval split) | final recall@1 (eval split) | "
        f"NIAH @{size_label(row)} | NIAH @{size_label(64 * row)} | within 10% | NIAH, routed IDs only, "
        f"@{size_label(row)} / @{size_label(64 * row)} | within 10% | router R@1 @{size_label(row)} | "
        f"R@1 @{size_label(64 * row)} | ID = routed @{size_label(row)} / @{size_label(64 * row)} | multi-hop EM | "
        "KV EM |"
    )
    lines = [head, "|" + "---|" * 16]

    def fmt(value: Any) -> str:
        return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    for name, variant in results["variants"].items():
        stages = variant.get("stages", [])
        curves = variant.get("curves", [])
        # The last stage's held-out split, not its last training batch: one batch of a few
        # examples swung recall@1 between 0 and 1 at the end of runs that routed well.
        last = curves[-1]["eval"][-1] if curves and curves[-1].get("eval") else {}
        timing = variant.get("timing", {})
        if stages and all(stage.get("reused") for stage in stages):  # `--resume`: the earlier call's training
            train_s = f"{round(sum(stage.get('wall_s', 0.0) for stage in stages))} (reused)"
        elif timing.get("train_end"):
            train_s = round(timing["train_end"] - timing.get("started", timing["train_end"]))
        else:
            train_s = None
        ev = variant.get("eval", {})
        qa = ev.get("qa_recall", {})
        check = variant.get("acceptance", {})
        routed = variant.get("acceptance_routed_ids", {})

        def passed(check: dict) -> str:
            verdict = {True: "yes", False: "NO", None: check.get("reason", "-")}[check.get("passed")]
            interval = check.get("drop_interval_90")
            if check.get("passed") is None or not interval:
                return verdict
            return f"{verdict} (drop {check['relative_drop']:.2f}, 90% CI {interval[0]:.2f}..{interval[1]:.2f})"

        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    variant.get("status", "missing"),
                    "/".join(str(s.get("steps")) for s in stages) or "-",
                    fmt(train_s),
                    fmt(last.get("lm_loss")),
                    fmt(last.get("recall@1")),
                    fmt(check.get("niah_at_L")),
                    fmt(check.get("niah_at_64L")),
                    passed(check),
                    f"{fmt(routed.get('niah_at_L'))} / {fmt(routed.get('niah_at_64L'))}",
                    passed(routed),
                    fmt(qa.get(str(row), {}).get("router_recall", {}).get("recall@1")),
                    fmt(qa.get(str(64 * row), {}).get("router_recall", {}).get("recall@1")),
                    " / ".join(fmt(qa.get(str(size), {}).get("ids_from_routed")) for size in (row, 64 * row)),
                    fmt(ev.get("multihop", {}).get("exact_match")),
                    fmt(ev.get("kv", {}).get("exact_match")),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_results(results: dict[str, Any], results_dir: Path, name: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots")
        return []
    from eval.scaling import PAPER_NIAH_AVERAGE

    paths = []
    variants = results["variants"]
    colours = {v: f"C{i}" for i, v in enumerate(variants)}

    def stage_axis(curves: list[dict]) -> list[tuple[dict, int]]:
        out, offset = [], 0
        for curve in curves:
            out.append((curve, offset))
            offset += curve["train"][-1]["step"] if curve["train"] else 0
        return out

    for kind, panels in (("loss", ("lm_loss", "aux_loss")), ("recall", ("recall@1", "recall@5"))):
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        for axis, key in zip(axes, panels):
            for variant, data in variants.items():
                placed = stage_axis(data.get("curves", []))
                for index, (curve, start) in enumerate(placed):
                    points = [(start + r["step"], r[key]) for r in curve["train"] if r.get(key) is not None]
                    if points:
                        axis.plot(
                            *zip(*points),
                            color=colours[variant],
                            alpha=0.85,
                            linewidth=1,
                            label=VARIANT_TITLES.get(variant, variant) if index == 0 else None,
                        )
                    evals = [(start + r["step"], r[key]) for r in curve["eval"] if r.get(key) is not None]
                    if evals:
                        axis.scatter(*zip(*evals), color=colours[variant], edgecolor="black", zorder=3, s=18)
                    if variant == next(iter(variants)) and index > 0:
                        axis.axvline(start, color="grey", linestyle="--", linewidth=0.7)
                        axis.text(
                            start,
                            1.0,
                            f" {curve['stage']}",
                            transform=axis.get_xaxis_transform(),
                            va="top",
                            fontsize=7,
                            color="grey",
                        )
            axis.set_xlabel("optimizer step (stages in order)")
            axis.set_ylabel(key)
            if kind == "loss":
                axis.set_yscale("log")
            else:
                axis.set_ylim(0, 1.05)
            if axis.get_legend_handles_labels()[0]:
                axis.legend(fontsize=7)
        figure.suptitle(
            f"{name}: training {kind} (lines: training rows; dots: held-out rows at each stage end)", fontsize=9
        )
        figure.tight_layout()
        path = results_dir / f"{name}_{kind}.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(str(path))

    row = results["longest_row"]
    figure, axis = plt.subplots(figsize=(7, 4.2))
    for variant, data in variants.items():
        niah = data.get("eval", {}).get("niah", {})
        title = VARIANT_TITLES.get(variant, variant)
        for key, style, label in (
            ("average", dict(marker="o"), title),
            ("average_routed_ids", dict(marker="s", linestyle="--"), f"{title}, IDs among routed documents"),
        ):
            points = sorted((int(size), value[key]) for size, value in niah.items() if value.get(key) is not None)
            if points:
                axis.plot(*zip(*points), color=colours[variant], label=label, **style)
    for reference, values in PAPER_NIAH_AVERAGE.items():
        if reference.startswith("MSA"):
            axis.plot(
                sorted(values),
                [values[s] for s in sorted(values)],
                color="grey",
                linestyle=":",
                marker="x",
                label=reference,
            )
    for size, text in ((row, "L (longest training row)"), (64 * row, "64 L")):
        axis.axvline(size, color="black", linestyle="--", linewidth=0.7)
        axis.text(size, 1.02, f" {text}", fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_ylim(0, 1.08)
    axis.set_xlabel("memory tokens")
    axis.set_ylabel("NIAH accuracy (average over subtasks)")
    axis.set_title(f"{name}: NIAH against memory size", fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    path = results_dir / f"{name}_niah.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(str(path))

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for axis, key in zip(axes, ("recall@1", "recall@5")):
        for variant, data in variants.items():
            qa = data.get("eval", {}).get("qa_recall", {})
            points = sorted(
                (int(size), value["router_recall"][key])
                for size, value in qa.items()
                if value.get("router_recall", {}).get(key) is not None
            )
            if points:
                axis.plot(*zip(*points), marker="o", color=colours[variant], label=VARIANT_TITLES.get(variant, variant))
        axis.axvline(row, color="black", linestyle="--", linewidth=0.7)
        axis.axvline(64 * row, color="black", linestyle="--", linewidth=0.7)
        axis.set_xscale("log", base=2)
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("memory tokens")
        axis.set_ylabel(f"held-out router {key}")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    figure.suptitle(
        f"{name}: router {'/'.join(f'recall@{k}' for k in RECALL_KS[:2])} of the needle among every "
        "document of one shared memory (first round, mean over router layers)",
        fontsize=9,
    )
    figure.tight_layout()
    path = results_dir / f"{name}_memory_recall.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(str(path))
    return paths


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    if not path.is_file():
        return "(no log)\n"
    text = path.read_bytes()[-400_000:].decode("utf-8", errors="replace").replace("\r", "\n")
    kept = [line for line in text.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    return "\n".join(kept[-lines:]) + "\n"


def merge_variants(results: dict[str, Any], earlier: list[Path]) -> None:
    """Add the variants of earlier runs' result files that this run did not train, so that
    machines with fewer GPUs than variants can run them over several calls and still get one
    table and one set of plots; their acceptance is judged again with this version's check. A
    file from another longest row or recipe is refused."""
    for path in earlier:
        previous = read_json(path)
        if previous is None:
            raise FileNotFoundError(f"--merge {path}: no readable results file there")
        if previous.get("niah_matched") is not True:
            raise ValueError(
                f"--merge {path}: its NIAH samples draw their own questions at every size (a file "
                "without niah_matched: true); they cannot share a table with this run's matched "
                "questions, so run those variants again instead of merging them"
            )
        mine = {
            "recipe": Path(results["recipe"]).name,
            "overrides": results["overrides"],
            "longest_row": results["longest_row"],
            "smoke": results["smoke"],
        }
        theirs = {**{key: previous.get(key) for key in mine}, "recipe": Path(previous.get("recipe") or "").name}
        for key in mine:
            if theirs[key] != mine[key]:
                raise ValueError(f"--merge {path}: its {key} is {theirs[key]!r}, this run's is {mine[key]!r}")
        for name, variant in previous.get("variants", {}).items():
            if name not in results["variants"]:
                merged = {**variant, "merged_from": str(path), "merged_device": previous.get("device")}
                # Judged again from its samples, so every row of the table is judged alike.
                merged["acceptance"] = acceptance(merged, results["longest_row"])
                merged["acceptance_routed_ids"] = acceptance(merged, results["longest_row"], "accuracy_routed_ids")
                results["variants"][name] = merged


def output_name(args: argparse.Namespace) -> str:
    return args.name or ("gpu_scale_smoke" if args.smoke else "gpu_scale")


def results_header(args: argparse.Namespace, device: str, row: int) -> dict[str, Any]:
    """What a results file says about its run, partial or final (`merge_variants` compares these)."""
    return {
        "recipe": str(args.recipe),
        "overrides": list(args.overrides),
        "smoke": args.smoke,
        "device": device,
        "longest_row": row,
        "steps_from": str(args.steps_from) if args.steps_from else None,
        # Every size asks the same NIAH questions; files written before that lack this key (`merge_variants`).
        "niah_matched": True,
    }


def write_progress_snapshot(
    jobs: list[Job], args: argparse.Namespace, device: str, row: int, t0: float, results_dir: Path
) -> None:
    """The variants' results so far, written where the final results file goes (`"partial": true`),
    so that a run killed from outside (a device lease running out) still leaves its numbers."""
    snapshot = {
        "partial": True,
        **results_header(args, device, row),
        "wall_s": time.time() - t0,
        "variants": {job.variant: read_json(job.run_dir / "result.json") or {"status": "not started"} for job in jobs},
    }
    write_json_atomic(results_dir / f"{output_name(args)}.json", snapshot)


def aggregate(
    jobs: list[Job],
    base: Any,
    device: str,
    row: int,
    args: argparse.Namespace,
    t0: float,
    tokenizer_s: float,
    results_dir: Path,
    work_dir: Path,
) -> dict[str, Any]:
    import platform

    import torch

    stage_names = [stage.name for stage in base.stages]
    results: dict[str, Any] = {
        **results_header(args, device, row),
        "memory_sizes": [row * m for m in sorted(SIZE_MULTIPLES)],
        "time_budget_min": args.time_budget,
        "tokenizer_s": tokenizer_s,
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available()
            else [],
        },
        "variants": {},
    }
    for job in jobs:
        variant = read_json(job.run_dir / "result.json") or {"variant": job.variant, "status": "missing"}
        if variant.get("status") == "running":
            variant["status"] = "stopped (deadline or crash)"
        if job.process is not None and job.process.returncode not in (0, None):
            variant["exit_code"] = job.process.returncode
        variant["slot"] = f"GPU {job.slot}" if job.slot >= 0 else "CPU"
        variant["wall_s"] = (job.finished or time.time()) - job.started if job.started else None
        variant["curves"] = stage_curves(job.run_dir, stage_names)
        variant["acceptance"] = acceptance(variant, row)
        variant["acceptance_routed_ids"] = acceptance(variant, row, "accuracy_routed_ids")
        results["variants"][job.variant] = variant
    merge_variants(results, args.merge)
    name = output_name(args)
    results["wall_s"] = time.time() - t0
    write_json_atomic(results_dir / f"{name}.json", results)  # first, so a failure below keeps the numbers
    problems = []
    try:
        table = summary_table(results)
    except Exception:
        table = "(no summary table)"
        problems.append(f"summary table: {traceback.format_exc()}")
    results["summary_table"] = table
    try:
        results["plots"] = plot_results(results, results_dir, name)
    except Exception:
        results["plots"] = []
        problems.append(f"plots: {traceback.format_exc()}")
    results["driver_errors"] = problems
    results["wall_s"] = time.time() - t0
    write_json_atomic(results_dir / f"{name}.json", results)
    log = [f"# {name}: {device}, budget {args.time_budget} min, wall {results['wall_s']:.0f} s\n", table, "", *problems]
    for job in jobs:
        log += [
            f"\n## {job.variant}: prep log\n",
            log_tail(work_dir / job.variant / "prep.log", 30),
            f"\n## {job.variant}: worker log\n",
            log_tail(job.log_path),
        ]
        errors = results["variants"][job.variant].get("errors") or []
        if errors:
            log += [f"\n## {job.variant}: errors\n", *[str(e)[-3000:] + "\n" for e in errors]]
        eval_errors = results["variants"][job.variant].get("eval", {}).get("errors") or []
        log += [
            f"\n## {job.variant}: evaluation error in {e.get('job')}\n{str(e.get('traceback'))[-2000:]}\n"
            for e in eval_errors[:5]
        ]
    (results_dir / f"{name}_log.txt").write_text("\n".join(log))
    print(table)
    print(*problems, sep="\n")
    print(f"\nwall {results['wall_s']:.0f} s; results in {results_dir / (name + '.json')}")
    return results
