"""`MemoryStore`: an encoded memory, saved as safetensors shards plus a manifest.

Its K̄/V̄/K̄R live on the host, or on a GPU when `MemoryEncoder(storage_device=...)` put them
there; the offsets, the documents' token ids and the prefix K/V are always on the host.

Documents are numbered 0..N-1 in the order they were added (memory ID = index + 1 in the
`[i]. text` rendering). Chunks of document d are `doc_chunk_offsets[d]:doc_chunk_offsets[d+1]`
in every router layer's tensors. Saving writes only the documents not yet on disk, so an
appended memory costs one new shard, never a rewrite.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PREFIX_FILE = "prefix.safetensors"


def model_signature(config) -> dict:
    """The config fields an encoded memory depends on; loading checks them against the model."""
    return {
        "num_hidden_layers": config.num_hidden_layers,
        "router_layers": list(config.router_layers),
        "chunk_size": config.chunk_size,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "query_position_offset": config.query_position_offset,
        "document_positions": bool(config.document_positions),
        # The stored K̄R are prepared for this score (normalised for cosine, raw for scaled_dot).
        "routing_score": config.routing_score,
    }


IDENTITY_SAMPLE = 4096  # elements sampled per parameter tensor for the model identity


@torch.no_grad()
def model_identity(model: torch.nn.Module) -> str:
    """A SHA-256 that tells one set of weights from another, cheaply: the config, and each
    parameter's name, shape, dtype and up to `IDENTITY_SAMPLE` evenly strided elements.
    Two checkpoints of one shape differ in it unless they agree at every sampled element."""
    digest = hashlib.sha256(json.dumps(model_signature(model.config), sort_keys=True).encode())
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // IDENTITY_SAMPLE, 1)][:IDENTITY_SAMPLE]
        digest.update(f"\0{name}\0{tuple(param.shape)}\0{param.dtype}\0".encode())
        digest.update(sample.float().cpu().numpy().tobytes())
    return digest.hexdigest()


def _read_verified(path: Path, entry: dict, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, its size and SHA-256 checked against `entry` while
    reading it once; every failure names the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: {what} is missing") from None
    if "bytes" in entry and len(data) != entry["bytes"]:
        raise ValueError(
            f"{path}: {what} has {len(data)} bytes, the manifest says {entry['bytes']} "
            "(truncated or replaced); re-encode the memory or restore the file"
        )
    if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(
            f"{path}: {what} does not match its SHA-256 in the manifest (corrupt); re-encode the memory "
            "or restore the file"
        )
    try:
        return load_safetensors(data)
    except (SafetensorError, ValueError) as error:
        raise ValueError(f"{path}: {what} is not a readable safetensors file ({error})") from error


def _file_entry(path: Path) -> dict:
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _position_mode(document_positions: bool) -> str:
    if document_positions:
        return "document-wise positions (document_positions=True: each document from 0)"
    return "global positions (document_positions=False: documents at their offsets in the memory)"


def check_signature(signature: dict, config, what: str = "the memory") -> None:
    """Raise ValueError unless `signature` (of an encoded memory) matches the model `config`.

    A memory encoded with one position mode cannot serve a model of the other: its K̄/V̄
    carry the rotary positions of that mode. That mismatch gets its own message.
    """
    expected = model_signature(config)
    # Memories saved before the setting existed were encoded for the cosine score.
    signature = {"routing_score": "cosine", **signature}
    if signature == expected:
        return
    stored_mode, model_mode = signature.get("document_positions", True), expected["document_positions"]
    if stored_mode != model_mode:
        raise ValueError(
            f"{what} was encoded with {_position_mode(stored_mode)}, but the model uses {_position_mode(model_mode)}; "
            "re-encode the memory with this model"
        )
    raise ValueError(f"{what} was encoded for {signature}, the model has {expected}")


@dataclass
class EncodedDocuments:
    """A batch of encoded documents, in order (what `MemoryEncoder.encode_documents` returns)."""

    doc_num_chunks: torch.Tensor  # [n] long
    doc_tokens: list[torch.Tensor]  # n x [len] int32, the rendered token ids
    keys: list[torch.Tensor]  # per router layer [C, Hkv, D]
    values: list[torch.Tensor]  # per router layer [C, Hkv, D]
    routing_keys: list[torch.Tensor]  # per router layer [C, Hkv * D], as `routing.prepare_routing_keys` leaves them


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    save_file({name: t.cpu().contiguous() for name, t in tensors.items()}, str(temporary))
    os.replace(temporary, path)


@dataclass
class MemoryStore:
    """An encoded memory: prefix K/V of every layer, pooled chunk K̄/V̄/K̄R of router layers."""

    signature: dict
    prefix_ids: torch.Tensor  # [T] long
    prefix_keys: list[torch.Tensor]  # per layer [T, Hkv, D]
    prefix_values: list[torch.Tensor]
    doc_chunk_offsets: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    doc_token_offsets: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.long))
    doc_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    routing_keys: list[torch.Tensor] = field(default_factory=list)
    shards: list[dict] = field(default_factory=list)  # manifest entries of documents on disk
    model_identity: str | None = None  # `model_identity` of the encoding model (None: not recorded)

    @property
    def router_layers(self) -> list[int]:
        return self.signature["router_layers"]

    @property
    def num_docs(self) -> int:
        return self.doc_chunk_offsets.numel() - 1

    @property
    def num_chunks(self) -> int:
        return int(self.doc_chunk_offsets[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.doc_token_offsets[-1])

    @property
    def saved_docs(self) -> int:
        return sum(shard["num_docs"] for shard in self.shards)

    def chunk_doc(self) -> torch.Tensor:
        """[C] long: the document of every chunk."""
        counts = self.doc_chunk_offsets.diff()
        return torch.repeat_interleave(torch.arange(self.num_docs), counts)

    def doc_token_ids(self, doc: int) -> list[int]:
        """The rendered tokens of document `doc` (0-based), as they were encoded."""
        return self.doc_tokens[self.doc_token_offsets[doc] : self.doc_token_offsets[doc + 1]].tolist()

    @property
    def device(self) -> torch.device:
        """Where the K̄/V̄/K̄R are (the host for an empty memory)."""
        return self.keys[0].device if self.keys else torch.device("cpu")

    def nbytes(self) -> int:
        """Bytes of every tensor of the memory, wherever they live (see `device`)."""
        tensors = [
            *self.keys,
            *self.values,
            *self.routing_keys,
            *self.prefix_keys,
            *self.prefix_values,
            self.doc_tokens,
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def extend(self, encoded: EncodedDocuments) -> None:
        """Append encoded documents after the existing ones."""
        if encoded.doc_num_chunks.numel() == 0:
            return
        lengths = torch.tensor([t.numel() for t in encoded.doc_tokens], dtype=torch.long)
        self.doc_chunk_offsets = torch.cat(
            [self.doc_chunk_offsets, self.num_chunks + torch.cumsum(encoded.doc_num_chunks, 0)]
        )
        self.doc_token_offsets = torch.cat([self.doc_token_offsets, self.num_tokens + torch.cumsum(lengths, 0)])
        self.doc_tokens = torch.cat([self.doc_tokens, *encoded.doc_tokens])
        for name in ("keys", "values", "routing_keys"):
            old, new = getattr(self, name), getattr(encoded, name)
            setattr(self, name, [torch.cat([a, b]) for a, b in zip(old, new)] if old else list(new))

    def pin_memory(self) -> MemoryStore:
        """Page-lock the content K̄/V̄ on the host, so that copies of selected documents to a GPU are
        asynchronous (a memory already on a GPU is left as it is)."""
        if self.device.type == "cpu":
            self.keys = [t.pin_memory() for t in self.keys]
            self.values = [t.pin_memory() for t in self.values]
        return self

    def gather_chunks(self, layer_slot: int, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K̄, V̄ [M, Hkv, D] of every chunk of `docs` (in the given order), router layer `layer_slot`."""
        docs = docs.cpu()
        starts, ends = self.doc_chunk_offsets[docs], self.doc_chunk_offsets[docs + 1]
        counts = ends - starts
        chunk_index = torch.repeat_interleave(starts - _offsets(counts)[:-1], counts) + torch.arange(int(counts.sum()))
        keys, values = self.keys[layer_slot], self.values[layer_slot]
        chunk_index = chunk_index.to(keys.device)
        pinned = keys.device.type == "cpu" and keys.is_pinned()
        out_keys = torch.empty(
            (chunk_index.numel(), *keys.shape[1:]), dtype=keys.dtype, device=keys.device, pin_memory=pinned
        )
        out_values = torch.empty_like(out_keys, pin_memory=pinned)
        torch.index_select(keys, 0, chunk_index, out=out_keys)
        torch.index_select(values, 0, chunk_index, out=out_values)
        return out_keys, out_values

    # ---------------------------------------------------------------- disk

    def save(self, directory: str | os.PathLike, docs_per_shard: int = 100_000) -> Path:
        """Write the documents not yet on disk as new shards, then the manifest (atomically)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / PREFIX_FILE).exists():
            prefix = {"prefix_ids": self.prefix_ids}
            for layer, (k, v) in enumerate(zip(self.prefix_keys, self.prefix_values)):
                prefix[f"keys.{layer}"], prefix[f"values.{layer}"] = k, v
            _atomic_save(prefix, directory / PREFIX_FILE)
        prefix_entry = _file_entry(directory / PREFIX_FILE)
        for first in range(self.saved_docs, self.num_docs, docs_per_shard):
            self.shards.append(self._save_shard(directory, first, min(first + docs_per_shard, self.num_docs)))
        manifest = {
            "format_version": FORMAT_VERSION,
            "signature": self.signature,
            "model_identity": self.model_identity,
            "prefix": prefix_entry,
            "dtype": str(self.keys[0].dtype).removeprefix("torch.") if self.keys else None,
            "num_docs": self.num_docs,
            "num_chunks": self.num_chunks,
            "num_tokens": self.num_tokens,
            "prefix_tokens": self.prefix_ids.numel(),
            "shards": self.shards,
        }
        _atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=1))
        logger.info("saved memory of %d documents (%d tokens) to %s", self.num_docs, self.num_tokens, directory)
        return directory

    def _save_shard(self, directory: Path, first: int, end: int) -> dict:
        chunk_start, chunk_end = int(self.doc_chunk_offsets[first]), int(self.doc_chunk_offsets[end])
        token_start, token_end = int(self.doc_token_offsets[first]), int(self.doc_token_offsets[end])
        tensors = {
            "doc_num_chunks": self.doc_chunk_offsets[first : end + 1].diff(),
            "doc_num_tokens": self.doc_token_offsets[first : end + 1].diff(),
            "doc_tokens": self.doc_tokens[token_start:token_end],
        }
        for slot, layer in enumerate(self.router_layers):
            tensors[f"keys.{layer}"] = self.keys[slot][chunk_start:chunk_end]
            tensors[f"values.{layer}"] = self.values[slot][chunk_start:chunk_end]
            tensors[f"routing_keys.{layer}"] = self.routing_keys[slot][chunk_start:chunk_end]
        name = f"docs-{first:012d}-{end:012d}.safetensors"
        _atomic_save(tensors, directory / name)
        return {
            "file": name,
            "first_doc": first,
            "num_docs": end - first,
            "num_chunks": chunk_end - chunk_start,
            "num_tokens": token_end - token_start,
            **_file_entry(directory / name),
        }

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        config=None,
        pin_memory: bool = False,
        model: torch.nn.Module | None = None,
        allow_other_model: bool = False,
    ) -> MemoryStore:
        """Read a saved memory, each file checked against the manifest's size and SHA-256.

        With `config`, check that it was encoded for that model's shape; with `model`, that it was
        encoded by those very weights (`model_identity`), unless `allow_other_model`.
        """
        directory = Path(directory)
        manifest = json.loads((directory / MANIFEST).read_text())
        if manifest["format_version"] != FORMAT_VERSION:
            raise ValueError(f"{directory}: memory format {manifest['format_version']}, expected {FORMAT_VERSION}")
        # Memories saved before the position mode was recorded were all encoded document-wise.
        manifest["signature"].setdefault("document_positions", True)
        if model is not None and config is None:
            config = model.config
        if config is not None:
            check_signature(manifest["signature"], config, str(directory))
        recorded = manifest.get("model_identity")
        if model is not None and recorded is not None and not allow_other_model and model_identity(model) != recorded:
            raise ValueError(
                f"{directory}: the memory was encoded by other weights than this model's (model "
                "identity differs); re-encode it with this model, or pass allow_other_model=True "
                "to use it anyway"
            )
        if "prefix" not in manifest:
            logger.warning("%s: memory saved without checksums; its files are not verified", directory)
        prefix = _read_verified(directory / PREFIX_FILE, manifest.get("prefix", {}), "the prefix file")
        num_layers = manifest["signature"]["num_hidden_layers"]
        store = cls(
            signature=manifest["signature"],
            prefix_ids=prefix["prefix_ids"],
            prefix_keys=[prefix[f"keys.{layer}"] for layer in range(num_layers)],
            prefix_values=[prefix[f"values.{layer}"] for layer in range(num_layers)],
            model_identity=recorded,
        )
        parts = []
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            part = _read_verified(path, shard, "a document shard")
            found = {
                "num_docs": part["doc_num_chunks"].numel(),
                "num_chunks": int(part["doc_num_chunks"].sum()),
                "num_tokens": part["doc_tokens"].numel(),
            }
            wrong = {key: value for key, value in found.items() if value != shard[key]}
            if wrong:
                raise ValueError(
                    f"{path}: the shard holds {wrong}, the manifest says "
                    f"{ {key: shard[key] for key in wrong} }; re-encode the memory"
                )
            parts.append(part)
        if parts:
            layers = store.router_layers
            # One concatenation for all shards: extending shard by shard would copy O(shards^2).
            store.extend(
                EncodedDocuments(
                    doc_num_chunks=torch.cat([p["doc_num_chunks"] for p in parts]),
                    doc_tokens=[t for p in parts for t in torch.split(p["doc_tokens"], p["doc_num_tokens"].tolist())],
                    keys=[torch.cat([p[f"keys.{layer}"] for p in parts]) for layer in layers],
                    values=[torch.cat([p[f"values.{layer}"] for p in parts]) for layer in layers],
                    routing_keys=[torch.cat([p[f"routing_keys.{layer}"] for p in parts]) for layer in layers],
                )
            )
        totals = {"num_docs": store.num_docs, "num_chunks": store.num_chunks, "num_tokens": store.num_tokens}
        wrong = {key: value for key, value in totals.items() if value != manifest[key]}
        if wrong:
            raise ValueError(
                f"{directory / MANIFEST}: the shards hold {wrong}, the manifest says "
                f"{ {key: manifest[key] for key in wrong} }; re-encode the memory"
            )
        store.shards = list(manifest["shards"])
        logger.info("loaded memory of %d documents (%d tokens) from %s", store.num_docs, store.num_tokens, directory)
        return store.pin_memory() if pin_memory else store
