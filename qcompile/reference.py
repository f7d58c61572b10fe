"""Integer reference: a numpy interpreter of the integer semantics of qcompile's QDQ graphs (docs/integer.md).

The oracle every target matches on integer tensors. Node groups run in integers (int64 accumulation, every int32
intermediate checked; overflow raises :class:`NumericsError`):

- ``DQ(x) & DQ(w) [& DQ(b:int32)] -> Conv/MatMul/Gemm [-> Relu/Clip] -> Q``: ``acc = Σ(q_x-z_x)(q_w-z_w) + q_b``,
  ``q_y = clamp(z_y + MBQM(acc, M_c), lo, hi)`` with ``M_c = s_x·s_w,c/s_y`` as a Q31 multiplier and shift.
- ``DQ -> Add/Mul/Concat/GlobalAveragePool [-> Relu/Clip] -> Q``: requantizing ops (TFLite's arithmetic).
- ``DQ -> MaxPool/Reshape/Transpose/Flatten/Squeeze/Unsqueeze/Resize(nearest)/... -> Q``: the op on the integers,
  then ``z_y + MBQM(q - z_x, s_x/s_y)`` (the identity when the parameters are shared).

Everything else is float32, op by op, through ``onnx.reference.ReferenceEvaluator``; a float tensor reaching a
QuantizeLinear is quantized as ONNX says (``saturate(round_half_even(x/s) + z)``). A linear op without a Q after it
gives ``float32(acc·s_x·s_w)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompile.errors import NumericsError

logger = logging.getLogger(__name__)

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1
SAME_SCALE_OPS = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Identity",
                  "Slice", "Gather", "Split", "SpaceToDepth", "DepthToSpace", "Expand", "Tile"}
LINEAR_OPS = {"Conv", "MatMul", "Gemm"}
REQUANT_OPS = {"Add", "Mul", "Concat", "GlobalAveragePool"}
ADD_LEFT_SHIFT = 20  # TFLite's headroom for requantizing Add


# ----------------------------------------------------------------------------------------------- fixed point
def check_i32(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and (x.min() < I32_MIN or x.max() > I32_MAX):
        raise NumericsError(f"int32 overflow in {what}: range [{x.min()}, {x.max()}]")
    return x


def quantize_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``M = M0·2^(shift-31)`` with ``M0`` a Q31 int32 in [2^30, 2^31) (TFLite's QuantizeMultiplier)."""
    m = np.asarray(m, np.float64)
    if np.any(m < 0):
        raise NumericsError("negative requantization multiplier")
    frac, shift = np.frexp(m)
    q = np.where(frac >= 0, np.floor(np.abs(frac) * (1 << 31) + 0.5), 0).astype(np.int64)  # round half away
    shift = np.where(q == (1 << 31), shift + 1, shift).astype(np.int64)
    q = np.where(q == (1 << 31), q // 2, q)
    tiny = (shift < -31) | (m == 0)
    return np.where(tiny, 0, q), np.where(tiny, 0, shift)


def srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul on int32 values held in int64."""
    ab = a.astype(np.int64) * b.astype(np.int64)
    nudged = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    res = np.where(nudged >= 0, nudged >> 31, -((-nudged) >> 31))  # C division: truncate toward zero
    return np.where((a == I32_MIN) & (b == I32_MIN), I32_MAX, res)


def rdbpot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded half away from zero."""
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    rem = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (rem > threshold)


def mbqm(x: np.ndarray, m: np.ndarray | float, what: str = "requantize") -> np.ndarray:
    """MultiplyByQuantizedMultiplier(x, M) for int32 x (int64 storage): round(x·M) in integers only."""
    m0, shift = quantize_multiplier(m)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    xs = check_i32(x.astype(np.int64) * (np.int64(1) << left), what)
    return rdbpot(srdhm(xs, m0), right)


# ----------------------------------------------------------------------------------------------- interpreter
@dataclass(frozen=True)
class QTensor:
    """A float tensor known to be DequantizeLinear(q, s, z): integer values and broadcastable parameters."""
    q: np.ndarray
    scale: np.ndarray
    zp: np.ndarray


@dataclass(frozen=True)
class Pending:
    """An integer computation that a following QuantizeLinear finishes: requant(s_y, z_y) -> int64 values."""
    requant: Callable[[np.ndarray, np.ndarray], np.ndarray]
    lo: float = -np.inf  # folded Relu/Clip bounds (float)
    hi: float = np.inf


def _bcast(p: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = -1
    return p.reshape(shape)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class Interpreter:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opsets = {o.domain: o.version for o in model.opset_import}
        self._evals: dict[int, ReferenceEvaluator] = {}

    def _eval(self, node: onnx.NodeProto, inputs: list, key: int) -> list[np.ndarray]:
        if key not in self._evals:
            self._evals[key] = ReferenceEvaluator(node, opsets=self.opsets)
        feeds = {n: v for n, v in zip(node.input, inputs) if n}
        return self._evals[key].run(None, feeds)

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        env: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in self.model.graph.initializer}
        env.update({k: np.asarray(v) for k, v in feeds.items()})
        qt: dict[str, QTensor] = {}
        pend: dict[str, Pending] = {}
        ints: dict[str, np.ndarray] = {}
        for idx, node in enumerate(self.model.graph.node):
            ins = [env[n] if n else None for n in node.input]
            op, out = node.op_type, node.output[0]
            if op == "DequantizeLinear":
                q, s = ins[0], ins[1].astype(np.float32)
                z = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros((), q.dtype)
                ax = _attrs(node).get("axis", 1) % max(q.ndim, 1)
                s, z = _bcast(s, ax, q.ndim), _bcast(z.astype(np.int64), ax, q.ndim)
                qt[out] = QTensor(q.astype(np.int64), s, z)
                env[out] = ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)
                continue
            if op == "QuantizeLinear":
                env[out] = self._quantize(node, ins, pend.get(node.input[0]))
                ints[out] = env[out]
                continue
            p = self._integer(node, ins, qt, pend, env, idx)
            if p is not None:
                pend[out] = p
                continue
            for name, val in zip(node.output, self._eval(node, ins, idx)):
                env[name] = val
        outs = {o.name: env[o.name] for o in self.model.graph.output}
        return outs, ints

    def _quantize(self, node: onnx.NodeProto, ins: list, p: Pending | None) -> np.ndarray:
        x, s = ins[0], ins[1].astype(np.float32)
        zt = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros((), np.uint8)
        info = np.iinfo(zt.dtype)
        if p is None or s.ndim != 0:
            q = np.rint(x.astype(np.float32) / s) + _bcast(zt.astype(np.float32), _attrs(node).get("axis", 1), x.ndim)
            return np.clip(q, info.min, info.max).astype(zt.dtype)
        z = int(zt)
        lo, hi = info.min, info.max
        if np.isfinite(p.lo):
            lo = max(lo, z + int(np.rint(np.float32(p.lo) / s)))
        if np.isfinite(p.hi):
            hi = min(hi, z + int(np.rint(np.float32(p.hi) / s)))
        return np.clip(p.requant(s.astype(np.float64), np.int64(z)), lo, hi).astype(zt.dtype)

    def _integer(self, node, ins, qt, pend, env, idx) -> Pending | None:
        """Match an integer group at `node`; None means float. Also writes the float value of the output."""
        op, out = node.op_type, node.output[0]
        only_q = self._consumers_ok(out)
        if op in ("Relu", "Clip") and node.input[0] in pend:
            p, a = pend[node.input[0]], _attrs(node)
            lo, hi = (0.0, np.inf) if op == "Relu" else (
                float(ins[1]) if len(ins) > 1 and ins[1] is not None else a.get("min", -np.inf),
                float(ins[2]) if len(ins) > 2 and ins[2] is not None else a.get("max", np.inf))
            env[out] = self._eval(node, ins, idx)[0]
            return replace(p, lo=max(p.lo, lo), hi=min(p.hi, hi))
        data = [n for n in node.input[:3 if op in LINEAR_OPS else len(node.input)] if n]
        if op in LINEAR_OPS:
            if len(data) < 2 or not all(n in qt for n in data) or not self._linear_ok(node, qt, data):
                return None
            acc, sxw, ch_axis = self._linear(node, qt, data, idx)
            env[out] = (acc.astype(np.float64) * sxw).astype(np.float32)
            return Pending(lambda s, z: z + mbqm(acc, sxw / s, f"{node.name} requantize"))
        if not only_q:
            return None
        if op in REQUANT_OPS and all(n in qt for n in data) and all(qt[n].scale.ndim == 0 for n in data):
            env[out] = self._eval(node, ins, idx)[0]
            return self._requant_op(node, [qt[n] for n in data])
        if op in SAME_SCALE_OPS and node.input[0] in qt and qt[node.input[0]].scale.ndim == 0 and len(node.output) == 1:
            if op == "Resize" and _attrs(node).get("mode", b"nearest") not in (b"nearest", "nearest"):
                return None
            t = qt[node.input[0]]
            env[out] = self._eval(node, ins, idx)[0]
            qi = np.rint(self._eval(node, [t.q.astype(np.float64)] + ins[1:], idx)[0]).astype(np.int64)
            return Pending(lambda s, z: z + mbqm(qi - t.zp, t.scale.astype(np.float64) / s))
        return None

    def _consumers_ok(self, name: str) -> bool:
        """True when `name` feeds only QuantizeLinear (possibly through one Relu/Clip)."""
        cons = [n for n in self.model.graph.node if name in n.input]
        if not cons or name in {o.name for o in self.model.graph.output}:
            return False
        return all(c.op_type == "QuantizeLinear" or (c.op_type in ("Relu", "Clip") and c.input[0] == name
                                                     and self._consumers_ok(c.output[0])) for c in cons)

    def _linear_ok(self, node, qt, data) -> bool:
        a = _attrs(node)
        if node.op_type == "Gemm" and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
            return False
        x, w = qt[data[0]], qt[data[1]]
        if x.scale.ndim != 0 or (len(data) > 2 and (qt[data[2]].q.dtype != np.int64 or np.any(qt[data[2]].zp))):
            return False
        if len(data) > 2:
            sxw = (x.scale.astype(np.float64) * w.scale.astype(np.float64)).reshape(-1)
            sb = qt[data[2]].scale.astype(np.float64).reshape(-1)
            if not np.allclose(sb, sxw, rtol=1e-5, atol=0):
                logger.info("%s: bias scale is not s_x*s_w; float", node.name)
                return False
        return True

    def _linear(self, node, qt, data, idx) -> tuple[np.ndarray, np.ndarray, int]:
        x, w = qt[data[0]], qt[data[1]]
        xi, wi = (x.q - x.zp).astype(np.float64), (w.q - w.zp).astype(np.float64)
        if node.op_type == "Gemm":
            wi = wi.T if _attrs(node).get("transB", 0) else wi
            acc = xi @ wi
        elif node.op_type == "MatMul":
            acc = np.matmul(xi, wi)
        else:
            acc = self._eval(onnx.helper.make_node("Conv", ["x", "w"], ["y"], **_attrs(node)), [xi, wi], -idx - 1)[0]
        acc = check_i32(np.rint(acc).astype(np.int64), f"{node.name} accumulator")  # exact: |acc| < 2^53
        ch_axis = 1 if node.op_type == "Conv" else acc.ndim - 1
        ws = w.scale.reshape(-1).astype(np.float64)
        sxw = _bcast(float(x.scale) * ws, ch_axis, acc.ndim) if ws.size > 1 else float(x.scale) * ws[0]
        if len(data) > 2:
            acc = check_i32(acc + _bcast(qt[data[2]].q.reshape(-1), ch_axis, acc.ndim), f"{node.name} bias add")
        return acc, np.asarray(sxw, np.float64), ch_axis

    def _requant_op(self, node, ts: list[QTensor]) -> Pending:
        op = node.op_type
        sc = [float(t.scale) for t in ts]
        d = [t.q - t.zp for t in ts]
        if op == "Mul":
            prod = check_i32(d[0] * d[1], f"{node.name} product")
            return Pending(lambda s, z: z + mbqm(prod, sc[0] * sc[1] / s))
        if op == "GlobalAveragePool":
            n = int(np.prod(d[0].shape[2:]))
            tot = check_i32(d[0].sum(axis=tuple(range(2, d[0].ndim)), keepdims=True), f"{node.name} sum")
            return Pending(lambda s, z: z + mbqm(tot, sc[0] / (n * s)))
        if op == "Concat":
            ax = _attrs(node)["axis"]
            return Pending(lambda s, z: np.concatenate([z + mbqm(di, si / s) for di, si in zip(d, sc)], axis=ax))

        def add(s: np.ndarray, z: np.ndarray) -> np.ndarray:  # TFLite: inputs to a common 2^-20·2·max(s) grid
            twice = 2 * max(sc)
            parts = [mbqm(di << ADD_LEFT_SHIFT, si / twice, f"{node.name} input") for di, si in zip(d, sc)]
            tot = check_i32(parts[0] + parts[1], f"{node.name} sum")
            return z + mbqm(tot, twice / ((1 << ADD_LEFT_SHIFT) * s))
        return Pending(add)


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph outputs of `model` under qcompile's integer semantics."""
    return Interpreter(model).run(feeds)[0]


def integer_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every QuantizeLinear output's integer values, keyed by that output's name."""
    return Interpreter(model).run(feeds)[1]
