"""Print packed rows of a build in readable form (``python -m data.show_rows BUILD``).

Each example is shown as its runs of tokens: the shared prefix, every memory document
(``+`` marks a positive), the query and, in brackets, what the model must generate.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .loader import PackedRowLoader, PreparedDataset
from .tokenization import load_tokenizer


def describe_row(row: dict, decode: Callable[[list[int]], str], max_chars: int = 200) -> str:
    """Readable text of one packed row."""
    doc_ids = row["doc_ids"].numpy()
    example_ids = row["example_ids"].numpy()
    labels = row["labels"].numpy()
    input_ids = row["input_ids"].numpy()
    aux = row["aux_labels"].numpy()
    lines = []
    key = np.stack([example_ids, doc_ids, labels != -100], axis=1)
    boundaries = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
    for start, end in zip(np.concatenate([[0], boundaries]), np.concatenate([boundaries, [len(doc_ids)]])):
        example, role = int(example_ids[start]), int(doc_ids[start])
        if role == -1:
            lines.append(f"  padding x{end - start}")
            continue
        text = decode(input_ids[start:end].tolist())
        text = text if len(text) <= max_chars else text[: max_chars // 2] + " ... " + text[-max_chars // 2 :]
        if role == -2:
            name = "prefix"
        elif role > 0:
            name = f"doc {role}{' +' if aux[start] else ''}"
        else:
            name = "generate" if labels[start] != -100 else "query"
        lines.append(f"  ex {example} {name:>9} ({end - start:>5} tok): {text!r}")
    return "\n".join(lines)


def build_row_length(build: Path) -> int:
    """The build's own `max_example_tokens`: the shortest row that holds any of its examples."""
    return int(PreparedDataset(build).manifest["config"]["max_example_tokens"])


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", type=Path, help="one source's build folder, e.g. runs/tiny/data/<source>")
    parser.add_argument("--row-length", type=int, help="tokens per row (default: the build's max_example_tokens)")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=200, help="shorten longer runs of text")
    args = parser.parse_args(argv)
    tokenizer = load_tokenizer(args.build / "tokenizer")
    row_length = args.row_length or build_row_length(args.build)
    loader = PackedRowLoader(args.build, row_length, seed=args.seed)
    for index in range(args.rows):
        row = loader.next_row()
        if row is None:
            break
        print(f"row {index}: examples {loader.last_row_examples}")
        print(describe_row(row, tokenizer.decode, args.max_chars))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
