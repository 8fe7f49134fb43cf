"""Micro-batches built ahead in a background thread, so row assembly and layout building
overlap the accelerator's work instead of running between steps.

Resuming stays exact: every prefetched micro-batch carries the loader state right after it,
and `state_dict()` reports the state after the last micro-batch actually consumed.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch

from .data_stream import MicroBatch, MicroBatchStream

_STOP_POLL_SECONDS = 0.1


class PrefetchingStream:
    """Wraps a `MicroBatchStream`; `next()` hands out micro-batches built `depth` ahead.

    On a CUDA device the micro-batches are pinned in the background too, so that the copy
    to the device can run asynchronously.
    """

    def __init__(self, stream: MicroBatchStream, device: torch.device, depth: int = 2) -> None:
        self.stream = stream
        self.pin = device.type == "cuda"
        self.queue: queue.Queue[tuple[MicroBatch, dict[str, Any]] | BaseException] = queue.Queue(depth)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.consumed_state = stream.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.thread is not None:
            raise RuntimeError("the prefetching stream already started; load its state before the first next()")
        self.stream.load_state_dict(state)
        self.consumed_state = self.stream.state_dict()

    def state_dict(self) -> dict[str, Any]:
        """Loader state after the last micro-batch handed out by `next()`."""
        return self.consumed_state

    def next(self) -> MicroBatch:
        if self.thread is None:
            self.thread = threading.Thread(target=self._produce, name="micro-batch-prefetch", daemon=True)
            self.thread.start()
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        batch, self.consumed_state = item
        return batch

    def close(self) -> None:
        """Stop the background thread (it may be blocked waiting for room in the queue)."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                batch = self.stream.next()
                if self.pin:
                    batch = batch.pinned()
                self._put((batch, self.stream.state_dict()))
        except Exception as error:  # handed to the training thread, which raises it
            self._put(error)

    def _put(self, item: tuple[MicroBatch, dict[str, Any]] | BaseException) -> None:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=_STOP_POLL_SECONDS)
                return
            except queue.Full:
                continue
