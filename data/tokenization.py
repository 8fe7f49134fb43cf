"""One interface over fast Hugging Face tokenizers and sentencepiece models, plus
tokenisation of many texts in parallel worker processes.

Template special strings (the round delimiter, the end-of-retrieval marker, chat markers)
must each be one token. They are added when the tokenizer lacks them and the additions are
logged, because the model's embedding matrix then has to grow to ``vocab_size``.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class TextTokenizer(ABC):
    """Encodes text to ids and back; special strings become single ids wherever they occur."""

    def __init__(self) -> None:
        self._special_ids: dict[str, int] = {}
        self._special_pattern: re.Pattern[str] | None = None

    @abstractmethod
    def _encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode texts that contain no special strings, without BOS/EOS."""

    @abstractmethod
    def _existing_special_id(self, token: str) -> int | None:
        """The id the tokenizer already gives ``token`` as a single unit, if any."""

    @abstractmethod
    def _register_new_special(self, token: str) -> int:
        """Give ``token`` a new id and return it."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens included, no whitespace clean-up."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids including every added token."""

    @property
    @abstractmethod
    def eos_token_id(self) -> int | None:
        """End-of-sequence id, if the tokenizer has one."""

    @abstractmethod
    def _content_digest(self) -> bytes:
        """Bytes that identify the tokenizer's behaviour."""

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write the tokenizer (with its added tokens) under ``directory``; return the path."""

    def ensure_special_tokens(self, tokens: Sequence[str], report: bool = True) -> list[str]:
        """Make every string in ``tokens`` a single id; return (and, if ``report``, log) those
        that were added."""
        added = []
        for token in tokens:
            if not token or token in self._special_ids:
                continue
            existing = self._existing_special_id(token)
            if existing is None:
                existing = self._register_new_special(token)
                added.append(token)
            self._special_ids[token] = existing
        ordered = sorted(self._special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None
        if added and report:
            logger.warning(
                "added %d special token(s) missing from the tokenizer: %s (vocab size now %d; "
                "the model's embeddings must be resized)",
                len(added),
                added,
                self.vocab_size,
            )
        return added

    @property
    def special_token_ids(self) -> dict[str, int]:
        """Template special strings and their ids."""
        return dict(self._special_ids)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with special strings as single ids, no BOS/EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once (the backends batch internally)."""
        pieces: list[str] = []
        layout: list[list[int | str]] = []
        for text in texts:
            parts = (
                self._special_pattern.split(text)
                if self._special_pattern and self._special_pattern.search(text)
                else [text]
            )
            entry: list[int | str] = []
            for index, part in enumerate(parts):
                if index % 2 == 1:
                    entry.append(self._special_ids[part])
                elif part:
                    entry.append(f"\0{len(pieces)}")
                    pieces.append(part)
            layout.append(entry)
        encoded = self._encode_plain_batch(pieces) if pieces else []
        results = []
        for entry in layout:
            ids: list[int] = []
            for item in entry:
                if isinstance(item, int):
                    ids.append(item)
                else:
                    ids.extend(encoded[int(item[1:])])
            results.append(ids)
        return results

    def fingerprint(self) -> str:
        """sha256 over the tokenizer and its special-token assignments."""
        digest = hashlib.sha256(self._content_digest())
        for token, token_id in sorted(self._special_ids.items()):
            digest.update(f"\0{token}\0{token_id}".encode())
        return digest.hexdigest()


class HuggingFaceTokenizer(TextTokenizer):
    """A fast (Rust ``tokenizers``) tokenizer: a folder for ``AutoTokenizer`` or a tokenizer.json."""

    def __init__(self, source: str | Path | object) -> None:
        super().__init__()
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        if isinstance(source, (str, Path)):
            path = Path(source)
            if path.is_file():
                self.hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
            elif path.is_dir():
                self.hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                raise FileNotFoundError(f"{path}: no tokenizer file or folder")
        else:
            self.hf = source
        if not getattr(self.hf, "is_fast", False):
            raise TypeError("only fast Hugging Face tokenizers are supported; pass a sentencepiece .model instead")

    @property
    def backend(self) -> Any:
        """The Rust tokenizer that does the batched work."""
        return self.hf.backend_tokenizer

    def _encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch(texts, add_special_tokens=False)]

    def _existing_special_id(self, token: str) -> int | None:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            return None
        # Only a token the tokenizer itself emits for the literal string counts as present.
        return token_id if self.backend.encode(token, add_special_tokens=False).ids == [token_id] else None

    def _register_new_special(self, token: str) -> int:
        from tokenizers import AddedToken

        self.hf.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
        return self.backend.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.hf.eos_token_id

    def _content_digest(self) -> bytes:
        return self.backend.to_str().encode()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(directory))
        return directory

    def __getstate__(self) -> dict:
        # Workers only need the Rust tokenizer; pickling the Python wrapper drags in far more.
        return {"json": self.backend.to_str(), "special": self._special_ids, "eos": self.hf.eos_token_id}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        TextTokenizer.__init__(self)
        self.hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["json"]))
        if state["eos"] is not None:
            self.hf.eos_token = self.backend.id_to_token(state["eos"])
        self._special_ids = {}
        self.ensure_special_tokens(list(state["special"]), report=False)


class SentencePieceTokenizer(TextTokenizer):
    """A sentencepiece ``.model``. Missing special strings get ids after the model's own."""

    def __init__(self, model: str | Path | bytes) -> None:
        super().__init__()
        import sentencepiece

        self._model_bytes = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self._model_bytes)
        self._base_size = self.processor.get_piece_size()
        self._extra_tokens: list[str] = []

    def _encode_plain_batch(self, texts: list[str]) -> list[list[int]]:
        return self.processor.encode(texts, out_type=int)

    def _existing_special_id(self, token: str) -> int | None:
        token_id = self.processor.piece_to_id(token)
        if token_id == self.processor.unk_id() and token != self.processor.id_to_piece(token_id):
            return None
        return token_id

    def _register_new_special(self, token: str) -> int:
        self._extra_tokens.append(token)
        return self._base_size + len(self._extra_tokens) - 1

    def decode(self, ids: Sequence[int]) -> str:
        special_by_id = {token_id: token for token, token_id in self._special_ids.items()}
        pieces: list[str] = []
        run: list[int] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in special_by_id:
                if run:
                    pieces.append(self.processor.decode(run))
                    run = []
                pieces.append(special_by_id[token_id])
            else:
                run.append(token_id)
        if run:
            pieces.append(self.processor.decode(run))
        return "".join(pieces)

    @property
    def vocab_size(self) -> int:
        return self._base_size + len(self._extra_tokens)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.processor.eos_id()
        return eos if eos >= 0 else None

    def _content_digest(self) -> bytes:
        return self._model_bytes

    def save(self, directory: str | Path) -> Path:
        import json

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(self._model_bytes)
        (directory / "added_tokens.json").write_text(json.dumps(self.special_token_ids, indent=1))
        return directory / "tokenizer.model"

    def __getstate__(self) -> dict:
        return {"model": self._model_bytes, "extra": self._extra_tokens, "special": self._special_ids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"])
        self._extra_tokens = list(state["extra"])
        self._special_ids = {}
        extra = set(self._extra_tokens)
        for token, token_id in state["special"].items():
            self._special_ids[token] = token_id
        self.ensure_special_tokens([t for t in state["special"] if t not in extra], report=False)
        ordered = sorted(self._special_ids, key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """A sentencepiece tokenizer for ``*.model`` files (or a folder holding only tokenizer.model
    plus added_tokens.json, as written by ``SentencePieceTokenizer.save``), otherwise a fast
    Hugging Face tokenizer. Only local files are read."""
    import json

    path = Path(path)
    if path.is_file() and path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.is_dir() and (path / "tokenizer.model").is_file() and not (path / "tokenizer.json").is_file():
        tokenizer = SentencePieceTokenizer(path / "tokenizer.model")
        added_path = path / "added_tokens.json"
        if added_path.is_file():
            added = json.loads(added_path.read_text())
            # Restoring a saved tokenizer's own additions is not news worth a warning.
            tokenizer.ensure_special_tokens(sorted(added, key=added.get), report=False)
        return tokenizer
    return HuggingFaceTokenizer(path)


_worker_tokenizer: TextTokenizer | None = None


def _init_worker(tokenizer: TextTokenizer) -> None:
    global _worker_tokenizer
    # One process per core is the parallelism; Rust threads on top would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def worker_pool(
    tokenizer: TextTokenizer, num_workers: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """Spawn-context worker processes that hold ``tokenizer``.

    Spawn, because the Rust tokenizer's thread pool does not survive fork; an executor rather
    than ``multiprocessing.Pool``, because a worker that dies raises ``BrokenProcessPool``
    in the parent instead of hanging it.
    """
    context = multiprocessing.get_context("spawn")
    if initializer is None:
        return ProcessPoolExecutor(num_workers, mp_context=context, initializer=_init_worker, initargs=(tokenizer,))
    return ProcessPoolExecutor(
        num_workers, mp_context=context, initializer=initializer, initargs=(tokenizer, *initargs)
    )


def encode_in_workers(
    tokenizer: TextTokenizer,
    texts: Sequence[str],
    num_workers: int,
    chunk_size: int = 1024,
) -> Iterator[list[int]]:
    """Encode ``texts`` in ``num_workers`` processes, yielding ids in input order."""
    chunks = [list(texts[start : start + chunk_size]) for start in range(0, len(texts), chunk_size)]
    if num_workers <= 1:
        for chunk in chunks:
            yield from tokenizer.encode_batch(chunk)
        return
    with worker_pool(tokenizer, num_workers) as pool:
        for encoded in pool.map(_encode_chunk, chunks):
            yield from encoded
