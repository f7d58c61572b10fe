"""Float ``Let`` bindings as one-element local buffers, for TVM's LLVM code generator.

The specified float functions (:mod:`.floatspec`) bind each intermediate once, as ``Let`` expressions, and a fused
float region nests them: ``tanh(softplus(x))`` binds ``tanh``'s argument to a value that holds ``exp``'s bindings,
which hold their own. TVM 0.27's ``CodeGenLLVM`` hands every ``Let`` it emits to its arithmetic analyzer
(``Analyzer::Bind``), which rewrites the bound value with every earlier binding substituted and walks the result as a
tree: a chain of bindings that each use the previous one several times costs time exponential in its depth. Measured
on tvm-x86, Conv -> Mish -> Conv compiled in 18 s (12 of them in one kernel's code generation), Mish then Softplus
in more than 400 s; every other activation in about 4 s.

:func:`let_buffers_pass` runs after TIR lowering, just before code generation: in a store whose value binds a
float, each ``Let`` (the integer ones too, which float ones may use: the specified log's exponent bits) becomes a
store to a one-element local buffer (one vector's lanes for a vector value) before the statement, and its uses
loads from that buffer. The analyzer sees loads, not bindings, and LLVM's SROA turns the buffers back into
registers. Arithmetic and its order are unchanged (a ``Let`` evaluates its value once, before its body, and so does
the store), so the float regions stay bit-exact. ``if_then_else`` evaluates only the branch it takes (a padded read
guards its load this way; the certified erf computes one of two polynomials): one whose branches bind becomes an
``if`` statement, each branch's bindings stored inside its block, so each is still evaluated only when taken.
"""
from __future__ import annotations

import logging

import tvm
import tvm_ffi
from tvm import tirx

logger = logging.getLogger(__name__)

_LAZY_OPS = frozenset({"prim.if_then_else", "tirx.if_then_else", "tir.if_then_else"})


def _float_let(node) -> bool:
    return isinstance(node, tirx.Let) and str(node.var.ty.dtype).startswith(("float", "bfloat"))


def _lazy(node) -> bool:
    return isinstance(node, tvm.ir.expr.Call) and getattr(node.op, "name", "") in _LAZY_OPS


def _has_float_let(expr) -> bool:
    return tvm_ffi.structural_walk(expr, (tirx.Let, lambda n: (
        tvm_ffi.VisitInterrupt() if _float_let(n) else None))) is not None


def _has_let(expr) -> bool:
    return tvm_ffi.structural_walk(expr, (tirx.Let, lambda n: tvm_ffi.VisitInterrupt())) is not None


def _local(dtype: tvm.DataType, name: str):
    """A one-element local buffer for a ``dtype`` value (its lanes for a vector) and the index that reads it."""
    buf = tirx.decl_buffer((dtype.lanes,), str(dtype.with_lanes(1)), name=name, scope="local")
    index = (tirx.Ramp(tirx.const(0, "int32"), tirx.const(1, "int32"), dtype.lanes) if dtype.lanes > 1
             else tirx.const(0, "int32"))
    return buf, index


class _Hoister:
    """One statement's float bindings as statements: ``block`` the statements to run before it (nested ``if`` /
    ``else`` blocks for the branches of an ``if_then_else`` that binds), ``buffers`` the buffers they write."""

    def __init__(self) -> None:
        self.block: list = []
        self.buffers: list = []
        self.kept: dict = {}  # placeholder variable -> a call left as it is

    def expr(self, value):
        """``value`` without bindings: each becomes a store (its value first, then its body's) in ``block``;
        an ``if_then_else`` with a binding in a branch becomes an ``if`` statement whose blocks compute the branch
        taken, so a branch is still evaluated only when taken (a padded read's guarded load stays guarded)."""
        def on_let(node):
            # the map calls this once per position, then descends into what it returns: a body that is itself a
            # binding is taken here
            while isinstance(node, tirx.Let):  # every binding, once the statement has a float one: a float value
                # may use an integer binding (the specified log's exponent bits), which must be in scope
                bound = self.expr(node.value)
                buf, index = _local(tvm.DataType(str(node.var.ty.dtype)), f"{node.var.name}_v")
                self.buffers.append(buf)
                self.block.append(tirx.BufferStore(buf, bound, [index]))
                node = _substitute(node.body, node.var, tirx.BufferLoad(buf, [index]))
            return node

        def on_call(node):
            if not _lazy(node) or not any(_has_let(b) for b in node.args[1:]):
                return node
            cond = node.args[0]
            if tvm.DataType(str(cond.ty.dtype)).lanes != 1:  # a vector of conditions: no branch to take
                var = tirx.Var("kept", node.ty)
                self.kept[hash(var)] = (var, node)
                logger.debug("let_buffers: a vector if_then_else keeps its bindings")
                return var
            cond = self.expr(cond)
            buf, index = _local(tvm.DataType(str(node.ty.dtype)), "branch_v")
            self.buffers.append(buf)
            blocks, outer = [], self.block
            for branch in node.args[1:]:
                self.block = []
                taken = self.expr(branch)
                blocks.append(_seq([*self.block, tirx.BufferStore(buf, taken, [index])]))
            self.block = outer
            self.block.append(tirx.IfThenElse(cond, *blocks))
            return tirx.BufferLoad(buf, [index])

        return tvm_ffi.structural_map(value, [(tirx.Let, on_let), (tvm.ir.expr.Call, on_call)], order="pre")

    def restore(self, node):
        """``node`` with every call kept by :meth:`expr` back in place."""
        def back(v):
            hit = self.kept.get(hash(v))
            return hit[1] if hit is not None and hit[0].same_as(v) else v
        return tvm_ffi.structural_map(node, (tirx.Var, back)) if self.kept else node


def _seq(stmts: list):
    return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _substitute(node, var, value):
    return tvm_ffi.structural_map(node, (tirx.Var, lambda v: value if v.same_as(var) else v))


def _rewrite_store(store):
    if not _has_float_let(store.value):
        return store
    h = _Hoister()
    value = h.restore(h.expr(store.value))
    if not h.buffers:
        return store
    body = [h.restore(st) for st in h.block]
    return tirx.SeqStmt([*(tirx.AllocBuffer(b) for b in h.buffers), *body,
                         tirx.BufferStore(store.buffer, value, store.indices)])


def let_buffers_pass() -> tvm.transform.Pass:
    """The module pass (see the module docstring); a function without float ``Let`` values is returned as it is."""
    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="QcompileLetBuffers")
    def _pass(func, _mod, _ctx):
        return tvm_ffi.structural_map(func, (tirx.BufferStore, _rewrite_store))
    return _pass


TIR_PIPELINE = "qcompile_llvm"


def _llvm_tir_pipeline():
    pipeline, finalize_host, finalize_device = tvm.tirx.get_tir_pipeline("s_tir")
    return pipeline, lambda: tvm.transform.Sequential([finalize_host(), let_buffers_pass()]), finalize_device


def tir_pipeline(target) -> str:
    """The ``tir_pipeline`` name for ``tvm.compile``: for an LLVM target, TVM's default TIR pipeline with
    :func:`let_buffers_pass` after the host finalization; TVM's own for any other."""
    kind = (target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)).kind.name
    if kind != "llvm":
        return "default"
    tvm.tirx.register_tir_pipeline(TIR_PIPELINE, _llvm_tir_pipeline)
    return TIR_PIPELINE


__all__ = ["TIR_PIPELINE", "let_buffers_pass", "tir_pipeline"]
