"""Shared helpers for the attn benchmarks (CPU now, GPU later).

Everything here is device-agnostic except the two timers: ``time_cpu`` (wall clock,
``time.perf_counter``) and ``time_cuda`` (CUDA events, as DESIGN.md asks for GPU work).
Both warm up first and report the median, which is robust to the odd slow repeat caused by
another process or a page-fault storm; min and all raw times are kept in the JSON too.

FLOP counts use the FlashAttention convention so numbers are comparable with published
tables: forward ``4 * B * H * Lq * Lk * D`` (two matmuls, QK^T and PV, each 2*Lq*Lk*D per
head), halved when causal, and forward+backward 3.5x the forward (backward = 2.5x forward:
five matmuls instead of two). Softmax/exp work is not counted.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

MIB = 1024.0 * 1024.0


# --------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------
def attention_flops(B: int, H: int, Lq: int, Lk: int, D: int, causal: bool,
                    mode: str = "fwd") -> float:
    """FlashAttention-formula FLOPs. ``mode`` is ``"fwd"`` or ``"fwd+bwd"``.

    Causal halves the work (the FlashAttention papers' convention; it slightly
    over-credits the diagonal, which is negligible at these lengths).
    """
    f = 4.0 * B * H * Lq * Lk * D
    if causal:
        f /= 2.0
    if mode == "fwd":
        return f
    if mode in ("fwd+bwd", "fwdbwd"):
        return 3.5 * f
    if mode == "bwd":
        return 2.5 * f
    raise ValueError(f"unknown mode {mode!r}")


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9 if seconds > 0 else float("nan")


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
def summarize(times: Sequence[float]) -> dict:
    times = list(times)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": len(times),
        "times_s": times,
    }


def time_cpu(fn: Callable[[], object], warmup: int = 2, repeats: int = 5,
             setup: Callable[[], object] | None = None) -> dict:
    """Median wall time of ``fn()`` with ``time.perf_counter``.

    ``setup`` (if given) runs before every call, outside the timed region (e.g. to clear
    ``.grad`` before a backward pass).
    """
    for _ in range(max(0, warmup)):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def time_cuda(fn: Callable[[], object], warmup: int = 2, repeats: int = 5,
              setup: Callable[[], object] | None = None) -> dict:
    """Median time of ``fn()`` measured with CUDA events on the current stream.

    Each repeat is bracketed by its own event pair; we synchronise once at the end so the
    host never stalls the queue between repeats (times then measure GPU execution, not
    launch overhead plus idle gaps, as long as the host keeps ahead of the GPU).
    """
    import torch

    for _ in range(max(0, warmup)):
        if setup is not None:
            setup()
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(max(1, repeats)):
        if setup is not None:
            setup()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return summarize([s.elapsed_time(e) / 1e3 for s, e in pairs])


def make_call(torch, fn, q, k, v, dout, mode: str, state: dict):
    """(call, setup) timing ``fn(q, k, v)``: ``fwd`` under no_grad; ``fwd+bwd`` with the
    loss ``(out * dout).sum()`` back to q, k, v (grads cleared in setup, outside the
    timed region). ``state['out']`` keeps the last result for checks."""
    if mode == "fwd":
        def setup():
            state.pop("out", None)

        def call():
            with torch.no_grad():
                state["out"] = fn(q, k, v)
    else:
        def setup():
            state.pop("out", None)
            q.grad = k.grad = v.grad = None

        def call():
            out = fn(q, k, v)
            (out * dout).sum().backward()
            state["out"] = out.detach()
    return call, setup


def matmul_ceiling(n: int = 4096, device: str = "cpu", dtype=None, warmup: int = 1,
                   repeats: int = 3) -> dict:
    """GFLOP/s of one large ``torch.mm`` (n x n @ n x n): the practical compute ceiling
    for the given device/dtype in this run (2*n^3 FLOPs)."""
    import torch

    dtype = dtype or torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    b = torch.randn(n, n, generator=g, dtype=dtype).to(device)
    out = torch.empty(n, n, dtype=dtype, device=device)

    def call():
        torch.mm(a, b, out=out)

    timer = time_cuda if str(device).startswith("cuda") else time_cpu
    t = timer(call, warmup=warmup, repeats=repeats)
    flops = 2.0 * n ** 3
    return {"op": "torch.mm", "n": n, "dtype": str(dtype).replace("torch.", ""),
            "device": str(device), "flops": flops,
            "gflops": gflops(flops, t["median_s"]), **t}


# --------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _cmd(args: Sequence[str], cwd: str | None = None) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=20,
                              cwd=cwd).stdout.strip()
    except Exception:
        return ""


def cpu_description() -> dict:
    info: dict = {}
    cpuinfo = _read("/proc/cpuinfo")
    flags: list[str] = []
    for line in cpuinfo.splitlines():
        if ":" not in line:
            continue
        key, val = (s.strip() for s in line.split(":", 1))
        if key == "model name" and "model" not in info:
            info["model"] = val
        elif key in ("flags", "Features") and not flags:
            flags = val.split()
    lscpu = _cmd(["lscpu"])
    for line in lscpu.splitlines():
        if ":" not in line:
            continue
        key, val = (s.strip() for s in line.split(":", 1))
        if key in ("Model name", "Vendor ID", "CPU family", "Model", "Thread(s) per core",
                   "Core(s) per socket", "Socket(s)", "Hypervisor vendor", "L1d cache",
                   "L2 cache", "L3 cache", "CPU max MHz"):
            info.setdefault("lscpu", {})[key] = val
    if "model" not in info and "lscpu" in info:
        info["model"] = info["lscpu"].get("Model name", "unknown")
    info["logical_cpus"] = os.cpu_count()
    try:
        info["cpus_available"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["cpus_available"] = os.cpu_count()
    interesting = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
                   "avx512_fp16", "amx_tile", "amx_bf16", "sve", "asimd")
    info["isa_flags"] = [f for f in interesting if f in flags]
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            info["mem_total_gib"] = round(int(line.split()[1]) / 1024 / 1024, 2)
    return info


def git_description(repo: str | os.PathLike | None = None) -> dict:
    repo = str(repo or Path(__file__).resolve().parent.parent)
    commit = _cmd(["git", "rev-parse", "HEAD"], cwd=repo)
    dirty = bool(_cmd(["git", "status", "--porcelain"], cwd=repo))
    return {"commit": commit or None, "dirty": dirty if commit else None}


def _torch_build_info() -> dict:
    """BLAS library and the CPU capability ATen dispatches to: the matmul ceiling is
    this BLAS's rate, not the hardware's peak (e.g. MKL on AMD CPUs)."""
    import re
    import torch
    cfg = torch.__config__.show()
    out = {}
    for key in ("BLAS_INFO", "LAPACK_INFO", "USE_MKLDNN"):
        m = re.search(rf"{key}=([^,\s]+)", cfg)
        if m:
            out[key.lower()] = m.group(1)
    m = re.search(r"CPU capability usage: (\S+)", cfg)
    if m:
        out["aten_cpu_capability"] = m.group(1)
    return out


def machine_description(device: str = "cpu") -> dict:
    """Everything needed to interpret a result file later."""
    import torch

    now = _dt.datetime.now().astimezone()
    desc = {
        "date": now.date().isoformat(),
        "datetime": now.isoformat(timespec="seconds"),
        "hostname_platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                               "ATTN_CPU_ISA", "CUDA_VISIBLE_DEVICES")
                if os.environ.get(k) is not None},
        "cpu": cpu_description(),
        "torch_build": _torch_build_info(),
        "git": git_description(),
    }
    try:
        desc["load_average_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        desc["gpu"] = {
            "name": p.name,
            "count": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2 ** 30, 2),
            "sm_count": p.multi_processor_count,
            "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda,
            "driver": (_cmd(["nvidia-smi", "--query-gpu=driver_version",
                             "--format=csv,noheader"]).splitlines() or [None])[0],
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        }
    return desc


# --------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------
def _json_default(o):
    try:
        import torch
        if isinstance(o, torch.dtype):
            return str(o).replace("torch.", "")
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(obj: dict, out_dir: str | os.PathLike, prefix: str,
               date: str | None = None) -> list[Path]:
    """Write ``<prefix>-<date>.json`` and overwrite ``<prefix>-latest.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    date = date or _dt.date.today().isoformat()
    text = json.dumps(obj, indent=2, default=_json_default, allow_nan=True) + "\n"
    paths = [out / f"{prefix}-{date}.json", out / f"{prefix}-latest.json"]
    for p in paths:
        p.write_text(text)
    return paths


def fmt_num(x, digits: int = 1, empty: str = "—") -> str:
    if x is None:
        return empty
    try:
        if x != x:  # NaN
            return empty
    except TypeError:
        return str(x)
    return f"{x:.{digits}f}"


def fmt_ratio(x) -> str:
    return fmt_num(x, 2) if x is None or x != x else f"{x:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
    """GitHub markdown table; ``align`` per column is 'l' or 'r'."""
    rows = [[str(c) for c in r] for r in rows]
    align = list(align or ["l"] * len(headers))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(
            c.rjust(w) if a == "r" else c.ljust(w)
            for c, w, a in zip(cells, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def plot_grouped_bars(path: str | os.PathLike, case_labels: Sequence[str],
                      series: dict[str, Sequence[float | None]], *, ylabel: str,
                      title: str, ceiling: float | None = None,
                      ceiling_label: str = "ceiling") -> Path:
    """Grouped bar chart: one group per case, one bar per series; missing values (None/NaN)
    leave a gap. ``ceiling`` draws a horizontal dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_cases, n_series = len(case_labels), max(1, len(series))
    width = 0.8 / n_series
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * n_cases + 2), 5.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, (name, vals) in enumerate(series.items()):
        xs, ys = [], []
        for i, v in enumerate(vals):
            if v is None or v != v:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            ys.append(v)
        ax.bar(xs, ys, width=width, label=name, color=colors[j % len(colors)])
    if ceiling is not None and ceiling == ceiling:
        ax.axhline(ceiling, color="k", linestyle="--", linewidth=1.2,
                   label=f"{ceiling_label} ({ceiling:.0f})")
    ax.set_xticks(range(n_cases))
    ax.set_xticklabels(case_labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# Subprocess helper
# --------------------------------------------------------------------------------------
RESULT_TAG = "@@BENCH_RESULT@@"


def emit_result(obj: dict) -> None:
    """Worker side: print one tagged JSON line that ``run_worker`` picks up."""
    print(RESULT_TAG + json.dumps(obj, default=_json_default), flush=True)


def run_worker(argv: Sequence[str], env: dict | None = None,
               timeout: float = 600.0) -> dict:
    """Run a worker subprocess and return the JSON it emitted with ``emit_result``.

    Never raises: failures come back as ``{"status": "error", "reason": ...}``.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        p = subprocess.run(list(argv), capture_output=True, text=True, env=full_env,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"worker timed out after {timeout:.0f}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"status": "error",
            "reason": f"worker exit {p.returncode}: " + " | ".join(tail)[-400:]}


# --------------------------------------------------------------------------------------
# Contention: how much CPU did *other* processes use while we were timing?
# --------------------------------------------------------------------------------------
def _system_busy_seconds() -> float | None:
    """Busy CPU-seconds of the whole machine since boot (all CPUs, from /proc/stat)."""
    line = _read("/proc/stat").splitlines()[:1]
    if not line:
        return None
    vals = [int(x) for x in line[0].split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    busy = sum(vals[:8]) - vals[3] - (vals[4] if len(vals) > 4 else 0)
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class CpuMonitor:
    """Fraction of the machine's CPU capacity used by other processes between
    ``start()`` and ``stop()``: (machine busy time - our own and our waited-for
    children's CPU time) / (wall time * CPUs). Near 0 means the timings were not
    disturbed; 0.5 on a 2-core box means another process held a whole core."""

    def start(self) -> "CpuMonitor":
        self.t0 = time.perf_counter()
        self.sys0 = _system_busy_seconds()
        self.own0 = _own_cpu_seconds()
        return self

    def stop(self, min_wall_s: float = 0.5) -> dict:
        """``other_fraction`` is left out for windows shorter than ``min_wall_s``: both
        clocks tick at 1/CLK_TCK (10 ms), too coarse to judge a shorter window."""
        wall = time.perf_counter() - self.t0
        sys1 = _system_busy_seconds()
        own = _own_cpu_seconds() - self.own0
        ncpu = os.cpu_count() or 1
        out = {"wall_s": wall, "own_cpu_s": own, "cpus": ncpu}
        if self.sys0 is not None and sys1 is not None and wall >= min_wall_s:
            other = max(0.0, (sys1 - self.sys0) - own)
            out["other_cpu_s"] = other
            out["other_fraction"] = min(1.0, other / (wall * ncpu))
        return out


def wait_until_idle(max_wait_s: float, threshold: float = 0.25,
                    sample_s: float = 2.0) -> float | None:
    """Sleep until the machine's busy fraction drops below ``threshold`` or
    ``max_wait_s`` passes; returns the last measured busy fraction."""
    deadline = time.monotonic() + max_wait_s
    while True:
        a, t0 = _system_busy_seconds(), time.perf_counter()
        time.sleep(sample_s)
        b, t1 = _system_busy_seconds(), time.perf_counter()
        if a is None or b is None:
            return None
        busy = (b - a) / ((t1 - t0) * (os.cpu_count() or 1))
        if busy < threshold or time.monotonic() >= deadline:
            return busy
