"""FlexAttention benchmark: attn.flex_attention against PyTorch's compiled flex_attention.

    python bench/bench_flex.py [--device cpu|cuda] [--quick] [--out DIR] [--threads N]

Same inputs, the same mods (``attn.mods``: the functions run unchanged in both libraries)
and equivalent block masks (``attn.create_block_mask`` and torch's ``create_block_mask``
with the same mask_mod, BLOCK_SIZE 128) for

    causal, sliding window 512, document mask (fixed-seed lengths), ALiBi + causal,
    tanh soft-cap + causal

at L = 4096 and 16384, D = 64, forward and forward+backward. Contenders per case:

* ``attn``        attn.flex_attention(q, k, v, score_mod, block_mask) (block-sparse);
* ``torch flex``  torch.compile(torch.nn.attention.flex_attention.flex_attention) with
                  torch's BlockMask (CPU: forward only, PyTorch has no CPU backward for
                  it; that is recorded as "no CPU backward", not as an error);
* ``attn dense``  the same attn call without block_mask (score_mod kept): the sparsity
                  speed-up is dense / sparse, and ``efficiency = speed-up x fraction of
                  blocks visited`` (1.0 = time proportional to the work visited);
* ``attn SDPA``   attn.scaled_dot_product_attention(..., is_causal=True), causal case only.

FLOPs: FlashAttention formula (forward 4*B*H*Lq*Lk*D, forward+backward 3.5x), counted
on the *visited* work: dense FLOPs x the fraction of (q block, kv block) pairs the
BlockMask lists, partial and full (kv_num_blocks + full_kv_num_blocks). The dense calls
are credited with the dense FLOPs and SDPA causal with half of them (its own formula).
GFLOP/s on CPU (float32, time.perf_counter), TFLOP/s on CUDA (bfloat16 and float32, CUDA
events). Medians after a warm-up; the first call (compilation: torch.compile / Numba) is
timed on its own. ``create_block_mask`` is timed for both libraries at each L.

Writes ``<out>/flex-<device>-<date>.json`` (and ``-latest.json``), ``flex-<device>-latest.md``
and, when matplotlib imports, ``flex-<device>-latest.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import _common as C  # noqa: E402

SEED = 0
D = 64
WINDOW = 512
SOFTCAP = 30.0
BLOCK_SIZE = 128
DOC_LEN_RANGE = (256, 2048)  # document lengths, uniform in [lo, hi], seeded per L
CASES = ("causal", f"sliding_window_{WINDOW}", "document", "alibi+causal",
         "softcap+causal")
MODES = ("fwd", "fwd+bwd")
IMPL_LABELS = {"attn": "attn", "torch": "torch flex (compiled)",
               "attn_dense": "attn dense", "attn_sdpa": "attn SDPA is_causal"}
# Targets from the issue.
TARGET_EFFICIENCY = 0.7       # sliding window 512 at L = 16k
TARGET_EFF_CASE = f"sliding_window_{WINDOW}"
TARGET_EFF_L = 16384
TARGET_CPU_FWD_RATIO = 3.0    # attn / torch flex, forward, CPU
DISTURBED = 0.10              # other processes' CPU share above which a cell is flagged


class Unsupported(Exception):
    """A contender that cannot run this case by design (not a failure)."""


# --------------------------------------------------------------------------------------
# Problem set-up
# --------------------------------------------------------------------------------------
def shapes_for(device: str, L: int) -> tuple[int, int]:
    """(B, H) at length L: small enough on CPU for a 2-core run, B*L = 16k on CUDA."""
    if device == "cpu":
        return (1, 4) if L <= 4096 else (1, 2)
    return max(1, 16384 // L), 16


def document_offsets(L: int):
    """Cumulative offsets of documents packed into L tokens, lengths uniform in
    DOC_LEN_RANGE from a generator seeded with (SEED, L); the last one is cut at L."""
    import torch
    g = torch.Generator().manual_seed(SEED * 1_000_003 + L)
    lo, hi = DOC_LEN_RANGE
    offs = [0]
    while offs[-1] < L:
        n = int(torch.randint(lo, hi + 1, (1,), generator=g))
        offs.append(min(L, offs[-1] + n))
    return torch.tensor(offs, dtype=torch.int64)


def build_mods(case: str, L: int, H: int, device: str):
    """(mask_mod, score_mod or None, extra info): the same function objects go to both
    libraries; captured tensors live on ``device``."""
    import torch
    from attn import mods
    info: dict = {}
    if case == "causal":
        return mods.causal_mask, None, info
    if case == f"sliding_window_{WINDOW}":
        return mods.sliding_window(WINDOW), None, info
    if case == "document":
        offs = document_offsets(L)
        info["doc_lengths"] = (offs[1:] - offs[:-1]).tolist()
        return mods.document_mask(offs.to(device)), None, info
    if case == "alibi+causal":
        return mods.causal_mask, mods.alibi(mods.alibi_slopes(H).to(device)), info
    if case == "softcap+causal":
        return mods.causal_mask, mods.tanh_softcap(SOFTCAP), info
    raise ValueError(case)


def mask_name(case: str) -> str:
    return "causal" if case.endswith("causal") else case


def score_name(case: str) -> str | None:
    return {"alibi+causal": "alibi", "softcap+causal": f"tanh_softcap({SOFTCAP:g})"}.get(case)


def visited_fraction(bm) -> dict:
    """Fraction of (q block, kv block) pairs the BlockMask lists (partial + full), over
    its (possibly broadcast) batch and head dims."""
    kv = bm.kv_num_blocks
    partial = int(kv.sum())
    full = int(bm.full_kv_num_blocks.sum()) if bm.full_kv_num_blocks is not None else 0
    Lq, Lk = bm.seq_lengths
    QB, KB = bm.BLOCK_SIZE
    total = kv.shape[0] * kv.shape[1] * math.ceil(Lq / QB) * math.ceil(Lk / KB)
    return {"partial_blocks": partial, "full_blocks": full, "total_blocks": total,
            "fraction": (partial + full) / total}


def same_lists(a, b) -> bool:
    """attn's and torch's BlockMask list the same blocks (counts and indices)."""
    import torch

    def listed(num, idx):
        if num is None:
            return None
        n = idx.shape[-1]
        keep = torch.arange(n, device=idx.device) < num.unsqueeze(-1)
        return torch.where(keep, idx.long(), -1).sort(-1).values

    for name in ("kv", "full_kv"):
        x = listed(getattr(a, f"{name}_num_blocks"), getattr(a, f"{name}_indices"))
        y = listed(getattr(b, f"{name}_num_blocks"), getattr(b, f"{name}_indices"))
        if (x is None) != (y is None):
            return False
        if x is None:
            continue
        w = max(x.shape[-1], y.shape[-1])
        x = torch.nn.functional.pad(x, (0, w - x.shape[-1]), value=-1).sort(-1).values
        y = torch.nn.functional.pad(y, (0, w - y.shape[-1]), value=-1).sort(-1).values
        if x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
            return False
    return True


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------
class Runner:
    def __init__(self, device: str, warmup: int, repeats: int):
        import torch
        self.torch = torch
        self.device = device
        self.cuda = device == "cuda"
        self.warmup, self.repeats = warmup, repeats
        self._torch_flex = None

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def wall(self, fn):
        self.sync()
        t0 = time.perf_counter()
        r = fn()
        self.sync()
        return time.perf_counter() - t0, r

    def torch_flex(self):
        if self._torch_flex is None:
            import torch._dynamo
            from torch.nn.attention.flex_attention import flex_attention
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(cfg, name):
                    setattr(cfg, name, 256)
            if hasattr(cfg, "fail_on_recompile_limit_hit"):
                # Never let a recompile limit silently fall back to eager (unfused) flex.
                cfg.fail_on_recompile_limit_hit = True
            self._torch_flex = torch.compile(flex_attention, dynamic=False)
        return self._torch_flex

    def make_inputs(self, B, H, L, dtype, grad: bool):
        torch = self.torch
        g = torch.Generator().manual_seed(SEED + L)
        ts = [torch.randn(B, H, L, D, generator=g, dtype=torch.float32)
              .to(device=self.device, dtype=dtype) for _ in range(4)]
        if grad:
            for t in ts[:3]:
                t.requires_grad_(True)
        return ts

    def time_call(self, fn, inputs, mode: str, flops: float) -> dict:
        """Time fn(q, k, v) (fwd: under no_grad; fwd+bwd: loss (out*dout).sum() backward
        to q, k, v). First call timed alone. Never raises except Unsupported."""
        torch = self.torch
        q, k, v, dout = inputs
        state: dict = {}
        call, setup = C.make_call(torch, fn, q, k, v, dout, mode, state)
        rec: dict = {}
        try:
            setup()
            rec["first_call_s"], _ = self.wall(call)
            mon = None if self.cuda else C.CpuMonitor().start()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            timer = C.time_cuda if self.cuda else C.time_cpu
            t = timer(call, warmup=self.warmup, repeats=self.repeats, setup=setup)
            rec.update(status="ok", **t)
            rec["ms"] = t["median_s"] * 1e3
            rec["flops"] = flops
            rate = flops / t["median_s"]
            rec["gflops"] = rate / 1e9
            rec["tflops"] = rate / 1e12
            if self.cuda:
                rec["peak_extra_mib"] = (torch.cuda.max_memory_allocated() - base) / C.MIB
            if mon is not None:
                rec["other_cpu_fraction"] = mon.stop().get("other_fraction")
            out = state.get("out")
            rec["_out"] = out.detach().float() if out is not None else None
        except Exception as e:  # one contender never crashes the run
            rec.update(self._failure(e, mode))
        finally:
            for x in (q, k, v):
                x.grad = None
            state.clear()
        return rec

    def _failure(self, e: Exception, mode: str) -> dict:
        """status and reason of a contender that raised."""
        if isinstance(e, Unsupported):
            return {"status": "unsupported", "reason": str(e)}
        if isinstance(e, NotImplementedError):
            msg = str(e)
            if not self.cuda and mode != "fwd" and "backward on CPU" in msg:
                return {"status": "unsupported",
                        "reason": f"no CPU backward (PyTorch: {msg[:160]})"}
            return {"status": "error", "reason": f"NotImplementedError: {msg[:400]}"}
        import attn
        status = "not supported" if isinstance(e, attn.BackendNotSupportedError) \
            else "error"
        return {"status": status, "reason": f"{type(e).__name__}: {str(e)[:400]}"}

    def time_interleaved(self, fns: dict, inputs, mode: str, flops: float) -> dict:
        """CPU: like time_call for every fn of ``fns`` (name -> fn), but the timed
        repeats run in rounds of one call each, so a load change on a shared machine
        moves all contenders alike (their ratio is what the targets are about). First
        calls and warm-ups are done per contender beforehand. Returns name -> record."""
        torch = self.torch
        q, k, v, dout = inputs
        recs, live = {}, {}
        for name, fn in fns.items():
            state: dict = {}
            call, setup = C.make_call(torch, fn, q, k, v, dout, mode, state)
            rec: dict = {}
            try:
                setup()
                rec["first_call_s"], _ = self.wall(call)
                for _ in range(max(0, self.warmup)):
                    setup()
                    call()
                live[name] = (call, setup, state, [])
            except Exception as e:
                rec.update(self._failure(e, mode))
            finally:
                for x in (q, k, v):
                    x.grad = None
            recs[name] = rec
        mon = C.CpuMonitor().start()
        for _ in range(max(1, self.repeats)):
            for name in list(live):
                call, setup, state, times = live[name]
                try:
                    setup()
                    t0 = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t0)
                except Exception as e:
                    recs[name].update(self._failure(e, mode))
                    del live[name]
        other = mon.stop().get("other_fraction")
        for name, (call, setup, state, times) in live.items():
            t = C.summarize(times)
            rec = recs[name]
            rec.update(status="ok", **t)
            rec["ms"] = t["median_s"] * 1e3
            rec["flops"] = flops
            rate = flops / t["median_s"]
            rec["gflops"] = rate / 1e9
            rec["tflops"] = rate / 1e12
            rec["other_cpu_fraction"] = other
            rec["interleaved_with"] = sorted(n for n in live if n != name)
            out = state.get("out")
            rec["_out"] = out.detach().float() if out is not None else None
            state.clear()
        for x in (q, k, v):
            x.grad = None
        return recs


def time_create_block_mask(runner: Runner, fn, mask_mod, L: int, repeats: int) -> dict:
    """First call (tracing / compiling the mod) and the median of the following calls."""
    rec: dict = {}
    try:
        rec["first_call_s"], bm = runner.wall(
            lambda: fn(mask_mod, None, None, L, L, device=runner.device,
                       BLOCK_SIZE=BLOCK_SIZE))
        times = [runner.wall(lambda: fn(mask_mod, None, None, L, L, device=runner.device,
                                        BLOCK_SIZE=BLOCK_SIZE))[0]
                 for _ in range(max(1, repeats))]
        rec.update(status="ok", ms=statistics.median(times) * 1e3, times_s=times)
        rec["_bm"] = bm
    except Exception as e:
        rec.update(status="error", reason=f"{type(e).__name__}: {str(e)[:400]}")
    return rec


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------
def run(args, runner: Runner, dtypes, lens, cases, notes) -> tuple[list, list]:
    import torch
    import attn
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm

    rows, cbm_rows = [], []
    cuda = runner.cuda
    unit = "TF/s" if cuda else "GF/s"
    for L in lens:
        B, H = shapes_for(runner.device, L)
        # ---- block masks (built once per L and mask; timed) --------------------------
        # One set of mod objects per L, shared by both libraries and every call: a new
        # function object would make torch.compile (and attn's trace cache) start over.
        built = {case: build_mods(case, L, H, runner.device) for case in cases}
        masks: dict = {}
        for case in cases:
            mname = mask_name(case)
            if mname in masks:
                continue
            mask_mod, _, info = built[case]
            cb = {"L": L, "mask": mname, **info}
            cb["attn"] = time_create_block_mask(runner, attn.create_block_mask, mask_mod, L,
                                                args.cbm_repeats)
            cb["torch"] = time_create_block_mask(runner, torch_cbm, mask_mod, L,
                                                 args.cbm_repeats)
            a, t = cb["attn"], cb["torch"]
            if a.get("status") == "ok" and t.get("status") == "ok":
                cb["torch_over_attn"] = t["ms"] / a["ms"]
                cb["same_blocks"] = same_lists(a["_bm"], t["_bm"])
                if not cb["same_blocks"]:
                    notes.append(f"L={L} {mname}: attn's and torch's BlockMask list "
                                 f"different blocks")
            src = a if a.get("status") == "ok" else t
            cb["visited"] = visited_fraction(src["_bm"]) if src.get("status") == "ok" else None
            masks[mname] = (a.get("_bm"), t.get("_bm"), cb["visited"])
            print(f"L={L:6d} create_block_mask {mname:20s} "
                  + "  ".join(f"{lib} " + (f"{r['ms']:9.2f} ms (first {r['first_call_s']*1e3:.0f})"
                                           if r.get("status") == "ok" else r["status"])
                              for lib, r in (("attn", a), ("torch", t)))
                  + (f"  visited {cb['visited']['fraction']:.3f}" if cb["visited"] else ""),
                  flush=True)
            cbm_rows.append({k: v for k, v in cb.items()})
            for lib in ("attn", "torch"):
                cb[lib].pop("_bm", None)

        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            dense_cache: dict = {}
            for mode in MODES:
                inputs = runner.make_inputs(B, H, L, dtype, grad=(mode != "fwd"))
                dense_flops = C.attention_flops(B, H, L, L, D, False, mode)
                for case in cases:
                    mname = mask_name(case)
                    mask_mod, score_mod, info = built[case]
                    bm_attn, bm_torch, vis = masks[mname]
                    frac = vis["fraction"] if vis else float("nan")
                    row = {"L": L, "B": B, "H": H, "D": D, "dtype": dtype_name,
                           "case": case, "mask": mname, "score_mod": score_name(case),
                           "mode": mode, "visited_fraction": frac,
                           "dense_flops": dense_flops, "visited_flops": dense_flops * frac,
                           "impls": {}}
                    # attn, block-sparse, and torch's compiled flex
                    fns = {}
                    if bm_attn is not None:
                        fns["attn"] = (lambda q, k, v: attn.flex_attention(
                            q, k, v, score_mod=score_mod, block_mask=bm_attn))
                    else:
                        row["impls"]["attn"] = {"status": "error",
                                                "reason": "attn.create_block_mask failed"}
                    if bm_torch is not None:
                        comp = runner.torch_flex()
                        fns["torch"] = (lambda q, k, v: comp(q, k, v, score_mod=score_mod,
                                                             block_mask=bm_torch))
                    else:
                        row["impls"]["torch"] = {"status": "error",
                                                 "reason": "torch create_block_mask failed"}
                    if not cuda and mode == "fwd" and len(fns) == 2:
                        # The ratio the CPU target is about: timed interleaved.
                        row["impls"].update(runner.time_interleaved(
                            fns, inputs, mode, dense_flops * frac))
                    else:
                        for name, fn in fns.items():
                            row["impls"][name] = runner.time_call(fn, inputs, mode,
                                                                  dense_flops * frac)
                    row["impls"] = {n: row["impls"][n] for n in ("attn", "torch")}
                    # attn dense: the same call without block_mask (shared between cases
                    # with the same score_mod)
                    key = score_name(case)
                    if key not in dense_cache:
                        dense_cache[key] = runner.time_call(
                            lambda q, k, v: attn.flex_attention(q, k, v, score_mod=score_mod),
                            inputs, mode, dense_flops)
                    row["impls"]["attn_dense"] = {kk: vv for kk, vv in dense_cache[key].items()}
                    row["impls"]["attn_dense"]["shared_with_cases_of_score_mod"] = key
                    if case == "causal":
                        row["impls"]["attn_sdpa"] = runner.time_call(
                            lambda q, k, v: attn.scaled_dot_product_attention(
                                q, k, v, is_causal=True),
                            inputs, mode, C.attention_flops(B, H, L, L, D, True, mode))
                    derive(row)
                    print_row(row, unit)
                    rows.append(row)
                for key in dense_cache:
                    dense_cache[key].pop("_out", None)
                dense_cache.clear()
                del inputs
    return rows, cbm_rows


def _ok(r) -> bool:
    return bool(r) and r.get("status") == "ok"


def derive(row: dict) -> None:
    """Ratios, speed-up, efficiency and output agreement; drops the kept outputs."""
    a, t = row["impls"].get("attn"), row["impls"].get("torch")
    d, s = row["impls"].get("attn_dense"), row["impls"].get("attn_sdpa")
    row["attn_over_torch"] = t["ms"] / a["ms"] if _ok(a) and _ok(t) else None
    row["speedup_vs_dense"] = d["ms"] / a["ms"] if _ok(a) and _ok(d) else None
    f = row["visited_fraction"]
    row["efficiency"] = (row["speedup_vs_dense"] * f
                         if row["speedup_vs_dense"] is not None and f == f else None)
    # > 1: the flex path with a causal block mask is slower than attn's causal SDPA.
    row["flex_over_sdpa_time"] = a["ms"] / s["ms"] if _ok(a) and _ok(s) else None
    if _ok(a) and _ok(t) and a.get("_out") is not None and t.get("_out") is not None:
        row["max_abs_diff_vs_torch"] = (a["_out"] - t["_out"]).abs().max().item()
    for r in row["impls"].values():
        r.pop("_out", None)


def _disturbed(r) -> bool:
    return (r.get("other_cpu_fraction") or 0.0) > DISTURBED


def print_row(row, unit):
    def cell(r):
        if not _ok(r):
            return f"{r.get('status')}: {str(r.get('reason'))[:90]}" if r else "—"
        rate = r["tflops"] if unit == "TF/s" else r["gflops"]
        return (f"{r['ms']:9.2f} ms {rate:7.1f} {unit}"
                + (f" [busy {r['other_cpu_fraction']:.0%}]" if _disturbed(r) else ""))
    head = (f"L={row['L']:6d} {row['dtype']:8s} {row['case']:20s} {row['mode']:7s} "
            f"vis {row['visited_fraction']:.3f}")
    print(head, flush=True)
    for impl, r in row["impls"].items():
        print(f"      {IMPL_LABELS[impl]:22s} {cell(r)}", flush=True)
    extra = []
    if row["attn_over_torch"] is not None:
        extra.append(f"attn/torch {row['attn_over_torch']:.2f}x")
    if row["speedup_vs_dense"] is not None:
        extra.append(f"speed-up {row['speedup_vs_dense']:.2f}x eff {row['efficiency']:.2f}")
    if row.get("max_abs_diff_vs_torch") is not None:
        extra.append(f"max|attn-torch| {row['max_abs_diff_vs_torch']:.1e}")
    if extra:
        print("      " + "  ".join(extra), flush=True)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------
def _ms_cell(r) -> str:
    if not r:
        return "—"
    if _ok(r):
        return C.fmt_num(r["ms"], 2 if r["ms"] < 100 else 1) + ("*" if _disturbed(r) else "")
    return {"unsupported": "n/a", "not supported": "n/s"}.get(r.get("status"), "err")


def _rate_cell(r, cuda) -> str:
    if not _ok(r):
        return "—"
    return C.fmt_num(r["tflops"] if cuda else r["gflops"], 1)


def summary_paragraph(res: dict) -> str:
    rows, cuda, quick = res["rows"], res["device"] == "cuda", res["config"]["quick"]
    parts = []
    # Efficiency target: sliding window at 16k.
    eff_rows = [r for r in rows if r["case"] == TARGET_EFF_CASE and r["L"] == TARGET_EFF_L]
    if eff_rows:
        bits = []
        for r in eff_rows:
            e = r["efficiency"]
            bits.append(f"{r['dtype']} {r['mode']} " + (
                f"{e:.2f} ({'met' if e >= TARGET_EFFICIENCY else 'NOT met'})"
                if e is not None else "not measured"))
        parts.append(f"Efficiency target (≥ {TARGET_EFFICIENCY} for sliding window {WINDOW} "
                     f"at L={TARGET_EFF_L}): " + "; ".join(bits) + ".")
    else:
        near = [r for r in rows if r["case"] == TARGET_EFF_CASE and r["efficiency"] is not None]
        parts.append(f"Efficiency target (≥ {TARGET_EFFICIENCY} for sliding window {WINDOW} "
                     f"at L={TARGET_EFF_L}): not measured in this run"
                     + (" (--quick: L=4096 only)" if quick else "")
                     + ("; at " + ", ".join(f"L={r['L']} {r['dtype']} {r['mode']} "
                                            f"{r['efficiency']:.2f}" for r in near)
                        if near else "") + ".")
    fwd = [r for r in rows if r["mode"] == "fwd" and r["attn_over_torch"] is not None]
    if not cuda:
        if fwd:
            miss = [r for r in fwd if r["attn_over_torch"] < TARGET_CPU_FWD_RATIO]
            rs = [r["attn_over_torch"] for r in fwd]
            parts.append(
                f"CPU forward target (attn ≥ {TARGET_CPU_FWD_RATIO:g}× torch's compiled "
                f"flex): attn/torch ranges {min(rs):.2f}×–{max(rs):.2f}× (median "
                f"{statistics.median(rs):.2f}×); "
                + ("met in every forward row." if not miss else
                   f"NOT met in {len(miss)} of {len(fwd)} forward rows ("
                   + ", ".join(f"L={r['L']} {r['case']} {r['attn_over_torch']:.2f}×"
                               for r in miss) + ")."))
        else:
            parts.append("CPU forward target: no attn/torch ratio measured.")
        parts.append("Forward+backward has no torch column on CPU: PyTorch's FlexAttention "
                     "has no CPU backward.")
    else:
        for mode in MODES:
            rs = [r["attn_over_torch"] for r in rows
                  if r["mode"] == mode and r["attn_over_torch"] is not None]
            if rs:
                parts.append(f"{mode}: attn/torch {min(rs):.2f}×–{max(rs):.2f}× (median "
                             f"{statistics.median(rs):.2f}×; no stated target on CUDA).")
    bad = [(r, impl, x) for r in rows for impl, x in r["impls"].items()
           if x.get("status") in ("error", "not supported")]
    if bad:
        parts.append(f"{len(bad)} cell(s) failed or are not supported (see Notes).")
    if res.get("smoke_test_note"):
        parts.append(res["smoke_test_note"])
    return " ".join(parts)


def build_markdown(res: dict) -> str:
    cuda = res["device"] == "cuda"
    unit = "TF/s" if cuda else "GF/s"
    m = res["machine"]
    headers = ["L", "B×H", "dtype", "case", "mode", "visited", "attn ms", f"attn {unit}",
               "torch flex ms", f"torch {unit}", "attn/torch", "attn dense ms", "speed-up",
               "efficiency", "max|Δ| vs torch"]
    align = ["r", "l", "l", "l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"]
    table_rows = []
    for r in res["rows"]:
        a, t, d = r["impls"]["attn"], r["impls"]["torch"], r["impls"]["attn_dense"]
        diff = r.get("max_abs_diff_vs_torch")
        table_rows.append([
            r["L"], f"{r['B']}×{r['H']}", r["dtype"], r["case"], r["mode"],
            C.fmt_num(r["visited_fraction"], 3), _ms_cell(a), _rate_cell(a, cuda),
            _ms_cell(t), _rate_cell(t, cuda), C.fmt_ratio(r["attn_over_torch"]),
            _ms_cell(d), C.fmt_ratio(r["speedup_vs_dense"]),
            C.fmt_num(r["efficiency"], 2), f"{diff:.1e}" if diff is not None else "—"])
    if cuda and "gpu" in m:
        where = (f"{m['gpu']['name']} ({m['gpu']['memory_gib']} GiB, CUDA "
                 f"{m['gpu']['cuda']}, driver {m['gpu'].get('driver')}), TF32 matmul "
                 f"{'on' if m['gpu']['tf32_matmul'] else 'off'}")
    else:
        where = (f"{m['cpu'].get('model', '?')}, {m['cpu'].get('cpus_available')} CPUs "
                 f"available, {m['torch_threads']} torch threads")
    cfg = res["config"]
    lines = [
        f"# FlexAttention benchmark ({res['device']}) — {m['date']}",
        "",
    ]
    if res.get("smoke_test_note"):
        lines += [f"> **{res['smoke_test_note']}**", ""]
    lines += [
        f"- machine: {where}; torch {m['torch']}, Python {m['python']}, attn "
        f"{res['versions'].get('attn')}, numba {res['versions'].get('numba')}; git "
        f"{(m['git'].get('commit') or '?')[:10]}{' (dirty)' if m['git'].get('dirty') else ''}",
        f"- D={D}, BLOCK_SIZE {BLOCK_SIZE}; B×H per L as in the table "
        f"({'B·L = 16k tokens, H = 16' if cuda else 'kept small for a 2-core CPU'}); "
        f"median of {cfg['repeats']} repeats after {cfg['warmup']} warm-up calls, the "
        f"first (compiling) call timed apart; {cfg['timer']}"
        + ("; CPU forward: attn and torch flex timed interleaved (one call each per "
           "round), so a load change moves both" if not cuda else ""),
        f"- cases: causal; sliding window {WINDOW} (causal, window+1 keys); document mask "
        f"(lengths uniform in {list(DOC_LEN_RANGE)}, seeded per L); ALiBi (slopes "
        f"2^(-8(h+1)/H)) + causal; tanh soft-cap {SOFTCAP:g} + causal",
        f"- {unit} on the *visited* work: FlashAttention FLOPs of the dense problem "
        f"(4·B·H·L²·D, ×3.5 for fwd+bwd) × visited, the fraction of 128×128 blocks the "
        f"BlockMask lists (partial + full); attn dense is credited with the dense FLOPs",
        "- attn/torch = torch ms ÷ attn ms (> 1: attn faster); speed-up = attn dense ms ÷ "
        "attn ms (same call without block_mask, score_mod kept); efficiency = speed-up × "
        "visited (1.0: time proportional to visited work); max|Δ| = largest |attn − torch| "
        "forward output difference",
        "- fwd under torch.no_grad(); fwd+bwd: loss (out·dout).sum(), gradients to q, k, v. "
        "`n/a` = not available by design (PyTorch's FlexAttention has no CPU backward); "
        "`n/s` = attn.BackendNotSupportedError; `err` = failure (see Notes)",
    ]
    busy = res.get("cpu_busy_before")
    if not cuda and busy is not None:
        lines.append(f"- CPUs {busy:.0%} busy just before the run; load average at start "
                     f"{', '.join(f'{x:.2f}' for x in m.get('load_average_at_start', []))}")
    frac = res.get("contention", {}).get("other_fraction")
    if not cuda and frac is not None:
        lines.append(f"- other processes used {frac:.0%} of the machine's CPU during the run"
                     + (" — WARNING: timings disturbed" if frac > DISTURBED else ""))
    lines += ["", "## Summary", "", summary_paragraph(res), "",
              "## Attention", "", C.markdown_table(headers, table_rows, align), ""]
    if any(_disturbed(x) for r in res["rows"] for x in r["impls"].values()):
        lines += [f"\\* other processes used more than {DISTURBED:.0%} of the CPUs while "
                  f"this cell was timed: noisy.", ""]

    sd = [r for r in res["rows"] if "attn_sdpa" in r["impls"]]
    if sd:
        lines += ["## Causal: flex with a block mask vs attn SDPA is_causal", "",
                  "SDPA's rate uses its own formula (dense FLOPs / 2); flex ÷ SDPA > 1 means "
                  "the flex path is slower than the dedicated causal kernel.", ""]
        srows = []
        for r in sd:
            a, s = r["impls"]["attn"], r["impls"]["attn_sdpa"]
            srows.append([r["L"], r["dtype"], r["mode"], _ms_cell(a), _ms_cell(s),
                          _rate_cell(s, cuda), C.fmt_ratio(r["flex_over_sdpa_time"])])
        lines += [C.markdown_table(["L", "dtype", "mode", "attn flex ms", "attn SDPA ms",
                                    f"SDPA {unit}", "flex ÷ SDPA time"], srows,
                                   ["r", "l", "l", "r", "r", "r", "r"]), ""]

    lines += ["## create_block_mask", "",
              "B = H = None (broadcast), BLOCK_SIZE 128, on the benchmark's device; median of "
              f"{cfg['cbm_repeats']} calls after the first (which traces/compiles the mod).",
              ""]
    crows = []
    for c in res["create_block_mask"]:
        a, t = c["attn"], c["torch"]
        crows.append([c["L"], c["mask"],
                      C.fmt_num(a["first_call_s"] * 1e3, 1) if "first_call_s" in a else "—",
                      _ms_cell(a),
                      C.fmt_num(t["first_call_s"] * 1e3, 1) if "first_call_s" in t else "—",
                      _ms_cell(t), C.fmt_ratio(c.get("torch_over_attn")),
                      C.fmt_num(c["visited"]["fraction"], 3) if c.get("visited") else "—",
                      {True: "yes", False: "NO"}.get(c.get("same_blocks"), "—")])
    lines += [C.markdown_table(["L", "mask", "attn first ms", "attn ms", "torch first ms",
                                "torch ms", "torch/attn", "visited", "same blocks"], crows,
                               ["r", "l", "r", "r", "r", "r", "r", "r", "l"]), ""]

    # First-call (compile) times.
    frows = []
    for r in res["rows"]:
        cells = []
        for impl in ("attn", "torch"):
            x = r["impls"][impl]
            cells.append(C.fmt_num(x["first_call_s"], 2) if "first_call_s" in x and _ok(x)
                         else "—")
        frows.append([r["L"], r["dtype"], r["case"], r["mode"], *cells])
    lines += ["## First call (compilation + one run), seconds", "",
              "attn: tracing the mods and Numba-compiling their tile callbacks (cached per "
              "mod); torch: torch.compile of flex_attention for this mod / mask. Both "
              "libraries keep on-disk caches (Numba's, Inductor's), so these are cold "
              "compile times only on a machine's first run.", "",
              C.markdown_table(["L", "dtype", "case", "mode", "attn s", "torch s"], frows,
                               ["r", "l", "l", "l", "r", "r"]), ""]

    notes = list(res.get("notes", []))
    grouped: dict = {}
    for r in res["rows"]:
        for impl, x in r["impls"].items():
            if x.get("status") != "ok":
                grouped.setdefault((IMPL_LABELS[impl], x.get("status"), x.get("reason")),
                                   []).append(f"L={r['L']} {r['dtype']} {r['case']} "
                                              f"{r['mode']}")
    for c in res["create_block_mask"]:
        for lib in ("attn", "torch"):
            if c[lib].get("status") != "ok":
                grouped.setdefault((f"{lib} create_block_mask", c[lib].get("status"),
                                    c[lib].get("reason")), []).append(
                    f"L={c['L']} {c['mask']}")
    for (who, status, reason), wheres in grouped.items():
        notes.append(f"{who}: {status} in {len(wheres)} cell(s) ({'; '.join(wheres)}) — "
                     f"{reason}")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in dict.fromkeys(notes)] + [""]
    return "\n".join(lines)


def build_plot(res: dict, path: Path) -> Path | None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    cuda = res["device"] == "cuda"
    key = "tflops" if cuda else "gflops"
    labels, series = [], {"attn (block mask)": [], "torch flex (compiled)": [],
                          "attn dense": []}
    for r in res["rows"]:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(r["dtype"],
                                                                             r["dtype"])
        labels.append(f"L{r['L'] // 1024}k {short} {r['case']} {r['mode']}")
        for name, impl in (("attn (block mask)", "attn"), ("torch flex (compiled)", "torch"),
                           ("attn dense", "attn_dense")):
            x = r["impls"].get(impl)
            series[name].append(x[key] if _ok(x) else None)
    m = res["machine"]
    where = m.get("gpu", {}).get("name") if cuda else (
        f"{m['cpu'].get('model')}, {m['torch_threads']} threads")
    title = (f"FlexAttention {'TFLOP/s' if cuda else 'GFLOP/s'} on visited work (median)\n"
             f"{where}, torch {m['torch']}, {m['date']}"
             + (" — SMOKE TEST" if res.get("smoke_test_note") else ""))
    return C.plot_grouped_bars(path, labels, series,
                               ylabel=("TFLOP/s" if cuda else "GFLOP/s") + " (visited)",
                               title=title)


def versions() -> dict:
    out = {}
    for mod in ("attn", "numba", "torch", "triton", "numpy", "Cython"):
        try:
            x = __import__(mod)
            out[mod] = getattr(x, "__version__", "?")
        except Exception:
            out[mod] = None
    try:
        import attn.cpu as ac
        out["attn_cpu_isa"] = getattr(ac, "ISA", None)
    except Exception:
        pass
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="L=4096 only, 1 warm-up + 3 repeats (a smoke test)")
    p.add_argument("--out", default=str(HERE / "results"), help="output directory")
    p.add_argument("--lens", default="4096,16384")
    p.add_argument("--dtypes", default=None,
                   help="comma list (default float32 on CPU, bfloat16,float32 on CUDA)")
    p.add_argument("--cases", default=",".join(CASES),
                   help=f"comma list out of {', '.join(CASES)}")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--cbm-repeats", type=int, default=None,
                   help="create_block_mask repeats after the first call")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (and OMP_NUM_THREADS) for this run")
    p.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                   help="CPU: wait up to SECONDS for the CPUs to be <25%% busy first")
    args = p.parse_args(argv)

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    import attn
    cuda = args.device == "cuda"
    if cuda:
        if not torch.cuda.is_available():
            print("error: --device cuda but torch.cuda.is_available() is False",
                  file=sys.stderr)
            return 2
        # float32 means float32 (as bench_gpu.py): no TF32 in torch's matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            from attn import gpu  # noqa: F401
        except ImportError:
            # Source tree without an install (the GPU machine): attn.gpu -> <root>/gpu.
            # Any other failure is left to attn's backend, which turns it into a
            # BackendNotSupportedError reason recorded per row.
            attn.__path__.append(str(HERE.parent))
            from attn import gpu  # noqa: F401,F811

    lens = [int(x) for x in args.lens.split(",") if x.strip()]
    if args.quick:
        lens = [L for L in lens if L <= 4096] or [min(lens)]
    dtypes = [s.strip() for s in (args.dtypes or ("bfloat16,float32" if cuda else "float32"))
              .split(",") if s.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            p.error(f"unknown case {c!r} (choose from {', '.join(CASES)})")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    args.cbm_repeats = args.cbm_repeats if args.cbm_repeats is not None else (
        2 if args.quick else 5)

    busy = None if cuda else C.wait_until_idle(args.wait_idle, sample_s=1.0)
    machine = C.machine_description(args.device)
    print(f"# FlexAttention {args.device} | torch {torch.__version__} | threads "
          f"{torch.get_num_threads()} | L {lens} | dtypes {dtypes} | warmup {warmup} "
          f"repeats {repeats}", flush=True)
    if busy is not None and busy > 0.25:
        print(f"WARNING: CPUs {busy:.0%} busy before start; timings will be noisy.",
              flush=True)

    notes: list[str] = []
    runner = Runner(args.device, warmup, repeats)
    t0 = time.perf_counter()
    mon = None if cuda else C.CpuMonitor().start()
    rows, cbm_rows = run(args, runner, dtypes, lens, cases, notes)
    contention = mon.stop() if mon is not None else {}

    res = {
        "schema": "attn-bench-flex/1",
        "device": args.device,
        "machine": machine,
        "versions": versions(),
        "cpu_busy_before": busy,
        "contention": contention,
        "config": {
            "lens": lens, "dtypes": dtypes, "cases": cases, "modes": list(MODES), "D": D,
            "shapes": {str(L): list(shapes_for(args.device, L)) for L in lens},
            "block_size": BLOCK_SIZE, "window": WINDOW, "softcap": SOFTCAP,
            "doc_len_range": list(DOC_LEN_RANGE), "seed": SEED,
            "warmup": warmup, "repeats": repeats, "cbm_repeats": args.cbm_repeats,
            "quick": args.quick, "threads": torch.get_num_threads(),
            "timer": ("CUDA events, median" if cuda else "time.perf_counter, median"),
            "flop_formula": ("dense 4*B*H*L*L*D (x3.5 fwd+bwd) x visited fraction "
                             "(partial+full blocks / all blocks)"),
            "efficiency": "speedup_vs_dense * visited_fraction",
            "attn_over_torch": "torch median / attn median",
            "targets": {"efficiency": {"case": TARGET_EFF_CASE, "L": TARGET_EFF_L,
                                       "min": TARGET_EFFICIENCY},
                        "cpu_fwd_attn_over_torch": TARGET_CPU_FWD_RATIO},
        },
        "create_block_mask": cbm_rows,
        "rows": rows,
        "notes": notes,
        "wall_s": time.perf_counter() - t0,
    }
    if args.quick:
        res["smoke_test_note"] = ("Smoke test (--quick: L=4096 only, few repeats"
                                  + ("" if cuda else ", shared machine") +
                                  "): these numbers check the plumbing, they are not the "
                                  "benchmark")
    out_dir = Path(args.out)
    prefix = f"flex-{args.device}"
    paths = C.write_json(res, out_dir, prefix, date=machine["date"])
    md = build_markdown(res)
    md_path = out_dir / f"{prefix}-latest.md"
    md_path.write_text(md + "\n")
    png = None
    try:
        png = build_plot(res, out_dir / f"{prefix}-latest.png")
    except Exception as e:  # a plot never fails the run
        print(f"plot skipped: {type(e).__name__}: {e}", flush=True)
    print()
    print(md)
    print("wrote", ", ".join(str(x) for x in [*paths, md_path, png] if x))
    print(f"total wall time {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
