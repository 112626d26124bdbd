"""Capture what a transformers model passes to its first decoder layer: the hidden states and the
keyword arguments (rotary position embeddings, attention mask, position ids), exactly as the
model builds them. Works on a skeleton whose decoder layers are still on the meta device."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    pass


class _Catcher(nn.Module):
    def __init__(self, layer: nn.Module, sink: list[tuple[torch.Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.sink = sink
        # Some models read per-layer attributes (e.g. sliding-window type) before calling the layer.
        for attr in ("attention_type", "layer_idx"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layer received positional arguments besides hidden_states")
        self.sink.append((hidden_states, kwargs))
        raise _Stop


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a *ForCausalLM model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList of decoder blocks")
    return layers


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return (hidden states [B, L, H], layer kwargs) as the model would pass them to layer 0.

    The KV cache is switched off and dropped: calibration runs each block on whole sequences.
    """
    layers = decoder_layers(model)
    sink: list[tuple[torch.Tensor, dict[str, Any]]] = []
    first = layers[0]
    layers[0] = _Catcher(first, sink)
    try:
        model.model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        layers[0] = first
    if not sink:
        raise RuntimeError("the model never called its first decoder layer")
    hidden, kwargs = sink[0]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
    return hidden, kwargs
