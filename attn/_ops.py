"""The autograd layer: attention as torch.library custom ops.

``attn::sdpa_forward`` returns ``(out, lse)``; ``attn::sdpa_backward`` returns
``(dq, dk, dv)``. Both dispatch to the backend named in their arguments (the public API
resolved it), have fake implementations so torch.compile can trace them, and are tied
together with ``register_autograd``: the forward saves q, k, v, out and lse, and the
backward recomputes the probabilities from lse (no (Lq, Lk) matrix is kept).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._problem import AttentionProblem, accumulation_dtype
from .backends import get_backend

__all__ = ["sdpa_forward", "sdpa_backward", "attention"]


def _problem(query, key, value, attn_mask, is_causal, scale) -> AttentionProblem:
    # Arguments were validated by the public API before reaching the op.
    B, Hq, Lq, D = query.shape
    return AttentionProblem(
        query=query, key=key, value=value, attn_mask=attn_mask, is_causal=is_causal,
        scale=scale, B=B, Hq=Hq, Hkv=key.shape[1], Lq=Lq, Lk=key.shape[2], D=D,
        Dv=value.shape[3],
    )


@torch.library.custom_op("attn::sdpa_forward", mutates_args=())
def sdpa_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    problem = _problem(query, key, value, attn_mask, is_causal, scale)
    out, lse = get_backend(backend).forward(problem)
    return out, lse


@sdpa_forward.register_fake
def _(query, key, value, attn_mask, is_causal, scale, backend):
    B, Hq, Lq, _ = query.shape
    out = query.new_empty(B, Hq, Lq, value.shape[3])
    lse = query.new_empty(B, Hq, Lq, dtype=accumulation_dtype(query.dtype))
    return out, lse


@torch.library.custom_op("attn::sdpa_backward", mutates_args=())
def sdpa_backward(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    problem = _problem(query, key, value, attn_mask, is_causal, scale)
    dq, dk, dv = get_backend(backend).backward(problem, out, lse, grad_out, grad_lse)
    # Custom ops may not return views of their inputs or of each other.
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@sdpa_backward.register_fake
def _(grad_out, grad_lse, query, key, value, attn_mask, out, lse, is_causal, scale,
      backend):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, attn_mask, out, lse)
    ctx.is_causal = is_causal
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, grad_out, grad_lse):
    query, key, value, attn_mask, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = sdpa_backward(
        grad_out, grad_lse, query, key, value, attn_mask, out, lse, ctx.is_causal,
        ctx.scale, ctx.backend,
    )
    return dq, dk, dv, None, None, None, None


sdpa_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerSdpa(torch.autograd.Function):
    """The same forward and backward as the custom ops, for eager calls.

    Dispatching a Python custom op costs tens of microseconds per call (schema checks,
    aliasing checks, the autograd wrapper); an autograd.Function costs a few. The public
    functions use this class in eager mode and the custom ops while torch.compile traces
    (torch.compiler.is_compiling()), so compiled graphs see one opaque op with a fake
    implementation and eager calls stay cheap; both run the same backend methods."""

    @staticmethod
    def forward(ctx, query, key, value, attn_mask, is_causal, scale, backend):
        be = get_backend(backend)
        dense = getattr(be, "forward_dense", None) if attn_mask is None else None
        if dense is not None:
            out, lse = dense(query, key, value, is_causal, scale)
        else:
            out, lse = be.forward(_problem(query, key, value, attn_mask, is_causal, scale))
        ctx.save_for_backward(query, key, value, attn_mask, out, lse)
        ctx.is_causal, ctx.scale, ctx.backend = is_causal, scale, backend
        # Gradients of unused outputs arrive as None, not zero tensors: an lse nobody
        # differentiates adds nothing to delta.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, attn_mask, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        problem = _problem(query, key, value, attn_mask, ctx.is_causal, ctx.scale)
        dq, dk, dv = get_backend(ctx.backend).backward(problem, out, lse, grad_out,
                                                       grad_lse)
        return dq, dk, dv, None, None, None, None


def attention(query, key, value, attn_mask, is_causal, scale, backend):
    """(out, lse) through the custom op when torch.compile is tracing, else through the
    equivalent autograd.Function."""
    if torch.compiler.is_compiling():
        return sdpa_forward(query, key, value, attn_mask, is_causal, scale, backend)
    return _EagerSdpa.apply(query, key, value, attn_mask, is_causal, scale, backend)
