"""Helpers shared by the device check scripts (mma_check.py, mma_bwd_check.py): attn.gpu
from the source tree, the error measure, and the resources of the kernels compiled."""
from __future__ import annotations

import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def gpu_modules():
    """(attn, attn.gpu); attn.gpu from the source tree when the installed attn has none."""
    import attn
    try:
        from attn import gpu
    except ImportError:
        attn.__path__.append(str(ROOT))
        from attn import gpu
    return attn, gpu


def max_err(a, b):
    """max |a - b| in float64; NaN counts as infinite, an empty tensor as 0."""
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()


def _attr(k, name):
    # numba-cuda names these get_regs_per_thread() or regs_per_thread by version.
    for n in ("get_" + name, name):
        a = getattr(k, n, None)
        if a is not None:
            try:
                return a() if callable(a) else a
            except Exception as e:
                return f"{type(e).__name__}: {e}"
    return None


def kernels_used():
    """Registers, local memory and dynamic shared memory of every kernel prepared in
    this process (Numba's resource queries)."""
    from attn.gpu import _cuda
    rows = []
    for p in list(_cuda._prepared.values()):
        k = p.kern
        fn = getattr(k, "py_func", None)
        rows.append({"kernel": f"{getattr(fn, '__module__', '?')}."
                               f"{getattr(fn, '__qualname__', type(k).__name__)}",
                     "regs": _attr(k, "regs_per_thread"),
                     "local_bytes": _attr(k, "local_mem_per_thread"),
                     "shared_dyn": p.shmem})
    return rows


def print_kernels(groups, fields=("kernel", "regs", "local_bytes", "shared_dyn")):
    """Print the ``fields`` of each distinct row of the groups' "kernels" lists once."""
    seen = set()
    for gr in groups:
        for k in gr.get("kernels", []):
            key = tuple(k.get(f) for f in fields)
            if key not in seen:
                seen.add(key)
                print(key)
