"""Per-token layout helpers shared by the loader and its tests."""

from __future__ import annotations

import numpy as np

PREFIX_DOC_ID = -2
PADDING_DOC_ID = -1
QUERY_DOC_ID = 0
IGNORE_LABEL = -100


def compute_position_ids(doc_ids: np.ndarray, example_ids: np.ndarray, query_position_offset: int) -> np.ndarray:
    """Document-wise positions (spec section 4) for one packed row.

    Prefix tokens count 0..T-1, every document restarts at 0, query/answer tokens continue at
    T + query_position_offset, padding is 0. Runs are found from changes of (example, doc id).
    """
    doc_ids = np.asarray(doc_ids, dtype=np.int64)
    example_ids = np.asarray(example_ids, dtype=np.int64)
    length = len(doc_ids)
    positions = np.zeros(length, dtype=np.int64)
    if length == 0:
        return positions
    change = np.ones(length, dtype=bool)
    change[1:] = (doc_ids[1:] != doc_ids[:-1]) | (example_ids[1:] != example_ids[:-1])
    run_starts = np.flatnonzero(change)
    run_index = np.cumsum(change) - 1
    positions = np.arange(length, dtype=np.int64) - run_starts[run_index]
    # Query runs start after the example's prefix length plus the offset.
    for start in run_starts[doc_ids[run_starts] == QUERY_DOC_ID]:
        example = example_ids[start]
        prefix_length = int(np.count_nonzero((example_ids == example) & (doc_ids == PREFIX_DOC_ID)))
        outside = (doc_ids[start:] != QUERY_DOC_ID) | (example_ids[start:] != example)
        end = start + int(np.argmax(outside)) if outside.any() else length
        positions[start:end] += prefix_length + query_position_offset
    positions[doc_ids == PADDING_DOC_ID] = 0
    return positions
