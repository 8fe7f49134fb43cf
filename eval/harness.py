"""What every eval shares: a checkpoint with its tokenizer and template, memories rendered
the way training rendered them (`[i]. text` + suffix), encoded, and questions asked through
the memory-interleave loop."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import msa_modeling  # noqa: F401  (registers model_type "msa" with the Auto classes)
from data.records import Document
from data.templates import ChatFormat, TemplateConfig, TemplateTokens
from data.tokenization import TextTokenizer, load_tokenizer
from msa_modeling.inference import (
    InterleaveFormat,
    InterleaveResult,
    MemoryEncoder,
    MemoryInterleave,
    MemoryStore,
    MSAGenerator,
    RoutingIndex,
    TranscriptRounds,
    reference_protocol,
)
from msa_modeling.inference.reference_protocol import warn_on_protocol_mismatch

logger = logging.getLogger(__name__)


@dataclass
class LoopSettings:
    """Limits of the interleave loop and of memory encoding."""

    max_rounds: int = 3
    max_round_tokens: int = 64
    max_answer_tokens: int = 64
    max_batch_tokens: int = 32768
    show_progress: bool = True
    # Decode a round's IDs among the routed documents only (`RoutedIdGrammar`); off: free decoding.
    routed_ids_only: bool = False
    # Keep encoded memories on the model's GPU, not the host: no copies to the host while encoding
    # nor back for routing and attention, if the whole memory fits beside the model (about 25 GB
    # per 1M tokens for the 320M experiment model with 4 router layers).
    memory_on_model_device: bool = False


class EvalModel:
    """An MSA model, its tokenizer and template, ready to encode memories and answer questions.

    Args:
        model: an `MSAForCausalLM` in eval mode on its device.
        tokenizer: the tokenizer the model was trained with (template tokens present).
        template: the sample template of training (default: the reference format).
        settings: loop and encoding limits.
        index_devices: devices for the routing keys (default: the model's device).
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        template: TemplateConfig | None = None,
        settings: LoopSettings | None = None,
        index_devices: Sequence[str] | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.template = template or TemplateConfig()
        self.settings = settings or LoopSettings()
        self.device = next(model.parameters()).device
        self.index_devices = list(index_devices) if index_devices else [str(self.device)]
        warn_on_protocol_mismatch(model.config, self.template.protocol)
        if self.template.protocol == reference_protocol.PROTOCOL_NAME:
            reference_protocol.check_prefix_length(len(self.prefix_ids()))
        missing = [s for s in self.template.special_strings() if s not in tokenizer.special_token_ids]
        if missing:
            raise ValueError(f"the tokenizer lacks the template's special tokens {missing}")
        self.protocol = InterleaveFormat(
            delimiter_id=tokenizer.special_token_ids[self.template.delimiter],
            end_of_retrieval_id=tokenizer.special_token_ids[self.template.end_of_retrieval],
            stop_token_ids=self._stop_token_ids(),
            memory_id_pattern=self.template.memory_id_pattern(),
            parse_memory_id=self.template.parse_memory_id,
            max_rounds=self.settings.max_rounds,
            max_round_tokens=self.settings.max_round_tokens,
            max_answer_tokens=self.settings.max_answer_tokens,
            encode_memory_id=self.memory_id_tokens,
            routed_ids_only=self.settings.routed_ids_only,
        )

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        template: TemplateConfig | None = None,
        settings: LoopSettings | None = None,
        index_devices: Sequence[str] | None = None,
    ) -> EvalModel:
        """A trainer stage export (HF model dir + tokenizer files) or any MSA checkpoint dir."""
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=dtype or torch.float32)
        tokenizer = load_tokenizer(checkpoint)
        template = template or TemplateConfig()
        if template.chat_from_tokenizer:
            # As the data build resolves it: the chat markers of the tokenizer's own chat template.
            hf = getattr(tokenizer, "hf", None)
            if hf is None or not getattr(hf, "chat_template", None):
                raise ValueError(
                    f"{checkpoint}: the template asks for chat_from_tokenizer, the tokenizer has no chat template"
                )
            template = dataclasses.replace(template, chat=ChatFormat.from_hf_tokenizer(hf), chat_from_tokenizer=False)
        tokenizer.ensure_special_tokens(template.special_strings(), report=True)
        return cls(model.to(device).eval(), tokenizer, template, settings, index_devices)

    def _stop_token_ids(self) -> list[int]:
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        if self.template.chat is not None:
            end = self.tokenizer.encode(self.template.chat.assistant_end)
            if len(end) == 1:
                stops += end
        return stops

    def render_documents(self, documents: Sequence[Document], first_memory_id: int = 1) -> list[list[int]]:
        """Token ids of documents as memory IDs first_memory_id.. render them in training."""
        last = first_memory_id + len(documents) - 1
        if self.template.protocol == reference_protocol.PROTOCOL_NAME:
            # The engine tokenises each rendered document whole: "[1]. Berlin" may merge across
            # the ID prefix and the text, which encoding the pieces apart would not.
            texts = [
                self.template.document_text(memory_id, doc.full_text())
                for memory_id, doc in zip(range(first_memory_id, last + 1), documents)
            ]
            return self.tokenizer.encode_batch(texts)
        pieces = TemplateTokens.build(self.template, self.tokenizer, max_memory_id=last)
        bodies = self.tokenizer.encode_batch([doc.full_text() for doc in documents])
        return [
            pieces.doc_id_prefix[memory_id] + body + pieces.doc_suffix
            for memory_id, body in zip(range(first_memory_id, last + 1), bodies)
        ]

    def prefix_ids(self) -> list[int]:
        return self.tokenizer.encode(self.template.prefix_text()) if self.template.prefix_text() else []

    def encoder(self) -> MemoryEncoder:
        return MemoryEncoder(
            self.model,
            max_batch_tokens=self.settings.max_batch_tokens,
            show_progress=self.settings.show_progress,
            storage_device=self.device if self.settings.memory_on_model_device else None,
        )

    def encode_memory(self, documents: Sequence[Document], pin: bool = True) -> MemoryStore:
        """A new memory holding `documents` as memory IDs 1..n; `pin` page-locks a host memory on a GPU
        machine, which pays off over many questions (asynchronous copies of the selected documents)
        and costs a copy of its K̄/V̄ (15 GiB at 1M tokens for the 320M model: 9 s on one H100 host,
        22-33 s on another)."""
        encoder = self.encoder()
        store = encoder.new_store(self.prefix_ids())
        encoder.add_documents(store, self.render_documents(documents))
        return store.pin_memory() if pin and self.device.type == "cuda" else store

    def memory_id_tokens(self, memory_id: int) -> list[int]:
        """One memory ID as a retrieval round writes it (`[12]` in the reference format)."""
        return self.tokenizer.encode(self.template.target_id_format.format(i=self.template.memory_id_text(memory_id)))

    def interleave(self, store: MemoryStore, trace_k: int = 0) -> MemoryInterleave:
        index = RoutingIndex.from_store(store, self.index_devices)
        generator = MSAGenerator(self.model, store, index, trace_k=trace_k)
        return MemoryInterleave(generator, self.tokenizer.decode, self.protocol)

    def query_ids(self, question: str) -> list[int]:
        return self.tokenizer.encode(self.template.query_text(question))

    def after_retrieval_ids(self, question: str) -> list[int]:
        text = self.template.after_retrieval_text(question)
        return self.tokenizer.encode(text) if text else []

    def transcript_rounds(self, question: str) -> TranscriptRounds | None:
        """How later rounds re-prefill the transcript in the `reference` protocol; None: rounds grow the segment."""
        if self.template.protocol != reference_protocol.PROTOCOL_NAME:
            return None
        return TranscriptRounds(query_text=self.template.query_text(question), encode=self.tokenizer.encode)

    def ask(self, loop: MemoryInterleave, question: str) -> InterleaveResult:
        """Answer `question`; the result's answer is read after the template's answer lead-in."""
        result = loop.answer(
            self.query_ids(question), self.after_retrieval_ids(question), self.transcript_rounds(question)
        )
        return dataclasses.replace(result, answer=self.template.answer_from_text(result.answer))


def write_json(path: Path, payload: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path
