"""The child-process harness of the CUDA-simulator tests (tests/test_gpu*_sim.py).

The simulator (NUMBA_ENABLE_CUDASIM=1) must be switched on before numba is imported,
and it changes numba.cuda for the whole process; so each check runs as a script in a
child process with the variable set, and the CPU tests in the same pytest run are
untouched.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The first lines of every simulator script: the simulator on before torch and numba
# load, then attn.gpu, from the source tree (sys.argv[1]) when the installed attn has
# no gpu package; and the attn_mask of the test cases.
PRELUDE = r"""
import os, sys
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import torch
import attn
try:
    from attn import gpu
except ImportError:
    attn.__path__.append(sys.argv[1])
    from attn import gpu
assert gpu.SIM

def make_mask(kind, B, Lq, Lk, dtype, g):
    # None; "bool": (1, 1, Lq, Lk) with row 2 fully masked (out 0, lse -inf, zero dQ
    # there); "additive": (B, 1, Lq, Lk) in dtype.
    if kind == "bool":
        mask = torch.rand(1, 1, Lq, Lk, generator=g) > 0.4
        if Lq > 2:
            mask[..., 2, :] = False
        return mask
    if kind == "additive":
        return torch.randn(B, 1, Lq, Lk, generator=g).to(dtype)
    return None
"""


def run_script(body: str, timeout: int, unset=(), env=None) -> str:
    """Run PRELUDE + body in a child process with the simulator on (the variables
    ``unset`` removed from its environment, those of ``env`` set); assert it succeeded
    and printed "OK"; return its stdout."""
    extra = env or {}
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    for name in unset:
        env.pop(name, None)
    env.update(extra)
    r = subprocess.run(
        [sys.executable, "-c", PRELUDE + body, str(ROOT)], env=env, cwd=str(ROOT),
        capture_output=True, text=True, timeout=timeout,
    )
    assert r.returncode == 0, f"simulator run failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    assert "OK" in r.stdout, r.stdout
    return r.stdout


# FlexAttention calls in a simulator script (after PRELUDE): the BlockMask and the
# KernelSpec that attn._flex hands the kernels, with the mods traced to device code.
FLEX = r"""
from attn import mods, _modgen
from attn._flex import KernelSpec

def flex_spec(mask_mod, score_mod, B, H, L, block):
    bm = None
    if mask_mod is not None:
        bm = attn.create_block_mask(mask_mod, B, H, L, L, device="cpu", BLOCK_SIZE=block)
    spec = KernelSpec(None, bm,
                      _modgen.trace_mask_mod(bm.mask_mod) if bm is not None else None,
                      _modgen.trace_score_mod(score_mod) if score_mod else None,
                      False, None)
    return bm, spec

# The FlexAttention cases of the tensor-core tests: float16, L = 49, GQA 2/1, D = 16,
# BLOCK_SIZE 32 (a multiple of both kernels' simulator tiles); a causal mask with ALiBi,
# a document mask, and a score_mod alone (no block mask: the forward's score-in-registers
# path without bit sets, keys past Lk excluded by column).
MMA_FLEX_L = 49
MMA_FLEX_MODS = ((mods.causal_mask, mods.alibi(2)),
                 # padded (tokens 45.. in no document): the block lists and the mod,
                 # not a band (the jagged kernels have their own cases)
                 (mods.document_mask(torch.tensor([0, 10, 11, 40, 45]), length=49), None),
                 (None, mods.tanh_softcap(2.0)))

def check_forward(name, out, lse, ro, rl, dt, tol=4e-3, lse_relative=False):
    # A forward's out and lse against the float64 oracle's (ro, rl): out in dt, lse in
    # float32; no NaN, -inf lse and out 0 exactly where the oracle's row saw no key;
    # float16 P and O rounding, a few ulp of values of order 1 (tol); lse within 1e-4,
    # relative to the largest |lse| when lse_relative. Returns the out error.
    fin = torch.isfinite(rl)
    assert out.dtype == dt and lse.dtype == torch.float32, name
    assert not torch.isnan(out).any(), name
    assert torch.equal(torch.isfinite(lse), fin), name
    assert (out[~fin] == 0).all(), name
    e = (out.double() - ro).abs().max().item()
    el = (lse[fin].double() - rl[fin]).abs().max().item() if fin.any() else 0.0
    lb = 1e-4 * (max(1.0, rl[fin].abs().max().item()) if lse_relative and fin.any()
                 else 1.0)
    assert e <= tol and el <= lb, f"{name}: out err {e}, lse err {el}"
    return e

def mma_flex_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, MMA_FLEX_L, 16, generator=g).to(torch.float16)
               for H in (2, 1, 1))
    return g, q, k, v
"""
