"""Readers for local data: BEIR, JSONL retrieval records, LM text, Hugging Face datasets.

Nothing here downloads. Every malformed line is reported with its file and line number;
with ``BadRecordTally(skip_bad_records=True)`` it is counted and skipped instead.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from .errors import BadRecordTally, DataFormatError, MissingFileError
from .records import Document, RetrievalDataset, RetrievalRecord

logger = logging.getLogger(__name__)

BeirSplit = Literal["train", "dev", "test"]


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MissingFileError(path, f"missing {what}")
    return path


def iter_text_lines(path: Path, tally: BadRecordTally) -> Iterator[tuple[int, str]]:
    """``(line_number, text)`` of a UTF-8 file; a line that is not UTF-8 is a bad record (file:line)."""
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                yield line_number, raw.decode("utf-8")
            except UnicodeDecodeError as error:
                tally.handle(
                    DataFormatError(
                        path, line_number, f"not UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1})"
                    )
                )


def iter_jsonl(path: str | Path, tally: BadRecordTally | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; lines must hold JSON objects."""
    tally = tally or BadRecordTally()
    path = _require_file(Path(path), "JSONL file")
    for line_number, line in iter_text_lines(path, tally):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            tally.handle(DataFormatError(path, line_number, f"malformed JSON ({error.msg} at column {error.colno})"))
            continue
        if not isinstance(value, dict):
            tally.handle(DataFormatError(path, line_number, f"expected a JSON object, got {type(value).__name__}"))
            continue
        yield line_number, value


def _first_present(row: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        if name in row:
            return row[name]
    return None


def read_corpus_jsonl(path: str | Path, tally: BadRecordTally | None = None) -> list[Document]:
    """A corpus file of ``{"_id"|"id"|"doc_id", "text", "title"?}`` lines (BEIR's corpus.jsonl)."""
    return list(iter_corpus_jsonl(path, tally))


def iter_corpus_jsonl(
    path: str | Path,
    tally: BadRecordTally | None = None,
    index_of: dict[str, int] | None = None,
) -> Iterator[Document]:
    """Stream the documents of a corpus file, so that a corpus larger than memory can be read.

    ``index_of``, when given, receives each accepted document's id and ordinal; it also serves
    as the duplicate check, so that only the ids are held in memory, never the texts.
    """
    tally = tally or BadRecordTally()
    seen: dict[str, int] = index_of if index_of is not None else {}
    for line_number, row in iter_jsonl(path, tally):
        doc_id = _first_present(row, ("_id", "id", "doc_id"))
        text = row.get("text")
        if doc_id is None:
            tally.handle(DataFormatError(path, line_number, "document has no id field (_id, id or doc_id)"))
            continue
        if not isinstance(text, str):
            tally.handle(DataFormatError(path, line_number, "document has no string 'text' field"))
            continue
        if not text.strip():
            tally.handle(DataFormatError(path, line_number, f"document {doc_id!r} has empty text"))
            continue
        doc_id = str(doc_id)
        if doc_id in seen:
            tally.handle(DataFormatError(path, line_number, f"duplicate document id {doc_id!r}"))
            continue
        seen[doc_id] = len(seen)
        yield Document(doc_id, text, str(row.get("title") or ""))


def read_queries_jsonl(path: str | Path, tally: BadRecordTally | None = None) -> dict[str, str]:
    """BEIR queries.jsonl: query id -> text."""
    tally = tally or BadRecordTally()
    queries: dict[str, str] = {}
    for line_number, row in iter_jsonl(path, tally):
        query_id = _first_present(row, ("_id", "id", "query_id"))
        text = row.get("text")
        if query_id is None or not isinstance(text, str):
            tally.handle(DataFormatError(path, line_number, "query needs an id (_id or id) and a string 'text'"))
            continue
        if str(query_id) in queries:
            tally.handle(DataFormatError(path, line_number, f"duplicate query id {str(query_id)!r}"))
            continue
        queries[str(query_id)] = text
    return queries


def read_qrels_tsv(
    path: str | Path,
    known_queries: dict[str, str],
    known_docs: set[str] | dict[str, int],
    tally: BadRecordTally | None = None,
) -> dict[str, dict[str, float]]:
    """BEIR qrels: ``query-id<TAB>corpus-id<TAB>score`` with an optional header line.

    Scores are kept as numbers (fractional and graded ones too): a document with score > 0 is a
    positive, one with score <= 0 a hard negative."""
    tally = tally or BadRecordTally()
    path = _require_file(Path(path), "qrels file")
    judgements: dict[str, dict[str, float]] = {}
    for line_number, line in iter_text_lines(path, tally):
        for fields in csv.reader([line], delimiter="\t"):
            if not fields or not "".join(fields).strip():
                continue
            if line_number == 1 and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
                continue
            if len(fields) < 3:
                tally.handle(DataFormatError(path, line_number, f"expected 3 tab-separated fields, got {len(fields)}"))
                continue
            query_id, doc_id, score_text = (field.strip() for field in fields[:3])
            try:
                score = float(score_text)  # graded or fractional; a positive is score > 0
            except ValueError:
                score = math.nan
            if not math.isfinite(score):
                tally.handle(DataFormatError(path, line_number, f"score {score_text!r} is not a finite number"))
                continue
            if query_id not in known_queries:
                tally.handle(DataFormatError(path, line_number, f"unknown query id {query_id!r}"))
                continue
            if doc_id not in known_docs:
                tally.handle(DataFormatError(path, line_number, f"unknown doc id {doc_id!r}"))
                continue
            judgements.setdefault(query_id, {})[doc_id] = score
    return judgements


def read_beir(
    root: str | Path,
    split: BeirSplit | str = "test",
    tally: BadRecordTally | None = None,
    use_title: bool = True,
) -> RetrievalDataset:
    """A BEIR dataset folder. Qrels with score > 0 are positives, score 0 hard negatives.

    Queries without any positive judgement in ``split`` are left out.
    """
    tally = tally or BadRecordTally()
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(root, "BEIR folder not found")
    _require_file(root / "queries.jsonl", "BEIR queries.jsonl")
    _require_file(root / "qrels" / f"{split}.tsv", f"BEIR qrels/{split}.tsv")
    corpus = read_corpus_jsonl(_require_file(root / "corpus.jsonl", "BEIR corpus.jsonl"), tally)
    if not use_title:
        corpus = [Document(doc.doc_id, doc.text) for doc in corpus]
    records = read_beir_records(root, split, {doc.doc_id for doc in corpus}, tally)
    logger.info("BEIR %s/%s: %d documents, %d queries with positives", root, split, len(corpus), len(records))
    return RetrievalDataset(corpus, records)


def read_beir_records(
    root: str | Path,
    split: str,
    known_docs: set[str] | dict[str, int],
    tally: BadRecordTally | None = None,
) -> list[RetrievalRecord]:
    """The queries of a BEIR folder with their judgements in ``split``, checked against
    ``known_docs`` (the corpus ids, read separately so the corpus can be streamed)."""
    tally = tally or BadRecordTally()
    root = Path(root)
    queries = read_queries_jsonl(_require_file(root / "queries.jsonl", "BEIR queries.jsonl"), tally)
    qrels_path = _require_file(root / "qrels" / f"{split}.tsv", f"BEIR qrels/{split}.tsv")
    judgements = read_qrels_tsv(qrels_path, queries, known_docs, tally)
    records = []
    for query_id, scores in judgements.items():
        positives = [doc_id for doc_id, score in scores.items() if score > 0]
        if not positives:
            continue
        negatives = [doc_id for doc_id, score in scores.items() if score <= 0]
        records.append(RetrievalRecord(queries[query_id], positives, negatives, query_id=query_id))
    return records


def _doc_id_list(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, (str, int)) for item in value):
        raise ValueError(f"'{field}' must be a list of document ids")
    return [str(item) for item in value]


def parse_retrieval_row(row: dict[str, Any], known_docs: set[str] | dict[str, int] | None) -> RetrievalRecord:
    """Validate one ``{query, positives, negatives?, answer?, hops?}`` mapping; raises ValueError."""
    query = row.get("query")
    if not isinstance(query, str) or not query:
        raise ValueError("'query' must be a non-empty string")
    hops = None
    if row.get("hops") is not None:
        if not isinstance(row["hops"], list) or not row["hops"]:
            raise ValueError("'hops' must be a non-empty list of lists of document ids")
        hops = [_doc_id_list(hop, "hops[]") for hop in row["hops"]]
    positives = _doc_id_list(row["positives"], "positives") if row.get("positives") is not None else []
    if not positives and hops is None:
        raise ValueError("record has neither 'positives' nor 'hops'")
    negatives = _doc_id_list(row.get("negatives") or [], "negatives")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, str):
        answer = json.dumps(answer) if not isinstance(answer, list) else ", ".join(str(item) for item in answer)
    record = RetrievalRecord(query, positives, negatives, answer, hops, str(row.get("id", row.get("query_id", ""))))
    if known_docs is not None:
        referenced = record.positives + record.negatives + [d for hop in (record.hops or []) for d in hop]
        unknown = [doc_id for doc_id in referenced if doc_id not in known_docs]
        if unknown:
            raise ValueError(
                f"unknown doc id {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
    return record


def read_retrieval_jsonl(
    records_path: str | Path,
    corpus_path: str | Path,
    tally: BadRecordTally | None = None,
) -> RetrievalDataset:
    """JSONL records ``{query, positives, negatives?, answer?, hops?}`` plus a corpus JSONL file."""
    tally = tally or BadRecordTally()
    _require_file(Path(records_path), "records JSONL file")
    corpus = read_corpus_jsonl(corpus_path, tally)
    return RetrievalDataset(corpus, read_retrieval_records(records_path, {doc.doc_id for doc in corpus}, tally))


def read_retrieval_records(
    records_path: str | Path,
    known_docs: set[str] | dict[str, int] | None,
    tally: BadRecordTally | None = None,
) -> list[RetrievalRecord]:
    """The records of a JSONL file, their doc ids checked against ``known_docs``."""
    tally = tally or BadRecordTally()
    records = []
    for line_number, row in iter_jsonl(records_path, tally):
        try:
            records.append(parse_retrieval_row(row, known_docs))
        except (ValueError, KeyError) as error:
            tally.handle(DataFormatError(records_path, line_number, str(error)))
    return records


def iter_lm_texts(
    path: str | Path,
    text_field: str = "text",
    txt_unit: Literal["file", "paragraph", "line"] = "file",
    tally: BadRecordTally | None = None,
) -> Iterator[str]:
    """Language-model text from ``.txt`` files (a file, a blank-line paragraph or a line per
    text) or ``.jsonl`` files (``text_field`` per line). A folder is read file by file, sorted.
    A ``save_to_disk`` folder or a parquet/csv/arrow file is opened with ``datasets``."""
    tally = tally or BadRecordTally()
    path = Path(path)
    if _is_saved_hf_dataset(path) or (path.is_file() and path.suffix in (".parquet", ".csv", ".arrow")):
        for row_number, row in enumerate(load_local_hf_dataset(path), start=1):
            text = row.get(text_field)
            if not isinstance(text, str):
                tally.handle(DataFormatError(path, row_number, f"no string field {text_field!r}"))
                continue
            yield text
        return
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
        if not files:
            raise MissingFileError(path, "no .txt or .jsonl files in folder")
    else:
        files = [_require_file(path, "LM text file")]
    for file in files:
        if file.suffix == ".jsonl":
            for line_number, row in iter_jsonl(file, tally):
                text = row.get(text_field)
                if not isinstance(text, str):
                    tally.handle(DataFormatError(file, line_number, f"no string field {text_field!r}"))
                    continue
                yield text
            continue
        raw = file.read_bytes()
        try:
            content = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            line = raw.count(b"\n", 0, error.start) + 1
            tally.handle(DataFormatError(file, line, f"not UTF-8 (byte {raw[error.start]:#04x}); the file is skipped"))
            continue
        if txt_unit == "file":
            pieces = [content]
        elif txt_unit == "paragraph":
            pieces = content.split("\n\n")
        else:
            pieces = content.splitlines()
        yield from (piece for piece in pieces if piece.strip())


_HF_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}


def _is_saved_hf_dataset(path: Path) -> bool:
    return path.is_dir() and any(
        (path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def load_local_hf_dataset(path: str | Path, split: str | None = None) -> Any:
    """Open what ``datasets`` can read from local disk: a ``save_to_disk`` folder, or
    json/jsonl/csv/parquet/text/arrow files (a file or a folder of them)."""
    import datasets

    path = Path(path)
    if not path.exists():
        raise MissingFileError(path, "dataset path not found")
    if _is_saved_hf_dataset(path):
        loaded = datasets.load_from_disk(str(path))
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in _HF_BUILDERS) if path.is_dir() else [path]
        if not files or files[0].suffix not in _HF_BUILDERS:
            raise DataFormatError(path, None, f"no file datasets can read (extensions {sorted(_HF_BUILDERS)})")
        builder = _HF_BUILDERS[files[0].suffix]
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split or "train")
    if isinstance(loaded, datasets.DatasetDict):
        if split is None:
            if len(loaded) != 1:
                raise DataFormatError(path, None, f"dataset has splits {list(loaded)}; pass split=")
            split = next(iter(loaded))
        return loaded[split]
    return loaded


DOCUMENT_ID_FIELDS = ("_id", "id", "doc_id")


def corpus_from_hf(
    dataset: Any,
    id_field: str | None = None,
    text_field: str = "text",
    title_field: str | None = "title",
    source_name: str = "<hf dataset>",
) -> list[Document]:
    """Documents from a Hugging Face dataset's rows; the id is `id_field`, or by default the first
    of `_id`, `id`, `doc_id` (as in a corpus JSONL file). Row numbers stand in for lines in errors."""
    id_fields = (id_field,) if id_field else DOCUMENT_ID_FIELDS
    documents = []
    for row_number, row in enumerate(dataset, start=1):
        doc_id = _first_present(row, id_fields)
        if doc_id is None:
            raise DataFormatError(
                source_name,
                row_number,
                f"document has no id field ({' or '.join(id_fields)}); its fields are {sorted(row)}",
            )
        if not isinstance(row.get(text_field), str):
            raise DataFormatError(source_name, row_number, f"document {doc_id!r} has no string {text_field!r} field")
        title = row.get(title_field) if title_field else ""
        documents.append(Document(str(doc_id), row[text_field], title or ""))
    return documents


def records_from_hf(
    dataset: Any,
    known_docs: set[str] | None,
    source_name: str = "<hf dataset>",
    tally: BadRecordTally | None = None,
) -> list[RetrievalRecord]:
    """Retrieval records from rows with the JSONL record fields; row numbers stand in for lines."""
    tally = tally or BadRecordTally()
    records = []
    for row_number, row in enumerate(dataset, start=1):
        try:
            records.append(parse_retrieval_row(dict(row), known_docs))
        except (ValueError, KeyError) as error:
            tally.handle(DataFormatError(source_name, row_number, str(error)))
    return records
