"""Pure PyTorch attention: the test oracle.

This module is deliberately standalone -- it imports nothing from the rest of ``attn`` --
so it can judge the optimised backends without sharing any of their code. It is built
only from differentiable torch ops, so plain autograd gives its gradients (and
``torch.autograd.gradcheck`` passes in float64).

It favours being obviously right over being fast: it materialises the full
``(B, Hq, Lq, Lk)`` score matrix.
"""

from __future__ import annotations

import math

import torch

__all__ = ["attention", "flex_attention"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float64 stays float64 (this is what makes the module an oracle); every other
    # floating type is computed in float32, the accumulation type of the kernels.
    return torch.float64 if dtype == torch.float64 else torch.float32


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention in plain PyTorch; returns ``(out, lse)``.

    Args:
        query: ``(B, Hq, Lq, D)``, any strides.
        key: ``(B, Hkv, Lk, D)``.
        value: ``(B, Hkv, Lk, Dv)``.
        attn_mask: optional, broadcastable to ``(B, Hq, Lq, Lk)``. A bool mask marks the
            pairs that may attend (``True`` = attend); a floating mask is added to the
            scaled scores.
        is_causal: top-left aligned causal mask, as in PyTorch SDPA: query ``i`` sees
            keys ``j <= i`` whatever ``Lq`` and ``Lk`` are. For ``Lq = 3, Lk = 5``::

                      key j ->  0 1 2 3 4
                query i = 0     x . . . .
                          1     x x . . .
                          2     x x x . .

            and for ``Lq = 5, Lk = 3`` (rows past ``Lk`` see every key)::

                      key j ->  0 1 2
                query i = 0     x . .
                          1     x x .
                          2     x x x
                          3     x x x
                          4     x x x

            If ``attn_mask`` is given as well, both are applied (the public API rejects
            that combination, as PyTorch does; the oracle simply intersects them).
        scale: multiplies ``query @ key^T``; default ``1 / sqrt(D)``.
        enable_gqa: allow ``Hkv`` to divide ``Hq``; query head ``h`` reads kv head
            ``h // (Hq // Hkv)`` (``repeat_interleave`` semantics, as PyTorch SDPA).
            Without it ``Hq`` must equal ``Hkv``.

    Returns:
        ``out`` ``(B, Hq, Lq, Dv)`` in ``query``'s dtype, and ``lse`` ``(B, Hq, Lq)``,
        the natural-log logsumexp of the scaled, masked scores, in float64 for float64
        inputs and float32 otherwise. The computation runs in that same dtype
        (float16 / bfloat16 / float32 inputs are upcast to float32).

        A query row that sees no key (every score masked, or ``Lk == 0``) gets
        ``out = 0`` and ``lse = -inf``, without NaN in the values or the gradients: its
        gradients are zero.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "query, key and value must be 4-D (B, H, L, D); got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
        )
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    if not (B == Bk == Bv):
        raise ValueError(f"batch sizes differ: query {B}, key {Bk}, value {Bv}")
    if Dk != D:
        raise ValueError(f"head dims differ: query {D}, key {Dk}")
    if Hv != Hkv or Lv != Lk:
        raise ValueError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in heads or length"
        )
    if enable_gqa:
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(f"enable_gqa: query heads {Hq} not divisible by kv heads {Hkv}")
    elif Hq != Hkv:
        raise ValueError(
            f"query has {Hq} heads and key/value {Hkv}; pass enable_gqa=True for GQA"
        )

    cdtype = _compute_dtype(query.dtype)
    q = query.to(cdtype)
    k = key.to(cdtype)
    v = value.to(cdtype)
    if Hkv != Hq:
        group = Hq // Hkv
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    if scale is None:
        scale = 1.0 / math.sqrt(D)

    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, Hq, Lq, Lk)

    if is_causal:
        # top-left: keep j <= i
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        full = (B, Hq, Lq, Lk)
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, full) == full
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(B, Hq, Lq, Lk) = {full}"
            )
        if attn_mask.dtype == torch.bool:
            # masked_fill broadcasts the mask against s (it must broadcast *to* s).
            s = s.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask.is_floating_point():
            s = s + attn_mask.to(cdtype)
        else:
            raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")

    # Safe softmax. The row max m only stabilises exp(); out and lse do not depend on
    # it mathematically, so it is detached (its true gradient contribution is zero).
    # A row with every score -inf has m = -inf: use 0 instead so that exp(-inf - 0) = 0
    # rather than exp(nan). Its sum l is then 0: divide by 1 instead, giving out = 0.
    if Lk > 0:
        m = s.detach().amax(dim=-1, keepdim=True)
    else:
        m = s.new_full((B, Hq, Lq, 1), float("-inf"))
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    empty = l == 0
    l_safe = torch.where(empty, torch.ones_like(l), l)
    out = torch.matmul(p, v) / l_safe
    # log(l_safe) keeps the gradient finite for empty rows (log(0) would give inf * 0);
    # the outer where then discards that branch.
    lse = torch.where(
        empty, torch.full_like(l, float("-inf")), m + torch.log(l_safe)
    ).squeeze(-1)
    return out.to(query.dtype), lse


def _index_grids(B: int, H: int, Lq: int, Lk: int, device):
    # FlexAttention calls mods with int32 index tensors; broadcastable grids give every
    # (b, h, q, kv) at once for mods written with elementwise ops and indexing.
    ar = lambda n: torch.arange(n, dtype=torch.int32, device=device)  # noqa: E731
    return (ar(B).view(B, 1, 1, 1), ar(H).view(1, H, 1, 1), ar(Lq).view(1, 1, Lq, 1),
            ar(Lk).view(1, 1, 1, Lk))


def _eval_mod(fn, lead, B, H, Lq, Lk, device):
    """fn(*lead, b, h, q_idx, kv_idx) on the full (B, H, Lq, Lk) grid: by broadcasting,
    or, for a mod that only works on scalars, by vmap over the four index dims."""
    b, h, q, kv = _index_grids(B, H, Lq, Lk, device)
    try:
        out = fn(*lead, b, h, q, kv)
        if isinstance(out, torch.Tensor) and out.dim() <= 4:
            return torch.broadcast_to(out, (B, H, Lq, Lk))
    except Exception:
        pass
    from torch.func import vmap

    f = lambda *a: fn(*a)  # noqa: E731
    n_lead = len(lead)
    # Innermost vmap over kv, then q, h, b; lead (the score) is mapped with them.
    for dim, in_dims in ((3, (3,) * n_lead + (None, None, None, 0)),
                         (2, (2,) * n_lead + (None, None, 0, None)),
                         (1, (1,) * n_lead + (None, 0, None, None)),
                         (0, (0,) * n_lead + (0, None, None, None))):
        f = vmap(f, in_dims=in_dims)
    b, h, q, kv = (torch.arange(n, dtype=torch.int32, device=device) for n in (B, H, Lq, Lk))
    return f(*lead, b, h, q, kv)


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod=None,
    block_mask=None,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FlexAttention in plain PyTorch; returns ``(out, lse, max_scores)``.

    ``block_mask`` is anything with FlexAttention's BlockMask fields (``kv_num_blocks``,
    ``kv_indices``, ``full_kv_num_blocks``, ``full_kv_indices``, ``BLOCK_SIZE``,
    ``mask_mod``): a key is visible when its block is listed as full, or listed as
    partial and ``mask_mod`` is True there; unlisted blocks are hidden. ``score_mod``
    is applied to the scaled scores before the mask. A row with no visible key gets
    out 0, lse and max_scores -inf. Differentiable (also through tensors the mods
    read), float64 in, float64 out.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lk = key.shape[1], key.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    cdt = _compute_dtype(query.dtype)
    q, k, v = (t.to(cdt) for t in (query, key, value))
    if Hq != Hkv:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    if score_mod is not None:
        s = _eval_mod(score_mod, (s,), B, Hq, Lq, Lk, q.device).to(cdt)
    if block_mask is not None:
        QB, KB = block_mask.BLOCK_SIZE

        def dense(num, idx):
            nq, nk = idx.shape[-2], idx.shape[-1]
            listed = torch.arange(nk, device=idx.device) < num.unsqueeze(-1).long()
            d = torch.zeros(*idx.shape[:2], nq, nk + 1, dtype=torch.bool, device=idx.device)
            d.scatter_(-1, torch.where(listed, idx.long(), nk), listed)
            d = d[..., :nk]
            d = d.repeat_interleave(QB, -2)[..., :Lq, :].repeat_interleave(KB, -1)
            return d[..., :Lk].expand(B, Hq, Lq, Lk).to(q.device)

        partial = dense(block_mask.kv_num_blocks, block_mask.kv_indices)
        visible = torch.zeros_like(partial)
        if getattr(block_mask, "full_kv_num_blocks", None) is not None:
            visible = dense(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        mask_mod = getattr(block_mask, "mask_mod", None)
        if mask_mod is not None:
            m = _eval_mod(mask_mod, (), B, Hq, Lq, Lk, q.device).to(torch.bool)
            partial = partial & m
        visible = visible | partial
        s = s.masked_fill(~visible, float("-inf"))
    mx = s.max(-1).values if Lk else s.new_full((B, Hq, Lq), float("-inf"))
    lse = torch.logsumexp(s, dim=-1) if Lk else s.new_full((B, Hq, Lq), float("-inf"))
    finite = torch.isfinite(lse)
    p = torch.where(finite.unsqueeze(-1), torch.exp(s - torch.where(
        finite, lse, torch.zeros_like(lse)).unsqueeze(-1)), torch.zeros_like(s))
    out = p @ v
    return out.to(query.dtype), lse, mx
