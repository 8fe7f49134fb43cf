"""Activation offload: a layer's saved activations wait for backward in pinned host memory.

An alternative to recomputation for the first layers of a long row. Their activations are
saved first and used last, so the device-to-host copies overlap the rest of the forward pass
and the host-to-device copies overlap the backward of the layers after them. Each layer's
saved tensors are copied out on a side stream as autograd saves them, and copied back on a
second side stream a few layers before backward reaches them (a gradient hook on a later
layer's output starts the copy). Parameters and tensors under `min_bytes` stay where they are.

On the CPU the copies are plain clones, which keeps the bookkeeping testable there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class _SavedOnHost:
    """One saved tensor: its host copy, and its device copy once prefetched."""

    __slots__ = ("host", "device", "copied_out", "on_device", "copied_in", "uses_left")

    def __init__(self, host: torch.Tensor, device: torch.device, copied_out) -> None:
        self.host = host
        self.device = device
        self.copied_out = copied_out  # event: the host copy is complete (CUDA), else None
        self.on_device: torch.Tensor | None = None
        self.copied_in = None  # event: `on_device` is complete (CUDA), else None
        self.uses_left = 1  # saves of this tensor not yet unpacked; the device copy goes with the last


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (e.g. a transposed weight saved by a matmul)."""
    base = tensor if tensor._base is None else tensor._base
    return base.is_leaf and base.requires_grad


class ActivationOffload:
    """Saved-tensor hooks that keep chosen layers' activations in host memory between forward and backward.

    Usage, per training step: `start_step()`, then each offloaded layer's forward inside
    `layer(index)`, and `prefetch_hook(output, index)` on every layer's output.
    """

    def __init__(self, device: torch.device, prefetch_layers: int = 2, min_bytes: int = 1 << 20) -> None:
        self.device = torch.device(device)
        self.prefetch_layers = prefetch_layers
        self.min_bytes = min_bytes
        self.on_cuda = self.device.type == "cuda"
        self.copy_out_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.copy_in_stream = torch.cuda.Stream(self.device) if self.on_cuda else None
        self.layers: dict[int, list[_SavedOnHost]] = {}
        self._seen: dict[tuple, tuple[torch.Tensor, _SavedOnHost]] = {}
        self.offloaded_bytes = 0
        self.late_fetches = 0  # tensors backward needed before their prefetch began

    def start_step(self) -> None:
        """Forget the previous step's host copies (their pinned blocks return to torch's host cache)."""
        self.layers = {}
        self._seen = {}
        self.offloaded_bytes = 0
        self.late_fetches = 0

    @contextlib.contextmanager
    def layer(self, index: int) -> Iterator[None]:
        """Offload what autograd saves inside this block, filed under layer `index`."""
        saved = self.layers.setdefault(index, [])
        self._seen = {}
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: self._pack(t, saved), self._unpack):
                yield
        finally:
            # The layer's device tensors were held until here (see `_pack`); now they may go.
            self._seen = {}

    def prefetch_hook(self, output: torch.Tensor, index: int) -> None:
        """Start bringing back the offloaded layers before `index` once backward reaches layer `index`.

        The hook on layer i's output fires as layer i's backward begins; layers i-1 .. i-k
        (k = `prefetch_layers`) are what backward needs next.
        """
        wanted = [i for i in range(index - self.prefetch_layers, index) if i >= 0]
        if output.requires_grad and wanted:
            output.register_hook(lambda grad: self._prefetch(wanted))

    def _pack(self, tensor: torch.Tensor, saved: list[_SavedOnHost]):
        if (
            tensor.device != self.device
            or _is_parameter(tensor)
            or not tensor.is_contiguous()
            or tensor.numel() * tensor.element_size() < self.min_bytes
        ):
            return tensor
        # The same tensor saved by several ops of the layer (e.g. the normed input of three
        # projections) goes out once. `_seen` holds each tensor until the layer ends, so that no
        # later tensor of the layer can reuse its memory and match its key.
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.dtype,
            tensor._version,
        )
        if key in self._seen:
            entry = self._seen[key][1]
            entry.uses_left += 1
            return entry
        if self.on_cuda:
            produced = torch.cuda.current_stream(self.device).record_event()
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            with torch.cuda.stream(self.copy_out_stream):
                self.copy_out_stream.wait_event(produced)
                host.copy_(tensor, non_blocking=True)
                # The device block may be reused only after the copy has read it.
                tensor.record_stream(self.copy_out_stream)
                copied_out = self.copy_out_stream.record_event()
        else:
            host, copied_out = tensor.detach().clone(), None
        entry = _SavedOnHost(host, tensor.device, copied_out)
        saved.append(entry)
        self._seen[key] = (tensor, entry)
        self.offloaded_bytes += tensor.numel() * tensor.element_size()
        return entry

    def _prefetch(self, indices: list[int]) -> None:
        for index in indices:
            for entry in self.layers.get(index, ()):
                if entry.on_device is None:
                    self._copy_in(entry)

    def _copy_in(self, entry: _SavedOnHost) -> None:
        if not self.on_cuda:
            entry.on_device = entry.host.clone()
            return
        with torch.cuda.stream(self.copy_in_stream):
            self.copy_in_stream.wait_event(entry.copied_out)
            entry.on_device = entry.host.to(entry.device, non_blocking=True)
            entry.copied_in = self.copy_in_stream.record_event()

    def _unpack(self, packed):
        if not isinstance(packed, _SavedOnHost):
            return packed
        if packed.on_device is None:  # not prefetched (or unpacked before): fetch now
            self.late_fetches += 1
            self._copy_in(packed)
        tensor = packed.on_device
        packed.uses_left -= 1
        if packed.uses_left <= 0:
            packed.on_device = None
        if self.on_cuda:
            stream = torch.cuda.current_stream(packed.device)
            stream.wait_event(packed.copied_in)
            tensor.record_stream(stream)
        return tensor
