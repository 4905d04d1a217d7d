"""attn as PyTorch's flash-attention implementation (torch.nn.attention's registry).

PyTorch's registry (``torch.nn.attention.register_flash_attention_impl`` and friends)
lets a library replace the kernels behind PyTorch's flash-attention path: the library
registers a function under a name, ``activate_flash_attention_impl(name)`` calls it, and
it overrides aten's flash ops for a dispatch key with ``torch.library``, returning a
handle whose ``remove()`` (called by ``restore_flash_attention_impl()``) undoes that.
FlashAttention-4 plugs in the same way (``torch/nn/attention/_fa4.py``). Importing attn
registers it as ``"attn"``; nothing is activated until the user asks::

    import attn, torch
    torch.nn.attention.activate_flash_attention_impl("attn")
    ...  # model code calling F.scaled_dot_product_attention runs on attn's kernels
    torch.nn.attention.restore_flash_attention_impl()

The overridden ops, with aten's schemas and return conventions (the layouts of the
outputs are those of aten's meta functions, so code that views them keeps working):

* CPU: ``_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward`` — what
  ``F.scaled_dot_product_attention`` runs on CPU tensors when it picks the flash kernel
  (the default choice for dropout 0 and equal head dims). Top-left causal, additive
  ``attn_mask``, GQA, logsumexp ``(B, Lq, H)`` transposed to ``(B, H, Lq)``.
* CUDA: ``_scaled_dot_product_flash_attention`` (+ ``_backward``), dense SDPA;
  ``_flash_attention_forward`` / ``_flash_attention_backward``, dense ``(B, L, H, D)``
  or packed varlen ``(T, H, D)`` with ``cum_seq_q`` / ``cum_seq_k`` (what
  ``torch.nn.attention.varlen.varlen_attn`` and nested-tensor SDPA call), and
  ``_flash_attention_forward_no_dropout_inplace`` (``varlen_attn_out``). These follow
  FlashAttention-2's rules, which are aten's: ``is_causal`` and ``window_size_*`` are
  bottom-right aligned, a window side not smaller than the key length is unbounded.

Only the kernels change: PyTorch's autograd formulas still call the backward op with
the forward's output and logsumexp, and attn's kernels compute both (natural-log
logsumexp in float32, float64 for float64 inputs). Every call goes through attn's
backend layer (``attn.select_backend``: the Cython kernels for CPU tensors, the Numba
CUDA kernels for CUDA tensors, or the backend forced with ``attn.use_backend``).

Calls attn cannot serve — dropout, ``return_debug_mask``, ALiBi slopes, paged KV
(``block_table``), a dtype or head dim no backend takes, inputs attn's validation
rejects — run **PyTorch's own kernel** (the one that was registered before activation),
so activating attn never makes a working model fail. In **strict mode** they raise
:class:`FlashAttentionFallbackError` naming the reasons instead: set the environment
variable ``ATTN_FLASH_STRICT=1`` (read at every call) or activate with
``attn.activate_flash_attention(strict=True)``. A backend forced with
``attn.use_backend`` that cannot serve a call raises either way (attn's rule: an
explicitly requested backend never falls back silently). ``attn.flash_attention_calls()``
counts, per op, the calls attn ran and the calls that fell back to PyTorch.

The decision depends only on the op's arguments, so a backward falls back exactly when
its forward did (the forward-only arguments — dropout aside — make only the forward fall
back, and attn's backward reads PyTorch's logsumexp as well as its own).

With a PyTorch that has no registry (older than the one that introduced it), importing
attn works as before; :func:`activate_flash_attention` raises a RuntimeError saying why.
"""
from __future__ import annotations

import collections
import inspect
import logging
import os
import threading
import warnings

import torch

from .backends import BackendNotSupportedError, _forced, select_backend

__all__ = [
    "AVAILABLE",
    "FlashAttentionFallbackError",
    "IMPL_NAME",
    "STRICT_ENV",
    "UNAVAILABLE_REASON",
    "activate_flash_attention",
    "flash_attention_calls",
    "reset_flash_attention_calls",
]

log = logging.getLogger(__name__)

IMPL_NAME = "attn"
STRICT_ENV = "ATTN_FLASH_STRICT"


class FlashAttentionFallbackError(BackendNotSupportedError):
    """attn, activated as PyTorch's flash implementation in strict mode, cannot serve a
    call (and will not hand it to PyTorch's kernel)."""


# ----------------------------------------------------------------------- bookkeeping
_lock = threading.Lock()
_counts: collections.Counter = collections.Counter()
# Set by activate_flash_attention(strict=...); None: the environment variable decides.
_strict_override: bool | None = None


def flash_attention_calls() -> dict[str, dict[str, int]]:
    """Calls of each overridden aten op since the last reset: ``{op: {"attn": n,
    "torch": m}}``, ``attn`` = run on attn's kernels, ``torch`` = fell back to
    PyTorch's own kernel."""
    with _lock:
        out: dict[str, dict[str, int]] = {}
        for (op, who), n in _counts.items():
            out.setdefault(op, {"attn": 0, "torch": 0})[who] = n
        return out


def reset_flash_attention_calls() -> None:
    """Zero the counters of :func:`flash_attention_calls`."""
    with _lock:
        _counts.clear()


def _count(op: str, who: str) -> None:
    with _lock:
        _counts[(op, who)] += 1


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _strict() -> bool:
    if _strict_override is not None:
        return _strict_override
    raw = os.environ.get(STRICT_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{STRICT_ENV}={raw!r}: expected 1 (strict: raise) or 0 (fall back to "
                     "PyTorch's kernel)")


# ------------------------------------------------------------------------- routing
class _Unservable(Exception):
    """This call is not attn's to run; carries the reasons."""

    def __init__(self, *reasons: str):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


def _validated(fn, *args):
    """fn(*args), with attn's validation errors turned into reasons to fall back:
    inputs attn rejects are PyTorch's kernel's to accept or reject."""
    try:
        return fn(*args)
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
        if isinstance(e, BackendNotSupportedError):
            raise
        raise _Unservable(f"attn rejects the inputs: {e}") from None


def _no_dropout(dropout_p) -> None:
    if dropout_p != 0.0:
        raise _Unservable(f"dropout_p={dropout_p}: attn's kernels have no attention dropout")


def _same_head_dims(query, value) -> None:
    if query.dim() > 0 and value.dim() > 0 and value.shape[-1] != query.shape[-1]:
        raise _Unservable(f"value head dim {value.shape[-1]} != query head dim "
                          f"{query.shape[-1]}: aten's flash ops return an output shaped "
                          "like query")


def _dense_problem(query, key, value, attn_mask, is_causal, scale):
    from ._problem import make_problem

    _same_head_dims(query, value)
    gqa = query.dim() == 4 and key.dim() == 4 and query.shape[1] != key.shape[1]
    return _validated(make_problem, query, key, value, attn_mask, bool(is_causal), scale,
                      gqa)


def _packed_checks(query, key, value, scale) -> None:
    from ._varlen import _check_packed, _check_scale

    _same_head_dims(query, value)
    _validated(_check_packed, query, key, value, True)
    _validated(_check_scale, scale)


def _dense_forward(problem):
    backend = select_backend(problem)
    out, lse = backend.forward(problem)
    return out, lse


def _dense_backward(problem, out, lse, grad_out):
    backend = select_backend(problem)
    return backend.backward(problem, out, lse, grad_out, None)


def _into(t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``t``'s values in ``target``'s layout (``t`` itself when the strides agree)."""
    if t.stride() == target.stride() and t.dtype == target.dtype:
        return t
    return target.copy_(t)


def _bshd_like(t: torch.Tensor) -> torch.Tensor:
    # The gradients of the CPU flash backward are (B, L, H, D) in memory (its meta).
    return torch.empty_permuted(t.shape, (0, 2, 1, 3), dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------------- CPU kernels
def _cpu_forward(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None,
                 scale=None):
    _no_dropout(dropout_p)
    problem = _dense_problem(query, key, value, attn_mask, is_causal, scale)
    out, lse = _dense_forward(problem)
    B, H, Lq = lse.shape
    lse_t = torch.empty(B, Lq, H, dtype=lse.dtype, device=lse.device).transpose(1, 2)
    return _into(out, torch.empty_like(query)), lse_t.copy_(lse)


def _cpu_backward(grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, *,
                  attn_mask=None, scale=None):
    _no_dropout(dropout_p)
    problem = _dense_problem(query, key, value, attn_mask, is_causal, scale)
    dq, dk, dv = _dense_backward(problem, out, logsumexp, grad_out)
    return (_into(dq, _bshd_like(query)), _into(dk, _bshd_like(key)),
            _into(dv, _bshd_like(value)))


# --------------------------------------------------------------------- CUDA kernels
def _fa_window(left, right, is_causal: bool, seqlen_k: int) -> tuple[int, int]:
    """FlashAttention-2's window rules (aten's): None and -1 are unbounded, a side not
    smaller than the key length is unbounded, is_causal sets the right side to 0."""
    left = -1 if left is None else int(left)
    right = -1 if right is None else int(right)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if is_causal:
        right = 0
    return left, right


def _grid_offsets(B: int, L: int) -> torch.Tensor:
    return torch.arange(B + 1, dtype=torch.int64) * L


def _bhsd_forward(q, k, v, window, scale):
    """out (B, H, Lq, Dv) and lse (B, H, Lq) of dense (B, H, L, D) views with
    bottom-right window/causal rules: attn's dense kernels when the rule is none or
    square causal (top-left = bottom-right), else the packed jagged path with one
    sequence per batch entry."""
    from ._varlen import packed_forward

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    left, right = window
    if left < 0 and (right < 0 or (right == 0 and Lq == Lk)):
        problem = _dense_problem(q, k, v, None, right == 0, scale)
        return _dense_forward(problem)
    _dense_problem(q, k, v, None, False, scale)  # attn's checks first
    pq, pk, pv = (t.transpose(1, 2).reshape(B * t.shape[2], t.shape[1], t.shape[3])
                  for t in (q, k, v))
    out, lse = packed_forward(pq, pk, pv, _grid_offsets(B, Lq), _grid_offsets(B, Lk), None,
                              window, False, scale, H != k.shape[1])
    return (out.view(B, Lq, H, -1).transpose(1, 2),
            lse.view(H, B, Lq).permute(1, 0, 2).contiguous())


def _bhsd_backward(go, q, k, v, out, lse, window, scale):
    from ._varlen import packed_backward

    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    left, right = window
    if left < 0 and (right < 0 or (right == 0 and Lq == Lk)):
        problem = _dense_problem(q, k, v, None, right == 0, scale)
        return _dense_backward(problem, out, lse, go)
    _dense_problem(q, k, v, None, False, scale)
    pack = lambda t: t.transpose(1, 2).reshape(B * t.shape[2], t.shape[1], t.shape[3])  # noqa: E731
    plse = lse.permute(1, 0, 2).reshape(H, B * Lq)
    dq, dk, dv = packed_backward(pack(go), None, pack(q), pack(k), pack(v), pack(out), plse,
                                 _grid_offsets(B, Lq), _grid_offsets(B, Lk), window, False,
                                 scale, H != k.shape[1])
    return tuple(d.view(B, t.shape[2], t.shape[1], -1).transpose(1, 2)
                 for d, t in ((dq, q), (dk, k), (dv, v)))


def _aux(query):
    # The philox seed / offset and debug mask of aten's flash ops; attn has no dropout.
    return (torch.zeros(2, dtype=torch.uint64, device=query.device),
            torch.zeros((), dtype=torch.uint64, device=query.device),
            torch.empty(0, dtype=query.dtype, device=query.device))


def _cuda_sdpa_forward(query, key, value, dropout_p=0.0, is_causal=False,
                       return_debug_mask=False, *, scale=None):
    _no_dropout(dropout_p)
    if return_debug_mask:
        raise _Unservable("return_debug_mask=True: attn keeps no attention matrix")
    Lq, Lk = query.shape[2], key.shape[2]
    out, lse = _bhsd_forward(query, key, value, _fa_window(None, None, is_causal, Lk), scale)
    seed, offset, debug = _aux(query)
    return (_into(out, torch.empty_like(query)), lse.float().contiguous(), None, None, Lq, Lk,
            seed, offset, debug)


def _cuda_sdpa_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                        max_q, max_k, dropout_p, is_causal, philox_seed, philox_offset, *,
                        scale=None):
    _no_dropout(dropout_p)
    window = _fa_window(None, None, is_causal, key.shape[2])
    dq, dk, dv = _bhsd_backward(grad_out, query, key, value, out, logsumexp, window, scale)
    return (_into(dq, torch.empty_like(query)), _into(dk, torch.empty_like(key)),
            _into(dv, torch.empty_like(value)))


def _varlen_offsets(query, key, cum_seq_q, cum_seq_k, seqused_k, max_q, max_k):
    from ._varlen import _checked_offsets

    return _validated(_checked_offsets, query, key, cum_seq_q,
                      cum_seq_q if cum_seq_k is None else cum_seq_k, seqused_k, max_q, max_k)


def _cuda_flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                        window_size_right=None, seqused_k=None, alibi_slopes=None,
                        block_table=None, num_splits=None):
    # num_splits is a scheduling hint of FlashAttention's split-KV decoding; it does not
    # change results, so attn's own schedule serves any value.
    from ._varlen import packed_forward

    _no_dropout(dropout_p)
    if return_debug_mask:
        raise _Unservable("return_debug_mask=True: attn keeps no attention matrix")
    if alibi_slopes is not None:
        raise _Unservable("alibi_slopes: use attn.flex_attention with attn.mods.alibi")
    if block_table is not None:
        raise _Unservable("block_table (paged KV cache) is not supported")
    if cum_seq_q is None:  # dense (B, L, H, D)
        if seqused_k is not None:
            raise _Unservable("seqused_k with dense (B, L, H, D) inputs is not supported")
        window = _fa_window(window_size_left, window_size_right, is_causal, key.shape[1])
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out, lse = _bhsd_forward(q, k, v, window, scale)
        out = out.transpose(1, 2)
    else:
        window = _fa_window(window_size_left, window_size_right, is_causal, int(max_k))
        _packed_checks(query, key, value, scale)
        cq, ck, used = _varlen_offsets(query, key, cum_seq_q, cum_seq_k, seqused_k, max_q,
                                       max_k)
        out, lse = packed_forward(query, key, value, cq, ck, used, window, False, scale,
                                  query.shape[1] != key.shape[1])
    seed, offset, debug = _aux(query)
    return (_into(out, torch.empty_like(query)), lse.float().contiguous(), seed, offset,
            debug)


def _cuda_flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                                dropout_p, is_causal, return_debug_mask, *, scale=None,
                                window_size_left=None, window_size_right=None,
                                seqused_k=None, alibi_slopes=None, block_table=None,
                                num_splits=None):
    res, lse, _, _, _ = _cuda_flash_forward(
        query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
        return_debug_mask, scale=scale, window_size_left=window_size_left,
        window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
        block_table=block_table, num_splits=num_splits)
    out.copy_(res)
    return lse


def _cuda_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k,
                         max_q, max_k, dropout_p, is_causal, rng_state, unused, *,
                         scale=None, window_size_left=None, window_size_right=None):
    from ._varlen import packed_backward

    _no_dropout(dropout_p)
    if cum_seq_q is None:
        window = _fa_window(window_size_left, window_size_right, is_causal, key.shape[1])
        go, q, k, v, o = (t.transpose(1, 2) for t in (grad_out, query, key, value, out))
        grads = tuple(g.transpose(1, 2) for g in
                      _bhsd_backward(go, q, k, v, o, logsumexp, window, scale))
    else:
        window = _fa_window(window_size_left, window_size_right, is_causal, int(max_k))
        _packed_checks(query, key, value, scale)
        cq, ck, _ = _varlen_offsets(query, key, cum_seq_q, cum_seq_k, None, max_q, max_k)
        grads = packed_backward(grad_out, None, query, key, value, out, logsumexp, cq, ck,
                                window, False, scale, query.shape[1] != key.shape[1])
    return tuple(_into(g, torch.empty_like(t)) for g, t in zip(grads, (query, key, value)))


# (aten op, dispatch key, attn's implementation). The CPU pair is what SDPA runs on CPU
# tensors; the CUDA ops are FlashAttention-4's set (torch/nn/attention/_fa4.py).
_OVERRIDES = (
    ("_scaled_dot_product_flash_attention_for_cpu", "CPU", _cpu_forward),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", "CPU", _cpu_backward),
    ("_scaled_dot_product_flash_attention", "CUDA", _cuda_sdpa_forward),
    ("_scaled_dot_product_flash_attention_backward", "CUDA", _cuda_sdpa_backward),
    ("_flash_attention_forward", "CUDA", _cuda_flash_forward),
    ("_flash_attention_backward", "CUDA", _cuda_flash_backward),
    ("_flash_attention_forward_no_dropout_inplace", "CUDA", _cuda_flash_forward_inplace),
)


def _kernel(op: str, impl, original, dispatch_key: str):
    def kernel(keyset, *args, **kwargs):
        try:
            # Below autograd: nothing here records a graph (PyTorch's autograd kernel
            # above this one does), and attn_mask's requires_grad is moot (aten's
            # formulas give it no gradient).
            with torch.no_grad():
                res = impl(*args, **kwargs)
        except (_Unservable, BackendNotSupportedError) as e:
            if isinstance(e, BackendNotSupportedError) and _forced.get() is not None:
                raise  # a backend the user forced never falls back silently
            reasons = e.reasons if isinstance(e, _Unservable) else [str(e)]
            return _fallback(op, original, keyset, args, kwargs, reasons, dispatch_key)
        _count(op, "attn")
        return res

    kernel.__name__ = kernel.__qualname__ = f"attn_{op}"
    return kernel


def _fallback(op, original, keyset, args, kwargs, reasons, dispatch_key):
    why = "; ".join(reasons)
    if _strict():
        raise FlashAttentionFallbackError(
            f"attn, PyTorch's active flash-attention implementation in strict mode, cannot "
            f"run aten.{op}: {why}. Unset {STRICT_ENV} (or activate without strict=True) to "
            "let PyTorch's own kernel run such calls")
    if original is None:
        raise FlashAttentionFallbackError(
            f"attn cannot run aten.{op} ({why}) and this PyTorch build has no "
            f"{dispatch_key} kernel for it to fall back to")
    _count(op, "torch")
    return original.call_boxed(keyset, *args, **kwargs)


def _schema_mismatch(op, impl) -> str | None:
    """Why impl does not take op's arguments (None when it does): a newer PyTorch may add
    arguments whose meaning attn would silently ignore."""
    names = [a.name for a in op._schema.arguments]
    params = inspect.signature(impl).parameters
    unknown = [n for n in names if n not in params]
    if unknown:
        return f"arguments {unknown} unknown to attn"
    return None


class _Handle:
    """What activation returns to PyTorch's registry: remove() deregisters attn's
    kernels, so aten's dispatch table is again exactly what it was."""

    def __init__(self, lib):
        self._lib = lib

    def remove(self) -> None:
        global _strict_override
        lib, self._lib = self._lib, None
        if lib is not None:
            lib._destroy()
        _strict_override = None


def _activate() -> _Handle:
    """register_fn for PyTorch's registry: override aten's flash ops with attn's."""
    lib = torch.library.Library("aten", "IMPL")
    try:
        for name, key, impl in _OVERRIDES:
            op = getattr(getattr(torch.ops.aten, name, None), "default", None)
            if op is None:
                log.info("attn: this PyTorch has no aten.%s; not overridden", name)
                continue
            why = _schema_mismatch(op, impl)
            if why is not None:
                warnings.warn(f"attn does not override aten.{name}: {why}; PyTorch's "
                              "kernel keeps running it", RuntimeWarning, stacklevel=3)
                continue
            get_kernel = getattr(torch.library, "get_kernel", None)
            try:
                original = get_kernel(op, key) if get_kernel is not None else None
            except RuntimeError:  # no such kernel in this build (CUDA ops on a CPU build)
                original = None
            with warnings.catch_warnings():
                # Overriding aten's kernel is the point of activation; PyTorch's notice
                # about it is noise here.
                warnings.filterwarnings("ignore", message="(?s).*Overriding a previously "
                                        "registered kernel")
                lib.impl(name, _kernel(name, impl, original, key), key, with_keyset=True)
    except BaseException:
        lib._destroy()
        raise
    return _Handle(lib)


def activate_flash_attention(strict: bool | None = None) -> None:
    """``torch.nn.attention.activate_flash_attention_impl("attn")``, with the strict
    mode chosen here (``None``: the ``ATTN_FLASH_STRICT`` environment variable at each
    call); undo with ``torch.nn.attention.restore_flash_attention_impl()``. Raises
    RuntimeError when this PyTorch has no flash-attention registry."""
    global _strict_override
    if not AVAILABLE:
        raise RuntimeError(UNAVAILABLE_REASON)
    if strict is not None and not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool or None, got {type(strict).__name__}")
    torch.nn.attention.activate_flash_attention_impl(IMPL_NAME)
    _strict_override = strict


def _register() -> tuple[bool, str | None]:
    try:
        from torch.nn.attention import register_flash_attention_impl
    except ImportError:
        return False, (
            f"PyTorch {torch.__version__} has no flash-attention registry "
            "(torch.nn.attention.register_flash_attention_impl); attn's kernels are still "
            "available through attn.scaled_dot_product_attention, or upgrade PyTorch")
    register_flash_attention_impl(IMPL_NAME, register_fn=_activate)
    return True, None


AVAILABLE, UNAVAILABLE_REASON = _register()
