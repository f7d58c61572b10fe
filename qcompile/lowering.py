"""Integer lowering: a QDQ graph -> an *integer ONNX* graph, the one form every integer back end consumes.

The QDQ model says what is quantized; this module decides, once, how each group runs in integers
(docs/integer.md) and writes it down as ONNX nodes: standard ops on integer tensors plus five small ops of the
``qcompile.int`` domain whose semantics are fixed here:

- ``QLinear(x, w [, bias]) -> int32`` (attrs ``kind`` = Conv | MatMul, ``x_zp``, Conv's attributes):
  ``acc = Σ (x − x_zp)·w + bias``; weights are symmetric (zero point 0), Gemm ``transB`` is folded into ``w``.
- ``Requantize(x, multiplier, shift) -> to`` (attrs ``axis``, ``x_zp``, ``pre_shift``, ``y_zp``, ``lo``, ``hi``, ``to``,
  optional ``x_bound``): ``clamp(y_zp + MBQM((x − x_zp)·2^pre_shift, M), lo, hi)`` with ``M = multiplier·2^(shift−31)``
  (Q31, gemmlowp); ``x_bound`` is a promise ``|(x − x_zp)·2^pre_shift| ≤ x_bound`` that the reference checks and
  back ends may use to pick cheaper arithmetic.
- ``IntAdd(a, b) -> int32`` (checked int32 sum), ``IntMul(a, b) -> int32`` (attrs ``a_zp``, ``b_zp``: ``(a−a_zp)·(b−b_zp)``),
  ``IntSum(x) -> int32`` (attrs ``x_zp``, ``axes``: ``Σ (x − x_zp)`` keeping dims).

Float regions keep their ONNX ops; their borders stay ``QuantizeLinear`` / ``DequantizeLinear`` (a linear op
with a float consumer gets ``DequantizeLinear(acc, s_x·s_w)``). The reference (``qcompile/reference.py``)
interprets this graph with numpy and the TVM importer (``qcompile/targets/tvm/``) translates the same nodes to
Relax, so the two cannot disagree on what is integer. Why an ONNX-side rewrite rather than a Relax pattern rewrite:
the decision needs the Q/DQ parameters and the graph's consumers, which are plain ONNX facts, and one rewrite then
serves the numpy oracle, TVM and the firmware path alike.

:func:`lower` returns the integer graph and, per float node, the reason it stays float (the report's fallback list).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.errors import ModelError
from qcompile.protos import graph_constants
from qcompile.recurrent import unroll

logger = logging.getLogger(__name__)

DOMAIN = "qcompile.int"
SAME_SCALE_OPS = {"MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Resize", "Identity",
                  "Slice", "Gather", "Split", "SpaceToDepth", "DepthToSpace", "Expand", "Tile"}
LINEAR_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm"}
REQUANT_OPS = {"Add", "Mul", "Concat", "GlobalAveragePool"}
ADD_LEFT_SHIFT = 20  # TFLite's headroom for requantizing Add (inputs wider than 8 bits)
ADD_MULT_BITS = 22  # Add's integer multipliers: the larger one in [2^22, 2^23] where int32 allows
SHAPE_OPS = {"Shape", "Constant", "ConstantOfShape", "Cast", "Range", "Size", "NonZero"}
I32 = (-(1 << 31), (1 << 31) - 1)
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def quantize_multiplier(m: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """``M = M0·2^(shift-31)`` with ``M0`` a Q31 int32 in [2^30, 2^31) (TFLite's QuantizeMultiplier)."""
    m = np.asarray(m, np.float64)
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("requantization multiplier must be finite and >= 0")
    frac, shift = np.frexp(m)
    q = np.floor(frac * (1 << 31) + 0.5).astype(np.int64)  # round half away (frac >= 0)
    shift = np.where(q == (1 << 31), shift + 1, shift).astype(np.int64)
    q = np.where(q == (1 << 31), q // 2, q)
    tiny = (shift < -31) | (m == 0)
    return np.where(tiny, 0, q), np.where(tiny, 0, shift)


def _max_abs_offset(x: QInfo) -> int:
    """The largest ``|q − z|`` an input of ``x``'s integer type can have."""
    info, z = np.iinfo(x.dtype), int(x.zp.reshape(-1)[0])
    return max(abs(int(info.min) - z), abs(int(info.max) - z))


def add_multipliers(ratios: list[float], bounds: list[int]) -> tuple[list[int], int, int] | None:
    """Add as one rounding: integers ``M_i ≈ r_i·2^S`` so that ``q_y = z_y + MBQM(Σ (q_i − z_i)·M_i, 2^−S)`` with
    every term and the sum in int32. The largest multiplier gets as many bits as fit (at most
    :data:`ADD_MULT_BITS`, at least 16: a relative error of at most 2^-(bits+1) per term). Returns ``(M, S, bound)``
    with ``bound ≥ |Σ (q_i − z_i)·M_i|`` for inputs within ``bounds``, or None where that does not fit (inputs wider
    than 8 bits, ratios over 2^16), which keeps TFLite's form. Why: TFLite's form rounds three times and needs
    64-bit products for two of its three multiplies; this one rounds once (``M = 2^−S`` is a rounding shift) and
    its multiplies are int32 (docs/integer.md)."""
    rmax = max(ratios)
    if not rmax > 0 or not np.isfinite(rmax):
        return None
    for bits in range(ADD_MULT_BITS, 15, -1):
        shift = min(bits - (int(np.frexp(rmax)[1]) - 1), 31)  # the largest M in [2^bits, 2^(bits+1)]
        if shift < 1:
            return None
        mult = [int(np.floor(np.float64(r) * 2.0 ** shift + 0.5)) for r in ratios]
        bound = sum(m * d for m, d in zip(mult, bounds))
        if bound + 1 + (1 << (shift - 1)) <= I32[1]:
            return mult, shift, bound
    return None


@dataclass(frozen=True)
class QInfo:
    """A DequantizeLinear output: integer tensor `q` with constant scale / zero point (broadcast over `axis`)."""
    q: str
    scale: np.ndarray
    zp: np.ndarray
    axis: int
    dtype: np.dtype

    @property
    def per_tensor(self) -> bool:
        return self.scale.size == 1


@dataclass
class _Pending:
    """An integer value waiting for its QuantizeLinear: how to requantize it to (s_y, z_y)."""
    kind: str                      # linear | add | mul | sum | concat | same
    srcs: list                     # integer tensor names, with their QInfo
    mult: np.ndarray | float = 1.0  # real multiplier numerator(s): M = mult / s_y
    axis: int = 1
    lo: float = -np.inf
    hi: float = np.inf
    extra: dict = field(default_factory=dict)


@dataclass
class Lowered:
    model: onnx.ModelProto
    fallbacks: list[dict]          # {"node", "op", "reason"} for every op left in float
    integer_nodes: int


def node_attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _const(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(value), name)


class _Lowerer:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.src = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = graph_constants(g)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}
        self.qi: dict[str, QInfo] = {}
        self.pend: dict[str, _Pending] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.fallbacks: list[dict] = []
        self.quiet: set[str] = set()  # nodes reported as a group elsewhere (an unrolled recurrent node's ops)
        self.integer_nodes = 0
        self._uid = 0

    # ------------------------------------------------------------------------------------------- helpers
    def fresh(self, base: str) -> str:
        self._uid += 1
        return f"{base}__qc{self._uid}"

    def add_const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.inits.append(_const(name, value))
        return name

    def reshape(self, x: str, shape: list[int], base: str) -> str:
        """A standard-domain Reshape of ``x`` to the constant ``shape`` (0: that axis kept); its output's name."""
        out = self.fresh(base)
        self.nodes.append(helper.make_node("Reshape", [x, self.add_const(base + "_shape", np.array(shape, np.int64))],
                                           [out], name=out))
        return out

    def slice_spatial(self, x: str, starts: list[int], ends: list[int], base: str) -> str:
        """A standard-domain Slice of ``x``'s spatial axes (2, 3, ...) to ``[starts, ends)``; its output's name."""
        out = self.fresh(base)
        self.nodes.append(helper.make_node(
            "Slice", [x, self.add_const(base + "_starts", np.array(starts, np.int64)),
                      self.add_const(base + "_ends", np.array(ends, np.int64)),
                      self.add_const(base + "_axes", np.arange(2, 2 + len(starts), dtype=np.int64))],
            [out], name=out))
        return out

    def emit(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=DOMAIN, **attrs))
        self.integer_nodes += 1

    def fallback(self, node: onnx.NodeProto, reason: str) -> None:
        if node.name in self.quiet:
            return
        self.fallbacks.append({"node": node.name or node.output[0], "op": node.op_type, "reason": reason})

    def only_q(self, name: str) -> bool:
        """True when `name` feeds only QuantizeLinear (possibly through Relu/Clip chains)."""
        cons = self.consumers.get(name, [])
        if not cons or name in self.outputs:
            return False
        return all(c.op_type == "QuantizeLinear" or (c.op_type in ("Relu", "Clip") and c.input[0] == name
                                                     and self.only_q(c.output[0])) for c in cons)

    # ------------------------------------------------------------------------------------------- matching
    def dq(self, node: onnx.NodeProto) -> None:
        s = self.consts.get(node.input[1])
        z = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if s is None or (len(node.input) > 2 and node.input[2] and z is None):
            return
        q_const = self.consts.get(node.input[0])
        dtype = q_const.dtype if q_const is not None else (z.dtype if z is not None else np.dtype(np.uint8))
        if z is None:
            z = np.zeros((), dtype)
        self.qi[node.output[0]] = QInfo(node.input[0], s.astype(np.float32), z.astype(np.int64),
                                        int(node_attrs(node).get("axis", 1)), np.dtype(dtype))

    def linear(self, node: onnx.NodeProto) -> str | None:
        """Emit QLinear for `node`; returns the int32 accumulator name, or None with a fallback reason."""
        op, a = node.op_type, node_attrs(node)
        data = [n for n in node.input[:3] if n]
        if len(data) < 2 or not all(n in self.qi for n in data[:2]):
            self.fallback(node, "not quantized by the recipe (no Q/DQ on its inputs)")
            return None
        if op == "Gemm" and (a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0 or a.get("transA", 0)):
            self.fallback(node, "Gemm with alpha/beta != 1 or transA")
            return None
        x, w = self.qi[data[0]], self.qi[data[1]]
        wv = self.consts.get(w.q)
        if not x.per_tensor:
            self.fallback(node, "per-channel activation parameters")
            return None
        if wv is None:
            self.fallback(node, "activation x activation product (second operand not a constant weight)"
                          if op == "MatMul" else "weights are not constant")
            return None
        if np.any(w.zp):
            self.fallback(node, "asymmetric weights (non-zero weight zero point)")
            return None
        if op == "Gemm" and a.get("transB", 0):
            wv = wv.T
        if op in ("MatMul", "Gemm") and wv.ndim != 2:
            self.fallback(node, "batched constant weights")
            return None
        ws = w.scale.reshape(-1).astype(np.float64)
        out_axis = 0 if op == "Conv" or (op == "Gemm" and a.get("transB", 0)) else 1  # in the stored weight
        if ws.size > 1 and w.axis % wv.ndim != out_axis:
            self.fallback(node, "weight scale not per output channel")
            return None
        x_q, phases, interleave = x.q, 1, None
        if op == "ConvTranspose":
            as_conv = self.transposed_as_conv(node, x, wv, a, per_channel=ws.size > 1)
            if as_conv is None:
                return None
            x_q, wv, a, phases, interleave = as_conv
        sxw = float(x.scale.reshape(-1)[0]) * ws
        ins = [x_q, self.add_const(w.q + "_w", np.ascontiguousarray(wv.astype(np.int8)))]
        if len(data) > 2:
            b = self.qi.get(data[2])
            bv = self.consts.get(b.q) if b else None
            if b is None or bv is None or bv.dtype != np.int32 or np.any(b.zp):
                self.fallback(node, "bias is not an int32 constant with zero point 0")
                return None
            if not np.allclose(b.scale.astype(np.float64).reshape(-1), sxw, rtol=1e-5, atol=0):
                self.fallback(node, "bias scale is not s_x*s_w")
                return None
            ins.append(self.add_const(b.q + "_b", np.repeat(bv.reshape(-1).astype(np.int32), phases)))
        acc = self.fresh(node.output[0] + "_acc")
        attrs = {k: v for k, v in a.items() if k in ("strides", "pads", "dilations", "group", "kernel_shape", "auto_pad")}
        conv = op in ("Conv", "ConvTranspose")
        self.emit("QLinear", ins, [acc], (node.name or acc) + "_int", kind="Conv" if conv else "MatMul",
                  x_zp=int(x.zp.reshape(-1)[0]), **attrs)
        if interleave is not None:
            acc = interleave(acc)
        self.pend[node.output[0]] = _Pending("linear", [acc], sxw if sxw.size > 1 else float(sxw[0]),
                                             axis=1 if conv else -1)
        # the float value, for float consumers (DCE drops it otherwise)
        self.nodes.append(helper.make_node(
            "DequantizeLinear", [acc, self.add_const(node.output[0] + "_sxw", sxw.astype(np.float32)
                                                     if sxw.size > 1 else np.float32(sxw[0]))],
            [node.output[0]], name=(node.name or acc) + "_float", axis=1 if conv else -1))
        return acc

    def group(self, node: onnx.NodeProto) -> bool:
        """Start an integer group at `node` (True), or leave it float (False)."""
        op, out = node.op_type, node.output[0]
        if op in ("Relu", "Clip") and node.input[0] in self.pend:
            p, a = self.pend[node.input[0]], node_attrs(node)
            if op == "Relu":
                lo, hi = 0.0, np.inf
            else:
                mn = self.consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else a.get("min")
                mx = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else a.get("max")
                if (len(node.input) > 1 and node.input[1] and mn is None) or (
                        len(node.input) > 2 and node.input[2] and mx is None):
                    self.fallback(node, "Clip bounds are not constant")
                    return False
                lo = -np.inf if mn is None else float(mn)
                hi = np.inf if mx is None else float(mx)
            self.pend[out] = _Pending(p.kind, p.srcs, p.mult, p.axis, max(p.lo, lo), min(p.hi, hi), p.extra)
            self.nodes.append(node)  # float value for float consumers
            return True
        if op in LINEAR_OPS:
            return self.linear(node) is not None
        data = [n for n in node.input if n]
        if op in REQUANT_OPS | SAME_SCALE_OPS and any(n in self.qi for n in data):
            if not self.only_q(out):
                self.fallback(node, "output not requantized (a float consumer or a graph output follows)")
                return False
        else:
            return False
        if op in REQUANT_OPS:
            if not all(n in self.qi for n in data) or not all(self.qi[n].per_tensor for n in data):
                self.fallback(node, "inputs not all per-tensor quantized")
                return False
            qs = [self.qi[n] for n in data]
            sc = [float(q.scale.reshape(-1)[0]) for q in qs]
            if op == "Mul" and len(qs) == 2:
                self.pend[out] = _Pending("mul", qs, sc[0] * sc[1])
            elif op == "GlobalAveragePool":
                self.pend[out] = _Pending("sum", qs, sc[0])
            elif op == "Concat":
                self.pend[out] = _Pending("concat", qs, 1.0,
                                          extra={"axis": int(node_attrs(node)["axis"]), "scales": sc})
            elif op == "Add" and len(qs) == 2:
                self.pend[out] = _Pending("add", qs, 1.0, extra={"scales": sc})
            else:
                return False
            return True
        x = self.qi.get(node.input[0])
        if x is None or not x.per_tensor or len(node.output) != 1:
            self.fallback(node, "input not per-tensor quantized or several outputs")
            return False
        if op == "Resize" and node_attrs(node).get("mode", b"nearest") not in (b"nearest", "nearest"):
            self.fallback(node, "Resize mode is not nearest")
            return False
        qname = self.fresh(out + "_q")
        self.nodes.append(helper.make_node(op, [x.q] + list(node.input[1:]), [qname], name=(node.name or out) + "_int",
                                           **node_attrs(node)))
        self.integer_nodes += 1
        self.pend[out] = _Pending("same", [qname], float(x.scale.reshape(-1)[0]), extra={"zp": int(x.zp.reshape(-1)[0])})
        return True

    def transposed_as_conv(self, node: onnx.NodeProto, x: QInfo, wv: np.ndarray, a: dict, *, per_channel: bool):
        """A ConvTranspose as the Conv it equals, so that every target's integer Conv kernels serve it: with a
        stride and no dilation, :meth:`_subpixel`'s phases; otherwise the input with ``stride − 1`` zero points after
        every element (Reshape, Pad with the zero point: the real value 0, Reshape), padded by ``(k − 1)·d − pad``
        (the end also by ``output_padding``; a negative pad crops it: Slice), convolved at stride 1 with the weight's
        in/out channels swapped and its taps reversed (the inserted zeros cost MACs: stride² of them). Returns
        (integer input, Conv weight, Conv attributes, phases per output channel, the function that turns the Conv's
        accumulator into the ConvTranspose's or None), or None with a fallback."""
        shape = self.shapes.get(x.q)
        nsp = wv.ndim - 2
        auto = a.get("auto_pad", b"NOTSET")
        if a.get("output_shape") is not None or (auto.decode() if isinstance(auto, bytes) else auto) != "NOTSET":
            self.fallback(node, "ConvTranspose with output_shape or auto_pad")
            return None
        if nsp not in (1, 2, 3) or not shape or len(shape) != nsp + 2 or not all(shape[2:]):
            self.fallback(node, "ConvTranspose input not 3-D to 5-D with static spatial axes")
            return None
        group, k = int(a.get("group", 1)), list(wv.shape[2:])
        if per_channel and group != 1:
            self.fallback(node, "per-channel weights of a grouped ConvTranspose")
            return None
        strides = [int(v) for v in a.get("strides", [1] * nsp)]
        dil = [int(v) for v in a.get("dilations", [1] * nsp)]
        pads = [int(v) for v in a.get("pads", [0] * 2 * nsp)]
        extra = [int(v) for v in a.get("output_padding", [0] * nsp)]
        if any(st > 1 for st in strides) and all(d == 1 for d in dil):
            sub = self._subpixel(node, x, wv, group, k, strides, pads, extra, list(shape[2:]))
            if sub is not None:
                return sub
        begin = [(k[i] - 1) * dil[i] - pads[i] for i in range(nsp)]
        # the inserted zeros leave stride − 1 of them after the last element: the end pad counts them
        end = [(k[i] - 1) * dil[i] - pads[nsp + i] + extra[i] - (strides[i] - 1) for i in range(nsp)]
        c_in, per_group = wv.shape[0], wv.shape[1]
        w_conv = wv.reshape(group, c_in // group, per_group, *k).swapaxes(1, 2).reshape(group * per_group,
                                                                                     c_in // group, *k)
        w_conv = np.flip(w_conv, axis=tuple(range(2, 2 + nsp)))
        x_q, (c, sp) = x.q, (wv.shape[0], list(shape[2:]))
        if any(s > 1 for s in strides):
            name = node.name or node.output[0]
            spread = self.reshape(x_q, [0, c, *[v for d in sp for v in (d, 1)]], name + "_spread")  # 0: the batch
            padded = self.fresh(name + "_zeros")
            ends = [0, 0, *[v for st in strides for v in (0, st - 1)]]
            self.nodes.append(helper.make_node(
                "Pad", [spread, self.add_const(name + "_zeros_pads", np.array([0] * len(ends) + ends, np.int64)),
                        self.add_const(name + "_zp", np.asarray(x.zp.reshape(-1)[0]).astype(x.dtype))],
                [padded], name=padded))
            x_q = self.reshape(padded, [0, c, *[d * st for d, st in zip(sp, strides)]], name + "_dilated")
            sp = [d * st for d, st in zip(sp, strides)]
        if min(begin + end) < 0:  # pads beyond the kernel's reach crop the output: crop the dilated input
            x_q = self.slice_spatial(x_q, [max(0, -b) for b in begin], [d - max(0, -e) for d, e in zip(sp, end)],
                                     (node.name or node.output[0]) + "_crop")
            begin, end = [max(0, b) for b in begin], [max(0, e) for e in end]
        attrs = {"strides": [1] * nsp, "dilations": dil, "group": group, "kernel_shape": k, "pads": begin + end}
        return x_q, w_conv, attrs, 1, None

    def _subpixel(self, node: onnx.NodeProto, x: QInfo, wv: np.ndarray, group: int, k: list[int],
                  strides: list[int], pads: list[int], extra: list[int], sp: list[int]):
        """A strided ConvTranspose without dilation as one stride-1 Conv with ``Π stride`` phases per output
        channel (sub-pixel convolution): output position ``q·s + r`` of the uncropped result is
        ``Σ_j x[q − j]·w[r + s·j]``, a Conv of the input with tap ``j`` of phase ``r`` reversed (taps past the kernel
        zero, ``K' = ceil(k / s)`` per phase); the phases interleave (Reshape, Transpose, Reshape on the int32
        accumulator) and a Slice takes ``[pad_begin, pad_begin + out)``. No inserted zeros are multiplied (the
        zero-point insertion of :meth:`transposed_as_conv` multiplies ``Π stride`` times as many). None where the
        input would need cropping (the caller then inserts zeros)."""
        nsp = len(k)
        out = [(sp[i] - 1) * strides[i] + k[i] - pads[i] - pads[nsp + i] + extra[i] for i in range(nsp)]
        kp = [-(-k[i] // strides[i]) for i in range(nsp)]
        q = [-(-(pads[i] + out[i]) // strides[i]) for i in range(nsp)]  # phase rows the slice reaches
        if any(q[i] < sp[i] for i in range(nsp)):
            return None
        c_in, per_group = wv.shape[0], wv.shape[1]
        phases = int(np.prod(strides))
        # taps padded to K'·s per axis, then w[ci, co, r + s·j] -> [co, r, ci, K'−1−j] (reversed): the Conv weight
        wpad = np.zeros((c_in, per_group, *[kp[i] * strides[i] for i in range(nsp)]), wv.dtype)
        wpad[(slice(None), slice(None), *[slice(0, k[i]) for i in range(nsp)])] = wv
        split = wpad.reshape(c_in, per_group, *[v for i in range(nsp) for v in (kp[i], strides[i])])
        # axes: ci, co, (j0, r0), (j1, r1) -> co, r0, r1, ci, j0, j1
        js, rs = [2 + 2 * i for i in range(nsp)], [3 + 2 * i for i in range(nsp)]
        w_sub = np.flip(split.transpose(1, *rs, 0, *js), axis=tuple(range(2 + nsp, 2 + 2 * nsp)))
        # groups: input channels of group gi are rows gi·c_in/g.. of the stored weight
        w_sub = w_sub.reshape(per_group, phases, group, c_in // group, *kp).transpose(2, 0, 1, 3, *range(4, 4 + nsp))
        w_conv = np.ascontiguousarray(w_sub.reshape(group * per_group * phases, c_in // group, *kp))
        attrs = {"strides": [1] * nsp, "dilations": [1] * nsp, "group": group, "kernel_shape": kp,
                 "pads": [kp[i] - 1 for i in range(nsp)] + [q[i] - sp[i] for i in range(nsp)]}
        c_out, name = group * per_group, node.name or node.output[0]

        def interleave(acc: str) -> str:
            staged = self.reshape(acc, [0, c_out, *strides, *q], name + "_phases")
            moved = self.fresh(name + "_interleaved")
            perm = [0, 1, *[v for i in range(nsp) for v in (2 + nsp + i, 2 + i)]]
            self.nodes.append(helper.make_node("Transpose", [staged], [moved], name=moved, perm=perm))
            whole = self.reshape(moved, [0, c_out, *[q[i] * strides[i] for i in range(nsp)]], name + "_uncropped")
            return self.slice_spatial(whole, pads[:nsp], [pads[i] + out[i] for i in range(nsp)], name + "_out")
        return x.q, w_conv, attrs, phases, interleave

    # ------------------------------------------------------------------------------------------- requantize
    def requant(self, x: str, mult: np.ndarray | float, out: str, name: str, *, axis: int = 1, x_zp: int = 0,
                pre_shift: int = 0, y_zp: int = 0, lo: int = I32[0], hi: int = I32[1], to: int = onnx.TensorProto.INT32,
                x_bound: int | None = None) -> None:
        m0, sh = quantize_multiplier(mult)
        extra = {} if x_bound is None else {"x_bound": int(x_bound)}
        self.emit("Requantize", [x, self.add_const(name + "_m", m0.astype(np.int32)),
                                 self.add_const(name + "_s", sh.astype(np.int32))], [out], name,
                  axis=axis, x_zp=x_zp, pre_shift=pre_shift, y_zp=y_zp, lo=int(lo), hi=int(hi), to=to, **extra)

    def close(self, q: onnx.NodeProto, p: _Pending) -> bool:
        """Replace QuantizeLinear `q` of pending value `p` by integer nodes; False keeps the float Q."""
        s = self.consts.get(q.input[1])
        zt = self.consts.get(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if s is None or zt is None or s.size != 1:
            return False
        s64, z = float(s.reshape(-1)[0]), int(zt.reshape(-1)[0])
        info = np.iinfo(zt.dtype)
        lo, hi = info.min, info.max
        if np.isfinite(p.lo):
            lo = max(lo, z + int(np.rint(np.float32(p.lo) / np.float32(s64))))
        if np.isfinite(p.hi):
            hi = min(hi, z + int(np.rint(np.float32(p.hi) / np.float32(s64))))
        to = onnx.helper.np_dtype_to_tensor_dtype(zt.dtype)
        out, name = q.output[0], q.name or q.output[0]
        common = {"y_zp": z, "lo": lo, "hi": hi, "to": to}
        if p.kind == "linear":
            self.requant(p.srcs[0], np.asarray(p.mult, np.float64) / s64, out, name, axis=p.axis, **common)
        elif p.kind == "same":
            zx = p.extra["zp"]
            if p.mult == s64 and zx == z and lo == info.min and hi == info.max:
                self.nodes.append(helper.make_node("Identity", [p.srcs[0]], [out], name=name))
            else:
                self.requant(p.srcs[0], p.mult / s64, out, name, x_zp=zx, **common)
        elif p.kind == "mul":
            a, b = p.srcs
            prod = self.fresh(out + "_prod")
            self.emit("IntMul", [a.q, b.q], [prod], name + "_mul", a_zp=int(a.zp.reshape(-1)[0]), b_zp=int(b.zp.reshape(-1)[0]))
            self.requant(prod, p.mult / s64, out, name, **common)
        elif p.kind == "sum":
            x = p.srcs[0]
            shp = self.shapes.get(x.q)
            if shp is None or any(not d for d in shp[2:]):
                return False  # the spatial size must be static for the integer average
            n = int(np.prod(shp[2:]))
            tot = self.fresh(out + "_sum")
            self.emit("IntSum", [x.q], [tot], name + "_sum", x_zp=int(x.zp.reshape(-1)[0]), axes=list(range(2, len(shp))))
            self.requant(tot, p.mult / (n * s64), out, name, **common)
        elif p.kind == "concat":
            parts = []
            for i, (x, sx) in enumerate(zip(p.srcs, p.extra["scales"])):
                part = self.fresh(out + f"_in{i}")
                self.requant(x.q, sx / s64, part, f"{name}_in{i}", x_zp=int(x.zp.reshape(-1)[0]), **common)
                parts.append(part)
            self.nodes.append(helper.make_node("Concat", parts, [out], name=name + "_concat", axis=p.extra["axis"]))
        elif p.kind == "add":
            (a, b), (sa, sb) = p.srcs, p.extra["scales"]
            terms = add_multipliers([sa / s64, sb / s64], [_max_abs_offset(a), _max_abs_offset(b)])
            if terms is None:
                self._add_tflite(a, b, sa, sb, s64, out, name, common)
            else:
                (ma, mb), shift, bound = terms
                parts = []
                for x, m, tag in ((a, ma, "a"), (b, mb, "b")):
                    part = self.fresh(out + "_" + tag)
                    self.emit("IntMul", [x.q, self.add_const(f"{name}_{tag}_m", np.int32(m))], [part],
                              f"{name}_{tag}", a_zp=int(x.zp.reshape(-1)[0]), b_zp=0)
                    parts.append(part)
                tot = self.fresh(out + "_sum")
                self.emit("IntAdd", parts, [tot], name + "_add")
                self.requant(tot, 2.0 ** -shift, out, name, x_bound=bound, **common)
        else:
            return False
        return True

    def _add_tflite(self, a: QInfo, b: QInfo, sa: float, sb: float, s64: float, out: str, name: str,
                    common: dict) -> None:
        """TFLite's Add (three roundings after a 2^20 pre-shift): inputs too wide for :func:`add_multipliers`."""
        twice = 2 * max(sa, sb)
        parts = []
        for x, sx, tag in ((a, sa, "a"), (b, sb, "b")):
            part = self.fresh(out + "_" + tag)
            self.requant(x.q, sx / twice, part, f"{name}_{tag}", x_zp=int(x.zp.reshape(-1)[0]),
                         pre_shift=ADD_LEFT_SHIFT)
            parts.append(part)
        tot = self.fresh(out + "_sum")
        self.emit("IntAdd", parts, [tot], name + "_add")
        self.requant(tot, twice / ((1 << ADD_LEFT_SHIFT) * s64), out, name, **common)

    # ------------------------------------------------------------------------------------------- driver
    def run(self) -> Lowered:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.src)
        except Exception:  # noqa: BLE001 - shapes are only needed for GlobalAveragePool's count
            inferred = self.src
        self.shapes, self.elem = {}, {}
        for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
            t = vi.type.tensor_type
            self.elem[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for node in self.src.graph.node:
            op = node.op_type
            if op == "DequantizeLinear":
                self.dq(node)
                self.nodes.append(node)
                continue
            if op == "QuantizeLinear":
                if not (node.input[0] in self.pend and self.close(node, self.pend[node.input[0]])):
                    self.nodes.append(node)
                continue
            before = len(self.fallbacks)
            if self.group(node):
                if op not in ("Relu", "Clip") and op not in LINEAR_OPS:
                    self.nodes.append(node)  # the float value too; dead-code elimination drops it when unused
                continue
            self.nodes.append(node)
            if len(self.fallbacks) == before and op not in SHAPE_OPS | {"Relu", "Clip"} and self._computes_float(node):
                self.fallback(node, "float by the semantics (not a quantized op in docs/integer.md)")
        return self.finish()

    def _computes_float(self, node: onnx.NodeProto) -> bool:
        """A float op worth reporting (not shape arithmetic on int64 tensors)."""
        return any(self.elem.get(o) in FLOAT_TYPES for o in node.output)

    def finish(self) -> Lowered:
        g = self.src.graph
        live = {o.name for o in g.output}
        keep: list[onnx.NodeProto] = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.output):
                keep.append(n)
                live.update(i for i in n.input if i)
                for a in n.attribute:  # If/Loop bodies read outer names
                    if a.type == onnx.AttributeProto.GRAPH:
                        live.update(outer_names(a.g))
        keep.reverse()
        kept_names = {n.name for n in keep}
        self.fallbacks = [f for f in self.fallbacks if f["node"] in kept_names or
                          any(n.output[0] == f["node"] for n in keep)]
        inits = [i for i in list(g.initializer) + self.inits if i.name in live]
        graph = helper.make_graph(keep, g.name, list(g.input), list(g.output), inits)
        opsets = [o for o in self.src.opset_import if o.domain != DOMAIN] + [helper.make_opsetid(DOMAIN, 1)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="qcompile.lowering")
        model.ir_version = self.src.ir_version
        return Lowered(model, self.fallbacks, sum(1 for n in keep if n.domain == DOMAIN))


def outer_names(g: onnx.GraphProto) -> set[str]:
    out: set[str] = set()
    for n in g.node:
        out.update(i for i in n.input if i)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                out |= outer_names(a.g)
    return out


def weight_only_blocks(model: onnx.ModelProto) -> str:
    """Why the integer semantics cannot run `model` ("" when they can): block-wise weights (weight-only w4a16
    recipes) have no integer form in docs/integer.md."""
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            return f"node {n.name or n.output[0]!r} is com.microsoft.MatMulNBits"
        if n.op_type == "DequantizeLinear" and int(node_attrs(n).get("block_size", 0)):
            return f"node {n.name or n.output[0]!r} dequantizes block-wise weights (block_size)"
    return ""


def specialize(model: onnx.ModelProto, shapes: dict[str, list[int]]) -> onnx.ModelProto:
    """``model`` with its inputs fixed to ``shapes`` and the shape computations that become static folded to
    constants (ONNX shape inference with data propagation, then onnx-graphsurgeon's shape folding; Q/DQ never
    folded). Exporters compute Reshape targets from ``Shape`` of a dynamic axis (Paddle2ONNX's
    ``Shape -> Slice -> Concat``, dynamo's ``-1`` batch): TVM's importer needs them constant. On failure the model is
    returned as it came, with the reason logged. Lowering depends on shapes (GlobalAveragePool's count): every
    lowering of one model (the reference's, each TVM target's) goes through this with the same shapes."""
    import onnx_graphsurgeon as gs

    # lazily: the passes import this module
    from qcompile.passes.fold_constants import fold

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in shapes:
            dims = i.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[i.name]:
                dims.add().dim_value = int(d)
    del m.graph.value_info[:]
    try:
        # a folded shape makes the shapes after it static: infer again until nothing folds (each round removes a node
        # or ends the loop). tf2onnx's Einsum decompositions chain Shape -> Gather -> ReduceProd -> Concat -> Reshape
        # several deep per attention layer (a Keras MultiHeadAttention): four rounds left a Reshape target computed
        for _ in range(len(m.graph.node) + 1):
            m = onnx.shape_inference.infer_shapes(m, data_prop=True)
            g = gs.import_onnx(m)
            before = len(g.nodes)
            fold(g, recurse_subgraphs=False)
            inlined = inline_constant_ifs(g)
            m = gs.export_onnx(g)
            if len(g.nodes) == before and not inlined:
                break
        return m
    except Exception as exc:  # noqa: BLE001 - inference / folding errors: the importer then says what it lacks
        logger.info("shape specialization skipped: %s", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return model


def inline_constant_ifs(graph) -> int:
    """Every If of ``graph`` (an onnx-graphsurgeon graph, not its subgraphs) whose condition folded to a constant
    replaced by the nodes of the branch it takes, each branch output copied to the If's output by an Identity; the
    number replaced. TorchScript writes ``x.squeeze(d)`` of a dimension it cannot see as
    ``If(Shape(x)[d] == 1, Squeeze, Identity)`` (``LocalResponseNorm`` has one): with static shapes the condition is
    a constant, and the static executors and the firmware, which run a fixed list of kernels, then have no If."""
    import onnx_graphsurgeon as gs

    count = 0
    for node in list(graph.nodes):
        cond = node.inputs[0] if node.op == "If" and node.inputs else None
        if not isinstance(cond, gs.Constant) or np.asarray(cond.values).size != 1:
            continue
        branch = node.attrs["then_branch" if bool(np.asarray(cond.values).reshape(())) else "else_branch"]
        outs = list(node.outputs)
        node.outputs.clear()
        node.inputs.clear()
        graph.nodes.remove(node)
        graph.nodes.extend(branch.nodes)
        for src, dst in zip(branch.outputs, outs):
            graph.nodes.append(gs.Node("Identity", name=f"{node.name}_{dst.name}", inputs=[src], outputs=[dst]))
        count += 1
    if count:
        graph.toposort()
    return count


def lower(model: onnx.ModelProto) -> Lowered:
    """The integer ONNX form of a QDQ model (module docstring), with the reasons float ops stay float.
    ModelError for weight-only block-wise INT4 models (:func:`weight_only_blocks`)."""
    why = weight_only_blocks(model)
    if why:
        raise ModelError(f"integer lowering (TVM targets, reference) does not support weight-only int4 block "
                         f"weights ({why}): run this model with --target onnxruntime")
    unrolled, notes = unroll(model)
    lowerer = _Lowerer(unrolled)
    lowerer.quiet = {n.name for n in unrolled.graph.node} - {n.name for n in model.graph.node}
    low = lowerer.run()
    low.fallbacks[:0] = notes  # one row per recurrent node, not one per op it was unrolled into
    return low
