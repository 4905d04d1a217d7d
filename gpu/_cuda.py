"""The one module of attn that imports numba.cuda.

Everything else in attn.gpu reaches Numba's CUDA target through the names defined
here, so moving to numba-cuda's successor (numba-cuda-mlir) or to another launcher is a
change to this file alone (DESIGN.md, Dependencies).

Two code paths are chosen once, at import:

* ``SIM`` (``NUMBA_ENABLE_CUDASIM=1``): Numba's CUDA simulator runs kernels as Python
  threads on host (numpy) arrays. It has no warp shuffles, no bfloat16 bit tricks
  (libdevice) and no external streams, so launches take numpy views of CPU tensors, use
  the default stream, and the kernels avoid shuffles entirely.
* the real GPU: arguments are CUDA tensors, wrapped without copies as Numba device
  arrays, and the launch goes on PyTorch's current stream.

Importing this module raises ImportError when numba-cuda is missing; ``available()``
answers whether kernels can actually run (driver, device) without raising.
"""
from __future__ import annotations

import math
import os

import numpy as np
import torch

SIM = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() == "1"

from numba import cuda  # noqa: E402  (the only numba.cuda import of attn)
from numba import float32, int32, int64, uint64  # noqa: E402,F401

__all__ = ["SIM", "cuda", "float32", "int32", "int64", "uint64", "available",
           "as_kernel_array", "launch", "int_as_float", "float_as_int", "fast_exp", "ld4", "capture", "bind",
           "Bound"]


if SIM:
    # The simulator implements kernels in Python on numpy arrays: reinterpret through
    # numpy. (bfloat16 is not exercised in the simulator; these exist so the kernel
    # source is the same on both paths.)
    def int_as_float(i):
        return np.array([i], dtype=np.int32).view(np.float32)[0]

    def float_as_int(x):
        return np.array([x], dtype=np.float32).view(np.int32)[0]

    fast_exp = math.exp

    def ld4(a, i):
        i = int(i)
        return a[i], a[i + 1], a[i + 2], a[i + 3]
else:
    from numba.cuda import libdevice as _libdevice

    int_as_float = _libdevice.int_as_float
    float_as_int = _libdevice.float_as_int
    # exp through the hardware ex2 unit (one multiply by log2(e), then MUFU.EX2): the
    # kernels only take exp of (score - running max) <= 0, where its few-ulp relative
    # error is far below the float32 rounding of the products around it. Maps -inf to 0.
    fast_exp = _libdevice.fast_expf

    def _make_ld4():
        """ld4(a, i) -> four float32 values a[i..i+3] in one 128-bit load. Numba emits one
        32-bit load per element; a tile product that reads four consecutive values per
        step issues a quarter of the load instructions with this (the caller keeps i
        a multiple of 4 and the array 16-byte aligned)."""
        from llvmlite import ir
        from numba.core import types
        from numba.cuda.extending import intrinsic

        @intrinsic
        def ld4(typingctx, arr, idx):
            if not (isinstance(arr, types.Array) and arr.dtype == types.float32
                    and isinstance(idx, types.Integer)):
                return None
            rt = types.UniTuple(types.float32, 4)

            def codegen(context, builder, sig, args):
                aryty, idxty = sig.args
                ary = context.make_array(aryty)(context, builder, args[0])
                i = context.cast(builder, args[1], idxty, types.intp)
                ptr = builder.gep(ary.data, [i])
                vty = ir.VectorType(ir.FloatType(), 4)
                vptr = builder.bitcast(ptr, ir.PointerType(vty, ptr.type.addrspace))
                vec = builder.load(vptr, align=16)
                vals = [builder.extract_element(vec, ir.Constant(ir.IntType(32), e))
                        for e in range(4)]
                return context.make_tuple(builder, rt, vals)

            return rt(arr, idx), codegen

        return ld4

    ld4 = _make_ld4()
    # Numba keys a kernel's on-disk cache on a pickle of its closure, and an intrinsic
    # pickles with a uuid drawn per process: without a fixed one, every process missed
    # the cache of the forward kernel (whose tile products call ld4) and recompiled it.
    ld4._set_uuid("attn.gpu._cuda.ld4")


_avail: tuple[bool, str] | None = None


def available() -> tuple[bool, str]:
    """(True, "") when kernels can run here; else (False, the reason). Never raises."""
    global _avail
    if _avail is None:
        if SIM:
            _avail = (True, "")
        else:
            try:
                if not cuda.is_available():
                    _avail = (False, "numba.cuda finds no CUDA driver or device")
                elif not torch.cuda.is_available():
                    _avail = (False, "PyTorch was built without CUDA or sees no device")
                else:
                    _avail = (True, "")
            except Exception as e:  # a broken driver install must not break attn
                _avail = (False, f"numba.cuda failed to initialise: {e}")
    return _avail


# torch dtype -> numpy typestr of the array the kernel sees. bfloat16 has no numpy type:
# the kernels read its bits as int16 and convert (see _kernels.py).
_TYPESTR = {
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.bfloat16: "<i2",
    torch.int32: "<i4",
    torch.uint8: "|u1",
    # Tensors FlexAttention mods read (document ids, bias tables, slopes).
    torch.int64: "<i8",
    torch.int16: "<i2",
    torch.int8: "|i1",
    torch.float64: "<f8",
}


def _extent(t: torch.Tensor) -> int:
    """Elements spanned by t from its first element: 1 + the largest offset. A strided
    (transposed, expanded) tensor is passed as a flat array of this length plus its
    strides, so no layout is ever copied."""
    if t.is_contiguous():
        return t.numel()
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


class _Iface:
    """Minimal __cuda_array_interface__ holder for a flat view of a CUDA tensor. No
    'stream' entry: Numba then does not synchronise on it (the caller orders work by
    launching on PyTorch's current stream)."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, n: int, typestr: str):
        self.__cuda_array_interface__ = {
            "shape": (n,), "typestr": typestr, "data": (ptr, False), "version": 3,
            "strides": None,
        }


def as_kernel_array(t: torch.Tensor):
    """A flat 1-D array over t's storage starting at t's first element, for a kernel.
    bfloat16 is viewed as int16 (bits)."""
    n = max(_extent(t), 1)
    if SIM:
        # Host memory: a numpy view sharing t's storage (writes land in t).
        flat = torch.as_strided(t, (n,), (1,), t.storage_offset())
        if t.dtype == torch.bfloat16:
            flat = flat.view(torch.int16)
        elif t.dtype == torch.bool:
            flat = flat.view(torch.uint8)
        return flat.numpy()
    if t.dtype == torch.bool:
        typestr = "|u1"
    else:
        typestr = _TYPESTR[t.dtype]
    return cuda.as_cuda_array(_Iface(t.data_ptr(), n, typestr))


_streams: dict[int, object] = {}


try:
    _raw_stream = torch._C._cuda_getCurrentRawStream  # ~0.3 us, no Stream object
except AttributeError:  # pragma: no cover - older/other torch builds
    _raw_stream = None


def _current_stream(device_index=None):
    if _raw_stream is not None and device_index is not None:
        handle = _raw_stream(device_index)
    else:
        handle = torch.cuda.current_stream().cuda_stream
    s = _streams.get(handle)
    if s is None:
        # external_stream wraps PyTorch's stream without owning it; cache the wrapper.
        s = cuda.external_stream(handle)
        _streams[handle] = s
    return s


class _FastLaunch:
    """Launches one compiled kernel through cuLaunchKernel with a packed parameter
    buffer, skipping Numba's per-call argument typing and array wrapping (about 40 us
    per array argument through cuda.as_cuda_array + dispatch).

    Numba's kernel ABI passes a 1-D array as 7 machine words (meminfo, parent, nitems,
    itemsize, data, shape, stride) and int64/float64 scalars as one word each, so every
    parameter is 8 bytes: one int64 buffer, its slot addresses precomputed once.
    cuLaunchKernel copies the parameters at launch, so the buffer is reused at once."""

    def __init__(self, kern, handle):
        import ctypes
        import struct

        from numba.core import types

        fmt, layout = "<", []
        for ty in kern.argument_types:
            if isinstance(ty, types.Array):
                if ty.ndim != 1:
                    raise TypeError("fast launch handles 1-D arrays only")
                fmt += "qqqqQqq"
                layout.append("a")
            elif ty in (types.int64, types.uint64, types.intp):
                fmt += "q"
                layout.append("i")
            elif ty == types.float64:
                fmt += "d"
                layout.append("f")
            else:
                raise TypeError(f"fast launch: unsupported argument type {ty}")
        self.struct = struct.Struct(fmt)
        n = self.struct.size // 8
        self.buf = (ctypes.c_int64 * n)()
        base = ctypes.addressof(self.buf)
        self.params = (ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)])
        self.layout = tuple(layout)
        self.params_arg = ctypes.cast(self.params, ctypes.c_void_p)
        # The driver's cuLaunchKernel called through ctypes costs about a microsecond;
        # the cuda-python wrapper converts its arguments per call and costs ~10x that.
        # A CUkernel handle (numba-cuda's library loading) is accepted where a
        # CUfunction is (CUDA >= 12).
        self.handle = ctypes.c_void_p(getattr(handle, "value", None) or int(handle))
        self.cuLaunchKernel = _libcuda_launch()
        self.used = False

    def __call__(self, grid, block, shmem, stream_handle, args):
        vals = []
        for kind, a in zip(self.layout, args):
            if kind == "a":
                n = _extent(a) or 1
                isz = a.element_size()
                vals += (0, 0, n, isz, a.data_ptr(), n, isz)
            else:
                vals.append(a)
        self.struct.pack_into(self.buf, 0, *vals)
        gx, gy = grid
        r = self.cuLaunchKernel(self.handle, gx, gy, 1, block, 1, 1, shmem, stream_handle,
                                self.params_arg, None)
        if r != 0:
            raise RuntimeError(f"attn.gpu: cuLaunchKernel failed with CUresult {r}")


class Bound:
    """One launch with every argument but a few tensor pointers frozen: the parameter
    buffer is packed once, and a call writes only the pointer words of the tensors
    that change per call (q, k, v, out, lse), then calls cuLaunchKernel. This is the
    repeated-call path: packing ~70 words in Python per call was about half of
    attn.gpu.forward's host time (bench/NOTES.md, G6).

    The frozen tensors (block lists, dummies) are referenced here, so their device
    memory outlives any cache that created them."""

    __slots__ = ("buf", "params_arg", "slots", "head", "grid", "block", "shmem", "fn",
                 "keep")

    def __init__(self, fast: "_FastLaunch", grid, block, shmem, args, dynamic):
        # Word 4 of an array's 7 is its data pointer. A dynamic tensor may fill several
        # slots (q is k in self-attention): record every one.
        vals, slots, w = [], [], 0
        for kind, a in zip(fast.layout, args):
            if kind == "a":
                n = _extent(a) or 1
                isz = a.element_size()
                vals += (0, 0, n, isz, a.data_ptr(), n, isz)
                j = dynamic.get(id(a))
                if j is not None:
                    slots.append((j, w + 4))
                w += 7
            else:
                vals.append(a)
                w += 1
        import ctypes

        n = fast.struct.size // 8
        self.buf = (ctypes.c_int64 * n)()
        fast.struct.pack_into(self.buf, 0, *vals)
        base = ctypes.addressof(self.buf)
        # Keep the frozen tensors alive, never the per-call ones (they may be large).
        frozen = tuple(a for a in args
                       if isinstance(a, torch.Tensor) and id(a) not in dynamic)
        self.keep = ((ctypes.c_void_p * n)(*[base + 8 * i for i in range(n)]), frozen)
        self.params_arg = ctypes.cast(self.keep[0], ctypes.c_void_p)
        self.slots = tuple(slots)
        # Launch arguments as ready ctypes objects for a prototype-less cuLaunchKernel:
        # ctypes then converts nothing per call (about 1 us of the ~8 us the call took
        # with argtypes and Python ints).
        u = ctypes.c_uint
        gx, gy = grid
        self.fn = _libcuda_launch_raw()
        self.head = (fast.handle, u(gx), u(gy), u(1), u(block), u(1), u(1), u(shmem))
        self.grid, self.block, self.shmem = grid, block, shmem

    def __call__(self, ptrs, device_index):
        buf = self.buf
        for j, s in self.slots:
            buf[s] = ptrs[j]
        h = _stream_handle(device_index)
        st = _stream_args.get(h)
        if st is None:
            import ctypes

            st = _stream_args[h] = ctypes.c_void_p(h)
        r = self.fn(*self.head, st, self.params_arg, None)
        if r != 0:
            raise RuntimeError(f"attn.gpu: cuLaunchKernel failed with CUresult {r}")


_stream_args: dict = {}  # stream handle -> its ctypes argument, made once


class _Capture:
    """Records the launches made inside a ``with capture():`` block (this thread)."""

    def __init__(self):
        import threading

        self.local = threading.local()

    def __enter__(self):
        self.local.launches = []
        return self.local.launches

    def __exit__(self, *exc):
        self.local.launches = None
        return False

    def record(self, item):
        launches = getattr(self.local, "launches", None)
        if launches is not None:
            launches.append(item)


_capture = _Capture()


def capture():
    """Context manager yielding the list of (kernel, grid, block, shmem, args) of the
    launches made inside it."""
    return _capture


def bind(kernel, grid, block, shmem, args, dynamic_tensors):
    """A Bound launcher for ``kernel`` with ``args``, where the tensors in
    ``dynamic_tensors`` (by identity) are replaced per call; None when the fast
    launcher is unavailable (simulator, other numba-cuda ABI)."""
    if SIM:
        return None
    p = _prepared.get(id(kernel))
    if p is None or p.fast is None or not p.fast.used:
        return None
    dynamic = {}
    for j, t in enumerate(dynamic_tensors):
        dynamic.setdefault(id(t), j)
    return Bound(p.fast, grid, block, shmem, args, dynamic)


_launch_fn = None
_launch_raw = None


def _libcuda_launch_raw():
    """cuLaunchKernel without an argtypes prototype: every argument must be passed as
    the ctypes object of its C type (Bound does)."""
    global _launch_raw
    if _launch_raw is None:
        import ctypes

        f = ctypes.CDLL("libcuda.so.1").cuLaunchKernel
        f.restype = ctypes.c_int
        _launch_raw = f
    return _launch_raw


def _libcuda_launch():
    global _launch_fn
    if _launch_fn is None:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuLaunchKernel
        u = ctypes.c_uint
        f.argtypes = [ctypes.c_void_p, u, u, u, u, u, u, u, ctypes.c_void_p,
                      ctypes.c_void_p, ctypes.c_void_p]
        f.restype = ctypes.c_int
        _launch_fn = f
    return _launch_fn


# CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES in the driver API's CUfunction_attribute.
_MAX_DYNAMIC_SHARED = 8


def _set_max_dynamic_shared(handle, nbytes: int):
    """Allow a kernel more than the default 48 KiB of dynamic shared memory (Numba has no
    API for it; the attribute is set on the compiled function's driver handle)."""
    from numba.cuda.cudadrv import driver as drv

    if getattr(drv, "USE_NV_BINDING", True):
        from cuda.bindings import driver as cb

        attr = cb.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if isinstance(handle, getattr(cb, "CUkernel", ())):
            # numba-cuda loads modules as context-independent libraries: the handle is
            # a CUkernel, whose attributes are set per device.
            r, dev = cb.cuCtxGetDevice()
            if r == cb.CUresult.CUDA_SUCCESS:
                (r,) = cb.cuKernelSetAttribute(attr, nbytes, handle, dev)
        else:
            (r,) = cb.cuFuncSetAttribute(handle, attr, nbytes)
        if r != cb.CUresult.CUDA_SUCCESS:
            raise RuntimeError(
                f"attn.gpu: this GPU refuses {nbytes} bytes of shared memory per block "
                f"({r!r}); set smaller tiles")
    else:
        drv.driver.cuFuncSetAttribute(handle, _MAX_DYNAMIC_SHARED, nbytes)


# Kernels a line-info build compiled without line info, by kernel name: the reason.
NO_LINEINFO: dict[str, str] = {}


def _compile(dispatcher, tys):
    """``dispatcher.compile(tys)``; in a line-info build (``lineinfo`` in its target
    options) a kernel NVVM refuses to compile with line info is compiled again without
    it and named in NO_LINEINFO, so a profiling run reports the kernel instead of
    failing. On the H200 (numba-cuda 0.30.4, CUDA 13) NVVM fails with "Symbol name with
    unsupported characters" on one llvm.dbg.value of an inlined device function's
    argument in each backward kernel (the forward kernels compile); dropping that one
    call makes it compile (reproduced from the dumped NVVM IR on a machine without a GPU;
    numba-cuda issue #876 is the same failure on other large kernels)."""
    def build(d):
        k = d.compile(tys)
        if not hasattr(k, "get_regs_per_thread"):  # a Numba returning the cres
            k = d.overloads[tys]
        return k

    opts = getattr(dispatcher, "targetoptions", {})
    if not opts.get("lineinfo"):
        return build(dispatcher)
    try:
        return build(dispatcher)
    except Exception as e:  # NVVM's error class differs between bindings
        if "nvvm" not in type(e).__module__.lower() and "NVVM" not in str(e):
            raise
        plain = cuda.jit(**{k: v for k, v in opts.items()
                            if k in ("cache", "fastmath", "opt", "link")},
                         lineinfo=False)(dispatcher.py_func)
        NO_LINEINFO[dispatcher.py_func.__name__] = f"NVVM refused line info: {e}"[:200]
        return build(plain)


class _Prepared:
    """One kernel specialisation compiled for its argument types, with its shared-memory
    limit raised and, when the driver binding allows, a fast launcher."""

    __slots__ = ("kern", "handle", "fast", "shmem")

    def __init__(self, dispatcher, args, shmem):
        from numba import typeof
        from numba.core import types

        tys = []
        for a in args:
            if isinstance(a, torch.Tensor):
                tys.append(typeof(as_kernel_array(a)))
            elif isinstance(a, float):
                tys.append(types.float64)
            else:
                tys.append(types.int64)
        # Compiling for explicit types (or loading them from Numba's on-disk cache)
        # yields the driver function before the first launch, so the shared-memory
        # attribute is in place when that launch needs more than 48 KiB.
        self.kern = _compile(dispatcher, tuple(tys))
        lib = getattr(self.kern, "_codelibrary", None) or getattr(self.kern, "library")
        self.handle = lib.get_cufunc().handle
        self.shmem = 0
        self.reserve(shmem)
        self.fast = None
        if FAST_LAUNCH:
            try:
                self.fast = _FastLaunch(self.kern, self.handle)
            except Exception as e:  # another numba-cuda ABI: keep the ordinary launch
                fast_launch_errors.append(f"{type(e).__name__}: {e}")

    def reserve(self, shmem):
        if shmem > self.shmem:
            if shmem > 48 * 1024:
                _set_max_dynamic_shared(self.handle, shmem)
            self.shmem = shmem


_prepared: dict[int, _Prepared] = {}
fast_launch_errors: list[str] = []  # why a kernel fell back to Numba's launch
FAST_LAUNCH = os.environ.get("ATTN_GPU_FAST_LAUNCH", "1") != "0"


def prepare(kernel, args, shmem=0) -> _Prepared:
    """Compile ``kernel`` for ``args`` once (or load it from the disk cache) and return
    its launcher; later calls are a dict lookup."""
    p = _prepared.get(id(kernel))
    if p is None:
        p = _prepared[id(kernel)] = _Prepared(kernel, args, shmem)
    else:
        p.reserve(shmem)
    return p


def _stream_handle(device_index):
    if _raw_stream is not None and device_index is not None:
        return _raw_stream(device_index)
    return torch.cuda.current_stream().cuda_stream


def launch(kernel, grid, block, args, device_index=None, shmem=0):
    """Launch a kernel on PyTorch's current stream (default stream in SIM) with
    ``shmem`` bytes of dynamic shared memory. Tensor arguments are passed as flat
    arrays over their storage (no copies)."""
    if SIM:
        kernel[grid, block, 0, shmem](*[as_kernel_array(a) if isinstance(a, torch.Tensor)
                                        else a for a in args])
        return
    p = _prepared.get(id(kernel))
    if p is None or p.shmem < shmem:
        p = prepare(kernel, args, shmem)
    _capture.record((kernel, grid, block, shmem, args))
    fast = p.fast
    if fast is not None:
        try:
            fast(grid, block, shmem, _stream_handle(device_index), args)
        except Exception as e:
            # A launcher that fails on its first call is dropped for good; one that
            # worked before re-raises (a genuine launch error).
            if fast.used:
                raise
            p.fast = None
            fast_launch_errors.append(f"{type(e).__name__}: {e}")
        else:
            fast.used = True
            return
    kernel[grid, block, _current_stream(device_index), shmem](
        *[as_kernel_array(a) if isinstance(a, torch.Tensor) else a for a in args])
