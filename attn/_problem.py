"""Validation and normalisation: every public call becomes one AttentionProblem.

Shape vocabulary (used in every message and docstring):
    B batch, Hq query heads, Hkv key/value heads, Lq query length, Lk key length,
    D head dim of query and key, Dv head dim of value.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["AttentionProblem", "accumulation_dtype", "make_problem"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type kernels accumulate in, and the dtype of lse: float64 for float64 inputs,
    float32 for every other floating type."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class AttentionProblem:
    """One attention call, as every backend sees it.

    ``query (B, Hq, Lq, D)``, ``key (B, Hkv, Lk, D)``, ``value (B, Hkv, Lk, Dv)``;
    query head ``h`` reads kv head ``h // (Hq // Hkv)``. ``attn_mask`` is ``None``, a
    bool mask (True = attend) or a floating additive mask, broadcastable to
    ``(B, Hq, Lq, Lk)``. ``is_causal`` is top-left aligned. ``scale`` is resolved
    (never None).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    is_causal: bool
    scale: float
    B: int
    Hq: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    # FlexAttention calls (attn.flex_attention): the user's score_mod, the BlockMask
    # (attn's) and its mask_mod; whether the row maxima are wanted. None / False for SDPA.
    score_mod: object = None
    block_mask: object = None
    max_scores: bool = False
    flex: bool = False

    @property
    def device(self) -> torch.device:
        return self.query.device

    @property
    def dtype(self) -> torch.dtype:
        return self.query.dtype

    @property
    def gqa(self) -> bool:
        return self.Hq != self.Hkv

    @property
    def mask_kind(self) -> str | None:
        if self.attn_mask is None:
            return None
        return "bool" if self.attn_mask.dtype == torch.bool else "additive"

    @property
    def mask_requires_grad(self) -> bool:
        return (
            self.attn_mask is not None
            and self.attn_mask.requires_grad
            and torch.is_grad_enabled()
        )

    def describe(self) -> str:
        parts = [
            f"B={self.B} Hq={self.Hq} Hkv={self.Hkv} Lq={self.Lq} Lk={self.Lk} "
            f"D={self.D} Dv={self.Dv}",
            str(self.dtype).replace("torch.", ""),
            self.device.type,
        ]
        if self.is_causal:
            parts.append("causal")
        if self.mask_kind:
            parts.append(f"{self.mask_kind} attn_mask")
        if self.block_mask is not None:
            parts.append(f"block_mask {tuple(self.block_mask.BLOCK_SIZE)}")
        if self.score_mod is not None:
            parts.append(f"score_mod {getattr(self.score_mod, '__name__', '?')}")
        return ", ".join(parts)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise NotImplementedError(
            f"{name} is a nested tensor but query is not: pass query, key and value "
            "all as jagged nested tensors (or use attn.varlen_attn on packed tensors)"
        )
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got {t.dtype}"
        )
    if t.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D tensor (B, H, L, D), got a {t.dim()}-D tensor of "
            f"shape {tuple(t.shape)}"
        )


def make_problem(
    query,
    key,
    value,
    attn_mask=None,
    is_causal: bool = False,
    scale=None,
    enable_gqa: bool = False,
) -> AttentionProblem:
    """Check the arguments of scaled_dot_product_attention and describe the call."""
    _check_tensor("query", query)
    _check_tensor("key", key)
    _check_tensor("value", value)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(
            "query, key and value must have the same dtype, got "
            f"query {query.dtype}, key {key.dtype}, value {value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise RuntimeError(
            "query, key and value must be on the same device, got "
            f"query {query.device}, key {key.device}, value {value.device}"
        )
    B, Hq, Lq, D = query.shape
    Bk, Hkv, Lk, Dk = key.shape
    Bv, Hv, Lv, Dv = value.shape
    if Bk != B or Bv != B:
        raise ValueError(
            f"batch size mismatch: query has B={B}, key B={Bk}, value B={Bv}"
        )
    if Hv != Hkv:
        raise ValueError(
            f"key and value must have the same number of heads, got key Hkv={Hkv}, "
            f"value {Hv}"
        )
    if Lv != Lk:
        raise ValueError(
            f"key and value must have the same sequence length, got key Lk={Lk}, "
            f"value {Lv}"
        )
    if Dk != D:
        raise ValueError(
            f"query and key must have the same head dim, got query D={D}, key D={Dk}"
        )
    if D == 0:
        raise ValueError("query and key must have a head dim D >= 1, got D=0")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"query has Hq={Hq} heads but key/value have Hkv={Hkv}: pass "
                "enable_gqa=True for grouped-query attention"
            )
        if Hkv == 0 or Hq % Hkv != 0:
            raise ValueError(
                f"enable_gqa=True needs the query heads to be a multiple of the "
                f"key/value heads, got Hq={Hq}, Hkv={Hkv}"
            )
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale}")
    if attn_mask is not None:
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(
                f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}"
            )
        if is_causal:
            raise ValueError(
                "attn_mask and is_causal=True cannot both be set (as in PyTorch SDPA): "
                "fold the causal rule into attn_mask"
            )
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(
                f"attn_mask must be a bool or floating-point tensor, got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise RuntimeError(
                f"attn_mask must be on the device of query ({query.device}), got "
                f"{attn_mask.device}"
            )
        target = (B, Hq, Lq, Lk)
        try:
            ok = attn_mask.dim() <= 4 and torch.broadcast_shapes(
                attn_mask.shape, target
            ) == torch.Size(target)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                f"(B, Hq, Lq, Lk) = {target}"
            )
    return AttentionProblem(
        query=query,
        key=key,
        value=value,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=float(scale),
        B=B,
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
    )
