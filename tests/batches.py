"""Tiny random backbones and packed MSA batches for the model tests."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, Qwen3ForCausalLM

from msa_modeling import MSAForCausalLM
from msa_modeling.backbones import get_backbone

VOCAB = 97

# What each family's tiny config sets on top of the shared fields, chosen so that a test
# notices a family feature being skipped: biases, Llama 3 RoPE scaling, a query scale that
# is not head_dim**-0.5, soft-caps that bind (larger init, small caps), Gemma 3's two RoPEs
# on alternating local/global layers, and windows longer than any test batch.
FAMILY_OVERRIDES: dict[str, dict] = {
    "qwen3": {},
    "qwen2": dict(tie_word_embeddings=True),
    "llama": dict(
        attention_bias=True,
        mlp_bias=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "mistral": dict(sliding_window=64),
    "gemma2": dict(
        tie_word_embeddings=True,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=1.0,
        final_logit_softcapping=3.0,
        sliding_window=64,
        initializer_range=0.2,
    ),
    "gemma3_text": dict(
        tie_word_embeddings=True,
        query_pre_attn_scalar=16,
        sliding_window=64,
        initializer_range=0.2,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    ),
}
FAMILIES = tuple(FAMILY_OVERRIDES)


def tiny_backbone(family: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A 4-layer GQA causal LM of `family` (a backbone `model_type`) with random weights
    (4 query heads, 2 KV heads)."""
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    fields.update(FAMILY_OVERRIDES[family])
    fields.update(overrides)
    adapter = get_backbone(family)
    torch.manual_seed(seed)
    model = adapter.causal_lm_class(adapter.config_class(**fields)).eval()
    # Random-initialised norms are all ones; perturb them so that a test would notice a
    # norm being skipped or applied to the wrong tensor.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_qwen3(seed: int = 0, **overrides: object) -> Qwen3ForCausalLM:
    return tiny_backbone("qwen3", seed, **overrides)


def tiny_msa(
    seed: int = 0, backbone_overrides: dict | None = None, family: str = "qwen3", **msa_settings: object
) -> MSAForCausalLM:
    settings = dict(top_k_docs=2, chunk_size=4, query_position_offset=2)
    settings.update(msa_settings)
    return MSAForCausalLM.from_backbone(tiny_backbone(family, seed, **(backbone_overrides or {})), **settings).eval()


def random_packed_batch(
    seed: int,
    batch_size: int = 2,
    examples_per_row: int = 2,
    docs_per_example: tuple[int, int] = (2, 5),
    doc_length: tuple[int, int] = (1, 11),
    prefix_length: tuple[int, int] = (0, 3),
    prompt_length: tuple[int, int] = (1, 4),
    answer_length: tuple[int, int] = (1, 4),
    padding: int = 3,
    injected_length: tuple[int, int] = (0, 0),
) -> dict[str, torch.Tensor]:
    """Rows of `[prefix][doc 1..n][prompt][answer]` examples with ragged lengths, right-padded.
    With `injected_length`, each answer is followed by unlabelled text and a second answer, as in a
    QA sample (`[ID]`, the injected document, then the value).

    Document lengths are drawn so that last chunks are often partial; every example has
    at least one positive document unless it has a single one.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw(bounds: tuple[int, int]) -> int:
        return int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))

    rows = []
    for _ in range(batch_size):
        columns = {k: [] for k in ("doc_ids", "example_ids", "labels_mask", "aux_labels")}

        def add(length: int, doc: int, example: int, labelled: bool, positive: bool) -> None:
            columns["doc_ids"] += [doc] * length
            columns["example_ids"] += [example] * length
            columns["labels_mask"] += [labelled] * length
            columns["aux_labels"] += [int(positive)] * length

        for example in range(examples_per_row):
            add(draw(prefix_length), -2, example, False, False)
            num_docs = draw(docs_per_example)
            positives = torch.randperm(num_docs, generator=generator)[: max(1, num_docs // 3)].tolist()
            for doc in range(num_docs):
                add(draw(doc_length), doc + 1, example, False, doc in positives)
            add(draw(prompt_length), 0, example, False, False)
            add(draw(answer_length), 0, example, True, False)
            if injected_length[1] > 0:
                add(draw(injected_length), 0, example, False, False)
                add(draw(answer_length), 0, example, True, False)
        add(padding, -1, -1, False, False)
        rows.append(columns)

    length = max(len(r["doc_ids"]) for r in rows)
    batch = {}
    for key in ("doc_ids", "example_ids", "aux_labels"):
        fill = {"doc_ids": -1, "example_ids": -1, "aux_labels": 0}[key]
        batch[key] = torch.tensor([r[key] + [fill] * (length - len(r[key])) for r in rows])
    labelled = torch.tensor([r["labels_mask"] + [False] * (length - len(r["labels_mask"])) for r in rows])
    batch["input_ids"] = torch.randint(3, VOCAB, (batch_size, length), generator=generator)
    batch["labels"] = torch.where(labelled, batch["input_ids"], torch.full_like(batch["input_ids"], -100))
    return batch


def document_token_mask(batch: dict[str, torch.Tensor], row: int, example: int, doc: int) -> torch.Tensor:
    """[B, L] bool mask of one document's tokens."""
    mask = torch.zeros_like(batch["doc_ids"], dtype=torch.bool)
    mask[row] = (batch["example_ids"][row] == example) & (batch["doc_ids"][row] == doc)
    return mask
