"""attn.distributed: ring attention over torch.distributed (gloo, CPU processes).

Spawning processes is the slow part (each imports torch), so each world size is one
spawn that runs every case and writes its results; the parametrised tests below read
them. Every rank checks its own shard of the output and of the gradients against the
float64 oracle (attn.reference) on the whole sequence, sharded the same way, with the
tolerance of tests/_util.assert_close_to_oracle (PyTorch's own error in the same dtype:
torch SDPA on the whole sequence).
"""
from __future__ import annotations

import json
import os
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from attn.distributed import (
    _block_backward,
    _block_backward_torch,
    _block_forward,
    _block_plan,
    _merge,
    ring_attention,
    shard_sequence,
    unshard_sequence,
)
from attn.reference import attention as reference_attention

from _util import assert_close_to_oracle

F64 = torch.float64
TIMEOUT_S = 30  # process-group timeout of the suite: a desynchronised ring fails, never hangs

# name -> (layout, is_causal, kv_comm, enable_gqa)
CASES = {
    "zigzag-causal-ring": ("zigzag", True, "ring", False),
    "contiguous-causal-ring": ("contiguous", True, "ring", False),
    "zigzag-noncausal-ring": ("zigzag", False, "ring", False),
    "contiguous-noncausal-ring": ("contiguous", False, "ring", False),
    "zigzag-causal-ring-gqa": ("zigzag", True, "ring", True),
    "zigzag-causal-allgather": ("zigzag", True, "allgather", False),
    "contiguous-causal-allgather-gqa": ("contiguous", True, "allgather", True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
WORLDS = (2, 3)
L_GLOBAL = 48  # a multiple of 2 * 2 and 2 * 3
D = 16

# name -> (expected exception type, words the message must contain)
ERROR_CASES = {
    "odd_zigzag_length": ("ValueError", ["zigzag", "even"]),
    "shape_on_one_rank": ("ValueError", ["disagree", "rank 0", "rank 1"]),
    "dtype_on_one_rank": ("ValueError", ["disagree", "float64"]),
    "invalid_on_one_rank": ("ValueError", ["invalid arguments on rank 1", "4-D"]),
    "block_mask_on_one_rank": ("NotImplementedError", ["block_mask", "not supported"]),
}


# ------------------------------------------------------------------ process helpers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, world, port, timeout_s):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def _inputs(cfg, dtype, seed=0, L=L_GLOBAL):
    """Global q, k, v, dO (the same on every rank: same seed)."""
    layout, causal, comm, gqa = cfg
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = (4, 2) if gqa else (2, 2)
    shapes = [(2, Hq, L, D), (2, Hkv, L, D), (2, Hkv, L, D), (2, Hq, L, D)]
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _check_case(rank, world, cfg, dtype):
    layout, causal, comm, gqa = cfg
    q, k, v, do = _inputs(cfg, dtype)

    def shard(t):
        return shard_sequence(t, rank, world, layout=layout)

    # ours
    qs, ks, vs = (shard(t).requires_grad_() for t in (q, k, v))
    out = ring_attention(qs, ks, vs, is_causal=causal, enable_gqa=gqa, layout=layout,
                         kv_comm=comm)
    out.backward(shard(do))
    # oracle: float64 reference on the whole sequence, from the same rounded inputs
    Q, K, V = (t.to(F64).requires_grad_() for t in (q, k, v))
    O, _ = reference_attention(Q, K, V, is_causal=causal, enable_gqa=gqa)
    O.backward(do.to(F64))
    # PyTorch's own error in this dtype: SDPA on the whole sequence
    Qt, Kt, Vt = (t.clone().requires_grad_() for t in (q, k, v))
    Ot = F.scaled_dot_product_attention(Qt, Kt, Vt, is_causal=causal, enable_gqa=gqa)
    Ot.backward(do)
    for name, ours, tor, ref in (("out", out, Ot, O), ("dq", qs.grad, Qt.grad, Q.grad),
                                 ("dk", ks.grad, Kt.grad, K.grad),
                                 ("dv", vs.grad, Vt.grad, V.grad)):
        assert ours.dtype == dtype, f"{name} dtype {ours.dtype} != {dtype}"
        assert_close_to_oracle(ours, shard(tor), shard(ref), dtype, f"rank {rank} {name}")


def _error_case(name, rank, world):
    """Make the bad call of case ``name``; returns (exception type, message) or None."""
    g = torch.Generator().manual_seed(1)
    L = L_GLOBAL // world

    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    q, k, v = t(1, 2, L, D), t(1, 2, L, D), t(1, 2, L, D)
    kwargs = dict(is_causal=True)
    if name == "odd_zigzag_length":
        q, k, v = t(1, 2, L + 1, D), t(1, 2, L + 1, D), t(1, 2, L + 1, D)
    elif name == "shape_on_one_rank" and rank == world - 1:
        q, k, v = t(1, 2, L + 2, D), t(1, 2, L + 2, D), t(1, 2, L + 2, D)
    elif name == "dtype_on_one_rank" and rank == 0:
        q, k, v = (x.to(F64) for x in (q, k, v))
    elif name == "invalid_on_one_rank" and rank == 1:
        q = q[0]
    elif name == "block_mask_on_one_rank" and rank == 0:
        kwargs["block_mask"] = object()
    try:
        ring_attention(q, k, v, **kwargs)
    except Exception as e:
        return [type(e).__name__, str(e)]
    return None


def _suite_worker(rank, world, port, outdir):
    _init(rank, world, port, TIMEOUT_S)
    res = {}
    for cname, cfg in CASES.items():
        for dname, dtype in DTYPES.items():
            try:
                _check_case(rank, world, cfg, dtype)
                res[f"{cname}-{dname}"] = "ok"
            except Exception:
                res[f"{cname}-{dname}"] = traceback.format_exc()
    for ename in ERROR_CASES:
        res[f"error:{ename}"] = _error_case(ename, rank, world)
    # The group still works after every rank raised.
    try:
        _check_case(rank, world, CASES["zigzag-causal-ring"], torch.float32)
        res["after_errors"] = "ok"
    except Exception:
        res["after_errors"] = traceback.format_exc()
    # unshard_sequence by all-gather inverts shard_sequence.
    x = torch.randn(2, 3, L_GLOBAL, 5, generator=torch.Generator().manual_seed(7))
    res["unshard_gather"] = {
        lay: bool(torch.equal(unshard_sequence(shard_sequence(x, rank, world, layout=lay),
                                               layout=lay), x))
        for lay in ("zigzag", "contiguous")}
    with open(os.path.join(outdir, f"{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    results = {}

    def get(world):
        if world not in results:
            outdir = str(tmp_path_factory.mktemp(f"ring{world}"))
            mp.spawn(_suite_worker, args=(world, _free_port(), outdir), nprocs=world)
            results[world] = []
            for r in range(world):
                with open(os.path.join(outdir, f"{r}.json")) as f:
                    results[world].append(json.load(f))
        return results[world]

    return get


# ------------------------------------------------------------------ distributed tests


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("cname", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_ring_matches_oracle(suite, world, cname, dname):
    """Output and dq/dk/dv of every rank's shard equal whole-sequence attention."""
    for r, res in enumerate(suite(world)):
        assert res[f"{cname}-{dname}"] == "ok", f"rank {r}:\n{res[f'{cname}-{dname}']}"


@pytest.mark.parametrize("ename", list(ERROR_CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_ring_errors_raise_on_every_rank(suite, world, ename):
    """A call that is wrong on one rank (or on all) raises the same error everywhere,
    before any ring traffic, and never hangs."""
    kind, words = ERROR_CASES[ename]
    errs = [res[f"error:{ename}"] for res in suite(world)]
    for r, e in enumerate(errs):
        assert e is not None, f"rank {r} did not raise"
        assert e[0] == kind, f"rank {r} raised {e[0]}: {e[1]}"
        for w in words:
            assert w in e[1], f"rank {r}: {w!r} not in message {e[1]!r}"
    assert all(e[1] == errs[0][1] for e in errs), "ranks raised different messages"


@pytest.mark.parametrize("world", WORLDS)
def test_ring_group_usable_after_errors(suite, world):
    for r, res in enumerate(suite(world)):
        assert res["after_errors"] == "ok", f"rank {r}:\n{res['after_errors']}"
        assert res["unshard_gather"] == {"zigzag": True, "contiguous": True}


def _failure_worker(rank, port, mode, outfile):
    """Rank 1 dies (or stalls) after joining the group; rank 0 must error out."""
    _init(rank, 2, port, timeout_s=3)
    if rank == 1:
        if mode == "dies":
            os._exit(3)
        time.sleep(6)  # alive but never calls: only the group's timeout can end rank 0
        os._exit(0)
    x = torch.randn(1, 2, 8, D)
    t0 = time.monotonic()
    try:
        ring_attention(x, x, x, is_causal=True)
        res = {"raised": None}
    except Exception as e:
        res = {"raised": type(e).__name__, "message": str(e)[:500]}
    res["seconds"] = time.monotonic() - t0
    with open(outfile, "w") as f:
        json.dump(res, f)
    os._exit(0)  # no destroy_process_group: the peer is gone


@pytest.mark.parametrize("mode", ["dies", "stalls"])
def test_ring_peer_failure_errors_instead_of_hanging(tmp_path, mode):
    ctx = mp.get_context("spawn")
    port, outfile = _free_port(), str(tmp_path / "rank0.json")
    procs = [ctx.Process(target=_failure_worker, args=(r, port, mode, outfile))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    alive = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not alive, f"processes {alive} hung"
    with open(outfile) as f:
        res = json.load(f)
    assert res["raised"] is not None, "rank 0 returned although its peer never called"
    assert "ring_attention" in res["message"], res
    assert res["seconds"] < 30, res
    if mode == "stalls":  # ended by the group's 3 s timeout, not by anything else
        assert res["seconds"] >= 2.5, res


# ------------------------------------------------------------------ single-process tests


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shard_unshard_are_inverse(world, layout):
    x = torch.randn(2, 3, 24, 5, requires_grad=True)
    shards = [shard_sequence(x, r, world, layout=layout) for r in range(world)]
    assert torch.equal(unshard_sequence(shards, layout=layout), x)
    # the zigzag / contiguous assignment of chunks
    n = 2 * world if layout == "zigzag" else world
    chunks = x.chunk(n, dim=2)
    want = [chunks[0], chunks[-1]] if layout == "zigzag" else [chunks[0]]
    assert torch.equal(shards[0], torch.cat(want, dim=2))
    # other dims
    y = torch.randn(24, 4)
    assert torch.equal(unshard_sequence([shard_sequence(y, r, world, dim=0, layout=layout)
                                         for r in range(world)], dim=0, layout=layout), y)


def test_shard_rejects_uneven_lengths():
    x = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match="multiple of 6"):
        shard_sequence(x, 0, 3, layout="zigzag")
    with pytest.raises(ValueError, match="multiple of 4"):
        shard_sequence(x, 0, 4, layout="contiguous")
    with pytest.raises(ValueError, match="layout"):
        shard_sequence(x, 0, 2, layout="striped")


def test_requires_initialised_group():
    x = torch.randn(1, 1, 4, 4)
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(x, x, x)


def test_merge_handles_empty_rows_without_nan():
    ninf = float("-inf")
    out = torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [1.0, 2.0]])
    lse = torch.tensor([ninf, 0.5, ninf, 0.3])
    out_b = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0], [5.0, 6.0]])
    lse_b = torch.tensor([0.7, ninf, ninf, 0.3])
    _merge(out, lse, out_b, lse_b)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[0], torch.tensor([3.0, 4.0])) and lse[0] == 0.7
    assert torch.equal(out[1], torch.tensor([1.0, 2.0])) and lse[1] == 0.5
    assert torch.equal(out[2], torch.zeros(2)) and lse[2] == ninf
    torch.testing.assert_close(out[3], torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(lse[3], torch.tensor(0.3 + torch.log(torch.tensor(2.0)).item()))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_block_backward_with_global_stats_gives_exact_share(dtype):
    """The property the ring backward rests on: a backend's block backward, given the
    merged (global) out and lse, returns exactly that block's share of the gradients.
    Split keys into uneven blocks (one causal diagonal), merge forwards, sum the block
    backwards, compare with the whole call; also the pure-PyTorch block backward."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 20, D, generator=g, dtype=dtype)
    k = torch.randn(2, 2, 20, D, generator=g, dtype=dtype)
    v = torch.randn(2, 2, 20, D, generator=g, dtype=dtype)
    do = torch.randn(2, 4, 20, D, generator=g, dtype=dtype)
    scale = 0.3
    # queries 12..19 against keys [0, 5), [5, 12) (full) and [12, 20) (causal diagonal)
    qs = q[:, :, 12:]
    blocks = [(slice(0, 5), False), (slice(5, 12), False), (slice(12, 20), True)]
    acc = torch.float64 if dtype == F64 else torch.float32
    out = torch.zeros(2, 4, 8, D, dtype=acc)
    lse = torch.full((2, 4, 8), float("-inf"), dtype=acc)
    for ks, c in blocks:
        o_b, l_b = _block_forward(qs, k[:, :, ks], v[:, :, ks], c, scale, True)
        _merge(out, lse, o_b, l_b)
    out = out.to(dtype)
    # whole call: keys 0..19 with the causal rule shifted by 12 (query 12+i sees <= 12+i)
    Q, K, V = (t.to(F64).requires_grad_() for t in (qs, k, v))
    mask = torch.ones(8, 20, dtype=torch.bool).tril(12)
    O, LSE = reference_attention(Q, K, V, mask, scale=scale, enable_gqa=True)
    O.backward(do[:, :, 12:].to(F64))
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == F64 else dict(atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out.to(F64), O, **tol)
    torch.testing.assert_close(lse.to(F64), LSE, **tol)
    for fn in (_block_backward, _block_backward_torch):
        dq = torch.zeros_like(qs, dtype=F64)
        dk = torch.zeros_like(k, dtype=F64)
        dv = torch.zeros_like(v, dtype=F64)
        for ks, c in blocks:
            a, b, cc = fn(qs, k[:, :, ks], v[:, :, ks], out, lse, do[:, :, 12:], c, scale,
                          True) if fn is _block_backward else \
                fn(qs, k[:, :, ks], v[:, :, ks], out, lse, do[:, :, 12:], c, scale)
            dq += a
            dk[:, :, ks] += b
            dv[:, :, ks] += cc
        for name, ours, ref in (("dq", dq, Q.grad), ("dk", dk, K.grad), ("dv", dv, V.grad)):
            torch.testing.assert_close(ours, ref, **tol, msg=f"{fn.__name__} {name}")


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_zigzag_causal_work_is_balanced(world):
    """Scores computed per rank per ring step: equal on every rank under zigzag."""
    L = 2 * 6

    def work(layout, r, src):
        plan = _block_plan(layout, True, r, src, world, L)
        if plan is None:
            return 0
        qs, ks, causal = plan
        nq = len(range(L)[qs])
        nk = len(range(L)[ks])
        return nq * (nk + 1) // 2 if causal else nq * nk

    for s in range(world):
        steps = {work("zigzag", r, (r - s) % world) for r in range(world)}
        assert len(steps) == 1, f"step {s}: unequal work {steps}"
    zig = [sum(work("zigzag", r, src) for src in range(world)) for r in range(world)]
    con = [sum(work("contiguous", r, src) for src in range(world)) for r in range(world)]
    assert len(set(zig)) == 1 and len(set(con)) == world
    assert sum(zig) == sum(con) == (world * L) * (world * L + 1) // 2
