"""Registers, stack and SASS instruction counts of a tensor-core forward kernel
(gpu/_mma.py) or dK/dV backward kernel (gpu/_mma_bwd.py, ``bwd``), without a GPU:
numba-cuda's compile_ptx for sm_90, then `ptxas -v` and `cuobjdump -sass`
(bench/NOTES.md G10 and G11 quote its output).

    PYTHONPATH=/path/to/numba-cuda-site NUMBA_CUDA_USE_NVIDIA_BINDING=0 \\
        python bench/ptx_report.py KIND D [bwd] [causal] [mask] [mod] [--out DIR]

KIND is f32 (3xTF32), bf16 or f16; ``mask`` an attn_mask, ``mod`` a FlexAttention
(causal) mask_mod, ``doc`` a document mask_mod reading two int64 buffers, ``alibi`` / ``softcap`` that
score_mod beside the causal mask_mod (the kernel of its partial blocks; full blocks share it), ``jag`` / ``jag2``
the per-sequence forward of packed jagged batches (forward_kernel's JAG 1 / 2: with left window edges; with ``bwd``, the per-sequence dK/dV kernel, JAG). The tile
configuration comes from gpu/_mma.py / gpu/_mma_bwd.py or ATTN_GPU_TF32_CONFIG,
ATTN_GPU_MMA_CONFIG, ATTN_GPU_TF32_BWD_CONFIG, ATTN_GPU_MMA_BWD_CONFIG. The float32
backward is compiled whatever ATTN_GPU_TF32X3_BWD says. Needs ptxas and cuobjdump on
PATH.

numba-cuda must be the numba.cuda that runs: its `_numba_cuda_redirector.pth` is read only
from a site directory (a PYTHONPATH entry's .pth files are not), else numba's own
deprecated numba.cuda compiles instead (the jag, doc and mod variants then fail with
"Signature mismatch"). A site without a GPU, as set up on 2026-12-04:
`pip install --no-deps --target SITE numba-cuda==0.30.4 "cuda-bindings==13.*"
cuda-pathfinder cuda-core` (each into its own target, the `cuda/` namespace folders merged
into SITE), `libnvrtc.so.13` from the nvidia-cuda-nvrtc wheel and libnvvm
(/usr/local/cuda-13.0/lib) on LD_LIBRARY_PATH, and a folder holding a sitecustomize.py
with `site.addsitedir(SITE)` as PYTHONPATH. Its ptxas may differ from the GPU machine's:
Numba's resource query there (bench/device/kernel_resources.py) is the evidence.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def numpy_type(t):
    from numba.core import types
    return {"torch.int32": types.int32, "torch.int64": types.int64,
            "torch.float32": types.float32, "torch.bool": types.uint8}[str(t.dtype)]


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    out = Path(sys.argv[sys.argv.index("--out") + 1]) if "--out" in sys.argv else \
        Path(tempfile.mkdtemp())
    args = [a for a in args if a != str(out)]
    kind, D = args[0], int(args[1])
    causal, mask = "causal" in args[2:], "mask" in args[2:]
    bwd, doc = "bwd" in args[2:], "doc" in args[2:]
    jag = 2 if "jag2" in args[2:] else int("jag" in args[2:])
    score = next((a for a in args[2:] if a in ("alibi", "softcap")), None)
    mod = "mod" in args[2:] or doc or score is not None

    import attn
    try:
        from attn.gpu import _mma
    except ImportError:
        attn.__path__.append(str(ROOT))
        from attn.gpu import _mma
    from attn.gpu import _mma_bwd
    from numba import cuda
    from numba.core import types
    import numba.cuda.dispatcher as dispatcher

    class _Hopper:  # device functions compile for the "current device": there is none
        compute_capability = (9, 0)
    dispatcher.get_current_device = lambda: _Hopper()

    def arr(dt):
        return types.Array(dt, 1, "C")
    elt = {"f32": types.float32, "f16": types.float16, "bf16": types.int16}[kind]
    # The launcher's argument types (gpu/_cuda.py): 1-D arrays, int64 and float64 scalars.
    sig = tuple([arr(elt)] * 4 + [arr(types.float32)] * 2 + [types.int64] * 24
                + [types.float64] + [arr(types.int32)] * 4 + [types.int64] * 3
                + [arr(types.float32)] * 4)
    mods = None
    if mod:
        # A mask_mod as the FlexAttention path compiles it: the causal mask_mod (a
        # document mask_mod's min/max clamps do not type with numba-cuda 0.30.4's
        # compile_ptx here: "Signature mismatch", for every kernel and dtype).
        from attn import gpu, mods as amods, _modgen
        if doc:
            # A document mask reading two int64 buffers, as attn.varlen_attn's mask_mod.
            import torch
            q_doc = k_doc = torch.zeros(64, dtype=torch.int64)

            def document(b, h, q_idx, kv_idx):
                return q_doc[q_idx] == k_doc[kv_idx]
            m = _modgen.trace_mask_mod(document)
        else:
            m = _modgen.trace_mask_mod(amods.causal_mask)
        sm = None
        if score == "alibi":
            sm = _modgen.trace_score_mod(amods.alibi(8))
        elif score == "softcap":
            sm = _modgen.trace_score_mod(amods.tanh_softcap(30.0))
        mods = gpu.GpuMods.get(m, sm)
        bufs = list(m.buffers) + (list(sm.buffers) if sm is not None else [])
        sig = sig[:-4] + tuple(types.Array(numpy_type(b), 1, "C") for b in bufs) \
            + sig[-4 + len(bufs):]
    tag = (f"{kind}_{D}{'_bwd' if bwd else ''}{'_causal' if causal else ''}"
           f"{'_mask' if mask else ''}{'_doc' if doc else '_mod' if mod else ''}"
           f"{'_' + score if score else ''}{f'_jag{jag}' if jag else ''}")
    t0 = time.time()
    if bwd:
        k = _mma_bwd.dkdv_kernel(kind, D, D, causal, mask, mods, bool(jag))
        # dkdv's arguments: q k v do, lse delta mask, dk dv, dqa; 28 strides; Hq Hkv G
        # Lq Lk; scale; the four block-list arrays, ncols lb lh; the four buffers.
        sig = (tuple([arr(elt)] * 4 + [arr(types.float32)] * 3 + [arr(elt)] * 2
                     + [arr(types.float32)] + [types.int64] * 33 + [types.float64]
                     + [arr(types.int32)] * 4 + [types.int64] * 3) + sig[-4:])
        cfg = _mma_bwd.config(D, D, kind, mask)
    else:
        k = _mma.forward_kernel(kind, D, D, causal, mask, mods, jag)
        cfg = _mma.config(D, D, kind, mask)
    ptx, _ = cuda.compile_ptx(k.py_func, sig, cc=(9, 0), lineinfo="--lineinfo" in sys.argv)
    print(tag, cfg, f"compile {time.time() - t0:.1f}s")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.ptx").write_text(ptx)
    r = subprocess.run(["ptxas", "-arch=sm_90", "-v", str(out / f"{tag}.ptx"), "-o",
                        str(out / f"{tag}.cubin")], capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        if "Used" in line or "stack" in line or "rror" in line:
            print(line.strip())
    bras = sum(1 for line in ptx.splitlines() if line.strip().startswith(("bra", "@")))
    print(f"PTX: {ptx.count('ld.global')} ld.global, {bras} branches")
    try:
        sass = subprocess.run(["cuobjdump", "-sass", str(out / f"{tag}.cubin")],
                              capture_output=True, text=True).stdout
    except FileNotFoundError:
        print("no cuobjdump on PATH: SASS counts skipped")
        return
    (out / f"{tag}.sass").write_text(sass)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    for prefix in ("HMMA", "LDSM", "LDS.128", "LDGSTS", "MUFU.EX2", "STL", "LDL", "BAR",
                   "SHFL"):
        print(f"{prefix}: {sum(v for op, v in ops.items() if op.startswith(prefix))}")
    print("files in", out)


if __name__ == "__main__":
    main()
