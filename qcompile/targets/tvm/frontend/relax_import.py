"""Integer ONNX (qcompile.lowering) -> Relax, with true integer arithmetic.

The lowering already decided, on the ONNX side, which groups are integer (see ``qcompile/lowering.py`` for why
the rewrite lives there): this module only translates its nodes. TVM's own ONNX importer handles every standard op
(float regions, and the standard ops that run on integer tensors: MaxPool, Reshape, Concat, ...); the
``qcompile.int`` ops and the Quantize/DequantizeLinear borders are translated here, exactly as
``qcompile/reference.py`` computes them:

- ``QLinear``: the input is padded with its zero point (so the padding is the real value 0), then
  ``conv2d`` / ``matmul`` on ``uint8 x int8 -> int32`` (the form VNNI / dotprod kernels take), and one int32 constant
  ``bias - z_x·Σw`` per output channel is added: ``Σ(x - z_x)·w + b = Σ x·w + (b - z_x·Σw)``, computed once here.
- ``Requantize``: gemmlowp's SaturatingRoundingDoublingHighMul then RoundingDivideByPOT with the per-channel Q31
  multiplier and shift, zero point, clamp, cast, in closed forms (:func:`requantize_expr`, which proves them): one
  ``int32 x int32 -> int64`` product plus a 64-bit rounding constant (that also carries a QLinear's bias and usually
  the zero point), the rest in int32.
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
from qcompile.targets.tvm.frontend.requant import (
    _c,
    _dtype,
    _ndim,
    _np,
    _per_axis,
    _shape,
    mbqm_form,
    requantize_expr,
)

logger = logging.getLogger(__name__)


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
        if op_name == "Clip" and opset >= 11:
            clip = _float_clip(list(inputs))
            if clip is not None:
                return self.bb.normalize(clip)
        return super()._convert_operator(op_name, inputs, attrs, opset)


def _float_clip(ins: list) -> relax.Expr | None:
    """Clip of a float tensor with constant (or absent) bounds as one ``R.clip`` (exporters' decomposed HardSwish).
    TVM's converter emits ``topi.maximum`` / ``topi.minimum`` kernels into its module instead: two kernels where one
    Relax op suffices (:func:`~.program.merge_probe` keeps such kernels where the converter still writes them)."""
    x = ins[0]
    if _dtype(x) not in ("float32", "float16"):
        return None
    bounds = []
    for k, default in ((1, -np.inf), (2, np.inf)):
        b = ins[k] if len(ins) > k else None
        if b is None:
            bounds.append(default)
        elif isinstance(b, tvm.ir.GenericConst) and b.value.numpy().size == 1:
            bounds.append(float(b.value.numpy().reshape(())))
        else:
            return None
    return relax.op.clip(x, *(tvm.tirx.FloatImm(_dtype(x), b) for b in bounds))


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
    if nsp not in (1, 2, 3):
        raise TargetError(f"QLinear Conv with {nsp} spatial dims is not lowered (1-D to 3-D only)")
    strides = list(a.get("strides", [1] * nsp))
    dil = list(a.get("dilations", [1] * nsp))
    group = int(a.get("group", 1))
    pads = _conv_pads(a, _shape(x)[2:], list(w.shape[2:]), strides, dil)
    corr = bias - zx * w.reshape(w.shape[0], -1).sum(axis=1)
    if nsp == 3:  # video / volumetric convs: Relax's conv3d (generic schedules; the tuned kernels are 2-D)
        if any(pads):
            x = bb.emit(op.nn.pad(x, [0, 0, 0, 0] + [p for i in range(3) for p in (pads[i], pads[i + 3])],
                                  pad_value=float(zx)))
        acc = bb.emit(op.nn.conv3d(x, _c(w, "int8"), strides=strides, padding=[0] * 6, dilation=dil, groups=group,
                                   data_layout="NCDHW", kernel_layout="OIDHW", out_dtype="int32"))
        return op.add(acc, _c(_check_i32(corr).reshape(1, -1, 1, 1, 1), "int32"))
    if nsp == 1:  # [N, C, L] as [N, C, 1, L]: the 2-D kernels (and their schedules) serve speech and audio convs
        n, c, length = _shape(x)
        x = bb.emit(op.reshape(x, [n, c, 1, length]))
        w, strides, dil, pads = w[:, :, None, :], [1, *strides], [1, *dil], [0, pads[0], 0, pads[1]]
    if any(pads):
        pw = [0, 0, 0, 0, pads[0], pads[2], pads[1], pads[3]]
        x = bb.emit(op.nn.pad(x, pw, pad_value=float(zx)))
    acc = bb.emit(op.nn.conv2d(x, _c(w, "int8"), strides=strides, padding=[0, 0, 0, 0], dilation=dil, groups=group,
                               data_layout="NCHW", kernel_layout="OIHW", out_dtype="int32"))
    out = op.add(acc, _c(_check_i32(corr).reshape(1, -1, 1, 1), "int32"))
    if nsp == 1:
        n, o, _, lo = _shape(bb.normalize(out))
        out = op.reshape(bb.emit(out), [n, o, lo])
    return out


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
    """:func:`requantize_expr`; a QLinear's ``acc + bias`` input hands its bias over (folded into the rounding
    constant, one int32 add less per element) where the form allows it."""
    x = ins[0]
    nd, axis = _ndim(x), int(a.get("axis", 1))
    m0 = _per_axis(_np(ins[1], "multiplier"), axis, nd).astype(np.int64)
    sh = _per_axis(_np(ins[2], "shift"), axis, nd).astype(np.int64)
    zx, pre = int(a.get("x_zp", 0)), int(a.get("pre_shift", 0))
    to = onnx.helper.tensor_dtype_to_np_dtype(int(a["to"])).name
    bias = None
    if (not zx and not pre and not np.any(sh > 0) and mbqm_form(m0, sh) in ("left", "right")
            and isinstance(x, relax.Call) and x.op.same_as(tvm.ir.Op.get("relax.add"))
            and isinstance(x.args[1], tvm.ir.GenericConst) and _dtype(x.args[1]) == "int32"
            and _dtype(x.args[0]) == "int32" and _dtype(x) == "int32" and _shape(x.args[0]) == _shape(x)):
        x, bias = x.args[0], _np(x.args[1], "QLinear bias")
    return requantize_expr(x, m0, sh, x_zp=zx, pre=pre, y_zp=int(a.get("y_zp", 0)), lo=int(a["lo"]),
                           hi=int(a["hi"]), to=to, bias=bias, leaf=_is_leaf(bb, x),
                           x_bound=int(a["x_bound"]) if "x_bound" in a else None)


def _is_leaf(bb: relax.BlockBuilder, x: relax.Expr) -> bool:
    """``x`` is read from memory in the fused kernel (a conv2d / matmul result, or a function input), not an
    expression that inlining would repeat."""
    if not isinstance(x, relax.Var):
        return False
    value = bb.lookup_binding(x)
    return value is None or (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                             and value.op.name in ("relax.nn.conv2d", "relax.matmul"))


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
