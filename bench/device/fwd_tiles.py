"""Forward tiles at D = 128 (bench/NOTES.md G21): two m16 tiles per warp (a 128-row CTA,
FlashAttention-2's shape) with Q from shared memory, against the default one tile x 64
keys with Q in registers. Each configuration in processes of its own (the tiles are read
at import): mma_check.py's correctness cases (bf16, D 128, dense and causal), then its
timing at L 4096 and 16384, one configuration at a time on the GPU (the default run
with FLASH, EFFICIENT and cuDNN beside it).

    python3 bench/device/fwd_tiles.py [CFG ...]     (default: 128:4,2,32,0 128:4,2,16,0)
"""
import json
import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mma_check as mc  # noqa: E402


def main():
    cfgs = sys.argv[1:] or ["128:4,2,32,0", "128:4,2,16,0"]
    ctx = mp.get_context("spawn")
    specs = [("bfloat16", 128, w, c) for c in [""] + cfgs for w in ("dense", "causal")]
    with ctx.Pool(len(specs), maxtasksperchild=1) as pool:
        groups = pool.map(mc.worker, specs, chunksize=1)
    for gr in groups:
        bad = [r for r in gr["results"] if not r["ok"]]
        print("CHECK", gr["spec"], f"{len(gr['results']) - len(bad)}/{len(gr['results'])} ok",
              [r.get("error", r["case"])[-300:] for r in bad],
              [(k.get("regs"), k.get("local_bytes"), k.get("shared_dyn"))
               for k in gr["kernels"]], flush=True)
    for c in [""] + cfgs:
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            run = pool.map(mc.timing, [(c, mc._points(False, (128,), (4096, 16384),
                                                      False))])[0]
        for r in run["rows"]:
            print("TIME", json.dumps({k: r.get(k) for k in (
                "config", "L", "causal", "attn_mma", "FLASH", "CUDNN")}), flush=True)


if __name__ == "__main__":
    main()
