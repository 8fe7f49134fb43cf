"""Exports load with `trust_remote_code=True` where `msa_modeling` cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from batches import tiny_msa
from memories import encoded_store, random_memory
from transformers import AutoModelForCausalLM

from msa_modeling import MSAForCausalLM
from msa_modeling.remote_code import AUTO_MAP, flattened_sources

# Runs in a fresh interpreter: any import of msa_modeling or msa_train fails, as where msa-train
# is not installed; the export is loaded through its own code, saved again and reloaded.
_LOAD_WITHOUT_THE_PACKAGE = """
import importlib.abc, json, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("msa_modeling", "msa_train"):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, NotInstalled())
import torch
from transformers import AutoModelForCausalLM

export, again, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    import msa_modeling
except ImportError:
    pass
else:
    raise SystemExit("msa_modeling is importable")
model = AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True).eval()
model.save_pretrained(again)
reloaded = AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.tensor(ids)).logits
    logits_again = reloaded(torch.tensor(ids)).logits
    generated = model.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False, eos_token_id=None)
print("RESULT " + json.dumps({"module": type(model).__module__, "logits": logits.tolist(),
                              "again": logits_again.tolist(), "generated": generated.tolist()}))
"""


@pytest.mark.parametrize("family", ["qwen3", "gemma3_text"])
def test_an_export_loads_with_trust_remote_code_without_the_package(family, tmp_path):
    model = tiny_msa(21, family=family)
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["auto_map"] == AUTO_MAP
    ids = [[5, 9, 17, 3, 44, 8]]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _LOAD_WITHOUT_THE_PACKAGE,
            str(tmp_path / "export"),
            str(tmp_path / "again"),
            json.dumps(ids),
        ],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    result = json.loads(lines[-1].removeprefix("RESULT "))
    assert result["module"].startswith("transformers_modules.")
    with torch.no_grad():
        expected = model(torch.tensor(ids))
        generated = model.generate(torch.tensor(ids), max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert torch.equal(torch.tensor(result["logits"]), expected.logits)
    assert torch.equal(torch.tensor(result["again"]), expected.logits)
    assert result["generated"] == generated.tolist()


def test_the_installed_package_stays_the_loader_without_trust_remote_code(tmp_path):
    model = tiny_msa(22)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is MSAForCausalLM


def test_flattening_rewrites_every_relative_import_to_a_written_module(tmp_path):
    model = tiny_msa(23)
    model.save_pretrained(tmp_path)
    written = {path.name for path in tmp_path.glob("*.py")}
    assert {
        "modeling_msa.py",
        "configuration_msa.py",
        "backbones.py",
        "backbones_base.py",
        "inference_generation.py",
    } <= written
    for name in written:
        for line in (tmp_path / name).read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("from ."):
                target = stripped.split()[1].lstrip(".")
                assert "." not in target and f"{target}.py" in written, (name, line)
            assert not stripped.startswith(("import msa_", "from msa_")), (name, line)
    # Flattening the flat folder again is the identity (a remote-code model saves the same files).
    assert flattened_sources(tmp_path) == {n: (tmp_path / n).read_text() for n in written}


def test_a_memory_generates_through_a_reloaded_export(tmp_path):
    model = tiny_msa(24)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    memory = random_memory(24)
    ids = torch.tensor([memory["question"]])
    store = encoded_store(model, memory)
    expected = model.generate(ids, memory=store, max_new_tokens=4, do_sample=False, eos_token_id=None)
    assert (
        loaded.generate(ids, memory=store, max_new_tokens=4, do_sample=False, eos_token_id=None).tolist()
        == expected.tolist()
    )
