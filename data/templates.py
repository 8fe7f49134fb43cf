"""Sample templates (reference format by default) and their tokenised pieces."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from msa_modeling.inference import reference_protocol

from .tokenization import TextTokenizer

TEMPLATE_PROTOCOLS = ("msa-train", reference_protocol.PROTOCOL_NAME)


@dataclass
class ChatFormat:
    """The text a chat template puts around the system prompt and the user and assistant turns.

    The memory sits inside the user turn: the shared prefix ends where the user's content
    starts, the question closes the user turn and opens the assistant's, and everything the
    assistant generates ends with ``assistant_end``. Defaults are ChatML (Qwen).
    """

    system_start: str = "<|im_start|>system\n"
    system_to_user: str = "<|im_end|>\n<|im_start|>user\n"
    user_start: str = "<|im_start|>user\n"
    user_to_assistant: str = "<|im_end|>\n<|im_start|>assistant\n"
    assistant_end: str = "<|im_end|>"

    @classmethod
    def from_hf_tokenizer(cls, tokenizer: Any) -> ChatFormat:
        """Cut the markers out of a Hugging Face tokenizer's own chat template, rendered around
        sentinel messages (so a template that adds a default system prompt keeps doing so)."""
        system, user, assistant = "\ue000system\ue000", "\ue000user\ue000", "\ue000assistant\ue000"

        def render(messages: list[dict[str, str]]) -> str:
            return tokenizer.apply_chat_template(messages, tokenize=False)

        with_system = render(
            [
                {"role": "system", "content": system},
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]
        )
        without_system = render([{"role": "user", "content": user}, {"role": "assistant", "content": assistant}])
        if any(with_system.count(s) != 1 for s in (system, user, assistant)) or without_system.count(user) != 1:
            raise ValueError("the chat template does not render system, user and assistant messages verbatim")
        system_start, rest = with_system.split(system)
        system_to_user, rest = rest.split(user)
        user_to_assistant, assistant_end = rest.split(assistant)
        return cls(
            system_start=system_start,
            system_to_user=system_to_user,
            user_start=without_system.split(user)[0],
            user_to_assistant=user_to_assistant,
            assistant_end=assistant_end.rstrip(),
        )

    def special_strings(self) -> list[str]:
        """Marker strings that must be single tokens (ChatML's im_start/im_end)."""
        return [
            token for token in ("<|im_start|>", "<|im_end|>") if any(token in text for text in asdict(self).values())
        ]


@dataclass
class TemplateConfig:
    """Prompt wording and markers. Defaults follow the reference format (spec section 7):
    documents rendered ``[i]. text``, targets ``[4][9]`` + ``<|object_ref_end|>``, and
    ``<End-of-Retrieve>`` when no more documents are needed. ``chat_from_tokenizer`` derives
    ``chat`` from the tokenizer's own chat template when the build loads it.

    ``id_digits`` writes memory IDs with ten strings of their own instead of 0-9 (they become
    special tokens, e.g. ``<id0>``..``<id9>``): when documents hold numbers, an ID made of the
    same digit tokens is hard for a small model to tell from the text it must copy
    (docs/EXPERIMENTS.md: IDs in tokens of their own).

    ``first_memory_id`` is the number written for the first document (1 here; the released
    engine's ``reference`` protocol writes 0). ``after_retrieval_format`` is text the inference
    loop injects after ``<End-of-Retrieve>`` (unlabelled in training samples), e.g. the released
    engine's ``The user's question is: {query}``. ``{"protocol": "reference"}`` in a recipe's or
    ``--template`` file's template selects the released engine's protocol (``reference_template``); with
    it, the inference loop also runs later retrieval rounds as that engine does (``TranscriptRounds``)."""

    system_prompt: str = ""
    doc_id_format: str = "[{i}]. "
    doc_suffix: str = "\n"
    query_format: str = "Question: {query}\n"
    target_id_format: str = "[{i}]"
    delimiter: str = "<|object_ref_end|>"
    end_of_retrieval: str = "<End-of-Retrieve>"
    answer_format: str = "{answer}"
    append_eos: bool = True
    chat: ChatFormat | None = None
    chat_from_tokenizer: bool = False
    id_digits: list[str] | None = None
    first_memory_id: int = 1
    after_retrieval_format: str = ""
    protocol: str = "msa-train"  # "reference" for the released engine's protocol

    def __post_init__(self) -> None:
        if self.protocol not in TEMPLATE_PROTOCOLS:
            raise ValueError(f"template.protocol must be one of {TEMPLATE_PROTOCOLS}, got {self.protocol!r}")
        if self.first_memory_id not in (0, 1):
            raise ValueError(f"template.first_memory_id must be 0 or 1, got {self.first_memory_id!r}")
        if self.id_digits is not None:
            self.id_digits = list(self.id_digits)
            if len(self.id_digits) != 10 or len(set(self.id_digits)) != 10 or not all(self.id_digits):
                raise ValueError(
                    f"template.id_digits must be ten distinct non-empty strings (for 0-9), got {self.id_digits!r}"
                )

    @classmethod
    def from_dict(cls, values: dict) -> TemplateConfig:
        """Inverse of ``dataclasses.asdict`` (nested chat format included)."""
        values = dict(values)
        if values.get("protocol") == reference_protocol.PROTOCOL_NAME:
            # The released engine's strings, under any field the caller sets explicitly.
            values = {**asdict(reference_template()), **values}
        if values.get("chat") is not None:
            values["chat"] = ChatFormat(**values["chat"])
        return cls(**values)

    def special_strings(self) -> list[str]:
        """Strings that must be single tokens."""
        extra = self.chat.special_strings() if self.chat else []
        return [self.delimiter, self.end_of_retrieval, *extra, *(self.id_digits or [])]

    def memory_id_text(self, memory_id: int) -> str:
        """The ID as written in documents and targets: decimal, in ``id_digits`` when set.

        ``memory_id`` counts from 1 everywhere in the pipeline; it is written from ``first_memory_id``."""
        written = memory_id - 1 + self.first_memory_id
        if self.id_digits is None:
            return str(written)
        return "".join(self.id_digits[int(digit)] for digit in str(written))

    def memory_id_pattern(self) -> str:
        """A regex whose first group is a memory ID written with ``target_id_format``."""
        before, after = self.target_id_format.split("{i}")
        digit = self._id_digit_alternation() if self.id_digits else r"\d"
        return re.escape(before) + f"((?:{digit})+)" + re.escape(after)

    def parse_memory_id(self, text: str) -> int:
        """Inverse of ``memory_id_text`` for a group matched by ``memory_id_pattern``."""
        if self.id_digits is None:
            written = int(text)
        else:
            digit_of = {d: str(value) for value, d in enumerate(self.id_digits)}
            written = int("".join(digit_of[piece] for piece in re.findall(self._id_digit_alternation(), text)))
        return written + 1 - self.first_memory_id

    def _id_digit_alternation(self) -> str:
        """``id_digits`` as one regex alternation, longest first so that no digit shadows a longer one."""
        return "|".join(re.escape(d) for d in sorted(self.id_digits, key=len, reverse=True))

    def prefix_text(self) -> str:
        """The shared prefix (doc_ids -2) that precedes the memory."""
        if self.chat is None:
            return self.system_prompt
        if self.system_prompt:
            return self.chat.system_start + self.system_prompt + self.chat.system_to_user
        return self.chat.user_start

    def query_text(self, query: str) -> str:
        """The question, plus the turn switch when a chat format is used."""
        text = self.query_format.format(query=query)
        if self.chat is not None:
            text += self.chat.user_to_assistant
        return text

    def target_ids_text(self, memory_ids: list[int]) -> str:
        """IDs of the documents to retrieve, then the round delimiter."""
        return "".join(self.target_id_format.format(i=self.memory_id_text(i)) for i in memory_ids) + self.delimiter

    def document_text(self, memory_id: int, body: str) -> str:
        """Document ``memory_id`` as the memory holds it: ID prefix, text, suffix."""
        return self.doc_id_format.format(i=self.memory_id_text(memory_id)) + body + self.doc_suffix

    def after_retrieval_text(self, query: str) -> str:
        """What the inference loop injects after ``<End-of-Retrieve>`` (empty for most templates)."""
        return self.after_retrieval_format.format(query=query) if self.after_retrieval_format else ""

    def final_answer_segments(self, query: str, answer: str) -> list[tuple[str, bool]]:
        """(text, labelled) pieces of a sample's last step: the end marker and answer are
        labelled, the injected after-retrieval text is not (the loop writes it, not the model)."""
        if not self.after_retrieval_format:
            return [(self.final_answer_text(answer), True)]
        answer_text = self.answer_format.format(answer=answer) + (self.chat.assistant_end if self.chat else "")
        return [(self.end_of_retrieval, True), (self.after_retrieval_text(query), False), (answer_text, True)]

    def answer_from_text(self, generated: str) -> str:
        """The answer in generated answer text: what follows ``answer_format``'s lead-in (e.g. the
        released engine's ``The answer to the question is: ``) where the text starts with it."""
        lead_in = self.answer_format.split("{answer}")[0].strip()
        text = generated.strip()
        return text[len(lead_in) :].strip() if lead_in and text.startswith(lead_in) else text

    def final_answer_text(self, answer: str) -> str:
        """End of retrieval, the answer, and the end of the assistant turn."""
        text = self.end_of_retrieval + self.answer_format.format(answer=answer)
        if self.chat is not None:
            text += self.chat.assistant_end
        return text


def reference_template() -> TemplateConfig:
    """The released MSA-4B engine's prompt protocol (`msa_modeling.inference.reference_protocol`)."""
    rp = reference_protocol
    return TemplateConfig(
        doc_id_format=rp.DOC_ID_FORMAT,
        doc_suffix=rp.DOC_SUFFIX,
        query_format=rp.QUESTION_FORMAT,
        target_id_format=rp.TARGET_ID_FORMAT,
        delimiter=rp.DELIMITER,
        end_of_retrieval=rp.END_OF_RETRIEVAL,
        chat=ChatFormat(user_start=rp.PREFIX, user_to_assistant=rp.USER_TO_ASSISTANT, assistant_end=rp.ASSISTANT_END),
        first_memory_id=rp.FIRST_MEMORY_ID,
        answer_format=rp.ANSWER_FORMAT,
        after_retrieval_format=rp.AFTER_RETRIEVAL_FORMAT,
        protocol=rp.PROTOCOL_NAME,
    )


@dataclass
class TemplateTokens:
    """The tokenised pieces row assembly needs, so that the loader never needs a tokenizer.

    A memory document i is ``doc_id_prefix[i] + document tokens + doc_suffix``; doc_id_prefix
    is indexed from 1 (entry 0 is unused)."""

    prefix: list[int]
    doc_suffix: list[int]
    doc_id_prefix: list[list[int]] = field(default_factory=list)
    eos: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, template: TemplateConfig, tokenizer: TextTokenizer, max_memory_id: int) -> TemplateTokens:
        """Encode every piece once; id prefixes for IDs 1..max_memory_id."""
        id_texts = [template.doc_id_format.format(i=template.memory_id_text(i)) for i in range(1, max_memory_id + 1)]
        encoded = tokenizer.encode_batch([template.prefix_text(), template.doc_suffix, *id_texts])
        # A chat format ends the assistant turn itself; a second end marker would be noise.
        wants_eos = template.append_eos and template.chat is None and tokenizer.eos_token_id is not None
        eos = [tokenizer.eos_token_id] if wants_eos else []
        return cls(prefix=encoded[0], doc_suffix=encoded[1], doc_id_prefix=[[], *encoded[2:]], eos=eos)
