"""Run-time (dynamic) activation quantization of linear layers in standard ONNX ops, per tensor or per token.

For ``y = x·W (+ b)`` with a constant W [K, N] (MatMul, or Gemm with transA = 0: B -> B^T if transB, alpha folded
into the weight scale, beta·C into the bias) and int8 W_q symmetric per output column (scale s_w [N]):

    y = Cast(MatMulInteger(x_q, W_q, z_x), float) · (s_x · s_w)   (+ b)

``x_q`` comes from one of two quantizers, both uint8 (ONNX Runtime's fast U8S8 GEMM):

- per tensor: ``(x_q, s_x, z_x) = DynamicQuantizeLinear(x)`` (the pattern of ORT's ``quantize_dynamic``, fused by ORT
  into DynamicQuantizeMatMul);
- per token (every position of all axes but the last, the rows of the GEMM), symmetric, b bits:
  ``s_t = max(max_k |x_tk|, tiny) / q``, ``q = 2^(b-1) - 1``, ``x_q = Cast(Clip(Round(x / s_t + 128), 128 - q, 128 + q),
  uint8)``, ``z_x = 128``. Adding the even 128 before a round-half-to-even round does not change what is rounded, so
  ``x_q - 128`` is the symmetric b-bit integer of ``x / s_t``. A token gets the whole grid for its own range:
  decoders' "massive activations" (a few tokens 100-1000x larger than the rest in a few channels) then cost the other
  tokens nothing, which a per-tensor range cannot give and channel smoothing cannot remove.
"""
from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from qcompile import quant_math
from qcompile.calibrate import activations
from qcompile.ir import NameScope
from qcompile.match import const_value, is_float
from qcompile.types import QParams, QuantDType

TOKEN_ZERO_POINT = 128
TINY_SCALE = np.float32(1e-30)  # an all-zero token: its scale is tiny, its integers 0, its output 0 (no 0/0)


def linear_weight(node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None, float, str]:
    """(W [K, N], bias or None, alpha, reason if declined) of a MatMul / Gemm reading a float activation."""
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None or w.dtype.kind != "f":
        return None, None, 1.0, "weight is not a float constant"
    if const_value(node.inputs[0]) is not None or not is_float(node.inputs[0]):
        return None, None, 1.0, "input is constant or not float"
    if node.op == "MatMul":
        return (w, None, 1.0, "") if w.ndim == 2 else (None, None, 1.0, "weight is not a matrix")
    if node.op != "Gemm":
        return None, None, 1.0, f"{node.op} is not a MatMul / Gemm"
    if int(node.attrs.get("transA", 0)):
        return None, None, 1.0, "Gemm with transA=1"
    if int(node.attrs.get("transB", 0)):
        w = w.T
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = const_value(node.inputs[2])
        if bias is None:
            return None, None, 1.0, "Gemm C is not constant"
        bias = (bias * np.float32(node.attrs.get("beta", 1.0))).astype(np.float32)
    return np.ascontiguousarray(w), bias, float(node.attrs.get("alpha", 1.0)), ""


def _node(graph: gs.Graph, uniq: NameScope, op: str, base: str, inputs: list, out: gs.Variable | None = None,
          dtype=np.float32, **attrs) -> gs.Variable:
    out = out if out is not None else gs.Variable(uniq(f"{base}_{op}_out"), dtype=dtype)
    graph.nodes.append(gs.Node(op, uniq(f"{base}_{op}"), attrs=attrs, inputs=inputs, outputs=[out]))
    return out


def per_tensor_input(graph: gs.Graph, uniq: NameScope, x: gs.Tensor) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """(x_q uint8, s_x scalar, z_x scalar) by DynamicQuantizeLinear."""
    outs = [gs.Variable(uniq(f"{x.name}_{s}"), dtype=d, shape=sh) for s, d, sh in
            (("quantized", np.uint8, x.shape), ("scale", np.float32, []), ("zero_point", np.uint8, []))]
    graph.nodes.append(gs.Node("DynamicQuantizeLinear", uniq(f"{x.name}_DynamicQuantizeLinear"), inputs=[x],
                               outputs=outs))
    return outs[0], outs[1], outs[2]


def per_token_input(graph: gs.Graph, uniq: NameScope, x: gs.Tensor, bits: int, opset: int, clip: float = 1.0
                    ) -> tuple[gs.Tensor, gs.Tensor, gs.Tensor]:
    """(x_q uint8, s_x [..., 1], z_x = 128) quantized per token (module docstring); ``clip`` < 1 takes the scale from
    that fraction of each token's largest magnitude (values beyond it saturate)."""
    q = (1 << (bits - 1)) - 1

    def c(tag: str, v) -> gs.Constant:
        return gs.Constant(uniq(f"{x.name}_{tag}"), np.asarray(v))

    n = x.name
    a = _node(graph, uniq, "Abs", n, [x])
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        m = _node(graph, uniq, "ReduceMax", n, [a, c("token_axes", np.array([-1], np.int64))], keepdims=1)
    else:
        m = _node(graph, uniq, "ReduceMax", n, [a], axes=[-1], keepdims=1)
    s0 = _node(graph, uniq, "Mul", n, [m, c("inv_qmax", np.float32(clip / q))])
    s = gs.Variable(uniq(f"{n}_token_scale"), dtype=np.float32)
    _node(graph, uniq, "Max", n, [s0, c("tiny_scale", TINY_SCALE)], out=s)
    d = _node(graph, uniq, "Div", n, [x, s])
    d = _node(graph, uniq, "Add", n, [d, c("zero_point_f", np.float32(TOKEN_ZERO_POINT))])
    r = _node(graph, uniq, "Round", n, [d])
    r = _node(graph, uniq, "Clip", n, [r, c("qmin", np.float32(TOKEN_ZERO_POINT - q)),
                                        c("qmax", np.float32(TOKEN_ZERO_POINT + q))])
    xq = gs.Variable(uniq(f"{n}_token_quantized"), dtype=np.uint8, shape=x.shape)
    _node(graph, uniq, "Cast", n, [r], out=xq, to=2)  # onnx.TensorProto.UINT8
    return xq, s, c("token_zero_point", np.uint8(TOKEN_ZERO_POINT))


def weight_integers(w: np.ndarray, per_channel: bool) -> tuple[np.ndarray, QParams]:
    """int8 symmetric values of W [K, N], per output column (axis 1) or per tensor."""
    qp = quant_math.weight_qparams(w, 1 if per_channel else None, QuantDType.INT8)
    return quant_math.quantize_weight(w, qp, QuantDType.INT8), qp


def integer_linear(graph: gs.Graph, uniq: NameScope, node: gs.Node, xq: gs.Tensor, xs: gs.Tensor, xz: gs.Tensor,
                   wq: np.ndarray, qp: QParams, bias: np.ndarray | None = None, alpha: float = 1.0,
                   per_token: bool = False) -> None:
    """Replace ``node`` (its output tensor kept) by MatMulInteger on the integer weights ``wq`` [K, N] (parameters
    ``qp``: scale and zero point per column or per tensor) and the float rescale.

    A scalar ``s_x`` (per tensor) is folded with ``s_w`` first, ``acc · (s_x·s_w)``: ORT fuses that into
    DynamicQuantizeMatMul. A per-token ``s_x`` [..., 1] (``per_token``) is applied as ``(acc · s_x) · s_w``: ORT 1.32
    also matches the first form when ``s_x`` is not a scalar and fuses it into MatMulIntegerToFloat, whose
    ``a_scale`` is per tensor or per column of A, and then computes wrong values (MiniLM's output cosine fell to 0.44)."""
    y = node.outputs[0]
    base = node.name or y.name
    w_scale = gs.Constant(uniq(f"{base}_W_scale"), (np.asarray(qp.scale, np.float32) * np.float32(alpha))
                          .astype(np.float32))
    acc = gs.Variable(uniq(f"{base}_int32"), dtype=np.int32)
    accf = gs.Variable(uniq(f"{base}_int32_float"), dtype=np.float32)
    mm_out = gs.Variable(uniq(f"{base}_dynamic_out"), dtype=np.float32) if bias is not None else y
    new = [
        gs.Node("MatMulInteger", uniq(f"{base}_MatMulInteger"),
                inputs=[xq, gs.Constant(uniq(f"{base}_W_quantized"), np.asarray(wq)), xz,
                        gs.Constant(uniq(f"{base}_W_zero_point"), np.asarray(qp.zero_point))], outputs=[acc]),
        gs.Node("Cast", uniq(f"{base}_Cast"), attrs={"to": 1}, inputs=[acc], outputs=[accf]),
    ]
    if not per_token:
        scale = gs.Variable(uniq(f"{base}_output_scale"), dtype=np.float32)
        new += [gs.Node("Mul", uniq(f"{base}_scale_Mul"), inputs=[xs, w_scale], outputs=[scale]),
                gs.Node("Mul", uniq(f"{base}_output_Mul"), inputs=[accf, scale], outputs=[mm_out])]
    else:
        rows = gs.Variable(uniq(f"{base}_token_scaled"), dtype=np.float32)
        new += [gs.Node("Mul", uniq(f"{base}_token_Mul"), inputs=[accf, xs], outputs=[rows]),
                gs.Node("Mul", uniq(f"{base}_output_Mul"), inputs=[rows, w_scale], outputs=[mm_out])]
    if bias is not None:
        new.append(gs.Node("Add", uniq(f"{base}_bias_Add"),
                           inputs=[mm_out, gs.Constant(uniq(f"{base}_bias"), bias)], outputs=[y]))
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new)


def range_mismatch_bits(token_max: np.ndarray, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """How badly one static per-tensor range [lo, hi] fits the tokens, in bits (factors of two), as
    ``(starved, clipped)``:

    - starved: what the median token loses in resolution with the static step ``(hi - lo) / (2^b - 1)`` instead of
      its own symmetric one ``m_t / (2^(b-1) - 1)``: ``median_t log2(step / step_t)``. About 0 when every token spans
      the range; 10 when one token in a hundred sets a range a thousand times the others';
    - clipped: how far the largest token exceeds the range: ``log2(max_t m_t / max(|lo|, |hi|))`` (0 if inside). A
      percentile or MSE observer keeps the others' resolution by clipping a rare huge token, which then loses its
      value (a decoder's first token carries 100-1000x the others in a few channels, and attention relies on it).

    All-zero tokens are left out (nothing to resolve)."""
    m = np.asarray(token_max, np.float64)
    m = m[np.isfinite(m) & (m > 0)]
    if not m.size or not hi > lo:
        return 0.0, 0.0
    step = (hi - lo) / ((1 << bits) - 1)
    starved = float(np.median(np.log2(step / (m / ((1 << (bits - 1)) - 1)))))
    clipped = float(max(0.0, np.log2(m.max() / max(abs(lo), abs(hi)))))
    return starved, clipped


def token_absmax(values: np.ndarray) -> np.ndarray:
    """max |x| of every token (all axes but the last) of one activation value; non-finite values count as 0."""
    v = np.abs(np.asarray(values, np.float32))
    v = np.where(np.isfinite(v), v, 0.0)
    return v.reshape(-1, v.shape[-1]).max(axis=1) if v.ndim else v.reshape(1)


def mismatch_per_input(graph: gs.Graph, header, samples, ranges: dict[str, tuple[float, float]], bits: int
                       ) -> dict[str, tuple[float, float]]:
    """:func:`range_mismatch_bits` of each activation in ``ranges`` (name -> static [lo, hi]) over ``samples``."""
    names = list(ranges)
    if not names:
        return {}
    maxima: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for values in activations(graph, header, samples, names):
        for n in names:
            maxima[n].append(token_absmax(values[n]))
    return {n: range_mismatch_bits(np.concatenate(maxima[n]), *ranges[n], bits) for n in names}
