"""CPU benchmark: attn vs PyTorch SDPA (flash and math backends) and FlexAttention.

    python bench/bench_cpu.py                # full run (a few minutes on 2 cores)
    python bench/bench_cpu.py --quick        # fewer repeats, no FlexAttention
    python bench/bench_cpu.py --isa avx2     # load attn's avx2 build (sets ATTN_CPU_ISA)
    python bench/bench_cpu.py --self-test    # plumbing check: torch flash stands in for attn

Every implementation runs on the same float32 (B, H, L, D) inputs in the same process:
forward (inference, no autograd graph) and forward+backward (loss = (out * grad).sum()
with a fixed random ``grad``; q, k, v require grad). Each case is warmed up, then the
median of N ``time.perf_counter`` repeats is reported as GFLOP/s with the FlashAttention
formula (see ``_common.attention_flops``), next to the GFLOP/s of a 4096^3 float32
``torch.mm`` measured in the same run (the practical compute ceiling of the machine).

Peak memory is measured separately, in a fresh subprocess per (implementation, shape,
causal, mode), so one case's allocator state can never hide another's: the worker imports
everything, builds the inputs, warms the same implementation up on a tiny shape (thread
pools, lazy initialisation), resets the kernel's resident-set high-water mark
(``echo 5 > /proc/self/clear_refs``), runs the call once and reports
``VmHWM(after) - VmRSS(before)`` from /proc/self/status: the extra resident memory the
call needed at its peak (outputs, saved tensors, gradients and scratch included; inputs
excluded). This sees every allocator (torch's, malloc inside a Cython kernel, OpenMP
stacks), which torch.profiler's memory view would not. Where clear_refs is unavailable
it falls back to ``ru_maxrss`` and says so.

Outputs: ``bench/results/cpu-<date>.json`` and ``cpu-latest.json`` (machine description +
every measurement), ``cpu-latest.md`` (the table, also printed) and ``cpu-latest.png``.
Self-test runs write ``cpu-selftest-*`` instead so they never overwrite real results.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# Benchmark the checkout this script lives in, whether attn was installed (editable) or
# only built in place (python setup.py build_ext --inplace).
sys.path.insert(1, str(HERE.parent))
import _common as C  # noqa: E402

DEFAULT_SHAPES = [(4, 8, 512, 64), (1, 8, 2048, 64), (1, 8, 4096, 64), (1, 8, 2048, 128)]
MODES = ("fwd", "fwd+bwd")
IMPLS = ("attn", "flash", "math", "flex")
LABELS = {"attn": "attn", "flash": "torch flash", "math": "torch math",
          "flex": "flex (compiled)"}
SEED = 0

MEMORY_METHOD = (
    "extra resident memory at the call's peak, in a fresh subprocess per case: "
    "VmHWM after the call minus VmRSS before it, with the high-water mark reset "
    "(/proc/self/clear_refs = 5) after building inputs and warming the same "
    "implementation up on a tiny shape; includes outputs, saved tensors, gradients "
    "and scratch, excludes the inputs")


class Skip(Exception):
    """A case that is deliberately not run; the message is the stated reason."""


# --------------------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------------------
class Ctx:
    """What the implementations need: torch, attn (or None in self-test) and options."""

    def __init__(self, self_test: bool, attn_mod=None):
        import torch
        self.torch = torch
        self.self_test = self_test
        self.attn = attn_mod
        self.flex_compiled = None


def _mem_available_bytes() -> int:
    for line in C._read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _sdpa_with(backend, q, k, v, causal):
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel
    # sdpa_kernel with a single backend raises instead of silently falling back.
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def prepare(impl: str, ctx: Ctx, q, k, v, causal: bool, mode: str):
    """Return ``fn(q, k, v) -> out`` for one implementation, or raise Skip(reason)."""
    from torch.nn.attention import SDPBackend
    torch = ctx.torch
    B, H, L, D = q.shape
    Lk = k.shape[2]

    if impl == "attn":
        if ctx.self_test:
            return lambda q, k, v: _sdpa_with(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
        f = ctx.attn.scaled_dot_product_attention
        return lambda q, k, v: f(q, k, v, is_causal=causal)

    if impl == "flash":
        return lambda q, k, v: _sdpa_with(SDPBackend.FLASH_ATTENTION, q, k, v, causal)

    if impl == "math":
        # The math backend materialises (B, H, Lq, Lk) scores, probabilities and, for
        # backward, their gradients: about 2 (fwd) / 6 (fwd+bwd) such float32 tensors.
        need = (2 if mode == "fwd" else 6) * B * H * L * Lk * 4
        if need > 0.5 * _mem_available_bytes():
            raise Skip(f"math backend would need ~{need / 2**30:.1f} GiB of score "
                       f"matrices, over half of available memory")
        return lambda q, k, v: _sdpa_with(SDPBackend.MATH, q, k, v, causal)

    if impl == "flex":
        if mode != "fwd":
            raise Skip("FlexAttention is timed forward only (compiling its backward on "
                       "CPU would dominate the run time)")
        import torch._dynamo
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        cfg = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, 64)
        if hasattr(cfg, "fail_on_recompile_limit_hit"):
            # Never let a recompile limit silently fall back to eager (unfused) flex.
            cfg.fail_on_recompile_limit_hit = True
        if ctx.flex_compiled is None:
            ctx.flex_compiled = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if causal:
            def causal_mask(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
            block_mask = create_block_mask(causal_mask, None, None, L, Lk, device="cpu")
        comp = ctx.flex_compiled
        return lambda q, k, v: comp(q, k, v, block_mask=block_mask)

    raise ValueError(impl)


def make_inputs(torch, shape, requires_grad: bool):
    B, H, L, D = shape
    g = torch.Generator().manual_seed(SEED)
    q, k, v, dout = (torch.randn(B, H, L, D, generator=g, dtype=torch.float32)
                     for _ in range(4))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, dout


def bench_one(impl, ctx, inputs, causal, mode, warmup, repeats, keep=None):
    """Time one (impl, case). Never raises: returns a dict with status ok/skipped/error."""
    torch = ctx.torch
    q, k, v, dout = inputs
    B, H, L, D = q.shape
    flops = C.attention_flops(B, H, L, k.shape[2], D, causal, mode)
    rec = {"impl": impl}
    try:
        fn = prepare(impl, ctx, q, k, v, causal, mode)
        state: dict = {}
        call, setup = C.make_call(torch, fn, q, k, v, dout, mode, state)
        if impl == "flex":
            # First call compiles; time it separately so warmup cannot hide it.
            t0 = time.perf_counter()
            setup()
            call()
            rec["compile_s"] = time.perf_counter() - t0
        # setup (untimed) clears q/k/v.grad before every call, so backward never
        # pays for gradient accumulation.
        mon = C.CpuMonitor().start()
        t = C.time_cpu(call, warmup=warmup, repeats=repeats, setup=setup)
        rec.update(status="ok", gflops=C.gflops(flops, t["median_s"]), **t)
        # Share of the machine other processes used while this cell was timed.
        rec["other_cpu_fraction"] = mon.stop().get("other_fraction")
        if keep is not None:
            keep["out"] = state.get("out")
            if mode != "fwd":
                keep["grads"] = [x.grad.detach().clone() if x.grad is not None else None
                                 for x in (q, k, v)]
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
    except Exception as e:  # never let one implementation crash the run
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
    finally:
        for x in (q, k, v):
            if x.requires_grad:
                x.grad = None
    return rec


# --------------------------------------------------------------------------------------
# Workers (subprocesses)
# --------------------------------------------------------------------------------------
def _proc_status_kib(key: str) -> int | None:
    m = re.search(rf"^{key}:\s+(\d+)\s+kB", C._read("/proc/self/status"), re.M)
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker_memory(spec: dict) -> dict:
    """Peak extra resident memory of one call, measured in this fresh process."""
    ctx = _make_ctx(spec["self_test"])
    torch = ctx.torch
    impl, shape, causal, mode = spec["impl"], tuple(spec["shape"]), spec["causal"], spec["mode"]
    B, H, L, D = shape
    out = {"impl": impl, "shape": list(shape), "causal": causal, "mode": mode}
    try:
        # Warm the same code path up on a tiny shape: creates OpenMP/ATen thread pools
        # and any lazily initialised state, whose memory is not the call's.
        small = make_inputs(torch, (1, 1, 128, D), mode != "fwd")
        fn_s = prepare(impl, ctx, *small[:3], causal, mode)
        call_s, setup_s = C.make_call(torch, fn_s, *small, mode, {})
        setup_s()
        call_s()
        inputs = make_inputs(torch, shape, mode != "fwd")
        fn = prepare(impl, ctx, *inputs[:3], causal, mode)
        state: dict = {}
        call, setup = C.make_call(torch, fn, *inputs, mode, state)
        setup()
        del small, fn_s, call_s, setup_s
        gc.collect()
        rss0 = _proc_status_kib("VmRSS")
        reset_ok = _reset_peak_rss()
        maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        call()
        if reset_ok:
            peak = _proc_status_kib("VmHWM")
            method = "VmHWM-reset"
            note = None
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            method = "ru_maxrss"
            note = None if peak > maxrss0 else (
                f"peak did not exceed the earlier high-water mark; true value <= "
                f"{(maxrss0 - rss0) / 1024:.1f} MiB")
        out.update(status="ok", method=method, rss_before_mib=rss0 / 1024,
                   peak_extra_mib=(peak - rss0) / 1024,
                   inputs_mib=sum(t.numel() * t.element_size() for t in inputs[:3]) / C.MIB)
        if note:
            out["note"] = note
    except Skip as e:
        out.update(status="skipped", reason=str(e))
    except Exception as e:
        out.update(status="error", reason=f"{type(e).__name__}: {str(e)[:300]}")
    return out


def worker_time(spec: dict) -> dict:
    """Time attn on a list of cases in this process (used for other ISA builds)."""
    ctx = _make_ctx(spec["self_test"])
    torch = ctx.torch
    res = {"isa_requested": os.environ.get("ATTN_CPU_ISA"),
           "isa_loaded": None if ctx.attn is None else getattr(ctx.attn.cpu, "ISA", None),
           "threads": torch.get_num_threads(), "results": []}
    for c in spec["cases"]:
        inputs = make_inputs(torch, tuple(c["shape"]), c["mode"] != "fwd")
        rec = bench_one("attn", ctx, inputs, c["causal"], c["mode"], spec["warmup"],
                        spec["repeats"])
        rec.update(shape=c["shape"], causal=c["causal"], mode=c["mode"])
        res["results"].append(rec)
    return res


def _make_ctx(self_test: bool) -> Ctx:
    attn_mod = None
    if not self_test:
        import attn as attn_mod  # noqa: F811
        import attn.cpu  # noqa: F401
    return Ctx(self_test, attn_mod)


def _worker_cmd(kind: str, spec: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), f"--_worker-{kind}",
            json.dumps(spec)]


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def shape_str(shape) -> str:
    return "x".join(str(s) for s in shape)


def _impl_gf(case, impl):
    r = case["impls"].get(impl)
    return r["gflops"] if r and r.get("status") == "ok" else None


def _impl_mem(case, impl):
    r = case["impls"].get(impl, {}).get("memory")
    return r["peak_extra_mib"] if r and r.get("status") == "ok" else None


DISTURBED = 0.10  # other processes' share of the CPUs above which a cell is flagged


def _disturbed(r) -> bool:
    return (r.get("other_cpu_fraction") or 0.0) > DISTURBED


def _cell_gf(case, impl):
    r = case["impls"].get(impl)
    if r is None:
        return "—"
    if r.get("status") == "ok":
        return C.fmt_num(r["gflops"], 1) + ("*" if _disturbed(r) else "")
    return "skip" if r.get("status") == "skipped" else "err"


def _fmt_mib(x) -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if abs(x) < 10 else f"{x:.0f}"


def build_markdown(res: dict) -> tuple[str, str]:
    """(full markdown document, main table only)."""
    attn_label = res["attn_label"]
    impls = res["config"]["impls"]
    headers = ["shape (B,H,L,D)", "causal", "mode", f"{attn_label} GF/s",
               "torch flash GF/s", "ratio", "torch math GF/s", "ratio"]
    align = ["l", "l", "l", "r", "r", "r", "r", "r"]
    if "flex" in impls:
        headers += ["flex GF/s", "ratio"]
        align += ["r", "r"]
    headers += ["peak MiB attn / flash / math"]
    align += ["r"]
    rows = []
    for c in res["cases"]:
        row = [shape_str(c["shape"]), "yes" if c["causal"] else "no", c["mode"],
               _cell_gf(c, "attn"), _cell_gf(c, "flash"),
               C.fmt_ratio(c["ratios"].get("flash")), _cell_gf(c, "math"),
               C.fmt_ratio(c["ratios"].get("math"))]
        if "flex" in impls:
            row += [_cell_gf(c, "flex"), C.fmt_ratio(c["ratios"].get("flex"))]
        row += [" / ".join(_fmt_mib(_impl_mem(c, i)) for i in ("attn", "flash", "math"))]
        rows.append(row)
    table = C.markdown_table(headers, rows, align)

    m = res["machine"]
    ceil = res["ceiling"]
    lines = [
        f"# attn CPU benchmark — {m['date']}",
        "",
        f"- machine: {m['cpu'].get('model', '?')}, {m['cpu'].get('cpus_available')} CPUs "
        f"available, ISA flags {', '.join(m['cpu'].get('isa_flags', [])) or '?'}, "
        f"{m['cpu'].get('mem_total_gib', '?')} GiB RAM",
        f"- threads: {m['torch_threads']} (torch.get_num_threads()); torch {m['torch']}, "
        f"Python {m['python']}",
        f"- attn ISA: {res['attn_isa']} (available builds: "
        f"{', '.join(res['attn_available_isas']) or '—'})",
        f"- ceiling: float32 torch.mm {ceil['n']}^3 = **{ceil['gflops']:.1f} GFLOP/s** "
        f"(better of two measurements, at the start and end of the timing phase: "
        f"{ceil['runs_gflops']['start']:.1f} and {ceil['runs_gflops']['end']:.1f}; median "
        f"of {ceil['repeats']} each). This is what torch.mm "
        f"({m.get('torch_build', {}).get('blas_info', 'BLAS')}) reaches here, not the "
        f"hardware peak; a kernel can exceed it where the BLAS is not tuned for the CPU",
        f"- FLOPs: FlashAttention formula, fwd 4·B·H·Lq·Lk·D (halved when causal), "
        f"fwd+bwd 3.5× fwd; median of {res['config']['repeats']} repeats after "
        f"{res['config']['warmup']} warm-up calls; float32",
        "- ratio = attn GF/s ÷ peer GF/s (> 1: attn is faster); fwd = inference "
        "(no autograd graph); fwd+bwd loss = (out·grad).sum(), grads for q, k, v",
        f"- peak memory: {res['memory_method'] if res['config']['memory'] else 'not measured (--no-memory)'}",
    ]
    if res.get("self_test"):
        lines.insert(2, "> **SELF-TEST**: the `attn` column is torch's flash backend, "
                        "not attn. These numbers say nothing about attn.\n")
    busy = res.get("cpu_busy_before")
    if busy is not None and busy > 0.25:
        lines.append(f"- WARNING: the CPUs were {busy:.0%} busy before the run started")
    for phase, mon in res.get("contention", {}).items():
        frac = mon.get("other_fraction")
        if frac is None:
            continue
        flag = " — WARNING: timings disturbed" if frac > 0.10 else ""
        lines.append(f"- other processes used {frac:.0%} of the machine's CPU during "
                     f"the {phase} phase{flag}")
    lines += ["", table, ""]
    if any(_disturbed(r) for c in res["cases"] for r in c["impls"].values()):
        lines += [f"\\* other processes used more than {DISTURBED:.0%} of the CPUs while "
                  f"this cell was timed: treat it as noisy.", ""]

    checks = [(c, c.get("check")) for c in res["cases"] if c.get("check")]
    if checks:
        lines += ["## Agreement with torch flash (max |difference|, float32)", ""]
        crow = []
        for c, chk in checks:
            crow.append([shape_str(c["shape"]), "yes" if c["causal"] else "no", c["mode"],
                         f"{chk['max_abs_out']:.2e}",
                         " / ".join(f"{x:.2e}" for x in chk.get("max_abs_grads", []))
                         or "—"])
        lines += [C.markdown_table(["shape", "causal", "mode", "out", "dq / dk / dv"],
                                   crow, ["l", "l", "l", "r", "r"]), ""]

    isa_cmp = res.get("isa_comparison", {})
    lines += ["## Native vs portable build", ""]
    if isa_cmp.get("note"):
        lines += [isa_cmp["note"], ""]
    for isa, block in isa_cmp.get("runs", {}).items():
        if block.get("status") != "ok":
            lines += [f"- {isa}: {block.get('reason', block.get('status'))}", ""]
            continue
        lines += [f"attn with ATTN_CPU_ISA={isa} (loaded `{block.get('isa_loaded')}`) vs "
                  f"the `{res['attn_isa']}` build this run loaded; both timed in "
                  f"subprocesses, one right after the other, after the main run:", ""]
        rws = []
        for r in block["results"]:
            base = r.get("baseline_gflops")
            g = r.get("gflops") if r.get("status") == "ok" else None
            rws.append([shape_str(r["shape"]), "yes" if r["causal"] else "no", r["mode"],
                        C.fmt_num(base), C.fmt_num(g),
                        C.fmt_ratio(g / base if g and base else None)])
        lines += [C.markdown_table(["shape", "causal", "mode",
                                    f"{res['attn_isa']} GF/s", f"{isa} GF/s",
                                    f"{isa} / {res['attn_isa']}"], rws,
                                   ["l", "l", "l", "r", "r", "r"]), ""]

    notes = list(res.get("notes", []))
    grouped: dict = {}
    for c in res["cases"]:
        where = (f"{shape_str(c['shape'])} {'causal' if c['causal'] else 'non-causal'} "
                 f"{c['mode']}")
        for impl, r in c["impls"].items():
            if r.get("status") in ("skipped", "error"):
                grouped.setdefault((LABELS.get(impl, impl), r["status"], r.get("reason")),
                                   []).append(where)
            mem = r.get("memory")
            if mem and mem.get("status") == "error":
                grouped.setdefault((f"peak memory of {LABELS.get(impl, impl)}", "error",
                                    mem.get("reason")), []).append(where)
    for (who, status, reason), wheres in grouped.items():
        notes.append(f"{who}: {status} in {len(wheres)} case(s) ({'; '.join(wheres)}) — "
                     f"{reason}")
    seen, uniq = set(), []
    for n in notes:
        if n not in seen:
            seen.add(n)
            uniq.append(n)
    if uniq:
        lines += ["## Notes", ""] + [f"- {n}" for n in uniq] + [""]
    return "\n".join(lines), table


def build_plot(res: dict, path: Path) -> Path:
    labels, series = [], {}
    impls = res["config"]["impls"]
    for c in res["cases"]:
        labels.append(f"{shape_str(c['shape'])} {'causal' if c['causal'] else 'full'} "
                      f"{c['mode']}")
    for impl in impls:
        name = res["attn_label"] if impl == "attn" else LABELS[impl]
        series[name] = [_impl_gf(c, impl) for c in res["cases"]]
    m = res["machine"]
    title = (f"attention float32 GFLOP/s (FlashAttention formula, median)\n"
             f"{m['cpu'].get('model')}, {m['torch_threads']} threads, torch {m['torch']}, "
             f"attn ISA {res['attn_isa']}, {m['date']}")
    if res.get("self_test"):
        title = "SELF-TEST (attn = torch flash) — " + title
    return C.plot_grouped_bars(path, labels, series, ylabel="GFLOP/s", title=title,
                               ceiling=res["ceiling"]["gflops"],
                               ceiling_label=f"torch.mm {res['ceiling']['n']}³ fp32")


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------
def compare_isas(args, cases, attn_isa, attn_isas, warmup, repeats, contention) -> dict:
    """Time attn with other ISA builds (default: native) in subprocesses.

    The build this run loaded is re-timed in a subprocess too, right before the others,
    so every number in the comparison comes from the same method and the same minutes
    of machine time (the main-run numbers may be minutes older).
    """
    isa_cmp: dict = {"runs": {}}
    wanted = [s.strip() for s in args.compare_isas.split(",") if s.strip()]
    if args.self_test:
        isa_cmp["note"] = "Self-test: no attn build to compare."
        return isa_cmp
    if not wanted:
        isa_cmp["note"] = "No other attn builds requested (--compare-isas '')."
        return isa_cmp
    missing = [s for s in wanted if s not in attn_isas]
    if "native" in missing:
        isa_cmp["note"] = ("The native build (-march=native) was not built "
                           f"(attn.cpu.available_isas() = {attn_isas}); build with "
                           "ATTN_NATIVE=1 to compare it.")
    elif missing:
        isa_cmp["note"] = f"Not built, not compared: {', '.join(missing)}."
    others = [s for s in wanted if s not in missing and s != attn_isa]
    for s in wanted:
        if s == attn_isa:
            isa_cmp["runs"][s] = {"status": "skipped", "reason":
                                  f"this run already loaded {s}; name the other builds "
                                  f"to compare with --compare-isas"}
    if not others:
        return isa_cmp
    spec = {"self_test": False, "warmup": warmup, "repeats": repeats,
            "cases": [{"shape": c["shape"], "causal": c["causal"], "mode": c["mode"]}
                      for c in cases]}
    key = lambda r: (tuple(r["shape"]), r["causal"], r["mode"])  # noqa: E731
    baseline = {}
    for isa in [attn_isa] + others:
        print(f"attn with ATTN_CPU_ISA={isa} (subprocess) ...", flush=True)
        mon = C.CpuMonitor().start()
        block = C.run_worker(_worker_cmd("time", spec), env={"ATTN_CPU_ISA": isa},
                             timeout=1800)
        contention[f"isa-{isa}"] = mon.stop()
        if "results" not in block:
            isa_cmp["runs"][isa] = block
            print(f"  {isa}: {block.get('status')}: {block.get('reason')}", flush=True)
            continue
        block["status"] = "ok"
        if block.get("isa_loaded") != isa:
            block["warning"] = f"requested {isa}, loaded {block.get('isa_loaded')}"
        if isa == attn_isa:
            baseline = {key(r): r.get("gflops") for r in block["results"]
                        if r.get("status") == "ok"}
            isa_cmp["baseline"] = block
            continue
        if not baseline:
            isa_cmp["baseline_fallback"] = ("baseline subprocess failed; comparing with "
                                            "the main run's attn numbers")
            baseline = {key(c): _impl_gf(c, "attn") for c in cases}
        for r in block["results"]:
            r["baseline_gflops"] = baseline.get(key(r))
            if r.get("status") == "ok" and r["baseline_gflops"]:
                r["ratio_vs_baseline"] = r["gflops"] / r["baseline_gflops"]
            msg = (f"{r['gflops']:8.1f} GF/s  ({r.get('ratio_vs_baseline', float('nan')):.2f}x"
                   f" vs {attn_isa})" if r.get("status") == "ok"
                   else f"{r.get('status')}: {r.get('reason')}")
            print(f"  {shape_str(r['shape']):>14} {'causal' if r['causal'] else 'full  '} "
                  f"{r['mode']:8} {isa:8} {msg}", flush=True)
        isa_cmp["runs"][isa] = block
    return isa_cmp


def parse_shapes(text: str):
    shapes = []
    for part in text.split(";"):
        part = part.strip()
        if part:
            shapes.append(tuple(int(x) for x in part.split(",")))
    return shapes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="1 warm-up + 2 repeats, FlexAttention off unless --flex")
    p.add_argument("--isa", default=None,
                   choices=["auto", "generic", "avx2", "avx512", "native"],
                   help="attn CPU build to load (sets ATTN_CPU_ISA before import)")
    p.add_argument("--out", default=str(HERE / "results"), help="output directory")
    p.add_argument("--self-test", action="store_true",
                   help="time torch flash in place of attn (plumbing check)")
    p.add_argument("--shapes", default=None,
                   help='override shapes, e.g. "4,8,512,64;1,8,2048,64"')
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--flex", dest="flex", action="store_true", default=None,
                   help="include compiled FlexAttention forward (default: on unless --quick)")
    p.add_argument("--no-flex", dest="flex", action="store_false")
    p.add_argument("--no-math", action="store_true", help="skip the math backend")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory subprocesses")
    p.add_argument("--compare-isas", default="native",
                   help="comma list of other attn builds to time in subprocesses "
                        "(default: native, when it was built; '' for none)")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="before starting, wait up to SECONDS for the CPUs to be <25%% busy")
    p.add_argument("--matmul-n", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads and OMP_NUM_THREADS for this run")
    p.add_argument("--_worker-memory", dest="worker_memory", default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--_worker-time", dest="worker_time", default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.isa:
        os.environ["ATTN_CPU_ISA"] = args.isa

    if args.worker_memory:
        C.emit_result(worker_memory(json.loads(args.worker_memory)))
        return 0
    if args.worker_time:
        C.emit_result(worker_time(json.loads(args.worker_time)))
        return 0

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)

    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
    flex_on = args.flex if args.flex is not None else not args.quick
    shapes = parse_shapes(args.shapes) if args.shapes else DEFAULT_SHAPES
    impls = ["attn", "flash"] + ([] if args.no_math else ["math"]) + (["flex"] if flex_on else [])
    notes: list[str] = []
    if not flex_on:
        notes.append("FlexAttention not timed in this run (--quick or --no-flex).")

    try:
        ctx = _make_ctx(args.self_test)
    except Exception as e:
        print(f"error: cannot import attn with its CPU backend ({type(e).__name__}: {e}).\n"
              f"Build it first (pip install -e . --no-build-isolation), or run with "
              f"--self-test to check the benchmark's plumbing.", file=sys.stderr)
        return 2
    if args.self_test:
        attn_isa, attn_isas, attn_label = "self-test", [], "attn[=torch flash]"
    else:
        attn_isa = getattr(ctx.attn.cpu, "ISA", "?")
        try:
            attn_isas = list(ctx.attn.cpu.available_isas())
        except Exception:
            attn_isas = []
        attn_label = "attn"
        if args.isa and args.isa != "auto" and attn_isa != args.isa:
            notes.append(f"--isa {args.isa} requested but attn loaded {attn_isa!r}.")

    # Busy fraction of the machine just before we start (waits up to --wait-idle s).
    busy = C.wait_until_idle(args.wait_idle, sample_s=1.0)
    machine = C.machine_description("cpu")
    print(f"# {machine['cpu'].get('model')} | threads {torch.get_num_threads()} | torch "
          f"{torch.__version__} | attn ISA {attn_isa} | warmup {warmup} repeats {repeats}",
          flush=True)
    if busy is not None and busy > 0.25:
        print(f"WARNING: CPUs {busy:.0%} busy before start; timings will be noisy.",
              flush=True)

    t_start = time.perf_counter()
    mon = C.CpuMonitor().start()
    ceil_reps = max(2, min(repeats, 3))
    ceiling_start = C.matmul_ceiling(args.matmul_n, warmup=1, repeats=ceil_reps)
    print(f"ceiling: torch.mm {args.matmul_n}^3 float32 = {ceiling_start['gflops']:.1f} "
          f"GFLOP/s", flush=True)

    cases = []
    for shape in shapes:
        B, H, L, D = shape
        base = make_inputs(torch, shape, False)
        for causal in (False, True):
            for mode in MODES:
                if mode == "fwd":
                    inputs = base
                else:
                    inputs = tuple(t.detach().clone().requires_grad_(i < 3)
                                   for i, t in enumerate(base))
                case = {"shape": list(shape), "causal": causal, "mode": mode,
                        "flops": C.attention_flops(B, H, L, L, D, causal, mode),
                        "impls": {}, "ratios": {}}
                kept = {}
                for impl in impls:
                    keep = {} if impl in ("attn", "flash") else None
                    rec = bench_one(impl, ctx, inputs, causal, mode, warmup, repeats, keep)
                    case["impls"][impl] = rec
                    if keep is not None:
                        kept[impl] = keep
                    msg = (f"{rec['gflops']:8.1f} GF/s  ({rec['median_s'] * 1e3:9.2f} ms)"
                           if rec["status"] == "ok" else f"{rec['status']}: {rec.get('reason')}")
                    if rec["status"] == "ok" and _disturbed(rec):
                        msg += f"  [other processes: {rec['other_cpu_fraction']:.0%} of CPUs]"
                    print(f"  {shape_str(shape):>14} {'causal' if causal else 'full  '} "
                          f"{mode:8} {LABELS[impl]:16} {msg}", flush=True)
                a = _impl_gf(case, "attn")
                for impl in impls:
                    if impl == "attn":
                        continue
                    g = _impl_gf(case, impl)
                    case["ratios"][impl] = a / g if a and g else None
                if kept.get("attn", {}).get("out") is not None and \
                        kept.get("flash", {}).get("out") is not None:
                    chk = {"reference": "torch flash",
                           "max_abs_out": (kept["attn"]["out"] - kept["flash"]["out"])
                           .abs().max().item()}
                    ga, gf = kept["attn"].get("grads"), kept["flash"].get("grads")
                    if ga and gf and all(x is not None for x in ga + gf):
                        chk["max_abs_grads"] = [(x - y).abs().max().item()
                                                for x, y in zip(ga, gf)]
                    case["check"] = chk
                del kept
                cases.append(case)
    # Measure the ceiling again at the end and keep the better one: a ceiling is the
    # best the machine did, and one disturbed measurement should not lower it.
    ceiling_end = C.matmul_ceiling(args.matmul_n, warmup=1, repeats=ceil_reps)
    ceiling = dict(max(ceiling_start, ceiling_end, key=lambda c: c["gflops"]))
    ceiling["runs_gflops"] = {"start": ceiling_start["gflops"], "end": ceiling_end["gflops"]}
    print(f"ceiling at end: {ceiling_end['gflops']:.1f} GFLOP/s; using "
          f"{ceiling['gflops']:.1f}", flush=True)
    t_timing = time.perf_counter() - t_start
    contention = {"timing": mon.stop()}

    if args.memory:
        print("peak memory (fresh subprocess per case) ...", flush=True)
        for case in cases:
            for impl in impls:
                rec = case["impls"][impl]
                if impl == "flex":
                    rec["memory"] = {"status": "skipped", "reason":
                                     "not measured: torch.compile's own compile-time "
                                     "memory would dominate a per-process RSS peak"}
                    continue
                if rec.get("status") == "skipped":
                    rec["memory"] = {"status": "skipped", "reason": rec.get("reason")}
                    continue
                spec = {"impl": impl, "shape": case["shape"], "causal": case["causal"],
                        "mode": case["mode"], "self_test": args.self_test}
                rec["memory"] = C.run_worker(_worker_cmd("memory", spec))
                mm = rec["memory"]
                print(f"  {shape_str(case['shape']):>14} "
                      f"{'causal' if case['causal'] else 'full  '} {case['mode']:8} "
                      f"{LABELS[impl]:16} "
                      + (f"{mm['peak_extra_mib']:8.1f} MiB extra" if mm.get("status") == "ok"
                         else f"{mm.get('status')}: {mm.get('reason')}"), flush=True)
    else:
        notes.append("Peak memory not measured (--no-memory).")

    isa_cmp = compare_isas(args, cases, attn_isa, attn_isas, warmup, repeats, contention)

    res = {
        "schema": "attn-bench-cpu/1",
        "self_test": args.self_test,
        "attn_label": attn_label,
        "attn_isa": attn_isa,
        "attn_available_isas": attn_isas,
        "machine": machine,
        "cpu_busy_before": busy,
        "contention": contention,
        "config": {"shapes": [list(s) for s in shapes], "dtype": "float32",
                   "modes": list(MODES), "impls": impls, "warmup": warmup,
                   "repeats": repeats, "quick": args.quick, "memory": args.memory,
                   "timer": "time.perf_counter, median of repeats",
                   "threads": torch.get_num_threads(), "seed": SEED,
                   "flop_formula": "fwd 4*B*H*Lq*Lk*D (/2 if causal); fwd+bwd 3.5x fwd",
                   "fwd_semantics": "torch.no_grad(), inputs without requires_grad",
                   "fwd_bwd_semantics": "loss=(out*grad).sum(); backward to q,k,v"},
        "memory_method": MEMORY_METHOD,
        "ceiling": ceiling,
        "cases": cases,
        "isa_comparison": isa_cmp,
        "notes": notes,
        "wall_s": {"timing": t_timing, "total": time.perf_counter() - t_start},
    }

    prefix = "cpu-selftest" if args.self_test else "cpu"
    out_dir = Path(args.out)
    paths = C.write_json(res, out_dir, prefix, date=machine["date"])
    md, table = build_markdown(res)
    (out_dir / f"{prefix}-latest.md").write_text(md + "\n")
    png = build_plot(res, out_dir / f"{prefix}-latest.png")
    print()
    print(table)
    print()
    print(f"ceiling (torch.mm {ceiling['n']}^3 fp32): {ceiling['gflops']:.1f} GFLOP/s; "
          f"threads {torch.get_num_threads()}; attn ISA {attn_isa}")
    frac = contention["timing"].get("other_fraction")
    if frac is not None:
        print(f"other processes used {frac:.0%} of the CPUs during timing"
              + (" — WARNING: timings disturbed" if frac > 0.10 else ""))
    if isa_cmp.get("note"):
        print(isa_cmp["note"])
    print("wrote", ", ".join(str(x) for x in [*paths, out_dir / f"{prefix}-latest.md", png]))
    print(f"total wall time {res['wall_s']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
