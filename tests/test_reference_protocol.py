"""The `reference` prompt protocol: the released MSA-4B engine's prompts, token for token."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
from batches import tiny_msa
from memories import ScriptedGenerator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data.records import Document
from data.templates import TemplateConfig, TemplateTokens, reference_template
from data.tokenization import HuggingFaceTokenizer
from eval.harness import EvalModel, LoopSettings
from msa_modeling.inference import MemoryInterleave
from msa_modeling.inference.reference_protocol import (
    ProtocolMismatchWarning,
    check_prefix_length,
    injected_document_text,
    transcript_routing_mask,
    warn_on_protocol_mismatch,
)

DOCUMENTS = ["Paris is in France.", "Berlin is in Germany.", "Rome is in Italy."]
QUESTION = "Where is Berlin?"
# The engine's strings for this memory and question, written out by hand: documents numbered
# from 0 inside their own <|im_start|> ... <|im_end|>, the 3-token user-turn prefix, the question
# inside the engine's instructions, the user turn closed and a bare <|im_start|> opening the reply,
# the restated question injected after <End-of-Retrieve>, and the answer lead-in.
EXPECTED_PREFIX = "<|im_start|>user\n"
EXPECTED_DOCUMENTS = [
    "<|im_start|>[0]. Paris is in France.<|im_end|>",
    "<|im_start|>[1]. Berlin is in Germany.<|im_end|>",
    "<|im_start|>[2]. Rome is in Italy.<|im_end|>",
]
# The instructions and the question up to the end of the request: what routes in later rounds.
EXPECTED_ROUTED_INSTRUCTIONS = (
    "\nPlease answer the question based on the above historical document information\n\n"
    "Where is Berlin?\nPlease return all documents related to the question"
)
EXPECTED_INSTRUCTIONS = EXPECTED_ROUTED_INSTRUCTIONS + "\n"
EXPECTED_QUESTION = EXPECTED_INSTRUCTIONS + "<|im_end|>\n<|im_start|>"
EXPECTED_ROUND = "[1]<|object_ref_end|>"
EXPECTED_AFTER_RETRIEVAL = "<|im_start|>The user's question is: Where is Berlin?\n<|object_ref_end|>"
EXPECTED_ANSWER = "The answer to the question is: Germany<|im_end|>"
# Later rounds as the engine runs them: the model writes [2] (0-based: the third document), then
# [2][0][2]. After each round the engine injects the round's documents as "[i]. text\n", each once
# and in ascending order, then the delimiter; each later round re-prefills the whole transcript
# so far, and routes on the instructions with the question and on the last injected block only.
# Each piece: (text, whether its tokens route).
EXPECTED_ROUND_2 = [
    (EXPECTED_ROUTED_INSTRUCTIONS, True),
    ("\n<|im_end|>\n<|im_start|>[2]<|object_ref_end|>", False),
    ("[2]. Rome is in Italy.\n", True),
    ("<|object_ref_end|>", False),
]
EXPECTED_ROUND_3 = [
    (EXPECTED_ROUTED_INSTRUCTIONS, True),
    ("\n<|im_end|>\n<|im_start|>[2]<|object_ref_end|>[2]. Rome is in Italy.\n<|object_ref_end|>", False),
    ("[2][0][2]<|object_ref_end|>", False),
    ("[0]. Paris is in France.\n[2]. Rome is in Italy.\n", True),
    ("<|object_ref_end|>", False),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> HuggingFaceTokenizer:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*DOCUMENTS, QUESTION, "user assistant The user's question is:"] * 20, trainer=trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(str(folder))
    wrapped = HuggingFaceTokenizer(folder)
    wrapped.ensure_special_tokens(reference_template().special_strings(), report=False)
    return wrapped


def test_the_reference_protocol_renders_the_engines_strings(tokenizer):
    template = reference_template()
    pieces = TemplateTokens.build(template, tokenizer, max_memory_id=len(DOCUMENTS))
    rendered = [template.document_text(i + 1, body) for i, body in enumerate(DOCUMENTS)]
    assert tokenizer.encode_batch(rendered) == tokenizer.encode_batch(EXPECTED_DOCUMENTS)
    assert pieces.prefix == tokenizer.encode(EXPECTED_PREFIX)
    assert len(pieces.prefix) == 3  # so that the question starts at 3 + k, as the engine places it
    check_prefix_length(len(pieces.prefix))
    assert tokenizer.encode(template.query_text(QUESTION)) == tokenizer.encode(EXPECTED_QUESTION)
    # Our memory IDs count from 1; the engine writes document 2 of the memory as [1].
    assert tokenizer.encode(template.target_ids_text([2])) == tokenizer.encode(EXPECTED_ROUND)
    assert template.parse_memory_id("1") == 2
    assert tokenizer.encode(template.after_retrieval_text(QUESTION)) == tokenizer.encode(EXPECTED_AFTER_RETRIEVAL)


def test_the_injected_question_is_not_labelled_in_training_samples():
    segments = reference_template().final_answer_segments(QUESTION, "Germany")
    assert segments == [("<End-of-Retrieve>", True), (EXPECTED_AFTER_RETRIEVAL, False), (EXPECTED_ANSWER, True)]
    # Our own templates keep their single labelled piece.
    assert TemplateConfig().final_answer_segments(QUESTION, "Germany") == [("<End-of-Retrieve>Germany", True)]


def test_the_answer_is_read_after_the_lead_in():
    template = reference_template()
    assert template.answer_from_text(" The answer to the question is: Germany ") == "Germany"
    # Text without the lead-in is the answer as it stands; our own templates have no lead-in.
    assert template.answer_from_text("Germany") == "Germany"
    assert TemplateConfig().answer_from_text("The answer to the question is: Germany").endswith("is: Germany")


def test_the_preset_selects_the_protocol_and_takes_overrides():
    assert TemplateConfig.from_dict({"protocol": "reference"}) == reference_template()
    assert TemplateConfig.from_dict({"protocol": "reference", "doc_suffix": "\n"}).first_memory_id == 0
    with pytest.raises(ValueError, match="protocol"):
        TemplateConfig.from_dict({"protocol": "released"})


def test_a_released_layout_model_warns_with_another_protocol():
    released = SimpleNamespace(reference_msa_config={"aux_loss_method": "INFONCE_DECOUPLE"})
    with pytest.warns(ProtocolMismatchWarning):
        warn_on_protocol_mismatch(released, TemplateConfig().protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_on_protocol_mismatch(released, reference_template().protocol)
        warn_on_protocol_mismatch(SimpleNamespace(reference_msa_config=None), TemplateConfig().protocol)


def test_a_prefix_of_another_length_is_refused():
    with pytest.raises(ValueError, match="3 \\+ k"):
        check_prefix_length(4)


def transcript(pieces: list[tuple[str, bool]]) -> str:
    return "".join(text for text, _ in pieces)


def routed_tokens(tokenizer, pieces: list[tuple[str, bool]]) -> list[bool]:
    return [routes for text, routes in pieces for _ in tokenizer.encode(text)]


def reference_loop(tokenizer, rounds: list[list[int]], max_rounds: int = 3):
    """An evaluator of the reference protocol over DOCUMENTS, and its loop on a scripted generator."""
    model = tiny_msa(0, backbone_overrides={"vocab_size": tokenizer.vocab_size}, top_k_docs=2, query_position_offset=2)
    evaluator = EvalModel(
        model, tokenizer, reference_template(), LoopSettings(show_progress=False, max_rounds=max_rounds)
    )
    store = evaluator.encode_memory([Document(f"d{i}", text) for i, text in enumerate(DOCUMENTS)])
    scripted = ScriptedGenerator(store, rounds)
    return evaluator, scripted, MemoryInterleave(scripted, tokenizer.decode, evaluator.protocol)


def marker_ids(tokenizer) -> tuple[int, int, int]:
    return tuple(tokenizer.special_token_ids[s] for s in ("<|object_ref_end|>", "<End-of-Retrieve>", "<|im_end|>"))


def test_later_rounds_re_prefill_the_transcript_as_the_engine_does(tokenizer):
    """The model writes [2] (0-based, as the engine numbers documents): the loop must inject the
    third document, "[2]. Rome ...", as text, and prefill round 2 with the whole transcript."""
    encode = tokenizer.encode
    delimiter, end, im_end = marker_ids(tokenizer)
    answer = encode("The answer to the question is: Italy") + [im_end]
    rounds = [encode("[2]") + [delimiter], encode("[2][0][2]") + [delimiter], [end], answer]
    evaluator, scripted, loop = reference_loop(tokenizer, rounds)
    result = evaluator.ask(loop, QUESTION)

    assert [r.memory_ids for r in result.rounds] == [[3], [3, 1]]  # 1-based inside the pipeline, as written
    assert result.answer == "Italy"  # read after the lead-in
    # Round 1: the question prompt; the instructions and the question route, the turn switch does not.
    assert scripted.contexts[0] == encode(EXPECTED_QUESTION)
    first = transcript_routing_mask(EXPECTED_QUESTION, encode)
    assert scripted.routing_masks[0] == first and any(first) and not first[-1]
    # Round 2 re-prefills the transcript; the fixture's pieces tokenise apart into the same ids.
    assert scripted.contexts[1] == encode(transcript(EXPECTED_ROUND_2))
    assert len(scripted.routing_masks[1]) == len(scripted.contexts[1])
    assert scripted.routing_masks[1] == routed_tokens(tokenizer, EXPECTED_ROUND_2)
    # Round 3: round 2's IDs and its block (documents [0] and [2], ascending, once) appended; only that block routes.
    assert scripted.contexts[2] == encode(transcript(EXPECTED_ROUND_3))
    assert scripted.routing_masks[2] == routed_tokens(tokenizer, EXPECTED_ROUND_3)
    # The answer follows on round 3's cache, after the restated question.
    assert scripted.contexts[3] == [end] + encode(EXPECTED_AFTER_RETRIEVAL)


def test_the_forced_end_follows_the_last_transcript_and_does_not_route(tokenizer):
    encode = tokenizer.encode
    delimiter, end, im_end = marker_ids(tokenizer)
    rounds = [encode("[2]") + [delimiter], encode("[2][0][2]") + [delimiter], encode("Italy") + [im_end]]
    evaluator, scripted, loop = reference_loop(tokenizer, rounds, max_rounds=2)
    evaluator.ask(loop, QUESTION)

    forced = [end] + encode(EXPECTED_AFTER_RETRIEVAL)
    assert scripted.contexts[2] == encode(transcript(EXPECTED_ROUND_3)) + forced
    assert scripted.routing_masks[2] == routed_tokens(tokenizer, EXPECTED_ROUND_3) + [False] * len(forced)


def test_a_round_without_documents_keeps_the_last_block_that_had_some_routing(tokenizer):
    """The engine finds the last injected block by its opening `]<|object_ref_end|>[`: after a
    round whose IDs name no document (only the delimiter is injected), the earlier block routes."""
    pieces = [
        *EXPECTED_ROUND_2,
        ("[7]<|object_ref_end|><|object_ref_end|>", False),
    ]
    assert transcript_routing_mask(transcript(pieces), tokenizer.encode) == routed_tokens(tokenizer, pieces)


def test_a_document_stored_in_another_rendering_is_not_injected():
    assert injected_document_text("<|im_start|>[2]. Rome is in Italy.<|im_end|>") == "[2]. Rome is in Italy.\n"
    with pytest.raises(ValueError, match="reference"):
        injected_document_text("[3]. Rome is in Italy.\n")
