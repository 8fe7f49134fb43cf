"""Deliberately slow reference implementation of the MSA training forward.

Written straight from docs/MSA_SPEC.md sections 2-5, independently of
`msa_modeling`, so that the fast model can be checked against it (hidden states,
document scores, selections, losses and gradients). Every quantity is computed
with plain Python loops over examples, documents, chunks and heads; nothing is
vectorised across examples, so each rule of the spec maps onto a few readable
lines. Speed is irrelevant here; only use it on tiny models and short inputs.

Only the module/parameter naming contract of the MSA model is used:
`model.config` (the backbone's fields plus the MSA fields), `model.model.embed_tokens`,
`model.model.layers[i].{input_layernorm, self_attn.*, post_attention_layernorm,
mlp}` (Gemma also `pre_feedforward_layernorm`, `post_feedforward_layernorm`),
`model.model.norm`, `model.model.rotary_emb` (Gemma 3's local layers:
`model.model.rotary_emb_local`) and `model.lm_head`.

Backbone families differ only in the few facts of `_FAMILIES`, transcribed from
the Hugging Face modeling files (not from `msa_modeling.backbones`): q/k norms,
Gemma's embedding scale, query scale, soft-caps and four norms per layer, and
which layers are windowed or use the local RoPE.

Conventions settled here where the spec leaves room:
- Padding is any token with doc_ids == -1 (and example_ids == -1 when given;
  the two must agree). A padding token attends to itself only and contributes
  to no loss, score or metric.
- Each example must be one contiguous run of its row, laid out as
  [prefix (-2)] [docs 1..n, contiguous, strictly increasing ids] [query (0)].
- An example that has documents but no routing token is rejected (its
  document scores would be undefined).
- A document is positive when any of its tokens has aux_labels == 1.
- lm_loss is None when labels is None or no token is predicted; aux_loss is
  None when aux_labels is None or no example has a positive document; recall
  is then an empty dict.
- A sliding window must not bind: in a windowed layer every prefix and
  document, and every query's [prefix ; selected chunks ; query] key sequence,
  fits in the window; otherwise ValueError.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
SLIDING = "sliding_attention"


@dataclass(frozen=True)
class _Family:
    """What a backbone family does differently from the plain pre-norm Llama layer."""

    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE
    gemma: bool = False  # sqrt(hidden) embeddings, query_pre_attn_scalar, 4 norms/layer, soft-caps
    local_rope: bool = False  # sliding layers use a second RoPE


_FAMILIES = {
    "qwen3": _Family(qk_norm=True),
    "qwen2": _Family(),
    "llama": _Family(),
    "mistral": _Family(),
    "gemma2": _Family(gemma=True),
    "gemma3_text": _Family(qk_norm=True, gemma=True, local_rope=True),
}


def _layer_window(config: object, layer_idx: int) -> int | None:
    """Sliding window of a layer: Mistral windows every layer, the others follow layer_types."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    if _family_name(config) == "mistral":
        return window
    layer_types = getattr(config, "layer_types", None) or []
    return window if layer_types[layer_idx] == SLIDING else None


def _family_name(config: object) -> str:
    """An MSA config names its backbone; a plain backbone config (with MSA fields set on it) is its own."""
    return getattr(config, "backbone_model_type", None) or config.model_type


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else cap * torch.tanh(x / cap)


PREFIX_ID = -2
PAD_ID = -1
QUERY_ID = 0
RECALL_KS = (1, 5, 10)


@dataclass
class ReferenceOutput:
    """Everything the fast path is compared against."""

    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor
    doc_scores: torch.Tensor
    selected_docs: torch.Tensor
    lm_loss: torch.Tensor | None
    aux_loss: torch.Tensor | None
    recall: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Document:
    """One memory document of one example."""

    doc_id: int
    global_index: int  # column in doc_scores / selected_docs
    positions_in_row: list[int]  # token columns of the row, in order
    positive: bool


@dataclass
class _Example:
    """One packed example: its row and the token columns of each role."""

    row: int
    prefix: list[int]
    docs: list[_Document]
    query: list[int]
    routing: list[int]  # subset of `query` whose Q_R is used for scoring

    def all_tokens(self) -> list[int]:
        tokens = list(self.prefix)
        for doc in self.docs:
            tokens.extend(doc.positions_in_row)
        tokens.extend(self.query)
        return tokens


# ----------------------------------------------------------------------------
# Parsing the role tensors
# ----------------------------------------------------------------------------


def _parse_examples(
    doc_ids: torch.Tensor,
    example_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    aux_labels: torch.Tensor | None,
    routing_tokens: str,
) -> list[_Example]:
    """Split every row into examples and roles, validating the layout.

    Examples are returned row by row, in order of appearance, so that the
    global document numbering (row-major, example by example) falls out of
    enumerating them in order.
    """
    batch, length = doc_ids.shape
    if example_ids is None:
        # One example per row; padding is marked by doc_ids alone.
        example_ids = torch.where(doc_ids == PAD_ID, torch.full_like(doc_ids, -1), torch.zeros_like(doc_ids))
    if ((doc_ids == PAD_ID) != (example_ids == -1)).any():
        raise ValueError("doc_ids and example_ids disagree on which tokens are padding")
    if routing_tokens not in ("prompt", "query"):
        raise ValueError(f"unknown routing_tokens {routing_tokens!r}")

    examples: list[_Example] = []
    next_global_doc = 0
    for row in range(batch):
        # Group the row's columns by example id, in order of first appearance.
        order: list[int] = []
        columns: dict[int, list[int]] = {}
        for col in range(length):
            ex = int(example_ids[row, col])
            if ex == -1:
                continue
            if ex not in columns:
                order.append(ex)
                columns[ex] = []
            columns[ex].append(col)

        for ex in order:
            cols = columns[ex]
            if cols != list(range(cols[0], cols[-1] + 1)):
                raise ValueError(f"example {ex} of row {row} is not contiguous")

            prefix: list[int] = []
            docs: list[_Document] = []
            query: list[int] = []
            # Role order inside an example: prefix, then documents, then query.
            stage = 0  # 0 prefix, 1 documents, 2 query
            for col in cols:
                role = int(doc_ids[row, col])
                if role == PREFIX_ID:
                    if stage != 0:
                        raise ValueError(f"prefix token after documents/query in row {row}, column {col}")
                    prefix.append(col)
                elif role > 0:
                    if stage == 2:
                        raise ValueError(f"document token after query tokens in row {row}, column {col}")
                    stage = 1
                    if docs and docs[-1].doc_id == role and docs[-1].positions_in_row[-1] == col - 1:
                        docs[-1].positions_in_row.append(col)
                    else:
                        if docs and role <= docs[-1].doc_id:
                            raise ValueError(
                                f"document ids must be contiguous and strictly increasing (row {row}, column {col})"
                            )
                        docs.append(_Document(role, -1, [col], False))
                elif role == QUERY_ID:
                    stage = 2
                    query.append(col)
                else:
                    raise ValueError(f"unexpected doc_ids value {role}")

            for doc in docs:
                doc.global_index = next_global_doc
                next_global_doc += 1
                if aux_labels is not None:
                    doc.positive = any(int(aux_labels[row, c]) == 1 for c in doc.positions_in_row)

            if routing_tokens == "query" or labels is None:
                routing = list(query)
            else:
                # "prompt": the question only, as in inference's first round: query tokens
                # that are not a prediction target and come before the example's first one.
                # Unlabelled text after an answer (a QA sample's injected document) does not route.
                targets = [c for c in query if int(labels[row, c]) != IGNORE_INDEX]
                first_target = targets[0] if targets else length
                routing = [c for c in query if int(labels[row, c]) == IGNORE_INDEX and c < first_target]
            if docs and not routing:
                raise ValueError(f"example {ex} of row {row} has documents but no routing token")

            examples.append(_Example(row, prefix, docs, query, routing))
    return examples


def _position_ids(
    examples: list[_Example], batch: int, length: int, offset: int, document_positions: bool
) -> torch.Tensor:
    """RoPE positions of section 4 (padding gets 0; it attends to itself only)."""
    positions = torch.zeros(batch, length, dtype=torch.long)
    for ex in examples:
        if not document_positions:
            # Ablation: plain positions counted from the start of the example.
            for i, col in enumerate(ex.all_tokens()):
                positions[ex.row, col] = i
            continue
        for i, col in enumerate(ex.prefix):
            positions[ex.row, col] = i
        for doc in ex.docs:
            for i, col in enumerate(doc.positions_in_row):
                positions[ex.row, col] = i
        prefix_len = len(ex.prefix)
        for j, col in enumerate(ex.query):
            positions[ex.row, col] = prefix_len + offset + j
    return positions


# ----------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, L, heads, D]; cos/sin [B, L, D] (the rotate-half RoPE of HF Qwen3)."""
    cos = cos[:, :, None, :]
    sin = sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) over the last dimension (spec section 3)."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x / torch.clamp(norm, min=1e-12)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention of n queries over m keys with an explicit mask.

    q [n, H, D]; k, v [m, Hkv, D]; allowed [n, m] bool. Query head h reads
    key/value head h // (H / Hkv) (GQA). Scores are soft-capped (c * tanh(s / c))
    after scaling and before masking when `softcap` is given. Returns [n, H, D].
    """
    num_heads, num_kv = q.shape[1], k.shape[1]
    group = num_heads // num_kv
    outputs = []
    for h in range(num_heads):
        g = h // group
        scores = _softcap((q[:, h, :] @ k[:, g, :].transpose(0, 1)) * scaling, softcap)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        outputs.append(probs @ v[:, g, :])
    return torch.stack(outputs, dim=1)


def causal_mask(n: int) -> torch.Tensor:
    """[n, n] bool: token i may read tokens 0..i."""
    allowed = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            allowed[i, j] = True
    return allowed


def chunk_means(x: torch.Tensor, chunk_size: int) -> list[torch.Tensor]:
    """Means of consecutive chunks of `chunk_size` rows of x [n, ...].

    The last chunk may be shorter and is averaged over its real rows only.
    """
    means = []
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        means.append(chunk.sum(dim=0) / chunk.shape[0])
    return means


def head_similarity(q: torch.Tensor, k: torch.Tensor, routing_score: str) -> torch.Tensor:
    """One head's routing similarity of a query vector q [D] and a pooled key k [D].

    "cosine" (paper eq. 2): <q, k> / (|q| |k|), norms clamped at 1e-12. "scaled_dot"
    (the released engine's inference): <q, k> / sqrt(D).
    """
    if routing_score == "cosine":
        return torch.dot(l2_normalize(q), l2_normalize(k))
    if routing_score == "scaled_dot":
        return torch.dot(q, k) / math.sqrt(q.shape[0])
    raise ValueError(f"unknown routing_score {routing_score!r}")


def chunk_score(q_r: torch.Tensor, kr_bar: torch.Tensor, routing_score: str = "cosine") -> torch.Tensor:
    """S_c for one chunk: max over routing tokens of the mean over query heads
    of sim(Q_R[t, h], K̄R[g(h)]).

    q_r [T, H, D] router queries; kr_bar [Hkv, D] (pooled router keys).
    """
    num_heads, num_kv = q_r.shape[1], kr_bar.shape[0]
    group = num_heads // num_kv
    per_token = []
    for t in range(q_r.shape[0]):
        sims = [head_similarity(q_r[t, h], kr_bar[h // group], routing_score) for h in range(num_heads)]
        per_token.append(torch.stack(sims).mean())
    return torch.stack(per_token).max()


def select_top_docs(scores: list[float], k: int) -> list[int]:
    """Indices (into `scores`) of the top-min(k, n) documents; ties go to the
    lower index, i.e. the lower document id."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[: min(k, len(scores))])


# ----------------------------------------------------------------------------
# The forward
# ----------------------------------------------------------------------------


def _layer_attention(
    layer: torch.nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    examples: list[_Example],
    doc_ids: torch.Tensor,
    is_router_layer: bool,
    config: object,
    num_docs: int,
    layer_idx: int,
    window: int | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Attention sub-block of one decoder layer (before o_proj).

    x is the layer's normed input [B, L, hidden]. Returns the attention output
    [B, L, H*D] and, for router layers, this layer's doc scores [num_docs] and
    selection [num_docs].
    """
    attn = layer.self_attn
    batch, length, _ = x.shape
    family = _FAMILIES[_family_name(config)]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_heads = config.num_attention_heads
    num_kv = config.num_key_value_heads
    scaling = config.query_pre_attn_scalar**-0.5 if family.gemma else head_dim**-0.5
    softcap = getattr(config, "attn_logit_softcapping", None) if family.gemma else None

    q = attn.q_proj(x).view(batch, length, num_heads, head_dim)
    k = attn.k_proj(x).view(batch, length, num_kv, head_dim)
    v = attn.v_proj(x).view(batch, length, num_kv, head_dim)
    if family.qk_norm:
        # Qwen3, Gemma 3: per-head RMSNorm on q and k, then RoPE.
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = _apply_rope(q, cos, sin)
    k = _apply_rope(k, cos, sin)

    if is_router_layer:
        # Router projections read the same normed X as q_proj; no norm, no RoPE.
        q_router = attn.router_q_proj(x).view(batch, length, num_heads, head_dim)
        k_router = attn.router_k_proj(x).view(batch, length, num_kv, head_dim)

    out = torch.zeros(batch, length, num_heads, head_dim, dtype=q.dtype)

    # Padding attends to itself only (its output is never looked at).
    for row in range(batch):
        for col in range(length):
            if int(doc_ids[row, col]) == PAD_ID:
                out[row, col] = attend(
                    q[row, col : col + 1],
                    k[row, col : col + 1],
                    v[row, col : col + 1],
                    torch.ones(1, 1, dtype=torch.bool),
                    scaling,
                    softcap,
                )[0]

    layer_scores: list[torch.Tensor | None] = [None] * num_docs
    layer_selected = torch.zeros(num_docs, dtype=torch.bool)

    for ex in examples:
        row = ex.row
        # Prefix: causal within the prefix.
        if ex.prefix:
            idx = torch.tensor(ex.prefix)
            out[row, idx] = attend(q[row, idx], k[row, idx], v[row, idx], causal_mask(len(idx)), scaling, softcap)

        # Documents: causal within their own document only (no prefix).
        for doc in ex.docs:
            idx = torch.tensor(doc.positions_in_row)
            out[row, idx] = attend(q[row, idx], k[row, idx], v[row, idx], causal_mask(len(idx)), scaling, softcap)

        if not ex.query:
            continue  # (documents without routing tokens were rejected at parsing)

        # Memory the query sees in this layer: pooled chunks of selected docs.
        memory_k: list[torch.Tensor] = []
        memory_v: list[torch.Tensor] = []
        if is_router_layer and ex.docs:
            routing_idx = torch.tensor(ex.routing)
            q_r = q_router[row, routing_idx]  # [T, H, D]
            routing_score = getattr(config, "routing_score", "cosine")
            doc_scores: list[torch.Tensor] = []
            doc_chunks: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
            for doc in ex.docs:
                idx = torch.tensor(doc.positions_in_row)
                k_bar = chunk_means(k[row, idx], config.chunk_size)  # K after q/k-norm and RoPE
                v_bar = chunk_means(v[row, idx], config.chunk_size)
                kr_bar = chunk_means(k_router[row, idx], config.chunk_size)
                chunk_scores = [chunk_score(q_r, c, routing_score) for c in kr_bar]
                doc_scores.append(torch.stack(chunk_scores).max())
                doc_chunks.append((k_bar, v_bar))
            chosen = select_top_docs([float(s.detach()) for s in doc_scores], config.top_k_docs)
            for i, doc in enumerate(ex.docs):
                layer_scores[doc.global_index] = doc_scores[i]
            for i in chosen:  # ascending = document order
                layer_selected[ex.docs[i].global_index] = True
                memory_k.extend(doc_chunks[i][0])
                memory_v.extend(doc_chunks[i][1])

        # Query/answer: [all prefix ; pooled memory (all visible) ; causal query].
        pre = torch.tensor(ex.prefix, dtype=torch.long)
        qry = torch.tensor(ex.query)
        keys = [k[row, pre]]
        values = [v[row, pre]]
        if memory_k:
            keys.append(torch.stack(memory_k))
            values.append(torch.stack(memory_v))
        keys.append(k[row, qry])
        values.append(v[row, qry])
        keys_cat = torch.cat(keys)
        values_cat = torch.cat(values)
        n_context = len(ex.prefix) + len(memory_k)
        allowed = torch.zeros(len(ex.query), n_context + len(ex.query), dtype=torch.bool)
        allowed[:, :n_context] = True
        allowed[:, n_context:] = causal_mask(len(ex.query))
        if window is not None:
            longest = max([len(ex.prefix), len(keys_cat)] + [len(d.positions_in_row) for d in ex.docs])
            if longest > window:
                raise ValueError(f"a sliding window of {window} would bind in layer {layer_idx} ({longest} keys)")
        out[row, qry] = attend(q[row, qry], keys_cat, values_cat, allowed, scaling, softcap)

    out = out.reshape(batch, length, num_heads * head_dim)
    if not is_router_layer:
        return out, None, None
    missing = [i for i, s in enumerate(layer_scores) if s is None]
    if missing:
        raise AssertionError(f"documents {missing} were never scored")
    scores = torch.stack(layer_scores) if num_docs else torch.zeros(0, dtype=q.dtype)
    return out, scores, layer_selected


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor, examples: list[_Example]) -> torch.Tensor | None:
    """Mean next-token CE over every predicted token of the batch."""
    losses = []
    for ex in examples:
        tokens = ex.all_tokens()  # consecutive columns of the row
        for i in range(len(tokens) - 1):
            col, nxt = tokens[i], tokens[i + 1]
            target = int(labels[ex.row, nxt])
            if target == IGNORE_INDEX:
                continue
            losses.append(F.cross_entropy(logits[ex.row, col].float()[None], torch.tensor([target])))
    if not losses:
        return None
    return torch.stack(losses).mean()


def _aux_loss_and_recall(
    doc_scores: torch.Tensor,
    examples: list[_Example],
    loss_type: str,
    temperature: float,
) -> tuple[torch.Tensor | None, dict[int, torch.Tensor]]:
    """Contrastive router loss and recall@k of section 5, per (layer, example)."""
    if loss_type not in ("decoupled_infonce", "infonce"):
        raise ValueError(f"unknown aux_loss_type {loss_type!r}")
    num_layers = doc_scores.shape[0]
    pair_losses = []
    recall_sums = {k: [0.0] * num_layers for k in RECALL_KS}
    n_with_positives = 0
    for ex in examples:
        positives = [i for i, d in enumerate(ex.docs) if d.positive]
        negatives = [i for i, d in enumerate(ex.docs) if not d.positive]
        if not positives:
            continue
        n_with_positives += 1
        for layer in range(num_layers):
            s = [doc_scores[layer, d.global_index] / temperature for d in ex.docs]
            terms = []
            for i in positives:
                if loss_type == "decoupled_infonce":
                    # Each positive competes with the negatives only.
                    competitors = [s[i]] + [s[j] for j in negatives]
                else:
                    competitors = list(s)
                terms.append(s[i] - torch.logsumexp(torch.stack(competitors), dim=0))
            pair_losses.append(-torch.stack(terms).mean())

            plain = [float(doc_scores[layer, d.global_index].detach()) for d in ex.docs]
            for k in RECALL_KS:
                top = set(select_top_docs(plain, k))
                recall_sums[k][layer] += len(top & set(positives)) / len(positives)
    if not pair_losses:
        return None, {}
    recall = {k: torch.tensor(v, dtype=torch.float32) / n_with_positives for k, v in recall_sums.items()}
    return torch.stack(pair_losses).mean(), recall


def reference_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    doc_ids: torch.Tensor,
    example_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    aux_labels: torch.Tensor | None = None,
) -> ReferenceOutput:
    """MSA training forward of spec sections 2-5, computed the slow way.

    All inputs are int64 [B, L] (see the module docstring for the conventions).
    The outputs are differentiable: backward through
    `lm_weight * lm_loss + aux_weight * aux_loss` gives parameter gradients.
    """
    config = model.config
    family = _FAMILIES[_family_name(config)]
    batch, length = input_ids.shape
    router_layers = set(config.router_layers)

    examples = _parse_examples(doc_ids, example_ids, labels, aux_labels, config.routing_tokens)
    num_docs = sum(len(ex.docs) for ex in examples)
    positions = _position_ids(examples, batch, length, config.query_position_offset, config.document_positions)

    hidden = model.model.embed_tokens(input_ids)
    if family.gemma:
        # Gemma: embeddings times sqrt(hidden_size), the factor rounded to their dtype.
        hidden = hidden * torch.tensor(config.hidden_size**0.5).to(hidden.dtype)
    global_rope = model.model.rotary_emb(hidden, positions)
    local_rope = model.model.rotary_emb_local(hidden, positions) if family.local_rope else None
    all_hidden = [hidden]
    all_scores: list[torch.Tensor] = []
    all_selected: list[torch.Tensor] = []

    for layer_idx, layer in enumerate(model.model.layers):
        is_router = layer_idx in router_layers
        window = _layer_window(config, layer_idx)
        is_local = family.local_rope and config.layer_types[layer_idx] == SLIDING
        cos, sin = local_rope if is_local else global_rope
        x = layer.input_layernorm(hidden)
        attn_out, scores, selected = _layer_attention(
            layer, x, cos, sin, examples, doc_ids, is_router, config, num_docs, layer_idx, window
        )
        if family.gemma:
            # Gemma: normed attention output into the residual; MLP between pre/post norms.
            hidden = hidden + layer.post_attention_layernorm(layer.self_attn.o_proj(attn_out))
            hidden = hidden + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
        else:
            hidden = hidden + layer.self_attn.o_proj(attn_out)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        all_hidden.append(hidden)
        if is_router:
            all_scores.append(scores)
            all_selected.append(selected)

    logits = model.lm_head(model.model.norm(hidden))
    if family.gemma:
        logits = _softcap(logits, getattr(config, "final_logit_softcapping", None))

    if all_scores:
        doc_scores = torch.stack(all_scores)
        selected_docs = torch.stack(all_selected)
    else:
        doc_scores = torch.zeros(0, num_docs, dtype=hidden.dtype)
        selected_docs = torch.zeros(0, num_docs, dtype=torch.bool)

    lm_loss = _lm_loss(logits, labels, examples) if labels is not None else None
    aux_loss: torch.Tensor | None = None
    recall: dict[int, torch.Tensor] = {}
    if aux_labels is not None and all_scores:
        aux_loss, recall = _aux_loss_and_recall(doc_scores, examples, config.aux_loss_type, config.aux_temperature)

    return ReferenceOutput(
        hidden_states=tuple(all_hidden),
        logits=logits,
        doc_scores=doc_scores,
        selected_docs=selected_docs,
        lm_loss=lm_loss,
        aux_loss=aux_loss,
        recall=recall,
    )


__all__ = [
    "ReferenceOutput",
    "attend",
    "causal_mask",
    "chunk_means",
    "chunk_score",
    "l2_normalize",
    "reference_forward",
    "select_top_docs",
]
