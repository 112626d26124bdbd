"""Capture what a transformers model passes to its decoder layers: the hidden states entering the
first one, and the keyword arguments (rotary position embeddings, attention mask, position ids)
that every layer gets, exactly as the model builds them. Models whose layers differ by attention
type (Gemma 2/3, gpt-oss, Qwen2 with sliding windows: config.layer_types) pass each type its own
mask and, for Gemma 3, its own rotary embeddings; :class:`LayerInputs` keeps one set per type and
gives each block its own. Works on a skeleton whose decoder layers are still on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DROPPED = ("past_key_values", "past_key_value", "cache", "use_cache")  # no KV cache: whole sequences


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """The keyword arguments a model passes to its decoder layers, one set per layer type:
    ``kwargs[types[i]]`` is what layer i gets (besides its hidden states)."""

    kwargs: dict[str, dict[str, Any]]
    types: tuple[str, ...]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.kwargs[self.types[index]]

    def __len__(self) -> int:
        return len(self.types)

    @classmethod
    def uniform(cls, kwargs: dict[str, Any], num_layers: int) -> LayerInputs:
        """The same keyword arguments for every layer (models whose layers all attend alike)."""
        return cls({"all": kwargs}, ("all",) * num_layers)

    def to(self, device: torch.device | str) -> LayerInputs:
        return LayerInputs({t: _to_device(kw, torch.device(device)) for t, kw in self.kwargs.items()}, self.types)


class _Catcher(nn.Module):
    """Stands in for decoder layer ``index``: records its inputs and hands the hidden states on
    unchanged (the real layers may still be on the meta device), stopping after the last layer."""

    def __init__(self, layer: nn.Module, index: int, last: bool, sink: dict[int, tuple[torch.Tensor, dict[str, Any]]]
                 ) -> None:
        super().__init__()
        self.index, self.last, self.sink = index, last, sink
        # Some models read per-layer attributes (e.g. sliding-window type) before calling the layer.
        for attr in ("attention_type", "layer_idx", "layer_type", "is_sliding"):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise RuntimeError("decoder layer received positional arguments besides hidden_states")
        self.sink[self.index] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks of a *ForCausalLM model."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} has no model.layers ModuleList of decoder blocks")
    return layers


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, input_ids: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, LayerInputs]:
    """Return (hidden states [B, L, H] entering layer 0, every layer's keyword arguments).

    The KV cache is switched off and dropped: calibration runs each block on whole sequences.
    Masks come out with a batch dimension of 1 (every sample gets the same one: no padding), so any
    micro-batch of the cached samples can use them. Layers are grouped by config.layer_types when
    the model has them (one set of tensors per type), else all share layer 0's inputs; a model that
    passes layers of one group different inputs gets one set per layer. The samples go through
    ``chunk`` at a time (a model builds its masks for the whole batch: [B, 1, L, L])."""
    layers = decoder_layers(model)
    originals = list(layers)
    hidden = []
    for start in range(0, input_ids.shape[0], chunk):
        ids = input_ids[start:start + chunk]
        sink: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
        # every layer's inputs from the first chunk; only the hidden states entering layer 0 after it
        catching = originals if start == 0 else originals[:1]
        for i, layer in enumerate(catching):
            layers[i] = _Catcher(layer, i, i == len(catching) - 1, sink)
        try:
            model.model(input_ids=ids, use_cache=False)
        except _Stop:
            pass
        finally:
            for i, layer in enumerate(catching):
                layers[i] = layer
        if len(sink) != len(catching):
            raise RuntimeError(f"the model called {len(sink)} of its {len(originals)} decoder layers")
        hidden.append(sink[0][0])
        if start == 0:
            first = sink
    n = min(chunk, input_ids.shape[0])
    memo: dict[int, Any] = {}  # the model hands every layer of a type the same tensors: cut each once
    per_layer = [_batch_free({k: v for k, v in first[i][1].items() if k not in DROPPED}, n, memo)
                 for i in range(len(originals))]
    config_types = tuple(getattr(getattr(model, "config", None), "layer_types", None) or ())
    names = config_types if len(config_types) == len(originals) else ("all",) * len(originals)
    by_type: dict[str, dict[str, Any]] = {}
    for name, kw in zip(names, per_layer, strict=True):
        if name in by_type and not _same(by_type[name], kw):
            names = tuple(f"layer{i}" for i in range(len(originals)))  # no grouping holds: one set each
            by_type = dict(zip(names, per_layer, strict=True))
            break
        by_type.setdefault(name, kw)
    return torch.cat(hidden) if len(hidden) > 1 else hidden[0], LayerInputs(by_type, names)


def capture_first_layer_inputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return (hidden states [B, L, H], layer kwargs) as the model would pass them to layer 0."""
    hidden, inputs = capture_layer_inputs(model, input_ids)
    return hidden, inputs[0]


def _batch_free(obj: Any, n: int, memo: dict[int, Any]) -> Any:
    """Tensors with a leading batch dimension of ``n`` identical entries cut to one entry (each
    tensor once: ``memo`` by identity)."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            out = obj
            if n > 1 and obj.dim() >= 1 and obj.shape[0] == n:
                if not bool((obj == obj[:1]).all()):
                    raise ValueError("the model built a different layer input for each sample (a padding mask?); "
                                     "calibration needs one that every sample shares")
                out = obj[:1].clone()
            memo[id(obj)] = (obj, out)  # the original kept alive: its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple | list):
        return type(obj)(_batch_free(o, n, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _batch_free(v, n, memo) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool((a == b).all()))
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
