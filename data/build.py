"""Build pre-tokenised shards from local data (also a CLI: ``python -m data.build``).

Every corpus document is tokenised once and stored by document; examples are stored as
document references plus their tokenised query/answer tail (see ``store``). Rows are
assembled later by the loader, so the training tokens themselves are never written.

The build is resumable: shards are renamed into place when complete, a re-run skips the
shards that exist, and a changed config or tokenizer refuses to mix with an old build.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from . import readers, synthetic
from .errors import BadRecordTally, DataFormatError, MissingFileError, OverlongExampleError
from .offline import stay_offline
from .records import Document, RetrievalDataset, RetrievalRecord
from .samples import IndexedRecord, MemoryConfig, SampleBuilder, SampleKind, UnusableRecordError
from .store import (
    DocumentStore,
    atomic_write_text,
    finished_shards,
    remove_stale_temporaries,
    shard_name,
    token_dtype,
    write_document_shard,
    write_example_shard,
)
from .templates import ChatFormat, TemplateConfig, TemplateTokens
from .tokenization import HuggingFaceTokenizer, TextTokenizer, load_tokenizer, worker_pool

logger = logging.getLogger(__name__)

SourceKind = Literal["beir", "records", "synthetic", "lm", "hf_records"]


@dataclass
class SourceConfig:
    """Where the raw data is.

    - ``beir``: ``path`` is the BEIR folder, ``split`` the qrels split.
    - ``records``: ``path`` is the records JSONL, ``corpus_path`` the corpus JSONL.
    - ``hf_records``: both paths are anything ``datasets`` opens locally; ``split`` selects.
    - ``lm``: ``path`` is a .txt/.jsonl file or folder (``text_field`` for JSONL).
    - ``synthetic``: ``synthetic`` = {"generator": "needles"|"kv_facts"|"multihop", ...kwargs}.
    """

    kind: SourceKind
    path: str = ""
    corpus_path: str = ""
    split: str = "train"
    text_field: str = "text"
    synthetic: dict[str, Any] = field(default_factory=dict)


def _known_keys(section: type, values: dict[str, Any], name: str) -> dict[str, Any]:
    """``values`` unchanged, or ValueError naming the keys that ``section`` does not have."""
    unknown = set(values) - {f.name for f in dataclasses.fields(section)}
    if unknown:
        raise ValueError(f"unknown build config keys in {name}: {sorted(unknown)}")
    return values


@dataclass
class BuildConfig:
    """Everything that determines the content of a build (and so its fingerprint)."""

    source: SourceConfig
    tokenizer: str
    sample_kind: SampleKind = "retrieval"
    template: TemplateConfig = field(default_factory=TemplateConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    max_example_tokens: int = 16384
    max_doc_tokens: int | None = None
    seed: int = 0
    # A few hundred MB of Python token lists per worker task; a few thousand shards for 20B tokens.
    docs_per_shard: int = 100_000
    records_per_shard: int = 50_000
    skip_bad_records: bool = False
    overlong: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        if (self.source.kind == "lm") != (self.sample_kind == "lm"):
            raise ValueError(
                f"sample_kind {self.sample_kind!r} does not fit source kind {self.source.kind!r}: "
                "plain-text sources make 'lm' samples and only they do"
            )
        if self.sample_kind not in ("retrieval", "qa", "interleave", "lm"):
            raise ValueError(f"unknown sample_kind {self.sample_kind!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BuildConfig:
        """Build from plain (JSON/YAML) values; nested sections may be partial."""
        values = dict(values)
        values["source"] = SourceConfig(**_known_keys(SourceConfig, values["source"], "source"))
        values["template"] = TemplateConfig.from_dict(values.get("template") or {})
        values["memory"] = MemoryConfig(**_known_keys(MemoryConfig, values.get("memory") or {}, "memory"))
        return cls(**_known_keys(cls, values, "the top level"))

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for the manifest."""
        return asdict(self)


def load_source(source: SourceConfig, tally: BadRecordTally) -> RetrievalDataset:
    """Read a retrieval source into text records."""
    if source.kind == "beir":
        return readers.read_beir(source.path, source.split, tally)
    if source.kind == "records":
        return readers.read_retrieval_jsonl(source.path, source.corpus_path, tally)
    if source.kind == "hf_records":
        corpus = readers.corpus_from_hf(
            readers.load_local_hf_dataset(source.corpus_path), source_name=source.corpus_path
        )
        rows = readers.load_local_hf_dataset(source.path, source.split)
        records = readers.records_from_hf(rows, {d.doc_id for d in corpus}, source.path, tally)
        return RetrievalDataset(corpus, records)
    if source.kind == "synthetic":
        options = dict(source.synthetic)
        generator = options.pop("generator", "needles")
        generators = {
            "needles": synthetic.generate_needles,
            "kv_facts": synthetic.generate_kv_facts,
            "multihop": synthetic.generate_multihop_chains,
        }
        if generator not in generators:
            raise ValueError(f"unknown synthetic generator {generator!r}; choose from {sorted(generators)}")
        return generators[generator](**options)
    raise ValueError(f"source kind {source.kind!r} does not hold retrieval records")


def stream_source(
    source: SourceConfig,
    tally: BadRecordTally,
    index_of: dict[str, int],
) -> tuple[Iterator[Document], Callable[[], list[RetrievalRecord]]]:
    """The corpus as a stream, and a reader for the records to call once the stream is spent.

    File-based corpora (BEIR, records + corpus JSONL) are never held in memory: only their ids
    land in ``index_of`` (id -> corpus index), which the records are then checked against.
    """
    if source.kind == "beir":
        root = Path(source.path)
        if not root.is_dir():
            raise MissingFileError(root, "BEIR folder not found")
        for required, what in (
            ("queries.jsonl", "BEIR queries.jsonl"),
            (f"qrels/{source.split}.tsv", f"BEIR qrels/{source.split}.tsv"),
        ):
            if not (root / required).is_file():
                raise MissingFileError(root / required, f"missing {what}")
        return (
            readers.iter_corpus_jsonl(root / "corpus.jsonl", tally, index_of),
            lambda: readers.read_beir_records(root, source.split, index_of, tally),
        )
    if source.kind == "records":
        if not Path(source.path).is_file():
            raise MissingFileError(source.path, "missing records JSONL file")
        return (
            readers.iter_corpus_jsonl(source.corpus_path, tally, index_of),
            lambda: readers.read_retrieval_records(source.path, index_of, tally),
        )
    dataset = load_source(source, tally)

    def indexed() -> Iterator[Document]:
        for document in dataset.corpus:
            index_of[document.doc_id] = len(index_of)
            yield document

    return indexed(), lambda: dataset.records


def _chunks(items: Iterable, size: int) -> Iterator[tuple[int, list]]:
    iterator = iter(items)
    for index in itertools.count():
        chunk = list(itertools.islice(iterator, size))
        if not chunk:
            return
        yield index, chunk


# --- worker side -------------------------------------------------------------------------


@dataclass
class _WorkerContext:
    tokenizer: TextTokenizer
    config: BuildConfig
    output: Path
    dtype: np.dtype
    builder: SampleBuilder | None = None


_context: _WorkerContext | None = None


def _init_worker(tokenizer: TextTokenizer, config_values: dict, output: str, dtype_name: str) -> None:
    global _context
    _context = _WorkerContext(tokenizer, BuildConfig.from_dict(config_values), Path(output), np.dtype(dtype_name))


def _sample_builder(context: _WorkerContext) -> SampleBuilder:
    if context.builder is None:
        store = DocumentStore(context.output / "docs")
        template_tokens = TemplateTokens.build(
            context.config.template, context.tokenizer, context.config.memory.max_memory_id
        )
        context.builder = SampleBuilder(
            context.config.sample_kind,
            context.config.template,
            template_tokens,
            context.tokenizer,
            store.lengths,
            store.tokens,
            context.config.memory,
            context.config.seed,
        )
    return context.builder


def _document_shard_task(task: tuple[int, list[str], list[str]]) -> dict:
    assert _context is not None
    index, doc_ids, texts = task
    token_lists = _context.tokenizer.encode_batch(texts)
    limit = _context.config.max_doc_tokens
    truncated = 0
    if limit is not None:
        truncated = sum(len(tokens) > limit for tokens in token_lists)
        token_lists = [tokens[:limit] for tokens in token_lists]
    stats = {"documents": len(texts), "tokens": int(sum(len(t) for t in token_lists)), "truncated": truncated}
    write_document_shard(_context.output / "docs" / shard_name(index), token_lists, doc_ids, _context.dtype, stats)
    return stats


def _example_shard_task(task: tuple[int, list]) -> dict:
    assert _context is not None
    index, items = task
    config = _context.config
    builder = _sample_builder(_context)
    plans, lengths = [], []
    stats: dict = {
        "records": len(items),
        "records_unusable": 0,
        "examples": 0,
        "overlong_skipped": 0,
        "tail_tokens": 0,
        "training_tokens": 0,
        "memory_references": 0,
        "unusable_reasons": {},
    }
    for position, item in enumerate(items):
        try:
            if isinstance(item, str):
                new_plans = builder.build_lm(
                    item, config.max_example_tokens, index * config.records_per_shard + position
                )
            else:
                new_plans = builder.build(item)
        except UnusableRecordError as error:
            stats["records_unusable"] += 1
            stats["unusable_reasons"][error.reason] = stats["unusable_reasons"].get(error.reason, 0) + 1
            continue
        for plan in new_plans:
            length = plan.num_tokens(builder.template_tokens, builder.doc_lengths)
            if length > config.max_example_tokens:
                if config.overlong == "error":
                    raise OverlongExampleError(
                        f"record {getattr(item, 'record_index', '?')}: example of {length} "
                        f"tokens exceeds max_example_tokens={config.max_example_tokens}"
                    )
                stats["overlong_skipped"] += 1
                continue
            plans.append(plan)
            lengths.append(length)
            stats["tail_tokens"] += len(plan.tail_tokens)
            stats["memory_references"] += len(plan.memory)
    stats["examples"] = len(plans)
    stats["training_tokens"] = int(sum(lengths))
    write_example_shard(_context.output / "examples" / shard_name(index), plans, lengths, _context.dtype, stats)
    return stats


def _run_tasks(
    tasks: Iterable, function: Callable[[Any], dict], num_workers: int, initargs: tuple, description: str
) -> None:
    """Run ``function`` over ``tasks`` (possibly a lazy stream) in ``num_workers`` processes.

    At most two tasks per worker are in flight, so a streamed corpus never piles up in memory.
    """
    if num_workers <= 1:
        _init_worker(*initargs)
        for task in tqdm(tasks, desc=description, unit="shard"):
            function(task)
        return
    pool = None
    in_flight: collections.deque = collections.deque()
    try:
        for task in tqdm(tasks, desc=description, unit="shard"):
            if pool is None:
                pool = worker_pool(initargs[0], num_workers, _init_worker, initargs[1:])
            in_flight.append(pool.submit(function, task))
            while len(in_flight) >= 2 * num_workers:
                in_flight.popleft().result()
        while in_flight:
            in_flight.popleft().result()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _sum_stats(shards: list[Path]) -> dict:
    totals: dict = {}
    for shard in shards:
        for key, value in json.loads((shard / "shard.json").read_text()).items():
            if isinstance(value, int):
                totals[key] = totals.get(key, 0) + value
            elif isinstance(value, dict):
                merged = totals.setdefault(key, {})
                for name, count in value.items():
                    merged[name] = merged.get(name, 0) + count
    return totals


def source_signature(source: SourceConfig) -> list[list]:
    """(path, size, modification time) of every input file, so that edited inputs are never
    mixed with shards built from their old contents."""
    signature = []
    for root in (source.path, source.corpus_path):
        if not root:
            continue
        root_path = Path(root)
        files = sorted(p for p in root_path.rglob("*") if p.is_file()) if root_path.is_dir() else [root_path]
        for file in files:
            if file.exists():
                stat = file.stat()
                signature.append([str(file), stat.st_size, stat.st_mtime_ns])
    return signature


def _directory_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.exists() else 0


def build_dataset(config: BuildConfig, output: str | Path, num_workers: int = 1, overwrite: bool = False) -> dict:
    """Build (or finish building) the shards of ``config`` under ``output``; return the manifest."""
    started = time.time()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temporaries(output)
    if stale:
        logger.info("removed %d unfinished temporary shard(s) of an interrupted build", stale)

    tokenizer = load_tokenizer(config.tokenizer)
    if config.template.chat_from_tokenizer:
        if not isinstance(tokenizer, HuggingFaceTokenizer) or not getattr(tokenizer.hf, "chat_template", None):
            raise ValueError(
                f"{config.tokenizer}: chat_from_tokenizer needs a Hugging Face tokenizer with a chat template"
            )
        # Resolved into the config, so that workers, the manifest and the fingerprint all see it.
        template = dataclasses.replace(
            config.template, chat=ChatFormat.from_hf_tokenizer(tokenizer.hf), chat_from_tokenizer=False
        )
        config = dataclasses.replace(config, template=template)
    added_tokens = tokenizer.ensure_special_tokens(config.template.special_strings())
    # The tokenizer counts by content, not by path, so a run folder copied elsewhere still matches.
    described = {key: value for key, value in config.to_dict().items() if key != "tokenizer"}
    identity = {"config": described, "tokenizer": tokenizer.fingerprint(), "inputs": source_signature(config.source)}
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    fingerprint_path = output / "build_fingerprint.json"
    if fingerprint_path.exists():
        previous = json.loads(fingerprint_path.read_text())["fingerprint"]
        finished = _finished_manifest(output, fingerprint) if previous == fingerprint else None
        if finished is not None:
            logger.info("reusing build %s (%d examples)", output, finished["examples"])
            return finished
        if previous != fingerprint:
            if not overwrite:
                raise ValueError(
                    f"{output} holds a build with another config, tokenizer or input files; "
                    "rebuild with `python -m data.build ... --overwrite`, or delete that "
                    "folder and run again"
                )
            for sub in ("docs", "examples"):
                for shard in finished_shards(output / sub):
                    shutil.rmtree(shard)
            (output / "manifest.json").unlink(missing_ok=True)
    atomic_write_text(fingerprint_path, json.dumps({"fingerprint": fingerprint, "config": config.to_dict()}, indent=1))
    tokenizer.save(output / "tokenizer")
    dtype = token_dtype(tokenizer.vocab_size)
    initargs = (tokenizer, config.to_dict(), str(output), dtype.name)

    tally = BadRecordTally(skip_bad_records=config.skip_bad_records)
    (output / "docs").mkdir(exist_ok=True)
    (output / "examples").mkdir(exist_ok=True)
    done_docs = {p.name for p in finished_shards(output / "docs")}
    done_examples = {p.name for p in finished_shards(output / "examples")}

    items: list
    reused_docs = len(done_docs)
    if config.source.kind == "lm":
        items = list(readers.iter_lm_texts(config.source.path, config.source.text_field, tally=tally))
        records_total = len(items)
    else:
        index_of: dict[str, int] = {}
        corpus, read_records = stream_source(config.source, tally, index_of)
        doc_tasks = (
            (index, [d.doc_id for d in chunk], [d.full_text() for d in chunk])
            for index, chunk in _chunks(corpus, config.docs_per_shard)
            if shard_name(index) not in done_docs
        )
        _run_tasks(doc_tasks, _document_shard_task, num_workers, initargs, "tokenising documents")
        DocumentStore(output / "docs").write_lengths()
        records = read_records()
        items = []
        for record_index, record in enumerate(records):
            try:
                items.append(
                    IndexedRecord(
                        record_index,
                        record.query,
                        [index_of[d] for d in record.positives],
                        [index_of[d] for d in record.negatives],
                        record.answer,
                        [[index_of[d] for d in hop] for hop in record.hops] if record.hops else None,
                    )
                )
            except KeyError as error:
                tally.handle(
                    DataFormatError(
                        config.source.path or "<source>",
                        None,
                        f"record {record_index} names unknown doc id {error.args[0]!r}",
                    )
                )
        records_total = len(records)
        del records

    example_tasks = [
        (index, chunk)
        for index, chunk in _chunks(items, config.records_per_shard)
        if shard_name(index) not in done_examples
    ]
    reused_examples = len(done_examples)
    _run_tasks(example_tasks, _example_shard_task, num_workers, initargs, "building examples")

    doc_shards = finished_shards(output / "docs")
    example_shards = finished_shards(output / "examples")
    doc_totals = _sum_stats(doc_shards)
    example_totals = _sum_stats(example_shards)
    template_tokens = TemplateTokens.build(config.template, tokenizer, config.memory.max_memory_id)
    corpus_tokens = doc_totals.get("tokens", 0)
    doc_bytes = _directory_bytes(output / "docs")
    manifest = {
        "format_version": 1,
        "fingerprint": fingerprint,
        "tokenizer_sha256": tokenizer.fingerprint(),
        "tokenizer_vocab_size": tokenizer.vocab_size,
        "special_token_ids": tokenizer.special_token_ids,
        "special_tokens_added": added_tokens,
        "pad_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0,
        "token_dtype": dtype.name,
        "config": config.to_dict(),
        "template_tokens": asdict(template_tokens),
        "documents": doc_totals.get("documents", 0),
        "corpus_tokens": corpus_tokens,
        "documents_truncated": doc_totals.get("truncated", 0),
        "records_read": records_total,
        "records_kept": records_total - example_totals.get("records_unusable", 0),
        "records_skipped_bad": tally.summary(),
        "records_unusable": example_totals.get("records_unusable", 0),
        "records_unusable_reasons": example_totals.get("unusable_reasons", {}),
        "examples": example_totals.get("examples", 0),
        "examples_overlong_skipped": example_totals.get("overlong_skipped", 0),
        "training_tokens_per_epoch": example_totals.get("training_tokens", 0),
        "tail_tokens": example_totals.get("tail_tokens", 0),
        "memory_references": example_totals.get("memory_references", 0),
        "document_shards": len(doc_shards),
        "example_shards": len(example_shards),
        "shards_reused": {"documents": reused_docs, "examples": reused_examples},
        "bytes": {"documents": doc_bytes, "examples": _directory_bytes(output / "examples")},
        "document_bytes_per_corpus_token": doc_bytes / corpus_tokens if corpus_tokens else None,
        "build_seconds": round(time.time() - started, 3),
    }
    if not manifest["examples"]:
        # Without a manifest the build stays incomplete, so a fixed input rebuilds it.
        raise ValueError(
            f"build {output}: 0 examples from {records_total} record(s): {tally.skipped} bad record(s) skipped, "
            f"{manifest['records_unusable']} unusable {manifest['records_unusable_reasons'] or ''}, "
            f"{manifest['examples_overlong_skipped']} example(s) over max_example_tokens="
            f"{config.max_example_tokens}; check the source ({config.source.kind}) and these settings"
        )
    atomic_write_text(output / "manifest.json", json.dumps(manifest, indent=1))
    if manifest["records_skipped_bad"]["skipped"] or manifest["examples_overlong_skipped"]:
        logger.warning(
            "build %s: %d bad record(s) skipped, %d overlong example(s) skipped",
            output,
            manifest["records_skipped_bad"]["skipped"],
            manifest["examples_overlong_skipped"],
        )
    logger.info(
        "build %s: %d documents (%d tokens), %d examples (%d training tokens per epoch)",
        output,
        manifest["documents"],
        corpus_tokens,
        manifest["examples"],
        manifest["training_tokens_per_epoch"],
    )
    return manifest


def _finished_manifest(output: Path, fingerprint: str) -> dict | None:
    """The manifest of a finished build of ``fingerprint`` in ``output``, or None. The manifest is
    written last, after every shard, so its presence with this fingerprint means nothing is left to do."""
    manifest_path = output / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    return manifest if manifest.get("fingerprint") == fingerprint else None


def _load_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    return json.loads(text)


def main(argv: Iterable[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description="Build pre-tokenised MSA training shards from local data.")
    parser.add_argument("--config", required=True, type=Path, help="build config, JSON or YAML (BuildConfig fields)")
    parser.add_argument("--output", required=True, type=Path, help="output folder")
    parser.add_argument("--num-workers", type=int, default=1, help="tokenisation worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace a build made with another config")
    parser.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed records")
    parser.add_argument(
        "--allow-network",
        action="store_true",
        help="let `hf_records` sources and tokenizers reach the Hugging Face Hub (default: offline)",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    stay_offline(args.allow_network)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = _load_config_file(args.config)
    if args.skip_bad_records:
        values["skip_bad_records"] = True
    manifest = build_dataset(BuildConfig.from_dict(values), args.output, args.num_workers, args.overwrite)
    summary = {
        key: manifest[key]
        for key in (
            "documents",
            "corpus_tokens",
            "examples",
            "training_tokens_per_epoch",
            "examples_overlong_skipped",
            "document_bytes_per_corpus_token",
        )
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
