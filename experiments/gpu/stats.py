"""The acceptance check (NIAH at 64L within 10% of NIAH at L) and how far the samples support
it: paired scores per round and a bootstrap interval of the relative drop."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from typing import Any


def acceptance(variant: dict, row: int, accuracy_key: str = "accuracy") -> dict[str, Any]:
    """NIAH at 64 x the row length against NIAH at the row length (relative drop at most 10%),
    averaged over the subtasks measured at both sizes; `accuracy_key` "accuracy_routed_ids" judges
    the decoding with IDs among the routed documents. The sample counts are part of the check:
    with a few samples at 64L one answer moves the ratio by more than the 10% allowed."""
    niah = variant.get("eval", {}).get("niah", {})
    at_row = niah.get(str(row), {}).get(accuracy_key) or {}
    at_64 = niah.get(str(64 * row), {}).get(accuracy_key) or {}
    common = [task for task in at_row if task != "average" and task in at_64]
    check: dict[str, Any] = {"L": row, "subtasks": common, "niah_at_L": None, "niah_at_64L": None}
    if not common:
        check.update(passed=None, reason="not measured")
        return check
    for key, size in (("samples_at_L", row), ("samples_at_64L", 64 * row)):
        check[key] = sum(s["subtask"] in common for s in niah[str(size)].get("samples", []))
    check["niah_at_L"] = sum(at_row[t] for t in common) / len(common)
    check["niah_at_64L"] = sum(at_64[t] for t in common) / len(common)
    if check["niah_at_L"] == 0:
        check.update(passed=None, reason="accuracy at L is 0: no relative drop to judge")
    else:
        check["relative_drop"] = (check["niah_at_L"] - check["niah_at_64L"]) / check["niah_at_L"]
        check["passed"] = check["relative_drop"] <= 0.10
        score_key = "routed_ids_score" if accuracy_key == "accuracy_routed_ids" else "score"
        pairs = paired_niah_scores(
            niah[str(row)].get("samples", []), niah[str(64 * row)].get("samples", []), common, score_key
        )
        check.update(paired_niah_comparison(pairs))
    return check


def paired_niah_scores(
    at_row: list[dict], at_64: list[dict], subtasks: Sequence[str], score_key: str = "score"
) -> dict[str, list[tuple[float, float]]]:
    """Per subtask, (score at L, score at 64L) of the samples asked in the same round: the n-th
    sample of a subtask at one size pairs with its n-th at the other: the same question of the same
    needles at the same depths in haystacks of the two sizes (`run_niah`), a matched comparison.
    Samples without a partner (a deadline inside a round) are left out."""
    pairs = {}
    for task in subtasks:
        row_scores = [s[score_key] for s in at_row if s["subtask"] == task and s.get(score_key) is not None]
        wide_scores = [s[score_key] for s in at_64 if s["subtask"] == task and s.get(score_key) is not None]
        pairs[task] = list(zip(row_scores, wide_scores))
    return pairs


def paired_niah_comparison(
    pairs: dict[str, list[tuple[float, float]]], resamples: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """How far the samples support the relative drop: a 90% bootstrap interval of the drop,
    resampling each subtask's pairs (the accuracy is the mean over subtasks, as in the check),
    and the pairs right at one size only (`right_at_L_only`, `right_at_64L_only`)."""
    tasks = [task for task, task_pairs in pairs.items() if task_pairs]
    flat = [pair for task in tasks for pair in pairs[task]]
    comparison: dict[str, Any] = {
        "pairs": len(flat),
        "right_at_L_only": sum(row == 1 and wide < 1 for row, wide in flat),
        "right_at_64L_only": sum(wide == 1 and row < 1 for row, wide in flat),
        "drop_interval_90": None,
    }
    if not tasks:
        return comparison
    rng = random.Random(seed)
    drops = []
    for _ in range(resamples):
        drawn = {task: rng.choices(pairs[task], k=len(pairs[task])) for task in tasks}
        at_row = sum(statistics.fmean(r for r, _ in drawn[t]) for t in tasks) / len(tasks)
        at_64 = sum(statistics.fmean(w for _, w in drawn[t]) for t in tasks) / len(tasks)
        if at_row > 0:
            drops.append((at_row - at_64) / at_row)
    if drops:
        drops.sort()
        comparison["drop_interval_90"] = [drops[int(0.05 * (len(drops) - 1))], drops[int(0.95 * (len(drops) - 1))]]
    return comparison
