"""Tensor-core fragment operations for the mma kernels (gpu/_mma.py), as inline PTX.

Numba has no tensor-core API, but its CUDA target accepts LLVM inline assembly, so the
warp-level instructions the FlashAttention-2 forward is built from are intrinsics here:

* ``mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}`` (A 16x16, B 16x8, f32 C/D);
* ``ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16``: four 8x8 b16 matrices from
  shared memory straight into the fragment layout (``.trans`` gives V's B fragments
  from its row-major (key, dim) tile);
* ``cp.async.cg.shared.global`` (16 bytes, zero-fill past the end), commit/wait groups;
* ``ex2.approx.ftz.f32``, ``cvt.rn.{bf16x2,f16x2}.f32`` (two floats into one 32-bit A
  register), and ``shfl.sync.bfly`` reductions over the four lanes of a fragment row.

Shared-memory operands are 32-bit shared-window addresses: the generic pointer of Numba's
shared array is cast to address space 3 (NVVM folds this into a plain shared address).

Every intrinsic carries a fixed uuid: Numba keys its on-disk kernel cache on a pickle of
the kernel's closure, and an intrinsic pickles with a uuid drawn per process otherwise
(see gpu/_cuda.py, ld4).

The simulator (``SIM``) runs kernels as Python threads and has neither inline assembly
nor warp shuffles. There the same names are simulator-safe stand-ins with the same
results: fragment loads gather the lane's own elements directly (each lane knows the
fragment layout, so no data crosses lanes); ``mma`` and the row reductions, which do
cross lanes, go through a per-warp shared scratch array with a barrier on either side
(so every thread of the block must call them the same number of times, which the
kernels' uniform control flow guarantees); the asynchronous copies are synchronous.

Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"): lane = 4*g + t,
A: a0 = A[g, 2t:2t+2], a1 = A[g+8, 2t:2t+2], a2 = A[g, 2t+8:2t+10], a3 = A[g+8, 2t+8:..];
B (k x n): b0 = B[2t:2t+2, g], b1 = B[2t+8:2t+10, g]; C/D: c0, c1 = C[g, 2t:2t+2],
c2, c3 = C[g+8, 2t:2t+2]. Two element values share one 32-bit register, the lower
column (or k) in the low half.

float32 inputs (``ops("f32")``, the 3xTF32 forward of gpu/_mma.py) use
``mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32``: A (16x8) a0 = A[g, t],
a1 = A[g+8, t], a2 = A[g, t+4], a3 = A[g+8, t+4]; B (8x8) b0 = B[t, g], b1 = B[t+4, g];
C as above, one float32 element per register. ``split`` turns x into the tf32 pair
big = cvt.rna.tf32(x), small = x - big (exact in float32; the tensor core reads only
its leading 10 mantissa bits), and ``mma3`` adds Asmall*Bbig + Abig*Bsmall + Abig*Bbig:
the dropped Asmall*Bsmall and the truncation of small are ~2^-22 relative, the level of
float32 rounding, so the products keep float32 accuracy at three tensor-core
instructions each. ldmatrix (b16) moves 32-bit elements intact for the non-transposed
operands (each lane gets 32-bit word l%4 of row l/4); ``lds4`` (ld.shared.v4.f32) reads
the V rows that ldmatrix.trans cannot transpose at 32 bits.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ._cuda import SIM, cuda, float32, int32

__all__ = ["ops", "gaddr", "red_add2", "SCRATCH_WORDS"]


# Per warp in the simulator: the A and B of one product (16x16 + 16x8 words; the
# 3xTF32 stand-in's big and small halves of a 16x8 A and an 8x8 B take the same), a
# second such buffer (mma3 alternates between the two: one barrier per call), and the
# four-lane reductions' 32 words.
_MMA_WORDS = 16 * 16 + 16 * 8
_WARP_WORDS = 2 * _MMA_WORDS + 32


def SCRATCH_WORDS(nwarps: int) -> int:
    """float32 words of static shared scratch the stand-ins need (1 on the GPU)."""
    return nwarps * _WARP_WORDS if SIM else 1


if SIM:
    from numba.cuda.simulator.kernel import _get_kernel_context

    class _Launch:
        """The running launch's fake cuda module, for the stand-ins' bodies. The
        simulator swaps this module's ``cuda`` for its fake module around each
        device-function call and swaps it back when that call returns, so a thread still
        inside another call can then see the real module (no threadIdx, syncthreads or
        atomic there); the launch's context is set for the whole launch, and its
        threadIdx answers per thread."""

        def __getattr__(self, name):
            return getattr(_get_kernel_context(), name)

    _k = _Launch()
    # ------------------------------------------------------------ simulator stand-ins --
    import struct as _struct
    import threading as _threading

    def _unpacker(kind):
        if kind == "bf16":
            def unpack(v):
                w = np.array([v], dtype=np.int32).view(np.uint32)[0]
                lo = np.array([(w & 0xFFFF) << 16], dtype=np.uint32).view(np.float32)[0]
                hi = np.array([w & 0xFFFF0000], dtype=np.uint32).view(np.float32)[0]
                return float(lo), float(hi)
        else:
            def unpack(v):
                h = np.array([v], dtype=np.int32).view(np.float16)
                return float(h[0]), float(h[1])
        return unpack

    def _packer(kind):
        if kind == "bf16":
            def pack(lo, hi):
                def bits(x):
                    b = int(np.array([x], dtype=np.float32).view(np.uint32)[0])
                    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
                w = bits(lo) | (bits(hi) << 16)
                return np.array([w], dtype=np.uint32).view(np.int32)[0]
        else:
            def pack(lo, hi):
                return np.array([lo, hi], dtype=np.float16).view(np.int32)[0]
        return pack

    def _elem_bits(kind):
        # A shared-memory element (float16 value or bfloat16 bits as int16) -> float.
        if kind == "bf16":
            def val(x):
                return float(np.array([(int(x) & 0xFFFF) << 16],
                                      dtype=np.uint32).view(np.float32)[0])
        else:
            def val(x):
                return float(x)
        return val

    @cuda.jit(device=True)
    def gaddr(a, idx):
        # Byte offset from the array's start, which the simulator's host arrays place
        # at the tensor's first element: alignment is then judged as on the GPU for
        # any 16-byte aligned tensor.
        return int(idx) * a.dtype.itemsize

    @cuda.jit(device=True)
    def red_add2(a, idx, x, y):
        # The two float32 reductions of red.global.add.v2.f32, one after the other
        # (through _k: CI hit the real module here, with 1-warp tiles).
        _k.atomic.add(a, idx, x)
        _k.atomic.add(a, idx + 1, y)

    def _bits(x):
        return int(np.array([x], dtype=np.float32).view(np.int32)[0])

    def _from_bits(b):
        return np.array([int(b) & 0xFFFFFFFF], dtype=np.uint32).view(np.float32)[0]

    def _tf32(b):
        # What the tensor core reads of a tf32 operand register: sign, exponent and
        # the leading 10 mantissa bits (the low 13 bits are ignored).
        return _struct.unpack("<f", _struct.pack("<I", int(b) & 0xFFFFE000))[0]

    def _tf32_ops():
        @cuda.jit(device=True)
        def frag_a(sm, off, LD):
            # A 16x8 float32 tile at off (row-major): a0..a3 = A[g, t], A[g+8, t],
            # A[g, t+4], A[g+8, t+4].
            lane = _k.threadIdx.x & 31
            g, t = lane >> 2, lane & 3
            r0 = off + g * LD + t
            r1 = r0 + 8 * LD
            return sm[r0], sm[r1], sm[r0 + 4], sm[r1 + 4]

        @cuda.jit(device=True)
        def frag_b2(sm, off, LD):
            # B[k, n] = T[n, k], T row-major at off (n: 16 rows, k: 8 columns): the
            # (b0, b1) of n-tiles n0..n0+7 and n0+8..15.
            lane = _k.threadIdx.x & 31
            g, t = lane >> 2, lane & 3
            p0 = off + g * LD + t
            p1 = p0 + 8 * LD
            return sm[p0], sm[p0 + 4], sm[p1], sm[p1 + 4]

        @cuda.jit(device=True)
        def lds4(sm, i):
            return sm[i], sm[i + 1], sm[i + 2], sm[i + 3]

        @cuda.jit(device=True)
        def split(x):
            b = _bits(x) & 0xFFFFFFFF
            # cvt.rna.tf32.f32: round the magnitude half away from zero to 10 bits.
            big = (b + 0x1000) & 0xFFFFE000
            small = np.float32(x) - _from_bits(big)
            return np.int32(_bits(_from_bits(big))), np.int32(_bits(small))

        @cuda.jit(device=True)
        def mma3(scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, bb0, bb1, bs0, bs1,
                 c0, c1, c2, c3):
            # One stand-in for the three m16n8k8 products: C + As*Bb + Ab*Bs + Ab*Bb,
            # each operand read as the tensor core reads it. Calls alternate between
            # the warp's two buffers (the parity kept on the simulator's thread), so
            # one barrier per call is enough: a lane can write this buffer again two
            # calls later only after every lane has passed the next call's barrier,
            # i.e. has finished reading it here.
            tid = _k.threadIdx.x
            lane = tid & 31
            g, t = lane >> 2, lane & 3
            th = _threading.current_thread()
            par = getattr(th, "_attn_mma3_parity", 0)
            th._attn_mma3_parity = 1 - par
            A = (tid >> 5) * _WARP_WORDS + par * _MMA_WORDS
            AS = A + 16 * 8
            B = A + 16 * 16
            BS = B + 8 * 8
            for rb, rs, (r, c) in zip((ab0, ab1, ab2, ab3), (as0, as1, as2, as3),
                                      ((g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4))):
                scr[A + r * 8 + c] = _tf32(rb)
                scr[AS + r * 8 + c] = _tf32(rs)
            for rb, rs, k in zip((bb0, bb1), (bs0, bs1), (t, t + 4)):
                scr[B + k * 8 + g] = _tf32(rb)
                scr[BS + k * 8 + g] = _tf32(rs)
            _k.syncthreads()
            rows = (g, g, g + 8, g + 8)
            cols = (2 * t, 2 * t + 1, 2 * t, 2 * t + 1)
            ab = scr[A:A + 128].astype(np.float64).reshape(16, 8)[rows, :]
            as_ = scr[AS:AS + 128].astype(np.float64).reshape(16, 8)[rows, :]
            bb = scr[B:B + 64].astype(np.float64).reshape(8, 8)[:, cols].T
            bs = scr[BS:BS + 64].astype(np.float64).reshape(8, 8)[:, cols].T
            s = (as_ * bb + ab * bs + ab * bb).sum(axis=1)
            return (np.float32(c0 + s[0]), np.float32(c1 + s[1]), np.float32(c2 + s[2]),
                    np.float32(c3 + s[3]))

        @cuda.jit(device=True)
        def cp16(sm, sidx, a, gidx, ok):
            for e in range(4):
                sm[sidx + e] = a[gidx + e] if ok else 0

        return frag_a, frag_b2, lds4, split, mma3, cp16

    @lru_cache(maxsize=None)
    def ops(kind: str):
        if kind == "f32":
            frag_a, frag_b2, lds4, split, mma3, cp16 = _tf32_ops()
            common = ops("f16")
            return _Ops(frag_a, frag_b2, None, None, common.quad_max, common.quad_sum,
                        None, common.exp2, cp16, common.commit, common.wait_all,
                        common.wait_one, split=split, lds4=lds4, mma3=mma3,
                        wait_two=common.wait_two)
        unpack = _unpacker(kind)
        pack2 = _packer(kind)
        val = _elem_bits(kind)

        def _pk(sm, i0, i1):
            return pack2(val(sm[i0]), val(sm[i1]))

        @cuda.jit(device=True)
        def frag_a(sm, off, LD):
            lane = _k.threadIdx.x & 31
            g, t = lane >> 2, lane & 3
            r0 = off + g * LD + 2 * t
            r1 = r0 + 8 * LD
            return (_pk(sm, r0, r0 + 1), _pk(sm, r1, r1 + 1),
                    _pk(sm, r0 + 8, r0 + 9), _pk(sm, r1 + 8, r1 + 9))

        @cuda.jit(device=True)
        def frag_b2(sm, off, LD):
            # B[k, n] = T[n, k] with T row-major at off: n-tiles n0..n0+7 and n0+8..15.
            lane = _k.threadIdx.x & 31
            g, t = lane >> 2, lane & 3
            p0 = off + g * LD + 2 * t
            p1 = p0 + 8 * LD
            return (_pk(sm, p0, p0 + 1), _pk(sm, p0 + 8, p0 + 9),
                    _pk(sm, p1, p1 + 1), _pk(sm, p1 + 8, p1 + 9))

        @cuda.jit(device=True)
        def frag_bt2(sm, off, LD):
            # B[k, n] = T[k, n] with T row-major at off (k: 16 rows, n: 16 columns).
            lane = _k.threadIdx.x & 31
            g, t = lane >> 2, lane & 3
            p = off + 2 * t * LD + g
            return (_pk(sm, p, p + LD), _pk(sm, p + 8 * LD, p + 9 * LD),
                    _pk(sm, p + 8, p + LD + 8), _pk(sm, p + 8 * LD + 8, p + 9 * LD + 8))

        @cuda.jit(device=True)
        def mma(scr, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            tid = _k.threadIdx.x
            lane = tid & 31
            g, t = lane >> 2, lane & 3
            A = (tid >> 5) * _WARP_WORDS
            B = A + 16 * 16
            # Each lane scatters its registers into the warp's A (16x16) and B (16x8).
            for reg, (r, c) in zip((a0, a1, a2, a3), ((g, 2 * t), (g + 8, 2 * t),
                                                      (g, 2 * t + 8), (g + 8, 2 * t + 8))):
                lo, hi = unpack(reg)
                scr[A + r * 16 + c] = lo
                scr[A + r * 16 + c + 1] = hi
            for reg, k in zip((b0, b1), (2 * t, 2 * t + 8)):
                lo, hi = unpack(reg)
                scr[B + k * 8 + g] = lo
                scr[B + (k + 1) * 8 + g] = hi
            _k.syncthreads()
            d = [c0, c1, c2, c3]
            for e in range(4):
                r = g + 8 * (e >> 1)
                n = 2 * t + (e & 1)
                s = 0.0
                for k in range(16):
                    s += float(scr[A + r * 16 + k]) * float(scr[B + k * 8 + n])
                d[e] = np.float32(d[e] + s)
            _k.syncthreads()
            return d[0], d[1], d[2], d[3]

        @cuda.jit(device=True)
        def _quad(scr, x, is_max):
            tid = _k.threadIdx.x
            Q = (tid >> 5) * _WARP_WORDS + 2 * _MMA_WORDS
            lane = tid & 31
            scr[Q + lane] = x
            _k.syncthreads()
            q0 = Q + (lane & ~3)
            vals = [scr[q0 + i] for i in range(4)]
            _k.syncthreads()
            return np.float32(max(vals) if is_max else sum(vals))

        @cuda.jit(device=True)
        def quad_max(scr, x):
            return _quad(scr, x, True)

        @cuda.jit(device=True)
        def quad_sum(scr, x):
            return _quad(scr, x, False)

        @cuda.jit(device=True)
        def pack(lo, hi):
            return pack2(lo, hi)

        @cuda.jit(device=True)
        def exp2(x):
            return np.float32(2.0 ** float(x)) if x > -np.inf else np.float32(0.0)

        @cuda.jit(device=True)
        def cp16(sm, sidx, a, gidx, ok):
            for e in range(8):
                sm[sidx + e] = a[gidx + e] if ok else 0

        @cuda.jit(device=True)
        def commit():
            pass

        @cuda.jit(device=True)
        def wait_all():
            pass

        @cuda.jit(device=True)
        def wait_one():
            pass

        @cuda.jit(device=True)
        def wait_two():
            pass

        return _Ops(frag_a, frag_b2, frag_bt2, mma, quad_max, quad_sum, pack, exp2,
                    cp16, commit, wait_all, wait_one, wait_two=wait_two)

else:
    # --------------------------------------------------------------- inline PTX (GPU) --
    from llvmlite import ir
    from numba.core import cgutils, types
    from numba.core.extending import intrinsic as _intrinsic

    # numba.cuda.extending.intrinsic is exactly this; taken from numba.core so that
    # gpu/_cuda.py stays the one module importing numba.cuda.
    intrinsic = _intrinsic(target="cuda")

    _i32 = ir.IntType(32)
    _i64 = ir.IntType(64)
    _f32 = ir.FloatType()

    def _fixed(fn, name):
        fn._set_uuid(f"attn.gpu._ptx.{name}")
        return fn

    def _call(builder, ret, argtys, asm, cons, args, side_effect=False):
        fnty = ir.FunctionType(ret, argtys)
        return builder.call(ir.InlineAsm(fnty, asm, cons, side_effect=side_effect), args)

    def _ptr(context, builder, aryty, ary_val, idx_val, idxty):
        ary = context.make_array(aryty)(context, builder, ary_val)
        i = context.cast(builder, idx_val, idxty, types.intp)
        return builder.gep(ary.data, [i])

    @intrinsic
    def gaddr(typingctx, arr, idx):
        """The (generic) address of arr[idx] as an unsigned 64-bit integer."""
        if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            return builder.ptrtoint(p, _i64)

        return types.uint64(arr, idx), codegen

    _fixed(gaddr, "gaddr")

    @intrinsic
    def red_add2(typingctx, arr, idx, x, y):
        """a[idx] += x and a[idx + 1] += y (a float32 global array, idx even) as one
        red.global.add.v2.f32: one 8-byte reduction per lane, so the four lanes of a
        fragment row fill a 32-byte sector (two scalar REDs use half of each of two)."""
        if not (isinstance(arr, types.Array) and arr.dtype == types.float32
                and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            g = builder.ptrtoint(p, _i64)
            xs = [context.cast(builder, v, t, types.float32)
                  for v, t in zip(args[2:], sig.args[2:])]
            _call(builder, ir.VoidType(), [_i64, ir.FloatType(), ir.FloatType()],
                  "{ .reg .u64 g; cvta.to.global.u64 g, $0; "
                  "red.global.add.v2.f32 [g], {$1, $2}; }",
                  "l,f,f,~{memory}", [g] + xs, side_effect=True)
            return context.get_dummy_value()

        return types.void(arr, idx, x, y), codegen

    _fixed(red_add2, "red_add2")

    @intrinsic
    def smem_addr(typingctx, arr, idx):
        """32-bit shared-window address of arr[idx] (arr a shared array)."""
        if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            p = _ptr(context, builder, sig.args[0], args[0], args[1], sig.args[1])
            sp = builder.addrspacecast(p, ir.PointerType(p.type.pointee, 3))
            return builder.ptrtoint(sp, _i32)

        return types.uint32(arr, idx), codegen

    _fixed(smem_addr, "smem_addr")

    def _ldsm(name, trans):
        rt = types.UniTuple(types.int32, 4)
        asm = (f"ldmatrix.sync.aligned.m8n8.x4{'.trans' if trans else ''}.shared.b16 "
               "{$0, $1, $2, $3}, [$4];")

        @intrinsic
        def ldsm(typingctx, addr):
            if not isinstance(addr, types.Integer):
                return None

            def codegen(context, builder, sig, args):
                a = context.cast(builder, args[0], sig.args[0], types.uint32)
                st = ir.LiteralStructType([_i32] * 4)
                # Volatile: it reads shared memory that cp.async and barriers order, so
                # LLVM must not move it across them (it has no memory operand to see).
                r = _call(builder, st, [_i32], asm, "=r,=r,=r,=r,r,~{memory}", [a],
                          side_effect=True)
                return context.make_tuple(builder, rt,
                                          [builder.extract_value(r, e) for e in range(4)])

            return rt(addr), codegen

        return _fixed(ldsm, name)

    ldsm_x4 = _ldsm("ldsm_x4", False)
    ldsm_x4_t = _ldsm("ldsm_x4_t", True)

    def _mma(name, ab):
        rt = types.UniTuple(types.float32, 4)
        asm = (f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 "
               "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

        @intrinsic
        def mma(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            def codegen(context, builder, sig, args):
                ins = [context.cast(builder, v, t, types.int32)
                       for v, t in zip(args[:6], sig.args[:6])]
                ins += [context.cast(builder, v, t, types.float32)
                        for v, t in zip(args[6:], sig.args[6:])]
                st = ir.LiteralStructType([_f32] * 4)
                r = _call(builder, st, [_i32] * 6 + [_f32] * 4, asm,
                          "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", ins)
                return context.make_tuple(builder, rt,
                                          [builder.extract_value(r, e) for e in range(4)])

            return rt(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen

        return _fixed(mma, name)

    mma_bf16 = _mma("mma_bf16", "bf16")
    mma_f16 = _mma("mma_f16", "f16")

    def _pack(name, ty):
        @intrinsic
        def pack(typingctx, lo, hi):
            def codegen(context, builder, sig, args):
                lo_ = context.cast(builder, args[0], sig.args[0], types.float32)
                hi_ = context.cast(builder, args[1], sig.args[1], types.float32)
                # cvt.rn.*x2.f32 d, a, b puts a in the upper half, b in the lower.
                return _call(builder, _i32, [_f32, _f32], f"cvt.rn.{ty}.f32 $0, $1, $2;",
                             "=r,f,f", [hi_, lo_])

            return types.int32(lo, hi), codegen

        return _fixed(pack, name)

    pack_bf16 = _pack("pack_bf16", "bf16x2")
    pack_f16 = _pack("pack_f16", "f16x2")

    @intrinsic
    def ex2(typingctx, x):
        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.float32)
            return _call(builder, _f32, [_f32], "ex2.approx.ftz.f32 $0, $1;", "=f,f", [v])

        return types.float32(x), codegen

    _fixed(ex2, "ex2")

    def _quad(name, op):
        # The four lanes 4g..4g+3 hold one fragment row: two butterfly steps.
        asm = ("{ .reg .f32 t; "
               "shfl.sync.bfly.b32 t, $1, 1, 0x1f, 0xffffffff; "
               f"{op}.f32 $0, $1, t; "
               "shfl.sync.bfly.b32 t, $0, 2, 0x1f, 0xffffffff; "
               f"{op}.f32 $0, $0, t; }}")

        @intrinsic
        def quad(typingctx, x):
            def codegen(context, builder, sig, args):
                v = context.cast(builder, args[0], sig.args[0], types.float32)
                return _call(builder, _f32, [_f32], asm, "=f,f", [v], side_effect=True)

            return types.float32(x), codegen

        return _fixed(quad, name)

    quad_max_ = _quad("quad_max", "max")
    quad_sum_ = _quad("quad_sum", "add")

    @intrinsic
    def cp_async16(typingctx, saddr, arr, idx, nbytes):
        """16 bytes from arr[idx] (global) to the shared address saddr; only the first
        nbytes are read, the rest zero-filled (nbytes 0: a row past the end)."""
        if not isinstance(arr, types.Array):
            return None

        def codegen(context, builder, sig, args):
            s = context.cast(builder, args[0], sig.args[0], types.uint32)
            p = _ptr(context, builder, sig.args[1], args[1], args[2], sig.args[2])
            g = builder.ptrtoint(p, _i64)
            n = context.cast(builder, args[3], sig.args[3], types.uint32)
            _call(builder, ir.VoidType(), [_i32, _i64, _i32],
                  "{ .reg .u64 g; cvta.to.global.u64 g, $1; "
                  "cp.async.cg.shared.global [$0], [g], 16, $2; }",
                  "r,l,r,~{memory}", [s, g, n], side_effect=True)
            return context.get_dummy_value()

        return types.void(saddr, arr, idx, nbytes), codegen

    _fixed(cp_async16, "cp_async16")

    def _simple(name, asm):
        @intrinsic
        def f(typingctx):
            def codegen(context, builder, sig, args):
                _call(builder, ir.VoidType(), [], asm, "~{memory}", [], side_effect=True)
                return context.get_dummy_value()

            return types.void(), codegen

        return _fixed(f, name)

    cp_commit = _simple("cp_commit", "cp.async.commit_group;")
    cp_wait0 = _simple("cp_wait0", "cp.async.wait_group 0;")
    cp_wait1 = _simple("cp_wait1", "cp.async.wait_group 1;")
    cp_wait2 = _simple("cp_wait2", "cp.async.wait_group 2;")

    @intrinsic
    def ldsm_x4_f(typingctx, addr):
        """ldmatrix.x4 of 32-bit elements: the four registers as float32 (bit casts)."""
        if not isinstance(addr, types.Integer):
            return None
        rt = types.UniTuple(types.float32, 4)

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uint32)
            st = ir.LiteralStructType([_i32] * 4)
            r = _call(builder, st, [_i32],
                      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [$4];",
                      "=r,=r,=r,=r,r,~{memory}", [a], side_effect=True)
            return context.make_tuple(builder, rt, [
                builder.bitcast(builder.extract_value(r, e), _f32) for e in range(4)])

        return rt(addr), codegen

    _fixed(ldsm_x4_f, "ldsm_x4_f")

    @intrinsic
    def lds4_(typingctx, addr):
        """Four float32 values at the 16-byte aligned shared address addr."""
        if not isinstance(addr, types.Integer):
            return None
        rt = types.UniTuple(types.float32, 4)

        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.uint32)
            st = ir.LiteralStructType([_f32] * 4)
            # Volatile for the same reason as ldmatrix: no memory operand LLVM can see.
            r = _call(builder, st, [_i32], "ld.shared.v4.f32 {$0, $1, $2, $3}, [$4];",
                      "=f,=f,=f,=f,r,~{memory}", [a], side_effect=True)
            return context.make_tuple(builder, rt,
                                      [builder.extract_value(r, e) for e in range(4)])

        return rt(addr), codegen

    _fixed(lds4_, "lds4")

    @intrinsic
    def split_tf32(typingctx, x):
        """(big, small) tf32 operand registers of x: big = x rounded to 10 mantissa
        bits, half away from zero (what cvt.rna.tf32.f32 gives), small = x - big (exact).

        The rounding is done on the bits (add half of the dropped part, clear it): 3
        instructions with the subtraction, where ptxas expands cvt.rna.tf32.f32 into 5
        (an extra infinity test and select). The difference: |x| within 2^-11 relative
        of the float32 maximum rounds to infinity here (the attention of such inputs
        overflows in any float32 kernel)."""
        rt = types.UniTuple(types.int32, 2)

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.float32)
            bits = builder.bitcast(v, _i32)
            big = builder.and_(builder.add(bits, ir.Constant(_i32, 0x1000)),
                               ir.Constant(_i32, -0x2000))
            small = builder.fsub(v, builder.bitcast(big, _f32))
            return context.make_tuple(builder, rt, [big, builder.bitcast(small, _i32)])

        return rt(x), codegen

    _fixed(split_tf32, "split_tf32")

    @intrinsic
    def mma_tf32(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        rt = types.UniTuple(types.float32, 4)
        asm = ("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
               "{$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, {$10, $11, $12, $13};")

        def codegen(context, builder, sig, args):
            ins = [context.cast(builder, v, t, types.int32)
                   for v, t in zip(args[:6], sig.args[:6])]
            ins += [context.cast(builder, v, t, types.float32)
                    for v, t in zip(args[6:], sig.args[6:])]
            st = ir.LiteralStructType([_f32] * 4)
            r = _call(builder, st, [_i32] * 6 + [_f32] * 4, asm,
                      "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", ins)
            return context.make_tuple(builder, rt,
                                      [builder.extract_value(r, e) for e in range(4)])

        return rt(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3), codegen

    _fixed(mma_tf32, "mma_tf32")

    @lru_cache(maxsize=None)
    def _tf32_ops():
        # ldmatrix row addresses for 32-bit elements: a matrix is 8 rows of 4 words.
        @cuda.jit(device=True, inline=True)
        def frag_a(sm, off, LD):
            # matrices (rows 0-7, words 0-3), (8-15, 0-3), (0-7, 4-7), (8-15, 4-7)
            lane = cuda.threadIdx.x & 31
            r = (lane & 7) + (lane & 8)
            c = (lane >> 4) << 2
            return ldsm_x4_f(smem_addr(sm, off + r * LD + c))

        @cuda.jit(device=True, inline=True)
        def frag_b2(sm, off, LD):
            # T[n, k] row-major: (n 0-7, k 0-3), (n 0-7, k 4-7), (n 8-15, k 0-3), (..)
            lane = cuda.threadIdx.x & 31
            r = (lane & 7) + ((lane >> 4) << 3)
            c = (lane & 8) >> 1
            return ldsm_x4_f(smem_addr(sm, off + r * LD + c))

        @cuda.jit(device=True, inline=True)
        def lds4(sm, i):
            return lds4_(smem_addr(sm, i))

        @cuda.jit(device=True, inline=True)
        def split(x):
            return split_tf32(x)

        @cuda.jit(device=True, inline=True)
        def mma3(scr, ab0, ab1, ab2, ab3, as0, as1, as2, as3, bb0, bb1, bs0, bs1,
                 c0, c1, c2, c3):
            # The two correction terms first, then the big product.
            c0, c1, c2, c3 = mma_tf32(as0, as1, as2, as3, bb0, bb1, c0, c1, c2, c3)
            c0, c1, c2, c3 = mma_tf32(ab0, ab1, ab2, ab3, bs0, bs1, c0, c1, c2, c3)
            return mma_tf32(ab0, ab1, ab2, ab3, bb0, bb1, c0, c1, c2, c3)

        return frag_a, frag_b2, lds4, split, mma3

    @cuda.jit(device=True, inline=True)
    def _quadrants(sm, off, LD):
        """The lane's ldmatrix.x4 row address for the four 8x8 quadrants of the 16x16
        tile at off, in the order (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15),
        (8-15, 8-15)."""
        lane = cuda.threadIdx.x & 31
        r = (lane & 7) + (lane & 8)
        c = (lane >> 4) << 3
        return smem_addr(sm, off + r * LD + c)

    @lru_cache(maxsize=None)
    def ops(kind: str):
        if kind == "f32":
            frag_a, frag_b2, lds4, split, mma3 = _tf32_ops()
            common = ops("f16")
            # cp.async copies 16 bytes whatever the element type.
            return _Ops(frag_a, frag_b2, None, None, common.quad_max, common.quad_sum,
                        None, common.exp2, common.cp16, common.commit, common.wait_all,
                        common.wait_one, split=split, lds4=lds4, mma3=mma3,
                        wait_two=common.wait_two)
        mma_i = mma_bf16 if kind == "bf16" else mma_f16
        pack_i = pack_bf16 if kind == "bf16" else pack_f16

        # ldmatrix.x4: lanes 8i..8i+7 give the row addresses of matrix i; lane l gets
        # row l//4, columns 2(l%4)..+1 of each matrix (transposed with .trans).
        @cuda.jit(device=True, inline=True)
        def frag_a(sm, off, LD):
            # matrices (rows 0-7, cols 0-7), (rows 8-15, 0-7), (0-7, 8-15), (8-15, 8-15)
            return ldsm_x4(_quadrants(sm, off, LD))

        @cuda.jit(device=True, inline=True)
        def frag_b2(sm, off, LD):
            # T[n, k] row-major: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (..)
            lane = cuda.threadIdx.x & 31
            r = (lane & 7) + ((lane >> 4) << 3)
            c = lane & 8
            return ldsm_x4(smem_addr(sm, off + r * LD + c))

        @cuda.jit(device=True, inline=True)
        def frag_bt2(sm, off, LD):
            # T[k, n] row-major, transposed: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7,
            # n 8-15), (k 8-15, n 8-15)
            return ldsm_x4_t(_quadrants(sm, off, LD))

        @cuda.jit(device=True, inline=True)
        def mma(scr, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            return mma_i(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

        @cuda.jit(device=True, inline=True)
        def quad_max(scr, x):
            return quad_max_(x)

        @cuda.jit(device=True, inline=True)
        def quad_sum(scr, x):
            return quad_sum_(x)

        @cuda.jit(device=True, inline=True)
        def pack(lo, hi):
            return pack_i(lo, hi)

        @cuda.jit(device=True, inline=True)
        def exp2(x):
            return ex2(x)

        @cuda.jit(device=True, inline=True)
        def cp16(sm, sidx, a, gidx, ok):
            cp_async16(smem_addr(sm, sidx), a, gidx, int32(16) if ok else int32(0))

        @cuda.jit(device=True, inline=True)
        def commit():
            cp_commit()

        @cuda.jit(device=True, inline=True)
        def wait_all():
            cp_wait0()

        @cuda.jit(device=True, inline=True)
        def wait_one():
            cp_wait1()

        @cuda.jit(device=True, inline=True)
        def wait_two():
            cp_wait2()

        return _Ops(frag_a, frag_b2, frag_bt2, mma, quad_max, quad_sum, pack, exp2,
                    cp16, commit, wait_all, wait_one, wait_two=wait_two)


class _Ops:
    """The fragment operations of one element kind (same names on both paths)."""

    __slots__ = ("frag_a", "frag_b2", "frag_bt2", "mma", "quad_max", "quad_sum", "pack",
                 "exp2", "cp16", "commit", "wait_all", "wait_one", "split", "lds4", "mma3",
                 "wait_two")

    def __init__(self, *fns, split=None, lds4=None, mma3=None, wait_two=None):
        # split, lds4, mma3: the float32 (3xTF32) kind's own operations; its frag_bt2,
        # mma and pack are None (no transposed 32-bit ldmatrix, products are mma3).
        # wait_two: all but the last two cp.async groups complete (three-stage loops).
        for name, fn in zip(self.__slots__, fns):
            setattr(self, name, fn)
        self.split, self.lds4, self.mma3 = split, lds4, mma3
        self.wait_two = wait_two
