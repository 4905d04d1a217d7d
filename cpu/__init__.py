"""attn.cpu: the Cython + OpenMP kernels and their launcher.

The kernels are compiled once per ISA level (see setup.py); this module loads the best
variant the CPU supports. ``ATTN_CPU_ISA`` (``auto``, ``generic``, ``avx2``,
``avx512``, ``native``) forces one, e.g. to compare builds in the benchmark.

The launcher turns torch tensors into the kernels' pointer-and-stride description,
allocates outputs, builds the kv-block lists (dense and causal attention are block
lists too: full blocks need no masking, diagonal blocks do), and picks the backward
schedule. It knows nothing of autograd or of the public API.
"""
from __future__ import annotations

import importlib
import math
import os
from functools import lru_cache

import torch

from attn._blocks import JaggedBand, band_of, dense_block_classes
from attn._problem import accumulation_dtype

__all__ = [
    "ISA",
    "BLOCK_M",
    "BLOCK_N",
    "available_isas",
    "forward",
    "backward",
    "num_threads",
    "choose_schedule",
]

# Tile sizes. BLOCK_M queries x BLOCK_N keys per tile: the forward score tile S^T is
# BLOCK_N x BLOCK_M floats (32 KiB), which with the Q^T and V tiles stays inside the
# 1-2 MiB L2 of current x86 cores while giving each packed Q^T tile 32 kv blocks of
# reuse at L = 4096. Chosen by bench/NOTES.md's sweep.
BLOCK_M = 64
BLOCK_N = 128

_ISA_ORDER = ("native", "avx512", "avx2", "generic")


def available_isas() -> list[str]:
    """The kernel variants that were built and import on this machine."""
    found = []
    for isa in _ISA_ORDER:
        try:
            importlib.import_module(f"{__name__}._kernels_{isa}")
        except ImportError:
            continue
        found.append(isa)
    return found


def _cpu_supports(isa: str) -> bool:
    if isa in ("generic", "native"):
        return True
    cap = torch.backends.cpu.get_cpu_capability()
    if isa == "avx512":
        return cap.startswith("AVX512")
    if isa == "avx2":
        return cap.startswith("AVX2") or cap.startswith("AVX512")
    return False


def _load():
    wanted = os.environ.get("ATTN_CPU_ISA", "auto").strip().lower() or "auto"
    if wanted != "auto":
        if wanted not in _ISA_ORDER:
            raise ImportError(
                f"ATTN_CPU_ISA={wanted!r} is not a kernel variant; expected one of "
                f"{['auto', *_ISA_ORDER]}"
            )
        try:
            return wanted, importlib.import_module(f"{__name__}._kernels_{wanted}")
        except ImportError as e:
            raise ImportError(
                f"ATTN_CPU_ISA={wanted!r}: that variant was not built "
                f"(built: {available_isas()}); 'native' needs ATTN_NATIVE=1 at install"
            ) from e
    for isa in _ISA_ORDER:
        if not _cpu_supports(isa):
            continue
        try:
            return isa, importlib.import_module(f"{__name__}._kernels_{isa}")
        except ImportError:
            continue
    raise ImportError(
        "attn.cpu: no compiled kernel variant found; reinstall attn "
        "(pip install . builds the Cython extensions)"
    )


ISA, _k = _load()
OPENMP = _k.openmp_enabled()
_PAD = _k.pad_width()


def _padded(n: int) -> int:
    return -(-n // _PAD) * _PAD


def num_threads() -> int:
    """Threads for one kernel call: PyTorch's intra-op setting, which already honours
    OMP_NUM_THREADS, so attn never oversubscribes a process PyTorch has configured."""
    return max(1, torch.get_num_threads())


def _ptr(t: torch.Tensor):
    return t.data_ptr(), tuple(t.stride())


def _bcast_strides(t: torch.Tensor) -> tuple:
    # A size-1 batch or head dimension broadcasts: stride 0 lets the kernel index it
    # with any b or h.
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _blocks(num: torch.Tensor | None, idx: torch.Tensor | None):
    if num is None:
        return None
    return (num.data_ptr(), _bcast_strides(num), idx.data_ptr(), _bcast_strides(idx))


@lru_cache(maxsize=256)
def _dense_lists(Lq: int, Lk: int, BM: int, BN: int, causal: bool, masked: bool):
    """kv-block lists per q block, and their transposes, for dense or causal attention.

    Returns (kv_full, kv_part, q_full, q_part), each a (num, idx) pair shaped
    (1, 1, rows) and (1, 1, rows, cols) int32 (batch and head broadcast). With an
    attention mask every visited block is partial (the mask must be read)."""
    full, part = dense_block_classes(Lq, Lk, BM, BN, causal, masked)

    def pack(sel: torch.Tensor):
        # Indices of the selected blocks in increasing order, left-aligned per row.
        num = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True)
        idx = order.to(torch.int32).contiguous()
        return num.view(1, 1, -1).contiguous(), idx.view(1, 1, *idx.shape).contiguous()

    return pack(full), pack(part), pack(full.t()), pack(part.t())


def _as_compute(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # float16/bfloat16 are upcast once per call (O(L*D), against O(L^2*D) work);
    # float32/float64 tensors go to the kernels as they are, whatever their strides.
    return t if t.dtype == dtype else t.to(dtype)


def _mask_args(attn_mask, B, Hq, Lq, Lk, cdt):
    if attn_mask is None:
        return 0, None, None
    m = attn_mask.expand(B, Hq, Lq, Lk)
    if m.dtype == torch.bool:
        return 1, m, _ptr(m)
    m = m if m.dtype == cdt else m.to(cdt)
    return 2, m, _ptr(m)


def _flex_lists(flex):
    """The kernel's (kv_full, kv_part, q_full, q_part) lists from a block mask's
    KernelLists (already at the kernel's tile size)."""
    kl = flex.lists
    return ((kl.full_kv_num_blocks, kl.full_kv_indices), (kl.kv_num_blocks, kl.kv_indices),
            (kl.full_q_num_blocks, kl.full_q_indices), (kl.q_num_blocks, kl.q_indices))


def _mod_args(flex, cdt, with_mask=True):
    """(addresses for the kernel, objects to keep alive) of the mods' tile callbacks.
    with_mask=False: the mask is a jagged band, which the kernels apply themselves."""
    from attn import _modgen

    addrs, keep = [0, 0, 0, 0, 0], []
    if with_mask and flex.mask_mod is not None and not flex.mask_mod.is_all_true:
        ptrs, k = _modgen.buffer_pointer_array(flex.mask_mod)
        addrs[0] = _modgen.cpu_tile_fns(flex.mask_mod, cdt)["mask"]
        addrs[1] = ptrs.ctypes.data
        keep.append(k)
    if flex.score_mod is not None and not flex.score_mod.is_identity:
        fns = _modgen.cpu_tile_fns(flex.score_mod, cdt)
        ptrs, k = _modgen.buffer_pointer_array(flex.score_mod)
        addrs[2], addrs[3], addrs[4] = fns["score"], fns["score_grad"], ptrs.ctypes.data
        keep.append(k)
    return tuple(addrs), keep


def _jagged_args(band: JaggedBand, BM: int, BN: int, q_group: int = 1):
    """(the kernel's jagged tuple, its schedule); the tensors live in the band's cache.
    q_group > 1 (the forward's groups of q tiles): the q items are those of the
    schedule at q_group * BM queries, which the kernel splits into BM tiles."""
    sched = band.schedule(BM, BN)
    items = band.schedule(BM * q_group, BN).items if q_group > 1 else sched.items
    left, right = band.sides()
    ptrs = tuple(t.data_ptr() for t in (band.q0, band.q1, band.k0, band.k1, band.diag))
    return (band.nseq, ptrs, left, right,
            (items.data_ptr(), items.shape[0]),
            (sched.kv_items.data_ptr(), sched.kv_items.shape[0]),
            (sched.seq_items.data_ptr(), sched.seq_items.shape[0])), sched


def flex_tiles(block_size) -> tuple[int, int]:
    """Kernel tile (BM, BN) for a block mask of BLOCK_SIZE (Q, KV): BM divides the q
    block (the kv lists of a q tile are its block's), BN is the kv block."""
    QB, KB = block_size
    return math.gcd(BLOCK_M, QB), KB


# The forward can run groups of up to 4 q tiles of one (batch, head) in lockstep, so
# each kv tile is fetched, and packed, once per group (cpu/_kernels.pyx, bench/NOTES.md
# C1). Taken when K or V rows are strided (varlen's packed (tokens, heads, D), a
# transposed view) and must be packed; with row-major K and V a group of one measured
# 2-3% faster (one q tile's Q^T and acc stay in L2, the kv tiles stream). A group's
# state (Q^T, acc, m, l per tile) stays within this many bytes so it shares L2 with
# the kv tiles.
_FWD_GROUP_BYTES = 136 * 1024
# Groups are made smaller while a call would have fewer than this many items per
# thread (uneven causal rows need several per thread to balance).
_FWD_ITEMS_PER_THREAD = 8


def _rows_packed(t: torch.Tensor) -> bool:
    """Whether the kernels must pack this (B, H, L, D) tensor's rows (their
    rows_need_pack): not row-major with a width padded to the vector block."""
    D = t.shape[-1]
    return not (t.stride(-1) == 1 and D == _padded(D) and t.stride(-2) == D)


def _fwd_group(B, Hq, BM, D, Dv, itemsize, nthreads, n_items, packed=True) -> int:
    """q tiles per forward item: 1 when no K/V rows are packed (packed=False), else the
    largest of 4, 2, 1 whose group state fits _FWD_GROUP_BYTES and that leaves enough
    items; n_items(G) counts the items of a (batch, head). ATTN_CPU_FWD_GROUP forces a
    size (results are bitwise the same for every size)."""
    forced = os.environ.get("ATTN_CPU_FWD_GROUP", "").strip()
    if forced:
        if forced not in ("1", "2", "3", "4"):
            raise ValueError(f"ATTN_CPU_FWD_GROUP={forced!r}: expected 1, 2, 3 or 4")
        return int(forced)
    if not packed:
        return 1
    BMp = _padded(BM)
    state = (D * BMp + BMp * _padded(Dv) + 2 * BMp) * itemsize
    for G in (4, 2):
        if G * state <= _FWD_GROUP_BYTES and (
            nthreads == 1 or B * Hq * n_items(G) >= _FWD_ITEMS_PER_THREAD * nthreads
        ):
            return G
    return 1


def _common_args(q, k, v, attn_mask, is_causal, scale, blocks, flex=None, fwd=False):
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    BM, BN = blocks
    mask_kind, mask_t, mask_ptr = _mask_args(attn_mask, B, Hq, Lq, Lk, q.dtype)
    band = band_of(flex)
    jagged = None
    group = 1
    if fwd:
        if band is not None:
            def n_items(G):
                # Cached on the band: a repeated varlen call asks again for each G.
                key = ("n_items", G * BM)
                n = band._schedules.get(key)
                if n is None:
                    lens = band.q1 - band.q0
                    n = band._schedules[key] = int(((lens + G * BM - 1) // (G * BM)).sum())
                return n
        else:
            nqb = -(-Lq // BM)

            def n_items(G):
                return -(-nqb // G)
        group = _fwd_group(B, Hq, BM, D, Dv, q.element_size(), num_threads(), n_items,
                           _rows_packed(k) or _rows_packed(v))
    if band is not None:
        jagged, _ = _jagged_args(band, BM, BN, group)
        kv_full = kv_part = q_full = q_part = (None, None)
    elif flex is not None and flex.lists is not None:
        kv_full, kv_part, q_full, q_part = _flex_lists(flex)
    else:
        kv_full, kv_part, q_full, q_part = _dense_lists(
            Lq, Lk, BM, BN, bool(is_causal), mask_kind != 0
        )
    args = {
        "sizes": (B, Hq, Hkv, Lq, Lk, D, Dv),
        "blocks": (BM, BN),
        "scale": float(scale),
        "causal": int(bool(is_causal)),
        "mask_kind": mask_kind,
        "q": _ptr(q),
        "k": _ptr(k),
        "v": _ptr(v),
        "kv_full": _blocks(*kv_full),
        "kv_part": _blocks(*kv_part),
        "q_full": _blocks(*q_full),
        "q_part": _blocks(*q_part),
    }
    if mask_ptr is not None:
        args["mask"] = mask_ptr
    if fwd:
        args["fwd_group"] = group
    if jagged is not None:
        args["jagged"] = jagged
    mod_keep = None
    if flex is not None:
        args["mods"], mod_keep = _mod_args(flex, q.dtype, with_mask=band is None)
    # Keep every tensor whose pointer is in args alive for the duration of the call.
    keep = (mask_t, kv_full, kv_part, q_full, q_part, mod_keep)
    return args, keep


def forward(q, k, v, attn_mask=None, is_causal=False, scale=None, blocks=None, flex=None):
    """out (dtype of q) and lse (float32; float64 for float64 inputs), natural log.

    ``flex`` (attn's FlexAttention path): an object with ``lists`` (the block mask's
    KernelLists at tile size ``blocks``, or None for dense), ``mask_mod`` and
    ``score_mod`` (CompiledMods or None) and ``max_scores`` (bool); with
    ``max_scores`` the row maxima of the modified scores come back as a third output."""
    cdt = accumulation_dtype(q.dtype)
    qc, kc, vc = (_as_compute(t, cdt) for t in (q, k, v))
    B, Hq, Lq, D = q.shape
    Dv = v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    band = band_of(flex)
    if band is not None:
        # Per-sequence tiles need no relation to the mask's block size.
        blocks = (BLOCK_M, BLOCK_N)
    if band is not None and q.stride(1) < q.stride(2):
        # Packed (tokens, heads, D) queries viewed as (B, H, tokens, D): out in the same
        # layout, so varlen_attn's (tokens, heads, Dv) result is a view, not a copy.
        out = torch.empty(B, Lq, Hq, Dv, dtype=cdt).transpose(1, 2)
    else:
        out = torch.empty(B, Hq, Lq, Dv, dtype=cdt)
    lse = torch.empty(B, Hq, Lq, dtype=cdt)
    mx = None
    if flex is not None and flex.max_scores:
        mx = torch.full((B, Hq, Lq), float("-inf"), dtype=cdt)
    if out.numel() or lse.numel():
        args, keep = _common_args(qc, kc, vc, attn_mask, is_causal, scale,
                                  blocks or (BLOCK_M, BLOCK_N), flex, fwd=True)
        args["o"] = _ptr(out)
        args["lse"] = lse.data_ptr()
        if mx is not None:
            args["max_scores"] = mx.data_ptr()
        _k.forward(args, cdt == torch.float64, num_threads())
        del keep
    if mx is not None:
        return out.to(q.dtype), lse, mx
    return out.to(q.dtype), lse


def _forced_schedule() -> str | None:
    forced = os.environ.get("ATTN_CPU_BWD_SCHEDULE", "auto").strip().lower() or "auto"
    if forced not in ("auto", "fused", "split"):
        raise ValueError(
            f"ATTN_CPU_BWD_SCHEDULE={forced!r}: expected 'auto', 'fused' or 'split'"
        )
    return None if forced == "auto" else forced


def _jagged_schedule_choice(band, BM, BN, kv_heads, group, nthreads) -> str:
    """The backward schedule of a jagged problem: fused items are one per (sequence,
    kv head), as uneven as the sequences, so fused is taken when its greedy makespan
    still beats split's extra products (JaggedBand.fused_pays)."""
    forced = _forced_schedule()
    if forced is not None:
        return forced
    sched = band.schedule(BM, BN)
    return "fused" if band.fused_pays(sched, kv_heads, group, nthreads) else "split"


def choose_schedule(B: int, Hkv: int, nthreads: int) -> str:
    """Backward schedule: "fused" gives each (batch, kv head) to one thread, which then
    accumulates dQ itself (5 tile GEMMs per block pair); "split" runs dK/dV over kv
    blocks and then dQ over q blocks (7 GEMMs: S and dP are recomputed for dQ) but
    never idles cores when heads are few. Fused is taken only when the heads divide
    evenly among the threads with at least two rounds, so no core idles either.
    ATTN_CPU_BWD_SCHEDULE (auto, fused, split) overrides."""
    forced = _forced_schedule()
    if forced is not None:
        return forced
    heads = B * Hkv
    if nthreads == 1 or (heads % nthreads == 0 and heads >= 2 * nthreads):
        return "fused"
    return "split"


def backward(q, k, v, out, lse, grad_out, grad_lse=None, attn_mask=None,
             is_causal=False, scale=None, blocks=None, flex=None):
    """dq, dk, dv in the input dtypes. grad_lse (optional) is the gradient reaching lse."""
    cdt = accumulation_dtype(q.dtype)
    qc, kc, vc, oc, doc = (_as_compute(t, cdt) for t in (q, k, v, out, grad_out))
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    band = band_of(flex)
    BM, BN = (BLOCK_M, BLOCK_N) if band is not None else (blocks or (BLOCK_M, BLOCK_N))
    # d(lse_i)/d(s_ij) = P_ij, so a gradient on lse enters as delta_i -= dlse_i.
    delta = (doc * oc).sum(-1, dtype=cdt)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdt)
    delta = delta.contiguous()
    lse_c = lse.to(cdt).contiguous()
    dq = torch.zeros(B, Hq, Lq, _padded(D), dtype=cdt)
    dk = torch.zeros(B, Hkv, Lk, _padded(D), dtype=cdt)
    dv = torch.zeros(B, Hkv, Lk, _padded(Dv), dtype=cdt)
    if Lq and Lk:
        args, keep = _common_args(qc, kc, vc, attn_mask, is_causal, scale, (BM, BN), flex)
        args.update(
            do=_ptr(doc), lse=lse_c.data_ptr(), delta=delta.data_ptr(),
            dq=dq.data_ptr(), dk=dk.data_ptr(), dv=dv.data_ptr(),
        )
        nt = num_threads()
        if band is not None:
            fused = _jagged_schedule_choice(band, BM, BN, B * Hkv, Hq // Hkv, nt) == "fused"
        else:
            fused = choose_schedule(B, Hkv, nt) == "fused"
        _k.backward(args, cdt == torch.float64, nt, fused)
        del keep
    # The kernels accumulate Q K^T-gradients unscaled; the softmax scale enters here.
    dq = (dq[..., :D] * scale).to(q.dtype)
    dk = (dk[..., :D] * scale).to(k.dtype)
    dv = dv[..., :Dv].to(v.dtype)
    return dq, dk, dv
