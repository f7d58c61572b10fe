"""Integer reference: a numpy interpreter of qcompile's integer semantics (docs/integer.md).

The oracle every target matches on integer tensors. It runs the *integer ONNX* form of a QDQ model
(:func:`qcompile.lowering.lower`: standard ONNX ops on integer tensors, the five ``qcompile.int`` ops, float regions
with Quantize/DequantizeLinear borders) through ``onnx.reference.ReferenceEvaluator``, with the ``qcompile.int``
ops implemented here in int64 and every int32 intermediate checked (overflow raises :class:`NumericsError`):

- ``QLinear``: ``acc = Σ(q_x − z_x)·q_w + q_b``; ``Requantize``: ``clamp(z_y + MBQM((x − z_x)·2^p, M), lo, hi)``
  with ``M`` as a Q31 multiplier and shift (gemmlowp); ``Add`` / ``Mul`` / ``Sum``: checked int32 arithmetic.

Float ops run as ONNX says, in float32, those whose rounding ONNX leaves open as :mod:`qcompile.floatspec`
specifies them (exp, sums in index order, softmax, float MatMul); ``QuantizeLinear`` is
``saturate(round_half_even(x/s) + z)``.
"""
from __future__ import annotations

import logging
import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops.op_grid_sample import GridSample as _OnnxGridSample

from qcompile.errors import NumericsError
from qcompile.floatspec import FLOAT_OPS
from qcompile.lowering import DOMAIN, lower, quantize_multiplier

logger = logging.getLogger(__name__)

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


# ----------------------------------------------------------------------------------------------- fixed point
def check_i32(x: np.ndarray, what: str) -> np.ndarray:
    if x.size and (x.min() < I32_MIN or x.max() > I32_MAX):
        raise NumericsError(f"int32 overflow in {what}: range [{x.min()}, {x.max()}]")
    return x


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
    return mbqm_q31(x, *quantize_multiplier(m), what)


def mbqm_q31(x: np.ndarray, m0: np.ndarray, shift: np.ndarray, what: str = "requantize") -> np.ndarray:
    """MBQM with the multiplier already split into Q31 `m0` and `shift` (broadcast against x)."""
    m0, shift = np.asarray(m0, np.int64), np.asarray(shift, np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    xs = check_i32(x.astype(np.int64) * (np.int64(1) << left), what)
    return rdbpot(srdhm(xs, m0), right)


# ----------------------------------------------------------------------------------------------- qcompile.int ops
def _bcast(p: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    if p.ndim == 0 or p.size == 1:
        return p.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


class _IntOp(OpRun):
    op_domain = DOMAIN

    def _attr(self, name: str, default=None):
        return getattr(self, name, default)


class QLinear(_IntOp):
    def _run(self, x, w, bias=None, **_):
        xi = x.astype(np.int64) - int(self._attr("x_zp", 0))
        if self._attr("kind") == "MatMul":
            acc = np.matmul(xi.astype(np.float64), w.astype(np.float64))
            ch = acc.ndim - 1
        else:
            names = ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad")
            attrs = {k: getattr(self, k) for k in names if getattr(self, k, None) is not None}
            conv = ReferenceEvaluator(onnx.helper.make_node("Conv", ["x", "w"], ["y"], **attrs))
            acc = conv.run(None, {"x": xi.astype(np.float64), "w": w.astype(np.float64)})[0]
            ch = 1
        acc = check_i32(np.rint(acc).astype(np.int64), "QLinear accumulator")  # exact: |acc| < 2^53
        if bias is not None:
            acc = check_i32(acc + _bcast(bias.astype(np.int64), ch, acc.ndim), "QLinear bias add")
        return (acc.astype(np.int32),)


class Requantize(_IntOp):
    def _run(self, x, multiplier, shift, **_):
        nd, axis = x.ndim, int(self._attr("axis", 1))
        d = (x.astype(np.int64) - int(self._attr("x_zp", 0))) << int(self._attr("pre_shift", 0))
        d = check_i32(d, "Requantize input")
        bound = self._attr("x_bound")
        if bound is not None and d.size and int(np.abs(d).max()) > int(bound):
            raise NumericsError(f"Requantize input beyond its promised bound {int(bound)}: {int(np.abs(d).max())}")
        y = int(self._attr("y_zp", 0)) + mbqm_q31(d, _bcast(multiplier, axis, nd), _bcast(shift, axis, nd))
        y = np.clip(y, int(self._attr("lo")), int(self._attr("hi")))
        return (y.astype(onnx.helper.tensor_dtype_to_np_dtype(int(self._attr("to")))),)


class IntAdd(_IntOp):
    def _run(self, a, b, **_):
        return (check_i32(a.astype(np.int64) + b.astype(np.int64), "Add sum").astype(np.int32),)


class IntMul(_IntOp):
    def _run(self, a, b, **_):
        p = (a.astype(np.int64) - int(self._attr("a_zp", 0))) * (b.astype(np.int64) - int(self._attr("b_zp", 0)))
        return (check_i32(p, "Mul product").astype(np.int32),)


class IntSum(_IntOp):
    def _run(self, x, **_):
        t = (x.astype(np.int64) - int(self._attr("x_zp", 0))).sum(axis=tuple(self._attr("axes")), keepdims=True)
        return (check_i32(t, "Sum").astype(np.int32),)


def _axis(op: OpRun, x: np.ndarray) -> int:
    a = getattr(op, "axis", None)
    return 0 if x.ndim == 0 else (1 if a is None else int(a))


class QuantizeLinear(OpRun):
    """ONNX QuantizeLinear (any opset): saturate(round_half_even(x / s) + z), per tensor or per axis."""
    op_domain = ""

    def _run(self, x, scale, zero_point=None, **_):
        zp = zero_point if zero_point is not None else np.zeros((), np.uint8)
        axis = _axis(self, x)
        s, z = _bcast(scale.astype(np.float32), axis, x.ndim), _bcast(zp.astype(np.float32), axis, x.ndim)
        info = np.iinfo(zp.dtype)
        return (np.clip(np.rint(x.astype(np.float32) / s) + z, info.min, info.max).astype(zp.dtype),)


class DequantizeLinear(OpRun):
    """ONNX DequantizeLinear (any opset): (q - z) * s in float32, per tensor or per axis."""
    op_domain = ""

    def _run(self, x, scale, zero_point=None, **_):
        axis = _axis(self, x)
        s = _bcast(scale.astype(np.float32), axis, x.ndim)
        z = 0 if zero_point is None else _bcast(zero_point.astype(np.int64), axis, x.ndim)
        return (((x.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32),)


class GatherElements(OpRun):
    """ONNX GatherElements as ONNX Runtime computes it (np.take_along_axis, negative indices wrap). onnx 1.23's own
    reference op fails on a valid gather that torch's dynamo exporter writes for BERT masks ([1, 1] data gathered
    to [1, 32]): "cannot reshape array of size 1 into shape (1,32)"."""
    op_domain = ""

    def _run(self, data, indices, axis=None, **_):
        axis = int(axis if axis is not None else getattr(self, "axis", 0) or 0) % data.ndim
        idx = np.where(indices < 0, indices + data.shape[axis], indices).astype(np.int64)
        # out[..., j, ...] = data[..., idx[..., j, ...], ...]: data is read at the index's extent on every other axis
        shape = [data.shape[k] if k == axis else max(data.shape[k], idx.shape[k]) for k in range(data.ndim)]
        data = np.broadcast_to(data, shape)[tuple(slice(None) if k == axis else slice(0, idx.shape[k])
                                                  for k in range(data.ndim))]
        return (np.take_along_axis(data, idx, axis=axis),)


class GlobalMaxPool(OpRun):
    """ONNX GlobalMaxPool over every spatial axis (2 onwards), kept as size-1 axes. onnx 1.23's own reference op
    takes the max over axes ``ndim - 2`` and ``ndim - 1``: right for 4-D only. A 3-D input (Keras' GlobalMaxPooling1D
    as tf2onnx writes it: [N, C, T]) lost its channel axis, a 5-D one kept its first spatial axis."""
    op_domain = ""

    def _run(self, x, **_):
        return (np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True),)


class GridSample(_OnnxGridSample):
    """ONNX GridSample under either spelling of its modes: opsets 16-19 name them ``bilinear`` / ``bicubic``, opset 20
    ``linear`` / ``cubic``; onnx 1.23's reference op knows only the newer names (RT-DETR's deformable attention, as
    exporters write it at opset 16-19, stopped the integer reference)."""
    op_domain = ""
    _MODES = {"bilinear": "linear", "bicubic": "cubic"}

    def _run(self, x, grid, mode=None, padding_mode=None, align_corners=None):
        mode = mode or self.mode
        return super()._run(x, grid, mode=self._MODES.get(mode, mode), padding_mode=padding_mode,
                            align_corners=align_corners)


INT_OPS = [QLinear, Requantize, IntAdd, IntMul, IntSum, QuantizeLinear, DequantizeLinear, GatherElements,
           GlobalMaxPool, GridSample]
# the float regions' ops whose rounding qcompile specifies (exp, sums, softmax, float MatMul: qcompile.floatspec)
REFERENCE_OPS = INT_OPS + FLOAT_OPS


class Interpreter:
    """Runs the integer form of a QDQ model; lowered once, evaluated per sample."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.lowered = lower(model)
        self.model = self.lowered.model
        self._ev = ReferenceEvaluator(self.model, new_ops=REFERENCE_OPS)
        q_src = {n.output[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
        producer = {o: n for n in self.model.graph.node for o in n.output}
        self.int_names = sorted(q_src & set(producer))
        # float -> integer borders (a QuantizeLinear of a float value): fp32 differences upstream may flip them
        self.border_names = [k for k in self.int_names if producer[k].op_type == "QuantizeLinear"]
        self._replay: ReferenceEvaluator | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        outs = [o.name for o in self.model.graph.output]
        vals = self._ev.run(outs + self.int_names, {k: np.asarray(v) for k, v in feeds.items()})
        return dict(zip(outs, vals[:len(outs)])), dict(zip(self.int_names, vals[len(outs):]))

    def replay(self, feeds: dict[str, np.ndarray], borders: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Integer tensors computed from another engine's values at the float->integer borders: what the integer
        ops alone must reproduce bit for bit, whatever the float regions upstream did."""
        if self._replay is None:
            m = onnx.ModelProto()
            m.CopyFrom(self.model)
            cut = set(self.border_names)
            keep = [n for n in m.graph.node if not (n.op_type == "QuantizeLinear" and n.output[0] in cut)]
            del m.graph.node[:]
            m.graph.node.extend(keep)
            m.graph.input.extend(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.UNDEFINED, None) for k in cut)
            self._replay = ReferenceEvaluator(m, new_ops=REFERENCE_OPS)
        f = {k: np.asarray(v) for k, v in feeds.items()}
        f.update({k: borders[k] for k in self.border_names})
        vals = self._replay.run(self.int_names, f)
        return dict(zip(self.int_names, vals))


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph outputs of `model` under qcompile's integer semantics."""
    return Interpreter(model).run(feeds)[0]


def integer_tensors(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every QuantizeLinear output's integer values, keyed by that output's name."""
    return Interpreter(model).run(feeds)[1]
