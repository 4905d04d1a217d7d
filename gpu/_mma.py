"""Tensor-core (mma.sync m16n8k16) FlashAttention-2 forward for float16/bfloat16 inputs.

The same kernel contract and argument list as the SIMT forward in gpu/_kernels.py (so
the launcher, the kv-block lists of dense/causal/block-mask/jagged calls, the mods and
the attn_mask path are shared); only the inner products, the tile staging and the
softmax bookkeeping differ.

CTA: NW warps, BLOCK_M = 16*NW*MT query rows (MT m16 tiles per warp), BLOCK_N keys per
kv block (``config``: D <= 64 takes 4 warps x 2 tiles = 128 rows, D <= 128 4 x 1 = 64).

* Q (BLOCK_M x D) is copied once to shared memory (cp.async, 16 bytes per copy) and
  read into A fragments (ldmatrix.x4) kept in registers for the whole kv loop (QREG;
  otherwise re-read from shared memory every kv block).
* K and V tiles (BLOCK_N x D, BLOCK_N x Dv) are double-buffered in shared memory: the
  copies of kv block it+1 are issued before block it is computed, so global latency
  hides behind the tensor-core work of the current block.
* S = Q K^T: per warp a 16 x BLOCK_N f32 accumulator (BLOCK_N/8 m16n8 tiles, four
  floats each per lane), B fragments of K by ldmatrix (K's row-major (key, dim) tile is
  the column-major B that the .row.col mma takes).
* Online softmax in the log2 domain (scale*log2(e) folded into one multiply, exp2 on
  the MUFU unit); a fragment row lives in the four lanes 4g..4g+3, so the row max is
  two butterfly shuffles. The row sum stays per lane until the end (as in FA-2).
* O += P V: P's f32 accumulators rounded to the input type are already the A
  fragments of the P.V product (the C layout of two adjacent m16n8 tiles is the A
  layout of one m16k16 tile), V's B fragments come from ldmatrix.trans of its
  row-major tile. O stays in registers (16 x Dv per warp).
* Shared rows are padded by 8 elements (16 bytes): the 8 row addresses of one
  ldmatrix matrix then start 4 banks apart and cover all 32 banks (no conflicts).

Rows past Lq and keys past Lk are zero-filled in shared memory (cp.async's src-size
operand); keys past Lk, causal and mask_mod exclusions are -inf in S. A row that sees
no key keeps m = -inf and gives out 0, lse -inf.

Tiles are copied 16 bytes at a time (cp.async) when a slice's head dim is contiguous
and its rows 16-byte aligned, which the kernel checks on the actual addresses; other
layouts are staged by plain element loads through the strides (same kernel).

float32 inputs (kind "f32", switch ``attn.gpu.TF32X3`` / ATTN_GPU_TF32X3) run the same
kernel on ``mma.sync.m16n8k8`` tf32 with the 3xTF32 split (gpu/_ptx.py: each operand
x = big + small, A*B ~= As*Bb + Ab*Bs + Ab*Bb in float32 accumulators), which keeps
float32 accuracy; the differences from the 16-bit kinds:

* tiles are float32 in shared memory, rows padded by 4 words (16 bytes: ldmatrix's 8
  row addresses then start 4 banks apart); S's k-steps are 8 dims; Q's fragments are
  read from shared memory and split each kv block (a split Q would take twice the
  registers of a 16-bit one).
* O += P V runs in k-steps of 8 keys whose order inside the step is permuted: A column
  t stands for key 2t and column t+4 for key 2t+1, so S's accumulators (c0, c1 = keys
  2t, 2t+1) are the A fragment as they are (a0 = c0, a1 = c2, a2 = c1, a3 = c3), and
  V's B rows are read at the same permutation. ldmatrix.trans cannot transpose 32-bit
  elements; instead the head-dim (n) index is permuted too: n-tile q (0..3) of a
  32-dim group J holds dims 32J + 4n + q, so one 16-byte ld.shared.v4 of V row
  (key, 32J + 4g .. 4g+3) is the b0 (or b1) of four n-tiles. With rows of Dv + 4 words
  the 8 lanes of a quarter warp (g = 0, 1; t = 0..3) hit 8 distinct 16-byte bank
  groups. The output columns follow the same map (epilogue).
"""
from __future__ import annotations

import math
import os
from collections import namedtuple
from functools import lru_cache

import numpy as np

from ._cuda import SIM, cuda, float32, int32, int64
from ._kernels import _JIT, _block_at, _hooks, _storer
from ._ptx import SCRATCH_WORDS, gaddr, ops

__all__ = ["forward_kernel", "shared_bytes", "reasons", "tile", "threads", "config"]

NEG_INF = np.float32(-np.inf)
# A partial block of a mask_mod-only call evaluates the mask into per-row bit sets and
# applies them in registers (forward_kernel); ATTN_GPU_MASK_REGS=0 sends it through the
# shared-memory copy of S as score_mod calls do. Read once at import.
MASK_REGS = os.environ.get("ATTN_GPU_MASK_REGS", "1").strip() != "0"
# A score_mod call (without attn_mask) applies the mod to the S registers of every
# block, its mask_mod (if any) as bit sets on partial blocks (forward_kernel SCOREREG);
# ATTN_GPU_SCORE_REGS=0 sends every block through the shared-memory copy of S instead.
SCORE_REGS = os.environ.get("ATTN_GPU_SCORE_REGS", "1").strip() != "0"
# Lazy rescaling (FlashAttention-4's trick; bench/NOTES.md G24): the row's reference
# maximum moves only when a block's maximum exceeds it by more than LAZY_TH (log2 units),
# so P stays below 2^LAZY_TH and most blocks skip the O rescale and the alpha exp2; and a
# block without exclusions folds the softmax scale into the exponent's FMA instead of a
# multiply per score. Off until measured on a GPU (written with the simulator only):
# ATTN_GPU_LAZY_RESCALE=1 turns it on. Read once at import.
LAZY_RESCALE = os.environ.get("ATTN_GPU_LAZY_RESCALE", "0").strip() == "1"
LAZY_TH = np.float32(8.0)
# K/V stages of the forward's kv loop (bench/NOTES.md G25): 2 (double buffering, two
# barriers per kv block: data landed, buffer free) or 3 (the prefetch runs two blocks
# ahead into the buffer of the block before, which the one barrier per block has freed).
# 2 until 3 has been measured on a GPU (written with the simulator only):
# ATTN_GPU_FWD_STAGES=3. Read once at import.
FWD_STAGES = 3 if os.environ.get("ATTN_GPU_FWD_STAGES", "2").strip() == "3" else 2
ZERO = np.float32(0.0)
ONE = np.float32(1.0)
LOG2E = np.float32(1.4426950408889634)
LN2 = np.float32(0.6931471805599453)
# _JIT (disk cache; line info under ATTN_GPU_LINEINFO=1) is shared with the SIMT kernels.


class Tiles:
    """The tile configurations of one tensor-core kernel (shared by gpu/_mma_bwd.py):
    ``table`` maps the largest max(D, Dv) an entry serves to its Config (larger head dims
    take the last entry), the simulator takes ``sim``. The environment variable ``env``
    replaces entries, "64:4,2,64,1;128:4,2,64,0" (the Config fields in order): the
    tuning knob of the device scripts, read once at import; the key "sim" replaces the
    simulator's (the simulator tests of configurations other than its default)."""

    def __init__(self, Config, table: dict, sim, env: str):
        self.table = dict(table)
        self.sim = sim
        spec = os.environ.get(env, "")
        if spec:
            for part in spec.split(";"):
                dd, vals = part.split(":")
                cfg = Config(*(int(x) for x in vals.split(",")))
                if dd.strip() == "sim":
                    self.sim = cfg
                else:
                    self.table[int(dd)] = cfg

    def config(self, D: int, Dv: int):
        if SIM:
            return self.sim
        w = max(D, Dv)
        for lim in sorted(self.table):
            if w <= lim:
                return self.table[lim]
        return self.table[max(self.table)]

    def threads(self, D: int, Dv: int) -> int:
        return 32 * self.config(D, Dv).NW


class Variants:
    """The tile tables of one tensor-core kernel (gpu/_mma.py, gpu/_mma_bwd.py): the
    16-bit kinds' large and small tiles, and float32's (3xTF32)."""

    def __init__(self, large: Tiles, small: Tiles, tf32: Tiles):
        self.large, self.small, self.tf32 = large, small, tf32

    def config(self, D: int, Dv: int, kind: str = "bf16", small: bool = False):
        """The tiles of a kernel variant, per head dims and dtype kind; ``small``: the
        16-bit kinds' smaller tiles, for the attn_mask variant (its larger tiles spill)
        and for block masks whose BLOCK_SIZE the larger tiles do not divide."""
        if kind == "f32":
            return self.tf32.config(D, Dv)
        return (self.small if small else self.large).config(D, Dv)

    def threads(self, D: int, Dv: int, kind: str = "bf16", small: bool = False) -> int:
        return 32 * self.config(D, Dv, kind, small).NW


def head_dim_reasons(kind: str, D: int, Dv: int, simt: str, kept: str) -> list[str]:
    """Why a tensor-core kernel cannot run these head dims / dtype (empty if it can):
    ``simt`` names the SIMT fallback, ``kept`` what must stay in registers."""
    r = []
    if kind not in ("f16", "bf16"):
        r.append(f"{kind} inputs use the SIMT {simt} (no TF32 path)")
    if D % 16 or Dv % 16:
        r.append(f"head dims {D}/{Dv} are not multiples of 16 (the mma k-step)")
    if max(D, Dv) > MAX_D:
        r.append(f"head dims above {MAX_D} would not keep {kept} in registers")
    return r


# Tile configurations (warps, m16 tiles per warp, keys per kv block, Q fragments in
# registers). Two m16 tiles per warp use every K/V fragment read from shared memory
# twice (half the ldmatrix traffic per mma, and half the K/V copies per flop);
# at D = 128 that needs Q re-read from shared memory each kv block (its fragments
# would not fit beside 2 x 16 x 128 accumulators). bench/NOTES.md (G7) has the
# measurements. The simulator runs every thread as a Python thread: two warps and
# 16-key blocks still give several q and kv blocks at L = 33. D = 128 takes two tiles x
# 32 keys (FlashAttention-2's 128-row CTA) since the tile loader's index math stopped
# holding registers (G23: 249 registers, no spill; +11-12% non-causal, +1-3% causal on
# the H200 against one tile x 64 keys with Q in registers). Its attn_mask variant
# spills there (48 bytes), so attn_mask keeps one tile x 64 keys (_SMALL_TILES, also for
# block masks whose BLOCK_SIZE the 128-row tiles do not divide). Tuning knobs for
# bench/device/mma_check.py: ATTN_GPU_MMA_CONFIG="64:4,2,64,1;128:4,2,32,0",
# ATTN_GPU_MMA_SMALL_CONFIG (the small tiles), same format.
Config = namedtuple("Config", "NW MT BN QREG")
_TILES = Tiles(Config, {64: Config(4, 2, 64, True), 128: Config(4, 2, 32, False)},
               Config(2, 1, 16, True), "ATTN_GPU_MMA_CONFIG")
_SMALL_TILES = Tiles(Config, {64: Config(4, 2, 64, True), 128: Config(4, 1, 64, True)},
                     Config(2, 1, 16, True), "ATTN_GPU_MMA_SMALL_CONFIG")
# float32 (3xTF32): float32 tiles take twice the shared memory of 16-bit ones. D <= 64:
# two m16 tiles per warp with 32-key blocks (each K/V fragment and its split serve two
# tiles; 186 registers, 68 KiB: two CTAs per SM; +10-20% over one tile x 64 keys on the
# H200; two tiles x 64 keys need 255 registers and spill). D = 128: one tile, 32-key
# blocks (Q 33 KiB + 2 x (K + V) 66 KiB: two CTAs per SM; with 64-key blocks NVVM
# leaves the P.V loop rolled and S goes to local memory). Q always comes from shared
# memory (QREG must be 0). bench/NOTES.md (G10) has the measurements. Tuning knob:
# ATTN_GPU_TF32_CONFIG, same format.
_TF32_TILES = Tiles(Config, {64: Config(4, 2, 32, False), 128: Config(4, 1, 32, False)},
                    Config(2, 1, 16, False), "ATTN_GPU_TF32_CONFIG")
MAX_D = 128
_VARIANTS = Variants(_TILES, _SMALL_TILES, _TF32_TILES)
config, threads = _VARIANTS.config, _VARIANTS.threads


def tile(D: int, Dv: int, kind: str = "bf16", small: bool = False) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the kernel for head dims D, Dv (and element kind)."""
    c = config(D, Dv, kind, small)
    return 16 * c.NW * c.MT, c.BN


def reasons(kind: str, D: int, Dv: int) -> list[str]:
    """Why the tensor-core forward cannot run these head dims / dtype (empty if it can);
    the launcher then uses the SIMT forward."""
    if kind == "f32":
        r = []
        if D % 8 or Dv % 32:
            r.append(f"head dims {D}/{Dv}: the 3xTF32 forward needs D a multiple of 8 "
                     "(the tf32 k-step) and Dv a multiple of 32 (its V fragment groups)")
        if max(D, Dv) > MAX_D:
            r.append(f"head dims above {MAX_D} would not keep O in registers")
        return r
    return head_dim_reasons(kind, D, Dv, "kernels", "Q and O")


def shared_bytes(D: int, Dv: int, mods: bool = False, kind: str = "bf16",
                 small: bool = False) -> int:
    """Dynamic shared memory of a CTA: Q, ``stages`` K and V buffers (bf16/f16
    elements, rows padded by 8; float32 rows padded by 4), plus a float32 copy of S for
    calls with mods or attn_mask."""
    return _bytes(D, Dv, mods, kind, small, stages(D, Dv, mods, kind, small))


def _bytes(D, Dv, mods, kind, small, S):
    BM, BN = tile(D, Dv, kind, small)
    size, pad = (4, 4) if kind == "f32" else (2, 8)
    n = size * (BM * (D + pad) + S * BN * (D + pad) + S * BN * (Dv + pad))
    return n + (4 * BM * BN if mods else 0)


# Shared memory of an sm_90 SM (228 KiB) and what the driver reserves per CTA (1 KiB).
_SM_SHARED, _CTA_RESERVED = 228 * 1024, 1024


def stages(D: int, Dv: int, mods: bool = False, kind: str = "bf16",
           small: bool = False) -> int:
    """K/V stages of a forward variant: FWD_STAGES where two CTAs per SM still fit at
    three (a third stage that left one CTA per SM would cost more than its barrier
    saves), else 2."""
    if FWD_STAGES == 3 and 2 * (_bytes(D, Dv, mods, kind, small, 3) + _CTA_RESERVED) \
            <= _SM_SHARED:
        return 3
    return 2


@cuda.jit(device=True, inline=True)
def _fmax(a, b):
    # (the max builtin fails to type for two float32 values in this numba-cuda)
    return a if a > b else b


@lru_cache(maxsize=None)
def _loader(ROWS: int, W: int, LD: int, NTH: int, kind: str, cp16):
    """Copy rows r0..r0+ROWS (W elements each) of one (batch, head) slice into the
    shared tile at ``off`` (leading dimension LD); rows at or past L become zeros.
    ``vec`` (decided per CTA, see ``vec_ok``): 16-byte cp.async per 8 elements (4
    for float32); else
    element loads through the strides (synchronous)."""
    VEC = 4 if kind == "f32" else 8  # elements per 16-byte copy
    W8 = W // VEC
    NCH = ROWS * W8
    CH = -(-NCH // NTH)
    NE = ROWS * W
    CHE = -(-NE // NTH)

    # Whole rows per pass of the CTA's threads (the default tiles): a thread's column
    # stays the same from pass to pass and its row steps by NTH // W8, so the index
    # math is one row step per pass (computed generally, the floor divisions and their
    # 64-bit sign fix-ups ran per copy and their hoisted offsets held registers).
    ROWSTEP = NTH // W8 if NTH % W8 == 0 and NCH % NTH == 0 else 0

    @cuda.jit(device=True, inline=True)
    def load(sm, off, a, base, r0, s_l, s_d, L, tid, vec):
        if vec and ROWSTEP:
            r = int32(tid) // int32(W8)
            cc = int32(tid) - r * int32(W8)
            so = off + r * LD + cc * VEC
            rr = r0 + r
            g = base + rr * s_l + cc * VEC
            for i in range(CH):
                ok = rr < L
                cp16(sm, so, a, g if ok else base, ok)
                so += ROWSTEP * LD
                rr += ROWSTEP
                g += ROWSTEP * s_l
        elif vec:
            for i in range(CH):
                c = tid + i * NTH
                if NCH % NTH == 0 or c < NCH:
                    r = c // W8
                    cc = c - r * W8
                    rr = r0 + r
                    ok = rr < L
                    g = base
                    if ok:
                        g = base + rr * s_l + cc * VEC
                    cp16(sm, off + r * LD + cc * VEC, a, g, ok)
        else:
            for i in range(CHE):
                e = tid + i * NTH
                if NE % NTH == 0 or e < NE:
                    r = e // W
                    d = e - r * W
                    rr = r0 + r
                    if rr < L:
                        sm[off + r * LD + d] = a[base + rr * s_l + d * s_d]
                    else:
                        # (an integer 0: Numba cannot emit a float16 constant)
                        sm[off + r * LD + d] = 0

    return load


@cuda.jit(device=True, inline=True)
def vec_ok(a, base, s_l, s_d):
    """Rows of a (batch, head) slice can be copied 16 bytes at a time: contiguous head
    dim, 16-byte aligned first row and row stride. Checked in the kernel (per CTA, on
    the actual addresses) so that any view, however offset, is served correctly
    whatever plan or bound launch the host reuses. (For float32 a row stride that is
    a multiple of 4 would do; asking for 8 only sends more views to element loads.)"""
    return s_d == 1 and (s_l & 7) == 0 and (gaddr(a, base) & 15) == 0


def mask_bits(mask_fn, CAUSAL: bool, NCB: int, KEYS_ALONG: bool):
    """The device function of the kernels' bit-set mask path (forward and backward
    MASKREG): the mask of one lane index ``fixed`` (a query row when KEYS_ALONG, else a
    key row) against the lane's NCB indices of the other kind, c0 + 8*(j >> 1) + (j & 1),
    as bit j of an int32. Keys past Lk and (CAUSAL) keys after the query are hidden.

    Branch-free: mask_mod is evaluated at every position with the indices clamped into
    [0, Lq) x [0, Lk) (so its buffer loads are always in range, as FlexAttention's own
    kernels evaluate it on padded positions) and the out-of-range / causal tests are
    and-ed in afterwards. A mod guarded by a per-column branch cannot have its loads
    speculated, so each column's load waited for the previous one (a document mask's
    partial blocks cost 6x a full block on the H200, bench/NOTES.md G15)."""

    @cuda.jit(device=True, inline=True)
    def bits_of(b, h, fixed, c0, Lq, Lk, x0, x1, x2, x3):
        bits = 0
        for j in range(NCB):
            other = c0 + 8 * (j >> 1) + (j & 1)
            qm = fixed if KEYS_ALONG else other
            kn = other if KEYS_ALONG else fixed
            inside = (kn < Lk) & (qm < Lq)
            if CAUSAL:
                inside = inside & (kn <= qm)
            m = mask_fn(b, h, min(qm, Lq - 1), min(kn, Lk - 1), x0, x1, x2, x3)
            bits |= int32(inside & bool(m)) << j
        return int32(bits)

    return bits_of


def _score_regs(score_fn, MNS: int, NS: int):
    """The forward's SCOREREG step as a device function written out element by element:
    score_mod on each of the lane's MNS S registers, then the exclusions (bit j of the
    row slot's ``lim`` when ``bits``, else column < ``lim``). Generated source, not a
    loop: with the mod's body inside, NVVM leaves a 64-element loop rolled and S goes to
    local memory (272-byte stack frame seen in ptxas); constant indices keep S in
    registers."""
    lines = ["def score_regs(s, lim, bits, c0, rw, b, h, Lq, Lk, sc, x0, x1, x2, x3):",
             "    qa = Lq - 1", "    ka = Lk - 1"]
    for idx in range(MNS):
        r = 2 * (idx // NS) + ((idx >> 1) & 1)
        j = 2 * ((idx % NS) >> 2) + (idx & 1)
        dc = 8 * ((idx % NS) >> 2) + (idx & 1)
        dr = 16 * (idx // NS) + 8 * ((idx >> 1) & 1)
        lines += [
            f"    x = elem(s[{idx}] * sc, b, h, min(rw + {dr}, qa), "
            f"min(c0 + {dc}, ka), x0, x1, x2, x3) * LOG2E",
            f"    keep = ((lim[{r}] >> {j}) & 1) != 0 if bits else c0 + {dc} < lim[{r}]",
            f"    s[{idx}] = x if keep else NEG_INF"]
    # The mod as its own device function, inlined by NVVM rather than by Numba: 64
    # Numba-level inlines of it cost ~70 s of compile time, one call target ~5 s.
    @cuda.jit(device=True)
    def elem(x, b, h, q, k, x0, x1, x2, x3):
        return float32(score_fn(x, b, h, q, k, x0, x1, x2, x3)[0])

    ns = {"elem": elem, "LOG2E": LOG2E, "NEG_INF": NEG_INF}
    exec(compile("\n".join(lines) + "\n", "<attn score_regs>", "exec"), ns)
    return cuda.jit(device=True, inline=True)(ns["score_regs"])


@lru_cache(maxsize=None)
def forward_kernel(kind: str, D: int, Dv: int, CAUSAL: bool, MASK: bool, mods=None,
                   JAG: int = 0, MAXS: bool = False, SMALL: bool = False):
    """The tensor-core forward for one specialisation; same arguments as
    _kernels.forward_kernel's kernels.

    ``JAG`` (1, or 2 with left window edges): packed variable-length sequences (B = 1)
    scheduled per sequence, as FlashAttention's varlen kernels: CTA x reads item
    ``kvf_num[8 * x : 8 * x + 7]`` of a table (jagged_items) = first query row m0, the
    sequence's query end, the first key tile's start, the number of BN-key tiles, the
    sequence's key end, ``dg``: row r sees keys below r + dg (its causal / right-window
    edge), and (JAG 2) ``dl``: row r sees keys from r + dl on (its left-window edge). Q
    tiles start at the sequence's first query and kv tiles at its first key (or the tile
    of the first visible one), so no tile straddles two sequences and no mask_mod runs:
    the only exclusions are column limits. The other list arguments are unused.

    ``MAXS``: FlexAttention's max_scores too (the row maximum of the scaled scores after
    score_mod and the masks, -inf for a row that saw no key), in a second plane of the
    lse argument: ``lse`` then holds 2 * gridDim.y * Lq values, max_scores from
    gridDim.y * Lq on (no new kernel argument, so the other specialisations and their
    bound launches are untouched).

    ``SMALL``: the small tiles (config); an attn_mask (MASK) takes them anyway."""
    if reasons(kind, D, Dv):
        raise ValueError("; ".join(reasons(kind, D, Dv)))
    if JAG and (CAUSAL or MASK or mods is not None):
        raise ValueError("the jagged forward takes its limits from the item table: no "
                         "causal flag, attn_mask or mods")
    mask_fn, score_fn, MASKMOD, SCORE = _hooks(mods)
    o_ = ops(kind)
    frag_a, frag_b2, frag_bt2, mma = o_.frag_a, o_.frag_b2, o_.frag_bt2, o_.mma
    quad_max, quad_sum, pack, exp2 = o_.quad_max, o_.quad_sum, o_.pack, o_.exp2
    commit, wait_all, wait_one, wait_two = o_.commit, o_.wait_all, o_.wait_one, o_.wait_two
    split, lds4, mma3 = o_.split, o_.lds4, o_.mma3
    st = _storer(kind)
    from numba.core import types

    TF32 = kind == "f32"  # 3xTF32 products (module docstring)
    ELT = float32 if TF32 else types.float16 if kind == "f16" else types.int16

    NW, MT, BN, QREG = config(D, Dv, kind, SMALL or MASK)
    if TF32 and QREG:
        raise ValueError("the 3xTF32 forward reads Q from shared memory (QREG = 0)")
    BM = 16 * NW * MT
    NTH = 32 * NW
    KSTEP = 8 if TF32 else 16  # the mma's k
    PAD = 4 if TF32 else 8     # 16 bytes of padding per shared row
    LDQ, LDV = D + PAD, Dv + PAD
    KD = D // KSTEP    # k-steps of S = Q K^T
    NTS = BN // 8      # m16n8 tiles of S per warp
    KV = BN // KSTEP   # k-steps of O += P V
    NTO = Dv // 8      # m16n8 tiles of O per warp
    NVG = Dv // 32     # 3xTF32: 32-dim groups of V (four n-tiles each)
    NS, NO = 4 * NTS, 4 * NTO  # S and O registers per lane and m16 tile
    MNS, MNO, MR = MT * NS, MT * NO, 2 * MT  # ... over the warp's m16 tiles; row slots
    NPA = 4 * MT  # P fragment registers (3xTF32: big and small, NPA each)
    NQF = MT * 4 * KD if QREG else MT * 4  # Q fragment registers
    STAGES = stages(D, Dv, MASK or mods is not None, kind, SMALL or MASK)
    OQ = 0
    OK0 = BM * LDQ
    KSZ = BN * LDQ
    OV0 = OK0 + STAGES * KSZ
    VSZ = BN * LDV
    SCR = SCRATCH_WORDS(NW)
    # Full blocks of a mask-only call need no per-element work (FlexAttention's
    # full/partial split): only score_mod, or a partial block's attn_mask (or mask_mod
    # when MASKREG is off), take the shared-memory path; the rest the register path.
    MASKS = MASK or MASKMOD
    # mask_mod alone on a partial block: a rolled loop per row slot (it touches no
    # register array, so rolling it costs nothing) evaluates the mask into a bit set of
    # the lane's NCB columns, and the unrolled register loop applies the bits. Saves
    # the shared-memory round trip of S and lets the compiler hoist the row's loads.
    NCB = NS // 2  # columns of a row slot per lane and block
    MASKBITS = MASK_REGS and MASKMOD and not MASK and MT <= 2 and NCB <= 32
    MASKREG = MASKBITS and not SCORE
    # score_mod in registers: the mod evaluated per element of the unrolled S loop at
    # indices clamped into range (so its loads are always in bounds and need no branch),
    # exclusions applied by select afterwards; a mask_mod's partial blocks through the
    # bit sets above.
    SCOREREG = (SCORE_REGS and SCORE and not MASK and MT <= 2
                and (not MASKMOD or MASKBITS))

    LAZY = LAZY_RESCALE
    TH = LAZY_TH

    row_bits = mask_bits(mask_fn, CAUSAL, NCB, True)
    score_regs = _score_regs(score_fn, MNS, NS) if SCOREREG else None
    # float32 offset of the mods' S scratch (16-bit tiles: two elements per word)
    OMF = OV0 + STAGES * VSZ if TF32 else (OV0 + STAGES * VSZ) // 2
    load_q = _loader(BM, D, LDQ, NTH, kind, o_.cp16)
    load_k = _loader(BN, D, LDQ, NTH, kind, o_.cp16)
    load_v = _loader(BN, Dv, LDV, NTH, kind, o_.cp16)

    @cuda.jit(device=True, inline=True)
    def kv_start(i, nb0, nf, lr, ncols, kvf_idx, kvp_idx):
        # First key of the CTA's i-th kv block: JAG, the item's tiles from its first
        # one on; else the i-th entry of the block lists.
        if JAG:
            return nb0 + i * BN
        return _block_at(i, nf, lr, ncols, kvf_idx, kvp_idx) * BN

    @cuda.jit(device=True, inline=True)
    def load_kv(sm, slot, n, k, v, kbase, vbase, ks_l, ks_d, vs_l, vs_d, klim, tid, vk,
                vv):
        # The kv block from key n into K/V buffer ``slot``.
        load_k(sm, OK0 + slot * KSZ, k, kbase, n, ks_l, ks_d, klim, tid, vk)
        load_v(sm, OV0 + slot * VSZ, v, vbase, n, vs_l, vs_d, klim, tid, vv)

    @cuda.jit(device=True, inline=True)
    def epilogue(o, lse, acc, l_r, m_r, t_r, r, rw, qlim, b, h, bh, t, Lq, os_b, os_h,
                 os_l, os_d):
        # Row slot r (rows rw + 8r): O / l out (0 for a row that saw no key), and lse.
        # m_r is the reference maximum of the exponents (the row maximum unless LAZY:
        # lse is exact for any reference), t_r the row maximum (MAXS with LAZY).
        row = rw + 8 * r
        if row < qlim:
            lsum = l_r[r]
            inv = ZERO
            if lsum > ZERO:
                inv = ONE / lsum
            obase = b * os_b + h * os_h + row * os_l
            c = (r >> 1) * NO + 2 * (r & 1)
            for j in range(NTO):
                for e in range(2):
                    # register (n-tile j, column 2t+e) -> head dim; 3xTF32: n-tile q =
                    # j % 4 of group j // 4 holds dims 32(j // 4) + 4n + q.
                    if TF32:
                        col = 32 * (j >> 2) + 8 * t + 4 * e + (j & 3)
                    else:
                        col = 8 * j + 2 * t + e
                    st(o, obase + col * os_d, acc[c + 4 * j + e] * inv)
            if t == 0:
                lv = NEG_INF
                if lsum > ZERO:
                    lv = (m_r[r] + math.log2(lsum)) * LN2
                lse[bh * Lq + row] = lv
                if MAXS:
                    # the running maximum in log2 units (scores * log2(e))
                    mv = NEG_INF
                    if lsum > ZERO:
                        mv = (t_r[r] if LAZY else m_r[r]) * LN2
                    lse[(cuda.gridDim.y + bh) * Lq + row] = mv

    @cuda.jit(**_JIT)
    def fwd(q, k, v, o, lse, mask,
            qs_b, qs_h, qs_l, qs_d, ks_b, ks_h, ks_l, ks_d,
            vs_b, vs_h, vs_l, vs_d, os_b, os_h, os_l, os_d,
            ms_b, ms_h, ms_q, ms_k,
            Hq, G, Lq, Lk, scale,
            kvf_num, kvf_idx, kvp_num, kvp_idx, ncols, lb, lh, x0, x1, x2, x3):
        # Heaviest q blocks first (causal: the last rows see the most keys), so the
        # tail of the grid is short blocks.
        qb = cuda.gridDim.x - 1 - cuda.blockIdx.x
        bh = cuda.blockIdx.y
        b = bh // Hq
        h = bh - b * Hq
        hk = h // G
        tid = cuda.threadIdx.x
        w = tid >> 5
        lane = tid & 31
        g = lane >> 2
        t = lane & 3

        sm = cuda.shared.array(0, ELT)
        scr = cuda.shared.array(SCR, float32)
        smf = cuda.shared.array(0, float32)  # the same dynamic shared memory
        qf = cuda.local.array(NQF, int32)
        pa = cuda.local.array(NPA, int32)
        # 3xTF32: the split Q and P fragments (tf32 big / small registers)
        qfb = cuda.local.array(NPA, int32)
        qfs = cuda.local.array(NPA, int32)
        ps = cuda.local.array(NPA, int32)
        s = cuda.local.array(MNS, float32)
        acc = cuda.local.array(MNO, float32)
        # Per row slot r = 2*mt + half (rows 16*(MT*w + mt) + g + 8*half of the block):
        # running max (log2 units), per-lane sum, and per-block scratch.
        m_r = cuda.local.array(MR, float32)
        l_r = cuda.local.array(MR, float32)
        x_r = cuda.local.array(MR, float32)
        y_r = cuda.local.array(MR, float32)
        t_r = cuda.local.array(MR, float32)  # the row maxima (MAXS with LAZY)
        lim = cuda.local.array(MR, int32)

        sl2 = float32(scale) * LOG2E
        sc = float32(scale)
        kbase = b * ks_b + hk * ks_h
        vbase = b * vs_b + hk * vs_h
        mbase = b * ms_b + h * ms_h
        if JAG:
            e = 8 * qb  # items ordered lightest first: qb runs heaviest first
            m0 = kvf_num[e]
            qlim = kvf_num[e + 1]   # rows at or past it: another sequence
            nb0 = kvf_num[e + 2]
            nt = kvf_num[e + 3]
            klim = kvf_num[e + 4]   # keys at or past it: another sequence
            dg = kvf_num[e + 5]
            lim0 = min(klim, m0 + dg)      # the tile's first row has the lowest limit
            dl = kvf_num[e + 6]
            # the tile's last row has the highest lower limit: tiles from there on
            # have no left-edge exclusions
            lo1 = min(qlim, m0 + BM) - 1 + dl
            nf = int64(0)
            lr = int64(0)
        else:
            m0 = int64(qb * BM)
            qlim = int64(Lq)
            klim = int64(Lk)
            nb0 = dg = lim0 = dl = lo1 = int64(0)
            lr = b * lb + h * lh + qb
            nf = int64(kvf_num[lr])
            nt = nf + kvp_num[lr]
        rw = m0 + 16 * MT * w + g  # row of slot 0
        OQW = OQ + 16 * MT * w * LDQ  # this warp's Q rows

        qbase = b * qs_b + h * qs_h
        vq = vec_ok(q, qbase, qs_l, qs_d)
        vk = vec_ok(k, kbase, ks_l, ks_d)
        vv = vec_ok(v, vbase, vs_l, vs_d)
        load_q(sm, OQ, q, qbase, m0, qs_l, qs_d, qlim, tid, vq)
        commit()
        if nt > 0:
            load_kv(sm, 0, kv_start(0, nb0, nf, lr, ncols, kvf_idx, kvp_idx), k, v, kbase,
                    vbase, ks_l, ks_d, vs_l, vs_d, klim, tid, vk, vv)
        commit()
        if STAGES == 3:
            if nt > 1:
                load_kv(sm, 1, kv_start(1, nb0, nf, lr, ncols, kvf_idx, kvp_idx), k, v,
                        kbase, vbase, ks_l, ks_d, vs_l, vs_d, klim, tid, vk, vv)
            # (an empty group when there is no second block: every later wait counts
            # one group per block)
            commit()
            wait_two()  # Q has landed (groups complete in order)
        else:
            wait_one()  # Q has landed (groups complete in order)
        cuda.syncthreads()
        if QREG:
            for f in range(MT * KD):
                mt = f // KD
                kk = f - mt * KD
                qf[4 * f], qf[4 * f + 1], qf[4 * f + 2], qf[4 * f + 3] = frag_a(
                    sm, OQW + 16 * mt * LDQ + 16 * kk, LDQ)
        for j in range(MNO):
            acc[j] = ZERO
        for r in range(MR):
            m_r[r] = NEG_INF
            l_r[r] = ZERO
            t_r[r] = NEG_INF

        buf = 0  # STAGES 3: block it's buffer, it % 3
        for it in range(nt):
            if STAGES == 2:
                buf = it & 1
            n0 = kv_start(it, nb0, nf, lr, ncols, kvf_idx, kvp_idx)
            if STAGES == 3:
                # Block it's group: all but the last one committed (block it+1's)
                # complete. The barrier then makes every thread's copies visible, and
                # tells that every warp is done with block it-1, whose buffer
                # ((it + 2) % 3) the prefetch of block it+2 may now overwrite.
                wait_one()
                cuda.syncthreads()
                if it + 2 < nt:
                    load_kv(sm, buf - 1 if buf > 0 else 2,
                            kv_start(it + 2, nb0, nf, lr, ncols, kvf_idx, kvp_idx), k, v,
                            kbase, vbase, ks_l, ks_d, vs_l, vs_d, klim, tid, vk, vv)
                commit()  # (empty past the last block: one group per block)
            elif it + 1 < nt:
                # Prefetch block it+1 into the other buffer: free since the barrier at
                # the end of iteration it-1.
                load_kv(sm, 1 - buf, kv_start(it + 1, nb0, nf, lr, ncols, kvf_idx, kvp_idx),
                        k, v, kbase, vbase, ks_l, ks_d, vs_l, vs_d, klim, tid, vk, vv)
                commit()
                wait_one()
            else:
                wait_all()
            if STAGES == 2:
                # Barrier: every thread's copies of block it are visible.
                cuda.syncthreads()
            okb = OK0 + buf * KSZ
            ovb = OV0 + buf * VSZ

            # S = Q K^T: each K fragment pair serves the warp's MT m16 tiles.
            for j in range(MNS):
                s[j] = ZERO
            if TF32:
                for kk in range(KD):
                    # 3xTF32: Q's fragments split once per k-step, K's once per pair of
                    # n-tiles; each product is three mma (mma3).
                    for mt in range(MT):
                        f = 4 * mt
                        a0, a1, a2, a3 = frag_a(sm, OQW + 16 * mt * LDQ + 8 * kk, LDQ)
                        qfb[f], qfs[f] = split(a0)
                        qfb[f + 1], qfs[f + 1] = split(a1)
                        qfb[f + 2], qfs[f + 2] = split(a2)
                        qfb[f + 3], qfs[f + 3] = split(a3)
                    for jp in range(NTS // 2):
                        k0, k1, k2, k3 = frag_b2(sm, okb + 16 * jp * LDQ + 8 * kk, LDQ)
                        kb0, ks0 = split(k0)
                        kb1, ks1 = split(k1)
                        kb2, ks2 = split(k2)
                        kb3, ks3 = split(k3)
                        for mt in range(MT):
                            f = 4 * mt
                            i = mt * NS + 8 * jp
                            s[i], s[i + 1], s[i + 2], s[i + 3] = mma3(
                                scr, qfb[f], qfb[f + 1], qfb[f + 2], qfb[f + 3],
                                qfs[f], qfs[f + 1], qfs[f + 2], qfs[f + 3], kb0, kb1, ks0, ks1,
                                s[i], s[i + 1], s[i + 2], s[i + 3])
                            s[i + 4], s[i + 5], s[i + 6], s[i + 7] = mma3(
                                scr, qfb[f], qfb[f + 1], qfb[f + 2], qfb[f + 3],
                                qfs[f], qfs[f + 1], qfs[f + 2], qfs[f + 3], kb2, kb3, ks2, ks3,
                                s[i + 4], s[i + 5], s[i + 6], s[i + 7])
            else:
                for kk in range(KD):
                    if not QREG:
                        for mt in range(MT):
                            qf[4 * mt], qf[4 * mt + 1], qf[4 * mt + 2], qf[4 * mt + 3] = \
                                frag_a(sm, OQW + 16 * mt * LDQ + 16 * kk, LDQ)
                    for jp in range(NTS // 2):
                        b0, b1, b2, b3 = frag_b2(sm, okb + 16 * jp * LDQ + 16 * kk, LDQ)
                        for mt in range(MT):
                            f = 4 * (mt * KD + kk) if QREG else 4 * mt
                            i = mt * NS + 8 * jp
                            s[i], s[i + 1], s[i + 2], s[i + 3] = mma(
                                scr, qf[f], qf[f + 1], qf[f + 2], qf[f + 3],
                                b0, b1, s[i], s[i + 1], s[i + 2], s[i + 3])
                            s[i + 4], s[i + 5], s[i + 6], s[i + 7] = mma(
                                scr, qf[f], qf[f + 1], qf[f + 2], qf[f + 3],
                                b2, b3, s[i + 4], s[i + 5], s[i + 6], s[i + 7])

            # Scores to the log2 domain, with the exclusions of this block. Element idx
            # of the lane's S registers belongs to row slot 2*(idx // NS) +
            # ((idx >> 1) & 1) and column 8*((idx % NS) >> 2) + 2t + (idx & 1) of the
            # block. Every loop that indexes registers has a small body, so that it is
            # fully unrolled (a loop left rolled would move S to local memory).
            # (JAG: a tile is partial where a column limit cuts into it)
            if JAG:
                partial = n0 + BN > lim0 or (JAG == 2 and n0 < lo1)
            else:
                partial = it >= nf
            # Per row slot r, the exclusions of this block in lim[r]: the mask bits of a
            # partial block of a register-path mask_mod, else the column limit (keys
            # past Lk, causal diagonal) wherever a register path applies it.
            # The factor that takes S to log2 units in the exponent below: 1 where the
            # paths below have scaled S already, sl2 where (LAZY) a block without
            # exclusions leaves S raw (one FMA per score instead of a multiply and a
            # subtraction; the row maximum is taken raw and scaled, so sl2 > 0 only).
            f = ONE
            bits = (MASKREG or SCOREREG) and MASKMOD and partial
            shared = not SCOREREG and (SCORE or (MASKS and partial))
            if bits:
                # The row-slot calls are written out (constant indices into lim), so
                # the loop that calls the rolled mask loop is not itself a loop.
                c0 = n0 + 2 * t
                lim[0] = row_bits(b, h, rw, c0, Lq, Lk, x0, x1, x2, x3)
                lim[1] = row_bits(b, h, rw + 8, c0, Lq, Lk, x0, x1, x2, x3)
                if MT > 1:
                    lim[2] = row_bits(b, h, rw + 16, c0, Lq, Lk, x0, x1, x2, x3)
                    lim[3] = row_bits(b, h, rw + 24, c0, Lq, Lk, x0, x1, x2, x3)
            elif SCOREREG or (not shared and (partial or n0 + BN > klim)):
                for r in range(MR):
                    lim[r] = klim
                    if JAG:
                        rl = rw + 16 * (r >> 1) + 8 * (r & 1) + dg
                        if rl < klim:
                            lim[r] = rl
                    elif CAUSAL and partial:
                        row1 = rw + 16 * (r >> 1) + 8 * (r & 1) + 1
                        if row1 < Lk:
                            lim[r] = row1
            if MASKREG and partial:
                for idx in range(MNS):
                    x = s[idx] * sl2
                    j = 2 * ((idx % NS) >> 2) + (idx & 1)
                    bit = (lim[2 * (idx // NS) + ((idx >> 1) & 1)] >> j) & 1
                    s[idx] = x if bit != 0 else NEG_INF
            elif SCOREREG:
                score_regs(s, lim, bits, n0 + 2 * t, rw, b, h, Lq, Lk, sc, x0, x1, x2, x3)
            elif SCORE or (MASKS and partial):
                # Mods and attn_mask: the per-element work can be large, so it runs on
                # a copy of S in shared memory (each lane its own column, no barrier
                # needed), rolled or not as the compiler likes.
                for idx in range(MNS):
                    smf[OMF + idx * NTH + tid] = s[idx] * sc
                for idx in range(MNS):
                    row = rw + 16 * (idx // NS) + 8 * ((idx >> 1) & 1)
                    col = n0 + 8 * ((idx % NS) >> 2) + 2 * t + (idx & 1)
                    x = smf[OMF + idx * NTH + tid]
                    ok = col < Lk
                    if SCORE:
                        if ok and row < Lq:
                            x = float32(score_fn(x, b, h, row, col, x0, x1, x2, x3)[0])
                    if partial:
                        if CAUSAL:
                            ok = ok and col <= row
                        if MASK:
                            if ok and row < Lq:
                                x += mask[mbase + row * ms_q + col * ms_k]
                        if MASKMOD:
                            if ok and row < Lq:
                                ok = mask_fn(b, h, row, col, x0, x1, x2, x3)
                    smf[OMF + idx * NTH + tid] = x * LOG2E if ok else NEG_INF
                for idx in range(MNS):
                    s[idx] = smf[OMF + idx * NTH + tid]
            elif partial or n0 + BN > klim:
                # Keys past Lk and (diagonal blocks) causal exclusions: column < limit.
                c0 = n0 + 2 * t
                for idx in range(MNS):
                    x = s[idx] * sl2
                    cl = c0 + (8 * ((idx % NS) >> 2) + (idx & 1))
                    s[idx] = x if cl < lim[2 * (idx // NS) + ((idx >> 1) & 1)] else NEG_INF
                if JAG == 2 and n0 < lo1:
                    # Left window edges, in a loop of their own (folded into the loop
                    # above, the larger body stayed rolled: S in local memory, ptxas
                    # bf16 D=64 272-352 byte stacks): element idx (column c0 + dc, row
                    # rw + dr) is visible from dc - dr >= rw + dl - c0 on.
                    lb = rw + dl - c0
                    for idx in range(MNS):
                        dcr = (8 * ((idx % NS) >> 2) + (idx & 1)
                               - 16 * (idx // NS) - 8 * ((idx >> 1) & 1))
                        s[idx] = s[idx] if dcr >= lb else NEG_INF
            elif LAZY and sl2 > ZERO:
                f = sl2
            else:
                for idx in range(MNS):
                    s[idx] = s[idx] * sl2
            for r in range(MR):
                x_r[r] = NEG_INF
            for idx in range(MNS):
                r = 2 * (idx // NS) + ((idx >> 1) & 1)
                x_r[r] = _fmax(x_r[r], s[idx])
            grow = True
            if LAZY:
                # The reference maximum m moves only past m + TH: P <= 2^TH (no overflow
                # in float32 or in P's 16-bit fragments; lse = m + log2(l) is exact for
                # any reference), and a block that moves no row of the lane skips the
                # rescale. A row at -inf takes its first finite maximum (alpha 0: l and O
                # are still 0).
                grow = False
                for r in range(MR):
                    bm = quad_max(scr, x_r[r]) * f
                    t_r[r] = _fmax(t_r[r], bm)
                    y_r[r] = ONE
                    if bm > m_r[r] + TH:
                        y_r[r] = exp2(m_r[r] - bm)
                        m_r[r] = bm
                        l_r[r] *= y_r[r]
                        grow = True
                    # A row that has seen only excluded keys keeps m = -inf: exponents
                    # against 0, so P = 0, never NaN.
                    x_r[r] = m_r[r] if m_r[r] != NEG_INF else ZERO
            else:
                for r in range(MR):
                    mx = _fmax(m_r[r], quad_max(scr, x_r[r]))
                    # A row that has seen only excluded keys keeps m = -inf; exponents are
                    # then taken against 0 so that P = 0 and alpha = 0, never NaN.
                    mu = mx if mx != NEG_INF else ZERO
                    y_r[r] = exp2(m_r[r] - mu)  # alpha
                    x_r[r] = mu
                    m_r[r] = mx
                    l_r[r] *= y_r[r]
            for idx in range(MNS):
                r = 2 * (idx // NS) + ((idx >> 1) & 1)
                p = exp2(s[idx] * f - x_r[r])
                l_r[r] += p
                s[idx] = p
            if grow:
                if MNO <= 64:
                    for idx in range(MNO):
                        acc[idx] *= y_r[2 * (idx // NO) + ((idx >> 1) & 1)]
                else:
                    # One loop per m16 tile (MT = 2): one loop over MNO = 128 registers
                    # (two tiles at D = 128) was left rolled, and O went to local memory.
                    for idx in range(NO):
                        acc[idx] *= y_r[(idx >> 1) & 1]
                    for idx in range(NO):
                        acc[NO + idx] *= y_r[2 + ((idx >> 1) & 1)]

            if TF32:
                # 3xTF32 O += P V over 8-key steps (keys and dims permuted, see the module
                # docstring): a0..a3 = c0, c2, c1, c3 of S's n-tile kk, split; V rows
                # 2t and 2t+1 of the step by 16-byte loads, four n-tiles per load pair.
                for kk in range(KV):
                    for mt in range(MT):
                        f = 4 * mt
                        i = mt * NS + 4 * kk
                        pa[f], ps[f] = split(s[i])
                        pa[f + 1], ps[f + 1] = split(s[i + 2])
                        pa[f + 2], ps[f + 2] = split(s[i + 1])
                        pa[f + 3], ps[f + 3] = split(s[i + 3])
                    vr = ovb + (8 * kk + 2 * t) * LDV + 4 * g
                    for J in range(NVG):
                        v0, v1, v2, v3 = lds4(sm, vr + 32 * J)
                        w0, w1, w2, w3 = lds4(sm, vr + LDV + 32 * J)
                        vb0, vs0 = split(v0)
                        vb1, vs1 = split(v1)
                        vb2, vs2 = split(v2)
                        vb3, vs3 = split(v3)
                        wb0, ws0 = split(w0)
                        wb1, ws1 = split(w1)
                        wb2, ws2 = split(w2)
                        wb3, ws3 = split(w3)
                        for mt in range(MT):
                            f = 4 * mt
                            c = mt * NO + 16 * J
                            acc[c], acc[c + 1], acc[c + 2], acc[c + 3] = mma3(
                                scr, pa[f], pa[f + 1], pa[f + 2], pa[f + 3],
                                ps[f], ps[f + 1], ps[f + 2], ps[f + 3], vb0, wb0, vs0, ws0,
                                acc[c], acc[c + 1], acc[c + 2], acc[c + 3])
                            acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7] = mma3(
                                scr, pa[f], pa[f + 1], pa[f + 2], pa[f + 3],
                                ps[f], ps[f + 1], ps[f + 2], ps[f + 3], vb1, wb1, vs1, ws1,
                                acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7])
                            acc[c + 8], acc[c + 9], acc[c + 10], acc[c + 11] = mma3(
                                scr, pa[f], pa[f + 1], pa[f + 2], pa[f + 3],
                                ps[f], ps[f + 1], ps[f + 2], ps[f + 3], vb2, wb2, vs2, ws2,
                                acc[c + 8], acc[c + 9], acc[c + 10], acc[c + 11])
                            acc[c + 12], acc[c + 13], acc[c + 14], acc[c + 15] = mma3(
                                scr, pa[f], pa[f + 1], pa[f + 2], pa[f + 3],
                                ps[f], ps[f + 1], ps[f + 2], ps[f + 3], vb3, wb3, vs3, ws3,
                                acc[c + 12], acc[c + 13], acc[c + 14], acc[c + 15])
            else:
                # O += P V: P's accumulators, rounded, are the A fragments; each V fragment
                # pair serves the MT m16 tiles.
                for kk in range(KV):
                    for mt in range(MT):
                        i = mt * NS + 8 * kk
                        for e in range(4):
                            pa[4 * mt + e] = pack(s[i + 2 * e], s[i + 2 * e + 1])
                    for jp in range(NTO // 2):
                        b0, b1, b2, b3 = frag_bt2(sm, ovb + 16 * kk * LDV + 16 * jp, LDV)
                        for mt in range(MT):
                            a = 4 * mt
                            c = mt * NO + 8 * jp
                            acc[c], acc[c + 1], acc[c + 2], acc[c + 3] = mma(
                                scr, pa[a], pa[a + 1], pa[a + 2], pa[a + 3], b0, b1,
                                acc[c], acc[c + 1], acc[c + 2], acc[c + 3])
                            acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7] = mma(
                                scr, pa[a], pa[a + 1], pa[a + 2], pa[a + 3], b2, b3,
                                acc[c + 4], acc[c + 5], acc[c + 6], acc[c + 7])
            if STAGES == 2:
                # Barrier: every warp is done with this buffer before the next
                # iteration's prefetch overwrites it.
                cuda.syncthreads()
            else:
                buf = 0 if buf == 2 else buf + 1

        for r in range(MR):
            l_r[r] = quad_sum(scr, l_r[r])
        if MNO <= 64:
            for r in range(MR):
                epilogue(o, lse, acc, l_r, m_r, t_r, r, rw, qlim, b, h, bh, t, Lq, os_b,
                         os_h, os_l, os_d)
        else:
            # Two m16 tiles at D = 128: the row slots written out (constant r, so the
            # slot's O registers at constant indices; the loop over four slots stayed
            # rolled and O went to local memory). At MNO <= 64 the loop unrolls, and
            # written out the D = 64 kernel spilled 8 bytes.
            epilogue(o, lse, acc, l_r, m_r, t_r, 0, rw, qlim, b, h, bh, t, Lq, os_b,
                     os_h, os_l, os_d)
            epilogue(o, lse, acc, l_r, m_r, t_r, 1, rw, qlim, b, h, bh, t, Lq, os_b,
                     os_h, os_l, os_d)
            epilogue(o, lse, acc, l_r, m_r, t_r, 2, rw, qlim, b, h, bh, t, Lq, os_b,
                     os_h, os_l, os_d)
            epilogue(o, lse, acc, l_r, m_r, t_r, 3, rw, qlim, b, h, bh, t, Lq, os_b,
                     os_h, os_l, os_d)

    return fwd
