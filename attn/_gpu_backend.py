"""The gpu backend: Numba CUDA kernels (attn.gpu).

Importing this module never imports numba or touches a driver: attn.gpu (and with it
numba.cuda) is imported the first time the backend is asked about a CUDA problem, and
any failure there becomes a reason in ``not_supported_reasons``, so a CPU-only install
without numba-cuda works unchanged.
"""
from __future__ import annotations

import torch

from .backends import Backend

__all__ = ["GpuBackend"]


class GpuBackend(Backend):
    """Numba CUDA kernels (attn.gpu): SIMT FlashAttention-2 forward and backward."""

    name = "gpu"
    devices = ("cuda",)
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    # Local arrays and shared tiles are sized per head dim at compile time; 256 is the
    # largest gpu.tilings() plans shared memory and registers for.
    max_head_dim = 256
    supports_flex = True

    _import_error: str | None = None
    _gpu = None

    def _load(self):
        """attn.gpu, or None with the reason recorded. Tried once per process."""
        if self._gpu is None and self._import_error is None:
            try:
                from . import gpu
            except Exception as e:  # ImportError, or numba failing on a broken numpy
                GpuBackend._import_error = f"{type(e).__name__}: {e}"
            else:
                GpuBackend._gpu = gpu
        return self._gpu

    def not_supported_reasons(self, problem):
        reasons = super().not_supported_reasons(problem)
        if problem.device.type != "cuda":
            return reasons  # cheap exit: never import numba for CPU problems
        gpu = self._load()
        if gpu is None:
            reasons.append(
                f"numba-cuda unavailable ({self._import_error}); install attn[gpu]"
            )
            return reasons
        ok, why = gpu.available()
        if not ok:
            reasons.append(why)
        if problem.flex and not reasons:
            from ._flex import kernel_spec, kernel_spec_reasons

            reasons += kernel_spec_reasons(problem)
            if not reasons:
                spec = kernel_spec(problem, None)
                if problem.max_scores:
                    bm = spec.block_mask
                    reasons += gpu.max_scores_reasons(
                        problem.query.dtype, problem.D, problem.Dv, None,
                        None if bm is None else bm.BLOCK_SIZE)
                reasons += gpu.flex_reasons(spec.block_mask, spec.mask_mod, spec.score_mod,
                                            gpu.tilings(problem.D, problem.Dv))
        return reasons

    def forward(self, problem):
        gpu = self._load()
        if problem.flex:
            from ._flex import kernel_spec

            return gpu.forward(problem.query, problem.key, problem.value, None, False,
                               problem.scale, flex=kernel_spec(problem, None))
        return gpu.forward(
            problem.query, problem.key, problem.value, problem.attn_mask,
            problem.is_causal, problem.scale,
        )

    def forward_dense(self, query, key, value, is_causal, scale):
        return self._load().forward(query, key, value, None, is_causal, scale)

    def backward(self, problem, out, lse, grad_out, grad_lse):
        gpu = self._load()
        if problem.flex:
            from ._flex import kernel_spec

            return gpu.backward(problem.query, problem.key, problem.value, out, lse,
                                grad_out, grad_lse, None, False, problem.scale,
                                flex=kernel_spec(problem, None))
        return gpu.backward(
            problem.query, problem.key, problem.value, out, lse, grad_out, grad_lse,
            problem.attn_mask, problem.is_causal, problem.scale,
        )
