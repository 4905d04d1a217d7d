"""The CPU path must not need the GPU stack: import attn with numba.cuda unimportable."""

import subprocess
import sys
import textwrap

_SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys

    class BlockNumbaCuda(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "numba.cuda" or fullname.startswith("numba.cuda."):
                raise ImportError(f"{fullname} is blocked by the test")
            return None

    sys.meta_path.insert(0, BlockNumbaCuda())

    import torch
    import attn
    from attn.reference import attention

    assert "cpu" in attn.list_backends(), attn.list_backends()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 64, generator=g).requires_grad_() for _ in range(3))
    with attn.use_backend("cpu"):
        out = attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.sum().backward()
    ref, _ = attention(q.detach().double(), k.detach().double(), v.detach().double(), is_causal=True)
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-4, err
    assert q.grad is not None and torch.isfinite(q.grad).all()
    # the automatic choice works as well
    out2 = attn.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(out2, out)
    bad = [m for m in sys.modules if m == "numba.cuda" or m.startswith("numba.cuda.")]
    assert not bad, bad
    print("CPU-PATH-OK")
    """
)


def test_cpu_path_without_numba_cuda():
    r = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"stdout:\\n{r.stdout}\\nstderr:\\n{r.stderr}"
    assert "CPU-PATH-OK" in r.stdout
