"""Answer and retrieval metrics: SQuAD-style EM/F1, RULER string match, recall@k, summaries."""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Collection, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between the normalised prediction and reference."""
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((Counter(predicted) & Counter(expected)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(predicted), overlap / len(expected)
    return 2 * precision * recall / (precision + recall)


def string_match_fraction(prediction: str, expected_values: Sequence[str]) -> float:
    """Share of the expected values found verbatim in the prediction (RULER's NIAH score)."""
    if not expected_values:
        return 0.0
    lowered = prediction.lower()
    return sum(value.lower() in lowered for value in expected_values) / len(expected_values)


def recall_at_k(ranked: Sequence[int], positives: Collection[int], k: int) -> float | None:
    """|top-k of `ranked` ∩ positives| / |positives|; None without positives."""
    if not positives:
        return None
    return len(set(ranked[:k]) & set(positives)) / len(set(positives))


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, min, max and count of a list of numbers (empty -> count 0 only)."""
    if not values:
        return {"count": 0}
    return {
        "count": len(values),
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }
