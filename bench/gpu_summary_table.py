"""Render the JSON of bench/device/gpu_summary.py (run on the GPU machine) as the README
summary: bench/results/gpu-summary-latest.md and gpu-summary-latest.png.

Usage: python bench/gpu_summary_table.py bench/results/gpu-summary-DATE.json [--note TEXT]
The note says which attn kernels the run measured (the JSON records the numbers only)."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_num, markdown_table, plot_grouped_bars  # noqa: E402

PEERS = ("EFFICIENT", "FLASH", "CUDNN")


def ratio(a, b):
    return "—" if a is None or not b else f"{a / b:.2f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--note", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    a = ap.parse_args()
    d = json.load(open(a.json))
    rows, labels, series = [], [], {n: [] for n in ("attn",) + PEERS}
    for r in d["rows"]:
        for mode in ("fwd", "fwd+bwd"):
            t = r[mode]
            rows.append([r["dtype"], r["D"], r["L"], "yes" if r["causal"] else "no", mode,
                         fmt_num(t.get("attn")), *(fmt_num(t.get(p)) for p in PEERS),
                         ratio(t.get("attn"), t.get("EFFICIENT")),
                         ratio(t.get("attn"), t.get("FLASH"))])
            labels.append(f"{r['dtype'][:4]} D{r['D']} L{r['L']}"
                          f"{' c' if r['causal'] else ''} {mode}")
            for n in series:
                series[n].append(t.get(n))
    head = (f"# GPU summary benchmark — {d['device']}, {d['date']}, torch {d['torch']}"
            + (f", numba-cuda {d['numba_cuda']}" if d.get("numba_cuda") else "") + "\n\n"
            "`python bench/device/gpu_summary.py` (one process; B·L = 16k tokens, H·D = 2048; "
            "TFLOP/s by the FlashAttention formula, fwd 4·B·H·L²·D halved when causal, "
            "fwd+bwd 3.5×; CUDA events, median of 7 after 2 warm-ups; TF32 off). "
            f"JSON: `{os.path.basename(a.json)}`. {a.note}\n\n")
    table = markdown_table(["dtype", "D", "L", "causal", "mode", "attn", "EFFICIENT", "FLASH",
                            "cuDNN", "attn / EFFICIENT", "attn / FLASH"], rows,
                           align="lllllrrrrrr")
    with open(os.path.join(a.out, "gpu-summary-latest.md"), "w") as f:
        f.write(head + table + "\n\n(float32 has no FLASH / cuDNN kernel in PyTorch.)\n")
    plot_grouped_bars(os.path.join(a.out, "gpu-summary-latest.png"), labels, series,
                      ylabel="TFLOP/s", title=f"attn vs PyTorch SDPA, {d['device']}, "
                                              f"{d['date']}")
    print(head + table)


if __name__ == "__main__":
    main()
