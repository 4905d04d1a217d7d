"""``python -m attn.profile``: what attn's kernels are and how fast they run, for one problem.

GPU (``--device gpu``; the default when CUDA is available), per kernel launched by one
forward and one backward of ``attn.gpu``:

* the specialisation: the kernel function and the compile-time constants baked into it
  (the scalars its factory closed over: tile sizes, head dims, causal, mask, ...), the
  grid, the block and the dynamic shared memory of the launch;
* what Numba reports of the compiled kernel: registers per thread, static shared memory
  per block, local memory (spills) per thread;
* occupancy: resident blocks per SM from the driver
  (``cuOccupancyMaxActiveBlocksPerMultiprocessor`` through Numba's context) as a share
  of the SM's thread slots, and which resource (registers, shared memory, threads)
  bounds it;
* the instruction mix of the SASS (``nvdisasm``, through Numba's ``inspect_sass``):
  the share of tensor-core instructions (HMMA / HGMMA / IMMA) and of FFMA; without
  ``nvdisasm`` on the PATH, the ``mma`` share of the PTX instead;
* compile time (or Numba disk-cache load time: ``--cold`` compiles into a fresh cache)
  and the time per call, measured with CUDA events over repeated launches of the
  kernel with the recorded arguments;
* ``--ptx`` / ``--sass`` print the code (``--out DIR`` writes one file per kernel);
  ``--lineinfo`` builds with source line info (``ATTN_GPU_LINEINFO=1``) for Nsight
  Compute: ``ncu --set full --import-source yes python -m attn.profile --lineinfo ...``.

Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``: CPU tensors, every CUDA thread
a Python thread) the report lists the same kernels and launches and times a replay,
but there is no compiled code: no registers, SASS, PTX, occupancy or compile time.

CPU (``--device cpu``): the Cython kernels' build (ISA variant, OpenMP), threads, tile
sizes ``BLOCK_M`` x ``BLOCK_N``, the backward schedule chosen for the problem, and the
time per call of the forward kernel, the backward kernel and forward+backward through
the public function. Standard tools profile them further (see README).

``--json PATH`` writes the report as JSON as well.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import torch

__all__ = ["Problem", "cpu_report", "gpu_report", "main", "sass_mix"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}


class Problem:
    """One attention problem: shapes, dtype, causality."""

    def __init__(self, batch=2, heads=8, kv_heads=None, seqlen=1024, kv_seqlen=None,
                 headdim=64, causal=False, dtype="float16"):
        self.B, self.Hq = int(batch), int(heads)
        self.Hkv = int(kv_heads or heads)
        self.Lq = int(seqlen)
        self.Lk = int(kv_seqlen or seqlen)
        self.D = int(headdim)
        self.causal = bool(causal)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.dtype_name, self.dtype = dtype, _DTYPES[dtype]
        for name, v in (("batch", self.B), ("heads", self.Hq), ("kv_heads", self.Hkv),
                        ("seqlen", self.Lq), ("kv_seqlen", self.Lk), ("headdim", self.D)):
            if v <= 0:
                raise ValueError(f"{name} must be positive, got {v}")
        if self.Hq % self.Hkv:
            raise ValueError(f"heads ({self.Hq}) must be a multiple of kv_heads ({self.Hkv})")

    def describe(self) -> str:
        kv = f" Hkv={self.Hkv}" if self.Hkv != self.Hq else ""
        lk = f" Lk={self.Lk}" if self.Lk != self.Lq else ""
        return (f"B={self.B} H={self.Hq}{kv} L={self.Lq}{lk} D={self.D} {self.dtype_name}"
                f"{' causal' if self.causal else ''}")

    def flops(self) -> float:
        """Forward FLOPs, FlashAttention's formula (halved when causal)."""
        f = 4.0 * self.B * self.Hq * self.Lq * self.Lk * self.D
        return f / 2 if self.causal else f

    def inputs(self, device):
        g = torch.Generator(device=device).manual_seed(0)

        def mk(H, L):
            return torch.randn(self.B, H, L, self.D, generator=g, device=device).to(self.dtype)

        return mk(self.Hq, self.Lq), mk(self.Hkv, self.Lk), mk(self.Hkv, self.Lk), \
            mk(self.Hq, self.Lq)


def _median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _cuda_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Seconds per call of fn, timed with CUDA events on the current stream."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(max(1, repeats)):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / max(1, repeats)


# --------------------------------------------------------------------------- CPU
def cpu_report(p: Problem, repeats: int = 5) -> dict:
    """The CPU kernels' configuration and timings for problem ``p`` (a dict)."""
    import attn
    from attn import cpu

    q, k, v, do = p.inputs("cpu")
    scale = 1.0 / math.sqrt(p.D)
    threads = cpu.num_threads()
    out, lse = cpu.forward(q, k, v, None, p.causal, scale)
    t_fwd = _median_seconds(lambda: cpu.forward(q, k, v, None, p.causal, scale), repeats)
    t_bwd = _median_seconds(
        lambda: cpu.backward(q, k, v, out, lse, do, None, None, p.causal, scale), repeats)
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))

    def fwd_bwd():
        attn.scaled_dot_product_attention(qq, kk, vv, is_causal=p.causal,
                                          enable_gqa=p.Hq != p.Hkv).backward(do)

    t_fb = _median_seconds(fwd_bwd, repeats)
    f = p.flops()
    return {
        "device": "cpu",
        "problem": p.describe(),
        "isa": cpu.ISA,
        "isas_built": cpu.available_isas(),
        "openmp": bool(getattr(cpu, "OPENMP", False)),
        "threads": threads,
        "env": {n: os.environ.get(n) for n in ("OMP_NUM_THREADS", "ATTN_CPU_ISA",
                                               "ATTN_CPU_BWD_SCHEDULE")},
        "BLOCK_M": cpu.BLOCK_M,
        "BLOCK_N": cpu.BLOCK_N,
        "backward_schedule": cpu.choose_schedule(p.B, p.Hkv, threads),
        "kernels": [
            {"name": "forward", "seconds": t_fwd, "gflops": f / t_fwd / 1e9},
            {"name": "backward", "seconds": t_bwd, "gflops": 2.5 * f / t_bwd / 1e9},
        ],
        "forward_backward": {"seconds": t_fb, "gflops": 3.5 * f / t_fb / 1e9},
    }


def _format_cpu(r: dict) -> str:
    lines = [
        f"attn CPU kernels: ISA {r['isa']} (built: {', '.join(r['isas_built'])}), OpenMP "
        f"{'on' if r['openmp'] else 'OFF'}, {r['threads']} threads",
        "  env: " + ", ".join(f"{k}={v}" for k, v in r["env"].items() if v is not None)
        if any(v is not None for v in r["env"].values()) else "  env: (defaults)",
        f"  tiles: BLOCK_M={r['BLOCK_M']} queries x BLOCK_N={r['BLOCK_N']} keys; backward "
        f"schedule: {r['backward_schedule']}",
        f"problem: {r['problem']}",
    ]
    for kr in r["kernels"]:
        lines.append(f"  {kr['name']:<17} {kr['seconds'] * 1e3:10.3f} ms "
                     f"{kr['gflops']:9.1f} GFLOP/s")
    fb = r["forward_backward"]
    lines.append(f"  {'forward+backward':<17} {fb['seconds'] * 1e3:10.3f} ms "
                 f"{fb['gflops']:9.1f} GFLOP/s  (attn.scaled_dot_product_attention + autograd)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- GPU
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-fA-F]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_TENSOR_CORE = ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "QGMMA")


def sass_mix(sass: str) -> dict:
    """Instruction counts of a SASS listing: total, tensor-core (HMMA, HGMMA, IMMA, ...),
    FFMA."""
    ops = [m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    tc = sum(1 for o in ops if o in _TENSOR_CORE)
    return {"instructions": len(ops), "tensor_core": tc,
            "ffma": sum(1 for o in ops if o == "FFMA")}


def _ptx_mix(ptx: str) -> dict:
    body = [ln.strip() for ln in ptx.splitlines()]
    ins = [ln for ln in body if ln and not ln.startswith(("//", ".", "{", "}", "$", "@$"))
           and not ln.endswith(":")]
    tc = sum(1 for ln in ins if ln.startswith(("mma.", "wgmma.")))
    return {"instructions": len(ins), "tensor_core": tc,
            "ffma": sum(1 for ln in ins if ln.startswith("fma.rn.f32"))}


def _py_func(kernel):
    return getattr(kernel, "py_func", None) or getattr(kernel, "fn", None)


def _specialisation(kernel) -> dict:
    """The scalar compile-time constants of a kernel: what its factory closed over."""
    import numpy as np

    fn = _py_func(kernel)
    out = {}
    if fn is None:
        return out
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if isinstance(v, (bool, np.bool_)):
            out[name] = bool(v)
        elif isinstance(v, (int, np.integer)):
            out[name] = int(v)
        elif isinstance(v, (float, np.floating)):
            out[name] = float(v)
        elif isinstance(v, str):
            out[name] = v
    return dict(sorted(out.items()))


class _Recorder:
    """Records attn.gpu's launches (kernel, grid, block, shared memory, arguments) and
    the time of each kernel's compile-and-load, by wrapping the launcher's names."""

    def __init__(self, gpu, cuda_mod):
        self.gpu, self.cuda_mod = gpu, cuda_mod
        self.launches = []
        self.compile_seconds = {}
        self.phase = None

    def __enter__(self):
        self._launch, self._prepare = self.gpu.launch, getattr(self.cuda_mod, "prepare", None)
        rec = self

        def launch(kernel, grid, block, args, device_index=None, shmem=0):
            rec.launches.append({"phase": rec.phase, "kernel": kernel, "grid": tuple(grid),
                                 "block": block, "shmem": shmem, "args": tuple(args),
                                 "device_index": device_index})
            return rec._launch(kernel, grid, block, args, device_index, shmem)

        def prepare(kernel, args, shmem=0):
            t0 = time.perf_counter()
            res = rec._prepare(kernel, args, shmem)
            rec.compile_seconds.setdefault(id(kernel), time.perf_counter() - t0)
            return res

        self.gpu.launch = launch
        if self._prepare is not None:
            self.cuda_mod.prepare = prepare
        return self

    def __exit__(self, *exc):
        self.gpu.launch = self._launch
        if self._prepare is not None:
            self.cuda_mod.prepare = self._prepare
        return False


def _kattr(compiled, name):
    v = getattr(compiled, name, None)
    if v is None and callable(getattr(compiled, "get_" + name, None)):
        v = getattr(compiled, "get_" + name)()
    return v


def _compiled_facts(cuda_mod, kernel, threads: int, shmem: int, device) -> dict:
    """Registers, memory, occupancy, instruction mix of a compiled kernel."""
    facts = {}
    prepared = cuda_mod._prepared.get(id(kernel))
    if prepared is None:
        return {"error": "kernel was not prepared by attn.gpu's launcher"}
    compiled = prepared.kern
    facts["registers_per_thread"] = _kattr(compiled, "regs_per_thread")
    facts["static_shared_bytes"] = _kattr(compiled, "shared_mem_per_block")
    facts["local_bytes_per_thread"] = _kattr(compiled, "local_mem_per_thread")
    facts["dynamic_shared_bytes"] = shmem
    props = torch.cuda.get_device_properties(device)
    try:
        lib = getattr(compiled, "_codelibrary", None) or compiled.library
        blocks = cuda_mod.cuda.current_context().get_active_blocks_per_multiprocessor(
            lib.get_cufunc(), threads, shmem)
        facts["blocks_per_sm"] = int(blocks)
        facts["occupancy"] = blocks * threads / props.max_threads_per_multi_processor
    except Exception as e:  # a Numba without this driver call: report, don't fail
        facts["occupancy_error"] = f"{type(e).__name__}: {e}"
    # Which resource bounds the resident blocks (allocation granularity ignored).
    regs = facts["registers_per_thread"] or 0
    smem = (facts["static_shared_bytes"] or 0) + shmem
    limits = {"threads": props.max_threads_per_multi_processor // threads}
    regs_sm = getattr(props, "regs_per_multiprocessor", 0)
    if regs and regs_sm:
        limits["registers"] = regs_sm // (regs * threads)
    smem_sm = getattr(props, "shared_memory_per_multiprocessor", 0)
    if smem and smem_sm:
        limits["shared memory"] = smem_sm // smem
    facts["limited_by"] = min(limits, key=limits.get)
    cc = torch.cuda.get_device_capability(device)
    try:
        facts["ptx"] = compiled.inspect_asm(cc)
    except Exception as e:
        facts["ptx_error"] = f"{type(e).__name__}: {e}"
    try:
        facts["sass"] = compiled.inspect_sass()
    except Exception as e:  # nvdisasm missing from the PATH, most often
        facts["sass_error"] = f"{type(e).__name__}: {e}".splitlines()[0]
    if "sass" in facts:
        facts["mix"], facts["mix_source"] = sass_mix(facts["sass"]), "SASS"
    elif "ptx" in facts:
        facts["mix"], facts["mix_source"] = _ptx_mix(facts["ptx"]), "PTX"
    return facts


def gpu_report(p: Problem, repeats: int = 20, warmup: int = 3, code: bool = True) -> dict:
    """attn.gpu's kernels for problem ``p`` (a dict; see the module docstring).
    ``code=False`` leaves the PTX and SASS text out of the result."""
    import attn
    from attn import gpu
    from attn.gpu import _cuda

    sim = gpu.SIM
    if sim:
        device = torch.device("cpu")
    else:
        ok, why = gpu.available()
        if not ok:
            raise RuntimeError(f"the GPU report needs a working CUDA device: {why}")
        device = torch.device("cuda", torch.cuda.current_device())
    if p.dtype not in gpu.DTYPES:
        raise ValueError(f"attn.gpu takes {[str(d) for d in gpu.DTYPES]}, got {p.dtype}")
    q, k, v, do = p.inputs(device)
    scale = 1.0 / math.sqrt(p.D)

    def sync():
        if not sim:
            torch.cuda.synchronize(device)

    rec = _Recorder(gpu, _cuda)
    with rec:
        rec.phase = "forward"
        t0 = time.perf_counter()
        out, lse = gpu.forward(q, k, v, None, p.causal, scale)
        sync()
        first_fwd = time.perf_counter() - t0
        rec.phase = "backward"
        t0 = time.perf_counter()
        gpu.backward(q, k, v, out, lse, do, None, None, p.causal, scale)
        sync()
        first_bwd = time.perf_counter() - t0

    kernels = []
    for i, L in enumerate(rec.launches):
        kern = L["kernel"]
        fn = _py_func(kern)
        threads = L["block"] if isinstance(L["block"], int) else math.prod(L["block"])
        row = {
            "index": i,
            "phase": L["phase"],
            "name": getattr(fn, "__name__", "?"),
            "module": getattr(fn, "__module__", "?"),
            "specialisation": _specialisation(kern),
            "grid": L["grid"],
            "threads": threads,
            "dynamic_shared_bytes": L["shmem"],
        }
        if getattr(fn, "__name__", None) in _cuda.NO_LINEINFO:
            row["lineinfo_missing"] = _cuda.NO_LINEINFO[fn.__name__]

        def replay(L=L):
            _cuda.launch(L["kernel"], L["grid"], L["block"], L["args"], L["device_index"],
                         L["shmem"])

        if sim:
            row["seconds"] = _median_seconds(replay, 1, 0)
            row["note"] = ("simulator: no compiled code (registers, shared/local memory "
                           "of the build, occupancy, PTX/SASS, compile time); the time is "
                           "the Python simulation's")
        else:
            row.update(_compiled_facts(_cuda, kern, threads, L["shmem"], device))
            row["compile_seconds"] = rec.compile_seconds.get(id(kern))
            row["seconds"] = _cuda_seconds(replay, repeats, warmup)
        if not code:
            row.pop("ptx", None)
            row.pop("sass", None)
        kernels.append(row)

    timer = (lambda fn: _median_seconds(fn, 1, 0)) if sim else (  # noqa: E731
        lambda fn: _cuda_seconds(fn, repeats, warmup))
    # The launcher (attn.gpu.forward / backward, what the backend calls) ...
    t_f = timer(lambda: gpu.forward(q, k, v, None, p.causal, scale))
    t_b = timer(lambda: gpu.backward(q, k, v, out, lse, do, None, None, p.causal, scale))
    # ... and, on a GPU, the public function with autograd (host overhead included).
    public = None
    if not sim:
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        gqa = p.Hq != p.Hkv

        def fwd_bwd():
            attn.scaled_dot_product_attention(qq, kk, vv, is_causal=p.causal,
                                              enable_gqa=gqa).backward(do)

        with attn.use_backend("gpu"):
            t_pf = timer(lambda: attn.scaled_dot_product_attention(
                q, k, v, is_causal=p.causal, enable_gqa=gqa))
            t_pfb = timer(fwd_bwd)
        public = {"forward": t_pf, "forward_backward": t_pfb}
    f = p.flops()
    name = "Numba CUDA simulator" if sim else torch.cuda.get_device_name(device)
    return {
        "device": "gpu",
        "simulator": sim,
        "gpu": name,
        "problem": p.describe(),
        "lineinfo": bool(getattr(sys.modules.get("attn.gpu._kernels"), "LINEINFO", False)),
        "first_call_seconds": {"forward": first_fwd, "backward": first_bwd},
        "kernels": kernels,
        "forward": {"seconds": t_f, "tflops": f / t_f / 1e12},
        "backward": {"seconds": t_b, "tflops": 2.5 * f / t_b / 1e12},
        "public": None if public is None else {
            "forward": {"seconds": public["forward"],
                        "tflops": f / public["forward"] / 1e12},
            "forward_backward": {"seconds": public["forward_backward"],
                                 "tflops": 3.5 * f / public["forward_backward"] / 1e12}},
    }


def _format_gpu(r: dict) -> str:
    lines = [f"attn GPU kernels on {r['gpu']}; problem: {r['problem']}"
             + ("; built with line info" if r["lineinfo"] else "")]
    fc = r["first_call_seconds"]
    lines.append(f"  first calls (compile or cache load + run): forward {fc['forward']:.2f} s, "
                 f"backward {fc['backward']:.2f} s")
    for kr in r["kernels"]:
        spec = " ".join(f"{k}={v}" for k, v in kr["specialisation"].items())
        lines.append(f"[{kr['index']}] {kr['phase']}: {kr['module']}.{kr['name']}  "
                     f"grid={kr['grid']} block={kr['threads']} "
                     f"dynamic smem={kr['dynamic_shared_bytes']} B")
        lines.append(f"    specialisation: {spec}")
        if "lineinfo_missing" in kr:
            lines.append(f"    built without line info: {kr['lineinfo_missing']}")
        if r["simulator"]:
            lines.append(f"    {kr['note']}")
            lines.append(f"    simulated launch: {kr['seconds']:.3f} s")
            continue
        lines.append(
            f"    registers/thread {kr.get('registers_per_thread')}, static smem "
            f"{kr.get('static_shared_bytes')} B, local (spill) "
            f"{kr.get('local_bytes_per_thread')} B/thread")
        if "occupancy" in kr:
            lines.append(f"    occupancy {kr['occupancy']:.0%} ({kr['blocks_per_sm']} "
                         f"blocks/SM, limited by {kr['limited_by']})")
        else:
            lines.append(f"    occupancy: n/a ({kr.get('occupancy_error')})")
        mix = kr.get("mix")
        if mix:
            n = max(mix["instructions"], 1)
            lines.append(
                f"    {kr['mix_source']}: {mix['instructions']} instructions, tensor-core "
                f"{mix['tensor_core']} ({mix['tensor_core'] / n:.1%}), FFMA {mix['ffma']} "
                f"({mix['ffma'] / n:.1%})"
                + (f"  [SASS unavailable: {kr['sass_error']}]" if "sass_error" in kr else ""))
        cs = kr.get("compile_seconds")
        lines.append(f"    compile/load {cs:.2f} s, " if cs is not None else "    ")
        lines[-1] += f"{kr['seconds'] * 1e3:.3f} ms per call (CUDA events)"
    if r["simulator"]:
        lines.append(f"attn.gpu.forward {r['forward']['seconds']:.3f} s, attn.gpu.backward "
                     f"{r['backward']['seconds']:.3f} s (simulated)")
    else:
        f, b = r["forward"], r["backward"]
        lines.append(f"attn.gpu.forward {f['seconds'] * 1e3:.3f} ms ({f['tflops']:.1f} "
                     f"TFLOP/s), attn.gpu.backward {b['seconds'] * 1e3:.3f} ms "
                     f"({b['tflops']:.1f} TFLOP/s)")
        pf, pfb = r["public"]["forward"], r["public"]["forward_backward"]
        lines.append(f"attn.scaled_dot_product_attention: forward {pf['seconds'] * 1e3:.3f} "
                     f"ms ({pf['tflops']:.1f} TFLOP/s), forward+backward "
                     f"{pfb['seconds'] * 1e3:.3f} ms ({pfb['tflops']:.1f} TFLOP/s)")
    return "\n".join(lines)


def _dump_code(r: dict, what: str, out_dir: str | None) -> str:
    text = []
    for kr in r["kernels"]:
        body = kr.get(what)
        if body is None:
            why = "the simulator has no compiled code" if r.get("simulator") else kr.get(
                f"{what}_error", "unavailable")
            text.append(f"// [{kr['index']}] {kr['name']}: no {what.upper()} ({why})")
            continue
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            path = os.path.join(out_dir, f"{kr['index']}_{kr['phase']}_{kr['name']}.{what}")
            with open(path, "w") as fh:
                fh.write(body)
            text.append(f"// [{kr['index']}] {kr['name']}: {what.upper()} written to {path}")
        else:
            text.append(f"// ===== [{kr['index']}] {kr['phase']} {kr['name']} "
                        f"{what.upper()} =====\n{body}")
    return "\n".join(text)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m attn.profile",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cpu", "gpu", "cuda"], default="auto",
                    help="gpu (attn.gpu; CPU tensors under NUMBA_ENABLE_CUDASIM=1) or cpu")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="GQA: key/value heads")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--kv-seqlen", type=int, default=None)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                    help="default: float16 on the GPU, float32 on the CPU")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed calls (default 20 on the GPU, 5 on the CPU, 1 simulated)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--ptx", action="store_true", help="print each kernel's PTX")
    ap.add_argument("--sass", action="store_true", help="print each kernel's SASS")
    ap.add_argument("--out", default=None, help="write --ptx/--sass to files in this folder")
    ap.add_argument("--lineinfo", action="store_true",
                    help="compile with source line info for Nsight Compute "
                         "(ATTN_GPU_LINEINFO=1; bypasses Numba's disk cache)")
    ap.add_argument("--cold", action="store_true",
                    help="compile into a fresh Numba cache (compile time, not load time)")
    ap.add_argument("--json", default=None, help="also write the report as JSON here")
    a = ap.parse_args(argv)

    sim = os.environ.get("NUMBA_ENABLE_CUDASIM", "0").strip() == "1"
    device = a.device
    if device == "auto":
        device = "gpu" if (sim or torch.cuda.is_available()) else "cpu"
    if device == "cuda":
        device = "gpu"
    if device == "gpu" and not sim and not torch.cuda.is_available():
        ap.error("--device gpu needs a CUDA device (or NUMBA_ENABLE_CUDASIM=1 for the "
                 "simulator)")
    if a.lineinfo:
        if "attn.gpu" in sys.modules:
            ap.error("--lineinfo must be set before attn.gpu is imported")
        os.environ["ATTN_GPU_LINEINFO"] = "1"
    if a.cold:
        cache = tempfile.mkdtemp(prefix="attn-numba-cache-")
        os.environ["NUMBA_CACHE_DIR"] = cache
        if "numba" in sys.modules:
            sys.modules["numba"].config.CACHE_DIR = cache
    dtype = a.dtype or ("float16" if device == "gpu" and not sim else "float32")
    try:
        p = Problem(a.batch, a.heads, a.kv_heads, a.seqlen, a.kv_seqlen, a.headdim, a.causal,
                    dtype)
    except ValueError as e:
        ap.error(str(e))
    if device == "cpu":
        r = cpu_report(p, a.repeats or 5)
        print(_format_cpu(r))
    else:
        r = gpu_report(p, a.repeats or (1 if sim else 20), a.warmup)
        print(_format_gpu(r))
        for what in ("ptx", "sass"):
            if getattr(a, what):
                print(_dump_code(r, what, a.out))
    if a.json:
        slim = json.loads(json.dumps(r, default=str))
        for kr in slim.get("kernels", []):
            kr.pop("ptx", None)
            kr.pop("sass", None)
        with open(a.json, "w") as fh:
            json.dump(slim, fh, indent=2)
    return r


if __name__ == "__main__":
    main()
