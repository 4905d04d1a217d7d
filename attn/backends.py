"""The backend registry.

A backend is an object with

* ``name`` (str) and ``auto`` (bool: may the automatic choice pick it),
* ``not_supported_reasons(problem) -> list[str]`` (empty when it can serve the call),
* ``forward(problem) -> (out, lse)`` and
  ``backward(problem, out, lse, grad_out, grad_lse) -> (dq, dk, dv)``.

The automatic choice walks the registry in order and takes the first ``auto`` backend
with no reasons; if none fits, the error lists every backend's reasons. A backend
named with :func:`use_backend` is used or fails loudly: never a silent fallback.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from ._problem import AttentionProblem

__all__ = [
    "Backend",
    "BackendNotSupportedError",
    "CpuBackend",
    "GpuBackend",
    "ReferenceBackend",
    "get_backend",
    "list_backends",
    "register_backend",
    "select_backend",
    "unregister_backend",
    "use_backend",
]


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the requested one) can run this attention call."""


class Backend:
    """Base class with the declarative checks most backends need."""

    name: str = "?"
    auto: bool = True
    devices: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = ()
    max_head_dim: int | None = None
    supports_attn_mask: bool = True
    supports_mask_grad: bool = False
    # FlexAttention calls: block masks, mask_mod and score_mod (attn.flex_attention).
    supports_flex: bool = False
    # True when forward() is built from differentiable PyTorch ops: the public API
    # then calls it directly and lets autograd differentiate it, instead of going
    # through the attn::sdpa custom ops and backward().
    autograd_native: bool = False

    def not_supported_reasons(self, problem: AttentionProblem) -> list[str]:
        reasons = []
        if self.devices and problem.device.type not in self.devices:
            reasons.append(
                f"device {problem.device.type!r} not supported (needs {', '.join(self.devices)})"
            )
        if self.dtypes and problem.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {problem.dtype} not supported (needs one of {names})")
        if self.max_head_dim is not None and max(problem.D, problem.Dv) > self.max_head_dim:
            reasons.append(
                f"head dim {max(problem.D, problem.Dv)} > {self.max_head_dim} not supported"
            )
        if problem.attn_mask is not None and not self.supports_attn_mask:
            reasons.append("attn_mask not supported")
        if problem.mask_requires_grad and not self.supports_mask_grad:
            reasons.append(
                "attn_mask requires grad: gradients with respect to attn_mask are not "
                "supported; detach it"
            )
        if problem.flex and not self.supports_flex:
            reasons.append("flex_attention (block_mask, mask_mod, score_mod) not supported yet")
        return reasons

    def forward(self, problem: AttentionProblem):
        raise NotImplementedError

    def forward_dense(self, query, key, value, is_causal: bool, scale: float):
        """forward() of a validated call without attn_mask or FlexAttention arguments.
        Backends whose kernels take tensors directly override it to skip building the
        AttentionProblem (a few microseconds of a tiny call's host time)."""
        from ._ops import _problem

        return self.forward(_problem(query, key, value, None, is_causal, scale))

    def backward(self, problem, out, lse, grad_out, grad_lse):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<attn backend {self.name!r}>"


class CpuBackend(Backend):
    """Cython + OpenMP kernels (attn.cpu)."""

    name = "cpu"
    devices = ("cpu",)
    dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    # The kernels take any head dim; scratch grows with it (O(threads * block * D)).
    max_head_dim = 1024

    supports_flex = True

    def not_supported_reasons(self, problem):
        reasons = super().not_supported_reasons(problem)
        try:
            from . import cpu  # noqa: F401  (the compiled extension)
        except ImportError as e:
            reasons.append(f"compiled kernels unavailable: {e}")
        if problem.flex and not reasons:
            from ._flex import kernel_spec_reasons

            reasons += kernel_spec_reasons(problem)
        return reasons

    def forward(self, problem):
        from . import cpu

        if problem.flex:
            from ._flex import kernel_spec

            spec = kernel_spec(problem, cpu.flex_tiles)
            return cpu.forward(problem.query, problem.key, problem.value, None, False,
                               problem.scale, spec.tiles, spec)
        return cpu.forward(
            problem.query, problem.key, problem.value, problem.attn_mask,
            problem.is_causal, problem.scale,
        )

    def forward_dense(self, query, key, value, is_causal, scale):
        from . import cpu

        return cpu.forward(query, key, value, None, is_causal, scale)

    def backward(self, problem, out, lse, grad_out, grad_lse):
        from . import cpu

        if problem.flex:
            from ._flex import kernel_spec

            spec = kernel_spec(problem, cpu.flex_tiles)
            return cpu.backward(problem.query, problem.key, problem.value, out, lse,
                                grad_out, grad_lse, None, False, problem.scale,
                                spec.tiles, spec)
        return cpu.backward(
            problem.query, problem.key, problem.value, out, lse, grad_out, grad_lse,
            problem.attn_mask, problem.is_causal, problem.scale,
        )


class ReferenceBackend(Backend):
    """Pure PyTorch (attn.reference): the test oracle, float64-capable, any device.

    Materialises the (B, Hq, Lq, Lk) scores, so it is never chosen automatically."""

    name = "reference"
    auto = False
    autograd_native = True
    supports_mask_grad = True
    supports_flex = True

    def forward(self, problem):
        if problem.flex:
            from .reference import flex_attention

            return flex_attention(problem.query, problem.key, problem.value,
                                  problem.score_mod, problem.block_mask, problem.scale,
                                  problem.gqa)
        from .reference import attention

        return attention(
            problem.query, problem.key, problem.value, problem.attn_mask,
            problem.is_causal, problem.scale, enable_gqa=problem.gqa,
        )

    def backward(self, problem, out, lse, grad_out, grad_lse):
        from .reference import attention

        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in
                       (problem.query, problem.key, problem.value))
            o, l = attention(q, k, v, problem.attn_mask, problem.is_causal,
                             problem.scale, enable_gqa=problem.gqa)
            outs, grads = [o], [grad_out]
            if grad_lse is not None:
                outs.append(l)
                grads.append(grad_lse)
            return torch.autograd.grad(outs, (q, k, v), grads, allow_unused=True)


# After Backend: attn._gpu_backend subclasses it (and imports no numba at import).
from ._gpu_backend import GpuBackend  # noqa: E402

# The registry: a short literal list, in order of automatic preference.
_REGISTRY: dict[str, Backend] = {
    "gpu": GpuBackend(),
    "cpu": CpuBackend(),
    "reference": ReferenceBackend(),
}

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "attn_forced_backend", default=None
)


# Bumped whenever the registry changes: a cached automatic choice is valid only for
# the registry it was made in (attn.functional's repeated-call path).
_generation = [0]


def selection_state():
    """What an automatic or forced choice depends on besides the call itself."""
    return _forced.get(), _generation[0]


def list_backends() -> list[str]:
    """Names of the registered backends, in order of automatic preference."""
    return list(_REGISTRY)


def _unknown(name) -> ValueError:
    return ValueError(
        f"unknown attn backend {name!r}; available backends: {list_backends()}"
    )


def get_backend(name: str) -> Backend:
    """The backend object registered under ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise _unknown(name) from None


def register_backend(name: str, backend, *, override: bool = False) -> None:
    """Add ``backend`` under ``name`` (after the built-in ones in automatic order)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    for attr in ("not_supported_reasons", "forward", "backward"):
        if not callable(getattr(backend, attr, None)):
            raise TypeError(f"backend {name!r} has no callable {attr}()")
    if name in _REGISTRY and not override:
        raise ValueError(
            f"a backend named {name!r} is already registered; pass override=True to "
            "replace it"
        )
    _REGISTRY[name] = backend
    _generation[0] += 1


def unregister_backend(name: str) -> None:
    """Remove a backend registered with :func:`register_backend`."""
    if name not in _REGISTRY:
        raise _unknown(name)
    del _REGISTRY[name]
    _generation[0] += 1


@contextlib.contextmanager
def use_backend(name: str):
    """Run the attention calls inside the block on backend ``name``, or fail.

    >>> with attn.use_backend("reference"):
    ...     out = attn.scaled_dot_product_attention(q, k, v)
    """
    get_backend(name)
    token = _forced.set(name)
    try:
        yield _REGISTRY[name]
    finally:
        _forced.reset(token)


@torch.compiler.assume_constant_result
def _forced_name() -> str | None:
    # torch.compile cannot trace ContextVar.get(); the forced backend is fixed for the
    # duration of a compiled call, so dynamo may take it as a constant.
    return _forced.get()


def select_backend(problem: AttentionProblem) -> Backend:
    """The forced backend if one is set (it must support the call), else the first
    automatic backend that supports it."""
    forced = _forced_name()
    if forced is not None:
        backend = get_backend(forced)
        reasons = list(backend.not_supported_reasons(problem))
        if reasons:
            raise BackendNotSupportedError(
                f"attn backend {forced!r} (forced by use_backend) cannot run this call "
                f"({problem.describe()}): " + "; ".join(reasons)
            )
        return backend
    lines = []
    for name, backend in _REGISTRY.items():
        if not getattr(backend, "auto", True):
            lines.append(f"  {name}: not chosen automatically; select it with "
                         f"attn.use_backend({name!r})")
            continue
        reasons = list(backend.not_supported_reasons(problem))
        if not reasons:
            return backend
        lines.append(f"  {name}: " + "; ".join(reasons))
    raise BackendNotSupportedError(
        f"no attn backend can run this call ({problem.describe()}):\n" + "\n".join(lines)
    )
