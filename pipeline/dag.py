"""The block DAG, in one place: ``reader.read(i) -> calibrator.calibrate(i) -> writer.write(i)``.

With data-parallel calibration the middle node is N calibrator workers, each given the same block
tensors (one object in the object store, fetched once per node) and each holding its own share of
the samples; rank 0's result goes to the writer.

Each block is three actor calls chained through ObjectRefs: Ray starts a call when its inputs
exist, so tensors move reader -> calibrator -> writer through the object store without passing
through the driver. The driver keeps ``depth`` blocks in flight: while block i calibrates, the
reader fetches block i+1 and the writer uploads block i-1. Calls to one actor run in the order
they were submitted, which keeps the calibrator's activation caches in block order.

This is the execution model of Ray's classic DAG API, written with plain ``.remote()`` calls:
``DAGNode.execute()`` is deprecated in Ray 2.60, and compiled graphs do not restart dead actors
(see README, "The Ray DAG"). Switching the execution API is a change to this module only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ray


@dataclass
class BlockRefs:
    index: int
    meta: ray.ObjectRef  # the reader's small record of the block (fingerprint, bytes, seconds)
    calibrated: list[ray.ObjectRef]  # each worker's result (rank 0's carries the stored tensors)
    written: ray.ObjectRef  # the writer's checkpoint record


class BlockDAG:
    """The three actors of a run and the shape of the graph between them."""

    def __init__(self, reader: ray.actor.ActorHandle, calibrators: list[ray.actor.ActorHandle],
                 writer: ray.actor.ActorHandle, depth: int = 2, cross_layer: bool = False) -> None:
        self.reader, self.calibrators, self.writer = reader, calibrators, writer
        self.depth = depth
        # cross-layer learning: calibrate(i) also gets block i+1's FP tensors, the same object
        # that calibrate(i+1) gets later (read once: a window of two blocks in the object store)
        self.cross_layer = cross_layer
        self._reads: dict[int, tuple[ray.ObjectRef, ray.ObjectRef]] = {}
        # refs of blocks not yet finished (only for drain: holding refs keeps their objects alive)
        self._inflight: dict[tuple[str, int], list[ray.ObjectRef]] = {}

    def _read(self, i: int) -> tuple[ray.ObjectRef, ray.ObjectRef]:
        if i not in self._reads:
            self._reads[i] = tuple(self.reader.read.options(num_returns=2).remote(i))
        return self._reads[i]

    def submit(self, i: int, n: int) -> BlockRefs:
        meta, tensors = self._read(i)
        del self._reads[i]
        nxt = self._read(i + 1)[1] if self.cross_layer and i + 1 < n else None
        calibrated = [c.calibrate.remote(i, tensors, meta, nxt) for c in self.calibrators]
        written = self.writer.write.remote(i, calibrated[0])
        self._inflight[("run", i)] = [meta, *calibrated, written]
        return BlockRefs(i, meta, calibrated, written)

    def submit_replay(self, i: int, record: dict[str, Any]) -> tuple[ray.ObjectRef, list[ray.ObjectRef]]:
        """Replay a finished block: (reader's metadata, every worker's replay call)."""
        meta, tensors = self.reader.read.options(num_returns=2).remote(i)
        stored = self.writer.read_block.remote(record)
        done = [c.replay.remote(i, tensors, stored) for c in self.calibrators]
        self._inflight[("replay", i)] = [meta, stored, *done]
        return meta, done

    def replay(self, records: list[dict[str, Any]], check: Callable[[dict[str, Any], dict[str, Any]], None]
               ) -> Iterator[int]:
        """Replay finished blocks in order, ``depth`` at a time; ``check(meta, record)`` may refuse
        a block whose source changed. Yields each block index once replayed."""
        pending: dict[int, tuple[ray.ObjectRef, list[ray.ObjectRef]]] = {}
        for k, rec in enumerate(records):
            for j in range(k, min(k + self.depth, len(records))):
                if j not in pending:
                    pending[j] = self.submit_replay(records[j]["index"], records[j])
            meta, done = pending.pop(k)
            check(ray.get(meta), rec)
            ray.get(done)
            self._inflight.pop(("replay", rec["index"]), None)
            yield rec["index"]

    def run(self, first: int, n: int) -> Iterator[dict[str, Any]]:
        """Calibrate blocks ``first..n-1`` pipelined; yields each block's checkpoint record, in order,
        once its shard and record are stored."""
        pending = {i: self.submit(i, n) for i in range(first, min(first + self.depth, n))}
        for i in range(first, n):
            refs = pending.pop(i)
            # wait for the calibration only (not fetching its tensors here), then start the next read
            ray.wait(refs.calibrated, num_returns=len(refs.calibrated), fetch_local=False)
            if i + self.depth < n:
                pending[i + self.depth] = self.submit(i + self.depth, n)
            ray.get(refs.calibrated[1:])  # other workers' statistics: small; raises if a worker failed
            record = ray.get(refs.written)
            del refs
            self._inflight.pop(("run", i), None)
            yield record

    def oac_pass(self, n: int, first: int, head: ray.ObjectRef, ids: list[ray.ObjectRef],
                 predicted_total: int) -> tuple[float, dict[str, Any]]:
        """OAC's gradient pass over the FP model: blocks 0..n-1 forward (each worker keeps its samples'
        boundary activations), the loss at the head, then blocks n-1..first+1 backward, each read
        again and recomputed, down to the gradient at the output of block ``first`` (the earlier
        blocks are done). ``depth`` blocks are read ahead. Returns the FP model's calibration loss
        and rank 0's cache figures."""
        def run(order: list[int], call: Callable[[int, ray.ObjectRef], list[ray.ObjectRef]]) -> list[Any]:
            pending: dict[int, list[ray.ObjectRef]] = {}
            results = []
            for k, i in enumerate(order):
                for j in order[k:k + self.depth]:
                    if j not in pending:
                        meta, tensors = self.reader.read.options(num_returns=2).remote(j)
                        pending[j] = call(j, tensors)
                        self._inflight[("oac", j)] = [meta, tensors, *pending[j]]
                results.append(ray.get(pending.pop(i)))
                self._inflight.pop(("oac", i), None)
            return results

        caches = run(list(range(n)), lambda i, t: [c.oac_forward.remote(i, t, n) for c in self.calibrators])[0][0]
        loss = sum(ray.get([c.oac_head.remote(head, r, predicted_total) for c, r in zip(self.calibrators, ids, strict=True)]))
        run(list(range(n - 1, first, -1)), lambda i, t: [c.oac_backward.remote(i, t) for c in self.calibrators])
        return loss, caches

    def drain(self) -> None:
        """Wait until every submitted call has finished or failed (after a failure, before a retry)."""
        refs = [r for rs in self._inflight.values() for r in rs]
        refs += [r for rs in self._reads.values() for r in rs]
        if refs:
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
        self._inflight = {}
        self._reads = {}
