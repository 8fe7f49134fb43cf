"""The dense baseline trains the plain backbone on a stage's rows and logs the same throughput metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_runs import failure_report, run_launcher

pytestmark = pytest.mark.integration


def test_dense_baseline_logs_throughput(tmp_path: Path) -> None:
    result = run_launcher("dense_baseline", ["--stage", "cpt_warmup", "--steps", "2", f"run.output_dir={tmp_path}"])
    assert result.returncode == 0, failure_report(result)
    lines = (tmp_path / "dense_baseline/cpt_warmup/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["tokens_per_s_per_device"] > 0 and r["mfu"] > 0 and r["loss"] > 0 for r in records)
