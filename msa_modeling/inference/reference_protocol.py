"""The prompt protocol of the released MSA-4B engine (`reference`), as plain strings.

The released engine lays a question out as follows (docs/RELEASED_MSA4B.md):

- the shared prefix is the 3-token user-turn opening `<|im_start|>user\\n`, and the question's
  first position is the literal 3 + k (k = `doc_top_k`), i.e. prefix length + k;
- document i (0-based) is stored as `<|im_start|>[i]. text<|im_end|>`;
- the question closes the user turn and opens the assistant's;
- after the model writes `<End-of-Retrieve>`, the engine injects `The user's question is: ...`
  before the answer;
- a round after the first is not appended to the first one's segment: the engine prefills a new
  prompt that ends with a `<regenerate>` marker (`REGENERATE_FORMAT`).

What is verified and what is not. The document rendering, the 0-based IDs, the prefix and the
question position (3 + k) were checked against the engine by running it on converted
checkpoints. The exact wording of the engine's question instructions and of its multi-round
`<regenerate>` prompt is not: `QUESTION_FORMAT` and `REGENERATE_FORMAT` are our reading of the
engine, not verified token for token. Change them here, and only here, once the engine's
strings are known.

The strings live here, in one place, so that the data package (training samples), the
interleave loop and evaluation render them identically. `msa_modeling` imports nothing from the
pipeline; the pipeline builds its `reference` template from these constants.
"""

from __future__ import annotations

import warnings
from typing import Any

PROTOCOL_NAME = "reference"
PREFIX = "<|im_start|>user\n"
PREFIX_TOKENS = 3  # the engine's literal: the question starts at 3 + doc_top_k
DOC_ID_FORMAT = "<|im_start|>[{i}]. "
DOC_SUFFIX = "<|im_end|>"
FIRST_MEMORY_ID = 0  # the engine numbers documents from 0
QUESTION_FORMAT = "{query}"
USER_TO_ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
TARGET_ID_FORMAT = "[{i}]"
DELIMITER = "<|object_ref_end|>"
END_OF_RETRIEVAL = "<End-of-Retrieve>"
AFTER_RETRIEVAL_FORMAT = "The user's question is: {query}"
ASSISTANT_END = "<|im_end|>"
# Every round after the first re-prefills this prompt as its query segment (our reading of the
# engine, not verified token for token): the documents retrieved so far, each as the memory
# stores it (`<|im_start|>[i]. text<|im_end|>`), then the question and the marker. The user turn
# is then closed as after the first round's question (`USER_TO_ASSISTANT`).
REGENERATE_MARKER = "<regenerate>"
REGENERATE_DOCUMENTS = "{documents}"  # where the retrieved documents' stored tokens go
REGENERATE_FORMAT = REGENERATE_DOCUMENTS + "{query}" + REGENERATE_MARKER


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
