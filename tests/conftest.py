"""pytest configuration for the attn suite.

Shared helpers live in ``tests/_util.py`` (importable as ``_util``: pytest puts this
directory on sys.path because it has no ``__init__.py``).
"""

import importlib.util
import os

import pytest
import torch

import attn

# Running from a source tree without an install (the GPU machine's runs): let attn.gpu
# find gpu/, as an install maps it, so every test file sees the same attn.gpu — including
# those that reach it only through attn's backends (test_torch_flash). find_spec does not
# execute attn.gpu, so a CPU-only install never imports numba here.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if (importlib.util.find_spec("attn.gpu") is None
        and os.path.isfile(os.path.join(_ROOT, "gpu", "__init__.py"))):
    attn.__path__.append(_ROOT)


def pytest_report_header(config):
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"]
    try:
        import attn

        lines.append(f"attn backends: {attn.list_backends()}")
        import attn.cpu as cpu

        lines.append(f"attn.cpu ISA: {getattr(cpu, 'ISA', '?')}, OpenMP: {getattr(cpu, 'OPENMP', '?')}")
    except Exception as e:  # the report header must never break collection
        lines.append(f"attn not importable: {type(e).__name__}: {e}")
    sched = os.environ.get("ATTN_CPU_BWD_SCHEDULE")
    if sched:
        lines.append(f"ATTN_CPU_BWD_SCHEDULE={sched}")
    return lines


@pytest.fixture(autouse=True)
def _isolate_global_state():
    """Every test starts from the same RNG state and leaves torch's thread count as it found it."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
