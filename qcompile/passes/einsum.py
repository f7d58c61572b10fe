"""Rewrite two-operand Einsum contractions as MatMul, so that the quantizer and every target see a linear layer.

PyTorch's ``torch.einsum`` exports as ONNX ``Einsum`` (``"bsd,de->bse"`` for a projection, ``"bhqd,bhkd->bhqk"`` for
attention scores), and neither ONNX Runtime's integer kernels nor qcompile's Q/DQ placement know an Einsum: a model
written with them was left float. Identity: for operands ``A`` and ``B`` whose labels split into *batch* (in both and
in the output), *contracted* (in both, not in the output) and *kept* (in one operand and in the output),

    einsum(A, B) = Transpose(Reshape(MatMul(Reshape(Transpose(A), [..., M, K]), Reshape(Transpose(B), [..., K, N])))

with the batch labels leading both operands, ``K`` the product of the contracted sizes and ``M`` / ``N`` those of the
kept ones. A constant operand is transposed and reshaped here, in numpy (a constant weight becomes a 2-D [K, N]
MatMul weight, on the right: the operands are swapped when the constant is on the left), and a Transpose or Reshape
that would not move anything is not written. The products are the same sums of the same products; only their order
may differ from the Einsum kernel's (ONNX Runtime's own Einsum transposes to a MatMul too), which the numerics
instrument bounds.

Declined, with the reason in the report: other than two operands, non-float operands, a label repeated within an
operand (a diagonal / trace), a label summed in only one operand, an ellipsis over an operand of unknown rank, a
contracted size that no operand declares, and kept sizes that are not known where the product must be split again.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import iter_graphs
from qcompile.match import Declined, const_value, is_float
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import PassKind


class _Decline(Exception):
    pass


def _shape(t: gs.Tensor) -> list | None:
    """``t``'s dims (ints, or names / None where dynamic), None when even its rank is unknown."""
    v = const_value(t)
    if v is not None:
        return list(v.shape)
    return list(t.shape) if getattr(t, "shape", None) is not None else None


def parse(equation: str, ranks: list[int | None]) -> tuple[list[str], str]:
    """``equation``'s operand labels (an ellipsis spelled out as upper-case labels of its own, right-aligned across
    operands as einsum broadcasts them) and output labels (implicit output: the labels seen once, sorted)."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise _Decline(f"equation {equation!r} has {len(terms)} operands, the node {len(ranks)}")
    ell = 0
    for term, rank in zip(terms, ranks):
        if "..." in term:
            if rank is None:
                raise _Decline("an ellipsis over an operand of unknown rank")
            ell = max(ell, rank - len(term.replace("...", "")))
    fresh = "".join(chr(ord("A") + i) for i in range(ell))  # einsum labels are letters; ONNX's are lower / upper
    if any(c in fresh for c in eq):
        raise _Decline("upper-case labels beside an ellipsis")
    out_terms = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            n = rank - len(term.replace("...", ""))
            term = term.replace("...", fresh[ell - n:] if n else "")
        out_terms.append(term)
    if arrow:
        out = rhs.replace("...", fresh)
    else:
        seen = "".join(out_terms)
        out = fresh + "".join(sorted(c for c in set(seen) if seen.count(c) == 1 and c not in fresh))
    return out_terms, out


class EinsumToMatMulPass(PassBase):
    name = "einsum_to_matmul"
    kind = PassKind.EQUIVALENCE

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        rewritten = 0
        declined: list[Declined] = []
        for g in iter_graphs(graph):
            for node in [n for n in g.nodes if n.op == "Einsum"]:
                try:
                    self._rewrite(g, node)
                    rewritten += 1
                except _Decline as why:
                    declined.append(Declined(self.name, node.name, node.op, str(why)))
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, rewritten > 0, {"rewritten": rewritten}, declined)

    def _rewrite(self, g: gs.Graph, node: gs.Node) -> None:
        if len(node.inputs) != 2:
            raise _Decline(f"{len(node.inputs)} operands (a MatMul has two)")
        a, b = node.inputs
        if not (is_float(a) and is_float(b)):
            raise _Decline("an operand is not float32")
        sa, sb = _shape(a), _shape(b)
        (la, lb), lo = parse(str(node.attrs["equation"]), [None if s is None else len(s) for s in (sa, sb)])
        for lab in (la, lb, lo):
            if len(set(lab)) != len(lab):
                raise _Decline(f"a label repeated within {lab!r} (a diagonal)")
        if set(lo) - set(la) - set(lb):
            raise _Decline("an output label in no operand")
        if const_value(a) is not None and const_value(b) is None:  # the constant on the right: a MatMul weight
            a, b, la, lb, sa, sb = b, a, lb, la, sb, sa
        for shape, lab in ((sa, la), (sb, lb)):
            if shape is not None and len(shape) != len(lab):
                raise _Decline(f"labels {lab!r} for an operand of rank {len(shape)}")
        summed = [c for c in la + lb if c not in lo and (c in la) != (c in lb)]
        if summed:
            raise _Decline(f"label {summed[0]!r} summed within one operand")
        size: dict[str, int] = {}
        for shape, lab in ((sa, la), (sb, lb)):
            for c, d in zip(lab, shape or []):
                if isinstance(d, (int, np.integer)) and d > 1:
                    size[c] = int(d)
                elif isinstance(d, (int, np.integer)) and d == 1:
                    size.setdefault(c, 1)
        batch = [c for c in lo if c in la and c in lb]
        contract = [c for c in la if c in lb and c not in lo]
        keep_a = [c for c in la if c not in lb]
        keep_b = [c for c in lb if c not in la]
        nb, ka = len(batch), len(keep_a)
        # A as [batch.., kept.., K] (a 1 for M where A keeps nothing), B as [batch.., 1.., K, N]: MatMul broadcasts
        # B over A's kept axes, so they stay axes of their own and need no size; only B's kept sizes are split again
        k = math.prod(size[c] for c in contract) if all(c in size for c in contract) else -1
        n = math.prod(size[c] for c in keep_b) if all(c in size for c in keep_b) else -1
        reshape_a = len(contract) != 1 or ka == 0
        reshape_b = len(contract) != 1 or len(keep_b) != 1 or (nb > 0 and ka > 1)
        split = len(keep_b) != 1 or ka == 0
        if reshape_b and k == -1 and n == -1:
            raise _Decline("contracted and kept sizes unknown: the weight operand cannot be flattened")
        if split and sum(c not in size for c in keep_b) > 1:
            raise _Decline(f"kept sizes of {''.join(c for c in keep_b if c not in size)!r} unknown: the product "
                           "cannot be split again")
        name = node.name or node.outputs[0].name

        def arrange(x: gs.Tensor, lab: list[str], order: list[str], shape: list[int] | None, tag: str) -> gs.Tensor:
            perm = [lab.index(c) for c in order]
            v = const_value(x)
            if v is not None:
                v = np.transpose(v, perm)
                if shape is not None:
                    v = v.reshape([v.shape[i] if d == 0 else d for i, d in enumerate(shape)])
                return gs.Constant(f"{name}_{tag}", np.ascontiguousarray(v))
            if perm != list(range(len(perm))):
                x = self._op(g, "Transpose", [x], f"{name}_{tag}_T", perm=perm)
            if shape is not None:
                x = self._op(g, "Reshape", [x, gs.Constant(f"{name}_{tag}_shape", np.array(shape, np.int64))],
                             f"{name}_{tag}_R")
            return x

        xa = arrange(a, la, batch + keep_a + contract,
                     ([0] * (nb + ka) + [k] if ka else [0] * nb + [1, k]) if reshape_a else None, "A")
        xb = arrange(b, lb, batch + contract + keep_b,
                     [0] * nb + [1] * (max(ka, 1) - 1 if nb else 0) + [k, n] if reshape_b else None, "B")
        y = self._op(g, "MatMul", [xa, xb], f"{name}_MatMul")
        if split:
            y = self._op(g, "Reshape", [y, gs.Constant(f"{name}_out_shape", np.array(
                [0] * (nb + ka) + [size.get(c, -1) for c in keep_b], np.int64))], f"{name}_out_R")
        order = batch + keep_a + keep_b
        perm = [order.index(c) for c in lo]
        out = node.outputs[0]
        last = y.inputs[0]
        if perm != list(range(len(perm))):
            last = self._op(g, "Transpose", [y], f"{name}_out_T", perm=perm).inputs[0]
        last.outputs[0] = out
        node.inputs.clear()
        node.outputs.clear()

    @staticmethod
    def _op(g: gs.Graph, op: str, inputs: list[gs.Tensor], name: str, **attrs) -> gs.Variable:
        out = gs.Variable(f"{name}_out", dtype=np.float32)
        g.nodes.append(gs.Node(op, name, attrs, inputs, [out]))
        return out
