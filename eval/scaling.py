"""Score against memory size: JSON, a PNG plot (when matplotlib is installed) and a markdown
comparison with the paper's published numbers (spec section 10) at matching sizes."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# RULER NIAH average accuracy (spec section 10); sizes in tokens, K = 1024.
PAPER_NIAH_AVERAGE = {
    "MSA-4B (paper)": {32768: 0.99, 65536: 0.98, 131072: 0.98, 262144: 0.98, 524288: 0.97, 1048576: 0.95},
    "Qwen3-4B-Instruct (paper)": {32768: 0.95, 65536: 1.00, 131072: 0.99, 262144: 0.48, 524288: 0.42, 1048576: 0.25},
}
# MS MARCO QA, LLM judge 0-5, 16K and 100M tokens of memory.
PAPER_MSMARCO_JUDGE = {"MSA-4B (paper)": {16384: 4.023, 100_000_000: 3.669}}


def size_label(tokens: int) -> str:
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if tokens >= scale and tokens % scale == 0:
            return f"{tokens // scale}{unit}"
    return str(tokens)


def comparison_table(points: dict[int, float], reference: dict[str, dict[int, float]], metric: str) -> str:
    """Markdown table: our score per size, and each reference's score where it has that size."""
    header = f"| memory | ours ({metric}) | " + " | ".join(reference) + " |"
    lines = [header, "|---" * (2 + len(reference)) + "|"]
    for size in sorted(points):
        cells = [f"{ref[size]:.3f}" if size in ref else "n/a" for ref in reference.values()]
        lines.append(f"| {size_label(size)} | {points[size]:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_curve(points: dict[int, float], reference: dict[str, dict[int, float]], metric: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 4))
    sizes = sorted(points)
    axes.plot(sizes, [points[s] for s in sizes], marker="o", label="this checkpoint")
    for name, ref in reference.items():
        ref_sizes = sorted(ref)
        axes.plot(ref_sizes, [ref[s] for s in ref_sizes], marker="x", linestyle="--", label=name)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("memory tokens")
    axes.set_ylabel(metric)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


def write_scaling_curve(
    points: dict[int, float],
    metric: str,
    out_dir: Path,
    name: str,
    reference: dict[str, dict[int, float]] | None = None,
) -> dict[str, str]:
    """Write `{name}.json`, `{name}.md` and, when matplotlib is installed, `{name}.png`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = reference or {}
    table = comparison_table(points, reference, metric)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(
        json.dumps(
            {
                "metric": metric,
                "points": [{"memory_tokens": s, "score": points[s]} for s in sorted(points)],
                "reference": {k: {str(s): v for s, v in ref.items()} for k, ref in reference.items()},
            },
            indent=1,
        )
    )
    (out_dir / f"{name}.md").write_text(table + "\n")
    written = {"json": str(json_path), "table": str(out_dir / f"{name}.md")}
    if matplotlib_available():
        written["png"] = str(plot_curve(points, reference, metric, out_dir / f"{name}.png"))
    else:
        logger.warning("matplotlib is not installed: no PNG for %s (pip install matplotlib)", name)
    return written


def write_scaling_curves(
    curves: dict[str, dict[int, float]],
    out_dir: Path,
    name: str,
    memory_tokens: dict[int, int] | None = None,
) -> dict[str, str]:
    """Several metrics against the same memory sizes: `{name}.json`, a `{name}.md` table (one
    column per metric) and, with matplotlib, `{name}.png` (one line per metric).

    `memory_tokens`: the encoded size of each requested size, recorded beside it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted({size for points in curves.values() for size in points})
    metrics = list(curves)
    lines = ["| memory | " + " | ".join(metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for size in sizes:
        cells = [f"{curves[m][size]:.3f}" if size in curves[m] else "n/a" for m in metrics]
        lines.append(f"| {size_label(size)} | " + " | ".join(cells) + " |")
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    json_path = out_dir / f"{name}.json"
    json_path.write_text(
        json.dumps(
            {
                "metrics": metrics,
                "points": [
                    {
                        "memory_tokens": size,
                        "encoded_tokens": (memory_tokens or {}).get(size),
                        **{m: curves[m].get(size) for m in metrics},
                    }
                    for size in sizes
                ],
            },
            indent=1,
        )
    )
    written = {"json": str(json_path), "table": str(out_dir / f"{name}.md")}
    if matplotlib_available() and sizes:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot

        figure, axes = pyplot.subplots(figsize=(6, 4))
        for metric in metrics:
            points = sorted(curves[metric].items())
            axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=metric)
        axes.set_xscale("log", base=2)
        axes.set_xlabel("memory tokens")
        axes.set_ylabel("score")
        axes.legend()
        figure.tight_layout()
        figure.savefig(out_dir / f"{name}.png", dpi=120)
        pyplot.close(figure)
        written["png"] = str(out_dir / f"{name}.png")
    elif not matplotlib_available():
        logger.warning("matplotlib is not installed: no PNG for %s (pip install matplotlib)", name)
    return written
