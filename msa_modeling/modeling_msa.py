"""The MSA model in Hugging Face form: `MSAModel` and `MSAForCausalLM` (spec sections 3-5)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import ModelOutput
from transformers.utils.deprecation import deprecate_kwarg

from .attention import PooledMemory, make_attention_backend
from .backbones import BackboneAdapter, get_backbone
from .backbones.base import SLIDING_ATTENTION
from .configuration_msa import MSAConfig
from .decoding import run_cached_decoder
from .execution import apply_activation_checkpointing, remove_activation_checkpointing
from .layout import ROLE_PREFIX, ROLE_QUERY, PackedLayout, build_packed_layout
from .losses import RECALL_KS, chunked_lm_loss, router_recall, routing_loss
from .remote_code import AUTO_MAP, write_remote_code
from .routing import pool_chunks, rank_documents, score_chunks, score_documents, select_documents

logger = logging.getLogger(__name__)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on [B, L, heads, D] with cos/sin of shape [B, L, D] (Hugging Face's half-rotation layout)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def check_windows_never_bind(
    layout: PackedLayout, windows: dict[int, int], router_layers: list[int], top_k: int
) -> None:
    """Raise `ValueError` when a sliding window would cut some token's context in this batch.

    MSA attends over whole segments, so a window can only be honoured where it never binds:
    every document and prefix fits in it, and so does each query's context
    `[prefix ; memory chunks ; query]` (key slots, counted as a KV cache holds them; the
    chunks of the k documents with the most chunks in router layers, none elsewhere).
    The common case is decided from the layout's host-side bounds, without a device sync.
    """
    smallest = min(windows.values())
    if max(layout.max_segment_length, layout.max_query_context) <= smallest:
        return
    if layout.max_segment_length > smallest:
        layer = min(windows, key=windows.get)
        raise ValueError(
            f"a document, prefix or query segment of {layout.max_segment_length} tokens exceeds the "
            f"{smallest}-token sliding window of layer {layer}; MSA attends over whole segments and cannot "
            "apply the window. Keep segments within the window (e.g. the data's max_doc_tokens)."
        )
    num_examples = layout.num_examples
    count = lambda role: torch.bincount(  # noqa: E731
        layout.token_example[layout.role == role], minlength=num_examples
    )
    local_context = count(ROLE_PREFIX) + count(ROLE_QUERY)
    memory_context = local_context
    if layout.num_docs and layout.example_docs.shape[1]:
        chunks_per_doc = torch.bincount(layout.chunk_doc, minlength=layout.num_docs)
        example_chunks = torch.where(
            layout.example_docs >= 0,
            chunks_per_doc[layout.example_docs.clamp(min=0)],
            torch.zeros_like(layout.example_docs),
        )
        k = min(top_k, example_chunks.shape[1])
        memory_context = local_context + example_chunks.topk(k, dim=1).values.sum(1)
    for layer, window in sorted(windows.items()):
        context = memory_context if layer in router_layers else local_context
        longest = int(context.max()) if num_examples else 0
        if longest > window:
            raise ValueError(
                f"a query's context [prefix ; memory chunks ; query] can reach {longest} key slots, more than the "
                f"{window}-token sliding window of layer {layer}; MSA cannot apply the window. Shorten the "
                "prefix/question or the memory documents, or lower top_k_docs."
            )


@dataclass
class AttentionContext:
    """The attention backend and what it precomputed for this batch (shared by all layers)."""

    backend: object
    plan: dict


@dataclass
class RouterLayerOutput:
    doc_scores: torch.Tensor  # [D] fp32
    doc_ranks: torch.Tensor  # [D] long


class MSAAttention(nn.Module):
    """The backbone's attention with document-wise masking and, in router layers, memory routing.

    Attributes set from the backbone adapter: `scaling` (softmax scale of q.k), `softcap`
    (attention logit soft-cap or `None`), `sliding_window` (tokens, or `None`; MSA only
    accepts batches where it never binds) and `uses_local_rope` (the layer takes the
    model's `rotary_emb_local` cos/sin instead of `rotary_emb`'s).
    """

    def __init__(
        self,
        config: MSAConfig,
        adapter: BackboneAdapter,
        layer_idx: int,
        backbone_config: PreTrainedConfig | None = None,
    ) -> None:
        super().__init__()
        backbone_config = config if backbone_config is None else backbone_config
        self.layer_idx = layer_idx
        self.is_router = layer_idx in config.router_layers
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        query_scale = adapter.query_scale(backbone_config)
        self.scaling = self.head_dim**-0.5 if query_scale is None else query_scale
        self.softcap = adapter.attn_logit_softcap(backbone_config)
        self.sliding_window = adapter.sliding_windows(backbone_config).get(layer_idx)
        self.uses_local_rope = (
            adapter.local_rotary_embedding is not None
            and adapter.layer_types(backbone_config)[layer_idx] == SLIDING_ATTENTION
        )
        self.top_k = config.top_k_docs
        self.detach_router_input = config.detach_router_input
        self.routing_score = config.routing_score
        qkv_bias, o_bias = adapter.qkv_bias(backbone_config), adapter.o_proj_bias(backbone_config)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=o_bias)
        if adapter.has_qk_norm:
            self.q_norm = adapter.rms_norm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = adapter.rms_norm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        if self.is_router:
            self.router_q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=False)
            self.router_k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout,
        attention: AttentionContext,
    ) -> tuple[torch.Tensor, RouterLayerOutput | None]:
        batch, length, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, cos, sin)

        memory = router_output = None
        if self.is_router and layout.num_docs > 0:
            router_output = self.route(hidden_states, layout)
            selected = select_documents(router_output.doc_ranks, self.top_k)
            flat = lambda x: x.reshape(batch * length, self.num_kv_heads, self.head_dim)  # noqa: E731
            memory = PooledMemory(
                keys=pool_chunks(flat(k), layout).to(k.dtype),
                values=pool_chunks(flat(v), layout).to(v.dtype),
                selected_chunks=selected[layout.chunk_doc],
            )
        if self.softcap is None:
            attended = attention.backend.attend(q, k, v, layout, attention.plan, self.scaling, memory)
        else:
            attended = attention.backend.attend(
                q, k, v, layout, attention.plan, self.scaling, memory, softcap=self.softcap
            )
        return self.o_proj(attended.reshape(batch, length, -1)), router_output

    def project(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q [B, L, H, D] and K, V [B, L, Hkv, D], after the q/k norms and RoPE."""
        batch, length, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def route(self, hidden_states: torch.Tensor, layout: PackedLayout) -> RouterLayerOutput:
        """Score every document of the batch and rank it within its example."""
        router_input = hidden_states.detach() if self.detach_router_input else hidden_states
        flat = router_input.reshape(-1, router_input.shape[-1])
        routing_queries = self.router_q_proj(flat[layout.routing_token_index]).view(-1, self.num_heads, self.head_dim)
        routing_keys = self.router_k_proj(flat).view(-1, self.num_kv_heads, self.head_dim)
        chunk_scores = score_chunks(
            routing_queries, pool_chunks(routing_keys, layout), layout, routing_score=self.routing_score
        )
        doc_scores = score_documents(chunk_scores, layout)
        return RouterLayerOutput(doc_scores=doc_scores, doc_ranks=rank_documents(doc_scores, layout))


class MSADecoderLayer(nn.Module):
    """Pre-norm decoder layer (Llama, Mistral, Qwen): `h + attn(norm(h))`, then `feed_forward`.

    Engines that run the attention themselves use `input_layernorm`, then
    `after_attention(h, attention_output)`: `attention_residual`, then `feed_forward`.
    """

    def __init__(self, config: MSAConfig, adapter: BackboneAdapter, backbone_config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = MSAAttention(config, adapter, layer_idx, backbone_config)
        self.mlp = adapter.mlp(backbone_config)
        self.input_layernorm = adapter.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = adapter.rms_norm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layout: PackedLayout,
        attention: AttentionContext,
    ) -> tuple[torch.Tensor, RouterLayerOutput | None]:
        attended, router_output = self.self_attn(self.input_layernorm(hidden_states), cos, sin, layout, attention)
        return self.after_attention(hidden_states, attended), router_output

    def after_attention(self, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The layer's output from its input and o_proj's output: one seam, so that a compiled
        layer fuses the attention residual into the MLP block's kernels."""
        return self.feed_forward(self.attention_residual(hidden_states, attention_output))

    def attention_residual(self, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        """The residual stream after the attention block (`attention_output` is o_proj's output)."""
        return hidden_states + attention_output

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The MLP block with its residual, on the residual stream after attention."""
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class MSASandwichDecoderLayer(MSADecoderLayer):
    """Gemma 2/3 layer: the attention output is normed before its residual add
    (`post_attention_layernorm`), and the MLP sits between `pre_feedforward_layernorm` and
    `post_feedforward_layernorm`. Same seams as `MSADecoderLayer`."""

    def __init__(self, config: MSAConfig, adapter: BackboneAdapter, backbone_config, layer_idx: int) -> None:
        super().__init__(config, adapter, backbone_config, layer_idx)
        self.pre_feedforward_layernorm = adapter.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = adapter.rms_norm(config.hidden_size, eps=config.rms_norm_eps)

    def attention_residual(self, hidden_states: torch.Tensor, attention_output: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.post_attention_layernorm(attention_output)

    def feed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(hidden_states)))


class MSAPreTrainedModel(PreTrainedModel):
    config_class = MSAConfig
    config: MSAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MSADecoderLayer", "MSASandwichDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        get_backbone(self.config.backbone_model_type).init_weights(module)

    def _activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """What `gradient_checkpointing_enable` / `activation_checkpointing_enable` run: every layer
        recomputes with torch's non-reentrant checkpoint (its selective policy, which keeps the
        attention kernels' outputs, needs it), so other settings are refused rather than ignored."""
        settings = dict(activation_checkpointing_kwargs or {})
        if settings.pop("use_reentrant", False):
            raise ValueError("MSA recomputes layers with non-reentrant checkpointing only; pass use_reentrant=False")
        if settings:
            raise ValueError(f"MSA's activation checkpointing takes no settings {sorted(settings)}")
        if every_n_layers != 1 or offload:
            raise ValueError(
                "every_n_layers and offload: use msa_modeling.execution's apply_activation_checkpointing(model, "
                "layers=N) and apply_activation_offload(model, layers=K) instead"
            )
        super()._activation_checkpointing_enable(None)

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: object = None, every_n_layers: int = 1
    ) -> None:
        """Hugging Face's switch, applied from outside the forward: the layers are wrapped
        (`msa_modeling.execution`), so `forward` stays a plain loop."""
        remove_activation_checkpointing(self)
        if enable:
            apply_activation_checkpointing(self)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: object, **kwargs: object) -> None:
        """Hugging Face's `save_pretrained`, plus the modeling code and `auto_map`, so that the folder
        loads with `trust_remote_code=True` where `msa_modeling` is not installed (see `remote_code`)."""
        self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


@dataclass
class MSAModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    router_outputs: list[RouterLayerOutput] | None = None
    layout: PackedLayout | None = None


class MSAModel(MSAPreTrainedModel):
    """The decoder stack: embeddings, MSA decoder layers and the final norm."""

    def __init__(self, config: MSAConfig) -> None:
        super().__init__(config)
        adapter = get_backbone(config.backbone_model_type)
        backbone_config = adapter.config_class(**config.backbone_config_dict())
        adapter.check_supported(backbone_config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        # A float, not a buffer: the checkpoint keeps the backbone's names, and the factor is
        # rounded to the embedding dtype at use, as Gemma does.
        self.embedding_scale = adapter.embedding_scale(backbone_config)
        layer_class = MSASandwichDecoderLayer if adapter.sandwich_norms else MSADecoderLayer
        self.layers = nn.ModuleList(
            layer_class(config, adapter, backbone_config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = adapter.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = adapter.rotary_embedding(backbone_config)
        self.rotary_emb_local = (
            None if adapter.local_rotary_embedding is None else adapter.local_rotary_embedding(backbone_config)
        )
        self.sliding_windows = adapter.sliding_windows(backbone_config)
        self._attention_backends: dict[str, object] = {}
        self.post_init()

    def attention_backend(self, device: torch.device):
        """The configured attention backend for `device`, chosen once per device type and logged."""
        if device.type not in self._attention_backends:
            backend = make_attention_backend(self.config.attn_backend, device)
            logger.info(
                "MSA attention backend on %s: %s (config attn_backend=%r)",
                device.type,
                backend.name,
                self.config.attn_backend,
            )
            self._attention_backends[device.type] = backend
        return self._attention_backends[device.type]

    def forward(
        self,
        input_ids: torch.Tensor,
        layout: PackedLayout,
        output_hidden_states: bool = False,
    ) -> MSAModelOutput:
        if input_ids.shape != (layout.batch_size, layout.row_length):
            raise ValueError(
                f"input_ids has shape {tuple(input_ids.shape)} but the layout describes "
                f"{(layout.batch_size, layout.row_length)}"
            )
        if self.sliding_windows:
            check_windows_never_bind(layout, self.sliding_windows, self.config.router_layers, self.config.top_k_docs)
        hidden_states = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden_states = hidden_states * torch.tensor(self.embedding_scale).to(hidden_states.dtype)
        cos, sin = self.rotary_emb(hidden_states, layout.position_ids)
        local_rope = None
        if self.rotary_emb_local is not None:
            local_rope = self.rotary_emb_local(hidden_states, layout.position_ids)
        backend = self.attention_backend(hidden_states.device)
        attention = AttentionContext(backend=backend, plan=backend.prepare(layout))
        all_hidden = [hidden_states] if output_hidden_states else None
        router_outputs = []
        for layer in self.layers:
            layer_cos, layer_sin = local_rope if layer.self_attn.uses_local_rope else (cos, sin)
            hidden_states, router_output = layer(hidden_states, layer_cos, layer_sin, layout, attention)
            if router_output is not None:
                router_outputs.append(router_output)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        return MSAModelOutput(
            last_hidden_state=self.norm(hidden_states),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            router_outputs=router_outputs,
            layout=layout,
        )


@dataclass
class MSACausalLMOutput(ModelOutput):
    """Output of `MSAForCausalLM.forward`.

    Attributes:
        loss: `lm_loss_weight * lm_loss + aux_loss_weight * aux_loss` (terms that exist).
        lm_loss: mean next-token cross-entropy over labelled tokens.
        aux_loss: routing InfoNCE, averaged over router layers and examples with positives.
        logits: [B, L, vocab]; only without labels or with `return_logits=True`.
        hidden_states: embeddings, then each decoder layer's output (before the final norm).
        doc_scores: [router layers, D] document scores s_i (documents of the batch in order).
        selected_docs: [router layers, D] bool, the top-k selection per example.
        router_recall: {"recall@1": [router layers], ...} over examples with positives.
        cache: the KV cache after a forward of the generation path (`cache.msa_memory` holds a
            memory's context and each row's routing).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    doc_scores: torch.Tensor | None = None
    selected_docs: torch.Tensor | None = None
    router_recall: dict[str, torch.Tensor] | None = None
    cache: Cache | None = None


# What `generate()` hands every forward besides model inputs (its decoding mode's own arguments).
GENERATE_PASSES_THROUGH = ("tokenizer", "assistant_tokenizer")


class MSAForCausalLM(MSAPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: MSAConfig) -> None:
        super().__init__(config)
        self.model = MSAModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.final_logit_softcap = get_backbone(config.backbone_model_type).final_logit_softcap(config)
        self.post_init()

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """LM logits of final-normed hidden states, soft-capped where the backbone caps them (Gemma 2)."""
        logits = self.lm_head(hidden_states)
        if self.final_logit_softcap is None:
            return logits
        return torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def build_layout(
        self,
        doc_ids: torch.Tensor,
        example_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        aux_labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> PackedLayout:
        """The `PackedLayout` this model's config implies for a packed batch."""
        return build_packed_layout(
            doc_ids,
            chunk_size=self.config.chunk_size,
            query_position_offset=self.config.query_position_offset,
            example_ids=example_ids,
            labels=labels,
            aux_labels=aux_labels,
            attention_mask=attention_mask,
            routing_tokens=self.config.routing_tokens,
            document_positions=self.config.document_positions,
            require_routing_tokens=bool(self.config.router_layers),
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        example_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        aux_labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        layout: PackedLayout | None = None,
        return_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        memory: object | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **unused: object,
    ) -> MSACausalLMOutput | tuple:
        """Training forward over packed rows (spec sections 2-5), or the generation path.

        With any of `doc_ids`, `example_ids`, `labels`, `aux_labels`, `layout`, the rows are
        packed MSA rows (right-padded). Otherwise the model is a causal LM over left- or
        right-padded query rows with an optional KV cache and memory, as `generate()` calls it
        (see `msa_modeling.decoding`); without a memory that is the backbone.

        Args:
            input_ids: [B, L] token ids.
            doc_ids: [B, L] roles: -2 prefix, 1..n documents, 0 query/answer, -1 padding.
                `None` treats every token as query, i.e. the backbone with an empty memory.
            example_ids: [B, L] packed example of each token (-1 padding); `None`: one per row.
            labels: [B, L] unshifted targets, -100 where nothing is predicted.
            aux_labels: [B, L] 1 on the tokens of positive documents.
            attention_mask: [B, L] 0 marks padding (generation path: [B, cached + L], any side).
            layout: a prebuilt `PackedLayout` (e.g. from the data loader); replaces the
                role tensors above.
            return_logits: also return full logits when labels are given (memory-hungry).
            position_ids: [B, L] positions within the query (default: counted over
                `attention_mask`); the model adds the query start (spec section 4).
            cache: a transformers `Cache` (alias `past_key_values`); `use_cache` makes one.
            inputs_embeds: [B, L, hidden] instead of `input_ids`, from `get_input_embeddings()`
                (the backbone's embedding scale is applied here, as for `input_ids`).
            logits_to_keep: compute logits for the last this-many tokens only (0: all).
            memory: a `MemoryStore` (or an `MSAGenerator` over one) that the first forward routes
                each row's prompt over; later forwards reuse the selection kept in the cache.
            return_dict: `False` returns a tuple.
        """
        unexpected = sorted(set(unused) - set(GENERATE_PASSES_THROUGH))
        if unexpected:
            raise ValueError(f"MSAForCausalLM.forward got unexpected arguments: {unexpected}")
        if output_attentions:
            raise ValueError("MSAForCausalLM does not return attention weights (output_attentions=True)")
        packed = {
            name
            for name, value in (
                ("doc_ids", doc_ids),
                ("example_ids", example_ids),
                ("labels", labels),
                ("aux_labels", aux_labels),
                ("layout", layout),
                ("return_logits", return_logits),
            )
            if value is not None
        }
        generation = {
            name
            for name, value in (
                ("position_ids", position_ids),
                ("cache", cache),
                ("use_cache", use_cache),
                ("inputs_embeds", inputs_embeds),
                ("memory", memory),
            )
            if value is not None and value is not False
        }
        if packed and generation:
            raise ValueError(
                f"packed-row arguments {sorted(packed)} cannot be combined with generation arguments {sorted(generation)}"
            )
        if packed:
            output = self.packed_forward(
                input_ids,
                doc_ids,
                example_ids,
                labels,
                aux_labels,
                attention_mask,
                layout,
                return_logits,
                bool(output_hidden_states),
            )
        else:
            output = self.causal_forward(
                input_ids,
                inputs_embeds,
                attention_mask,
                position_ids,
                cache,
                use_cache,
                memory,
                logits_to_keep,
                bool(output_hidden_states),
            )
        return output if return_dict is not False else output.to_tuple()

    def causal_forward(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache | None,
        use_cache: bool | None,
        memory: object | None,
        logits_to_keep: int | torch.Tensor,
        output_hidden_states: bool,
    ) -> MSACausalLMOutput:
        """Query rows as a causal LM over a KV cache (see `forward` and `msa_modeling.decoding`)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be [batch, row_length], got shape {tuple(input_ids.shape)}")
            inputs_embeds = self.model.embed_tokens(input_ids)
        hidden = inputs_embeds
        if self.model.embedding_scale is not None:
            hidden = hidden * torch.tensor(self.model.embedding_scale).to(hidden.dtype)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden, all_hidden = run_cached_decoder(
            self, hidden, position_ids, attention_mask, cache, memory, output_hidden_states
        )
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return MSACausalLMOutput(logits=self.compute_logits(hidden[:, kept]), hidden_states=all_hidden, cache=cache)

    def packed_forward(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None,
        example_ids: torch.Tensor | None,
        labels: torch.Tensor | None,
        aux_labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        layout: PackedLayout | None,
        return_logits: bool | None,
        output_hidden_states: bool,
    ) -> MSACausalLMOutput:
        """The training forward over packed rows (see `forward`)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, row_length], got shape {tuple(input_ids.shape)}")
        if layout is None:
            if doc_ids is None:
                doc_ids = torch.zeros_like(input_ids)
            if doc_ids.shape != input_ids.shape:
                raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)} but input_ids has {tuple(input_ids.shape)}")
            layout = self.build_layout(doc_ids, example_ids, labels, aux_labels, attention_mask)
        outputs = self.model(input_ids, layout, output_hidden_states=output_hidden_states)
        hidden = outputs.last_hidden_state

        head = self.lm_head if self.final_logit_softcap is None else self.compute_logits
        lm_loss = chunked_lm_loss(hidden, head, layout, self.config.lm_loss_chunk_size)
        router_outputs = outputs.router_outputs
        aux_loss = None
        doc_scores = selected = recall = None
        if router_outputs:
            doc_scores = torch.stack([r.doc_scores for r in router_outputs])
            ranks = torch.stack([r.doc_ranks for r in router_outputs])
            selected = select_documents(ranks, self.config.top_k_docs)
            per_layer = [
                routing_loss(r.doc_scores, layout, self.config.aux_temperature, self.config.aux_loss_type)
                for r in router_outputs
            ]
            if per_layer[0] is not None:
                aux_loss = torch.stack(per_layer).mean()
            with torch.no_grad():
                per_layer_recall = [router_recall(r.doc_ranks, layout) for r in router_outputs]
                recall = {f"recall@{k}": torch.stack([r[k] for r in per_layer_recall]) for k in RECALL_KS}

        loss = None
        for weight, term in ((self.config.lm_loss_weight, lm_loss), (self.config.aux_loss_weight, aux_loss)):
            if term is not None:
                loss = weight * term if loss is None else loss + weight * term

        want_logits = return_logits if return_logits is not None else labels is None
        return MSACausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux_loss,
            logits=self.compute_logits(hidden) if want_logits else None,
            hidden_states=outputs.hidden_states,
            doc_scores=doc_scores,
            selected_docs=selected,
            router_recall=recall,
        )

    @classmethod
    def from_backbone(
        cls,
        backbone: PreTrainedModel | str | os.PathLike,
        dtype: torch.dtype | None = None,
        **msa_settings: object,
    ) -> MSAForCausalLM:
        """Build an MSA model from a backbone model or checkpoint directory.

        Every backbone weight is copied; the router projections are new: random (paper),
        copies of the layer's own q/k projections (`router_init="qk"`), or, with
        `router_init="tied"`, a random `router_k_proj` whose rows of each KV group are also
        the rows of every query head of that group in `router_q_proj`.

        Args:
            backbone: a causal-LM `PreTrainedModel` or a local checkpoint directory.
            dtype: load a checkpoint directory in this dtype (default: its own).
            **msa_settings: `MSAConfig` fields, e.g. `top_k_docs=16, chunk_size=64`.
        """
        if not isinstance(backbone, PreTrainedModel):
            backbone_type = AutoConfig.from_pretrained(backbone).model_type
            backbone = get_backbone(backbone_type).causal_lm_class.from_pretrained(backbone, dtype=dtype or "auto")
        adapter = get_backbone(backbone.config.model_type)
        adapter.check_supported(backbone.config)
        backbone_fields = {
            k: v
            for k, v in backbone.config.to_dict().items()
            if k not in ("model_type", "architectures", "transformers_version", "auto_map")
        }
        config = MSAConfig(backbone_model_type=adapter.model_type, **backbone_fields, **msa_settings)
        model = cls(config).to(device=backbone.device, dtype=backbone.dtype)
        incompatible = model.load_state_dict(backbone.state_dict(), strict=False)
        router_keys = {name for name, _ in model.named_parameters() if ".router_" in name}
        missing = set(incompatible.missing_keys) - router_keys
        if config.tie_word_embeddings:
            missing.discard("lm_head.weight")
        if missing or incompatible.unexpected_keys:
            raise ValueError(
                f"backbone weights do not map onto the MSA model: missing {sorted(missing)}, "
                f"unexpected {sorted(incompatible.unexpected_keys)}"
            )
        if config.router_init == "qk":
            with torch.no_grad():
                for layer in model.model.layers:
                    attention = layer.self_attn
                    if attention.is_router:
                        attention.router_q_proj.weight.copy_(attention.q_proj.weight)
                        attention.router_k_proj.weight.copy_(attention.k_proj.weight)
        elif config.router_init == "tied":
            with torch.no_grad():
                for layer in model.model.layers:
                    attention = layer.self_attn
                    if attention.is_router:
                        keys = attention.router_k_proj.weight.view(attention.num_kv_heads, attention.head_dim, -1)
                        group = attention.num_heads // attention.num_kv_heads
                        attention.router_q_proj.weight.copy_(keys.repeat_interleave(group, dim=0).flatten(0, 1))
        logger.info(
            "built MSA model from %s backbone: %d layers, router layers %s, router init %s",
            adapter.model_type,
            config.num_hidden_layers,
            config.router_layers,
            config.router_init,
        )
        return model
