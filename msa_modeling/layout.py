"""Token roles of packed MSA rows, validated once and turned into index tensors.

A packed row holds one or more examples `[prefix] [doc 1] ... [doc n] [query + answer]`
(spec section 2). `build_packed_layout` checks the row against that grammar and derives
everything the layers need: document-wise positions, chunk and document indices, the
routing tokens and the shifted LM targets. Building it needs host syncs (data-dependent
sizes), so the data loader can build it on the CPU and move it to the device with
`PackedLayout.to`; the model builds it itself when it is not given one.

Numbering: examples, documents and chunks are numbered in order of appearance over the
flattened batch (row-major), so `doc_scores[:, d]` is the d-th document of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

PREFIX_ID = -2
PAD_ID = -1
QUERY_ID = 0
IGNORE_INDEX = -100

ROLE_PREFIX, ROLE_DOC, ROLE_QUERY, ROLE_PAD = 0, 1, 2, 3


@dataclass
class PackedLayout:
    """Per-token, per-chunk and per-document indices of a packed batch of shape [B, L]."""

    batch_size: int
    row_length: int
    position_ids: torch.Tensor  # [B, L] long
    role: torch.Tensor  # [N] long, N = B*L: ROLE_PREFIX / ROLE_DOC / ROLE_QUERY / ROLE_PAD
    token_example: torch.Tensor  # [N] long, example index, -1 on padding
    token_segment: torch.Tensor  # [N] long, id of the attention segment (prefix, a doc, the query, a pad token)
    token_chunk: torch.Tensor  # [N] long, chunk index of document tokens, -1 elsewhere
    chunk_doc: torch.Tensor  # [C] long, document of each chunk
    chunk_example: torch.Tensor  # [C] long
    chunk_row: torch.Tensor  # [C] long
    chunk_length: torch.Tensor  # [C] float, real tokens in the chunk
    chunk_first_token: torch.Tensor  # [C] long, flat index of each chunk's first token (its tokens are consecutive)
    chunk_size: int  # P, the most tokens a chunk holds
    doc_example: torch.Tensor  # [D] long
    doc_id: torch.Tensor  # [D] long, the doc_ids value of each document
    doc_positive: torch.Tensor  # [D] bool
    example_docs: torch.Tensor  # [E, max_docs] long, documents of each example by id, -1 = none
    routing_token_index: torch.Tensor  # [R] long, flat token indices that route
    routing_token_example: torch.Tensor  # [R] long
    lm_token_index: torch.Tensor  # [T] long, flat indices of tokens whose next token is a target
    lm_targets: torch.Tensor  # [T] long
    prefix_token_index: torch.Tensor  # [N_prefix] long, flat indices of prefix tokens
    query_token_index: torch.Tensor  # [N_query] long, flat indices of query/answer tokens (example after example)
    cu_seqlens: torch.Tensor  # [S+1] int32, segment boundaries over the flat tokens
    example_query_segment: torch.Tensor  # [E] long, the segment holding each example's query
    max_segment_length: int
    max_query_length: int  # the longest query/answer segment
    max_query_context: int  # bound on prefix + chunks + query of one example (varlen max_k)
    has_positives: bool  # some example has a positive document

    @property
    def num_chunks(self) -> int:
        return self.chunk_doc.numel()

    @property
    def num_docs(self) -> int:
        return self.doc_example.numel()

    @property
    def num_examples(self) -> int:
        return self.example_docs.shape[0]

    @property
    def num_segments(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.batch_size * self.row_length

    def to(self, device: torch.device | str) -> PackedLayout:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=True)
            if isinstance(getattr(self, f.name), torch.Tensor)
            else getattr(self, f.name)
            for f in fields(self)
        }
        return PackedLayout(**moved)


def _segment_start_index(starts: torch.Tensor) -> torch.Tensor:
    """For each position, the index of the latest `True` in `starts` at or before it."""
    index = torch.arange(starts.numel(), device=starts.device)
    return torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values


def _row_starts(batch_size: int, row_length: int, device: torch.device) -> torch.Tensor:
    starts = torch.zeros(batch_size, row_length, dtype=torch.bool, device=device)
    starts[:, 0] = True
    return starts.flatten()


def _previous(x: torch.Tensor, fill: int) -> torch.Tensor:
    return torch.cat([x.new_full((1,), fill), x[:-1]])


def _check_same_shape(reference: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but input_ids/doc_ids have {tuple(reference.shape)}; "
                "every per-token tensor must be [batch, row_length]"
            )


def _describe(flat_index: int, row_length: int) -> str:
    return f"row {flat_index // row_length}, token {flat_index % row_length}"


def build_packed_layout(
    doc_ids: torch.Tensor,
    *,
    chunk_size: int,
    query_position_offset: int,
    example_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    aux_labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    routing_tokens: str = "prompt",
    document_positions: bool = True,
    require_routing_tokens: bool = True,
) -> PackedLayout:
    """Validate a packed batch and derive its `PackedLayout`.

    Args:
        doc_ids: [B, L] token roles: -2 prefix, 1..n documents, 0 query/answer, -1 padding.
        chunk_size: tokens per pooled chunk (P).
        query_position_offset: query positions start at prefix length + this offset.
        example_ids: [B, L] example of each token when several are packed in a row
            (-1 on padding). `None`: each row is one example.
        labels: [B, L] unshifted LM labels, -100 where nothing is predicted.
        aux_labels: [B, L] 1 on the tokens of positive documents, else 0.
        attention_mask: [B, L] 0 marks padding, like `doc_ids == -1`.
        routing_tokens: `"prompt"` or `"query"` (see `MSAConfig`).
        document_positions: document-wise positions; `False` counts from each example's start.
        require_routing_tokens: raise when an example with documents has no routing token.

    Raises:
        ValueError: naming the row and token of the first violation of the row grammar.
    """
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be [batch, row_length], got shape {tuple(doc_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_same_shape(
        doc_ids, example_ids=example_ids, labels=labels, aux_labels=aux_labels, attention_mask=attention_mask
    )
    batch_size, row_length = doc_ids.shape
    device = doc_ids.device
    flat_doc = doc_ids.reshape(-1).long()
    flat_index = torch.arange(flat_doc.numel(), device=device)
    if bool((flat_doc < PREFIX_ID).any()):
        bad = int((flat_doc < PREFIX_ID).nonzero()[0])
        raise ValueError(
            f"doc_ids must be -2 (prefix), -1 (padding), 0 (query) or a document id >= 1; "
            f"found {int(flat_doc[bad])} at {_describe(bad, row_length)}"
        )
    is_pad = flat_doc == PAD_ID
    if attention_mask is not None:
        is_pad = is_pad | (attention_mask.reshape(-1) == 0)
    if example_ids is None:
        example_key = torch.zeros_like(flat_doc)
    else:
        example_key = example_ids.reshape(-1).long()
        if bool((~is_pad & (example_key < 0)).any()):
            bad = int((~is_pad & (example_key < 0)).nonzero()[0])
            raise ValueError(f"example_ids is negative on a non-padding token at {_describe(bad, row_length)}")
    example_key = torch.where(is_pad, torch.full_like(example_key, -1), example_key)

    role = torch.full_like(flat_doc, ROLE_QUERY)
    role[flat_doc == PREFIX_ID] = ROLE_PREFIX
    role[flat_doc > 0] = ROLE_DOC
    role[is_pad] = ROLE_PAD

    row_start = _row_starts(batch_size, row_length, device)
    if bool((is_pad[:-1] & ~is_pad[1:] & ~row_start[1:]).any()):
        bad = int((is_pad[:-1] & ~is_pad[1:] & ~row_start[1:]).nonzero()[0]) + 1
        raise ValueError(
            f"padding must come at the end of a row; a real token follows padding at {_describe(bad, row_length)}"
        )
    prev_example = _previous(example_key, -1)
    example_start = ~is_pad & (row_start | (example_key != prev_example))
    token_example = torch.cumsum(example_start.long(), 0) - 1
    token_example = torch.where(is_pad, torch.full_like(token_example, -1), token_example)
    num_examples = int(example_start.sum())
    # An example id that reappears later in its row was split in two.
    row_of_token = torch.arange(batch_size * row_length, device=device) // row_length
    pairs = torch.stack([row_of_token[example_start], example_key[example_start]], 1)
    if pairs.numel() and torch.unique(pairs, dim=0).shape[0] != num_examples:
        raise ValueError("an example's tokens are not contiguous: each example_ids value must form one run per row")

    # Roles must run prefix -> documents -> query inside each example.
    same_example = ~example_start & ~is_pad
    prev_role = _previous(role, ROLE_PREFIX)
    out_of_order = same_example & (role < prev_role)
    if bool(out_of_order.any()):
        bad = int(out_of_order.nonzero()[0])
        raise ValueError(
            f"token roles out of order at {_describe(bad, row_length)}: an example must be "
            "[prefix (doc_ids -2)] [documents (1..n)] [query/answer (0)]"
        )
    example_has_query = torch.zeros(num_examples, dtype=torch.bool, device=device)
    is_query = role == ROLE_QUERY
    example_has_query[token_example[is_query]] = True
    if not bool(example_has_query.all()):
        bad_example = int((~example_has_query).nonzero()[0])
        first_token = int((token_example == bad_example).nonzero()[0])
        raise ValueError(
            f"the example starting at {_describe(first_token, row_length)} has no query tokens (doc_ids == 0); "
            "every example needs a question after its memory"
        )

    # Documents: one contiguous run per id, ids increasing along the example.
    is_doc = role == ROLE_DOC
    prev_doc = _previous(flat_doc, 0)
    doc_start = is_doc & (example_start | (flat_doc != prev_doc))
    decreasing = doc_start & same_example & (_previous(role, ROLE_PREFIX) == ROLE_DOC) & (flat_doc <= prev_doc)
    if bool(decreasing.any()):
        bad = int(decreasing.nonzero()[0])
        doc_value = int(flat_doc[bad])
        example_tokens = (token_example == token_example[bad]) & is_doc
        earlier = example_tokens & (flat_index < bad) & (flat_doc == doc_value)
        if bool(earlier.any()):
            raise ValueError(
                f"document {doc_value} is not contiguous: its tokens appear in two separate runs "
                f"(second run starts at {_describe(bad, row_length)})"
            )
        raise ValueError(
            f"document ids must increase along an example; document {doc_value} follows document "
            f"{int(prev_doc[bad])} at {_describe(bad, row_length)}"
        )

    # Attention segments: the prefix, each document, the query of each example; padding
    # tokens are segments of their own so that they attend only to themselves.
    segment_start = is_pad | example_start | (role != prev_role) | doc_start
    token_segment = torch.cumsum(segment_start.long(), 0) - 1
    position_in_segment = flat_index - _segment_start_index(segment_start)

    example_first_token = _segment_start_index(example_start)
    prefix_length = torch.zeros(max(num_examples, 1), dtype=torch.long, device=device)
    prefix_length.index_add_(0, token_example[role == ROLE_PREFIX], torch.ones_like(flat_doc[role == ROLE_PREFIX]))
    if document_positions:
        positions = position_in_segment.clone()
        query_base = prefix_length[token_example.clamp(min=0)] + query_position_offset
        positions = torch.where(is_query, position_in_segment + query_base, positions)
    else:
        positions = flat_index - example_first_token
    positions = torch.where(is_pad, torch.zeros_like(positions), positions)

    # Chunks of P tokens inside each document.
    token_doc = torch.cumsum(doc_start.long(), 0) - 1
    chunk_start = is_doc & (position_in_segment % chunk_size == 0)
    token_chunk = torch.cumsum(chunk_start.long(), 0) - 1
    token_chunk = torch.where(is_doc, token_chunk, torch.full_like(token_chunk, -1))
    chunk_doc = token_doc[chunk_start]
    chunk_example = token_example[chunk_start]
    chunk_row = row_of_token[chunk_start]
    num_chunks = chunk_doc.numel()
    chunk_length = torch.zeros(num_chunks, device=device)
    chunk_length.index_add_(0, token_chunk[is_doc], torch.ones(int(is_doc.sum()), device=device))

    doc_example = token_example[doc_start]
    doc_id = flat_doc[doc_start]
    num_docs = doc_id.numel()
    doc_positive = _document_positives(aux_labels, is_doc, doc_start, token_doc, num_docs, row_length)

    docs_per_example = (
        torch.bincount(doc_example, minlength=num_examples)
        if num_docs
        else torch.zeros(num_examples, dtype=torch.long, device=device)
    )
    max_docs = int(docs_per_example.max()) if num_examples and num_docs else 0
    first_doc_of_example = torch.cumsum(docs_per_example, 0) - docs_per_example
    doc_rank = torch.arange(num_docs, device=device) - first_doc_of_example[doc_example]
    example_docs = torch.full((num_examples, max_docs), -1, dtype=torch.long, device=device)
    example_docs[doc_example, doc_rank] = torch.arange(num_docs, device=device)

    flat_labels = None if labels is None else labels.reshape(-1).long()
    if routing_tokens == "prompt" and flat_labels is not None:
        # The question, as in inference's first round: unlabelled query tokens before the
        # example's first prediction target. Unlabelled text after it (a QA sample's injected
        # document) would let the selection for the answer see the answer's own evidence.
        is_target = is_query & (flat_labels != IGNORE_INDEX)
        first_target = torch.full((max(num_examples, 1),), flat_doc.numel(), dtype=torch.long, device=device)
        first_target.scatter_reduce_(0, token_example[is_target], flat_index[is_target], reduce="amin")
        before_target = flat_index < first_target[token_example.clamp(min=0)]
        routes = is_query & (flat_labels == IGNORE_INDEX) & before_target
    elif routing_tokens in ("prompt", "query"):
        routes = is_query
    else:
        raise ValueError(f"routing_tokens must be 'prompt' or 'query', got {routing_tokens!r}")
    routing_token_index = routes.nonzero().flatten()
    if require_routing_tokens and num_docs:
        has_route = torch.zeros(num_examples, dtype=torch.bool, device=device)
        has_route[token_example[routing_token_index]] = True
        lacking = (docs_per_example > 0) & ~has_route
        if bool(lacking.any()):
            bad_example = int(lacking.nonzero()[0])
            first_token = int((token_example == bad_example).nonzero()[0])
            raise ValueError(
                f"the example starting at {_describe(first_token, row_length)} has documents but no routing tokens: "
                f"with routing_tokens='{routing_tokens}' the question's tokens must carry label -100"
            )

    if flat_labels is None:
        lm_token_index = torch.zeros(0, dtype=torch.long, device=device)
        lm_targets = lm_token_index
    else:
        next_labels = torch.cat([flat_labels[1:], flat_labels.new_full((1,), IGNORE_INDEX)])
        next_same_example = torch.cat(
            [token_example[1:] == token_example[:-1], token_example.new_zeros(1, dtype=torch.bool)]
        )
        predicts = next_same_example & ~is_pad & (next_labels != IGNORE_INDEX)
        lm_token_index = predicts.nonzero().flatten()
        lm_targets = next_labels[lm_token_index]

    segment_lengths = torch.bincount(token_segment, minlength=int(segment_start.sum()))
    cu_seqlens = torch.cat([segment_lengths.new_zeros(1), torch.cumsum(segment_lengths, 0)]).int()
    example_query_segment = torch.zeros(num_examples, dtype=torch.long, device=device)
    example_query_segment[token_example[is_query]] = token_segment[is_query]
    query_length = torch.bincount(token_example[is_query], minlength=num_examples)
    chunks_per_example = torch.bincount(chunk_example, minlength=num_examples)
    query_context = query_length + prefix_length[:num_examples] + chunks_per_example
    is_prefix = role == ROLE_PREFIX

    return PackedLayout(
        batch_size=batch_size,
        row_length=row_length,
        position_ids=positions.view(batch_size, row_length),
        role=role,
        token_example=token_example,
        token_segment=token_segment,
        token_chunk=token_chunk,
        chunk_doc=chunk_doc,
        chunk_example=chunk_example,
        chunk_row=chunk_row,
        chunk_length=chunk_length,
        chunk_first_token=chunk_start.nonzero().flatten(),
        chunk_size=chunk_size,
        doc_example=doc_example,
        doc_id=doc_id,
        doc_positive=doc_positive,
        example_docs=example_docs,
        routing_token_index=routing_token_index,
        routing_token_example=token_example[routing_token_index],
        lm_token_index=lm_token_index,
        lm_targets=lm_targets,
        prefix_token_index=is_prefix.nonzero().flatten(),
        query_token_index=is_query.nonzero().flatten(),
        cu_seqlens=cu_seqlens,
        example_query_segment=example_query_segment,
        max_segment_length=int(segment_lengths.max()),
        max_query_length=int(query_length.max()) if num_examples else 0,
        max_query_context=int(query_context.max()) if num_examples else 0,
        has_positives=bool(doc_positive.any()),
    )


def _document_positives(
    aux_labels: torch.Tensor | None,
    is_doc: torch.Tensor,
    doc_start: torch.Tensor,
    token_doc: torch.Tensor,
    num_docs: int,
    row_length: int,
) -> torch.Tensor:
    if aux_labels is None:
        return torch.zeros(num_docs, dtype=torch.bool, device=is_doc.device)
    flat = aux_labels.reshape(-1).long()
    outside = ~is_doc & (flat != 0)
    if bool(outside.any()):
        bad = int(outside.nonzero()[0])
        raise ValueError(
            f"aux_labels must be 0 outside documents; found {int(flat[bad])} at {_describe(bad, row_length)}"
        )
    if bool(((flat != 0) & (flat != 1)).any()):
        raise ValueError("aux_labels must be 0 or 1")
    if num_docs == 0:  # nothing to index: a row of prefix and question only
        return torch.zeros(0, dtype=torch.bool, device=is_doc.device)
    positive = flat[doc_start].bool()
    inconsistent = is_doc & (flat.bool() != positive[token_doc.clamp(min=0)])
    if bool(inconsistent.any()):
        bad = int(inconsistent.nonzero()[0])
        raise ValueError(f"aux_labels must be constant over each document; it changes at {_describe(bad, row_length)}")
    return positive


def compute_position_ids(
    doc_ids: torch.Tensor,
    example_ids: torch.Tensor | None = None,
    query_position_offset: int = 16,
    document_positions: bool = True,
) -> torch.Tensor:
    """Positions of spec section 4 for rows of `doc_ids` ([L] or [B, L]).

    Prefix 0..T-1; each document 0..len-1; query/answer T + offset + j; padding 0.
    """
    squeeze = doc_ids.dim() == 1
    rows = doc_ids.unsqueeze(0) if squeeze else doc_ids
    examples = None if example_ids is None else (example_ids.unsqueeze(0) if squeeze else example_ids)
    layout = build_packed_layout(
        rows,
        chunk_size=1,
        query_position_offset=query_position_offset,
        example_ids=examples,
        document_positions=document_positions,
        require_routing_tokens=False,
    )
    return layout.position_ids[0] if squeeze else layout.position_ids
