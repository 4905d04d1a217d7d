"""The tensor-core forward's two flags that have not run on a GPU yet (bench/NOTES.md
G24, G25): lazy rescaling (ATTN_GPU_LAZY_RESCALE=1) and three K/V stages
(ATTN_GPU_FWD_STAGES=3). mma_check.py's correctness groups with both on (bf16 dense,
causal, attn masks and flex at D 64 and 128, fp16 dense), each group in a process of
its own; then the bf16 forward timing per combination, one process each, the default
first with FLASH, EFFICIENT and cuDNN beside it, then the default again at the end
(the spread between the two default runs is the noise of the comparison).

    python3 bench/device/fwd_flags.py
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


def pool_map(lazy, stages, fn, items):
    # read at import by the spawned children
    os.environ["ATTN_GPU_LAZY_RESCALE"] = lazy
    os.environ["ATTN_GPU_FWD_STAGES"] = stages
    with mp.get_context("spawn").Pool(len(items), maxtasksperchild=1) as pool:
        return pool.map(fn, items, chunksize=1)


def main():
    specs = [("bfloat16", D, w, "") for D in (64, 128)
             for w in ("dense", "causal", "mask", "flex")] + [("float16", 64, "dense", "")]
    for gr in pool_map("1", "3", mc.worker, specs):
        bad = [r for r in gr["results"] if not r["ok"]]
        print("CHECK lazy+3 stages", gr["spec"], f"{len(gr['results']) - len(bad)}/"
              f"{len(gr['results'])} ok", [r.get("error", r["case"])[-300:] for r in bad],
              [(k.get("regs"), k.get("local_bytes"), k.get("shared_dyn"))
               for k in gr["kernels"]], flush=True)
    pts = mc._points(False, (64, 128), (4096, 16384), False)
    for lazy, stages, cfg in (("0", "2", ""), ("1", "2", DEFAULT), ("0", "3", DEFAULT),
                              ("1", "3", DEFAULT), ("0", "2", DEFAULT)):
        run = pool_map(lazy, stages, mc.timing, [(cfg, pts)])[0]
        for r in run["rows"]:
            print("TIME", json.dumps({"lazy": lazy, "stages": stages, **{k: r.get(k) for k in (
                "D", "L", "causal", "attn_mma", "FLASH", "CUDNN")}}), flush=True)


if __name__ == "__main__":
    main()
