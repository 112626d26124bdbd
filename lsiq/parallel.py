"""Data-parallel calibration: which samples a worker owns, and the collectives the methods use."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SampleShard:
    """One worker's share of the calibration samples in data-parallel calibration.

    Row j of the worker's caches is global sample ``owned[j]``; ``total`` samples exist across all
    workers; ``all_reduce(t, op)`` reduces ``t`` in place across workers (op "sum" or "max"). Every
    optimizer step draws the same global batch on every worker; each worker computes the loss of
    the samples it owns, scaled by the global batch size, and the summed gradients are exactly the
    single-worker gradient (up to float summation order). With ``broadcast``, worker ``rank`` of
    ``world`` computes only its share of the block's SVDs and receives the others'.
    """

    owned: list[int]
    total: int
    all_reduce: Callable[[torch.Tensor, str], None]
    rank: int = 0
    world: int = 1
    broadcast: Callable[[torch.Tensor, int], None] | None = None  # (t, src): t := worker src's t

    def __post_init__(self) -> None:
        self._pos = {g: j for j, g in enumerate(self.owned)}

    @staticmethod
    def whole(n: int) -> SampleShard:
        """A single worker holding every sample (no communication)."""
        return SampleShard(list(range(n)), n, _no_reduce)

    @property
    def trivial(self) -> bool:
        return self.all_reduce is _no_reduce

    def local(self, idx: torch.Tensor) -> torch.Tensor:
        """Local cache rows of the global indices in ``idx`` that this worker owns (in idx order)."""
        return torch.tensor([self._pos[g] for g in idx.tolist() if g in self._pos], dtype=torch.long)


def _no_reduce(t: torch.Tensor, op: str) -> None:
    return None


def shard_range(total: int, workers: int, rank: int) -> list[int]:
    """Contiguous, balanced split of ``total`` samples: the global indices of worker ``rank``."""
    lo, hi = rank * total // workers, (rank + 1) * total // workers
    return list(range(lo, hi))


def all_reduce_grads(params: list[torch.Tensor], shard: SampleShard) -> None:
    """Sum the gradients of the learnable parameters across workers, in one flat buffer."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    shard.all_reduce(flat, "sum")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset:offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast_from_owners(mine: dict[str, tuple[torch.Tensor, ...]], names: list[str], owners: dict[str, int],
                           shard: SampleShard, empty: Callable[[str], tuple[torch.Tensor, ...]]
                           ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Every name's tensors on every worker: this worker's own (``mine``, computed before the
    call), the others' received from their owners into ``empty(name)``. Every worker walks
    ``names`` in the same order, so no broadcast waits on a computation still running elsewhere."""
    out = {}
    for name in names:
        out[name] = mine[name] if name in mine else empty(name)
        for t in out[name]:
            shard.broadcast(t, owners[name])
    return out
