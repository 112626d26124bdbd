"""Building models without loading a whole checkpoint: skeletons on the meta device, the decoder
layer class for one block, and full models for evaluation (FP or our quantized output)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lsiq.archs import BlockArch, attention_implementation, family_for
from lsiq.archs import decoder_layer_class as _layer_class
from lsiq.capture import decoder_layers
from lsiq.forward import act_quant_hooks
from lsiq.quantizer import QuantSpec
from pipeline import formats, storage

MANIFEST = "lsiq_manifest.json"


def prepare(config: PretrainedConfig) -> PretrainedConfig:
    """Give ``config`` the attention implementation its family needs (lsiq.archs: sdpa, or eager for
    Gemma 2's soft-capped logits), set explicitly so that the captured masks (None = causal for
    sdpa, an additive mask for eager) mean the same in every process; a mixture-of-experts model
    runs its experts eagerly (one linear per routed expert, transformers' reference code, on every
    device). Returns ``config``."""
    config._attn_implementation = attention_implementation(config)
    if _has_experts(config):
        config._experts_implementation = "eager"
    return config


def _has_experts(config: PretrainedConfig) -> bool:
    fam = family_for(getattr(config, "model_type", None))
    return fam is not None and fam.experts is not None


def _experts_kwargs(config: PretrainedConfig) -> dict[str, str]:
    """transformers' model-building keyword for a mixture-of-experts model's experts: eager."""
    return {"experts_implementation": "eager"} if _has_experts(config) else {}


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The model with every parameter on the meta device (buffers such as rotary inv_freq are real)."""
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                attn_implementation=attention_implementation(config),
                                                **_experts_kwargs(config))


def decoder_layer_class(config: PretrainedConfig) -> type[nn.Module]:
    """The model's own decoder layer class (e.g. LlamaDecoderLayer); ``config`` is prepared
    (:func:`prepare`) for the layers built from it."""
    prepare(config)
    return _layer_class(config)


def decoder_layer(layer_cls: type[nn.Module], config: PretrainedConfig, index: int,
                  tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Block ``index`` as an instance of ``layer_cls`` holding ``tensors`` (every tensor required)."""
    prepare(config)
    with init_empty_weights():
        layer = layer_cls(config, index)
    layer.load_state_dict(tensors, strict=True, assign=True)
    return layer.eval()


def with_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put real tensors into a skeleton (assign), leaving the rest on meta."""
    model.load_state_dict(tensors, strict=False, assign=True)
    return model


@contextlib.contextmanager
def local_copy(url: str, storage_options: dict[str, Any] | None = None,
               names: tuple[str, ...] | None = None) -> Iterator[str]:
    """A local directory with the files of ``url`` (itself when local; else a temporary download,
    without the per-block checkpoint records, or of only the top-level ``names`` that exist)."""
    fs, root = storage.filesystem(url, storage_options)
    if storage.is_local(fs):
        yield root
        return
    root = root.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="lsiq-model-") as tmp:
        for p in storage.retrying(lambda: fs.find(root), f"list {url}"):
            rel = p[len(root) + 1:]
            if not rel or rel.startswith("checkpoints/") or (names is not None and rel not in names):
                continue
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with open(dest, "wb") as f:
                f.write(storage.read_all(fs, p))
        yield tmp


def read_manifest(path: str) -> dict[str, Any] | None:
    fs, root = storage.filesystem(path)
    p = storage.join(root, MANIFEST)
    return storage.read_json(fs, p) if fs.exists(p) else None


def load_quantized(path: str) -> tuple[nn.Module, dict[str, Any]]:
    """Our output (any of pipeline.formats) as a plain float model holding the dequantized weights."""
    manifest = read_manifest(path)
    if manifest is None or manifest.get("status") != "complete":
        raise ValueError(f"{path}: no complete {MANIFEST}; the run did not finish")
    try:
        fmt = formats.by_id(manifest.get("format"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    q = manifest["quantization"]
    spec = QuantSpec(q["wbits"], q["group_size"], q["sym"], q.get("zero_min", 0))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        tensors.update(load_file(f))
    state = formats.dequantize_tensors(fmt.NAME, tensors, spec)
    config = AutoConfig.from_pretrained(path)
    state = module_state(config, state)
    model = skeleton(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise ValueError(f"{path}: missing tensors {still_meta[:5]}")
    return model.eval(), manifest


def module_state(config: PretrainedConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole model's float state dict under checkpoint names as the model's modules hold it: each
    mixture-of-experts block's per-expert linears fused (lsiq.expert_layout); unchanged otherwise."""
    if not _has_experts(config):
        return state
    arch = BlockArch.from_config(config)
    out = {k: v for k, v in state.items() if not k.startswith("model.layers.")}
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        block = {k[len(p):]: v for k, v in state.items() if k.startswith(p)}
        out.update({p + k: v for k, v in arch.for_layer(i).to_module(block).items()})
    return out


def load_for_eval(path: str) -> tuple[nn.Module, contextlib.ExitStack]:
    """FP checkpoints through transformers; our output through :func:`load_quantized`. The returned
    ExitStack holds the activation quantizers of weight-activation runs (close it when done)."""
    stack = contextlib.ExitStack()
    if read_manifest(path) is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                    **_experts_kwargs(AutoConfig.from_pretrained(path))).eval(), stack
    model, manifest = load_quantized(path)
    abits = manifest["quantization"]["abits"]
    for layer in decoder_layers(model):
        stack.enter_context(act_quant_hooks(layer, abits))
    return model, stack
