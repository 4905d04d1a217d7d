"""Ring attention over ``torch.distributed``: exact attention on a sequence sharded
across the ranks of a process group.

Each rank holds a shard ``(B, H, L_local, D)`` of the query, key and value sequences
(context parallelism). :func:`ring_attention` computes, for the local queries, attention
against the *whole* key/value sequence, without any rank ever holding more than two
key/value shards at once:

* ``kv_comm="ring"`` (default): the key/value shards travel round the ring
  ``r -> r+1`` with point-to-point sends. The transfer of the next shard is started
  before the current shard's block is computed and waited for afterwards, so
  communication hides behind compute when a block takes longer than a transfer.
* ``kv_comm="allgather"``: every rank all-gathers the key/value shards once (one
  collective, no overlap, ``world_size`` x the key/value memory) and reduce-scatters
  dK/dV in the backward. Simpler, and faster when the interconnect is fast and the
  shards are small; the memory cost grows with the world size.

Each (local query, one key/value shard) block goes through attn's own backend layer
(:func:`attn._problem.make_problem`, :func:`attn.backends.select_backend`): the Cython
kernels on CPU, the Numba CUDA kernels on GPU. Partial results are merged with their
logsumexps (see :func:`_merge`).

Sequence layouts (``N = world_size``, the global sequence cut into equal chunks)::

    contiguous: N chunks,  rank r holds chunk r.
    zigzag:     2N chunks, rank r holds chunks r and 2N-1-r (in that order).

    global chunks, N = 2, zigzag:   | c0 | c1 | c2 | c3 |
                                      r0   r1   r1   r0     -> r0 = [c0, c3], r1 = [c1, c2]

With ``is_causal=True`` the contiguous layout leaves rank ``N-1`` with ``N`` blocks of
work and rank 0 with one; the zigzag layout gives every rank the same work (see
:func:`_block_plan`). Shard and reassemble with :func:`shard_sequence` and
:func:`unshard_sequence`.

The backward is the ring again: dQ accumulates locally in float32; dK and dV
accumulators (float32) travel with their key/value shards and arrive back at the rank
that owns them after a full turn. The block backward is attn's own backend backward
called with the *merged* (global) ``out`` and ``lse``: the kernels rebuild
``P = exp(S - lse)`` from the lse they are given and ``delta = rowsum(dO * out)`` from
the out they are given, so with the global values each block yields exactly its share
of the global gradients (``P`` restricted to the block's columns is the global softmax
restricted to them, and ``delta`` is the global one).

Errors are collective: before any ring traffic every rank all-gathers a small
descriptor of its call (shapes, dtype, options); if any rank's arguments are invalid
or the ranks disagree, *every* rank raises the same error. A rank that dies or never
calls makes the others fail when the process group's timeout
(``init_process_group(timeout=...)``) expires, or as soon as the transport notices the
closed connection.
"""
from __future__ import annotations

import math
import struct

import torch
import torch.distributed as dist

from ._problem import accumulation_dtype, make_problem
from .backends import select_backend

__all__ = ["ring_attention", "shard_sequence", "unshard_sequence"]

_LAYOUTS = ("zigzag", "contiguous")
_KV_COMMS = ("ring", "allgather")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# p2p tags (gloo matches sends to receives by tag; NCCL ignores tags and matches in
# issue order, which is the same on every rank here).
_TAG_K, _TAG_V, _TAG_DK, _TAG_DV = 11, 12, 13, 14


# ------------------------------------------------------------------ sharding helpers


def _check_layout(layout):
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")


def _num_chunks(world_size: int, layout: str) -> int:
    return 2 * world_size if layout == "zigzag" else world_size


def _chunk_ids(rank: int, world_size: int, layout: str) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local order."""
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, dim: int = 2,
                   layout: str = "zigzag") -> torch.Tensor:
    """The shard of the global sequence ``x`` that ``rank`` holds (a copy).

    ``layout="zigzag"``: ``x`` is cut along ``dim`` into ``2 * world_size`` equal chunks
    and rank ``r`` gets chunks ``r`` and ``2 * world_size - 1 - r`` concatenated, which
    balances causal attention. ``layout="contiguous"``: ``world_size`` chunks, rank
    ``r`` gets chunk ``r``. The length along ``dim`` must be a multiple of the number of
    chunks. Differentiable; :func:`unshard_sequence` is its inverse.
    """
    _check_layout(layout)
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    n = _num_chunks(world_size, layout)
    L = x.shape[dim]
    if L % n:
        raise ValueError(
            f"sequence length {L} (dim {dim}) is not divisible into {n} equal chunks: "
            f"layout {layout!r} over {world_size} ranks needs a multiple of {n}; pad "
            f"the sequence to {-(-L // n) * n}"
        )
    chunks = x.chunk(n, dim=dim)
    return torch.cat([chunks[i] for i in _chunk_ids(rank, world_size, layout)], dim=dim)


def unshard_sequence(shards, *, dim: int = 2, layout: str = "zigzag",
                     group=None) -> torch.Tensor:
    """The global sequence from its shards: the inverse of :func:`shard_sequence`.

    ``shards`` is either a list of every rank's shard in rank order (local, and
    differentiable), or this rank's shard alone, which is then all-gathered over
    ``group`` (every rank gets the whole sequence; not differentiable).
    """
    _check_layout(layout)
    if isinstance(shards, torch.Tensor):
        _require_initialized()
        n = dist.get_world_size(group)
        gathered = [torch.empty_like(shards) for _ in range(n)]
        dist.all_gather(gathered, shards.contiguous(), group=group)
        shards = gathered
    shards = list(shards)
    n = len(shards)
    if n == 0:
        raise ValueError("unshard_sequence needs at least one shard")
    per = _num_chunks(n, layout) // n
    L = shards[0].shape[dim]
    for i, s in enumerate(shards):
        if s.shape != shards[0].shape:
            raise ValueError(
                f"every shard must have the same shape, got {tuple(shards[0].shape)} on "
                f"rank 0 and {tuple(s.shape)} on rank {i}")
    if L % per:
        raise ValueError(f"a {layout} shard holds {per} equal chunks; its length {L} "
                         f"along dim {dim} is not a multiple of {per}")
    chunks = [None] * _num_chunks(n, layout)
    for r, s in enumerate(shards):
        for c, piece in zip(_chunk_ids(r, n, layout), s.chunk(per, dim=dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim=dim)


# ------------------------------------------------------------------ block plan


def _block_plan(layout: str, is_causal: bool, rank: int, src: int, world: int, L: int):
    """How the local queries of ``rank`` meet the key/value shard of ``src``.

    Returns ``None`` (no query sees any of these keys) or ``(q_slice, kv_slice,
    causal)``: the local query rows, the key/value rows of the shard, and whether the
    block is the causal diagonal (top-left causal on equal lengths).

    Zigzag, causal, with ``C = L / 2`` and rank r holding chunks ``(r, 2N-1-r)``:

    * ``src == r``: both shards hold the same chunks in the same global order, so the
      local causal mask *is* the global one: one causal call on the full shards.
    * ``src < r``: chunk ``src`` precedes both local chunks (full); chunk ``2N-1-src``
      follows both (skipped): all ``2C`` queries against the first ``C`` keys.
    * ``src > r``: both kv chunks follow chunk ``r`` and precede chunk ``2N-1-r``:
      the last ``C`` queries against all ``2C`` keys.

    Every step after the first is ``2C * C`` scores on every rank: balanced.
    Contiguous, causal: ``src < r`` full, ``src == r`` diagonal, ``src > r`` skipped.
    """
    every = slice(None)
    if not is_causal:
        return every, every, False
    if src == rank:
        return every, every, True
    if layout == "zigzag":
        C = L // 2
        if src < rank:
            return every, slice(0, C), False
        return slice(C, L), every, False
    return (every, every, False) if src < rank else None


# ------------------------------------------------------------------ merge


def _merge(out: torch.Tensor, lse: torch.Tensor, out_b: torch.Tensor,
           lse_b: torch.Tensor) -> None:
    """Fold a block's ``(out_b, lse_b)`` into the running ``(out, lse)`` in place.

    With ``d = lse_b - lse``, the merged softmax gives the block the weight
    ``w = e^lse_b / (e^lse + e^lse_b) = sigmoid(d)``, so

        out <- out - w * (out - out_b)       (a convex combination, never overflows)
        lse <- max(lse, lse_b) + log1p(exp(-|d|))

    A row with no key yet (``lse = -inf``) gets ``d = +inf``, ``w = 1``: it takes the
    block (``0 - (0 - out_b)`` is exact). A block row with no key (``lse_b = -inf``)
    gets ``w = 0`` and leaves the row alone. Both empty: ``d`` is NaN, so ``w`` is
    forced to 0 and ``lse`` kept at ``-inf``. No NaN can come out.
    """
    out_b = out_b.to(out.dtype)
    d = lse_b - lse
    w = torch.nan_to_num(torch.sigmoid(d), nan=0.0)
    out.sub_(w.unsqueeze(-1) * (out - out_b))
    new = torch.maximum(lse, lse_b) + torch.log1p(torch.exp(-d.abs()))
    lse.copy_(torch.where(torch.isneginf(lse_b), lse, new))


# ------------------------------------------------------------------ block kernels


def _block_forward(q, k, v, causal, scale, gqa):
    problem = make_problem(q, k, v, None, causal, scale, gqa)
    return select_backend(problem).forward(problem)


def _block_backward(q, k, v, out, lse, grad_out, causal, scale, gqa):
    """(dq, dk, dv) of one block given the *global* out and lse of its query rows."""
    problem = make_problem(q, k, v, None, causal, scale, gqa)
    backend = select_backend(problem)
    if getattr(backend, "autograd_native", False):
        # The reference backend differentiates its own forward, which would normalise
        # by this block's lse: use the explicit formulas with the global statistics.
        return _block_backward_torch(q, k, v, out, lse, grad_out, causal, scale)
    return backend.backward(problem, out, lse, grad_out, None)


def _block_backward_torch(q, k, v, out, lse, grad_out, causal, scale):
    """FlashAttention backward of one block in plain PyTorch, from the given out/lse."""
    cdt = accumulation_dtype(q.dtype)
    Hq, Hkv = q.shape[1], k.shape[1]
    qc, kc, vc, oc, doc = (t.to(cdt) for t in (q, k, v, out, grad_out))
    if Hq != Hkv:
        kc = kc.repeat_interleave(Hq // Hkv, dim=1)
        vc = vc.repeat_interleave(Hq // Hkv, dim=1)
    s = (qc @ kc.transpose(-1, -2)) * scale
    if causal:
        Lq, Lk = s.shape[-2:]
        keep = torch.ones(Lq, Lk, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, float("-inf"))
    lse_c = lse.to(cdt).unsqueeze(-1)
    p = torch.exp(s - torch.where(torch.isneginf(lse_c), torch.inf, lse_c))
    delta = (doc * oc).sum(-1, keepdim=True)
    dv = p.transpose(-1, -2) @ doc
    ds = p * (doc @ vc.transpose(-1, -2) - delta)
    dq = (ds @ kc) * scale
    dk = (ds.transpose(-1, -2) @ qc) * scale
    if Hq != Hkv:
        B, _, Lk, _ = dk.shape
        dk = dk.view(B, Hkv, Hq // Hkv, Lk, -1).sum(2)
        dv = dv.view(B, Hkv, Hq // Hkv, Lk, -1).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------ communication


class _Ring:
    """Point-to-point neighbours of this rank in ``group``: sends go to ``rank + 1``,
    receives come from ``rank - 1``."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        glob = (lambda r: r) if group is None else (
            lambda r: dist.get_global_rank(group, r))
        self.next = glob((self.rank + 1) % self.world)
        self.prev = glob((self.rank - 1) % self.world)

    def exchange(self, tensors, tags):
        """Start sending ``tensors`` to the next rank and receiving same-shaped ones
        from the previous rank; returns ``(received, handles)``."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = []
        for t, r, tag in zip(tensors, recv, tags):
            ops.append(dist.P2POp(dist.isend, t, self.next, self.group, tag))
            ops.append(dist.P2POp(dist.irecv, r, self.prev, self.group, tag))
        return recv, dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(handles):
        with _comm_errors("a ring transfer"):
            for h in handles:
                h.wait()


class _comm_errors:
    """Re-raise a transport error (peer died, group timeout) with what was going on."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        if typ is not None and issubclass(typ, RuntimeError) and not str(exc).startswith(
                "ring_attention"):
            raise RuntimeError(
                f"ring_attention: {self.what} with the other ranks failed: a rank died, "
                "raised, stalled past the process group's timeout or called with other "
                f"arguments ({typ.__name__}: {exc})") from exc
        return False


def _all_gather(t: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    with _comm_errors("an all_gather"):
        dist.all_gather(out, t, group=group)
    return out


def _reduce_scatter(parts: list[torch.Tensor], group, rank: int) -> torch.Tensor:
    """Sum over ranks of ``parts[rank]``: dist.reduce_scatter where the backend has it,
    else (gloo) an all_reduce of the stacked parts."""
    if dist.get_backend(group) != "gloo":
        out = torch.empty_like(parts[rank])
        with _comm_errors("the dK/dV reduce_scatter"):
            dist.reduce_scatter(out, parts, group=group)
        return out
    stacked = torch.stack(parts)
    with _comm_errors("the dK/dV all_reduce"):
        dist.all_reduce(stacked, group=group)
    return stacked[rank]


# ------------------------------------------------------------------ validation


def _require_initialized():
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "attn.distributed needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) on every rank first (for "
            "single-process attention use attn.scaled_dot_product_attention)")


def _descriptor(query, key, value, is_causal, scale, enable_gqa, layout, kv_comm,
                local_error=None):
    """(error or None, descriptor ints): a fixed-length summary of this rank's call."""
    try:
        if local_error is not None:
            raise local_error
        for name, t in (("query", query), ("key", key), ("value", value)):
            if isinstance(t, torch.Tensor) and t.is_nested:
                raise NotImplementedError(
                    f"{name} is a nested (jagged) tensor: ring attention over jagged "
                    "batches across ranks is not implemented; shard dense (B, H, L, D) "
                    "tensors (pad the sequences) instead")
        problem = make_problem(query, key, value, None, is_causal, scale, enable_gqa)
        if problem.dtype not in _DTYPES:
            raise TypeError(f"unsupported dtype {problem.dtype}")
        _check_layout(layout)
        if kv_comm not in _KV_COMMS:
            raise ValueError(f"kv_comm must be one of {_KV_COMMS}, got {kv_comm!r}")
    except Exception as e:  # reported to every rank by the descriptor exchange
        return e, [1] + [0] * 12
    scale_bits = struct.unpack("<q", struct.pack("<d", problem.scale))[0]
    return None, [0, problem.B, problem.Hq, problem.Hkv, problem.Lq, problem.Lk,
                  problem.D, problem.Dv, _DTYPES.index(problem.dtype), int(is_causal),
                  _LAYOUTS.index(layout), _KV_COMMS.index(kv_comm), scale_bits]


def _describe(desc: list[int]) -> str:
    (_, B, Hq, Hkv, Lq, Lk, D, Dv, dt, causal, lay, comm, sb) = desc
    scale = struct.unpack("<d", struct.pack("<q", sb))[0]
    return (f"q (B={B}, Hq={Hq}, Lq={Lq}, D={D}), k/v (Hkv={Hkv}, Lk={Lk}, Dv={Dv}), "
            f"{str(_DTYPES[dt]).replace('torch.', '')}, is_causal={bool(causal)}, "
            f"layout={_LAYOUTS[lay]!r}, kv_comm={_KV_COMMS[comm]!r}, scale={scale:.6g}")


_ERROR_TYPES = {c.__name__: c for c in (ValueError, TypeError, NotImplementedError,
                                       RuntimeError)}


def _collective_validate(query, key, value, is_causal, scale, enable_gqa, layout,
                         kv_comm, group, local_error=None):
    """Check the call on every rank at once; raise the same error everywhere."""
    err, desc = _descriptor(query, key, value, is_causal, scale, enable_gqa, layout,
                            kv_comm, local_error)
    world = dist.get_world_size(group)
    # The descriptor travels on a device the group's backend serves: CUDA for a
    # NCCL-only group, else the CPU (gloo, or a "cpu:gloo,cuda:nccl" group).
    backend = str(dist.get_backend(group))
    dev = torch.device("cpu")
    if "nccl" in backend and "gloo" not in backend:
        dev = torch.device("cuda", torch.cuda.current_device())
    mine = torch.tensor(desc, dtype=torch.int64, device=dev)
    every = [torch.empty_like(mine) for _ in range(world)]
    with _comm_errors("the exchange of call descriptors (shapes, dtype, options)"):
        dist.all_gather(every, mine, group=group)
    descs = [t.tolist() for t in every]
    failed = [r for r, d in enumerate(descs) if d[0]]
    if failed:
        # A second, rarer collective: every rank learns the failing ranks' messages.
        # The error type of the lowest failing rank is raised everywhere (when it is
        # one of the builtin argument errors), with every failing rank's message.
        msgs = [None] * world
        mine_msg = None if err is None else (
            type(err).__name__, str(err).removeprefix("ring_attention: "))
        with _comm_errors("the exchange of error messages"):
            dist.all_gather_object(msgs, mine_msg, group=group)
        text = "; ".join(f"rank {r}: {msgs[r][0]}: {msgs[r][1]}" for r in failed)
        cls = _ERROR_TYPES.get(msgs[failed[0]][0], RuntimeError)
        raise cls(f"ring_attention: invalid arguments on {text}") from err
    if any(d != descs[0] for d in descs):
        lines = "\n".join(f"  rank {r}: {_describe(d)}" for r, d in enumerate(descs))
        raise ValueError(
            "ring_attention: the ranks disagree on shapes, dtype or options; every rank "
            "must pass shards of the same shape and dtype with the same arguments:\n"
            + lines)
    (_, B, Hq, Hkv, Lq, Lk, D, Dv, dt, causal, lay, comm, sb) = descs[0]
    if layout == "zigzag" and (Lq % 2 or Lk % 2):
        raise ValueError(
            f"ring_attention: layout='zigzag' shards hold two equal chunks, so the local "
            f"lengths must be even (the global length a multiple of 2 * world_size = "
            f"{2 * world}); got local Lq={Lq}, Lk={Lk} (global {Lq * world}, "
            f"{Lk * world}). Pad the sequence, or use layout='contiguous'")
    if is_causal and Lq != Lk:
        raise ValueError(
            f"ring_attention: is_causal=True needs query and key/value shards of the same "
            f"length (the same positions of one sequence), got Lq={Lq}, Lk={Lk}")


# ------------------------------------------------------------------ autograd


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, group, is_causal, scale, gqa, layout, kv_comm):
        ring = _Ring(group)
        r, N = ring.rank, ring.world
        cdt = accumulation_dtype(query.dtype)
        B, Hq, L, _ = query.shape
        Dv = value.shape[3]
        k, v = key.contiguous(), value.contiguous()
        out = torch.zeros(B, Hq, L, Dv, dtype=cdt, device=query.device)
        lse = torch.full((B, Hq, L), float("-inf"), dtype=cdt, device=query.device)

        def step(src, kb, vb):
            plan = _block_plan(layout, is_causal, r, src, N, L)
            if plan is None:
                return
            qs, ks, causal = plan
            o_b, l_b = _block_forward(query[:, :, qs], kb[:, :, ks], vb[:, :, ks],
                                      causal, scale, gqa)
            _merge(out[:, :, qs], lse[:, :, qs], o_b, l_b)

        if kv_comm == "allgather":
            ks, vs = _all_gather(k, group, N), _all_gather(v, group, N)
            for src in range(N):
                step(src, ks[src], vs[src])
        else:
            kb, vb = k, v
            for s in range(N):
                if s + 1 < N:  # start the next transfer before this block's compute
                    (kn, vn), handles = ring.exchange([kb, vb], [_TAG_K, _TAG_V])
                step((r - s) % N, kb, vb)
                if s + 1 < N:
                    ring.wait(handles)
                    kb, vb = kn, vn

        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.cfg = (group, is_causal, scale, gqa, layout, kv_comm)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        group, is_causal, scale, gqa, layout, kv_comm = ctx.cfg
        ring = _Ring(group)
        r, N = ring.rank, ring.world
        cdt = accumulation_dtype(query.dtype)
        L = query.shape[2]
        grad_out = grad_out.contiguous()
        k, v = key.contiguous(), value.contiguous()
        dq = torch.zeros(query.shape, dtype=cdt, device=query.device)

        def step(src, kb, vb, dk_acc, dv_acc):
            """Add this block's dQ locally and its dK/dV into the given accumulators."""
            plan = _block_plan(layout, is_causal, r, src, N, L)
            if plan is None:
                return
            qs, ks, causal = plan
            dq_b, dk_b, dv_b = _block_backward(
                query[:, :, qs], kb[:, :, ks], vb[:, :, ks], out[:, :, qs],
                lse[:, :, qs], grad_out[:, :, qs], causal, scale, gqa)
            dq[:, :, qs] += dq_b
            dk_acc[:, :, ks] += dk_b
            dv_acc[:, :, ks] += dv_b

        if kv_comm == "allgather":
            ks, vs = _all_gather(k, group, N), _all_gather(v, group, N)
            dks = [torch.zeros(k.shape, dtype=cdt, device=k.device) for _ in range(N)]
            dvs = [torch.zeros(v.shape, dtype=cdt, device=v.device) for _ in range(N)]
            for src in range(N):
                step(src, ks[src], vs[src], dks[src], dvs[src])
            dk = _reduce_scatter(dks, group, r)
            dv = _reduce_scatter(dvs, group, r)
        else:
            # Block src is at rank src + s at step s; its dK/dV accumulator follows it
            # one step behind the key/value shard (it can only leave once this rank's
            # share is added), and after the last step one more hop takes it home.
            kb, vb = k, v
            dkv_in, dkv_handles = None, []
            for s in range(N):
                if s + 1 < N:
                    (kn, vn), kv_handles = ring.exchange([kb, vb], [_TAG_K, _TAG_V])
                dk_acc = torch.zeros(k.shape, dtype=cdt, device=k.device)
                dv_acc = torch.zeros(v.shape, dtype=cdt, device=v.device)
                step((r - s) % N, kb, vb, dk_acc, dv_acc)
                if dkv_in is not None:  # the previous ranks' shares of this block
                    ring.wait(dkv_handles)
                    dk_acc += dkv_in[0]
                    dv_acc += dkv_in[1]
                if N > 1:
                    dkv_in, dkv_handles = ring.exchange([dk_acc, dv_acc],
                                                        [_TAG_DK, _TAG_DV])
                else:
                    dkv_in = (dk_acc, dv_acc)
                if s + 1 < N:
                    ring.wait(kv_handles)
                    kb, vb = kn, vn
            ring.wait(dkv_handles)
            dk, dv = dkv_in
        return (dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype),
                None, None, None, None, None, None)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   group=None, is_causal: bool = False, scale: float | None = None,
                   enable_gqa: bool = False, layout: str = "zigzag",
                   kv_comm: str = "ring", attn_mask=None,
                   block_mask=None) -> torch.Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Every rank calls it with its own shards and gets the attention output of its own
    queries against the whole key/value sequence, as
    ``scaled_dot_product_attention`` on the unsharded tensors would give (then sharded).
    Differentiable: the backward is a second ring and returns the local shards'
    gradients in the input dtype.

    Args:
        query: ``(B, Hq, L_local, D)``, this rank's shard (see :func:`shard_sequence`).
        key: ``(B, Hkv, Lk_local, D)``.
        value: ``(B, Hkv, Lk_local, Dv)``.
        group: the process group (default: the world).
        is_causal: causal over *global* positions (top-left aligned, as PyTorch SDPA);
            needs ``L_local == Lk_local``.
        scale: default ``1 / sqrt(D)``.
        enable_gqa: grouped-query attention (``Hkv`` divides ``Hq``); only the ``Hkv``
            heads travel.
        layout: how the sequence was sharded: ``"zigzag"`` (chunks ``r`` and
            ``2N-1-r`` of ``2N``; balanced causal work; local lengths even) or
            ``"contiguous"`` (chunk ``r`` of ``N``; causal work grows with the rank).
        kv_comm: ``"ring"`` (point-to-point, overlapped with compute, O(1) extra
            shards of memory) or ``"allgather"`` (one all-gather of K/V and a
            reduce-scatter of dK/dV; ``world_size`` shards of memory; no overlap).
        attn_mask, block_mask: not supported across ranks (NotImplementedError).

    Raises (argument errors are raised on *every* rank with the same message, before
    any ring traffic, after one small all_gather of a call descriptor):
        RuntimeError: no initialised process group; a transport failure (a peer died,
            or stalled past the group's ``timeout``).
        ValueError / TypeError: invalid arguments on some rank (the message names the
            rank), ranks disagreeing on shapes/dtype/options, or lengths that do not
            fit the layout.
        NotImplementedError: attn_mask, block_mask or jagged (nested) inputs.
    """
    _require_initialized()
    if attn_mask is not None or block_mask is not None:
        what = "attn_mask" if attn_mask is not None else "block_mask"
        err = NotImplementedError(
            f"ring_attention: {what} is not supported: masks and block masks across "
            "ranks (which would have to be sharded with the sequence) are not "
            "implemented; only dense attention with is_causal over global positions")
    else:
        err = None
    # Even a locally invalid call joins the descriptor exchange: no rank is left waiting.
    _collective_validate(query, key, value, is_causal, scale, enable_gqa, layout,
                         kv_comm, group, local_error=err)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    return _RingAttention.apply(query, key, value, group, is_causal, float(scale),
                                bool(enable_gqa), layout, kv_comm)

