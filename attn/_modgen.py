"""FlexAttention-style mods compiled by Numba.

A ``mask_mod(b, h, q_idx, kv_idx) -> bool`` or ``score_mod(score, b, h, q_idx, kv_idx)``
is a plain Python function written with torch ops. The kernels cannot call Python, so
this module turns a mod into Python *source* of a scalar element function that Numba
compiles for the CPU (``numba.njit`` / ``numba.cfunc``) and for the GPU
(``numba.cuda.jit(device=True)``, compiled by ``gpu/_cuda.py`` from
:func:`element_function_source`):

1. **Trace** the mod with ``make_fx`` on 0-dim fake tensors (int32 indices, float32
   score), under FlexAttention's ``TransformGetItemToIndex`` so ``t[q]`` records
   ``aten.index``. Fake (not real) tensors make Python control flow on a tensor value
   (``if q > kv:``, ``float(q)``) fail loudly instead of silently taking one branch.
   Tensors the mod captures become *buffers*: kernel arguments, so new values never
   recompile (only new dtypes / shapes do).
2. **Generate** straight-line code, one statement per aten op, typed like torch: every
   value is ``bool``, an integer (int8 ... int64), ``float32``, ``float64`` or ``R``.
   ``R`` is the score's real type, float32 or float64 as the tile is; a value is ``R``
   when torch, run with a float32 score, gives it float32 *because of the score*, i.e.
   it would follow the score to float64. So a float64 tile computes in float64 and a
   float32 tile stays in float32, as torch does. The indices are int32 as in
   FlexAttention; narrow integer results are cast back to their width, which is
   torch's wrap-around and keeps LLVM's vector lanes narrow. The derivative for
   ``score_grad_elem`` is forward-mode: every float value carries a tangent w.r.t. the
   score (1 for the score itself), with torch's conventions at kinks (``abs'(0) = 0``,
   clamp passes the gradient at its bounds, ``maximum`` / ``minimum`` split ties,
   ``relu'(0) = 0``). Zero tangents are dropped symbolically, so ``-inf`` constants
   never make ``0 * inf``. Ops whose operands are all trace-time literals are
   evaluated by torch.
3. **Compile** per (mod key, tile dtype) a generated module holding the element
   functions, the CPU tile callbacks (``@cfunc``) and the ``create_block_mask`` /
   ``create_mask`` drivers (``@njit(parallel=True)``). The module is written to a
   content-addressed file so Numba's ``cache=True`` (which needs a real source file and
   an importable module) works across processes; if the cache folder is not writable
   the source is exec'd and compiled in memory only.

Buffer reads clamp the index: torch raises on an out-of-range index but a kernel cannot
raise, so a negative index wraps once like torch (``-1`` is the last element) and
anything still outside ``[0, n)`` is clamped to the nearest end.

CPU float32 score tiles evaluate ``exp``, ``tanh`` and ``sigmoid`` with the branch-free
approximations ``_fast_exp_f32`` (<= 1.3 ulp) / ``_fast_tanh_f32`` (<= 6.5 ulp) below:
without Intel SVML, LLVM can only call scalar ``expf`` / ``tanhf`` (10-15 ns each),
while these vectorise. float64 tiles, masks and the GPU source use ``math`` (so a
float64 tile with tanh costs ~15 ns per element: float64 is the accuracy path).

Limitations:

* The score is float32 in the trace, so a cast of the score *to* float32
  (``score.float()``) is invisible: a float64 tile keeps it in float64.
* uint16 / uint32 / uint64 values compute as int64; float16 / bfloat16 compute in
  float32 (not rounded to 16 bits after each op).
* Only scalar code: whole-tensor ops on captured tensors, reductions, slicing next to a
  traced index, sorting, data-dependent shapes raise ``NotImplementedError``; Python
  control flow on tensor values raises ``TypeError``.
* Buffers are read where they live: the CPU paths take CPU copies of CUDA buffers.
* A derivative is only w.r.t. the score: ``requires_grad_buffers`` lists buffers that
  would need more, for the caller to reject.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import sys
import tempfile
import threading
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from numba import float32, njit

__all__ = [
    "CompiledMod",
    "block_classes",
    "buffer_arrays",
    "buffer_pointer_array",
    "cpu_tile_fns",
    "dense_mask",
    "element_function",
    "element_function_source",
    "supported_ops",
    "trace_mask_mod",
    "trace_score_mod",
]

_ARG_NAMES = {"mask": ("b", "h", "q", "kv"), "score": ("s", "b", "h", "q", "kv")}


# ------------------------------------------------------------------ the compiled mod --
@dataclass(eq=False)
class CompiledMod:
    """A traced mod: generated element-function source plus the tensors it reads.

    ``source`` defines ``mask_elem(b, h, q, kv, buf0, ...) -> bool`` for a mask, or
    ``score_elem(s, b, h, q, kv, buf0, ...) -> R`` and
    ``score_grad_elem(...) -> (R value, R d value / d s)`` for a score. It uses the
    names ``R``, ``float32``, ``float64``, ``int64``, ``uint64``, ``math`` and
    ``_exp_R``, ``_tanh_R``, ``_exp_f32``, ``_tanh_f32``, which
    :func:`element_function_source` binds. ``bufK`` is the K-th buffer flattened to 1-D.

    ``key`` is equal for two mods exactly when the same compiled code serves both:
    the source (which bakes in buffer shapes and Python constants) and the buffers'
    dtypes and shapes, never their values.
    """

    kind: str
    source: str
    fn_name: str
    buffers: tuple
    key: tuple
    requires_grad_buffers: tuple = ()
    is_identity: bool = False
    is_all_true: bool = False
    grad_fn_name: str | None = None
    # (captured tensor, its _version when copied) for buffers that are copies: an
    # in-place change of the original is invisible to the copy, so the trace cache
    # re-traces when the version moves.
    _copied_from: tuple = field(default=(), repr=False)

    @property
    def requires_grad(self) -> bool:
        """True when some buffer requires grad (the kernels do not differentiate
        w.r.t. buffers: the caller should raise)."""
        return bool(self.requires_grad_buffers)

    @property
    def num_buffers(self) -> int:
        return len(self.buffers)


# --------------------------------------------------------------------------- tracing --
def _num_positional(fn) -> int:
    # The rule of torch.nn.attention.flex_attention._get_mod_type: positional
    # parameters without defaults.
    code = getattr(fn, "__code__", None)
    if code is not None and not isinstance(fn, type):
        return code.co_argcount - len(getattr(fn, "__defaults__", None) or ())
    return sum(
        1
        for p in inspect.signature(fn).parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def _check_signature(fn, kind: str) -> None:
    if not callable(fn):
        raise TypeError(f"{kind}_mod must be callable, got {type(fn).__name__}")
    try:
        n = _num_positional(fn)
    except (TypeError, ValueError):
        return  # no introspectable signature: let the trace report what goes wrong
    want = 4 if kind == "mask" else 5
    if n == want:
        return
    meaning = (
        "FlexAttention tells mods apart by their number of positional arguments: "
        "4 is a mask_mod(b, h, q_idx, kv_idx) -> bool tensor, 5 is a "
        "score_mod(score, b, h, q_idx, kv_idx) -> tensor"
    )
    hint = ""
    if kind == "mask" and n == 5:
        hint = " This function looks like a score_mod: pass it as score_mod."
    elif kind == "score" and n == 4:
        hint = " This function looks like a mask_mod: pass it as mask_mod (or block_mask)."
    raise TypeError(
        f"{kind}_mod must take {want} positional arguments, got {n} ({meaning}).{hint}"
    )


def _captured(fn, depth: int = 0, seen=None, out=None):
    """What the trace of ``fn`` can depend on besides its arguments: tensors (by
    identity) and hashable scalars (by value) reachable through closures, referenced
    globals, defaults and functools.partial, recursing into captured functions."""
    if seen is None:
        seen, out = set(), []
    if id(fn) in seen or depth > 4:
        return out
    seen.add(id(fn))

    def take(v, d):
        if isinstance(v, torch.Tensor):
            out.append(("T", id(v), v))
        elif v is None or isinstance(v, (bool, int, float, str, torch.dtype)):
            out.append(("S", type(v).__name__, v))
        elif isinstance(v, (list, tuple)) and d < 2:
            out.append(("L", len(v)))
            for x in v:
                take(x, d + 1)
        elif isinstance(v, dict) and d < 2:
            for k, x in v.items():
                if isinstance(k, str):
                    out.append(("K", k))
                    take(x, d + 1)
        elif isinstance(v, torch.nn.Module):
            for k, t in list(v.named_buffers()) + list(v.named_parameters()):
                out.append(("K", k))
                take(t, d + 1)
        elif callable(v) and not isinstance(v, type):
            _captured(v, depth + 1, seen, out)

    if hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        take(fn.func, 0)
        for a in tuple(fn.args) + tuple((fn.keywords or {}).values()):
            take(a, 0)
        return out
    if inspect.ismethod(fn):
        obj = fn.__self__
        take(obj, 0)
        for k, v in sorted(getattr(obj, "__dict__", {}).items()):
            out.append(("K", k))
            take(v, 1)
        fn = fn.__func__
    code = getattr(fn, "__code__", None)
    if code is None:  # a callable object: its attributes and its __call__
        for k, v in sorted(getattr(fn, "__dict__", {}).items()):
            out.append(("K", k))
            take(v, 1)
        call = getattr(type(fn), "__call__", None)
        if inspect.isfunction(call):
            _captured(call, depth + 1, seen, out)
        return out
    for cell in fn.__closure__ or ():
        try:
            take(cell.cell_contents, 0)
        except ValueError:  # empty cell
            out.append(("E",))
    for d in fn.__defaults__ or ():
        take(d, 0)
    g = getattr(fn, "__globals__", {})
    names = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(x for x in c.co_consts if inspect.iscode(x))
    for n in sorted(names):
        if n in g:
            v = g[n]
            if isinstance(v, torch.Tensor) or inspect.isfunction(v) or (
                isinstance(v, (bool, int, float)) and not isinstance(v, type)
            ):
                out.append(("G", n))
                take(v, 0)
    return out


def _trace_graph(fn, kind: str):
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch._subclasses.fake_tensor import (
        DataDependentOutputException,
        DynamicOutputShapeException,
    )
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    from torch.utils import _pytree as pytree

    class GetItemToIndex(TransformGetItemToIndex):
        # FlexAttention's mode turns t[i, j] with tensor / int indices into
        # aten.index; a slice next to a tensor index would fall back to Python
        # indexing, which reads the index value (a confusing data-dependence error).
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.Tensor.__getitem__:
                leaves = pytree.tree_leaves(args[1])
                if any(isinstance(x, torch.Tensor) for x in leaves) and not all(
                    isinstance(x, (torch.Tensor, int)) for x in leaves
                ):
                    raise _unsupported(
                        "slicing (`:`, `...` or None) next to a traced index",
                        "index every leading dimension with a scalar, e.g. t[h, q_idx]",
                    )
            return super().__torch_function__(func, types, args, kwargs)

    # A fixed-arity wrapper: make_fx would also ask for parameters with defaults.
    if kind == "mask":
        def call(b, h, q_idx, kv_idx):
            return fn(b, h, q_idx, kv_idx)
    else:
        def call(score, b, h, q_idx, kv_idx):
            return fn(score, b, h, q_idx, kv_idx)

    idx = [torch.zeros((), dtype=torch.int32) for _ in range(4)]
    args = idx if kind == "mask" else [torch.zeros((), dtype=torch.float32)] + idx
    try:
        with GetItemToIndex():
            gm = make_fx(call, tracing_mode="fake", _allow_non_fake_inputs=True)(*args)
    except _Untranslatable as e:
        raise NotImplementedError(f"{kind}_mod: {e}") from None
    except (
        GuardOnDataDependentSymNode,
        DataDependentOutputException,
        DynamicOutputShapeException,
    ) as e:
        raise TypeError(
            f"{kind}_mod uses the *value* of a tensor in Python (an `if`/`while` on a "
            "tensor, `and`/`or`/`not` between tensors, `float(t)`, `int(t)`, "
            "`t.item()`, or an op whose output shape depends on values). Mods are "
            "traced once for all (b, h, q_idx, kv_idx); write the choice with tensor "
            "ops instead: torch.where(cond, x, y), `&`, `|`, `~`. "
            f"(torch: {str(e).splitlines()[0]})"
        ) from e
    gm.graph.eliminate_dead_code()
    return gm


# ------------------------------------------------------------------- value model --
# Types of generated values. 'R' is the score's real type (float32 or float64).
_INTS = {"i8": torch.int8, "u8": torch.uint8, "i16": torch.int16, "i32": torch.int32,
         "i64": torch.int64}
_INT_TY = {v: k for k, v in _INTS.items()}
_CAST = {"b": "bool", "i8": "int8", "u8": "uint8", "i16": "int16", "i32": "int32",
         "i64": "int64", "f32": "float32", "f64": "float64", "R": "R"}
_CAT = {"b": 0, "f32": 2, "f64": 2, "R": 2, **{k: 1 for k in _INTS}}
# Numba computes narrow integer ops in int64; a cast back gives torch's wrap-around
# (and lets LLVM keep narrow vector lanes).
_WRAP = ("i8", "u8", "i16", "i32")
_NO = object()


def _dtype_ty(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "b"
    if dtype.is_complex:
        raise NotImplementedError(f"complex values ({dtype}) are not supported in mods")
    if dtype.is_floating_point:
        return "f64" if dtype == torch.float64 else "f32"
    # torch has little arithmetic for uint16/32/64: they compute as int64
    return _INT_TY.get(dtype, "i64")


def _promote2(a: str, b: str) -> str:
    if _CAT[a] != _CAT[b]:
        return a if _CAT[a] > _CAT[b] else b
    if a == b:
        return a
    if _CAT[a] == 1:
        return _INT_TY.get(torch.promote_types(_INTS[a], _INTS[b]), "i64")
    if "f64" in (a, b):
        return "f64"
    return "R"  # {R, f32}: R is float32 or wider


@dataclass
class _V:
    """A scalar value: a variable name or literal, its type, its value when known at
    trace time, its tangent variable (None = zero) and whether it is a Python number
    argument (which takes part in type promotion only by category, as in torch)."""

    expr: str
    ty: str
    const: object = _NO
    tan: str | None = None
    literal: bool = False

    @property
    def is_const(self) -> bool:
        return self.const is not _NO


@dataclass
class _Ref:
    """A (partially indexed) buffer: contiguous, so indexing leading dimensions moves
    a flat offset and reshapes only change the remaining shape."""

    buf: int
    offset: object  # int or variable name
    shape: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_call(expr: str, fn: str) -> bool:
    """Whether ``expr`` is one call ``fn(...)`` spanning the whole expression."""
    if not (expr.startswith(fn + "(") and expr.endswith(")")):
        return False
    depth = 0
    for k, ch in enumerate(expr[len(fn):]):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return k == len(expr) - len(fn) - 1
    return False


def _float_lit(x: float) -> str:
    if math.isnan(x):
        return "math.nan"
    if math.isinf(x):
        return "math.inf" if x > 0 else "(-math.inf)"
    return repr(float(x))


def _lit(value, ty: str) -> str:
    if ty == "b":
        return "True" if bool(value) else "False"
    if _CAT[ty] == 1:
        v = int(value)
        return str(v) if v >= 0 else f"({v})"
    v = float(value)
    if ty == "f32":
        return f"float32({_float_lit(float(np.float32(v)))})"
    if ty == "R":
        return f"R({_float_lit(v)})"
    return _float_lit(v)


def _py_value(value, ty: str):
    if ty == "b":
        return bool(value)
    if _CAT[ty] == 1:
        return int(value)
    if ty == "f32":
        return float(np.float32(value))
    return float(value)


class _Untranslatable(NotImplementedError):
    pass


def _unsupported(op: str, why: str = "") -> NotImplementedError:
    return _Untranslatable(
        f"mods cannot use {op}{': ' + why if why else ''}. Mods are compiled to scalar "
        "code: use elementwise arithmetic, comparisons, torch.where, clamp/minimum/"
        "maximum, exp/log/tanh/sigmoid/sqrt/abs and lookups t[i, j] in captured "
        "tensors; precompute anything else outside the mod and capture the result "
        "(see attn._modgen.supported_ops())."
    )


# ------------------------------------------------------------------- code generator --
class _Gen:
    def __init__(self, gm, kind: str):
        self.gm = gm
        self.kind = kind
        self.grad = kind == "score"
        self.lines: list[tuple[str, bool]] = []  # (statement, tangent-only)
        self.n = 0
        self.env: dict = {}
        self.buffers: list[torch.Tensor] = []   # the tensors as captured
        self.buf_ids: dict = {}
        self.literal_buffers: set = set()        # created by the mod body itself

    # -- emission --
    def fresh(self, prefix="v") -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def emit(self, ty: str, expr: str, tan: str | None = None) -> _V:
        if ty in _WRAP and not _is_call(expr, _CAST[ty]):
            expr = f"{_CAST[ty]}({expr})"
        name = self.fresh()
        self.lines.append((f"{name} = {expr}", False))
        tname = None
        if tan is not None and self.grad and _CAT[ty] == 2:
            tname = "d" + name[1:]
            self.lines.append((f"{tname} = {tan}", True))
        return _V(name, ty, tan=tname)

    def emit_tan(self, expr: str) -> str:
        name = self.fresh("t")
        self.lines.append((f"{name} = {expr}", True))
        return name

    def const(self, value, ty: str) -> _V:
        value = _py_value(value, ty)
        return _V(_lit(value, ty), ty, const=value)

    def as_(self, v: _V, ty: str) -> str:
        """``v`` as an expression of type ``ty`` (torch's cast semantics)."""
        if v.is_const:
            return _lit(_py_value(v.const, ty) if ty != "b" else v.const != 0, ty)
        if v.ty == ty:
            return v.expr
        if ty == "b":
            return f"({v.expr} != 0)"
        return f"{_CAST[ty]}({v.expr})"

    def tan_as(self, v: _V, ty: str) -> str | None:
        if v.tan is None:
            return None
        return v.tan if v.ty == ty else f"{_CAST[ty]}({v.tan})"

    def var(self, v: _V, ty: str) -> _V:
        """``v`` as a variable of type ``ty`` (so an expression may name it twice
        without evaluating it twice), carrying its tangent."""
        if not v.is_const and v.ty == ty:
            return v
        return self.emit(ty, self.as_(v, ty), self.tan_as(v, ty) if _CAT[v.ty] == 2 else None)

    # -- values of arguments --
    def value(self, a, what="") -> _V:
        if isinstance(a, torch.fx.Node):
            v = self.env[a]
        else:
            v = a
        if isinstance(v, _Ref):
            return self.load(v, a)
        if isinstance(v, _V):
            return v
        if isinstance(v, bool):
            return _V(_lit(v, "b"), "b", const=v, literal=True)
        if isinstance(v, int):
            return _V(_lit(v, "i64"), "i64", const=v, literal=True)
        if isinstance(v, float):
            return _V(_lit(v, "f64"), "f64", const=v, literal=True)
        raise _unsupported(f"an argument of type {type(v).__name__} ({what})")

    def load(self, ref: _Ref, node) -> _V:
        if ref.numel != 1:
            raise _unsupported(
                f"a whole captured tensor of shape {tuple(ref.shape)} as a value",
                "index it down to one element first (e.g. bias[h, q_idx - kv_idx])",
            )
        t = self.buffers[ref.buf]
        ty = _dtype_ty(t.dtype)
        off = ref.offset if isinstance(ref.offset, str) else str(int(ref.offset))
        return self.emit(ty, f"buf{ref.buf}[uint64({off})]")

    # -- types --
    def meta_ty(self, node) -> str:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise _unsupported(f"{node.target} returning {type(val).__name__}")
        if val.numel() != 1:
            raise _unsupported(
                f"{_opname(node)} producing a tensor of shape {tuple(val.shape)}",
                "a mod must work on one element at a time",
            )
        return _dtype_ty(val.dtype)

    def out_ty(self, node, operands) -> str:
        ty = self.meta_ty(node)
        if ty == "f32" and any(
            isinstance(o, _V) and o.ty == "R" and not o.literal for o in operands
        ):
            return "R"
        return ty

    @staticmethod
    def common_ty(vals) -> str:
        tens = [v.ty for v in vals if not v.literal]
        t = None
        for x in tens:
            t = x if t is None else _promote2(t, x)
        for v in vals:
            if v.literal and (t is None or _CAT[v.ty] > _CAT[t]):
                t = {0: "b", 1: "i64", 2: "f32"}[_CAT[v.ty]]
        return t

    # -- buffers --
    def buffer(self, node) -> _Ref:
        t = getattr(self.gm, node.target)
        if not isinstance(t, torch.Tensor):
            raise _unsupported(f"a captured {type(t).__name__}")
        k = id(t)
        if k not in self.buf_ids:
            self.buf_ids[k] = len(self.buffers)
            self.buffers.append(t)
        return _Ref(self.buf_ids[k], 0, tuple(t.shape))

    # -- walking the graph --
    def run(self):
        out = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                i = len([n for n in self.env if n.op == "placeholder"])
                name = _ARG_NAMES[self.kind][i]
                if name == "s":
                    self.env[node] = _V("s", "R", tan="ds")
                else:
                    self.env[node] = _V(name, "i32")
            elif node.op == "get_attr":
                t = getattr(self.gm, node.target)
                users = list(node.users)
                if (
                    isinstance(t, torch.Tensor)
                    and t.numel() == 1
                    and users
                    and all(_opname(u) == "lift_fresh_copy" for u in users)
                ):
                    # torch.tensor(2.0) written in the mod body (also t[0] with a
                    # Python int index): a literal, not captured state.
                    ty = _dtype_ty(t.dtype)
                    self.env[node] = self.const(t.reshape(()).item(), ty)
                else:
                    self.env[node] = self.buffer(node)
                    if users and all(_opname(u) == "lift_fresh_copy" for u in users):
                        self.literal_buffers.add(self.env[node].buf)
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                out = node.args[0]
            else:
                raise _unsupported(f"a {node.op} node ({node.target})")
        if isinstance(out, (tuple, list)):
            if len(out) != 1:
                raise TypeError(f"{self.kind}_mod must return one tensor, got {len(out)}")
            out = out[0]
        return out

    def call(self, node):
        name = _opname(node)
        handler = _HANDLERS.get(name)
        if handler is None or not isinstance(node.target, torch._ops.OpOverload):
            raise _unsupported(_qualname(node))
        args = _bind(node)
        ins = [self.env.get(a) for a in node.all_input_nodes]
        # A constant of the score's type R (zeros_like(score)) has no value until R
        # is known: its ops become code, which LLVM folds per R.
        if (
            name in _FOLDABLE
            and ins
            and all(isinstance(v, _V) and v.is_const and v.ty != "R" for v in ins)
        ):
            return self.fold(node)
        return handler(self, node, args)

    def fold(self, node):
        """Evaluate an op whose tensor inputs are all trace-time constants with torch
        itself (exact torch semantics for literals)."""
        def real(a):
            if isinstance(a, torch.fx.Node):
                v = self.env[a]
                return torch.tensor(v.const, dtype=a.meta["val"].dtype)
            if isinstance(a, (list, tuple)):
                return type(a)(real(x) for x in a)
            return a

        res = node.target(*real(node.args), **{k: real(v) for k, v in node.kwargs.items()})
        ty = self.meta_ty(node)
        return self.const(res.reshape(()).item(), ty)


def _opname(node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _qualname(node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return f"torch.ops.{t.namespace}.{t._schema.name.split('::')[-1]}.{t._overloadname}"
    return f"{getattr(t, '__module__', '')}.{getattr(t, '__name__', t)}".strip(".")


def _bind(node) -> dict:
    schema = node.target._schema
    out = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


# ----------------------------------------------------------------------- handlers --
_HANDLERS: dict = {}
_FOLDABLE: set = set()


def _op(*names, fold=True):
    def deco(f):
        for n in names:
            _HANDLERS[n] = f
            if fold:
                _FOLDABLE.add(n)
        return f
    return deco


def _zero_tan(ty: str) -> str:
    return _lit(0.0, ty)


def _sum_tans(terms) -> str | None:
    terms = [t for t in terms if t is not None]
    if not terms:
        return None
    return " + ".join(f"({t})" for t in terms)


@_op("add", "sub", "rsub")
def _h_addsub(g: _Gen, node, A):
    name = _opname(node)
    a, b = g.value(A["self"]), g.value(A["other"])
    alpha = A.get("alpha", 1)
    if name == "rsub":  # other - alpha * self
        a, b = b, a
    ty = g.out_ty(node, [a, b])
    if ty == "b":
        if name != "add":
            raise _unsupported("subtraction of bool tensors", "use ^ or logical_xor")
        return g.emit("b", f"({g.as_(a, 'b')} | {g.as_(b, 'b')})")
    sign = "-" if name in ("sub", "rsub") else "+"
    alpha_is_one = alpha is None or alpha == 1
    bx = g.as_(b, ty) if alpha_is_one else f"{_lit(alpha, ty)} * {g.as_(b, ty)}"
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    if tb is not None and not alpha_is_one:
        tb = f"{_lit(alpha, ty)} * {tb}"
    if tb is None:
        tan = ta
    elif ta is None:
        tan = tb if sign == "+" else f"-({tb})"
    else:
        tan = f"{ta} {sign} {tb}"
    return g.emit(ty, f"{g.as_(a, ty)} {sign} {bx}", tan)


@_op("mul")
def _h_mul(g: _Gen, node, A):
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.out_ty(node, [a, b])
    if ty == "b":
        return g.emit("b", f"({g.as_(a, 'b')} & {g.as_(b, 'b')})")
    ax, bx = g.as_(a, ty), g.as_(b, ty)
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    tan = _sum_tans([None if ta is None else f"{ta} * {bx}",
                            None if tb is None else f"{ax} * {tb}"])
    return g.emit(ty, f"{ax} * {bx}", tan)


def _true_div(g: _Gen, node, a: _V, b: _V):
    ty = g.out_ty(node, [a, b])
    ax, bx = g.as_(a, ty), g.as_(b, ty)
    v = g.emit(ty, f"{ax} / {bx}")
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    if g.grad and (ta is not None or tb is not None):
        # d(a/b) = (da - (a/b) db) / b
        num = ta if tb is None else (f"{ta} - {v.expr} * {tb}" if ta is not None
                                     else f"-({v.expr} * {tb})")
        v.tan = g.emit_tan(f"({num}) / {bx}")
    return v


def _floor_of(x: str, ty: str, fn: str = "floor") -> str:
    """floor/ceil/trunc of a float variable ``x`` keeping inf/nan and |x| >= 2**52
    (already integral) as they are: Numba's math.floor returns an int64."""
    inner = {"floor": f"math.floor({x})", "ceil": f"math.ceil({x})",
             "trunc": f"int64({x})", "round": f"round({x})"}[fn]
    return f"({_CAST[ty]}({inner}) if abs({x}) < 4503599627370496.0 else {x})"


def _int_trunc_div(a: str, b: str) -> str:
    # C division from Python's floor division: one more when the signs differ and
    # the division is inexact.
    return f"(({a}) // ({b}) + (1 if ((({a}) % ({b})) != 0) & ((({a}) < 0) != (({b}) < 0)) else 0))"


@_op("div", "true_divide", "floor_divide")
def _h_div(g: _Gen, node, A):
    name = _opname(node)
    a, b = g.value(A["self"]), g.value(A["other"])
    mode = A.get("rounding_mode")
    if name == "floor_divide":
        mode = "floor"
    if mode is None:
        return _true_div(g, node, a, b)
    ty = g.out_ty(node, [a, b])
    ax, bx = g.as_(a, ty), g.as_(b, ty)
    if _CAT[ty] == 1:
        expr = f"{ax} // {bx}" if mode == "floor" else _int_trunc_div(ax, bx)
        return g.emit(ty, expr)
    if ty == "b":
        raise _unsupported("rounding division of bool tensors")
    if mode == "floor":
        # Numba's float // follows Python (fmod-based, exact), like torch's floor_divide
        return g.emit(ty, f"{_CAST[ty]}({ax} // {bx})")
    q = g.emit(ty, f"{ax} / {bx}")
    return g.emit(ty, _floor_of(q.expr, ty, "trunc"))


@_op("remainder", "fmod")
def _h_rem(g: _Gen, node, A):
    name = _opname(node)
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.out_ty(node, [a, b])
    ax, bx = g.as_(a, ty), g.as_(b, ty)
    if ty == "b":
        raise _unsupported(f"{name} of bool tensors")
    if _CAT[ty] == 1:
        if name == "remainder":
            return g.emit(ty, f"{ax} % {bx}")
        return g.emit(ty, f"{ax} - {bx} * {_int_trunc_div(ax, bx)}")
    if name == "remainder":
        v = g.emit(ty, f"{_CAST[ty]}({ax} % {bx})")  # Python's % = torch.remainder
        fn = "floor"
    else:
        # C fmod (sign of the dividend) from Python's %, exact: with both operands
        # non-negative the two agree (Numba has no math.fmod)
        av = g.var(a, ty)
        r = g.emit(ty, f"{_CAST[ty]}(abs({av.expr}) % abs({bx}))")
        v = g.emit(ty, f"-{r.expr} if {av.expr} < 0 else {r.expr}")
        fn = "trunc"
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    if g.grad and (ta is not None or tb is not None):
        terms = [ta]
        if tb is not None:
            qv = g.emit(ty, f"{ax} / {bx}")
            terms.append(f"-({tb} * {_floor_of(qv.expr, ty, fn)})")
        v.tan = g.emit_tan(_sum_tans(terms))
    return v


def _small_power(x: str, e: int) -> str:
    return " * ".join([x] * e)


@_op("pow")
def _h_pow(g: _Gen, node, A):
    ovl = node.target._overloadname
    if ovl == "Scalar":  # python number ** tensor
        base, ex = g.value(A["self"]), g.value(A["exponent"])
        ty = g.out_ty(node, [ex])
        if _CAT[ty] < 2:
            return g.emit(ty, f"int64({g.as_(base, 'i64')}) ** {g.as_(ex, 'i64')}")
        v = g.emit(ty, f"{_CAST[ty]}(math.pow({g.as_(base, ty)}, {g.as_(ex, ty)}))")
        te = g.tan_as(ex, ty)
        if g.grad and te is not None:
            c = float(base.const)
            # torch: d(c**y)/dy = c**y * log(c), and 0 where c == 0 and y >= 0
            if c == 0:
                v.tan = g.emit_tan(f"{_lit(0.0, ty)} if {g.as_(ex, ty)} >= 0 else "
                                   f"{te} * {v.expr} * {_lit(-math.inf, ty)}")
            else:
                logc = math.log(c) if c > 0 else math.nan
                v.tan = g.emit_tan(f"{te} * {v.expr} * {_lit(logc, ty)}")
        return v
    x, ex = g.value(A["self"]), g.value(A["exponent"])
    ty = g.out_ty(node, [x, ex])
    xx = g.as_(x, ty)
    tx = g.tan_as(x, ty)
    if ex.is_const:
        e = ex.const
        if _CAT[ty] < 2:
            e = int(e)
            if e < 0:
                raise _unsupported("integers to negative integer powers")
            expr = _small_power(xx, e) if 0 < e <= 4 else (f"int64({xx}) ** {e}" if e else "1")
            return g.emit(ty, expr)
        e = float(e)
        one = _lit(1.0, ty)
        if e == 0:
            return g.const(1.0, ty)
        if e == int(e) and 1 <= e <= 4:
            expr = _small_power(xx, int(e))
        elif e == int(e) and -2 <= e <= -1:
            expr = f"{one} / ({_small_power(xx, int(-e))})"
        elif e == 0.5:
            expr = f"math.sqrt({xx})"
        elif e == -0.5:
            expr = f"{one} / math.sqrt({xx})"
        else:
            expr = f"{_CAST[ty]}(math.pow({xx}, {_lit(e, ty)}))"
        v = g.emit(ty, expr)
        if g.grad and tx is not None:
            if e == 1:
                d = tx
            elif e == 2:
                d = f"{_lit(2.0, ty)} * {xx} * {tx}"
            else:
                d = f"{_lit(e, ty)} * {_CAST[ty]}(math.pow({xx}, {_lit(e - 1, ty)})) * {tx}"
            v.tan = g.emit_tan(d)
        return v
    # tensor ** tensor
    if _CAT[ty] < 2:
        return g.emit(ty, f"int64({g.as_(x, 'i64')}) ** int64({g.as_(ex, 'i64')})")
    ex_ = g.as_(ex, ty)
    v = g.emit(ty, f"{_CAST[ty]}(math.pow({xx}, {ex_}))")
    te = g.tan_as(ex, ty)
    if g.grad and (tx is not None or te is not None):
        terms = []
        if tx is not None:
            terms.append(f"{ex_} * {_CAST[ty]}(math.pow({xx}, {ex_} - {_lit(1.0, ty)})) * {tx}")
        if te is not None:
            # torch masks the exponent gradient where base == 0 and exponent >= 0
            terms.append(f"({_lit(0.0, ty)} if ({xx} == 0) & ({ex_} >= 0) else "
                         f"{te} * {v.expr} * {_CAST[ty]}(math.log({xx})))")
        v.tan = g.emit_tan(_sum_tans(terms))
    return v


_CMP = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


@_op(*_CMP)
def _h_cmp(g: _Gen, node, A):
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.common_ty([a, b])
    return g.emit("b", f"{g.as_(a, ty)} {_CMP[_opname(node)]} {g.as_(b, ty)}")


@_op("logical_and", "logical_or", "logical_xor")
def _h_logical(g: _Gen, node, A):
    a, b = g.value(A["self"]), g.value(A["other"])
    op = {"logical_and": "&", "logical_or": "|", "logical_xor": "^"}[_opname(node)]
    return g.emit("b", f"{g.as_(a, 'b')} {op} {g.as_(b, 'b')}")


@_op("logical_not")
def _h_lnot(g: _Gen, node, A):
    a = g.value(A["self"])
    return g.emit("b", f"not {g.as_(a, 'b')}")


@_op("bitwise_and", "bitwise_or", "bitwise_xor", "__and__", "__or__", "__xor__")
def _h_bitwise(g: _Gen, node, A):
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.out_ty(node, [a, b])
    if _CAT[ty] == 2:
        raise _unsupported(f"{_opname(node)} on floating-point values")
    op = {"and": "&", "or": "|", "xor": "^"}[_opname(node).strip("_").split("_")[-1]]
    return g.emit(ty, f"{g.as_(a, ty)} {op} {g.as_(b, ty)}")


@_op("bitwise_not")
def _h_bnot(g: _Gen, node, A):
    a = g.value(A["self"])
    ty = g.out_ty(node, [a])
    if ty == "b":
        return g.emit("b", f"not {a.expr}")
    if _CAT[ty] == 1:
        return g.emit(ty, f"~{g.as_(a, ty)}")
    raise _unsupported("bitwise_not on floating-point values")


@_op("where")
def _h_where(g: _Gen, node, A):
    c = g.value(A["condition"])
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.out_ty(node, [a, b])
    cx = g.as_(c, "b")
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    tan = None
    if ta is not None or tb is not None:
        z = _zero_tan(ty)
        tan = f"{ta or z} if {cx} else {tb or z}"
    return g.emit(ty, f"{g.as_(a, ty)} if {cx} else {g.as_(b, ty)}", tan)


def _clamp_expr(x: str, lo: str | None, hi: str | None) -> str:
    # torch.clamp = min(max(x, lo), hi) with NaN x staying NaN: compare-and-select
    e = x
    if lo is not None:
        e = f"({lo} if {x} < {lo} else {x})"
    if hi is not None:
        e = f"({hi} if {e} > {hi} else {e})"
    return e


@_op("clamp", "clip", "clamp_min", "clamp_max")
def _h_clamp(g: _Gen, node, A):
    name = _opname(node)
    x = g.value(A["self"])
    lo = A.get("min")
    hi = A.get("max")
    if name == "clamp_min":
        hi = None
    if name == "clamp_max":
        lo, hi = None, A.get("max")
    lo = None if lo is None else g.value(lo)
    hi = None if hi is None else g.value(hi)
    ty = g.out_ty(node, [v for v in (x, lo, hi) if v is not None])
    xx = g.as_(x, ty)
    lox = None if lo is None else g.as_(lo, ty)
    hix = None if hi is None else g.as_(hi, ty)
    v = g.emit(ty, _clamp_expr(xx, lox, hix))
    if g.grad and _CAT[ty] == 2:
        tx = g.tan_as(x, ty)
        tlo = None if lo is None else g.tan_as(lo, ty)
        thi = None if hi is None else g.tan_as(hi, ty)
        if tx is not None or tlo is not None or thi is not None:
            z = _zero_tan(ty)
            # torch: the input's gradient passes where lo <= x <= hi (bounds included)
            inside = " & ".join([c for c in (
                None if lox is None else f"({xx} >= {lox})",
                None if hix is None else f"({xx} <= {hix})") if c] or ["True"])
            e = f"{tx or z} if {inside} else {z}"
            if tlo is not None:
                e = f"{tlo} if {xx} < {lox} else ({e})"
            if thi is not None:
                e = f"{thi} if {xx} > {hix} else ({e})"
            v.tan = g.emit_tan(e)
    return v


@_op("minimum", "maximum", "fmin", "fmax", "min", "max")
def _h_minmax(g: _Gen, node, A):
    name = _opname(node)
    if name in ("min", "max") and node.target._overloadname not in ("other",):
        raise _unsupported(_qualname(node), "reductions are not elementwise")
    a, b = g.value(A["self"]), g.value(A["other"])
    ty = g.out_ty(node, [a, b])
    ax, bx = g.as_(a, ty), g.as_(b, ty)
    is_min = name in ("minimum", "fmin", "min")
    lt = "<" if is_min else ">"
    if ty == "b":
        return g.emit("b", f"{ax} {'&' if is_min else '|'} {bx}")
    if _CAT[ty] == 1:
        return g.emit(ty, f"{ax} if {ax} {lt} {bx} else {bx}")
    if name in ("fmin", "fmax"):  # NaN is ignored unless both are NaN
        expr = f"{bx} if {ax} != {ax} else ({ax} if ({bx} != {bx}) | ({ax} {lt} {bx}) else {bx})"
    else:  # NaN propagates from either side
        expr = f"{ax} if ({ax} {lt} {bx}) | ({ax} != {ax}) else {bx}"
    v = g.emit(ty, expr)
    ta, tb = g.tan_as(a, ty), g.tan_as(b, ty)
    if g.grad and (ta is not None or tb is not None):
        z = _zero_tan(ty)
        ta_, tb_ = ta or z, tb or z
        gt = ">" if is_min else "<"
        # torch's forward derivative: ties give the mean of both tangents
        v.tan = g.emit_tan(f"{ta_} if {ax} {lt} {bx} else ({tb_} if {ax} {gt} {bx} else "
                           f"({ta_} + {tb_}) * {_lit(0.5, ty)})")
    return v


@_op("neg")
def _h_neg(g: _Gen, node, A):
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    tx = g.tan_as(x, ty)
    return g.emit(ty, f"-{g.as_(x, ty)}", None if tx is None else f"-{tx}")


@_op("abs")
def _h_abs(g: _Gen, node, A):
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    if ty == "b":
        return x
    xx = g.as_(x, ty)
    tx = g.tan_as(x, ty)
    tan = None
    if tx is not None:  # abs'(0) = 0 as in torch (sgn(0) = 0)
        z = _zero_tan(ty)
        tan = f"{tx} if {xx} > 0 else (-{tx} if {xx} < 0 else {z})"
    return g.emit(ty, f"abs({xx})", tan)


@_op("sign", "sgn")
def _h_sign(g: _Gen, node, A):
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    if ty == "b":
        return x
    xx = g.as_(x, ty)
    # torch.sign(nan) is 0
    return g.emit(ty, f"{_lit(1, ty)} if {xx} > 0 else ({_lit(-1, ty)} if {xx} < 0 else "
                      f"{_lit(0, ty)})")


@_op("relu")
def _h_relu(g: _Gen, node, A):
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    xx = g.as_(x, ty)
    z = _lit(0, ty)
    tx = g.tan_as(x, ty)
    tan = None if tx is None else f"{tx} if {xx} > 0 else {_zero_tan(ty)}"
    return g.emit(ty, f"{xx} if {xx} > 0 else ({xx} if {xx} != {xx} else {z})", tan)


@_op("floor", "ceil", "trunc", "round", "fix")
def _h_round(g: _Gen, node, A):
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    if _CAT[ty] < 2:
        return x
    if A.get("decimals"):
        raise _unsupported("round(decimals=...)")
    fn = {"fix": "trunc"}.get(_opname(node), _opname(node))
    xv = g.var(x, ty)
    return g.emit(ty, _floor_of(xv.expr, ty, fn))


# Unary float functions: (value template, derivative template or None) in terms of
# X (the argument), V (the result) and T(c) (a constant of the value's type).
_UNARY = {
    "exp": ("_exp_{T}(X)", "V"),
    "exp2": ("math.pow(T(2.0), X)", "V * T(0.6931471805599453)"),
    "expm1": ("math.expm1(X)", "V + T(1.0)"),
    "log": ("math.log(X)", "T(1.0) / X"),
    "log2": ("math.log2(X)", "T(1.4426950408889634) / X"),
    "log10": ("math.log10(X)", "T(0.4342944819032518) / X"),
    "log1p": ("math.log1p(X)", "T(1.0) / (X + T(1.0))"),
    "sqrt": ("math.sqrt(X)", "T(1.0) / (T(2.0) * V)"),
    "rsqrt": ("T(1.0) / math.sqrt(X)", "T(-0.5) * V * V * V"),
    "reciprocal": ("T(1.0) / X", "-(V * V)"),
    "square": ("X * X", "T(2.0) * X"),
    "sin": ("math.sin(X)", "math.cos(X)"),
    "cos": ("math.cos(X)", "-math.sin(X)"),
    "tan": ("math.tan(X)", "T(1.0) + V * V"),
    "atan": ("math.atan(X)", "T(1.0) / (T(1.0) + X * X)"),
    "sinh": ("math.sinh(X)", "math.cosh(X)"),
    "cosh": ("math.cosh(X)", "math.sinh(X)"),
    "tanh": ("_tanh_{T}(X)", "T(1.0) - V * V"),
    "sigmoid": ("T(1.0) / (T(1.0) + _exp_{T}(-X))", "V * (T(1.0) - V)"),
    "erf": ("math.erf(X)", "T(1.1283791670955126) * _exp_{T}(-(X * X))"),
}


def _fill(tpl: str, ty: str, **names) -> str:
    import re

    def lit(m):
        return _lit(float(m.group(1)), ty)

    s = re.sub(r"\bT\(([-0-9.e]+)\)", lit, tpl)
    s = s.replace("{T}", {"R": "R", "f32": "f32", "f64": "f64"}[ty])
    for k, v in names.items():
        s = re.sub(rf"\b{k}\b", v, s)
    return s


@_op(*_UNARY)
def _h_unary(g: _Gen, node, A):
    name = _opname(node)
    x = g.value(A["self"])
    ty = g.out_ty(node, [x])
    if name == "square" and _CAT[ty] < 2:
        ty = "i64" if ty == "b" else ty
        xx = g.as_(x, ty)
        return g.emit(ty, f"{xx} * {xx}")
    if _CAT[ty] < 2:
        ty = "f32"
    xv = g.var(x, ty)
    vt, dt = _UNARY[name]
    v = g.emit(ty, f"{_CAST[ty]}({_fill(vt, ty, X=xv.expr)})")
    if g.grad and xv.tan is not None:
        v.tan = g.emit_tan(f"{_CAST[ty]}({_fill(dt, ty, X=xv.expr, V=v.expr)}) * {xv.tan}")
    return v


@_op("isnan", "isinf", "isfinite", "isposinf", "isneginf")
def _h_isx(g: _Gen, node, A):
    x = g.value(A["self"])
    if _CAT[x.ty] < 2:
        return g.const(_opname(node) == "isfinite", "b")
    e = x.expr
    return g.emit("b", {
        "isnan": f"{e} != {e}",
        "isinf": f"abs({e}) == math.inf",
        "isfinite": f"abs({e}) < math.inf",
        "isposinf": f"{e} == math.inf",
        "isneginf": f"{e} == -math.inf",
    }[_opname(node)])


def _cast_to(g: _Gen, node, x: _V, ty: str) -> _V:
    if x.is_const:
        return g.const(x.const if ty != "b" else x.const != 0, ty)
    if x.ty == ty:
        return x
    tan = None
    if _CAT[ty] == 2 and _CAT[x.ty] == 2:
        tan = g.tan_as(x, ty)
    if _CAT[ty] == 1 and _CAT[x.ty] == 2:
        # torch casts float to int by truncation; nan / inf give an unspecified value
        # there and here alike
        return g.emit(ty, f"{_CAST[ty]}({x.expr})")
    return g.emit(ty, g.as_(x, ty), tan)


@_op("_to_copy", "to", "type_as", "convert_element_type")
def _h_to(g: _Gen, node, A):
    src = A.get("self", A.get("a"))
    ref = g.env.get(src) if isinstance(src, torch.fx.Node) else None
    if isinstance(ref, _Ref) and ref.numel != 1:
        raise _unsupported(f"{_qualname(node)} on a whole captured tensor",
                           "convert it outside the mod")
    x = g.value(src)
    dtype = A.get("dtype")
    if _opname(node) == "type_as" or node.target._overloadname == "other":
        dtype = node.meta["val"].dtype
    if dtype is None:
        ty = g.out_ty(node, [x])
        return _cast_to(g, node, x, ty)
    return _cast_to(g, node, x, _dtype_ty(dtype))


@_op("scalar_tensor", "full", "ones", "zeros")
def _h_const(g: _Gen, node, A):
    ty = g.meta_ty(node)
    name = _opname(node)
    value = {"ones": 1, "zeros": 0}.get(name)
    if value is None:
        value = A.get("s", A.get("fill_value"))
    if isinstance(value, torch.fx.Node):
        raise _unsupported(f"{name} with a traced value")
    return g.const(value, ty)


@_op("ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full", fold=False)
def _h_like(g: _Gen, node, A):
    name = _opname(node)
    ty = g.meta_ty(node)
    src = A.get("self")
    if A.get("dtype") is None and name.endswith("_like") and isinstance(src, torch.fx.Node):
        s = g.env.get(src)
        if isinstance(s, _V) and s.ty == "R":
            ty = "R"
    value = {"ones": 1, "zeros": 0}.get(name.replace("new_", "").replace("_like", ""))
    if value is None:
        value = A.get("fill_value")
    if isinstance(value, torch.fx.Node):
        raise _unsupported(f"{name} with a traced value")
    if ty == "R":
        return _V(_lit(value, "R"), "R", const=float(value))
    return g.const(value, ty)


_VIEWS = ("lift_fresh_copy", "clone", "alias", "detach", "view", "reshape",
          "_unsafe_view", "squeeze", "unsqueeze", "expand", "contiguous", "flatten",
          "expand_as", "view_as", "reshape_as", "positive", "lift_fresh")


@_op(*_VIEWS, fold=False)
def _h_view(g: _Gen, node, A):
    src = A.get("self")
    v = g.env[src] if isinstance(src, torch.fx.Node) else g.value(src)
    if isinstance(v, _Ref):
        if _opname(node) in ("expand", "expand_as"):
            raise _unsupported(f"{_qualname(node)} on a captured tensor")
        shape = tuple(node.meta["val"].shape)
        return _Ref(v.buf, v.offset, shape)
    g.meta_ty(node)  # a view of a scalar must stay a scalar
    return v


def _norm_index(g: _Gen, idx: _V, n: int):
    """Index into a dimension of size n: wrap a negative index once, as torch does,
    then clamp (torch raises on out-of-range indices; a kernel cannot)."""
    if n == 0:
        raise ValueError("a mod indexes a captured tensor with an empty dimension: "
                         "every index is out of range")
    if idx.ty == "b" or _CAT[idx.ty] == 2:
        raise _unsupported(f"indexing with a {'bool' if idx.ty == 'b' else 'float'} "
                           "value", "indices must be integers")
    if idx.is_const:
        i = int(idx.const)
        i = i + n if i < 0 else i
        return min(max(i, 0), n - 1)
    if n == 1:
        return 0
    x = idx.expr
    return g.emit("i64", f"min(max({x} + {n} if {x} < 0 else {x}, 0), {n - 1})").expr


def _advance(g: _Gen, ref: _Ref, indices) -> _Ref:
    shape = ref.shape
    if len(indices) > len(shape):
        raise IndexError(f"too many indices ({len(indices)}) for a captured tensor of "
                         f"shape {tuple(shape)}")
    const_off = ref.offset if isinstance(ref.offset, int) else 0
    terms = [] if isinstance(ref.offset, int) else [ref.offset]
    for k, idx in enumerate(indices):
        stride = math.prod(shape[k + 1:])
        i = _norm_index(g, idx, shape[k])
        if isinstance(i, int):
            const_off += i * stride
        else:
            terms.append(i if stride == 1 else f"{i} * {stride}")
    if not terms:
        off = const_off
    else:
        if const_off:
            terms.append(str(const_off))
        off = terms[0] if len(terms) == 1 else g.emit("i64", " + ".join(terms)).expr
    return _Ref(ref.buf, off, tuple(shape[len(indices):]))


@_op("index", fold=False)
def _h_index(g: _Gen, node, A):
    base = g.env.get(A["self"])
    if not isinstance(base, _Ref):
        raise _unsupported("indexing a computed value", "index captured tensors only")
    idxs = []
    for a in A["indices"]:
        if a is None:
            raise _unsupported("slicing (`:` or None) in an index",
                               "index every leading dimension with a scalar")
        idxs.append(g.value(a))
    ref = _advance(g, base, idxs)
    return g.load(ref, node) if not ref.shape else ref


@_op("select", fold=False)
def _h_select(g: _Gen, node, A):
    base = g.env.get(A["self"])
    if not isinstance(base, _Ref):
        raise _unsupported("selecting from a computed value")
    dim = A["dim"]
    if dim < 0:
        dim += len(base.shape)
    if dim != 0:
        raise _unsupported(f"{_qualname(node)} along dimension {A['dim']}",
                           "index leading dimensions in order, e.g. t[i, j]")
    ref = _advance(g, base, [g.value(A["index"])])
    return g.load(ref, node) if not ref.shape else ref


def supported_ops() -> list[str]:
    """The aten operator packets a mod may use (``min`` / ``max`` only as the
    elementwise two-tensor form, ``pow`` with tensor or scalar base / exponent)."""
    return sorted(_HANDLERS)


# --------------------------------------------------------------------------- sources --
def _function_text(g: _Gen, out, name: str, with_grad: bool) -> str:
    params = list(_ARG_NAMES[g.kind]) + [f"buf{i}" for i in range(len(g.buffers))]
    lines = [f"def {name}({', '.join(params)}):"]
    # The indices are int32 in torch's trace (and in FlexAttention's kernels); the
    # callers pass int64.
    lines += [f"    {p} = int32({p})" for p in _ARG_NAMES[g.kind] if p != "s"]
    if with_grad:
        lines.append("    ds = R(1.0)")
    for text, tan_only in g.lines:
        if tan_only and not with_grad:
            continue
        lines.append("    " + text)
    v = g.value(out) if not isinstance(out, torch.fx.Node) else g.env[out]
    if g.kind == "mask":
        lines.append(f"    return {g.as_(v, 'b')}")
    else:
        val = g.as_(v, "R")
        tan = g.tan_as(v, "R") if _CAT[v.ty] == 2 else None
        if with_grad:
            lines.append(f"    return {val}, {tan if tan is not None else 'R(0.0)'}")
        else:
            lines.append(f"    return {val}")
    return "\n".join(lines) + "\n"


def _generate(fn, kind: str):
    gm = _trace_graph(fn, kind)
    g = _Gen(gm, kind)
    try:
        out = g.run()
        if isinstance(out, torch.fx.Node):
            val = g.env[out]
            if isinstance(val, _Ref):
                val = g.load(val, out)
                g.env[out] = val
        else:
            val = g.value(out, "the returned value")
        if kind == "mask" and val.ty != "b":
            what = "an integer" if _CAT[val.ty] == 1 else "a floating-point"
            raise TypeError(
                f"mask_mod must return a bool tensor (True = attend), got {what} "
                "tensor; compare it, e.g. `... != 0`"
            )
        # Final assignment so the returned value is a plain name in the source
        if isinstance(out, torch.fx.Node):
            g.env[out] = val
        else:
            out = val
    except _Untranslatable as e:
        raise NotImplementedError(f"{kind}_mod: {e}") from None
    if kind == "mask":
        src = _function_text(g, out, "mask_elem", False)
        fn_name, grad_name = "mask_elem", None
    else:
        src = _function_text(g, out, "score_elem", False) + "\n\n" + _function_text(
            g, out, "score_grad_elem", True)
        fn_name, grad_name = "score_elem", "score_grad_elem"
    is_identity = kind == "score" and isinstance(out, torch.fx.Node) and out.op == "placeholder"
    is_all_true = kind == "mask" and val.is_const and bool(val.const)
    return src, fn_name, grad_name, g.buffers, g.literal_buffers, is_identity, is_all_true


def _kernel_buffer(t: torch.Tensor) -> torch.Tensor:
    """The tensor as kernels read it: detached, contiguous, and of a dtype Numba
    loads (float16/bfloat16 widen to float32, wide unsigned to int64)."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif t.dtype in (torch.uint16, torch.uint32, torch.uint64):
        t = t.to(torch.int64)
    elif t.is_complex():
        raise NotImplementedError(f"captured complex tensors ({t.dtype}) are not supported")
    return t.contiguous()


def _build(fn, kind: str) -> CompiledMod:
    src, fn_name, grad_name, bufs, literal, is_id, all_true = _generate(fn, kind)
    kernel_bufs = []
    copied = []
    for t in bufs:
        kb = _kernel_buffer(t)
        kernel_bufs.append(kb)
        if kb.data_ptr() != t.data_ptr() or kb.dtype != t.dtype:
            copied.append((t, t._version))
    key = (
        kind,
        src,
        tuple((str(b.dtype), b.dim(), tuple(b.shape)) for b in kernel_bufs),
    )
    return CompiledMod(
        kind=kind,
        source=src,
        fn_name=fn_name,
        buffers=tuple(kernel_bufs),
        key=key,
        requires_grad_buffers=tuple(i for i, t in enumerate(bufs) if t.requires_grad),
        is_identity=is_id,
        is_all_true=all_true,
        grad_fn_name=grad_name,
        _copied_from=tuple(copied),
    ), bufs, literal


# ----------------------------------------------------------------------- trace cache --
_TRACE_CACHE: OrderedDict = OrderedDict()
_TRACE_CACHE_SIZE = 256
_LOCK = threading.RLock()


def _trace_cached(fn, kind: str) -> CompiledMod:
    _check_signature(fn, kind)
    try:
        cap = _captured(fn)
        ck = (kind, fn, tuple(c[:2] if c[0] == "T" else c for c in cap))
        hash(ck)
    except TypeError:
        ck = None
    if ck is not None:
        with _LOCK:
            hit = _TRACE_CACHE.get(ck)
            if hit is not None:
                compiled, tensors = hit
                now = [c[2] for c in cap if c[0] == "T"]
                fresh = len(now) == len(tensors) and all(a is b for a, b in zip(tensors, now))
                fresh = fresh and all(t._version == v for t, v in compiled._copied_from)
                if fresh:
                    _TRACE_CACHE.move_to_end(ck)
                    return compiled
                del _TRACE_CACHE[ck]
    compiled, bufs, literal = _build(fn, kind)
    if ck is not None:
        found = {id(c[2]) for c in cap if c[0] == "T"}
        # Cache only when every buffer was reachable from what the key watches: a
        # tensor the mod reaches some other way could be replaced unnoticed.
        if all(id(t) in found or i in literal for i, t in enumerate(bufs)):
            with _LOCK:
                _TRACE_CACHE[ck] = (compiled, [c[2] for c in cap if c[0] == "T"])
                while len(_TRACE_CACHE) > _TRACE_CACHE_SIZE:
                    _TRACE_CACHE.popitem(last=False)
    return compiled


def trace_mask_mod(mask_mod) -> CompiledMod:
    """Trace ``mask_mod(b, h, q_idx, kv_idx) -> bool`` into a :class:`CompiledMod`.

    Cached on the function object and the identity of the tensors (and values of the
    scalars) it captures, so calling again is cheap and a closure over a new tensor
    is re-traced. Raises ``TypeError`` for a wrong signature or value-dependent Python
    control flow and ``NotImplementedError`` naming an op that cannot be compiled.
    """
    return _trace_cached(mask_mod, "mask")


def trace_score_mod(score_mod) -> CompiledMod:
    """Trace ``score_mod(score, b, h, q_idx, kv_idx)`` into a :class:`CompiledMod`
    (see :func:`trace_mask_mod`); its source also has the derivative w.r.t. score."""
    return _trace_cached(score_mod, "score")


# ------------------------------------------------------ fast float32 math (CPU only) --
# exp: n = round(x / ln 2) by the 1.5 * 2**23 trick (adding it pushes the fraction
# out of the mantissa, whose low bits then hold n), r = x - n ln 2 in two parts (the
# high part has 9 significant bits, so n * _LN2_HI is exact), e^r = 1 + r + r^2 P(r)
# with P fitted (Lawson-weighted least squares on Chebyshev nodes, relative error
# 3e-9 on |r| <= ln2 / 2), and 2**n applied in two halves so that n in [-150, 128]
# (the whole clamped range) never overflows the exponent field: results below
# float32's range round to 0 and above it to inf through the multiplications.
_MAGIC = np.float32(12582912.0)
_MAGIC_BITS = np.int32(np.float32(12582912.0).view(np.int32))
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_E0 = np.float32(0.49999993450796776)
_E1 = np.float32(0.1666652068090365)
_E2 = np.float32(0.041668387544616894)
_E3 = np.float32(0.00836871065473782)
_E4 = np.float32(0.0013814604480300678)
_F_ONE = np.float32(1.0)
_I1 = np.int32(1)
_I23 = np.int32(23)
_I127 = np.int32(127)
_F_LO = np.float32(-104.0)
_F_HI = np.float32(89.0)


@njit(error_model="numpy", cache=True)
def _fast_exp_f32(x):
    xc = min(max(float32(x), _F_LO), _F_HI)
    t = xc * _LOG2E + _MAGIC
    fn = t - _MAGIC
    n = np.int32(np.float32(t).view(np.int32) - _MAGIC_BITS)
    r = (xc - fn * _LN2_HI) - fn * _LN2_LO
    p = _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _E1
    p = p * r + _E0
    p = (_F_ONE + r) + (r * r) * p
    n1 = n >> _I1
    s1 = np.int32((n1 + _I127) << _I23).view(np.float32)
    s2 = np.int32((n - n1 + _I127) << _I23).view(np.float32)
    y = (p * s1) * s2
    return y if x == x else float32(x)


# tanh(x) = x P(x^2) / Q(x^2) on |x| <= 10 (beyond, tanh rounds to +-1 in float32),
# P and Q of degree 4 with P(0) = Q(0) = 1 (so tiny x and -0 come back exactly),
# fitted like exp above: 5.6e-8 relative error in exact arithmetic, a few ulp in
# float32 Horner evaluation.
_TP = [np.float32(c) for c in (0.13317777845216605, 0.00342085370766297,
                               1.940121253412026e-05, 1.1736778684134515e-08)]
_TQ = [np.float32(c) for c in (0.46651082111347136, 0.025591598563949346,
                               0.00031642726657097687, 7.101768309823147e-07)]
_TP1, _TP2, _TP3, _TP4 = _TP
_TQ1, _TQ2, _TQ3, _TQ4 = _TQ
_F_TEN = np.float32(10.0)


@njit(error_model="numpy", cache=True)
def _fast_tanh_f32(x):
    xc = min(max(float32(x), -_F_TEN), _F_TEN)
    u = xc * xc
    p = _TP4
    p = p * u + _TP3
    p = p * u + _TP2
    p = p * u + _TP1
    p = p * u + _F_ONE
    q = _TQ4
    q = q * u + _TQ3
    q = q * u + _TQ2
    q = q * u + _TQ1
    q = q * u + _F_ONE
    y = min(max(xc * p / q, -_F_ONE), _F_ONE)
    return y if x == x else float32(x)


# ------------------------------------------------------------ module text (headers) --
def _header(dtype: torch.dtype, fast: bool, target: str) -> str:
    real = {torch.float32: "float32", torch.float64: "float64"}.get(dtype)
    if real is None:
        raise TypeError(f"tile dtype must be torch.float32 or torch.float64, got {dtype}")
    lines = [
        "import math",
        "from numba import float32, float64, int8, int16, int32, int64, uint8, uint64",
    ]
    if target == "cpu" and fast:
        lines.append("from attn._modgen import _fast_exp_f32, _fast_tanh_f32")
        f32 = ("_fast_exp_f32", "_fast_tanh_f32")
    else:
        f32 = ("math.exp", "math.tanh")
    rr = f32 if real == "float32" else ("math.exp", "math.tanh")
    lines += [
        f"R = {real}",
        f"_exp_f32 = {f32[0]}",
        f"_tanh_f32 = {f32[1]}",
        "_exp_f64 = math.exp",
        "_tanh_f64 = math.tanh",
        f"_exp_R = {rr[0]}",
        f"_tanh_R = {rr[1]}",
    ]
    return "\n".join(lines) + "\n\n\n"


def element_function_source(compiled: CompiledMod, dtype: torch.dtype = torch.float32) -> str:
    """Self-contained Python source of the element function(s) for Numba's CUDA
    target (or its simulator): ``import math``, the numba scalar types as casts, and
    the score's real type ``R`` bound to ``dtype``. It holds ``compiled.fn_name``
    (and ``compiled.grad_fn_name`` for a score); exec it and pass those functions to
    ``numba.cuda.jit(device=True)``. ``bufK`` arguments are 1-D arrays (the K-th
    buffer of ``compiled.buffers`` flattened)."""
    return _header(dtype, fast=False, target="gpu") + compiled.source


# ------------------------------------------------------------ CPU module generation --
# Elements per staged chunk of a tile row (see _cpu_text): covers a whole 64- or
# 128-wide tile row at once; 256 doubles x 2 arrays is 4 KiB of stack.
_CHUNK = 256


def _make_stack_buffer():
    from numba.core import cgutils, types
    from numba.extending import intrinsic

    @intrinsic
    def _stack_buffer(typingctx, n, dtype):
        """A pointer to ``n`` (a literal) elements of ``dtype`` on the stack of the
        calling jitted function (an LLVM alloca in its entry block)."""
        if not isinstance(n, types.IntegerLiteral):
            return None
        if isinstance(dtype, types.NumberClass):
            el = dtype.instance_type
        elif isinstance(dtype, types.DType):
            el = dtype.dtype
        else:
            return None
        count = n.literal_value

        def codegen(context, builder, signature, args):
            return cgutils.alloca_once(builder, context.get_data_type(el), size=count)

        return types.CPointer(el)(n, dtype), codegen

    return _stack_buffer


_stack_buffer = _make_stack_buffer()

_PTR = {torch.float32: "float32", torch.float64: "float64"}
_NP_OF = {
    torch.bool: "np.bool_", torch.int8: "np.int8", torch.uint8: "np.uint8",
    torch.int16: "np.int16", torch.int32: "np.int32", torch.int64: "np.int64",
    torch.float32: "np.float32", torch.float64: "np.float64",
}


def _cpu_text(compiled: CompiledMod, dtype: torch.dtype, cache: bool) -> str:
    fast = compiled.kind == "score"
    nb = len(compiled.buffers)
    bnames = "".join(f", buf{i}" for i in range(nb))
    loads = "".join(
        f"    buf{i} = carray(bufs[{i}], ({max(b.numel(), 1)},), {_NP_OF[b.dtype]})\n"
        for i, b in enumerate(compiled.buffers)
    )
    c = "True" if cache else "False"
    real = _PTR[dtype]
    real_np = f"np.{real}"
    # 'contract' lets LLVM fuse a*b+c into FMAs in score tiles (one rounding instead of
    # two); masks stay unfused so a mask decides exactly as its scalar evaluation.
    fm = "fastmath={'contract'}, " if compiled.kind == "score" else ""
    jit = f"njit(error_model='numpy', {fm}cache={c})"
    parts = [
        "# Generated by attn._modgen: a mod's element functions, CPU tile callbacks\n"
        "# and block-mask drivers. Content-addressed; do not edit.\n",
        "import numpy as np",
        "from numba import njit, cfunc, carray, prange, types",
        "from attn._modgen import _stack_buffer",
        _header(dtype, fast=fast, target="cpu"),
        compiled.source,
    ]
    parts.append(f"{compiled.fn_name} = {jit}({compiled.fn_name})")
    if compiled.grad_fn_name:
        parts.append(f"{compiled.grad_fn_name} = {jit}({compiled.grad_fn_name})")
    i64 = "types.int64"
    P = f"types.CPointer(types.{real})"
    parts.append(
        f"SIG = types.void({i64}, {i64}, {i64}, {i64}, {i64}, {i64}, {P}, {i64}, {i64}, "
        "types.CPointer(types.voidptr))\n"
        f"SIG_GRAD = types.void({i64}, {i64}, {i64}, {i64}, {i64}, {i64}, {P}, {P}, {i64}, "
        f"{i64}, types.CPointer(types.voidptr))\n"
    )

    # Staging: an element function that reads buffers at computed indices does
    # gathers, and LLVM will not vectorise a loop that gathers from one pointer and
    # stores through another it cannot prove distinct (S). So such tiles first
    # compute a chunk of a row into a stack array (an alloca aliases nothing), then
    # write it to S; both loops vectorise. Without buffers one loop suffices.
    staged = nb > 0
    if compiled.kind == "mask":
        tiles = {"mask": ("SIG", "_mask_tile", "S", [("m", "np.bool_")],
                          [f"m[u] = mask_elem(b, h, q, kv{bnames})"],
                          ["S[o] = S[o] if m[u] else ninf"],
                          [f"S[o] = S[o] if mask_elem(b, h, q, kv{bnames}) else ninf"])}
    else:
        tiles = {
            # The value tile calls the value-and-derivative function and drops the
            # derivative: LLVM deletes the unused tangent code after inlining, and
            # each module compiles one element function instead of two.
            "score": ("SIG", "_score_tile", "S", [("w", real_np)],
                      [f"w[u] = score_grad_elem(S[o], b, h, q, kv{bnames})[0]"],
                      ["S[o] = w[u]"],
                      [f"S[o] = score_grad_elem(S[o], b, h, q, kv{bnames})[0]"]),
            "score_grad": ("SIG_GRAD", "_score_grad_tile", "S, G",
                           [("w", real_np), ("dw", real_np)],
                           [f"w[u], dw[u] = score_grad_elem(S[o], b, h, q, kv{bnames})"],
                           ["S[o] = w[u]", "G[o] = dw[u]"],
                           [f"v, d = score_grad_elem(S[o], b, h, q, kv{bnames})",
                            "S[o] = v", "G[o] = d"]),
        }
    for fname, ptrs, temps, stage, apply, direct in (t[1:] for t in tiles.values()):
        text = [f"def {fname}(b, h, q0, nq, k0, nk, {ptrs}, ld, q_major, bufs):", loads]
        if compiled.kind == "mask":
            text.append("    ninf = R(-math.inf)")
        if staged:
            for t, npdt in temps:
                text.append(f"    {t} = carray(_stack_buffer({_CHUNK}, {npdt}), ({_CHUNK},))")
        # The contiguous index runs innermost in both layouts, so it vectorises.
        for flag, outer, inner, n_in, qexpr, kexpr in (
            ("if q_major:", "i", "j", "nk", "q0 + i", "k0 + c + u"),
            ("else:", "j", "i", "nq", "q0 + c + u", "k0 + j"),
        ):
            n_out = "nq" if outer == "i" else "nk"
            text.append(f"    {flag}")
            text.append(f"        for {outer} in range({n_out}):")
            text.append(f"            base = {outer} * ld")
            if staged:
                text.append(f"            for c in range(0, {n_in}, {_CHUNK}):")
                text.append(f"                n = min({_CHUNK}, {n_in} - c)")
                text.append("                for u in range(n):")
                text.append(f"                    q = {qexpr}")
                text.append(f"                    kv = {kexpr}")
                text.append("                    o = base + c + u")
                text += [f"                    {x}" for x in stage]
                text.append("                for u in range(n):")
                text.append("                    o = base + c + u")
                text += [f"                    {x}" for x in apply]
            else:
                text.append(f"            for {inner} in range({n_in}):")
                text.append(f"                q = {qexpr.replace('c + u', 'i')}")
                text.append(f"                kv = {kexpr.replace('c + u', 'j')}")
                text.append(f"                o = base + {inner}")
                text += [f"                {x}" for x in direct]
        parts.append("\n".join(x for x in text if x) + "\n")
    parts.append(
        "def build_tiles():\n    return {\n"
        + "".join(
            f"        '{name}': cfunc({sig}, error_model='numpy', {fm}cache={c})({fname}),\n"
            for name, (sig, fname, *_rest) in tiles.items()
        )
        + "    }\n"
    )
    if compiled.kind == "mask":
        parts.append(_driver_text(bnames, c))
    return "\n".join(parts) + "\n"


def _driver_text(bnames: str, c: str) -> str:
    return f'''
@njit(parallel=True, error_model='numpy', cache={c})
def block_classes(B, H, Lq, Lk, BQ, BKV, full, partial{bnames}):
    nqb = (Lq + BQ - 1) // BQ
    nkb = (Lk + BKV - 1) // BKV
    for t in prange(B * H * nqb):
        qb = t % nqb
        bh = t // nqb
        h = bh % H
        b = bh // H
        q_lo = qb * BQ
        q_hi = min(q_lo + BQ, Lq)
        for kb in range(nkb):
            k_lo = kb * BKV
            k_hi = min(k_lo + BKV, Lk)
            seen = 0
            hits = 0
            for q in range(q_lo, q_hi):
                c = 0
                for kv in range(k_lo, k_hi):
                    c += 1 if mask_elem(b, h, q, kv{bnames}) else 0
                hits += c
                seen += k_hi - k_lo
                # A block with both values is partial whatever the other rows hold.
                if hits != 0 and hits != seen:
                    break
            full[b, h, qb, kb] = hits == seen
            partial[b, h, qb, kb] = hits != 0 and hits != seen


@njit(parallel=True, error_model='numpy', cache={c})
def dense_mask(B, H, Lq, Lk, out{bnames}):
    for t in prange(B * H * Lq):
        q = t % Lq
        bh = t // Lq
        h = bh % H
        b = bh // H
        for kv in range(Lk):
            out[b, h, q, kv] = mask_elem(b, h, q, kv{bnames})
'''


def _cache_dir() -> str | None:
    d = os.environ.get("ATTN_MODGEN_CACHE")
    if d is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        d = os.path.join(base, "attn", "modgen")
    if d in ("", "0", "off"):
        return None
    try:
        os.makedirs(d, exist_ok=True)
        if not os.access(d, os.W_OK):
            return None
    except OSError:
        return None
    return d


_MODULES: dict = {}


@contextmanager
def _torch_thread_count():
    """Run a parallel Numba driver on PyTorch's thread count, and leave that count as it
    was: Numba's OpenMP layer sets the process-wide OpenMP thread count when it starts,
    which PyTorch reads, so without this a ``torch.set_num_threads(1)`` before
    ``create_block_mask`` silently became the machine's core count for every later call."""
    import numba

    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)


def _cpu_module(compiled: CompiledMod, dtype: torch.dtype):
    mk = (compiled.key, dtype)
    m = _MODULES.get(mk)
    if m is not None:
        return m
    with _LOCK:
        m = _MODULES.get(mk)
        if m is not None:
            return m
        d = _cache_dir()
        text = _cpu_text(compiled, dtype, cache=d is not None)
        digest = hashlib.sha1(text.encode()).hexdigest()[:20]
        modname = f"_attn_modgen_{digest}"
        if d is not None:
            path = os.path.join(d, modname + ".py")
            if not os.path.exists(path):
                # Write-then-rename: another process importing the same file never
                # sees it half written.
                fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    f.write(text)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(modname, path)
            m = importlib.util.module_from_spec(spec)
            # Numba's on-disk cache re-imports the module by name when loading.
            sys.modules[modname] = m
            spec.loader.exec_module(m)
        else:
            m = type(sys)(modname)
            exec(compile(text, f"<{modname}>", "exec"), m.__dict__)
        m._tiles = None
        _MODULES[mk] = m
        return m


def element_function(compiled: CompiledMod, dtype: torch.dtype = torch.float32,
                     grad: bool = False):
    """The element function compiled by ``numba.njit`` for CPU tiles of ``dtype``
    (callable from Python or from other jitted code): ``mask_elem``, ``score_elem``
    or, with ``grad=True``, ``score_grad_elem``. Buffers are passed as 1-D numpy
    arrays (see :func:`buffer_arrays`)."""
    m = _cpu_module(compiled, dtype)
    if grad:
        if compiled.kind != "score":
            raise ValueError("a mask_mod has no derivative")
        return getattr(m, compiled.grad_fn_name)
    return getattr(m, compiled.fn_name)


def cpu_tile_fns(compiled: CompiledMod, dtype: torch.dtype) -> dict:
    """Addresses of the CPU tile callbacks for ``dtype`` (float32 or float64):
    ``{"mask": addr}`` for a mask_mod, ``{"score": addr, "score_grad": addr}`` for a
    score_mod. C signatures (``real`` = float or double)::

        void mask_tile(int64 b, int64 h, int64 q0, int64 nq, int64 k0, int64 nk,
                       real *S, int64 ld, int64 q_major, void **bufs)
        void score_tile(<same>)
        void score_grad_tile(int64 b, int64 h, int64 q0, int64 nq, int64 k0, int64 nk,
                             real *S, real *G, int64 ld, int64 q_major, void **bufs)

    Element (i, j), i < nq, j < nk, is query q0 + i and key k0 + j, at ``S[i*ld + j]``
    when q_major else ``S[j*ld + i]``. ``mask`` sets it to -inf where the mask is
    False; ``score`` replaces it by score_mod(it); ``score_grad`` also writes the
    derivative to G (same layout). ``bufs`` comes from :func:`buffer_pointer_array`.
    The code stays alive as long as the process (it is cached by ``compiled.key``).
    """
    m = _cpu_module(compiled, dtype)
    if m._tiles is None:
        with _LOCK:
            if m._tiles is None:
                m._tiles = m.build_tiles()
    return {k: f.address for k, f in m._tiles.items()}


def buffer_arrays(compiled: CompiledMod) -> tuple:
    """The buffers as 1-D numpy arrays on the CPU (views where the tensor is a CPU
    tensor, so in-place updates of a captured CPU tensor are seen)."""
    out = []
    for b in compiled.buffers:
        if b.device.type != "cpu":
            b = b.cpu()
        out.append(b.reshape(-1).numpy() if b.numel() else np.zeros(1, _np_dtype(b.dtype)))
    return tuple(out)


def _np_dtype(dtype):
    return torch.empty((), dtype=dtype).numpy().dtype


def buffer_pointer_array(compiled: CompiledMod):
    """``(ptrs, keepalive)``: an int64 numpy array of the buffers' CPU data pointers
    (the ``void **bufs`` of the tile callbacks; at least one entry, so the array
    itself has an address) and the objects that must stay alive while it is used."""
    arrays = buffer_arrays(compiled)
    ptrs = np.zeros(max(len(arrays), 1), dtype=np.int64)
    for i, a in enumerate(arrays):
        ptrs[i] = a.ctypes.data
    return ptrs, (arrays, ptrs)


# ------------------------------------------------------------------- block masks --
def _check_mask(compiled: CompiledMod):
    if not isinstance(compiled, CompiledMod) or compiled.kind != "mask":
        raise TypeError("expected the CompiledMod of a mask_mod (trace_mask_mod)")


def block_classes(compiled_mask: CompiledMod, B: int, H: int, Lq: int, Lk: int,
                  BQ: int, BKV: int):
    """``(full, partial)``: bool tensors (B, H, ceil(Lq/BQ), ceil(Lk/BKV)). A block is
    full when the mask is True at every in-range element, partial when it is True at
    some but not all, and empty otherwise; rows beyond Lq and columns beyond Lk are
    ignored. Evaluated on the CPU in parallel (Numba threads) at b < B, h < H: B or H
    of 1 evaluate b = 0 / h = 0 only. A block stops being evaluated once it has seen
    both values."""
    _check_mask(compiled_mask)
    B, H, Lq, Lk, BQ, BKV = (int(x) for x in (B, H, Lq, Lk, BQ, BKV))
    if min(B, H) < 1 or min(Lq, Lk) < 0 or min(BQ, BKV) < 1:
        raise ValueError(f"invalid sizes B={B} H={H} Lq={Lq} Lk={Lk} BQ={BQ} BKV={BKV}")
    nqb, nkb = -(-Lq // BQ), -(-Lk // BKV)
    full = np.zeros((B, H, nqb, nkb), dtype=np.bool_)
    part = np.zeros((B, H, nqb, nkb), dtype=np.bool_)
    if nqb and nkb:
        if compiled_mask.is_all_true:
            full[...] = True
        else:
            m = _cpu_module(compiled_mask, torch.float32)
            with _torch_thread_count():
                m.block_classes(B, H, Lq, Lk, BQ, BKV, full, part,
                                *buffer_arrays(compiled_mask))
    return torch.from_numpy(full), torch.from_numpy(part)


def dense_mask(compiled_mask: CompiledMod, B: int, H: int, Lq: int, Lk: int):
    """The mask as a bool tensor (B, H, Lq, Lk), evaluated on the CPU (for
    ``create_mask``)."""
    _check_mask(compiled_mask)
    B, H, Lq, Lk = (int(x) for x in (B, H, Lq, Lk))
    out = np.zeros((B, H, Lq, Lk), dtype=np.bool_)
    if out.size:
        if compiled_mask.is_all_true:
            out[...] = True
        else:
            m = _cpu_module(compiled_mask, torch.float32)
            with _torch_thread_count():
                m.dense_mask(B, H, Lq, Lk, out, *buffer_arrays(compiled_mask))
    return torch.from_numpy(out)
