"""CPU scale: the real pipeline (recipes/kv_cpu.yaml, two CPT stages, DeepSpeed) trains a
tiny MSA model for a bounded number of steps, and on held-out key-value memories its router finds
the fact's document (recall@1 >= 0.9, chance 1/8) and the model answers with the document's ID and
value (exact match >= 0.9), reading the ID from 4-token pooled chunks after a curriculum from
1-token chunks. docs/EXPERIMENTS.md has the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import REPO, failure_report, launcher_env

pytestmark = [pytest.mark.slow, pytest.mark.integration]

RECIPE = REPO / "recipes" / "kv_cpu.yaml"


# Slow tier: about 65 s idle, several minutes on a loaded machine. Its pass mark holds at the
# fixed two threads set below (CI's setting), not at every thread count: with one thread the
# float reduction order changes and this short run can stay on the value-copy plateau.
def test_kv_experiment_routes_and_answers_held_out_questions(tmp_path: Path) -> None:
    # Two threads, the CI machine's cores. The thread count changes float reductions, and with
    # them whether this short run leaves the value-copy plateau in time: with one thread the
    # run stayed on it at seed 0 (docs/EXPERIMENTS.md, CPU scale).
    env = {**launcher_env(), "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.kv_cpu",
            "--recipe",
            str(RECIPE),
            "--results-dir",
            str(tmp_path / "results"),
            f"run.output_dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, failure_report(result)
    results = json.loads((tmp_path / "results" / "kv_cpu.json").read_text())
    heldout = results["heldout"]
    assert heldout["questions"] >= 32
    assert heldout["chance_recall@1"] == 1 / 8
    assert heldout["router_recall"]["recall@1"] >= 0.9, heldout["router_recall"]
    assert heldout["exact_match"] >= 0.9, heldout["examples"]
    assert [curve["stage"] for curve in results["curves"]] == ["cpt_warmup", "cpt_main", "cpt_pooled"]
    # The evaluated model reads pooled 4-token chunks: the last stage's chunk size reached its export.
    exported = json.loads((tmp_path / "run" / "stages" / "cpt_pooled" / "export" / "config.json").read_text())
    assert exported["chunk_size"] == 4
    assert all(Path(path).is_file() for path in results["plots"])
