"""Architecture descriptors: what the methods, the checkpoint reader, the formats and the planner
need to know about a decoder block, as data per model family.

A :class:`Family` names, for one family of transformers models (keyed by ``model_type``), the
block's linears and the roles their rows play (q, k, v, o, gate, up, down; a fused linear such as
Phi-3's ``qkv_proj`` stacks several roles), its norms, the LET pairs that are exact for that block
(:class:`Pair`), the attention implementation it needs, and what stays in full precision.
:class:`BlockArch` is a family applied to one config: shapes, concrete LET pairs (row ranges,
head widths), the groups of linears that read one input, and the per-layer attention types.

A model_type with no family falls back to the generic rules (:func:`_generic`): every ``nn.Linear`` inside the
decoder layer is quantized, nothing is paired (RTN, GPTQ, OAC, LWC run as they are; the LET-based
methods run without LET's pairs), and ``BlockArch.unpaired`` says so. Mixture-of-experts blocks
have their own fields (:class:`Experts`) that the next issue fills in; until then a family with
experts is refused with :class:`UnsupportedArchitecture`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lsiq import expert_layout

SCALE_MIN = 1e-5  # LET's scales are clamped to at least this (lsiq.let)
GENERIC = "generic"
ATTN_INPUT = ("q", "k", "v")  # the roles that read the attention block's input
MLP_INPUT = ("gate", "up")  # the roles that read the MLP's input
ROLES = ("q", "k", "v", "o", "gate", "up", "down")


class UnsupportedArchitecture(ValueError):
    """The checkpoint's architecture is not one whose blocks we know how to transform."""


# ---------------------------------------------------------------------------------------- descriptors
@dataclass(frozen=True)
class Pair:
    """One LET pair of a family, symbolically (resolved per config by :meth:`BlockArch.let_pairs`).

    ``kind``:
    - ``"norm"``: the norm module ``source`` feeds the linears of ``targets`` (roles): its weight
      is divided by s, their input columns multiplied (Gemma's x * (1 + w): see Family.norm_offset);
    - ``"heads"``: ``source`` (v) rows divided by s, ``targets[0]`` (o) input columns multiplied,
      s on the KV heads' channels and repeated for each query head of a group (GQA);
    - ``"rotary"``: ``source`` (q) rows divided by s, ``targets[0]`` (k) rows multiplied, one scale
      per rotary pair (d, d + rotary_dim / 2) and one per channel beyond the rotary ones, repeated
      over a KV group's query heads: q.k is unchanged and the scaling commutes with RoPE;
    - ``"channels"``: ``source`` rows divided by s, ``targets[0]`` input columns multiplied (AWQ's
      up -> down: exact because act(gate(x)) * up(x) is linear in up's output).
    ``optional`` pairs are used only when asked for (``--let-down``)."""

    name: str
    kind: str
    source: str
    targets: tuple[str, ...]
    optional: bool = False


@dataclass(frozen=True)
class Experts:
    """A mixture-of-experts MLP: routed experts in fused 3-D parameters, a router kept in full
    precision, optionally shared experts, and, in some families, leading dense layers.

    ``module``: the experts' container (``mlp.experts``), whose parameters ``linears`` names with the
    roles their rows stack per expert (``{"gate_up_proj": ("gate", "up"), "down_proj": ("down",)}``),
    [experts, out, in], or [experts, in, out] with ``transposed``; ``interleaved``: gate and up rows
    alternate (gpt-oss) instead of being stacked; a ``{param}_bias`` [experts, out] is carried in
    full precision where the family has one. ``names``: each role's per-expert linear in checkpoints
    and in our output (``mlp.experts.{e}.gate_proj``; Mixtral ``w1``/``w3``/``w2``), ``renames``:
    module prefixes the checkpoints spell otherwise (Mixtral's ``block_sparse_moe.``). ``router``:
    the routing module (its weight kept in full precision); ``count``, ``width`` and ``top_k``: the
    config attributes of the number of routed experts, one expert's intermediate size and the
    experts each token is routed to. ``shared``: a shared expert's linears (a dense MLP beside the
    routed ones), ``shared_count`` the config attribute of how many experts wide it is. ``dense``:
    the linears of the layers that have a dense MLP instead (DeepSeek's first_k_dense_replace,
    Qwen3-MoE's mlp_only_layers). ``down_pair``: the up -> down LET pair is exact per expert (the
    MLP is act(gate) * up; gpt-oss clamps and offsets up: not). ``mlp_tuple``: the MLP returns
    (hidden states, router scores) (gpt-oss)."""

    module: str
    linears: Mapping[str, tuple[str, ...]]
    router: str
    count: str
    width: str
    layout: str = "fused3d"
    top_k: str = "num_experts_per_tok"
    names: Mapping[str, str] = field(default_factory=lambda: {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    renames: tuple[tuple[str, str], ...] = ()
    transposed: bool = False
    interleaved: bool = False
    shared: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    shared_count: str | None = None
    dense: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    down_pair: bool = True
    mlp_tuple: bool = False

    @property
    def mlp(self) -> str:
        """The MoE MLP module (the router's and the experts' parent): its input is what every expert reads."""
        return self.module.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Family:
    """One model family's decoder block, as data (module names relative to the decoder layer).

    ``linears``: every quantized linear, in forward order, with the roles its rows stack in row
    order (``{"self_attn.qkv_proj": ("q", "k", "v")}`` for a fused one). ``norms``: every norm of
    the block (carried unchanged unless a pair folds LET's scales into it); ``qk_norms``: norms
    applied to q and k after the projection (Qwen3's and Gemma 3's per head, OLMo 2's over the whole
    projection), which would undo the rotary pair's scales, so such families leave it out.
    ``norm_offset``: the norm computes x_hat * (norm_offset + w) (Gemma: 1). ``let_pairs``: the
    pairs exact for this block (lsiq.let applies them; :func:`standard_pairs` builds the usual ones).
    ``attn_implementation``: what the skeleton and every calibrator use (Gemma 2 needs eager for
    its logit soft-capping). ``keep_fp``: modules never quantized (MoE routers). ``unsupported``:
    when set, the reason the family is refused. ``native_only``: when set, why no serving stack loads
    this family's quantized output in the gptq or compressed-tensors layouts (only ``native`` is written)."""

    name: str
    model_types: tuple[str, ...]
    linears: Mapping[str, tuple[str, ...]]
    norms: tuple[str, ...]
    let_pairs: tuple[Pair, ...]
    qk_norms: tuple[str, ...] = ()
    norm_offset: float = 0.0
    attn_implementation: str = "sdpa"
    layers: str = "model.layers"
    keep_fp: tuple[str, ...] = ()
    experts: Experts | None = None
    unsupported: str = ""
    native_only: str = ""

    def role_linear(self, role: str) -> str:
        for name, roles in self.linears.items():
            if role in roles:
                return name
        raise KeyError(f"family {self.name} has no linear with role {role!r}")


def standard_pairs(attn_norm: str | None = "input_layernorm", mlp_norm: str | None = "post_attention_layernorm",
                   rotary: bool = True) -> tuple[Pair, ...]:
    """The LET pairs of a pre-norm block with q/k/v/o attention and a gated MLP: the attention's
    norm -> q/k/v ("qkv"), the MLP's norm -> gate/up ("fc1"), v -> o ("out"), the rotary q/k pair
    ("qk"; ``rotary=False`` leaves it out) and the optional up -> down ("down"). A norm of None (a
    block with post-norms only) has no pair."""
    pairs = []
    if attn_norm:
        pairs.append(Pair("qkv", "norm", attn_norm, ATTN_INPUT))
    if mlp_norm:
        pairs.append(Pair("fc1", "norm", mlp_norm, MLP_INPUT))
    pairs.append(Pair("out", "heads", "v", ("o",)))
    if rotary:
        pairs.append(Pair("qk", "rotary", "q", ("k",)))
    pairs.append(Pair("down", "channels", "up", ("down",), optional=True))
    return tuple(pairs)


SEPARATE_LINEARS: dict[str, tuple[str, ...]] = {
    "self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",), "self_attn.v_proj": ("v",), "self_attn.o_proj": ("o",),
    "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",),
}
PRE_NORMS = ("input_layernorm", "post_attention_layernorm")

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` the descriptor of each of its model types (its module goes in lsiq.archs.MODULES)."""
    for mt in family.model_types:
        if mt in _REGISTRY:
            raise ValueError(f"model_type {mt!r} already has the family {_REGISTRY[mt].name}")
        _REGISTRY[mt] = family
    return family


def family_for(model_type: str | None) -> Family | None:
    """The registered family of ``model_type`` (None: the generic fallback applies)."""
    importlib.import_module("lsiq.archs")  # registers every family module
    return _REGISTRY.get(model_type or "")


def supported_model_types() -> list[str]:
    importlib.import_module("lsiq.archs")
    return sorted(mt for mt, f in _REGISTRY.items() if not f.unsupported)


# ---------------------------------------------------------------------------------------- concrete pairs
@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a linear of ``total`` rows (all of them for an unfused linear)."""

    linear: str
    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def scale(self, t: dict[str, torch.Tensor], s: torch.Tensor) -> None:
        """Multiply these rows of the weight (and bias) in ``t`` by ``s`` (absent tensors skipped)."""
        if f"{self.linear}.weight" not in t and f"{self.linear}.bias" not in t:
            return
        if self.size != self.total:  # the other rows of a fused linear times exactly 1
            s = torch.cat([s.new_ones(self.start), s, s.new_ones(self.total - self.stop)])
        _mul(t, f"{self.linear}.weight", s[:, None])
        _mul(t, f"{self.linear}.bias", s)


@dataclass(frozen=True)
class NormPair:
    """A norm's weight (and bias) / s, the input columns of ``linears`` x s (s over its channels)."""

    name: str
    norm: str
    linears: tuple[str, ...]
    width: int
    offset: float = 0.0
    optional: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.width,)

    def apply(self, t: dict[str, torch.Tensor], s: torch.Tensor) -> None:
        key = f"{self.norm}.weight"
        if key in t:  # the norm multiplies by (offset + w): (offset + w) / s = offset + w'
            t[key] = t[key] / s if not self.offset else (t[key] + self.offset) / s - self.offset
        _mul(t, f"{self.norm}.bias", 1 / s)
        for name in self.linears:
            _mul(t, f"{name}.weight", s)


@dataclass(frozen=True)
class ChannelPair:
    """``src`` rows / s, the input columns of ``dst`` x s, s of ``src.size`` channels in blocks of
    ``width`` each repeated ``groups`` times along dst's input (GQA's query heads per KV head)."""

    name: str
    src: Rows
    dst: str
    width: int
    groups: int = 1
    optional: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.src.size,)

    def expand(self, s: torch.Tensor) -> torch.Tensor:
        """s on the source's channels -> s on the destination's input channels."""
        return s.view(-1, self.width).repeat_interleave(self.groups, dim=0).reshape(-1)

    def apply(self, t: dict[str, torch.Tensor], s: torch.Tensor) -> None:
        self.src.scale(t, 1 / s)
        _mul(t, f"{self.dst}.weight", self.expand(s))


@dataclass(frozen=True)
class QKPair:
    """q rows / s, k rows x s, per KV head: s shared by each rotary pair (d, d + rotary_dim / 2)
    so that it commutes with RoPE, one per channel beyond ``rotary_dim``, repeated over the
    ``groups`` query heads that read a KV head."""

    name: str
    q: Rows
    k: Rows
    kv_heads: int
    head_dim: int
    rotary_dim: int
    groups: int
    optional: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.kv_heads, self.head_dim - self.rotary_dim // 2)

    def apply(self, t: dict[str, torch.Tensor], s: torch.Tensor) -> None:
        half = self.rotary_dim // 2
        if half * 2 == self.head_dim:  # every channel rotated
            s_kv = torch.cat([s, s], dim=-1)  # [kv_heads, head_dim]
        else:
            s_kv = torch.cat([s[:, :half], s[:, :half], s[:, half:]], dim=-1)
        self.k.scale(t, s_kv.reshape(-1))
        self.q.scale(t, 1 / s_kv.repeat_interleave(self.groups, dim=0).reshape(-1))


LetPair = NormPair | ChannelPair | QKPair


def _mul(t: dict[str, torch.Tensor], key: str, s: torch.Tensor) -> None:
    if key in t:
        t[key] = t[key] * s


# ---------------------------------------------------------------------------------------- BlockArch
@dataclass(frozen=True)
class BlockArch:
    """A family applied to one model's shapes: what the methods read of a decoder block.

    Built by :meth:`from_config` (which also reads the layer's module tree: ``tensors`` and, for
    the generic fallback, ``found_linears``), or from the shapes alone for a registered model_type
    (the planner's tests: ``BlockArch("llama", 4096, 11008, 32, 32, 128, 32)``)."""

    model_type: str
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    num_layers: int
    vocab_size: int = 0  # the LM head's width (the planner's OAC head); 0 when unknown
    rotary_dim: int = 0  # channels of each head that RoPE rotates (0: all, head_dim)
    layer_types: tuple[str, ...] = ()  # config.layer_types (sliding / full attention), when the config has them
    # every tensor of one decoder layer as the model's own class builds it: (name, shape)
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()
    found_linears: tuple[tuple[str, int, int], ...] = ()  # generic fallback: the layer's nn.Linears (name, out, in)
    generic: bool = False
    attn_impl: str = ""  # generic fallback: sdpa when the model class supports it, else eager
    # mixture-of-experts families (Family.experts): which layer this describes ("moe", or "dense" for
    # a leading dense layer), every layer's kind, the experts' dimensions and each kind's tensors
    kind: str = ""
    layer_kinds: tuple[str, ...] = ()
    experts: int = 0  # routed experts per MoE layer
    expert_width: int = 0  # one expert's intermediate size
    top_k: int = 0  # experts each token is routed to
    shared_width: int = 0  # the shared experts' intermediate size (0: none)
    kind_tensors: tuple[tuple[str, tuple[tuple[str, tuple[int, ...]], ...]], ...] = ()
    # multi-head latent attention (DeepSeek-V3): q_lora_rank, kv_lora_rank, qk_nope_head_dim,
    # qk_rope_head_dim, v_head_dim
    mla: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        fam = None if self.generic else family_for(self.model_type)
        if fam is None and not self.generic:
            raise UnsupportedArchitecture(f"unsupported architecture: model_type={self.model_type!r} has no family "
                                          f"descriptor; known: {', '.join(supported_model_types())}")
        if fam is not None and fam.unsupported:
            raise UnsupportedArchitecture(f"unsupported architecture: model_type={self.model_type!r}: {fam.unsupported}")
        object.__setattr__(self, "family", fam)
        if fam is not None and fam.experts is not None and not self.kind:
            object.__setattr__(self, "kind", "moe")
        if self.kind and not self.tensors and self.kind_tensors:
            object.__setattr__(self, "tensors", dict(self.kind_tensors).get(self.kind, ()))
        object.__setattr__(self, "_layers", {})
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if fam is None:
            linears = {n: (o, i) for n, o, i in self.found_linears}
        else:
            linears = self._family_linears(fam)
        object.__setattr__(self, "_shapes", linears)

    # ------------------------------------------------------------------ from a config
    @classmethod
    def from_config(cls, config: Any) -> BlockArch:
        """The block of a transformers config; refuses (UnsupportedArchitecture, saying what is
        missing) what neither a family nor the generic fallback can quantize."""
        model_type = getattr(config, "model_type", None)
        fam = family_for(model_type)
        if fam is not None and fam.unsupported:
            raise UnsupportedArchitecture(f"unsupported architecture: model_type={model_type!r}: {fam.unsupported}")
        dims = _dims(config)
        layer_types = tuple(getattr(config, "layer_types", None) or ())
        if fam is None:
            return _generic(config, model_type, dims, layer_types)
        if fam.experts is not None:
            return _moe(cls, config, fam, dims, layer_types)
        layer = meta_decoder_layer(config)
        tensors = tuple((n, tuple(p.shape)) for n, p in layer.state_dict(keep_vars=True).items())
        arch = cls(model_type=model_type, **dims, layer_types=layer_types, tensors=tensors)
        arch._check_module_tree(layer)
        return arch

    def _check_module_tree(self, layer: nn.Module) -> None:
        """The family's names and shapes against the model's own decoder layer (a clear error if a
        transformers version or a config variant builds something else)."""
        fam = self.family
        found = {n: (m.out_features, m.in_features) for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        found = {n: s for n, s in found.items() if not any(n == k or n.startswith(k + ".") for k in fam.keep_fp)}
        expected = {n: s for n, s in self._shapes.items() if n not in self.expert_linears()}
        if set(found) != set(expected):
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={self.model_type!r}: the {fam.name} descriptor expects the "
                f"linears {sorted(expected)} but {type(layer).__name__} has {sorted(found)}")
        for name, shape in expected.items():
            if found[name] != shape:
                raise UnsupportedArchitecture(
                    f"unsupported architecture: model_type={self.model_type!r}: {name} is {list(found[name])} in "
                    f"{type(layer).__name__}, the {fam.name} descriptor computes {list(shape)} from the config")
        names = {n for n, _ in layer.named_modules()}
        missing = [n for n in (*fam.norms, *fam.qk_norms) if n not in names]
        if missing:
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={self.model_type!r}: {type(layer).__name__} has no "
                f"{', '.join(missing)}, which the {fam.name} descriptor names")
        allowed = {f"{n}.weight" for n in self._shapes if n in found} | set(self._expert_tensors(layer))
        allowed |= {f"{k}.weight" for k in fam.keep_fp}
        others = [(n, s) for n, s in self.tensors if len(s) > 1 and n not in allowed]
        if others:
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={self.model_type!r}: {type(layer).__name__} holds weights "
                f"outside its descriptor's linears: {', '.join(f'{n} {list(s)}' for n, s in others)}")

    def _expert_tensors(self, layer: nn.Module) -> dict[str, tuple[int, ...]]:
        """The experts' fused parameters this layer must hold, checked against the descriptor's shapes."""
        ex = self.family.experts if self.family is not None else None
        if ex is None or self.kind != "moe":
            return {}
        params = dict(layer.named_parameters())
        out = {}
        for param, rs in ex.linears.items():
            w_out = sum(self._role_size(r, self.expert_width) for r in rs)
            w_in = {self._role_input(r, self.expert_width) for r in rs}.pop()
            shape = (self.experts, w_in, w_out) if ex.transposed else (self.experts, w_out, w_in)
            name = f"{ex.module}.{param}"
            if name not in params or tuple(params[name].shape) != shape:
                found = list(params[name].shape) if name in params else "nothing"
                raise UnsupportedArchitecture(
                    f"unsupported architecture: model_type={self.model_type!r}: the {self.family.name} descriptor "
                    f"expects {name} of shape {list(shape)}, {type(layer).__name__} has {found}")
            out[name] = shape
            if f"{name}_bias" in params:
                out[f"{name}_bias"] = (self.experts, w_out)
        return out

    # ------------------------------------------------------------------ layers of a mixture of experts
    def for_layer(self, index: int) -> BlockArch:
        """The arch of decoder layer ``index``: itself, except in mixture-of-experts families whose
        leading layers have a dense MLP (DeepSeek-V3's first_k_dense_replace)."""
        if not self.layer_kinds:
            return self
        kind = self.layer_kinds[index]
        if kind == self.kind:
            return self
        if kind not in self._layers:
            self._layers[kind] = dataclasses.replace(self, kind=kind, tensors=dict(self.kind_tensors)[kind])
        return self._layers[kind]

    def kinds(self) -> list[tuple[BlockArch, int]]:
        """Each distinct layer arch and how many layers have it (one entry for a uniform model)."""
        if not self.layer_kinds:
            return [(self, self.num_layers)]
        order = list(dict.fromkeys(self.layer_kinds))
        first = {k: self.layer_kinds.index(k) for k in order}
        return [(self.for_layer(first[k]), self.layer_kinds.count(k)) for k in order]

    @property
    def moe(self) -> bool:
        """This layer routes its tokens to experts (a mixture-of-experts MLP)."""
        return self.kind == "moe"

    def expert_linears(self) -> dict[str, tuple[int, str]]:
        """Each routed expert's linear (checkpoint name) -> (expert, role); empty for a dense layer."""
        if not self.moe:
            return {}
        if "experts" not in self._layers:
            self._layers["experts"] = expert_layout.expert_linears(self.family.experts, self.experts)
        return self._layers["experts"]

    @property
    def shared_linears(self) -> tuple[str, ...]:
        """The shared experts' linears of a mixture-of-experts layer."""
        return tuple(self.family.experts.shared) if self.moe else ()

    def to_module(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A block's tensors under checkpoint names (per-expert or fused experts, the Hub's prefixes)
        as the decoder layer holds them (lsiq.expert_layout); unchanged for a dense family."""
        if self.family is None or self.family.experts is None:
            return tensors
        return expert_layout.to_module(self.family.experts, tensors, self.experts)

    def checkpoint_layouts(self) -> dict[str, list[dict[str, tuple[int, ...]]]]:
        """For every tensor of the layer (module name), the sets of checkpoint tensors (names and
        shapes) that can hold it, the Hub's layout first (lsiq.expert_layout.checkpoint_layouts)."""
        shapes = self.tensor_shapes()
        if self.family is None or self.family.experts is None:
            return {n: [{n: s}] for n, s in shapes.items()}
        return {n: expert_layout.checkpoint_layouts(self.family.experts, n, s, self.experts) for n, s in shapes.items()}

    def checkpoint_name(self, name: str) -> str:
        """A tensor of the layer (module name) as checkpoints and our output name it."""
        if self.family is None or self.family.experts is None:
            return name
        return expert_layout.checkpoint_name(self.family.experts, name)

    def weights(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Every quantized linear's 2-D weight in ``layer`` (views of the fused experts' slices)."""
        out = {}
        experts = self.expert_linears()
        fused = {}
        if experts:
            ex = self.family.experts
            params = dict(layer.named_parameters())
            fused = expert_layout.split(ex, {f"{ex.module}.{p}": params[f"{ex.module}.{p}"].detach() for p in ex.linears})
        for name in self.linears:
            out[name] = fused[f"{name}.weight"] if name in experts else layer.get_submodule(name).weight.detach()
        return out

    # ------------------------------------------------------------------ what the methods read
    @property
    def kv_groups(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def name(self) -> str:
        """The family's name (``generic`` for the fallback)."""
        return self.family.name if self.family is not None else GENERIC

    @property
    def linears(self) -> tuple[str, ...]:
        """Every quantized linear of the block (module names relative to it), in forward order."""
        return tuple(self._shapes)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """[out, in] of every linear in the block."""
        return dict(self._shapes)

    @property
    def norms(self) -> tuple[str, ...]:
        """The block's norms (with q/k norms), carried unchanged unless LET folds scales into them."""
        return (*self.family.norms, *self.family.qk_norms) if self.family is not None else ()

    @property
    def qk_norm(self) -> bool:
        """q and k pass a norm after their projection (the rotary LET pair is left out)."""
        return bool(self.family is not None and self.family.qk_norms)

    @property
    def attn_implementation(self) -> str:
        """The attention implementation every process builds the model with."""
        return self.family.attn_implementation if self.family is not None else self.attn_impl or "sdpa"

    @property
    def keep_fp(self) -> tuple[str, ...]:
        return self.family.keep_fp if self.family is not None else ()

    @functools.cached_property
    def _roles(self) -> dict[str, tuple[str, ...]]:
        """The layer's linears other than the routed experts (attention, a dense or shared MLP) and
        the roles their rows play, in forward order."""
        fam = self.family
        out = dict(fam.linears)
        if fam.experts is not None:
            out |= dict(fam.experts.dense) if self.kind == "dense" else dict(fam.experts.shared)
        return out

    def role_linear(self, role: str) -> str:
        """The linear (other than a routed expert) whose rows play ``role``."""
        for name, rs in self._roles.items():
            if role in rs:
                return name
        raise KeyError(f"family {self.family.name} has no linear with role {role!r} in a {self.kind or 'dense'} layer")

    @functools.cached_property
    def input_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that read one and the same input, in forward order (one Hessian each for GPTQ;
        one LET scale on their input columns). The generic fallback knows of none: one per linear.
        A routed expert's gate and up read the MLP's input (one group per expert)."""
        if self.family is None:
            return tuple((n,) for n in self._shapes)
        has = {r for roles in self._roles.values() for r in roles}
        groups: list[tuple[str, ...]] = []
        for roles in (ATTN_INPUT + ("q_a", "kv_a"), ("q_b",), ("kv_b",), ("o",), MLP_INPUT, ("down",)):
            names = tuple(dict.fromkeys(self.role_linear(r) for r in roles if r in has))
            if names:
                groups.append(names)
        by_expert: dict[int, dict[str, list[str]]] = {}
        for name, (e, role) in self.expert_linears().items():
            by_expert.setdefault(e, {}).setdefault("down" if role == "down" else "in", []).append(name)
        for parts in by_expert.values():
            groups += [tuple(parts["in"]), tuple(parts["down"])]
        covered = [n for g in groups for n in g]
        return tuple(groups) + tuple((n,) for n in self._shapes if n not in covered)

    def role_rows(self, role: str) -> Rows:
        """Where ``role``'s rows are: its linear and the row range (all rows unless fused)."""
        name = self.role_linear(role)
        start = 0
        for r in self._roles[name]:
            if r == role:
                return Rows(name, start, start + self._role_size(r), self._shapes[name][0])
            start += self._role_size(r)
        raise KeyError(role)

    @functools.cached_property
    def let_pairs(self) -> tuple[LetPair, ...]:
        """The family's LET pairs, concrete for these shapes, in the order LET applies them (a
        DeepSeek dense layer adds its MLP's pairs; a mixture-of-experts layer's are its attention's)."""
        if self.family is None:
            return ()
        pairs = self.family.let_pairs
        if self.kind == "dense":
            pairs = pairs + (Pair("fc1", "norm", "post_attention_layernorm", MLP_INPUT),
                             Pair("down", "channels", "up", ("down",), optional=True))
        out: list[LetPair] = []
        for p in pairs:
            if p.kind == "norm":
                names = tuple(dict.fromkeys(self.role_linear(r) for r in p.targets))
                out.append(NormPair(p.name, p.source, names, self._shapes[names[0]][1], self.family.norm_offset,
                                    p.optional))
            elif p.kind == "heads":
                out.append(ChannelPair(p.name, self.role_rows(p.source), self.role_linear(p.targets[0]),
                                       self.head_dim, self.kv_groups, p.optional))
            elif p.kind == "rotary":
                out.append(QKPair(p.name, self.role_rows(p.source), self.role_rows(p.targets[0]), self.n_kv_heads,
                                  self.head_dim, self.rotary_dim, self.kv_groups, p.optional))
            elif p.kind == "channels":
                src = self.role_rows(p.source)
                out.append(ChannelPair(p.name, src, self.role_linear(p.targets[0]), src.size, 1, p.optional))
            else:
                raise ValueError(f"family {self.family.name}: unknown LET pair kind {p.kind!r}")
        return tuple(out)

    def let_parameters(self, down: bool = False) -> int:
        """LET's learned scales for one block (``down``: with the optional pairs)."""
        return sum(math.prod(p.shape) for p in self.let_pairs if down or not p.optional)

    @property
    def unpaired(self) -> str:
        """What could not be paired, for the generic fallback's warning ('' for a family)."""
        if self.family is not None:
            return ""
        return (f"model_type {self.model_type!r} has no family descriptor: quantizing the {len(self._shapes)} "
                f"nn.Linear modules found in its decoder layer ({', '.join(self._shapes)}) with no LET pairs "
                "(norm -> linears, v -> o, q/k, up -> down could not be paired: the LET-based methods run without "
                "them) and one GPTQ Hessian per linear; add a descriptor in lsiq/archs/ to pair them")

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of one block and its shape (what a checkpoint must hold per layer)."""
        if self.tensors:
            return dict(self.tensors)
        return {f"{n}.weight": s for n, s in self._shapes.items()} | {f"{n}.weight": (self.hidden,)
                                                                      for n in (self.family.norms if self.family else ())}

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if i < len(self.layer_types) else "all"

    # ------------------------------------------------------------------ shapes from the roles
    def _role_size(self, role: str, width: int | None = None) -> int:
        """Rows of ``role`` (``width``: the MLP's intermediate size, default the dense one)."""
        width = width or self.intermediate
        mla = {}
        if self.mla:
            q_lora, kv_lora, nope, rope, v = self.mla
            mla = {"q_a": q_lora, "q_b": self.n_heads * (nope + rope), "kv_a": kv_lora + rope,
                   "kv_b": self.n_heads * (nope + v)}
        return mla.get(role) or {"q": self.n_heads * self.head_dim, "k": self.n_kv_heads * self.head_dim,
                                 "v": self.n_kv_heads * self.head_dim, "o": self.hidden, "gate": width,
                                 "up": width, "down": self.hidden}[role]

    def _role_input(self, role: str, width: int | None = None) -> int:
        width = width or self.intermediate
        o_in = self.n_heads * (self.mla[4] if self.mla else self.head_dim)
        mla = {"q_b": self.mla[0], "kv_b": self.mla[1]} if self.mla else {}
        return mla.get(role) or {"o": o_in, "down": width}.get(role, self.hidden)

    def _family_linears(self, fam: Family) -> dict[str, tuple[int, int]]:
        out = {}
        mlp_width = {}
        if fam.experts is not None and self.kind == "moe":
            mlp_width = dict.fromkeys(fam.experts.shared, self.shared_width)
        for name, roles in self._roles.items():
            width = mlp_width.get(name)
            ins = {self._role_input(r, width) for r in roles}
            if len(ins) != 1:
                raise ValueError(f"family {fam.name}: {name} stacks roles with different inputs {roles}")
            out[name] = (sum(self._role_size(r, width) for r in roles), ins.pop())
        for name, (_e, role) in self.expert_linears().items():
            out[name] = (self._role_size(role, self.expert_width), self._role_input(role, self.expert_width))
        return out


# ---------------------------------------------------------------------------------------- from configs
def _dims(config: Any) -> dict[str, int]:
    n_heads = getattr(config, "num_attention_heads", 0) or 0
    hidden = getattr(config, "hidden_size", 0) or 0
    head_dim = getattr(config, "head_dim", None) or (hidden // n_heads if n_heads else 0)
    return {"hidden": hidden, "intermediate": getattr(config, "intermediate_size", 0) or 0, "n_heads": n_heads,
            "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads, "head_dim": head_dim,
            "num_layers": config.num_hidden_layers, "vocab_size": getattr(config, "vocab_size", 0) or 0,
            "rotary_dim": int(head_dim * _partial_rotary(config))}


def _partial_rotary(config: Any) -> float:
    """The fraction of each head that RoPE rotates (Phi-4-mini: 0.75; most: 1)."""
    value = getattr(config, "partial_rotary_factor", None)
    rope = getattr(config, "rope_parameters", None) or {}
    if value is None and isinstance(rope, Mapping):
        if rope and all(isinstance(v, Mapping) for v in rope.values()):  # per layer type (Gemma 3)
            values = {v.get("partial_rotary_factor", 1.0) for v in rope.values()}
            value = values.pop() if len(values) == 1 else None
        else:
            value = rope.get("partial_rotary_factor")
    return float(value if value is not None else 1.0)


def model_class(config: Any) -> type[nn.Module]:
    """transformers' *ForCausalLM class of ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedArchitecture(f"unsupported architecture: model_type={getattr(config, 'model_type', None)!r} "
                                      "has no causal-LM class in transformers") from None


def decoder_layer_class(config: Any) -> type[nn.Module]:
    """The model's own decoder layer class (e.g. LlamaDecoderLayer), by its name in the model's
    ``_no_split_modules``, else through a meta skeleton."""
    cls = model_class(config)
    module = sys.modules[cls.__module__]
    names = [n for n in (cls._no_split_modules or ()) if n.endswith("DecoderLayer") and hasattr(module, n)]
    if len(names) == 1:
        return getattr(module, names[0])
    return type(_meta_layers(config)[0])


def meta_decoder_layer(config: Any, index: int = 0) -> nn.Module:
    """Decoder layer ``index`` of ``config`` on the meta device (its module tree, no memory: also the
    tensors its constructor makes before registering them, such as DeepSeek-V3's 30 GB of fused experts)."""
    from accelerate import init_empty_weights

    with torch.device("meta"), init_empty_weights():
        return decoder_layer_class(config)(config, index)


def attention_implementation(config: Any) -> str:
    """The attention implementation the family needs (sdpa unless its descriptor says otherwise;
    for the generic fallback, sdpa when the model class supports it)."""
    fam = family_for(getattr(config, "model_type", None))
    if fam is not None:
        return fam.attn_implementation
    return "sdpa" if getattr(model_class(config), "_supports_sdpa", False) else "eager"


def _meta_layers(config: Any) -> nn.ModuleList:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation=attention_implementation(config))
    layers = getattr(getattr(model, "model", model), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type={config.model_type!r} (architectures="
            f"{getattr(config, 'architectures', None)}) has no family descriptor, and its model has no model.layers "
            f"ModuleList of decoder layers for the generic fallback; known families: {', '.join(supported_model_types())}")
    return layers


def _moe(cls: type[BlockArch], config: Any, fam: Family, dims: dict[str, int], layer_types: tuple[str, ...]
         ) -> BlockArch:
    """A mixture-of-experts family's arch: its experts' dimensions, the kind of every layer (a
    routed MLP, or a dense one: DeepSeek's first layers, Qwen3-MoE's mlp_only_layers) and each kind's
    tensors, read from the model's own decoder layers on the meta device."""
    ex = fam.experts
    mla: tuple[int, ...] = ()
    if "self_attn.kv_b_proj" in fam.linears:  # multi-head latent attention
        if getattr(config, "q_lora_rank", None) is None:
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={config.model_type!r} with q_lora_rank null (one q_proj instead "
                "of the low-rank q_a_proj / q_b_proj pair) is not described; DeepSeek-V3's layout is")
        mla = (config.q_lora_rank, config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
               config.v_head_dim)
    width = getattr(config, ex.width)
    kinds: list[str] = []
    tensors: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}
    samples: dict[str, nn.Module] = {}
    for i in range(config.num_hidden_layers):
        layer = meta_decoder_layer(config, i)
        kind = "moe" if ex.module in dict(layer.named_modules()) else "dense"
        kinds.append(kind)
        if kind not in tensors:
            tensors[kind] = tuple((n, tuple(p.shape)) for n, p in layer.state_dict(keep_vars=True).items())
            samples[kind] = layer
    arch = cls(model_type=config.model_type, **dims, layer_types=layer_types, kind="moe" if "moe" in tensors else "dense",
               layer_kinds=tuple(kinds), experts=getattr(config, ex.count), expert_width=width,
               top_k=getattr(config, ex.top_k), shared_width=width * getattr(config, ex.shared_count) if ex.shared_count else 0,
               kind_tensors=tuple(tensors.items()), mla=mla)
    for kind, layer in samples.items():
        arch.for_layer(kinds.index(kind))._check_module_tree(layer)
    return arch


def _generic(config: Any, model_type: str, dims: dict[str, int], layer_types: tuple[str, ...]) -> BlockArch:
    """The fallback for a model_type with no family: the nn.Linears of a standard decoder layer."""
    layers = _meta_layers(config)
    first = layers[0]
    tensors = tuple((n, tuple(p.shape)) for n, p in first.state_dict(keep_vars=True).items())
    for i, layer in enumerate(layers):
        other = tuple((n, tuple(p.shape)) for n, p in layer.state_dict(keep_vars=True).items())
        if other != tensors:
            raise UnsupportedArchitecture(
                f"unsupported architecture: model_type={model_type!r} has no family descriptor and its decoder layers "
                f"differ (layer {i} is not built like layer 0), which the generic fallback cannot handle")
    linears = {n: m for n, m in first.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise UnsupportedArchitecture(f"unsupported architecture: model_type={model_type!r}: no nn.Linear in its decoder "
                                      "layer")
    covered = {f"{n}.{p}" for n in linears for p in ("weight", "bias")}
    outside = [(n, s) for n, s in tensors if n not in covered and len(s) > 1]
    if outside:
        raise UnsupportedArchitecture(
            f"unsupported architecture: model_type={model_type!r} has no family descriptor, and its decoder layer "
            f"holds weights outside nn.Linear modules ({', '.join(f'{n} {list(s)}' for n, s in outside)}: fused "
            "expert tensors?) that the generic fallback cannot quantize; it needs a descriptor in lsiq/archs/")
    if not dims["intermediate"]:
        dims = dims | {"intermediate": max(max(m.out_features, m.in_features) for m in linears.values())}
    impl = "sdpa" if getattr(model_class(config), "_supports_sdpa", False) else "eager"
    return BlockArch(model_type=model_type, **dims, layer_types=layer_types, tensors=tensors,
                     found_linears=tuple((n, m.out_features, m.in_features) for n, m in linears.items()),
                     generic=True, attn_impl=impl)


def block_linears(layer: nn.Module) -> list[str]:
    """Names of every nn.Linear inside a decoder layer (relative to it), in module order."""
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
