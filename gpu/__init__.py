"""attn.gpu: the Numba CUDA kernels and their launcher.

Same contract as attn.cpu: ``forward(q, k, v, attn_mask, is_causal, scale, blocks)
-> (out, lse)`` and ``backward(q, k, v, out, lse, grad_out, grad_lse, attn_mask,
is_causal, scale, blocks) -> (dq, dk, dv)`` on CUDA tensors (on CPU tensors when
``NUMBA_ENABLE_CUDASIM=1``: the simulator works on host memory).

The launcher wraps tensors without copies (flat views plus element strides), builds the
kv-block lists (dense and causal attention are block lists: full blocks need no
masking, diagonal blocks do) once per shape and keeps them on the device, allocates
outputs with PyTorch's caching allocator and launches on PyTorch's current stream. It
never synchronises with the host.

Importing attn.gpu imports numba.cuda (through attn.gpu._cuda); attn itself imports
attn.gpu only when the gpu backend is asked to run.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from attn._blocks import dense_block_classes

from . import _cuda
from ._cuda import SIM, launch
from . import _kernels

__all__ = ["SIM", "available", "forward", "backward", "block_sizes"]

available = _cuda.available

_KIND = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
DTYPES = tuple(_KIND)


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def block_sizes(D: int, Dv: int) -> dict:
    """Tile sizes per kernel. The thread count of a CTA is its BM (forward, dq) or BN
    (dkdv): one thread per row. The streamed tile (BN rows of K and V, or BM rows of Q
    and dO) is sized to about 40 KiB of shared memory, under the 48 KiB a CTA may take
    statically, so D = 256 gets 16-row tiles and D <= 64 gets 64-row tiles. The
    simulator gets 8x8 tiles: each simulated thread is a Python thread."""
    if SIM:
        return {"fwd": (8, 8), "dkdv": (8, 8), "dq": (8, 8)}
    stream = max(8, min(64, _pow2_floor(10240 // (D + Dv))))
    return {"fwd": (64, stream), "dkdv": (stream, 64), "dq": (64, stream)}


@lru_cache(maxsize=512)
def _dense_lists(Lq: int, Lk: int, BM: int, BN: int, causal: bool, masked: bool,
                 device: torch.device):
    """kv-block lists per q block and their transposes (q-block lists per kv block),
    as flat int32 tensors on ``device``: (full_num, full_idx, part_num, part_idx, ncols)
    for each direction; idx is row-major (rows, ncols). With an attention mask every
    visible block is partial (the mask must be read). Built on the host once per shape
    and cached, so a call costs no host-to-device copy after the first."""
    full, part = dense_block_classes(Lq, Lk, BM, BN, causal, masked)

    def pack(sel: torch.Tensor):
        num = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        ncols = max(order.shape[-1], 1)
        if order.numel() == 0:
            order = torch.zeros(max(order.shape[0], 1), 1, dtype=torch.int32)
        if num.numel() == 0:
            num = torch.zeros(1, dtype=torch.int32)
        return (num.contiguous().to(device), order.contiguous().view(-1).to(device), ncols)

    kf, kp = pack(full), pack(part)
    qf, qp = pack(full.t()), pack(part.t())
    kv = (kf[0], kf[1], kp[0], kp[1], kf[2])
    qv = (qf[0], qf[1], qp[0], qp[1], qf[2])
    return kv, qv


def _strides4(t: torch.Tensor):
    # A size-1 dimension broadcasts: stride 0 lets the kernel index it with anything.
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


@lru_cache(maxsize=8)
def _dummy(device: torch.device):
    return torch.zeros(1, dtype=torch.float32, device=device)


def _mask(attn_mask, B, Hq, Lq, Lk, device):
    """attn_mask as a float32 additive mask expanded (stride 0) to (B, Hq, Lq, Lk):
    bool True/False -> 0/-inf. Only the user's (unexpanded) mask is converted."""
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(
            ~m, float("-inf"))
    elif m.dtype != torch.float32:
        m = m.to(torch.float32)
    return m.expand(B, Hq, Lq, Lk)


def _check(*ts):
    for t in ts:
        if SIM:
            if t.device.type != "cpu":
                raise ValueError("attn.gpu in the CUDA simulator takes CPU tensors")
        elif t.device.type != "cuda":
            raise ValueError(f"attn.gpu takes CUDA tensors, got a {t.device.type} tensor")
    if ts[0].dtype not in _KIND:
        raise TypeError(f"attn.gpu supports {list(_KIND)}, got {ts[0].dtype}")


def _mask_args(m, device):
    if m is None:
        return _dummy(device), (0, 0, 0, 0)
    return m, _strides4(m)


def forward(q, k, v, attn_mask=None, is_causal=False, scale=None, blocks=None):
    """out (dtype of q) and lse (float32, natural log, (B, Hq, Lq))."""
    _check(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    out = torch.empty(B, Hq, Lq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=q.device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    BM, BN = blocks or block_sizes(D, Dv)["fwd"]
    m = _mask(attn_mask, B, Hq, Lq, Lk, q.device)
    (kvf_n, kvf_i, kvp_n, kvp_i, ncols), _ = _dense_lists(
        Lq, Lk, BM, BN, bool(is_causal), m is not None, q.device)
    kern = _kernels.forward_kernel(_KIND[q.dtype], D, Dv, BM, BN, bool(is_causal),
                                   m is not None)
    marr, ms = _mask_args(m, q.device)
    args = (
        q, k, v,
        out, lse, marr,
        *_strides4(q), *_strides4(k), *_strides4(v), *out.stride(), *ms,
        Hq, Hq // Hkv, Lq, Lk, scale,
        kvf_n, kvf_i,
        kvp_n, kvp_i, ncols,
    )
    launch(kern, (-(-Lq // BM), B * Hq), BM, args, q.device.index)
    return out, lse


def backward(q, k, v, out, lse, grad_out, grad_lse=None, attn_mask=None,
             is_causal=False, scale=None, blocks=None):
    """dq, dk, dv in the input dtypes. grad_lse (optional) is the gradient reaching lse."""
    _check(q, k, v)
    B, Hq, Lq, D = q.shape
    Hkv, Lk, Dv = k.shape[1], k.shape[2], v.shape[3]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if Lq == 0 or Lk == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    # delta_i = rowsum(dO_i * O_i) - dlse_i: d(lse_i)/d(s_ij) = P_ij, so a gradient on lse
    # enters the softmax backward exactly like -delta. O(L*D) work, done by PyTorch.
    delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.float().contiguous()
    m = _mask(attn_mask, B, Hq, Lq, Lk, q.device)
    kind = _KIND[q.dtype]
    bs = block_sizes(D, Dv)
    if blocks is not None:
        bs = {"fwd": blocks, "dkdv": blocks, "dq": blocks}
    marr, ms = _mask_args(m, q.device)
    common = (
        q, k, v,
        grad_out, lse, delta, marr,
    )
    strides = (*_strides4(q), *_strides4(k), *_strides4(v), *_strides4(grad_out), *ms)
    causal = bool(is_causal)

    BM, BN = bs["dkdv"]
    _, (qf_n, qf_i, qp_n, qp_i, ncols) = _dense_lists(Lq, Lk, BM, BN, causal,
                                                      m is not None, q.device)
    kern = _kernels.dkdv_kernel(kind, D, Dv, BM, BN, causal, m is not None)
    launch(kern, (-(-Lk // BN), B * Hkv), BN, (
        *common, dk, dv, *strides,
        *dk.stride(), *dv.stride(), Hq, Hkv, Hq // Hkv, Lq, Lk, scale,
        qf_n, qf_i,
        qp_n, qp_i, ncols,
    ), q.device.index)

    BM, BN = bs["dq"]
    (kf_n, kf_i, kp_n, kp_i, ncols), _ = _dense_lists(Lq, Lk, BM, BN, causal,
                                                      m is not None, q.device)
    kern = _kernels.dq_kernel(kind, D, Dv, BM, BN, causal, m is not None)
    launch(kern, (-(-Lq // BM), B * Hq), BM, (
        *common, dq, *strides, *dq.stride(),
        Hq, Hq // Hkv, Lq, Lk, scale,
        kf_n, kf_i,
        kp_n, kp_i, ncols,
    ), q.device.index)
    return dq, dk, dv
