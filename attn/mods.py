"""Ready-made mask_mods and score_mods for FlexAttention-style attention.

Every function here is (or returns) a plain ``mask_mod(b, h, q_idx, kv_idx) -> bool`` or
``score_mod(score, b, h, q_idx, kv_idx) -> score`` that works in attn and in torch's own
``flex_attention`` / ``create_block_mask``. Their bodies use only elementwise torch ops,
comparisons, ``torch.where`` and indexing of captured tensors with index tensors: no
Python control flow on tensor values and no ``.item()``, because attn traces them to FX
and compiles them with Numba, and torch runs them under ``torch.vmap``. Tensors a mod
reads (document ids, slopes, bias tables) are captured, so the compiled code takes them
as arguments and new values do not recompile. Arguments are validated here, when the
mod is built, never inside it.

Pictures use ``q`` for rows (queries), ``k`` for columns (keys), ``█`` = attended.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

__all__ = [
    "alibi",
    "alibi_slopes",
    "causal_lower_right",
    "causal_mask",
    "document_mask",
    "prefix_lm",
    "relative_position_bias",
    "sliding_window",
    "tanh_softcap",
]


def _name(fn, text: str):
    # Generated code (FX graphs, Numba functions) is named after __name__, so keep it a
    # valid identifier: "sliding_window_128", "tanh_softcap_30", "tanh_softcap_2p5".
    fn.__name__ = re.sub(r"\W", "_", text.replace(".", "p"))
    fn.__qualname__ = fn.__name__
    return fn


def _band(fn, make):
    # A mask that is a band per sequence (attn._blocks.JaggedBand: query t of sequence s
    # sees key j of s when t + diag[s] - left <= j <= t + diag[s] + right, -1 unbounded):
    # ``make(Q_LEN, KV_LEN)`` gives the band, or None where the mod is not one at these
    # lengths. create_block_mask attaches it to the BlockMask, so the kernels run the
    # mask by column limits per tile, as varlen_attn's masks, without evaluating the mod.
    fn._attn_band = make
    return fn


def _one_band(diag: int, left: int, right: int):
    def make(Lq: int, Lk: int):
        from ._blocks import JaggedBand

        z = torch.zeros(1, dtype=torch.int64)
        return JaggedBand(z, z + Lq, z, z + Lk, z + diag, left, right)

    return make


def _nonneg_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def causal_mask(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """Top-left causal mask, ``q_idx >= kv_idx`` (SDPA's ``is_causal=True``). A mask_mod
    itself, not a factory. For Lq=3, Lk=5::

          k 0 1 2 3 4
        q 0 █
          1 █ █
          2 █ █ █
    """
    return q_idx >= kv_idx


_band(causal_mask, _one_band(0, -1, 0))


def causal_lower_right(Lq: int, Lk: int):
    """Bottom-right causal mask for Lq queries against Lk keys: query i sees key j when
    ``j <= i + (Lk - Lq)``, so the last query sees every key (FlashAttention's causal,
    torch's ``causal_lower_right``; the layout of decoding with a KV cache). For
    Lq=3, Lk=5::

          k 0 1 2 3 4
        q 0 █ █ █
          1 █ █ █ █
          2 █ █ █ █ █

    With Lq > Lk the first ``Lq - Lk`` queries see no key (their output is 0).
    """
    for value, name in ((Lq, "Lq"), (Lk, "Lk")):
        if _nonneg_int(value, name) == 0:
            raise ValueError(f"{name} must be positive, got 0")
    offset = Lk - Lq

    def mask_mod(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return _band(_name(mask_mod, f"causal_lower_right_{Lq}_{Lk}"), _one_band(offset, -1, 0))


def sliding_window(window: int, causal: bool = True):
    """Local attention around the diagonal, top-left aligned like :func:`causal_mask`.

    ``causal=True``: query i sees keys ``i - window <= j <= i``, i.e. itself and the
    ``window`` keys before it (``window + 1`` keys; FlashAttention's
    ``window_size=(window, 0)``, the FlexAttention examples' ``q - kv <= window`` with
    causal). ``causal=False``: ``|i - j| <= window`` (``window_size=(window, window)``).
    ``window=0`` keeps only the diagonal. For window=2, Lq=Lk=6::

          causal=True            causal=False
          k 0 1 2 3 4 5          k 0 1 2 3 4 5
        q 0 █                  q 0 █ █ █
          1 █ █                  1 █ █ █ █
          2 █ █ █                2 █ █ █ █ █
          3   █ █ █              3   █ █ █ █ █
          4     █ █ █            4     █ █ █ █
          5       █ █ █          5       █ █ █
    """
    window = _nonneg_int(window, "window")
    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            diff = q_idx - kv_idx
            return (diff >= 0) & (diff <= window)

        return _band(_name(mask_mod, f"sliding_window_{window}"), _one_band(0, window, 0))

    def mask_mod(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff <= window) & (diff >= -window)

    return _band(_name(mask_mod, f"sliding_window_{window}_bidirectional"),
                 _one_band(0, window, window))


def prefix_lm(prefix_length: int | Tensor):
    """Prefix-LM mask: every query sees the first ``prefix_length`` keys (the prefix is
    attended bidirectionally) and, beyond it, the causal past: ``kv_idx <
    prefix_length or q_idx >= kv_idx``. ``prefix_length`` is an int, or a 1-D integer
    tensor of one length per batch entry (read as ``prefix_length[b]``). For prefix 2,
    Lq=Lk=5::

          k 0 1 2 3 4
        q 0 █ █
          1 █ █
          2 █ █ █
          3 █ █ █ █
          4 █ █ █ █ █
    """
    if isinstance(prefix_length, Tensor):
        if (
            prefix_length.dim() != 1
            or prefix_length.is_floating_point()
            or prefix_length.dtype == torch.bool
        ):
            raise ValueError(
                f"prefix_length must be an int or a 1-D integer tensor (one per batch entry), got "
                f"{prefix_length.dtype} of shape {tuple(prefix_length.shape)}"
            )
        if prefix_length.numel() and int(prefix_length.min()) < 0:
            raise ValueError("prefix_length must be non-negative")
        lengths = prefix_length

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < lengths[b]) | (q_idx >= kv_idx)

        return _name(mask_mod, "prefix_lm_per_batch")
    prefix_length = _nonneg_int(prefix_length, "prefix_length")

    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix_length) | (q_idx >= kv_idx)

    return _name(mask_mod, f"prefix_lm_{prefix_length}")


def _document_ids(offsets: Tensor, length: int) -> Tensor:
    positions = torch.arange(length, device=offsets.device)
    doc = torch.searchsorted(offsets, positions, right=True) - 1
    # Tokens before the first offset or at/after the last are padding: id -1.
    return torch.where(positions < offsets[-1], doc, -1)


def document_mask(offsets: Tensor, causal: bool = False, length: int | None = None):
    """Attention within documents of a packed sequence.

    ``offsets`` is the cumulative (D+1,) start offsets of D documents packed into one
    sequence (``cu_seqlens``: 0, len0, len0+len1, ...). Token t belongs to document d
    when ``offsets[d] <= t < offsets[d+1]``; a query sees a key only in its own document
    (and, with ``causal=True``, not after itself). Tokens outside ``[offsets[0],
    offsets[-1])`` are padding and see nothing. The document ids are built here, as a
    ``length``-long tensor (default ``offsets[-1]``; give the padded length when the
    sequence is padded) that the mod reads as ``doc[q_idx]`` / ``doc[kv_idx]``; Q_LEN and
    KV_LEN must not exceed it. The same layout is used for every batch entry. For
    offsets (0, 2, 5), causal=False::

          k 0 1 2 3 4
        q 0 █ █
          1 █ █
          2     █ █ █
          3     █ █ █
          4     █ █ █
    """
    if not isinstance(offsets, Tensor):
        offsets = torch.as_tensor(offsets)
    if (
        offsets.dim() != 1
        or offsets.numel() < 1
        or offsets.is_floating_point()
        or offsets.dtype == torch.bool
    ):
        raise ValueError(
            f"offsets must be a 1-D integer tensor of cumulative document offsets (D+1,), got "
            f"{offsets.dtype} of shape {tuple(offsets.shape)}"
        )
    offsets = offsets.to(torch.int64)
    if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()}")
    if int(offsets[0]) < 0:
        raise ValueError(f"offsets must be non-negative, got {offsets.tolist()}")
    if length is None:
        length = int(offsets[-1])
    length = _nonneg_int(length, "length")
    doc = _document_ids(offsets, length)
    host = offsets.detach().to("cpu")

    def band(Lq: int, Lk: int):
        # Documents tiling [0, Q_LEN) exactly (no padding, self-attention): each is a
        # sequence of the band; otherwise the block lists and the mod.
        if Lq != Lk or length != Lq or int(host[0]) != 0 or int(host[-1]) != Lq:
            return None
        from ._blocks import JaggedBand

        a, e = host[:-1], host[1:]
        return JaggedBand(a, e, a, e, torch.zeros_like(a), -1, 0 if causal else -1)

    if causal:

        def mask_mod(b, h, q_idx, kv_idx):
            dq = doc[q_idx]
            return (dq == doc[kv_idx]) & (dq >= 0) & (q_idx >= kv_idx)

        return _band(_name(mask_mod, "document_causal_mask"), band)

    def mask_mod(b, h, q_idx, kv_idx):
        dq = doc[q_idx]
        return (dq == doc[kv_idx]) & (dq >= 0)

    return _band(_name(mask_mod, "document_mask"), band)


def alibi_slopes(num_heads: int) -> Tensor:
    """ALiBi slopes ``2 ** (-8 * (h + 1) / num_heads)`` for h = 0 .. num_heads-1 (float32):
    the paper's geometric sequence, exact for power-of-two head counts. (The paper's
    code interleaves two such sequences for other counts; pass those slopes to
    :func:`alibi` explicitly if a checkpoint needs them.)"""
    num_heads = _nonneg_int(num_heads, "num_heads")
    if num_heads == 0:
        raise ValueError("num_heads must be positive")
    return torch.exp2(-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads).to(
        torch.float32
    )


def alibi(heads: int | Tensor):
    """ALiBi score_mod: ``score + slope[h] * (kv_idx - q_idx)``, a linear penalty on the
    distance to past keys (positive for future keys, which a causal mask removes).

    ``heads`` is the number of heads (slopes from :func:`alibi_slopes`) or a 1-D float
    tensor of per-head slopes.
    """
    if isinstance(heads, Tensor):
        if heads.dim() != 1 or not heads.is_floating_point():
            raise ValueError(
                f"slopes must be a 1-D float tensor (one per head), got {heads.dtype} {tuple(heads.shape)}"
            )
        slopes = heads
    else:
        slopes = alibi_slopes(heads)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return _name(score_mod, "alibi")


def tanh_softcap(cap: float):
    """Soft-capping score_mod (Gemma 2, Grok): ``cap * tanh(score / cap)``, which keeps
    scores in (-cap, cap) while staying ~linear near 0."""
    if (
        isinstance(cap, bool)
        or not isinstance(cap, (int, float))
        or not math.isfinite(cap)
        or cap <= 0
    ):
        raise ValueError(f"cap must be a positive finite number, got {cap!r}")
    cap = float(cap)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return _name(score_mod, f"tanh_softcap_{cap:g}")


def relative_position_bias(bias: Tensor, kv_len: int | None = None):
    """Learned relative-position bias score_mod: ``score + bias[h, q_idx - kv_idx + Lk - 1]``.

    ``bias`` is (H, Lq + Lk - 1): column ``c`` holds the bias for offset ``q - kv = c -
    (Lk - 1)``, from ``-(Lk - 1)`` (first query, last key) at column 0 through 0 (the
    diagonal) at column ``Lk - 1`` to ``Lq - 1`` (last query, first key) at the last
    column. ``kv_len`` (Lk) defaults to ``(bias.shape[1] + 1) // 2``, i.e. Lq == Lk. The
    result has bias's dtype promoted with the score's; gradients flow into ``bias`` under
    torch's flex_attention.
    """
    if not isinstance(bias, Tensor) or bias.dim() != 2 or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor of shape (H, Lq + Lk - 1), got {bias!r:.80}")
    width = bias.shape[1]
    if kv_len is None:
        if width % 2 == 0:
            raise ValueError(
                f"bias.shape[1] = {width} is even, so Lq != Lk: pass kv_len (bias has Lq + kv_len - 1 columns)"
            )
        kv_len = (width + 1) // 2
    kv_len = _nonneg_int(kv_len, "kv_len")
    if not 1 <= kv_len <= width:
        raise ValueError(f"kv_len must be in [1, bias.shape[1] = {width}], got {kv_len}")
    shift = kv_len - 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + shift]

    return _name(score_mod, "relative_position_bias")
