"""The public attention functions."""
from __future__ import annotations

import numbers

import torch

from . import _ops
from ._problem import make_problem
from .backends import select_backend, selection_state

__all__ = ["scaled_dot_product_attention"]

# Repeated plain calls (no attn_mask, dropout 0, plain tensors, eager mode): the key
# holds everything validation and the backend choice depend on, so a hit may skip both
# (they ran, and passed, for the first call with this key). Bounded: cleared when full.
_REPEAT: dict = {}
_REPEAT_MAX = 1024


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    return_lse: bool = False,
):
    r"""Drop-in for :func:`torch.nn.functional.scaled_dot_product_attention`.

    ``softmax(query @ key^T * scale + mask) @ value``, computed tile by tile with an
    online softmax (no ``(Lq, Lk)`` matrix), differentiable through autograd.

    Args:
        query: ``(B, Hq, Lq, D)``; any strides.
        key: ``(B, Hkv, Lk, D)``.
        value: ``(B, Hkv, Lk, Dv)``.
        attn_mask: ``None``, a bool mask (``True`` = may attend) or a floating mask
            added to the scaled scores, broadcastable to ``(B, Hq, Lq, Lk)``.
        dropout_p: must be ``0.0``: the kernels have no dropout, and a nonzero value
            raises :class:`NotImplementedError` rather than being ignored.
        is_causal: top-left aligned causal mask, as PyTorch SDPA: query ``i`` sees
            keys ``j <= i``. For ``Lq = 3, Lk = 5``::

                      key j ->  0 1 2 3 4
                query i = 0     x . . . .
                          1     x x . . .
                          2     x x x . .

            Cannot be combined with ``attn_mask``.
        scale: multiplies the scores; default ``1 / sqrt(D)``.
        enable_gqa: grouped-query attention: ``Hkv`` divides ``Hq`` and query head
            ``h`` reads key/value head ``h // (Hq // Hkv)``.
        return_lse: also return the logsumexp of each query's scaled, masked scores.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in ``query``'s dtype; with ``return_lse=True``,
        ``(out, lse)`` where ``lse (B, Hq, Lq)`` is float32 (float64 for float64
        inputs), natural log, and differentiable. A query that sees no key gets
        ``out = 0`` and ``lse = -inf`` (never NaN), and zero gradients.

    The backend is chosen automatically (CPU tensors: the Cython kernels); force one
    with :func:`attn.use_backend`.
    """
    if (not torch.compiler.is_compiling() and attn_mask is None
            and type(query) is torch.Tensor and type(key) is torch.Tensor
            and type(value) is torch.Tensor and type(dropout_p) is float
            and dropout_p == 0.0 and type(is_causal) is bool):
        rkey = (query.shape, key.shape, value.shape, query.dtype, key.dtype, value.dtype,
                query.device, key.device, value.device, is_causal, scale, enable_gqa,
                selection_state())
        hit = _REPEAT.get(rkey)
        if hit is None:
            problem = make_problem(query, key, value, None, is_causal, scale, enable_gqa)
            backend = select_backend(problem)
            if not getattr(backend, "autograd_native", False):
                if len(_REPEAT) >= _REPEAT_MAX:
                    _REPEAT.clear()
                hit = _REPEAT[rkey] = (backend, problem.scale)
        if hit is not None:
            backend, sc = hit
            if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                            or value.requires_grad):
                out, lse = _ops._EagerSdpa.apply(query, key, value, None, is_causal, sc,
                                                 backend.name)
            else:
                dense = getattr(backend, "forward_dense", None)
                if dense is not None:
                    out, lse = dense(query, key, value, is_causal, sc)
                else:
                    out, lse = _ops.attention(query, key, value, None, is_causal, sc,
                                              backend.name)
            return (out, lse) if return_lse else out
    if isinstance(query, torch.Tensor) and query.is_nested:
        # Jagged batches: packed values and offsets through varlen attention, no padding.
        from ._varlen import nested_sdpa

        if return_lse:
            raise NotImplementedError(
                "return_lse=True is not supported for nested (jagged) inputs; use "
                "attn.varlen_attn(..., return_aux=attn.AuxRequest(lse=True)) on the packed "
                "values")
        return nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale,
                           enable_gqa)
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p > 0.0:
        raise NotImplementedError(
            f"dropout_p={dropout_p}: attn has no attention dropout; pass dropout_p=0.0 "
            "(e.g. dropout_p=self.dropout if self.training else 0.0) or apply dropout "
            "outside attention"
        )
    problem = make_problem(query, key, value, attn_mask, is_causal, scale, enable_gqa)
    backend = select_backend(problem)
    if getattr(backend, "autograd_native", False):
        out, lse = backend.forward(problem)
    else:
        out, lse = _ops.attention(
            query, key, value, attn_mask, is_causal, problem.scale, backend.name
        )
    return (out, lse) if return_lse else out
