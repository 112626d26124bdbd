"""The learnable form of one block: the components a trained method combines and the weights they give.

Components (lsiq.methods names the ones each method uses):
- ``lsi``: learnable singular-value increments W' = U diag(S + dS) V^T (lsiq.lsi); ``bands`` adds
  SDE's learnable diagonals beside them;
- ``let``: OmniQuant's equivalent transformation (lsiq.let), scales moved between activations and
  the linears that read them;
- ``lwc``: learnable clipping of each group's range (lsiq.lwc);
- ``rounding``: learned rounding (lsiq.rounding), an offset per weight added before rounding.
Composition inside the calibrated forward: LSI -> LET -> LWC's grid -> rounding with the offsets
-> fake quantizer, the weights rebuilt once per optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from lsiq.archs.base import BlockArch
from lsiq.config import CalibConfig
from lsiq.forward import device_of
from lsiq.let import LET
from lsiq.lsi import SVDIncrement, svd_factors, svd_owners
from lsiq.lwc import LWC
from lsiq.parallel import SampleShard, broadcast_from_owners
from lsiq.quantizer import fake_quant, minmax_scale_zero, quantize_codes
from lsiq.results import QuantizedLinear
from lsiq.rounding import RoundingOffsets

COMPONENTS = ("lsi", "bands", "let", "lwc", "rounding")


class BlockQuantizer(nn.Module):
    """The learnable parameters of one block and the weights they give.

    ``let_init``: LET's initial scales (default ones); ``round_init``: each linear's initial
    rounding offsets (default zero: round to nearest)."""

    def __init__(self, layer: nn.Module, arch: BlockArch, cfg: CalibConfig,
                 let_init: dict[str, torch.Tensor] | None = None, shard: SampleShard | None = None,
                 round_init: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = cfg.spec
        self.base = {k: v.detach() for k, v in layer.state_dict().items()}
        self.linears = arch.linears  # the quantized linears (module names relative to the block)
        self._weights = {f"{n}.weight" for n in self.linears}
        device = device_of(layer)
        self.lsi = nn.ModuleDict()
        if cfg.uses_lsi:
            factors = _block_svds({n: self.base[f"{n}.weight"] for n in self.linears}, cfg, shard)
            for name in self.linears:
                self.lsi[_key(name)] = SVDIncrement(self.base[f"{name}.weight"], cfg.lsi_block_k, cfg.lsi_relative,
                                                    factors[name], band=cfg.band)
        self.let = LET(arch, let_init, down=bool(cfg.let_down)).to(device) if cfg.uses_let else None
        self.lwc = nn.ModuleDict()
        if cfg.uses_lwc:
            for name in self.linears:
                out_f, in_f = self.base[f"{name}.weight"].shape
                self.lwc[_key(name)] = LWC(out_f, in_f, self.spec, param=cfg.lwc_param).to(device)
        self.rounding = nn.ModuleDict()
        if cfg.uses_rounding:
            for name in self.linears:
                init = round_init.get(name) if round_init is not None else None
                self.rounding[_key(name)] = RoundingOffsets(self.base[f"{name}.weight"].shape, init).to(device)

    # ------------------------------------------------------------------ learning
    def param_groups(self, steps: int) -> list[dict[str, Any]]:
        """Parameter groups, each with its learning rate and its ``optimizer`` (lsiq.optim): the
        clipping factors and rounding offsets take ``cfg.optimizer`` (with signsgd, a learning rate
        of 0 means 1 / steps); LET's and LSI's parameters always AdamW at their own rates."""
        cfg = self.cfg
        grid_lr = {"lwc": cfg.lr_lwc, "rounding": cfg.lr_round}
        # with signsgd, a learning rate of 0 means this many grid steps over the steps (SignRound: 1)
        grid_travel = {"lwc": 1.0, "rounding": cfg.lr_round_steps}
        groups = []
        for kind, mods in (("lwc", self.lwc), ("rounding", self.rounding)):
            params = list(mods.parameters())
            if params:
                lr = grid_lr[kind] or (grid_travel[kind] / max(1, steps) if cfg.optimizer == "signsgd" else 0.0)
                if lr <= 0:
                    raise ValueError(f"{kind}: a learning rate of 0 means {grid_travel[kind]:g} / steps only with the "
                                     "signsgd optimizer")
                groups.append({"params": params, "lr": lr, "optimizer": cfg.optimizer, "component": kind})
        if self.let is not None:
            groups.append({"params": list(self.let.parameters()), "lr": cfg.lr_let, "optimizer": "adamw",
                           "component": "let"})
        if len(self.lsi):
            named = list(self.lsi.named_parameters())
            groups.append({"params": [p for n, p in named if not n.endswith("bands")], "lr": cfg.lr_lsi,
                           "optimizer": "adamw", "component": "lsi"})
            groups.append({"params": [p for n, p in named if n.endswith("bands")], "lr": cfg.lr_sde,
                           "optimizer": "adamw", "component": "bands"})
        return [g for g in groups if g["params"]]

    @torch.no_grad()
    def project(self) -> None:
        """Bring bounded parameters back into their range after a step."""
        for m in self.lwc.values():
            m.project()
        for m in self.rounding.values():
            m.project()

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ the weights
    def transformed(self) -> dict[str, torch.Tensor]:
        """Block tensors after LSI and LET, before weight quantization."""
        others = self._transformed_others()
        return {k: self._transformed_weight(k[: -len(".weight")]) if k in self._weights else others[k]
                for k in self.base}

    def _transformed_others(self) -> dict[str, torch.Tensor]:
        """The block's tensors other than the linears' weights (norms, biases) after LET."""
        t = {k: v for k, v in self.base.items() if k not in self._weights}
        return self.let.transform(t) if self.let is not None else t

    def _transformed_weight(self, name: str) -> torch.Tensor:
        """One linear's weight after LSI and LET (LET applied to it alone: the same products)."""
        w = self.lsi[_key(name)]() if _key(name) in self.lsi else self.base[f"{name}.weight"]
        if self.let is not None:
            w = self.let.transform({f"{name}.weight": w})[f"{name}.weight"]
        return w

    @torch.no_grad()
    def fp_weights(self) -> dict[str, torch.Tensor]:
        """Each linear's full-precision weight with LET applied but not LSI: with the folded norms
        (LET keeps the FP output) it computes the FP block; what a low-rank correction aims at."""
        out = {}
        for name in self.linears:
            w = self.base[f"{name}.weight"]
            out[name] = self.let.transform({f"{name}.weight": w})[f"{name}.weight"].detach() if self.let is not None else w
        return out

    def scale_zero(self, name: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if _key(name) in self.lwc:
            return self.lwc[_key(name)].scale_zero(w)
        return minmax_scale_zero(w, self.spec)

    def _offset(self, name: str) -> torch.Tensor | None:
        return self.rounding[_key(name)]() if _key(name) in self.rounding else None

    def effective(self) -> dict[str, torch.Tensor]:
        """Parameters for the calibrated forward: transformed, weights fake-quantized."""
        t = self._transformed_others()
        for name in self.linears:
            if self.cfg.recompute_weights and torch.is_grad_enabled():
                t[f"{name}.weight"] = torch.utils.checkpoint.checkpoint(self._effective_weight, name,
                                                                        use_reentrant=False)
            else:
                t[f"{name}.weight"] = self._effective_weight(name)
        return t

    def _effective_weight(self, name: str) -> torch.Tensor:
        """One linear's weight after LSI and LET, fake-quantized on its (learned) grid."""
        w = self._transformed_weight(name)
        scale, zero = self.scale_zero(name, w)
        w = fake_quant(w, scale, zero, self.spec, self._offset(name))
        # bf16: the linear's autocast would cast it to bfloat16 anyway (the same rounding); cast here,
        # the float32 weight is not held beside the bfloat16 copy saved for the backward (the dict
        # of parameters keeps it through the step: a block's weights in float32 on a GPU)
        if self.cfg.precision == "bf16" and torch.is_autocast_enabled(w.device.type):
            w = w.to(torch.bfloat16)
        return w

    @torch.no_grad()
    def finalize(self) -> tuple[dict[str, QuantizedLinear], dict[str, torch.Tensor]]:
        """Fold everything into integer weights plus plain (folded) non-linear tensors."""
        t = {k: v.detach() for k, v in self.transformed().items()}
        linears = {}
        for name in self.linears:
            w = t.pop(f"{name}.weight")
            scale, zero = self.scale_zero(name, w)
            linears[name] = QuantizedLinear(quantize_codes(w, scale, zero, self.spec, self._offset(name)),
                                            scale.detach().clone(), zero.detach().clone(), self.spec)
        return linears, {k: v.clone() for k, v in t.items()}


def trainable_count(arch: BlockArch, cfg: CalibConfig) -> int:
    """Learned parameters of one block, as :class:`BlockQuantizer` builds them (tests check it)."""
    n = 0
    for out_f, in_f in arch.linear_shapes().values():
        if cfg.uses_lwc:
            n += 2 * out_f * cfg.spec.groups(in_f)
        if cfg.uses_lsi:
            k, r = min(cfg.lsi_block_k, out_f, in_f), min(out_f, in_f)
            n += r + k * k + 2 * min(cfg.band, r - 1) * r  # SDE's bands: one row of r per offset
        if cfg.uses_rounding:
            n += out_f * in_f
    if cfg.uses_let:  # one scale per channel of each of the block's LET pairs (lsiq.let)
        n += arch.let_parameters(down=bool(cfg.let_down))
    return n


def state_floats(arch: BlockArch, cfg: CalibConfig) -> int:
    """Floats per block that training holds besides the saved activations: every learned parameter,
    its gradient, AdamW's two moments (signsgd keeps none) and, with keep_best or average_tail, a copy
    (the best step's, or the running mean)."""
    n = trainable_count(arch, cfg)
    grid = 0  # the parameters that cfg.optimizer trains (clipping factors, rounding offsets)
    for out_f, in_f in arch.linear_shapes().values():
        grid += (2 * out_f * cfg.spec.groups(in_f) if cfg.uses_lwc else 0) + (out_f * in_f if cfg.uses_rounding else 0)
    adam = (n - grid) + (grid if cfg.optimizer == "adamw" else 0)
    return 2 * n + 2 * adam + (n if cfg.keep_best or cfg.average_tail > 0 else 0)


def _block_svds(weights: dict[str, torch.Tensor], cfg: CalibConfig, shard: SampleShard | None
                ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The SVD of every linear: all computed here by a single worker; with data-parallel workers
    each computes its share (svd_owners), then every factor is broadcast from its owner. All
    owners compute first and broadcast after, in one fixed order, so no SVD waits on another's."""
    def factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # "auto": svd_factors' own default dtype for the weight's device (lsiq.lsi.svd_dtype)
        return svd_factors(w, cfg.svd, None if cfg.svd_dtype == "auto" else getattr(torch, cfg.svd_dtype))

    if shard is None or shard.world == 1 or shard.broadcast is None:
        return {n: factors(w) for n, w in weights.items()}
    owners = svd_owners({n: tuple(w.shape) for n, w in weights.items()}, shard.world, cfg.svd)
    mine = {n: factors(w) for n, w in weights.items() if owners[n] == shard.rank}

    def empty(name: str) -> tuple[torch.Tensor, ...]:
        w = weights[name]
        r = min(w.shape)
        return w.new_empty(w.shape[0], r), w.new_empty(r), w.new_empty(r, w.shape[1])

    return broadcast_from_owners(mine, list(weights), owners, shard, empty)


def _key(linear: str) -> str:
    return linear.replace(".", "__")
