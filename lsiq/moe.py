"""Calibration of a mixture-of-experts decoder block, in two stages, so that every expert gets data and
a block's experts need not be on the device together.

1. The attention: the block runs with its MLP held out (:func:`mlp_held_out`: the residual stream
   after attention is the output) and the method calibrates the attention's linears on that output
   against the FP block's, as for a dense block (LET's attention pairs included).
2. The MLP: its input on the quantized stream (after the quantized attention and the norm) is
   captured once, with the router's choice for every token. The shared experts (one unit) and the
   routed experts, ``cfg.expert_group`` at a time (:class:`ExpertGroup`), are each calibrated by the
   method on their own outputs against their FP outputs. With all-expert calibration (the default,
   llm-compressor's calibrate-all-experts) every expert sees every token: its Hessian, its LET and
   low-rank statistics and its loss come from all of the block's tokens, not only from those the
   router sends it; with ``cfg.routed_only`` each expert sees its routed tokens only (GPTQModel's
   way). Either way, an expert the router sends fewer than ``cfg.expert_min_tokens`` of the tokens
   (routed only: or none at all) is rounded to nearest instead and named in the result
   (``BlockResult.moe``).
The block's output, its error and the next block's inputs always come from the model's own layer
with the real routed combination of the quantized experts.

Data-parallel workers: the attention stage shares its samples as a dense block does; for the MLP
every worker gathers all samples' MLP inputs and calibrates the units it owns (:func:`unit_owners`,
like the SVDs: lsiq.lsi.svd_owners) on all of them, then each unit's result is broadcast from its
owner. A unit's result does not depend on which worker computed it: the experts' bytes are the
single worker's.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsiq import expert_layout
from lsiq.archs.base import BlockArch, ChannelPair, LetPair, Rows
from lsiq.forward import batches, block_forward, device_of, forward_all, output_errors
from lsiq.parallel import SampleShard, shard_range
from lsiq.quantizer import fake_quant, minmax_scale_zero
from lsiq.results import BlockResult, QuantizedLinear

if TYPE_CHECKING:
    from lsiq.config import CalibConfig


def moe_unsupported(cfg: CalibConfig) -> str | None:
    """What of ``cfg`` a mixture-of-experts block cannot do (one phrase), or None."""
    from lsiq import methods

    if cfg.abits < 16:
        return "weight-activation quantization (--abits below 16: the routed experts' inputs are not quantized at inference)"
    if cfg.cross_layer:
        return "--cross-layer"
    if methods.get(cfg.method).needs_output_grads:
        return f"--method {cfg.method} (it needs the model loss's gradients at every block)"
    return None


# ---------------------------------------------------------------------------------------- units
@dataclass(frozen=True)
class UnitArch:
    """What the methods read of one unit of a block (a stage's linears): the same attributes as a
    BlockArch's, names relative to the unit's module."""

    name: str
    shapes: dict[str, tuple[int, int]]
    input_groups: tuple[tuple[str, ...], ...]
    let_pairs: tuple[LetPair, ...] = ()
    unpaired: str = ""

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(self.shapes)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        return dict(self.shapes)

    def let_parameters(self, down: bool = False) -> int:
        return sum(math.prod(p.shape) for p in self.let_pairs if down or not p.optional)


def attention_unit(arch: BlockArch) -> UnitArch:
    """The block's linears other than its MLP's, with their input groups and LET pairs."""
    names = tuple(n for n in arch.linears if not n.startswith(arch.family.experts.mlp + ".")
                  and n not in arch.expert_linears())
    shapes = arch.linear_shapes()
    groups = tuple(g for g in arch.input_groups if g[0] in names)
    return UnitArch("attention", {n: shapes[n] for n in names}, groups, arch.let_pairs)


def shared_unit(arch: BlockArch) -> tuple[str, UnitArch] | None:
    """The shared experts (their module and unit), or None."""
    ex = arch.family.experts
    if not ex.shared:
        return None
    module = next(iter(ex.shared)).rsplit(".", 1)[0]
    shapes = {n[len(module) + 1:]: s for n, s in arch.linear_shapes().items() if n in ex.shared}
    role = {n[len(module) + 1:]: rs[0] for n, rs in ex.shared.items()}
    by = {r: n for n, r in role.items()}
    pairs: tuple[LetPair, ...] = ()
    if ex.down_pair:
        width = shapes[by["up"]][0]
        pairs = (ChannelPair("down", Rows(by["up"], 0, width, width), by["down"], width, 1, optional=True),)
    return module, UnitArch("shared experts", shapes, ((by["gate"], by["up"]), (by["down"],)), pairs)


def group_unit(arch: BlockArch, experts: list[int], routed_only: bool) -> UnitArch:
    """A group of routed experts as :class:`ExpertGroup` names them (``3.gate_proj``). All-expert
    calibration: every expert's gate and up read the same tokens, one input group (one Hessian);
    routed only: one per expert."""
    ex = arch.family.experts
    names = {r: ex.names[r] for r in expert_layout.roles(ex)}
    shapes, groups, pairs = {}, [], []
    width = arch.expert_width
    for e in experts:
        for r, n in names.items():
            shapes[f"{e}.{n}"] = (arch.hidden, width) if r == "down" else (width, arch.hidden)
        if ex.down_pair:
            pairs.append(ChannelPair(f"down_{e}", Rows(f"{e}.{names['up']}", 0, width, width), f"{e}.{names['down']}",
                                     width, 1, optional=True))
    ins = [(f"{e}.{names['gate']}", f"{e}.{names['up']}") for e in experts]
    groups = ([tuple(n for g in ins for n in g)] if not routed_only else ins) + [(f"{e}.{names['down']}",) for e in experts]
    return UnitArch(f"experts {experts[0]}-{experts[-1]}", shapes, tuple(groups), tuple(pairs))


class ExpertGroup(nn.Module):
    """Some of a block's routed experts as 2-D ``nn.Linear`` modules (copies of their slices of the
    fused parameters, under ``{expert}.{name}``), so that every method, hook and statistic of a dense
    block applies to them. ``forward`` maps [..., hidden] to each expert's output on every token,
    [..., experts, hidden], through transformers' own gate function of the experts module
    (``_apply_gate``: act(gate) * up, gpt-oss's clamped variant). With ``routed_only`` the input
    carries one 0/1 channel per expert after the hidden ones (the router's choice) and an expert's
    inputs, intermediate activations and outputs are zero on the tokens not routed to it."""

    def __init__(self, experts_module: nn.Module, ex: Any, experts: list[int], weights: dict[str, torch.Tensor],
                 routed_only: bool = False) -> None:
        super().__init__()
        self.ex, self.ids, self.routed_only = ex, list(experts), routed_only
        self._gate_fn = experts_module._apply_gate  # transformers' own (a bound method: no submodule)
        (self._in_param, in_roles), (_out_param, out_roles) = ex.linears.items()
        self._in_roles, self._down = in_roles, ex.names[out_roles[0]]
        prefix = expert_layout.expert_prefix(ex)
        for e in experts:  # submodule "3" holds expert 3's linears: names "3.gate_proj", as the unit's
            block = nn.ModuleDict()
            for r in (*in_roles, *out_roles):
                w = weights[f"{prefix}{e}.{ex.names[r]}.weight"]
                b = weights.get(f"{prefix}{e}.{ex.names[r]}.bias")
                lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
                lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
                if b is not None:
                    lin.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
                block[ex.names[r]] = lin
            self.add_module(str(e), block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = x.shape[-1] - (len(self.ids) if self.routed_only else 0)
        masks = x[..., hidden:] if self.routed_only else None
        x = x[..., :hidden]
        outs = []
        for j, e in enumerate(self.ids):
            m = self._modules[str(e)]
            keep = masks[..., j:j + 1] if masks is not None else None
            xe = x * keep if keep is not None else x
            parts = [m[self.ex.names[r]](xe) for r in self._in_roles]
            if len(parts) == 1:
                gu = parts[0]
            elif self.ex.interleaved:
                gu = torch.stack(parts, dim=-1).reshape(*parts[0].shape[:-1], -1)
            else:
                gu = torch.cat(parts, dim=-1)
            a = self._gate_fn(gu)
            if keep is not None:
                a = a * keep
            y = m[self._down](a)
            outs.append(y * keep if keep is not None else y)
        return torch.stack(outs, dim=-2)


class FPTargets:
    """The FP outputs of a unit's module on its inputs, computed per batch when indexed (a unit's
    targets would be [samples, seqlen, experts, hidden]: never held whole)."""

    def __init__(self, module: nn.Module, inputs: torch.Tensor) -> None:
        self.module, self.inputs = module, inputs

    @torch.no_grad()
    def __getitem__(self, idx: Any) -> torch.Tensor:
        x = self.inputs[idx]
        single = x.dim() == self.inputs.dim() - 1
        out = self.module(x.unsqueeze(0) if single else x)
        return out[0] if single else out

    def __len__(self) -> int:
        return self.inputs.shape[0]


# ---------------------------------------------------------------------------------------- the MLP held out
class _HeldMLP(nn.Module):
    """Stands in for the MLP: zeros, so the block's output is the residual stream after attention."""

    def __init__(self, as_tuple: bool) -> None:
        super().__init__()
        self.as_tuple = as_tuple

    def forward(self, hidden_states: torch.Tensor) -> Any:
        zeros = torch.zeros_like(hidden_states)
        return (zeros, None) if self.as_tuple else zeros


@contextlib.contextmanager
def mlp_held_out(layer: nn.Module, arch: BlockArch) -> Iterator[None]:
    """Inside the context the layer's MLP adds nothing: its output is attention's residual stream."""
    ex = arch.family.experts
    parent, _, attr = ex.mlp.rpartition(".")
    owner = layer.get_submodule(parent) if parent else layer
    mlp = getattr(owner, attr)
    setattr(owner, attr, _HeldMLP(ex.mlp_tuple))
    try:
        yield
    finally:
        setattr(owner, attr, mlp)


class _Stop(Exception):
    pass


@torch.no_grad()
def mlp_inputs(layer: nn.Module, arch: BlockArch, inputs: torch.Tensor, layer_kwargs: dict[str, Any], batch_size: int,
               params: dict[str, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(the MLP's input [N, L, hidden], the router's top-k experts [N, L, k]) for every cached sample,
    the block run with ``params`` (the quantized attention) up to its MLP."""
    ex = arch.family.experts
    mlp = layer.get_submodule(ex.mlp)
    router = layer.get_submodule(ex.router)
    device = device_of(layer)
    xs = torch.empty_like(inputs)
    top = torch.empty(*inputs.shape[:-1], arch.top_k, dtype=torch.long)
    seen: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        seen.append(args[0])
        raise _Stop

    handle = mlp.register_forward_pre_hook(stop)
    try:
        for idx in batches(inputs.shape[0], batch_size):
            seen.clear()
            with contextlib.suppress(_Stop):
                block_forward(layer, inputs[idx].to(device), layer_kwargs, params)
            x = seen[0]
            xs[idx] = x.to(xs.device)
            routed = router(x.reshape(-1, x.shape[-1]))[2]
            top[idx] = routed.reshape(*x.shape[:-1], -1).cpu()
    finally:
        handle.remove()
    return xs, top


def routed_counts(top: torch.Tensor, n_experts: int, shard: SampleShard | None = None) -> torch.Tensor:
    """Tokens the router sends each expert (over every worker's samples)."""
    counts = torch.bincount(top.reshape(-1), minlength=n_experts).to(torch.float64)
    if shard is not None and not shard.trivial:
        shard.all_reduce(counts, "sum")
    return counts.to(torch.long)


def gather_samples(t: torch.Tensor, shard: SampleShard) -> torch.Tensor:
    """Every worker's rows of ``t`` (a cache of its samples), on every worker, in sample order."""
    if shard.trivial or shard.broadcast is None:
        return t
    if list(shard.owned) != shard_range(shard.total, shard.world, shard.rank):
        raise ValueError("gathering samples needs contiguous shares (lsiq.parallel.shard_range)")
    parts = []
    for r in range(shard.world):
        n = len(shard_range(shard.total, shard.world, r))
        buf = t.contiguous() if r == shard.rank else t.new_empty(n, *t.shape[1:])
        shard.broadcast(buf, r)
        parts.append(buf)
    return torch.cat(parts)


def unit_owners(costs: list[int], world: int) -> list[int]:
    """The worker that calibrates each unit: largest first, to the least loaded (ties to the lowest rank)."""
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def expert_groups(experts: list[int], group: int, world: int) -> list[list[int]]:
    """The routed experts in groups of ``group`` (0: split evenly over the workers, all at once with one)."""
    if not experts:
        return []
    size = group or -(-len(experts) // world)
    return [experts[i:i + size] for i in range(0, len(experts), size)]


# ---------------------------------------------------------------------------------------- in-place weights
@torch.no_grad()
def write_linears(layer: nn.Module, arch: BlockArch, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy each linear's 2-D weight (checkpoint names, in any order) into ``layer``'s own parameters in
    place: a routed expert's slices of the fused parameters once its roles are all there. One
    expert's weights at a time beyond the layer's own: a block's worth of experts is never copied."""
    experts = arch.expert_linears()
    ex = arch.family.experts if experts else None
    pending: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    params = dict(layer.named_parameters())
    for name, w in weights:
        if name not in experts:
            layer.get_submodule(name).weight.copy_(w)
            continue
        e, role = experts[name]
        param = next(p for p, rs in ex.linears.items() if role in rs)
        parts = pending.setdefault((e, param), {})
        parts[role] = w
        if len(parts) == len(ex.linears[param]):
            params[f"{ex.module}.{param}"][e].copy_(expert_layout.fused_one(ex, param, [parts[r] for r in ex.linears[param]]))
            del pending[(e, param)]
    if pending:
        raise ValueError(f"experts with some roles missing: {sorted(pending)}")


@contextlib.contextmanager
def swapped(layer: nn.Module, arch: BlockArch, weights: Iterable[tuple[str, torch.Tensor]],
            tensors: dict[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Inside the context ``layer`` computes with ``weights`` (and the other ``tensors``, module names);
    its own values are kept on the host meanwhile and restored exactly after."""
    names = set(arch.expert_linears())
    ex = arch.family.experts
    keep = {f"{ex.module}.{p}" for p in ex.linears} if names else set()
    keep |= {f"{n}.weight" for n in arch.linears if n not in names} | set(tensors or {})
    params = dict(layer.named_parameters()) | dict(layer.named_buffers())
    backup = {k: params[k].detach().to("cpu", copy=True) for k in keep}
    try:
        with torch.no_grad():
            for k, v in (tensors or {}).items():
                params[k].copy_(v)
        write_linears(layer, arch, weights)
        yield
    finally:
        with torch.no_grad():
            for k, v in backup.items():
                params[k].copy_(v)


def rtn_weights(arch: BlockArch, layer: nn.Module, spec: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Each linear's weight rounded to nearest, one at a time."""
    for name, w in arch.weights(layer).items():
        yield name, fake_quant(w, *minmax_scale_zero(w, spec), spec)


# ---------------------------------------------------------------------------------------- the block
@dataclass
class _Unit:
    """One unit of a block's MLP: its module is built when it is calibrated or its result received
    (:meth:`build`), so that a group's copies of its experts are on the device one group at a time."""

    name: str
    build: Callable[[], nn.Module]
    arch: UnitArch
    prefix: str  # prepended to its linears' names in the block's result (checkpoint names)
    experts: list[int] = field(default_factory=list)


def calibrate_moe_block(layer: nn.Module, layer_kwargs: dict[str, Any], inputs: torch.Tensor, targets: torch.Tensor,
                        arch: BlockArch, cfg: CalibConfig, block_index: int = 0, fp_inputs: torch.Tensor | None = None,
                        shard: SampleShard | None = None, measure_after: bool = True) -> BlockResult:
    """Quantize a mixture-of-experts block (``arch.moe``) with ``cfg.method`` in the two stages of this
    module; the arguments are lsiq.block.calibrate_block's. The result names every linear and tensor
    as checkpoints do (per-expert linears), and ``result.moe`` holds the routed token counts, the
    experts rounded to nearest for lack of tokens and the units' owners. ``layer`` is left unchanged."""
    from lsiq.block import calibrate_block

    shard = shard or SampleShard.whole(inputs.shape[0])
    t0 = time.perf_counter()
    for p in layer.parameters():
        p.requires_grad_(False)
    fb = cfg.forward_batch(shard.world)
    with swapped(layer, arch, rtn_weights(arch, layer, cfg.spec)):
        loss_rtn, rel_rtn = output_errors(layer, inputs, targets, layer_kwargs, fb, None, cfg.abits, shard)

    # ---- stage 1: the attention, on the residual stream after it
    att = attention_unit(arch)
    fp_in = fp_inputs if fp_inputs is not None else inputs
    with mlp_held_out(layer, arch):
        att_targets = forward_all(layer, fp_in, layer_kwargs, fb)
        first = calibrate_block(layer, layer_kwargs, inputs, att_targets, att, cfg, block_index, fp_inputs=fp_inputs,
                                shard=shard, measure_before=False, measure_after=False)
    del att_targets
    att_params = first.dequantized_params()

    # ---- stage 2: the MLP on its own inputs through the quantized attention
    xs, top = mlp_inputs(layer, arch, inputs, layer_kwargs, fb, att_params)
    mlp = calibrate_mlp(layer, arch, cfg, xs, top, shard, block_index)
    del xs, top

    # ---- the block's result, under checkpoint names
    linears = dict(first.linears) | mlp.linears
    linears = {n: linears[n] for n in arch.linears}  # the block's order
    tensors = {arch.checkpoint_name(k): v for k, v in first.tensors.items()} | mlp.tensors
    result = BlockResult(linears, tensors, loss_before=loss_rtn, loss_after=float("nan"), losses=list(first.losses),
                         trainable_params=first.trainable_params + mlp.trainable_params, rel_before=rel_rtn,
                         moe=mlp.moe)
    if measure_after:
        result.loss_after, result.rel_after = block_errors(layer, arch, inputs, targets, layer_kwargs, fb, result,
                                                           cfg.abits, shard)
    result.seconds = time.perf_counter() - t0
    return result


def calibrate_mlp(layer: nn.Module, arch: BlockArch, cfg: CalibConfig, xs: torch.Tensor, top: torch.Tensor,
                  shard: SampleShard, block_index: int = 0) -> BlockResult:
    """Stage 2 of a mixture-of-experts block: its MLP's linears from ``xs`` (this worker's samples'
    MLP inputs, [n, L, hidden]) and ``top`` (the router's top-k experts of each token). The shared
    experts and the routed experts' groups are calibrated by their owners on every worker's samples
    and broadcast; an expert under ``cfg.expert_min_tokens`` of the routed tokens is rounded to
    nearest. Returns the MLP's linears and tensors (the router in full precision) under checkpoint
    names, with ``moe`` set; the losses and errors are NaN (the block's are measured on the block)."""
    from lsiq.block import calibrate_block

    ex = arch.family.experts
    counts = routed_counts(top, arch.experts, shard)
    total_tokens = shard.total * xs.shape[1]
    floor = cfg.expert_min_tokens * total_tokens
    # routed only, an expert with no token has no data at all (GPTQ would zero it): rounded to nearest too
    fallback = [e for e in range(arch.experts) if counts[e] < floor or (cfg.routed_only and counts[e] == 0)]
    xs, top = gather_samples(xs, shard), gather_samples(top, shard)
    units = _mlp_units(layer, arch, cfg, [e for e in range(arch.experts) if e not in fallback], shard.world)
    owners = unit_owners([sum(m * n for m, n in u.arch.shapes.values()) for u in units], shard.world)
    if shard.world > 1 and shard.broadcast is None:  # no way to share results: every worker does every unit
        owners = [shard.rank] * len(units)
    results: list[BlockResult | None] = []
    whole = SampleShard.whole(xs.shape[0])
    for unit, owner in zip(units, owners, strict=True):
        if owner != shard.rank:
            results.append(None)
            continue
        x, module = _unit_inputs(xs, top, unit, cfg), unit.build()
        results.append(calibrate_block(module, {}, x, FPTargets(module, x), unit.arch, cfg, block_index,
                                       shard=whole, measure_before=False, measure_after=False))
        del x, module
    if any(o != shard.rank for o in owners):
        results = [_broadcast_result(r, u, cfg, o, shard) for r, u, o in zip(results, units, owners, strict=True)]
    linears: dict[str, QuantizedLinear] = {}
    tensors: dict[str, torch.Tensor] = {}
    mlp_prefix = ex.mlp + "."
    shared = {n.rsplit(".", 1)[0] + "." for n in ex.shared}
    for k, v in layer.state_dict().items():  # the router (and its bias, DeepSeek's score correction) as they are
        if k.startswith(mlp_prefix) and not k.startswith(ex.module + ".") and not k.startswith(tuple(shared)):
            tensors[arch.checkpoint_name(k)] = v.detach().clone()
    unit_losses = {}
    for unit, res in zip(units, results, strict=True):
        linears.update({unit.prefix + n: q for n, q in res.linears.items()})
        tensors.update({unit.prefix + k: v for k, v in res.tensors.items()})
        unit_losses[unit.name] = res.losses[-1] if res.losses else None
    if fallback:
        weights = arch.weights(layer)
        biases = expert_layout.split(ex, {f"{ex.module}.{p}": t.detach() for p, t in _fused(layer, ex).items()}, fallback)
        for name, (e, _role) in arch.expert_linears().items():
            if e in fallback:
                linears[name] = QuantizedLinear.round_to_nearest(weights[name], cfg.spec)
                if f"{name}.bias" in biases:
                    tensors[f"{name}.bias"] = biases[f"{name}.bias"].clone()
    moe = {"tokens": total_tokens, "routed_tokens": counts.tolist(), "rtn_fallback": fallback,
           "min_tokens": cfg.expert_min_tokens, "all_experts": not cfg.routed_only, "units": [u.name for u in units],
           "owners": owners, "unit_losses": unit_losses}
    return BlockResult(linears, tensors, float("nan"), float("nan"),
                       trainable_params=sum(r.trainable_params for r in results), moe=moe)


def block_errors(layer: nn.Module, arch: BlockArch, inputs: torch.Tensor, targets: torch.Tensor,
                 layer_kwargs: dict[str, Any], batch_size: int, result: BlockResult, abits: int,
                 shard: SampleShard | None = None) -> tuple[float, float]:
    """The quantized block's output errors (lsiq.forward.output_errors), its weights swapped into ``layer``."""
    others = arch.to_module(dict(result.tensors))
    with swapped(layer, arch, ((n, q.weight()) for n, q in result.linears.items()), others):
        return output_errors(layer, inputs, targets, layer_kwargs, batch_size, None, abits, shard)


def _fused(layer: nn.Module, ex: Any) -> dict[str, torch.Tensor]:
    params = dict(layer.named_parameters())
    return {p + suffix: params[f"{ex.module}.{p}{suffix}"] for p in ex.linears for suffix in ("", "_bias")
            if f"{ex.module}.{p}{suffix}" in params}


def _mlp_units(layer: nn.Module, arch: BlockArch, cfg: CalibConfig, experts: list[int], world: int) -> list[_Unit]:
    """The shared experts' unit, then the routed experts' groups."""
    ex = arch.family.experts
    units = []
    shared = shared_unit(arch)
    if shared is not None:
        module, unit_arch = shared
        units.append(_Unit("shared experts", lambda m=module: layer.get_submodule(m), unit_arch, module + "."))
    experts_module = layer.get_submodule(ex.module)
    fused = {f"{ex.module}.{p}": t.detach() for p, t in _fused(layer, ex).items()}

    def group(ids: list[int]) -> nn.Module:  # copies of these experts' slices, on the layer's device
        weights = expert_layout.split(ex, fused, ids)
        return ExpertGroup(experts_module, ex, ids, weights, cfg.routed_only).to(device_of(layer))

    for ids in expert_groups(experts, cfg.expert_group, world):
        units.append(_Unit(f"experts {ids[0]}-{ids[-1]}", lambda ids=ids: group(ids),
                           group_unit(arch, ids, cfg.routed_only), expert_layout.expert_prefix(ex), ids))
    return units


def _unit_inputs(xs: torch.Tensor, top: torch.Tensor, unit: _Unit, cfg: CalibConfig) -> torch.Tensor:
    """A unit's inputs: the MLP's inputs, with the router's 0/1 choice per expert appended when only
    routed tokens count."""
    if not cfg.routed_only or not unit.experts:
        return xs
    chosen = torch.stack([(top == e).any(-1) for e in unit.experts], dim=-1).to(xs.dtype)
    return torch.cat([xs, chosen], dim=-1)


def _broadcast_result(res: BlockResult | None, unit: _Unit, cfg: CalibConfig, owner: int, shard: SampleShard
                      ) -> BlockResult:
    """A unit's result on every worker, sent by its owner: codes, grids, low-rank factors, the other
    tensors, the step losses and the learned-parameter count, in one fixed order."""
    spec = cfg.spec
    weights = {f"{n}.weight" for n in unit.arch.shapes}
    others = {k: v for k, v in unit.build().state_dict().items() if k not in weights}
    steps = cfg.steps_for(shard.total) if cfg.trains else 0
    template: list[torch.Tensor] = []
    for m, n in unit.arch.shapes.values():
        g = spec.groups(n)
        template += [torch.empty(m, n, dtype=torch.uint8), torch.empty(m, g), torch.empty(m, g)]
        if cfg.lowrank is not None:
            k = min(cfg.rank, m, n)
            template += [torch.empty(m, k), torch.empty(k, n)]
    template += [torch.empty_like(v, device="cpu") for v in others.values()]
    template += [torch.empty(steps, dtype=torch.float64), torch.empty(1, dtype=torch.int64)]
    if res is not None:
        mine = []
        for name in unit.arch.shapes:
            q = res.linears[name]
            mine += [q.codes.cpu(), q.scale.float().cpu(), q.zero.float().cpu()]
            if cfg.lowrank is not None:
                mine += [q.lowrank_a.float().cpu(), q.lowrank_b.float().cpu()]
        mine += [res.tensors[k].cpu() for k in others]
        mine += [torch.tensor(res.losses, dtype=torch.float64), torch.tensor([res.trainable_params])]
        template = [t.contiguous() for t in mine]
    for t in template:
        shard.broadcast(t, owner)
    if res is not None:
        return res
    it = iter(template)
    linears = {}
    for name in unit.arch.shapes:
        q = QuantizedLinear(next(it), next(it), next(it), spec)
        if cfg.lowrank is not None:
            q.lowrank_a, q.lowrank_b = next(it), next(it)
        linears[name] = q
    tensors = {k: next(it) for k in others}
    losses, count = next(it).tolist(), int(next(it).item())
    return BlockResult(linears, tensors, float("nan"), float("nan"), losses=losses, trainable_params=count)
