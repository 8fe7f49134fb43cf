"""How the decoder layers run in training, applied from outside the model: activation checkpointing
(full or selective), activation offload and `torch.compile` of the token-wise blocks.

`MSAModel.forward` is a plain loop over `model.layers`; these functions replace entries of that
list with wrappers that run the same layer another way, as torchtitan's `apply_ac` and
`apply_compile` do. A wrapper shares the layer's parameters, buffers and submodules instead of
registering the layer as a child, so `named_parameters()` and `state_dict()` keep the layer's
own names: checkpoints, exports and parameter-group patterns are the same with or without it.

The module sits beside the model rather than in `train/` because more than the trainer applies
it: Hugging Face's `gradient_checkpointing_enable()` (see `MSAPreTrainedModel`), the benchmarks
and users of the exported model, none of which import the training pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from .attention import keep_attention_kernel_outputs
from .offload import ActivationOffload

# The two-call varlen backend rewrites rows of its first kernel output in place, the same rows
# with the same values in forward and recomputation, so the cached tensor may be mutated.
KEEP_ATTENTION_CONTEXT = functools.partial(
    create_selective_checkpoint_contexts, keep_attention_kernel_outputs, allow_cache_entry_mutation=True
)


class LayerWrapper(nn.Module):
    """A decoder layer run another way, under the layer's own parameter names.

    The wrapper's parameters, buffers and submodules are the layer's (the same dicts), and the
    layer itself is held unregistered, so no name level is added. Other attributes (e.g.
    `after_attention`, which the inference engines call) are read from the layer.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        if isinstance(layer, LayerWrapper):
            raise ValueError(f"layer is already wrapped by {type(layer).__name__}; a layer runs under one policy")
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "_parameters", layer._parameters)
        object.__setattr__(self, "_buffers", layer._buffers)
        object.__setattr__(self, "_non_persistent_buffers_set", layer._non_persistent_buffers_set)
        object.__setattr__(self, "_modules", layer._modules)
        self.training = layer.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def train(self, mode: bool = True) -> LayerWrapper:
        self.layer.training = mode
        return super().train(mode)


class CheckpointedLayer(LayerWrapper):
    """Recomputes the layer in backward (torch's non-reentrant checkpoint) while training;
    with `keep_attention`, the attention kernel's outputs are saved instead (selective)."""

    # Hugging Face's `is_activation_checkpointing` looks for this flag on the model's modules.
    gradient_checkpointing = True

    def __init__(self, layer: nn.Module, keep_attention: bool = False) -> None:
        super().__init__(layer)
        self.keep_attention = keep_attention

    def forward(self, *args: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.layer(*args)
        selective = {"context_fn": KEEP_ATTENTION_CONTEXT} if self.keep_attention else {}
        return checkpoint(self.layer, *args, use_reentrant=False, **selective)


class LayerOffload:
    """The offload state that a model's offloaded layers share: one `ActivationOffload` per
    device, restarted at each training forward (`start_step`)."""

    def __init__(self, prefetch_layers: int, min_bytes: int) -> None:
        self.prefetch_layers = prefetch_layers
        self.min_bytes = min_bytes
        self.current: ActivationOffload | None = None  # this (or the last) training step's

    def start_step(self, device: torch.device) -> None:
        if self.current is None or self.current.device != device:
            self.current = ActivationOffload(device, prefetch_layers=self.prefetch_layers, min_bytes=self.min_bytes)
        self.current.start_step()

    def active(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.current is not None


class OffloadedLayer(LayerWrapper):
    """Keeps what autograd saves inside the layer in pinned host memory while training (see `offload`)."""

    def __init__(self, layer: nn.Module, index: int, offload: LayerOffload) -> None:
        super().__init__(layer)
        self.index = index
        object.__setattr__(self, "offload", offload)  # shared by the model's layers, not a module

    def forward(self, *args: Any) -> Any:
        if not self.offload.active(self):
            return self.layer(*args)
        with self.offload.current.layer(self.index):
            return self.layer(*args)


def _decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`MSAModel`) of an `MSAForCausalLM` or of itself."""
    decoder = getattr(model, "base_model", model)
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layers (expected an MSAModel or MSAForCausalLM)")
    return decoder


def _layer_range(decoder: nn.Module, start: int, count: int | None, what: str) -> range:
    total = len(decoder.layers)
    count = total - start if count is None else count
    if start < 0 or count < 0 or start + count > total:
        raise ValueError(f"{what}: layers {start}..{start + count - 1} but the model has {total} layers")
    return range(start, start + count)


def apply_activation_checkpointing(
    model: nn.Module, layers: int | None = None, keep_attention_layers: int = 0, start: int = 0
) -> None:
    """Recompute decoder layers `start .. start + layers - 1` in backward (`layers=None`: every layer
    from `start`); the first `keep_attention_layers` of them keep their attention kernel's output,
    so backward runs that kernel once (0.5 GiB per layer at 64K tokens for the 4B shape)."""
    decoder = _decoder(model)
    chosen = _layer_range(decoder, start, layers, "activation checkpointing")
    if not 0 <= keep_attention_layers <= len(chosen):
        raise ValueError(
            f"keep_attention_layers={keep_attention_layers} must be between 0 and the {len(chosen)} checkpointed layers"
        )
    for offset, index in enumerate(chosen):
        decoder.layers[index] = CheckpointedLayer(decoder.layers[index], keep_attention=offset < keep_attention_layers)


def apply_activation_offload(
    model: nn.Module, layers: int, prefetch_layers: int = 2, min_bytes: int = 1 << 20
) -> LayerOffload:
    """Keep the saved activations of the first `layers` decoder layers in pinned host memory while
    training; backward brings each back `prefetch_layers` layers ahead of need (more hides the
    copies better, each costs one layer's activations on the device). Tensors under `min_bytes`
    stay on the device. Returns the shared state, whose `current` has the step's counters."""
    decoder = _decoder(model)
    chosen = _layer_range(decoder, 0, layers, "activation offload")
    offload = LayerOffload(prefetch_layers, min_bytes)
    for index in chosen:
        decoder.layers[index] = OffloadedLayer(decoder.layers[index], index, offload)
    if not chosen:
        return offload

    def start_step(module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            offload.start_step(module.embed_tokens.weight.device)

    def prefetch(index: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            if offload.active(module):
                offload.current.prefetch_hook(output[0], index)

        return hook

    decoder.register_forward_pre_hook(start_step)
    # Layer i's output gradient starts bringing back layers i-k .. i-1: every layer that can name
    # an offloaded one gets the hook. Apply offload after checkpointing: the hook then sits on
    # the wrapper, outside the recomputation (inside, it would also run there, to no effect).
    for index in range(1, min(len(decoder.layers), layers + prefetch_layers)):
        decoder.layers[index].register_forward_hook(prefetch(index))
    return offload


def activation_offload_of(model: nn.Module) -> ActivationOffload | None:
    """The offload of the model's latest training step (its byte and late-fetch counters), or
    None when no layer is offloaded or no training step has run."""
    for layer in _decoder(model).layers:
        if isinstance(layer, OffloadedLayer):
            return layer.offload.current
    return None


def remove_activation_checkpointing(model: nn.Module) -> None:
    """Undo `apply_activation_checkpointing`: checkpointed layers run plainly again."""
    decoder = _decoder(model)
    for index, layer in enumerate(decoder.layers):
        if isinstance(layer, CheckpointedLayer):
            decoder.layers[index] = layer.layer


def decoder_layer(layer: nn.Module) -> nn.Module:
    """The decoder layer itself, whether wrapped or not."""
    return layer.layer if isinstance(layer, LayerWrapper) else layer


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` the token-wise parts of every layer (norms, projections, RoPE, residual adds, MLP).

    Their shapes depend only on the row length, so they compile once per length; routing and
    attention, whose sizes follow the data, stay eager. Fusing the norms, RoPE and the MLP's
    activation saves most of their memory traffic on a GPU. Each compiled piece is an instance
    attribute that shadows a method (the norms' `forward`, the seams `project` and
    `after_attention`), which keeps parameter names unchanged and leaves module hooks outside the
    compiled code. `nn.Module.compile` would compile a module's hooks with its forward: on the
    final norm, which DeepSpeed ZeRO-3 hooks as a module of its own, dynamo then traced ZeRO-3's
    parameter release, and with gradients kept across micro-batches (`coalesce_reduction`) that
    trace failed on one H100 (`AssertionError: 1 != 2` from a partitioned parameter's gradient).
    """
    decoder = _decoder(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for wrapped in decoder.layers:
        layer = decoder_layer(wrapped)
        layer.input_layernorm.forward = torch.compile(layer.input_layernorm.forward, dynamic=False)
        layer.self_attn.project = torch.compile(layer.self_attn.project, dynamic=False)
        layer.after_attention = torch.compile(layer.after_attention, dynamic=False)
    decoder.norm.forward = torch.compile(decoder.norm.forward, dynamic=False)
