"""Lazy rescaling in the tensor-core forward (gpu/_mma.py LAZY_RESCALE, bench/NOTES.md
G24) on the GPU: mma_check.py's correctness cases with it on (bf16 dense, causal, attn
masks and flex at D 64 and 128, fp16 dense), each group in a process of its own; then
the bf16 forward timing with it off and on, alternately twice (off, on, off, on: one
process each, FLASH, EFFICIENT and cuDNN beside the first).

    python3 bench/device/lazy_check.py
"""
import json
import multiprocessing as mp
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mma_check as mc  # noqa: E402

# the default tiles spelt out: a non-empty config makes mc.timing time attn alone
DEFAULT = "64:4,2,64,1;128:4,2,32,0"


def pool_map(lazy, fn, items):
    os.environ["ATTN_GPU_LAZY_RESCALE"] = lazy  # read at import by the spawned children
    with mp.get_context("spawn").Pool(len(items), maxtasksperchild=1) as pool:
        return pool.map(fn, items, chunksize=1)


def main():
    specs = [("bfloat16", D, w, "") for D in (64, 128)
             for w in ("dense", "causal", "mask", "flex")] + [("float16", 64, "dense", "")]
    for gr in pool_map("1", mc.worker, specs):
        bad = [r for r in gr["results"] if not r["ok"]]
        print("CHECK lazy", gr["spec"], f"{len(gr['results']) - len(bad)}/"
              f"{len(gr['results'])} ok", [r.get("error", r["case"])[-300:] for r in bad],
              [(k.get("regs"), k.get("local_bytes")) for k in gr["kernels"]], flush=True)
    pts = mc._points(False, (64, 128), (4096, 16384), False)
    for i, (lazy, cfg) in enumerate((("0", ""), ("1", DEFAULT), ("0", DEFAULT),
                                     ("1", DEFAULT))):
        run = pool_map(lazy, mc.timing, [(cfg, pts)])[0]
        for r in run["rows"]:
            print("TIME", json.dumps({"lazy": lazy, "round": i // 2, **{k: r.get(k) for k in (
                "D", "L", "causal", "attn_mma", "FLASH", "CUDNN")}}), flush=True)


if __name__ == "__main__":
    main()
