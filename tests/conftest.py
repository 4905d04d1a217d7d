"""pytest configuration for the attn suite.

Shared helpers live in ``tests/_util.py`` (importable as ``_util``: pytest puts this
directory on sys.path because it has no ``__init__.py``).
"""

import os

import pytest
import torch


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
