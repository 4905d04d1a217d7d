"""attn.flex_attention: FlexAttention's API on attn's kernels.

The public function validates the call with FlexAttention's errors, turns it into an
AttentionProblem (``flex=True`` with the score_mod and the BlockMask) and runs it
through one autograd.Function on the chosen backend. The kernels see the block mask
as block lists at their own tile size (``BlockMask.kernel_lists``) and the mods as
Numba-compiled tile callbacks (``attn._modgen``). While torch.compile traces, the call
is the custom op ``attn::flex_forward`` instead (end of this module).
"""
from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import replace
from typing import NamedTuple, Optional

import torch

from ._block_mask import BlockMask, as_block_mask, noop_mask
from ._problem import accumulation_dtype, make_problem
from .backends import select_backend

__all__ = ["flex_attention", "AuxRequest", "AuxOutput"]


class AuxRequest(NamedTuple):
    """Which auxiliary outputs flex_attention should return (as torch's)."""

    lse: bool = False
    max_scores: bool = False


class AuxOutput(NamedTuple):
    """Auxiliary outputs of flex_attention; fields not requested are None."""

    lse: torch.Tensor | None = None
    max_scores: torch.Tensor | None = None


class KernelSpec(NamedTuple):
    """What a kernel launcher needs of a FlexAttention call."""

    lists: object          # BlockMask.kernel_lists at `tiles`, or None (dense, all full)
    block_mask: object     # the BlockMask (attn's) or None
    mask_mod: object       # CompiledMod or None
    score_mod: object      # CompiledMod or None
    max_scores: bool
    tiles: tuple


def _traced(problem):
    """(mask, score) CompiledMods of a problem, traced once per problem object: backend
    selection (kernel_spec_reasons, the GPU backend's kernel_spec) and the forward ask
    for them in one call. The memo is not a dataclass field, so the problem that
    ``replace`` makes for the backward traces again (and sees a mod's tensors as they
    are then)."""
    memo = problem.__dict__.get("_attn_traced")
    if memo is None:
        memo = _trace(problem)
        object.__setattr__(problem, "_attn_traced", memo)
    return memo


def _share_trace(new, old):
    """``new`` with ``old``'s traced mods (the _traced memo), for problems that reuse a
    mask whose mods read only tensors nothing writes (varlen_attn's repeated calls)."""
    memo = old.__dict__.get("_attn_traced")
    if memo is not None:
        object.__setattr__(new, "_attn_traced", memo)
    return new


def _trace(problem):
    from . import _modgen

    score = None
    if problem.score_mod is not None:
        score = _modgen.trace_score_mod(problem.score_mod)
    mask = None
    bm = problem.block_mask
    if bm is not None and bm.mask_mod is not None and bm.mask_mod is not noop_mask:
        mask = _modgen.trace_mask_mod(bm.mask_mod)
    return mask, score


def kernel_spec_reasons(problem) -> list[str]:
    """Why the compiled kernels cannot serve this FlexAttention call (empty if they can)."""
    try:
        mask, score = _traced(problem)
    except (TypeError, NotImplementedError, ValueError) as e:
        return [f"cannot compile the mod for the kernels: {e}"]
    reasons = []
    for name, c in (("score_mod", score), ("mask_mod", mask)):
        if c is not None and c.requires_grad and torch.is_grad_enabled():
            reasons.append(
                f"{name} reads a tensor that requires grad: the kernels give no gradient "
                "for it; detach it, or run on attn.use_backend('reference') (dense, "
                "differentiates through the tensor)"
            )
    return reasons


def kernel_spec(problem, tiles_for) -> KernelSpec:
    """The call as kernels see it; ``tiles_for(BLOCK_SIZE) -> (BM, BN)`` gives the CPU
    kernels' tile for the lists (None: the launcher builds its own, as the GPU's does
    per kernel)."""
    mask, score = _traced(problem)
    bm = problem.block_mask
    lists = None
    tiles = None
    if bm is not None and tiles_for is not None:
        tiles = tiles_for(bm.BLOCK_SIZE)
        cache = bm.__dict__.setdefault("_attn_kernel_lists", {})
        lists = cache.get(tiles)
        if lists is None:
            lists = cache[tiles] = bm.kernel_lists(*tiles)
    return KernelSpec(lists, bm, mask, score, problem.max_scores, tiles)


class _FlexFn(torch.autograd.Function):
    """out, lse, max_scores of a FlexAttention call; gradients to query, key, value
    (through score_mod by its compiled derivative). max_scores is not differentiable."""

    @staticmethod
    def forward(ctx, query, key, value, problem, backend):
        out, lse, mx = _run_forward(backend, problem, full_max=False)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.problem, ctx.backend = problem, backend
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mx)
        return out, lse, mx

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_mx):
        query, key, value, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        problem = replace(ctx.problem, query=query, key=key, value=value)
        dq, dk, dv = ctx.backend.backward(problem, out, lse, grad_out, grad_lse)
        return dq, dk, dv, None, None


def _apply(query, key, value, problem, backend):
    """(out, lse, max_scores) of a validated problem on its backend, through autograd
    only when a gradient can flow (the Function's bookkeeping is host time per call)."""
    if getattr(backend, "autograd_native", False):
        return backend.forward(problem)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        return _FlexFn.apply(query, key, value, problem, backend)
    return _run_forward(backend, problem, full_max=False)


def _run_forward(backend, problem, full_max=True):
    """(out, lse, max_scores). A backend that computes no max_scores (it was not asked
    for them) gets -inf rows where the result must have their shape (the custom op's),
    else an empty placeholder: a fill is a kernel launch on the GPU, paid per call."""
    res = backend.forward(problem)
    if len(res) == 3:
        return res
    out, lse = res
    if not full_max and not problem.max_scores:
        return out, lse, lse.new_empty(0)
    B, Hq, Lq = lse.shape
    return out, lse, lse.new_full((B, Hq, Lq), float("-inf"))


def _native_backward(backend, problem, grad_out, grad_lse):
    """dq, dk, dv of an autograd-native backend (the reference): recompute its forward
    under autograd and differentiate it."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in
                   (problem.query, problem.key, problem.value))
        out, lse, _ = _run_forward(backend, replace(problem, query=q, key=k, value=v))
        outs, grads = [out], [grad_out]
        if grad_lse is not None:
            outs.append(lse)
            grads.append(grad_lse)
        res = torch.autograd.grad(outs, (q, k, v), grads, allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g for t, g in zip((q, k, v), res))


def flex_problem(query, key, value, score_mod, block_mask, scale, enable_gqa,
                 max_scores=False):
    """The AttentionProblem of a FlexAttention call (block_mask: attn's BlockMask)."""
    problem = make_problem(query, key, value, None, False, scale, enable_gqa)
    return replace(problem, score_mod=score_mod, block_mask=block_mask,
                   max_scores=max_scores, flex=True)


def forward_problem(problem, grad_enabled: bool | None = None):
    """(out, lse, max_scores) of a FlexAttention problem without autograd: the backend
    layer's choice and kernels, for callers that are below autograd themselves (the
    custom ops torch.compile traces, aten's flash ops when attn is PyTorch's flash
    implementation). ``grad_enabled`` is the grad mode the choice should see (a mod that
    reads a tensor requiring grad is refused only when gradients are on); None: the
    current one."""
    with torch.set_grad_enabled(torch.is_grad_enabled() if grad_enabled is None
                                else grad_enabled):
        backend = select_backend(problem)
    with torch.no_grad():
        return _run_forward(backend, problem)


def backward_problem(problem, out, lse, grad_out, grad_lse):
    """(dq, dk, dv) of a FlexAttention problem, given its forward's out and lse."""
    backend = select_backend(problem)
    if getattr(backend, "autograd_native", False):
        return _native_backward(backend, problem, grad_out, grad_lse)
    with torch.no_grad():
        return backend.backward(problem, out, lse, grad_out, grad_lse)


def _check_block_mask(block_mask, query, key):
    bm = as_block_mask(block_mask)
    B, Hq, Lq, _ = query.shape
    Lk = key.shape[2]
    mq, mk = bm.seq_lengths
    if Lq > mq or Lk > mk:
        raise ValueError(
            f"block_mask was created for block_mask.shape={bm.shape} but got q_len={Lq} "
            f"and kv_len={Lk}. As the block mask was created for a smaller length than "
            "you're using it for, you likely need to create a new block mask."
        )
    if (Lq, Lk) != (mq, mk):
        raise ValueError(
            f"block_mask was created for block_mask.shape={bm.shape} but got q_len={Lq} "
            f"and kv_len={Lk}. Create a new block mask for these lengths."
        )
    Bm, Hm = bm.kv_num_blocks.shape[:2]
    if Bm not in (1, B):
        raise ValueError(f"block_mask has batch size {Bm}; expected 1 or B={B}")
    if Hm not in (1, Hq):
        raise ValueError(f"block_mask has {Hm} heads; expected 1 or Hq={Hq} (query heads)")
    if bm.kv_num_blocks.device != query.device:
        raise RuntimeError(
            f"Expect q/k/v and block_mask to be on the same device but got {query.device} "
            f"and {bm.kv_num_blocks.device}."
        )
    return bm


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod=None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    return_aux: AuxRequest | None = None,
):
    r"""Drop-in for :func:`torch.nn.attention.flex_attention.flex_attention`.

    ``softmax(mask(score_mod(query @ key^T * scale))) @ value``, tile by tile, visiting
    only the kv blocks ``block_mask`` lists for each q block; ``mask_mod`` (the block
    mask's) is evaluated only on its partial blocks. CPU tensors run on attn's Cython
    kernels with the mods compiled by Numba (forward and backward; PyTorch's own
    FlexAttention has no CPU backward).

    Args:
        query: ``(B, Hq, Lq, D)``; key ``(B, Hkv, Lk, D)``; value ``(B, Hkv, Lk, Dv)``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, written with torch
            elementwise ops, ``torch.where`` and indexing of captured tensors (e.g.
            ``attn.mods.alibi``). Its derivative with respect to ``score`` is derived
            automatically; captured tensors get no gradient from the kernels (a tensor
            that requires grad is refused with a clear error — use the reference
            backend for that).
        block_mask: from :func:`attn.create_block_mask` (or torch's); ``None`` = dense.
        scale: default ``1 / sqrt(D)``.
        enable_gqa: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
        return_lse: deprecated form of ``return_aux=AuxRequest(lse=True)``.
        kernel_options: accepted for compatibility; attn's kernels take no options.
        return_aux: :class:`AuxRequest`; the result is then ``(out, AuxOutput)``.

    Returns:
        ``out (B, Hq, Lq, Dv)`` in query's dtype, or ``(out, lse)`` / ``(out, AuxOutput)``.
        lse and max_scores are float32 (float64 for float64 inputs), natural log; a row
        with no visible key has out 0, lse and max_scores -inf, and zero gradients.
    """
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if isinstance(t, torch.Tensor) and t.dim() != 4:
            raise NotImplementedError(
                f"NYI: query, key, and value must be 4D tensors ({name} has shape "
                f"{tuple(t.shape)})"
            )
    if return_lse and return_aux is not None:
        raise ValueError(
            "Cannot specify both return_lse and return_aux. return_lse is deprecated, "
            "please use return_aux=AuxRequest(lse=True) instead."
        )
    if return_aux is not None and not isinstance(return_aux, AuxRequest):
        try:
            return_aux = AuxRequest(lse=bool(return_aux.lse),
                                    max_scores=bool(return_aux.max_scores))
        except AttributeError:
            raise TypeError(
                f"return_aux must be an AuxRequest, got {type(return_aux).__name__}"
            ) from None
    if kernel_options is not None and not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options)}")
    problem = make_problem(query, key, value, None, False, scale, enable_gqa)
    bm = _check_block_mask(block_mask, query, key) if block_mask is not None else None
    if score_mod is not None:
        from ._block_mask import ModSignatureError, _positional_arity

        n = _positional_arity(score_mod)
        if n != 5:
            raise ModSignatureError(
                f"score_mod must take 5 positional arguments (score, b, h, q_idx, kv_idx), "
                f"got {n}"
            )
    want_max = bool(return_aux is not None and return_aux.max_scores)
    if torch.compiler.is_compiling():
        out, lse, mx = _compiled_flex(query, key, value, score_mod, bm, problem.scale,
                                      enable_gqa, want_max)
    else:
        problem = replace(problem, score_mod=score_mod, block_mask=bm, max_scores=want_max,
                          flex=True)
        backend = select_backend(problem)
        out, lse, mx = _apply(query, key, value, problem, backend)
    if return_aux is not None:
        return out, AuxOutput(lse=lse if return_aux.lse else None,
                              max_scores=mx if return_aux.max_scores else None)
    if return_lse:
        warnings.warn("return_lse is deprecated; use return_aux=AuxRequest(lse=True)",
                      FutureWarning, stacklevel=2)
        return out, lse
    return out


# --------------------------------------------------------------------- torch.compile
# While torch.compile traces, flex_attention becomes the custom ops below: tensors (the
# inputs and the block mask's lists) are op arguments, and the mods - Python functions,
# which an op schema cannot carry - are named by a string key into _MODS. The key is a
# trace-time constant (assume_constant_result), so it must change whenever the mods do:
# dynamo guards a function only by its code object, and two closures of one factory
# (e.g. two ALiBi score_mods over different slopes) share that, so _compiled_flex calls
# id() on each mod first, which makes dynamo guard on the objects' identity. A new mod
# object therefore recompiles (dynamo's usual recompile limit applies); in-place changes
# of the tensors a mod captures are seen, as the op reads them at run time.
_MODS: dict[str, tuple] = {}
_MODS_LOCK = threading.Lock()

_BM_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


@torch.compiler.assume_constant_result
def _mods_key(score_mod, mask_mod) -> str:
    key = f"score={id(score_mod):x},mask={id(mask_mod):x}"
    with _MODS_LOCK:
        # Held strongly: the ids in the key stay unique while a graph may use them.
        _MODS.setdefault(key, (score_mod, mask_mod))
    return key


# Rebuilt BlockMasks, by the identity and version of their list tensors: a compiled
# graph passes the same tensors call after call, and a hit keeps the mask's
# kernel_lists cache (the lists at the kernels' tile sizes).
_REBUILT: OrderedDict = OrderedDict()
_REBUILT_SIZE = 16


def _rebuild_block_mask(lists, block_size, seq_lengths, mask_mod):
    if lists[0] is None:
        return None
    key = (tuple((id(t), t._version) if t is not None else None for t in lists),
           tuple(block_size), tuple(seq_lengths), id(mask_mod))
    with _MODS_LOCK:
        hit = _REBUILT.get(key)
        if hit is not None and all(
                (r is None and t is None) or (r is not None and r() is t)
                for r, t in zip(hit[0], lists)):
            _REBUILT.move_to_end(key)
            return hit[1]
    bm = BlockMask(tuple(seq_lengths), *lists, BLOCK_SIZE=tuple(block_size),
                   mask_mod=mask_mod)
    refs = tuple(weakref.ref(t) if t is not None else None for t in lists)
    with _MODS_LOCK:
        _REBUILT[key] = (refs, bm)
        while len(_REBUILT) > _REBUILT_SIZE:
            _REBUILT.popitem(last=False)
    return bm


def _op_problem(query, key, value, lists, block_size, seq_lengths, scale, enable_gqa,
                max_scores, mods):
    score_mod, mask_mod = _MODS[mods]
    bm = _rebuild_block_mask(lists, block_size, seq_lengths, mask_mod)
    return flex_problem(query, key, value, score_mod, bm, scale, enable_gqa, max_scores)


@torch.library.custom_op("attn::flex_forward", mutates_args=())
def flex_forward_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor],
    full_kv_indices: Optional[torch.Tensor],
    q_num_blocks: Optional[torch.Tensor],
    q_indices: Optional[torch.Tensor],
    full_q_num_blocks: Optional[torch.Tensor],
    full_q_indices: Optional[torch.Tensor],
    block_size: list[int],
    seq_lengths: list[int],
    scale: float,
    enable_gqa: bool,
    max_scores: bool,
    grad_enabled: bool,
    mods: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
             q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    problem = _op_problem(query, key, value, lists, block_size, seq_lengths, scale,
                          enable_gqa, max_scores, mods)
    out, lse, mx = forward_problem(problem, grad_enabled)
    # Custom ops may not return views of their inputs or of each other.
    return out.contiguous(), lse.contiguous(), mx.contiguous()


@flex_forward_op.register_fake
def _(query, key, value, *lists_and_args):
    B, Hq, Lq, _ = query.shape
    out = query.new_empty(B, Hq, Lq, value.shape[3])
    ldt = accumulation_dtype(query.dtype)
    return out, query.new_empty(B, Hq, Lq, dtype=ldt), query.new_empty(B, Hq, Lq, dtype=ldt)


@torch.library.custom_op("attn::flex_backward", mutates_args=())
def flex_backward_op(
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: Optional[torch.Tensor],
    kv_indices: Optional[torch.Tensor],
    full_kv_num_blocks: Optional[torch.Tensor],
    full_kv_indices: Optional[torch.Tensor],
    q_num_blocks: Optional[torch.Tensor],
    q_indices: Optional[torch.Tensor],
    full_q_num_blocks: Optional[torch.Tensor],
    full_q_indices: Optional[torch.Tensor],
    block_size: list[int],
    seq_lengths: list[int],
    scale: float,
    enable_gqa: bool,
    mods: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lists = (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
             q_num_blocks, q_indices, full_q_num_blocks, full_q_indices)
    problem = _op_problem(query, key, value, lists, block_size, seq_lengths, scale,
                          enable_gqa, False, mods)
    dq, dk, dv = backward_problem(problem, out, lse, grad_out, grad_lse)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@flex_backward_op.register_fake
def _(grad_out, grad_lse, query, key, value, *rest):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _flex_setup_context(ctx, inputs, output):
    query, key, value, *lists = inputs[:11]
    block_size, seq_lengths, scale, enable_gqa, _max_scores, _grad, mods = inputs[11:]
    out, lse, _ = output
    ctx.save_for_backward(query, key, value, out, lse, *lists)
    ctx.args = (block_size, seq_lengths, scale, enable_gqa, mods)
    ctx.mark_non_differentiable(output[2])


def _flex_backward(ctx, grad_out, grad_lse, _grad_mx):
    query, key, value, out, lse, *lists = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = flex_backward_op(grad_out, grad_lse, query, key, value, out, lse, *lists,
                                  *ctx.args)
    return (dq, dk, dv) + (None,) * 15


flex_forward_op.register_autograd(_flex_backward, setup_context=_flex_setup_context)


def _compiled_flex(query, key, value, score_mod, bm, scale, enable_gqa, want_max):
    """flex_attention while torch.compile traces: one attn::flex_forward op."""
    mask_mod = bm.mask_mod if bm is not None else None
    # id() makes dynamo guard on the identity of the mods (see above).
    id(score_mod)
    id(mask_mod)
    mods = _mods_key(score_mod, mask_mod)
    if bm is None:
        lists, block_size, seq_lengths = (None,) * 8, [0, 0], [0, 0]
    else:
        lists = tuple(getattr(bm, f) for f in _BM_FIELDS)
        block_size, seq_lengths = list(bm.BLOCK_SIZE), list(bm.seq_lengths)
    return flex_forward_op(query, key, value, *lists, block_size, seq_lengths, float(scale),
                           bool(enable_gqa), bool(want_max), torch.is_grad_enabled(), mods)
