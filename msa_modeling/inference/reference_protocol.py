"""The prompt protocol of the released MSA-4B engine (`reference`), as plain strings.

The released engine lays a question out as follows (docs/RELEASED_MSA4B.md):

- the shared prefix is the 3-token user-turn opening `<|im_start|>user\\n`, and the question's
  first position is the literal 3 + k (k = `doc_top_k`), i.e. prefix length + k;
- document i (0-based) is stored as `<|im_start|>[i]. text<|im_end|>`;
- the question sits inside fixed instructions (`QUESTION_FORMAT`), then the user turn closes and
  a bare `<|im_start|>` opens the reply (`USER_TO_ASSISTANT`: no `assistant` role line);
- after the model writes `<End-of-Retrieve>`, the engine injects
  `<|im_start|>The user's question is: ...\\n<|object_ref_end|>`; the model then writes
  `The answer to the question is: ...` (`ANSWER_FORMAT`);
- after a round of IDs, the engine injects each retrieved document once, in ascending ID order, as
  `[i]. text\\n` (`injected_document_text`), then `<|object_ref_end|>`;
- a round after the first is not appended to the first one's segment: the engine re-prefills the
  whole transcript so far, tokenised anew from its text (the first round's prompt, each round's
  IDs with their delimiter, each injected block), and routes only on the instructions with the
  question and on the last injected block (`transcript_routing_mask`).

Where the strings come from. The document rendering, the 0-based IDs, the prefix and the question
position (3 + k) were checked against the engine by running it on converted checkpoints. The
question instructions, the turn switch, the injected question and documents, the answer lead-in
and the rule of later rounds follow public copies of the engine's service and generation code and
third-party notes on it (each constant says which); they were not compared token for token
against the engine itself (docs/RELEASED_MSA4B.md, "What is verified and what is not").

The strings live here, in one place, so that the data package (training samples), the
interleave loop and evaluation render them identically. `msa_modeling` imports nothing from the
pipeline; the pipeline builds its `reference` template from these constants.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

PROTOCOL_NAME = "reference"
PREFIX = "<|im_start|>user\n"
PREFIX_TOKENS = 3  # the engine's literal: the question starts at 3 + doc_top_k
DOC_START = "<|im_start|>"
DOC_ID_FORMAT = DOC_START + "[{i}]. "
DOC_SUFFIX = "<|im_end|>"
FIRST_MEMORY_ID = 0  # the engine numbers documents from 0
# The end of the instructions' request, the last text of a later round's transcript that routes.
ROUTED_QUESTION_END = "Please return all documents related to the question"
# The instructions around the question. Source: a public copy of the engine's service code (its
# question template) and two third-party reimplementations quoting the same string; not compared
# token for token against the engine itself.
QUESTION_FORMAT = (
    "\nPlease answer the question based on the above historical document information\n\n"
    "{query}\n" + ROUTED_QUESTION_END + "\n"
)
# The turn switch: the tail of the engine's instruct template after the question (`<|im_end|>\n`),
# then its reply head, a bare `<|im_start|>`. Source: a public copy of the engine's template module
# and service code; not compared token for token against the engine itself.
USER_TO_ASSISTANT = "<|im_end|>\n<|im_start|>"
TARGET_ID_FORMAT = "[{i}]"
DELIMITER = "<|object_ref_end|>"
END_OF_RETRIEVAL = "<End-of-Retrieve>"
# Injected after `<End-of-Retrieve>`, before the answer, with the bare question. Source: a public
# copy of the engine's generation code; third-party notes on that code give the same string
# without the newline. Not compared token for token against the engine itself.
AFTER_RETRIEVAL_FORMAT = "<|im_start|>The user's question is: {query}\n<|object_ref_end|>"
# What the model writes before its answer (a labelled target in training samples; evaluation reads
# the answer after it). Source: the MSA paper's Figure 3 and the engine's benchmark parser as
# quoted by third-party code; not compared token for token against the engine itself.
ANSWER_FORMAT = "The answer to the question is: {answer}"
ASSISTANT_END = "<|im_end|>"
# After a round of IDs the engine injects, for each retrieved ID in ascending order and once, the
# document as `[i]. text` and a newline, then the delimiter. Source: a public copy of the engine's
# generation code; not compared token for token against the engine itself.
INJECTED_DOCUMENT_END = "\n"
# In a later round's transcript, the last injected block opens at the `[` after the last place
# where a round's last ID meets its delimiter (`]<|object_ref_end|>[`), and ends before the next
# delimiter. Source: a public copy of the engine's service code (how it marks routing tokens of a
# re-prefilled transcript); not compared token for token against the engine itself.
LAST_INJECTION_OPENING = "]" + DELIMITER + "["


class ProtocolMismatchWarning(UserWarning):
    """A model converted from the released layout is used with a prompt protocol other than `reference`."""


def is_released_layout(config: Any) -> bool:
    """Whether `config` was converted from the released MSA-4B layout (it keeps that `msa_config`)."""
    return bool(getattr(config, "reference_msa_config", None))


def warn_on_protocol_mismatch(config: Any, protocol: str) -> None:
    """Warn (`ProtocolMismatchWarning`) when a released-layout model meets another protocol:
    it was trained on the engine's prompts and positions, and answers others unreliably."""
    if is_released_layout(config) and protocol != PROTOCOL_NAME:
        warnings.warn(
            f"this model was converted from the released MSA-4B layout and was trained on the engine's "
            f"prompt protocol, but it is used with {protocol!r}; use the {PROTOCOL_NAME!r} protocol "
            f"(template: {{protocol: {PROTOCOL_NAME}}}, or --template {PROTOCOL_NAME})",
            ProtocolMismatchWarning,
            stacklevel=2,
        )


def check_prefix_length(prefix_tokens: int) -> None:
    """The engine starts the question at the literal 3 + k: a prefix of another length tokenises
    differently from the engine's and moves every query position."""
    if prefix_tokens != PREFIX_TOKENS:
        raise ValueError(
            f"the reference protocol's prefix {PREFIX!r} must be {PREFIX_TOKENS} tokens (the engine starts the "
            f"question at {PREFIX_TOKENS} + k); this tokenizer makes it {prefix_tokens}: use the model's own tokenizer"
        )


def injected_document_text(stored: str) -> str:
    """A document as the engine injects it after a round, `[i]. text\\n`, from the text of its
    stored rendering `<|im_start|>[i]. text<|im_end|>` (the same ID and text)."""
    if not (stored.startswith(DOC_START) and stored.endswith(DOC_SUFFIX)):
        raise ValueError(
            f"a stored document must read {DOC_ID_FORMAT!r} + text + {DOC_SUFFIX!r} in the {PROTOCOL_NAME!r} "
            f"protocol, got {stored[:60]!r}...: encode the memory with the {PROTOCOL_NAME!r} template"
        )
    return stored[len(DOC_START) : len(stored) - len(DOC_SUFFIX)] + INJECTED_DOCUMENT_END


def transcript_routing_mask(transcript: str, encode: Callable[[str], Sequence[int]]) -> list[bool]:
    """Which tokens of a round's transcript (`encode(transcript)`) route, as the engine marks them.

    Two spans route: the transcript from its start through `ROUTED_QUESTION_END` (the instructions
    and the question, without the newline after it), and the last injected block from its first
    `[` up to, not including, its closing delimiter. The engine counts a span's tokens by
    tokenising the text before it and the span apart; so does this.
    """
    routes = [False] * len(encode(transcript))

    def mark(start: int, end: int) -> None:
        first = len(encode(transcript[:start])) if start else 0
        span = slice(first, first + len(encode(transcript[start:end])))
        routes[span] = [True] * len(routes[span])

    opening = transcript.rfind(LAST_INJECTION_OPENING)
    if opening != -1:
        start = opening + len(LAST_INJECTION_OPENING) - 1
        end = transcript.find(DELIMITER, start)
        if end != -1:
            mark(start, end)
    anchor = transcript.find(ROUTED_QUESTION_END)
    if anchor != -1:
        mark(0, anchor + len(ROUTED_QUESTION_END))
    return routes
