"""Integer ONNX (qcompile.lowering) -> Relax, with true integer arithmetic.

The lowering already decided, on the ONNX side, which groups are integer (see ``qcompile/lowering.py`` for why
the rewrite lives there): this module only translates its nodes. TVM's own ONNX importer handles every standard op
(float regions, and the standard ops that run on integer tensors: MaxPool, Reshape, Concat, ...); the
``qcompile.int`` ops and the Quantize/DequantizeLinear borders are translated here, exactly as
``qcompile/reference.py`` computes them:

- ``QLinear``: the input is padded with its zero point (so the padding is the real value 0), then
  ``conv2d`` / ``matmul`` on ``uint8 x int8 -> int32`` (the form VNNI / dotprod kernels take), and one int32 constant
  ``bias - z_x·Σw`` per output channel is added: ``Σ(x - z_x)·w + b = Σ x·w + (b - z_x·Σw)``, computed once here.
- ``Requantize``: int64 arithmetic, gemmlowp's SaturatingRoundingDoublingHighMul then RoundingDivideByPOT with the
  per-channel Q31 multiplier and shift as constants, zero point, clamp, cast.
- ``QuantizeLinear``: ``round_half_even(x / s) + z`` saturated; ``DequantizeLinear``: ``float(q - z)·s``.

Inputs get static shapes (the first calibration sample's): a dynamic batch axis is fixed to 1.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _fe

from qcompile.errors import TargetError

logger = logging.getLogger(__name__)

I64 = "int64"


def _np(e: relax.Expr, what: str) -> np.ndarray:
    if not isinstance(e, tvm.ir.GenericConst):
        raise TargetError(f"{what} must be a constant for the TVM lowering")
    return e.value.numpy()


def _c(v, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v).astype(dtype), dtype)


def _ndim(e: relax.Expr) -> int:
    return int(e.ty.ndim)


def _shape(e: relax.Expr) -> list[int]:
    return [int(d) for d in e.ty.shape.values]


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _per_axis(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    v = np.asarray(v)
    if v.size == 1:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def mbqm(bb: relax.BlockBuilder, x: relax.Expr, m0: np.ndarray, shift: np.ndarray) -> relax.Expr:
    """MultiplyByQuantizedMultiplier on an int64 expression (values in int32 range); m0/shift broadcastable.

    Closed forms of gemmlowp's two steps, equal for every int32 input and Q31 multiplier in [2^30, 2^31)
    (tests/test_tvm_x86.py checks them against qcompile.reference): SaturatingRoundingDoublingHighMul is
    ``(a·M0 + 2^30) >> 31`` (arithmetic shift; the saturating case needs M0 = INT32_MIN, impossible here) and
    RoundingDivideByPOT(h, n) is ``(h + 2^(n-1) - [h < 0]) >> n``. Each intermediate is used at most twice, so
    inlining the chain into one loop nest stays small (the literal forms use values three and four times).
    """
    op = relax.op
    m0, shift = m0.astype(np.int64), shift.astype(np.int64)
    left, right = np.maximum(shift, 0), np.maximum(-shift, 0)
    if np.any(left):
        x = op.multiply(x, _c(np.left_shift(np.int64(1), left), I64))
    h = bb.emit(op.right_shift(op.add(op.multiply(x, _c(m0, I64)), _c(1 << 30, I64)), _c(31, I64)))
    if not np.any(right):
        return h
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    neg = op.astype(op.less(h, _c(0, I64)), I64)
    if not np.all(right > 0):
        neg = op.multiply(neg, _c((right > 0).astype(np.int64), I64))
    return op.right_shift(op.subtract(op.add(h, _c(half, I64)), neg), _c(right, I64))


class _Importer(_fe.ONNXGraphImporter):
    """TVM's ONNX importer with the qcompile.int ops and exact Quantize/DequantizeLinear."""

    def _check_for_unsupported_ops(self, graph: onnx.GraphProto) -> None:
        known = set(_fe._get_convert_map()) | set(_OWN) | {"If", "Constant"}
        missing = sorted({n.op_type for n in graph.node} - known)
        if missing:
            raise TargetError(f"TVM's ONNX importer does not support: {', '.join(missing)}")

    def _convert_operator(self, op_name: str, inputs, attrs: dict, opset: int) -> relax.Expr:
        if op_name in _OWN:
            out = _OWN[op_name](self.bb, list(inputs), attrs)
            return self.bb.normalize(out)
        return super()._convert_operator(op_name, inputs, attrs, opset)


# ----------------------------------------------------------------------------------------------- converters
def _qlinear(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    op = relax.op
    x, w = ins[0], _np(ins[1], "QLinear weight").astype(np.int64)
    zx = int(a.get("x_zp", 0))
    bias = _np(ins[2], "QLinear bias").astype(np.int64) if len(ins) > 2 and ins[2] is not None else 0
    kind = a["kind"].decode() if isinstance(a["kind"], bytes) else a["kind"]
    if kind == "MatMul":
        corr = bias - zx * w.sum(axis=0)
        acc = bb.emit(op.matmul(x, _c(w, "int8"), out_dtype="int32"))
        return op.add(acc, _c(_check_i32(corr), "int32"))
    nsp = w.ndim - 2
    if nsp != 2:
        raise TargetError(f"QLinear Conv with {nsp} spatial dims is not lowered (2-D only)")
    strides = list(a.get("strides", [1] * nsp))
    dil = list(a.get("dilations", [1] * nsp))
    group = int(a.get("group", 1))
    pads = _conv_pads(a, _shape(x)[2:], list(w.shape[2:]), strides, dil)
    if any(pads):
        pw = [0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]]
        x = bb.emit(op.nn.pad(x, pw, pad_value=float(zx)))
    corr = bias - zx * w.sum(axis=(1, 2, 3))
    acc = bb.emit(op.nn.conv2d(x, _c(w, "int8"), strides=strides, padding=[0, 0, 0, 0], dilation=dil, groups=group,
                               data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32"))
    return op.add(acc, _c(_check_i32(corr).reshape(1, -1, 1, 1), "int32"))


def _conv_pads(a: dict, in_sp: list[int], k: list[int], strides: list[int], dil: list[int]) -> list[int]:
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("NOTSET", ""):
        return list(a.get("pads", [0] * (2 * len(k))))
    if auto == "VALID":
        return [0] * (2 * len(k))
    begins, ends = [], []
    for n, kk, s, d in zip(in_sp, k, strides, dil):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (kk - 1) * d + 1 - n)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins + ends


def _check_i32(v: np.ndarray) -> np.ndarray:
    if v.size and (v.min() < -(1 << 31) or v.max() > (1 << 31) - 1):
        raise TargetError("an int32 constant (bias - z_x*sum(w)) overflows")
    return v


def _requantize(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    op = relax.op
    x = ins[0]
    nd, axis = _ndim(x), int(a.get("axis", 1))
    m0 = _per_axis(_np(ins[1], "multiplier"), axis, nd)
    sh = _per_axis(_np(ins[2], "shift"), axis, nd)
    v = op.astype(x, I64)
    zx, pre = int(a.get("x_zp", 0)), int(a.get("pre_shift", 0))
    if zx:
        v = op.subtract(v, _c(zx, I64))
    if pre:
        v = op.multiply(v, _c(1 << pre, I64))
    y = mbqm(bb, bb.emit(v), m0, sh)
    y = op.add(y, _c(int(a.get("y_zp", 0)), I64))
    y = op.minimum(op.maximum(y, _c(int(a["lo"]), I64)), _c(int(a["hi"]), I64))
    to = onnx.helper.tensor_dtype_to_np_dtype(int(a["to"])).name
    return op.astype(y, to)


def _int_add(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    return relax.op.add(ins[0], ins[1])


def _minus_zp(x: relax.Expr, zp: int) -> relax.Expr:
    v = relax.op.astype(x, "int32")
    return relax.op.subtract(v, _c(zp, "int32")) if zp else v


def _int_mul(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    return relax.op.multiply(_minus_zp(ins[0], int(a.get("a_zp", 0))), _minus_zp(ins[1], int(a.get("b_zp", 0))))


def _int_sum(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    return relax.op.sum(_minus_zp(ins[0], int(a.get("x_zp", 0))), axis=list(a["axes"]), keepdims=True)


def _qd_params(ins: list, a: dict, nd: int, default_zp_dtype: str) -> tuple[np.ndarray, np.ndarray, str]:
    s = _np(ins[1], "Quantize/DequantizeLinear scale").astype(np.float32)
    if len(ins) > 2 and ins[2] is not None:
        z = _np(ins[2], "Quantize/DequantizeLinear zero point")
    else:
        z = np.zeros((), default_zp_dtype)
    axis = int(a.get("axis", 1)) if nd else 0
    return _per_axis(s, axis, nd), _per_axis(z, axis, nd), z.dtype.name


def _quantize(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    op = relax.op
    x, nd = ins[0], _ndim(ins[0])
    s, z, dt = _qd_params(ins, a, nd, "uint8")
    info = np.iinfo(dt)
    v = op.add(op.round(op.divide(x, _c(s, "float32"))), _c(z.astype(np.float32), "float32"))
    v = op.minimum(op.maximum(v, _c(info.min, "float32")), _c(info.max, "float32"))
    return op.astype(v, dt)


def _dequantize(bb: relax.BlockBuilder, ins: list, a: dict) -> relax.Expr:
    op = relax.op
    x, nd = ins[0], _ndim(ins[0])
    s, z, _ = _qd_params(ins, a, nd, _dtype(x))
    wide = "int64" if _dtype(x) == "int32" else "int32"
    v = op.astype(x, wide)
    if np.any(z):
        v = op.subtract(v, _c(z.astype(np.int64), wide))
    return op.multiply(op.astype(v, "float32"), _c(s, "float32"))


_OWN = {"QLinear": _qlinear, "Requantize": _requantize, "IntAdd": _int_add, "IntMul": _int_mul,
        "IntSum": _int_sum, "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize}


def to_relax(model: onnx.ModelProto, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> tvm.IRModule:
    """Import an integer ONNX model (qcompile.lowering) into a Relax module with static input shapes."""
    imp = _Importer(shapes, dtypes, keep_params_in_input=False, sanitize=True)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return imp.from_onnx(model.graph, opset)
        except TargetError:
            raise
        except Exception as exc:  # noqa: BLE001 - an importer failure is one clear line for the user
            raise TargetError(f"TVM could not import the integer model: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
