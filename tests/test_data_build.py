"""Shard builds: killed builds resume without redoing finished shards or exposing partial
files, the manifest accounts for everything, configs never mix, the CLI works."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data.build import BuildConfig, build_dataset
from data.errors import OverlongExampleError
from data.loader import ROW_FIELDS, PackedRowLoader
from data.store import DocumentStore, ExampleShard, finished_shards

GENERATOR = {"generator": "needles", "kind": "multi_value", "num_samples": 24, "seed": 7, "haystack_docs": 5}


def config_values(tokenizer: Path) -> dict:
    return {
        "source": {"kind": "synthetic", "synthetic": GENERATOR},
        "tokenizer": str(tokenizer),
        "sample_kind": "retrieval",
        "memory": {"memory_tokens": 400, "max_memory_docs": 32},
        "max_example_tokens": 1024,
        "docs_per_shard": 40,
        "records_per_shard": 5,
    }


def all_rows(build: Path) -> list[bytes]:
    return [
        b"".join(row[name].numpy().tobytes() for name in ROW_FIELDS)
        for row in PackedRowLoader(build, 1024, max_epochs=1)
    ]


def shard_identity(directory: Path) -> dict[str, int]:
    return {f"{directory.name}/{p.name}": (p / "shard.json").stat().st_ino for p in finished_shards(directory)}


def test_cli_build_and_manifest(tmp_path: Path, sp_model: Path) -> None:
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config_values(sp_model)))
    result = subprocess.run(
        [sys.executable, "-m", "data.build", "--config", str(config_path), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    store = DocumentStore(tmp_path / "out" / "docs")
    assert manifest["documents"] == len(store) == 24 * (5 + 3) == summary["documents"]
    assert manifest["corpus_tokens"] == int(store.lengths.sum())
    assert manifest["examples"] == 24 and manifest["records_read"] == 24 and manifest["records_kept"] == 24
    assert manifest["examples_overlong_skipped"] == 0 and manifest["documents_truncated"] == 0
    assert manifest["records_skipped_bad"]["skipped"] == 0
    assert manifest["special_tokens_added"] == ["<|object_ref_end|>", "<End-of-Retrieve>"]
    assert manifest["config"] == BuildConfig.from_dict(config_values(sp_model)).to_dict()
    assert len(manifest["tokenizer_sha256"]) == 64
    # uint16 tokens: 2 bytes per token plus the per-document offsets and ids.
    assert manifest["token_dtype"] == "uint16"
    assert 2.0 <= manifest["document_bytes_per_corpus_token"] < 3.0
    shards = [ExampleShard(p) for p in finished_shards(tmp_path / "out" / "examples")]
    assert sum(int(s.example_tokens.sum()) for s in shards) == manifest["training_tokens_per_epoch"]


def test_killed_build_resumes_without_redoing_or_exposing_partial_shards(tmp_path: Path, sp_model: Path) -> None:
    reference = tmp_path / "reference"
    build_dataset(BuildConfig.from_dict(config_values(sp_model)), reference)
    killed = tmp_path / "killed"
    # SIGKILL the build right before it would publish its 7th shard (5 document shards come
    # first, then example shards), leaving that shard's files complete but unpublished.
    script = textwrap.dedent(f"""
        import json, os, signal
        from data import store
        from data.build import BuildConfig, build_dataset
        renames = []
        real_rename = os.rename
        def rename_then_die(source, target):
            renames.append(target)
            if len(renames) == 7:
                os.kill(os.getpid(), signal.SIGKILL)
            real_rename(source, target)
        store.os.rename = rename_then_die
        build_dataset(BuildConfig.from_dict(json.loads({json.dumps(json.dumps(config_values(sp_model)))})), {str(killed)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    visible = [p for p in (killed / "examples").iterdir() if not p.name.startswith(".")]
    hidden = [p for p in (killed / "examples").iterdir() if p.name.startswith(".")]
    assert len(visible) == 1 and len(hidden) == 1
    assert not (killed / "manifest.json").exists()
    for shard in visible:  # everything visible is complete
        assert len(ExampleShard(shard)) == json.loads((shard / "shard.json").read_text())["examples"]
    before = {**shard_identity(killed / "docs"), **shard_identity(killed / "examples")}
    manifest = build_dataset(BuildConfig.from_dict(config_values(sp_model)), killed)
    assert manifest["shards_reused"] == {"documents": 5, "examples": 1}
    after = {**shard_identity(killed / "docs"), **shard_identity(killed / "examples")}
    assert all(after[name] == inode for name, inode in before.items()), "finished shards were rewritten"
    assert not [p for p in killed.rglob(".tmp-*")]
    assert all_rows(killed) == all_rows(reference)


def test_finished_build_is_reused_without_reading_its_source(
    tmp_path: Path, sp_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import data.build as build_module

    first = build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "out")
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished build read its source again")

    monkeypatch.setattr(build_module, "stream_source", no_reading)
    monkeypatch.setattr(build_module, "_run_tasks", no_reading)
    assert build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "out") == first
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()} == files


def test_changed_config_does_not_mix_with_old_build(tmp_path: Path, sp_model: Path) -> None:
    build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "out")
    changed = config_values(sp_model)
    changed["seed"] = 1
    with pytest.raises(ValueError, match="another config, tokenizer or input files"):
        build_dataset(BuildConfig.from_dict(changed), tmp_path / "out")
    manifest = build_dataset(BuildConfig.from_dict(changed), tmp_path / "out", overwrite=True)
    assert manifest["shards_reused"] == {"documents": 0, "examples": 0}


def test_parallel_workers_build_the_same_shards(tmp_path: Path, sp_model: Path) -> None:
    build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "serial")
    build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "parallel", num_workers=2)
    for sub in ("docs", "examples"):
        for serial, parallel in zip(
            finished_shards(tmp_path / "serial" / sub), finished_shards(tmp_path / "parallel" / sub)
        ):
            for file in serial.iterdir():
                assert file.read_bytes() == (parallel / file.name).read_bytes(), file


def test_truncation_and_overlong_are_counted(tmp_path: Path, sp_model: Path) -> None:
    values = config_values(sp_model)
    values["max_doc_tokens"] = 30
    manifest = build_dataset(BuildConfig.from_dict(values), tmp_path / "out")
    store = DocumentStore(tmp_path / "out" / "docs")
    assert manifest["documents_truncated"] > 0 and int(store.lengths.max()) == 30
    lengths = PackedRowLoader(tmp_path / "out", 1024).datasets[0].example_tokens
    values["max_example_tokens"] = int(np.median(lengths))
    manifest = build_dataset(BuildConfig.from_dict(values), tmp_path / "short")
    assert manifest["examples_overlong_skipped"] == int((lengths > values["max_example_tokens"]).sum()) > 0
    assert manifest["examples"] + manifest["examples_overlong_skipped"] == 24
    kept = PackedRowLoader(tmp_path / "short", 1024).datasets[0].example_tokens
    assert int(kept.max()) <= values["max_example_tokens"]
    values["overlong"] = "error"
    with pytest.raises(OverlongExampleError, match="exceeds max_example_tokens"):
        build_dataset(BuildConfig.from_dict(values), tmp_path / "strict")


def test_lm_text_build(tmp_path: Path, sp_model: Path) -> None:
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("The river watches the morning light. " * 40)
    (tmp_path / "texts" / "b.jsonl").write_text(json.dumps({"text": "A farmer counts seven letters."}) + "\n")
    manifest = build_dataset(
        BuildConfig.from_dict(
            {
                "source": {"kind": "lm", "path": str(tmp_path / "texts")},
                "tokenizer": str(sp_model),
                "sample_kind": "lm",
                "max_example_tokens": 64,
            }
        ),
        tmp_path / "out",
    )
    assert manifest["documents"] == 0 and manifest["examples"] >= 3
    rows = list(PackedRowLoader(tmp_path / "out", 128, max_epochs=1))
    for row in rows:
        real = row["doc_ids"] != -1
        assert (row["doc_ids"][real] == 0).all()
        assert (row["labels"][real] == row["input_ids"][real]).all()


def test_build_stops_on_bad_records_or_counts_them(tmp_path: Path, sp_model: Path) -> None:
    from data_fixtures import write_beir

    from data.errors import DataFormatError, MissingFileError
    from data.synthetic import generate_needles

    beir = write_beir(tmp_path / "beir", generate_needles("single", 6, seed=2, haystack_docs=3))
    corpus = beir / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines.insert(2, '{"_id": "bad", "text": 5}')
    corpus.write_text("\n".join(lines) + "\n")
    values = {
        "source": {"kind": "beir", "path": str(beir), "split": "test"},
        "tokenizer": str(sp_model),
        "memory": {"memory_tokens": 300, "max_memory_docs": 16},
        "max_example_tokens": 1024,
    }
    with pytest.raises(DataFormatError, match=rf"{corpus}:3: document has no string 'text' field"):
        build_dataset(BuildConfig.from_dict(values), tmp_path / "strict")
    assert not (tmp_path / "strict" / "manifest.json").exists()
    manifest = build_dataset(BuildConfig.from_dict({**values, "skip_bad_records": True}), tmp_path / "lenient")
    assert manifest["records_skipped_bad"]["skipped"] == 1 and manifest["examples"] == 6
    assert manifest["documents"] == 6 * 4
    missing = {**values, "source": {"kind": "beir", "path": str(beir), "split": "dev"}}
    with pytest.raises(MissingFileError, match=r"qrels[/\\]dev.tsv"):
        build_dataset(BuildConfig.from_dict(missing), tmp_path / "missing")


def test_edited_input_file_is_not_mixed_with_old_shards(tmp_path: Path, sp_model: Path) -> None:
    from data_fixtures import write_beir

    from data.synthetic import generate_needles

    beir = write_beir(tmp_path / "beir", generate_needles("single", 4, seed=2, haystack_docs=3))
    values = {
        "source": {"kind": "beir", "path": str(beir), "split": "test"},
        "tokenizer": str(sp_model),
        "memory": {"memory_tokens": 300, "max_memory_docs": 16},
        "max_example_tokens": 1024,
    }
    build_dataset(BuildConfig.from_dict(values), tmp_path / "out")
    corpus = beir / "corpus.jsonl"
    corpus.write_text(corpus.read_text() + json.dumps({"_id": "extra", "text": "one more"}) + "\n")
    with pytest.raises(ValueError, match="input files"):
        build_dataset(BuildConfig.from_dict(values), tmp_path / "out")


def test_records_a_sample_kind_cannot_use_are_counted(tmp_path: Path, sp_model: Path) -> None:
    from data_fixtures import write_beir

    from data.synthetic import generate_needles

    beir = write_beir(tmp_path / "beir", generate_needles("multi_value", 4, seed=2, haystack_docs=3))
    values = {
        "source": {"kind": "beir", "path": str(beir), "split": "test"},
        "tokenizer": str(sp_model),
        "sample_kind": "qa",
        "memory": {"memory_tokens": 300, "max_memory_docs": 16},
        "max_example_tokens": 1024,
    }
    # A build left with 0 examples is an error that names why, and writes no manifest.
    with pytest.raises(ValueError, match=r"0 examples from 4 record.*4 unusable \{'no answer': 4\}"):
        build_dataset(BuildConfig.from_dict(values), tmp_path / "qa")  # BEIR has no answers
    assert not (tmp_path / "qa" / "manifest.json").exists()
    values.update(sample_kind="retrieval", memory={"memory_tokens": 300, "max_memory_docs": 2})
    with pytest.raises(ValueError, match=r"\{'more positives than max_memory_docs': 4\}"):
        build_dataset(BuildConfig.from_dict(values), tmp_path / "few")


def test_shard_size_does_not_change_the_data(tmp_path: Path, sp_model: Path) -> None:
    build_dataset(BuildConfig.from_dict(config_values(sp_model)), tmp_path / "small")
    values = config_values(sp_model)
    values.update(docs_per_shard=1000, records_per_shard=1000)
    build_dataset(BuildConfig.from_dict(values), tmp_path / "large")
    assert len(finished_shards(tmp_path / "large" / "examples")) == 1
    assert all_rows(tmp_path / "small") == all_rows(tmp_path / "large")
