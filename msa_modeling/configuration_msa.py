"""`MSAConfig`: a backbone's Hugging Face config plus the Memory Sparse Attention settings."""

from __future__ import annotations

import difflib
from typing import Any

from transformers import PreTrainedConfig

from .attention import BACKENDS
from .routing import ROUTING_SCORES

ROUTING_TOKEN_MODES = ("prompt", "query")
AUX_LOSS_TYPES = ("decoupled_infonce", "infonce")
ROUTER_INITS = ("random", "qk", "tied")

# Keys that belong to MSA, not to the backbone; everything else in the config is the
# backbone's own and is handed back to it unchanged (see `backbone_config_dict`).
MSA_KEYS = (
    "backbone_model_type",
    "router_layers",
    "top_k_docs",
    "chunk_size",
    "routing_tokens",
    "query_position_offset",
    "document_positions",
    "aux_loss_type",
    "aux_temperature",
    "lm_loss_weight",
    "aux_loss_weight",
    "detach_router_input",
    "router_init",
    "lm_loss_chunk_size",
    "attn_backend",
    "routing_score",
    # Set by `convert_reference` on models read from the released reference layout: its
    # `msa_config` and `temperature`, so that converting back reproduces the values that
    # have no counterpart here (e.g. `recloss_weight`). Not an __init__ argument.
    "reference_msa_config",
)


def _reject_misspelt_msa_keys(backbone_fields: dict[str, Any], backbone_defaults: dict[str, Any]) -> None:
    """A key the backbone does not know that is one typo away from an MSA field is a mistake.

    Unknown keys are otherwise kept as backbone fields (real checkpoints carry extras), so
    `top_k_doc=8` would be silently stored and ignored.
    """
    for key in backbone_fields:
        if key in backbone_defaults or key in MSA_KEYS:
            continue
        close = difflib.get_close_matches(key, MSA_KEYS, n=1, cutoff=0.85)
        if close:
            raise ValueError(f"MSAConfig got unknown setting {key!r}; did you mean {close[0]!r}?")


def _with_backbone_defaults(backbone_model_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields` completed with the backbone config class's defaults (e.g. Qwen3's `rms_norm_eps`)."""
    from .backbones import get_backbone

    config_class = get_backbone(backbone_model_type).config_class
    _reject_misspelt_msa_keys(fields, config_class().to_dict())
    complete = config_class(**fields).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        complete.pop(key, None)
    complete.update({k: v for k, v in fields.items() if k in ("architectures", "auto_map")})
    return complete


class MSAConfig(PreTrainedConfig):
    r"""Configuration of an MSA model.

    Every field of the backbone config (e.g. Qwen3's `hidden_size`, `rope_parameters`,
    `tie_word_embeddings`) is kept at the top level, so a checkpoint's `config.json` reads
    like the backbone's plus the MSA fields below.

    Args:
        backbone_model_type: `model_type` of the backbone family (`"qwen3"`).
        router_layers: indices of the layers that route over memory. Default: the upper
            half, `range(num_hidden_layers // 2, num_hidden_layers)` (paper, spec section 3).
        top_k_docs: documents selected per example and router layer (paper: 16).
        chunk_size: tokens per pooled chunk, P (paper: 64).
        routing_tokens: which query tokens score the memory. `"prompt"` (default): tokens
            with `doc_ids == 0` whose own label is ignored and that precede the example's
            first labelled token, i.e. the question, as in inference's first round (a QA
            sample's injected document, after the ID, does not route). `"query"`: every
            `doc_ids == 0` token, answers included (the reference training code's behaviour).
        query_position_offset: query/answer positions start at `prefix_len + offset`
            (paper: offset = k). Default: `top_k_docs`. Must match between training and
            inference.
        document_positions: document-wise RoPE (each document starts at 0). `False` is the
            ablation with plain positions counted from the start of each example.
        aux_loss_type: `"decoupled_infonce"` (paper eq. 5: each positive competes with the
            negatives only) or `"infonce"` (the denominator holds every document).
        aux_temperature: InfoNCE temperature tau (paper: 0.1, fixed).
        lm_loss_weight / aux_loss_weight: weights of the total loss `w_lm L_LM + w_aux L_aux`.
        detach_router_input: stop the aux loss's gradient at the router projections' input,
            so that only the router learns from it.
        router_init: how `from_backbone` initialises the router projections. `"random"`
            (paper); `"qk"` (copy the layer's q/k projections); `"tied"` (`W_KR` random, and
            each query head's rows of `W_QR` a copy of its KV group's rows of `W_KR`, so the
            initial routing cosines follow token overlap between question and chunk). Only
            the initialisation differs; the two projections train independently.
        lm_loss_chunk_size: tokens per chunk of the LM head + cross-entropy, so that the
            logits of a whole row are never materialised.
        attn_backend: `"auto"` (torch varlen, else flash-attn, else FlexAttention on CUDA;
            masked SDPA on CPU) or one of `"flash_attn"`, `"varlen"`, `"flex"`, `"sdpa"`.
            Saved with the checkpoint; override at load time with
            `from_pretrained(path, attn_backend="sdpa")`.
        routing_score: how a routing query meets a pooled routing key, per head.
            `"cosine"` (paper eq. 2, default): cos(Q_R, K̄R). `"scaled_dot"`: the dot
            product times D^-1/2, without L2 normalisation: what the released MSA-4B engine
            computes at inference (`convert_reference` sets it for that checkpoint). Training,
            the encoded memory and inference routing all follow it.
    """

    model_type = "msa"

    def __init__(
        self,
        backbone_model_type: str = "qwen3",
        router_layers: list[int] | None = None,
        top_k_docs: int = 16,
        chunk_size: int = 64,
        routing_tokens: str = "prompt",
        query_position_offset: int | None = None,
        document_positions: bool = True,
        aux_loss_type: str = "decoupled_infonce",
        aux_temperature: float = 0.1,
        lm_loss_weight: float = 1.0,
        aux_loss_weight: float = 0.1,
        detach_router_input: bool = False,
        router_init: str = "random",
        lm_loss_chunk_size: int = 4096,
        attn_backend: str = "auto",
        routing_score: str = "cosine",
        **backbone_kwargs: Any,
    ) -> None:
        self.backbone_model_type = backbone_model_type
        backbone_kwargs = _with_backbone_defaults(backbone_model_type, backbone_kwargs)
        num_layers = backbone_kwargs["num_hidden_layers"]
        if router_layers is None:
            router_layers = list(range(num_layers // 2, num_layers))
        self.router_layers = sorted(int(i) for i in (router_layers or []))
        self.top_k_docs = top_k_docs
        self.chunk_size = chunk_size
        self.routing_tokens = routing_tokens
        self.query_position_offset = top_k_docs if query_position_offset is None else query_position_offset
        self.document_positions = document_positions
        self.aux_loss_type = aux_loss_type
        self.aux_temperature = aux_temperature
        self.lm_loss_weight = lm_loss_weight
        self.aux_loss_weight = aux_loss_weight
        self.detach_router_input = detach_router_input
        self.router_init = router_init
        self.lm_loss_chunk_size = lm_loss_chunk_size
        self.attn_backend = attn_backend
        self.routing_score = routing_score
        super().__init__(**backbone_kwargs)
        self.validate_msa_fields()

    def validate_msa_fields(self) -> None:
        """Raise `ValueError` naming the first MSA field that cannot work."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MSAConfig.{name} must be an integer >= 1, got {value!r}")

        positive_int("top_k_docs")
        positive_int("chunk_size")
        positive_int("lm_loss_chunk_size")
        if not isinstance(self.query_position_offset, int) or self.query_position_offset < 0:
            raise ValueError(
                f"MSAConfig.query_position_offset must be an integer >= 0, got {self.query_position_offset!r}"
            )
        for name, allowed in (
            ("routing_tokens", ROUTING_TOKEN_MODES),
            ("aux_loss_type", AUX_LOSS_TYPES),
            ("router_init", ROUTER_INITS),
            ("attn_backend", BACKENDS),
            ("routing_score", ROUTING_SCORES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"MSAConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.aux_temperature > 0:
            raise ValueError(f"MSAConfig.aux_temperature must be > 0, got {self.aux_temperature!r}")
        num_layers = self.num_hidden_layers
        bad = [i for i in self.router_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"MSAConfig.router_layers {bad} are outside the backbone's {num_layers} layers (0..{num_layers - 1})"
            )
        if len(set(self.router_layers)) != len(self.router_layers):
            raise ValueError(f"MSAConfig.router_layers has duplicates: {self.router_layers}")

    def backbone_config_dict(self) -> dict[str, Any]:
        """The backbone's own config fields, without the MSA ones."""
        fields = {k: v for k, v in self.to_dict().items() if k not in MSA_KEYS}
        for key in ("model_type", "architectures", "transformers_version", "auto_map"):
            fields.pop(key, None)
        return fields
