"""Data-parallel block calibration: workers that each hold a share of the samples and sum their
gradients give the single-worker result (threads stand in for the workers here; the Ray actors
with torch.distributed are tested in test_pipeline)."""

import copy
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from lsiq.arch import BlockArch
from lsiq.block import calibrate_block
from lsiq.config import CalibConfig
from lsiq.forward import forward_all
from lsiq.parallel import SampleShard, shard_range
from tests.conftest import tiny_llama_config
from tests.procs import LOOPBACK
from tests.test_methods import _block

ROOT = Path(__file__).resolve().parent.parent


class ThreadCollective:
    """An all-reduce among ``world`` threads (a barrier and a shared slot per rank)."""

    def __init__(self, world):
        self.world = world
        self.slots = [None] * world
        self.barrier = threading.Barrier(world)

    def reducer(self, rank):
        def all_reduce(t, op):
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            t.copy_(stacked.sum(0) if op == "sum" else stacked.amax(0))
            self.barrier.wait()
        return all_reduce

    def broadcaster(self, rank):
        def broadcast(t, src):
            assert t.is_contiguous(), "torch.distributed sends raw memory: a strided tensor arrives scrambled"
            if rank == src:
                self.slots[src] = t.clone()
            self.barrier.wait()
            t.copy_(self.slots[src])
            self.barrier.wait()
        return broadcast


def _run_workers(layer, kw, x, targets, arch, cfg, world, grads=None, errors_out=None):
    """Each worker calibrates its share; ``grads`` (OAC): the loss gradients at the block's output,
    with ``x`` standing in for the FP inputs. With ``errors_out`` (a list) the workers' exceptions
    are collected there instead of failing the test, and a worker's error does not break the
    others' collectives (a worker still waiting after 120 s counts as hung)."""
    coll = ThreadCollective(world)
    results = [None] * world
    errors = []

    def work(rank):
        try:
            owned = shard_range(x.shape[0], world, rank)
            shard = SampleShard(owned, x.shape[0], coll.reducer(rank), rank=rank, world=world,
                                broadcast=coll.broadcaster(rank))
            own_layer = copy.deepcopy(layer)  # each worker has its own copy of the block (functional_call swaps params)
            extra = {} if grads is None else {"fp_inputs": x[owned], "output_grads": grads[owned]}
            results[rank] = calibrate_block(own_layer, kw, x[owned], targets[owned], arch, cfg, 0, shard=shard, **extra)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            if errors_out is None:
                coll.barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    if any(t.is_alive() for t in threads):  # stuck in a collective: release it, and say so
        coll.barrier.abort()
        for t in threads:
            t.join()
        errors.append(TimeoutError("a worker hung in a collective"))
    if errors_out is not None:
        errors_out.extend(errors)
    else:
        assert not errors, errors
    return results


def test_a_failed_lowrank_solve_stops_every_worker():
    """Only a linear's owner solves its correction; when that fails, the other worker must raise
    too instead of waiting in the broadcast for factors that never come."""
    import lsiq.lowrank as block_mod

    cfg_model = tiny_llama_config()
    _, layer, x, kw = _block(cfg_model, n=4)
    targets = forward_all(layer, x, kw, 2)
    cfg = CalibConfig(method="rtn", wbits=3, group_size=32, batch_size=2, lowrank="qera", rank=4)
    real, first = block_mod.lowrank_correction, []

    def failing(*args, **kwargs):  # the first worker to solve a correction fails
        first.append(threading.get_ident())
        if threading.get_ident() == first[0]:
            raise FloatingPointError("injected")
        return real(*args, **kwargs)

    errors = []
    block_mod.lowrank_correction = failing
    try:
        _run_workers(layer, kw, x, targets, BlockArch.from_config(cfg_model), cfg, 2, errors_out=errors)
    finally:
        block_mod.lowrank_correction = real
    # the other worker raised on its own: without the flag it would wait in the broadcast (a hang)
    assert sorted(str(e) for e in errors) == ["another data-parallel worker's low-rank correction failed", "injected"]


@pytest.mark.parametrize("method,abits,lowrank", [("lsi", 16, None), ("lwc-let", 8, None), ("gptq", 16, None),
                                                  ("oac", 16, None), ("lsi", 16, "qera")])
def test_two_workers_equal_one(method, abits, lowrank):
    """(With --lowrank each worker solves its share of the corrections and receives the others'.)"""
    cfg_model = tiny_llama_config()
    _, layer, x, kw = _block(cfg_model, n=6)
    arch = BlockArch.from_config(cfg_model)
    targets = forward_all(layer, x, kw, 2)
    x = x + 0.05 * torch.randn_like(x)  # quantized-stream inputs differ from the FP ones
    cfg = CalibConfig(method=method, wbits=3, abits=abits, group_size=32, epochs=2, batch_size=4, lsi_block_k=4,
                      lowrank=lowrank, rank=4)
    grads = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) if method == "oac" else None
    extra = {} if grads is None else {"fp_inputs": x, "output_grads": grads}
    one = calibrate_block(layer, kw, x, targets, arch, cfg, 0, **extra)
    import lsiq.lowrank as block_mod

    real, solved = block_mod.lowrank_correction, []

    def counting(*args, **kwargs):  # which worker solved a correction (threads share the module)
        solved.append(threading.get_ident())
        return real(*args, **kwargs)

    block_mod.lowrank_correction = counting
    try:
        two = _run_workers(layer, kw, x, targets, arch, cfg, 2, grads)
    finally:
        block_mod.lowrank_correction = real
    if lowrank:  # seven corrections, shared out between the two workers
        assert len(solved) == 7 and len(set(solved)) == 2
    # workers end with identical parameters
    for name in one.linears:
        assert torch.equal(two[0].linears[name].codes, two[1].linears[name].codes)
        assert torch.equal(two[0].linears[name].scale, two[1].linears[name].scale)
        if lowrank:
            assert torch.equal(two[0].linears[name].weight(), two[1].linears[name].weight())
    # and agree with the single worker within float tolerance (summation order differs)
    assert abs(two[0].loss_after - one.loss_after) <= 1e-4 * one.loss_after
    for a, b in zip(one.losses, two[0].losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a) + 1e-9
    # the stated tolerance: codes equal but for a few entries one step apart (a float-level difference
    # moves a weight across a rounding boundary), scales within 1e-4 relative
    for name in one.linears:
        ca, cb = one.linears[name].codes.int(), two[0].linears[name].codes.int()
        assert (ca - cb).abs().max().item() <= 1 and (ca != cb).float().mean().item() <= 0.02, name
        torch.testing.assert_close(one.linears[name].scale, two[0].linears[name].scale, rtol=1e-4, atol=1e-8)


def test_uneven_shares_and_batches():
    """5 samples over 2 workers (3 + 2), batch 2: some steps give a worker no sample."""
    cfg_model = tiny_llama_config()
    _, layer, x, kw = _block(cfg_model, n=5)
    arch = BlockArch.from_config(cfg_model)
    targets = forward_all(layer, x, kw, 2) + 0.01
    cfg = CalibConfig(method="lwc", wbits=3, group_size=32, epochs=3, batch_size=2)
    one = calibrate_block(layer, kw, x, targets, arch, cfg, 0)
    two = _run_workers(layer, kw, x, targets, arch, cfg, 2)
    assert len(two[0].losses) == len(one.losses) == 9
    for a, b in zip(one.losses, two[1].losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_pipeline_two_ray_workers_match_one(tiny_checkpoint, texts_dir, tmp_path, tiny_runs):
    """Two calibrator actors (gloo all-reduce) against one, through the real pipeline."""
    from safetensors.torch import load_file

    from tests.test_pipeline import _cfg, _run

    (one, r1), two = tiny_runs("lsi"), tmp_path / "two"  # one worker: the default
    r2 = _run(_cfg(tiny_checkpoint, two, texts_dir / "calib.txt", workers=2, cpus_per_worker=1))
    assert r2["workers"] == 2
    for a, b in zip(r1["blocks"], r2["blocks"], strict=True):
        assert len(a["losses"]) == len(b["losses"]) > 0
        assert abs(a["loss_after"] - b["loss_after"]) <= 1e-3 * a["loss_after"]
    for shard in sorted(p.name for p in one.glob("model-layers-*.safetensors")):
        ta, tb = load_file(one / shard), load_file(two / shard)
        assert ta.keys() == tb.keys()
        for k in ta:
            if k.endswith(".scales"):
                torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-8)
            elif k.endswith(".qweight"):
                assert (ta[k] != tb[k]).float().mean().item() <= 0.05, k  # packed words: a code differs in a few

    # The same two workers on a two-node cluster (one CPU per node, so one worker per node): the
    # gloo group spans the nodes and the output is the single-node two-worker output, byte for byte.
    nodes2 = tmp_path / "two-nodes"
    proc = subprocess.run([sys.executable, "-m", "tests.two_node", str(tiny_checkpoint), str(nodes2),
                           str(texts_dir / "calib.txt")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(set(rep["worker_nodes"])) == 2, rep["worker_nodes"]
    assert rep["listening"] and set(rep["listening"]) <= LOOPBACK, rep["listening"]
    for f in sorted(p.name for p in two.glob("*.safetensors")):
        assert (two / f).read_bytes() == (nodes2 / f).read_bytes(), f


def test_pipeline_two_ray_workers_share_the_lowrank_solves(tiny_checkpoint, texts_dir, tmp_path, ray_local):
    """--lowrank through two calibrator actors: each solves its share of the corrections and
    broadcasts A and B with torch.distributed (gloo); the stored corrections are one worker's."""
    from safetensors.torch import load_file

    from pipeline.config import QuantizeConfig
    from tests.test_pipeline import _run

    calib = CalibConfig(method="rtn", wbits=3, group_size=32, lowrank="qera", rank=4)
    outs = {}
    for workers in (1, 2):
        outs[workers] = tmp_path / f"w{workers}"
        _run(QuantizeConfig(model=str(tiny_checkpoint), output=str(outs[workers]), calib=[str(texts_dir / "calib.txt")],
                            calib_cfg=calib, nsamples=4, seqlen=32, workers=workers, cpus_per_worker=1))
    found = 0
    for shard in sorted(p.name for p in outs[1].glob("model-layers-*.safetensors")):
        ta, tb = load_file(outs[1] / shard), load_file(outs[2] / shard)
        for k in (k for k in ta if ".lowrank_" in k):
            found += 1  # float16 factors from autocorrelations summed in another order: equal or an ulp apart
            torch.testing.assert_close(ta[k], tb[k], rtol=2e-3, atol=1e-3 * ta[k].abs().max().item())
    assert found == 3 * 7 * 2


def test_sharded_svds_equal_local_ones():
    """With three workers each computes its share of the block's seven SVDs (largest first to the
    least loaded) and receives the rest by broadcast: every worker ends with the local factors."""
    from lsiq.lsi import svd_flops, svd_owners
    from lsiq.trainable import BlockQuantizer

    cfg_model = tiny_llama_config()
    _, layer, _, _ = _block(cfg_model, n=2)
    arch = BlockArch.from_config(cfg_model)
    cfg = CalibConfig(method="lsi", wbits=3, group_size=32)
    local = BlockQuantizer(layer, arch, cfg)
    shapes = {n: tuple(layer.get_submodule(n.replace("__", ".")).weight.shape) for n in local.lsi.keys()}
    owners = svd_owners(shapes, 3, cfg.svd)
    loads = [sum(svd_flops(*shapes[n], cfg.svd) for n in shapes if owners[n] == r) for r in range(3)]
    assert sorted(set(owners.values())) == [0, 1, 2] and max(loads) < sum(loads) / 2
    world, coll, got, errors = 3, ThreadCollective(3), [None] * 3, []
    computed = [0] * 3
    import lsiq.trainable as block_mod

    real = block_mod.svd_factors

    def counting(w, *args):  # which worker ran an SVD (threads share the module, so count by thread name)
        computed[int(threading.current_thread().name)] += 1
        return real(w, *args)

    def work(rank):
        try:
            shard = SampleShard([rank], 3, coll.reducer(rank), rank=rank, world=world, broadcast=coll.broadcaster(rank))
            got[rank] = BlockQuantizer(layer, arch, cfg, shard=shard)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
            coll.barrier.abort()

    block_mod.svd_factors = counting
    try:
        threads = [threading.Thread(target=work, args=(r,), name=str(r)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        block_mod.svd_factors = real
    assert not errors, errors
    assert sum(computed) == 7 and all(c >= 1 for c in computed), computed
    for bq in got:
        for name, inc in local.lsi.items():
            for buf in ("u", "s", "vh"):
                assert torch.equal(getattr(bq.lsi[name], buf), getattr(inc, buf)), (name, buf)
    # LAPACK returns U and V^T column-major; sent as raw memory by gloo they would arrive scrambled
    from lsiq.lsi import svd_factors

    for shape in [(96, 32), (32, 96)]:
        for method in ("gram", "full"):
            assert all(t.is_contiguous() for t in svd_factors(torch.randn(*shape), method))
