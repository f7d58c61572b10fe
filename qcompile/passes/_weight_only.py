"""Weight-only quantization for :class:`~qcompile.passes.insert_qdq.InsertQDQPass` (``weight_only: true``, w4a16).

Rewrite, per compute op reading a constant float weight ``W``: ``op(X, W) -> op(X, DequantizeLinear(q, s[, z]))``
with ``W ≈ (q − z)·s`` (activations untouched, so the only error is the weight rounding). Per-block parameters
(:func:`qcompile.quant_math.block_qparams`) are emitted as opset-21 ``DequantizeLinear(axis=K, block_size=B)`` of an
INT4 (symmetric, [-7, 7], no zero point) or UINT4 (asymmetric, [0, 15] + UINT4 zero points) initializer, or, with
``weight_format: matmulnbits``, a MatMul with a 2-D weight becomes ``com.microsoft.MatMulNBits(X, B, scales[, zp])``
computing ``X·((q − z)·s)`` from the same integers:

    B[n, b, i // 2] nibble (i mod 2, low first) = u[b·B + i, n],   u = q + 8 (symmetric) or q (asymmetric),
    scales[n·nb + b] = s[b, n],   zero_points[n, b // 2] nibble (b mod 2) = z[b, n]

(rows past K pad with the zero point: they meet no input). Weights the earlier passes hinted (reconstruct_weights,
awq) are used as they are. Declined with a reason: ops outside ``compute_ops`` or excluded by override, non-constant
or non-float weights, Gemm with transA, Loop/Scan bodies; Conv weights asked for per block get per-channel.
"""
from __future__ import annotations

import logging
from collections import Counter

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompile.ir import NameScope, if_branches, iter_graphs
from qcompile.match import Declined, const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes.qdq_plan import (
    COMPUTE_OPS,
    INT4_IR_VERSION,
    block_axis,
    weight_axis,
)
from qcompile.types import Granularity, QParams, WeightFormat

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def _packed_const(name: str, q: np.ndarray) -> gs.Constant:
    """An INT4 (int8 values) or UINT4 (uint8 values) initializer, 2 values a byte (kept as the TensorProto:
    graphsurgeon cannot pack 4-bit types)."""
    kind = ml_dtypes.int4 if np.asarray(q).dtype == np.int8 else ml_dtypes.uint4
    return gs.Constant(name, LazyValues(numpy_helper.from_array(np.asarray(q).astype(kind), name)))


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values in [0, 15] along the last axis (even length) -> bytes, element 2i in the low nibble."""
    u = u.astype(np.uint8)
    return (u[..., 0::2] & 0x0F) | (u[..., 1::2] << 4)


def matmulnbits_inputs(q: np.ndarray, qp: QParams) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(B [N, nb, block/2] uint8, scales [N·nb] float32, zero points [N·ceil(nb/2)] uint8 or None) of the per-block
    weight ``q`` [K, N] (blocks along axis 0) in MatMulNBits' layout (module docstring)."""
    k, n = q.shape
    block = int(qp.block_size)
    nb = -(-k // block)
    shift = 8 if q.dtype == np.int8 else 0  # int4 values and zero points -> uint4
    u = (q.astype(np.int16) + shift).astype(np.uint8)
    z = (np.asarray(qp.zero_point).astype(np.int16) + shift).astype(np.uint8)  # [nb, N]
    u = np.concatenate([u, np.repeat(z, block, axis=0)[k:]], axis=0)
    b = pack_nibbles(u.T.reshape(n, nb, block))
    scales = np.ascontiguousarray(np.asarray(qp.scale, np.float32).T).reshape(-1)
    zps = None
    if np.any(z != 8):  # 8 is MatMulNBits' default zero point
        zt = z.T
        if nb % 2:
            zt = np.concatenate([zt, np.zeros((n, 1), np.uint8)], axis=1)
        zps = pack_nibbles(zt).reshape(-1)
    return b, scales, zps


class _Emitter:
    def __init__(self, graph: gs.Graph, unique: NameScope, int4: bool) -> None:
        self.graph, self.unique, self.int4 = graph, unique, int4
        self.counts: Counter = Counter()
        self.bytes = [0, 0]

    def const(self, base: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique(base), np.array(value, order="C"))

    def dq(self, name: str, w: np.ndarray, q: np.ndarray, qp: QParams) -> gs.Variable:
        """DequantizeLinear of the weight ``name`` (INT4 / UINT4 when stored as 4 bits)."""
        four = self.int4 and q.dtype in (np.int8, np.uint8)
        qt = _packed_const(self.unique(f"{name}_quantized"), q) if four else self.const(f"{name}_quantized", q)
        inputs = [qt, self.const(f"{name}_scale", qp.scale)]
        zp = np.asarray(qp.zero_point)
        if not (qp.block_size and not np.any(zp)):  # symmetric blocks: zero point 0 is the default
            inputs.append(_packed_const(self.unique(f"{name}_zero_point"), zp) if four else
                          self.const(f"{name}_zero_point", zp))
        attrs = {} if qp.axis is None else {"axis": int(qp.axis)}
        if qp.block_size:
            attrs["block_size"] = int(qp.block_size)
        out = gs.Variable(self.unique(f"{name}_dequantized"), dtype=np.float32, shape=list(w.shape))
        self.graph.nodes.append(gs.Node("DequantizeLinear", self.unique(f"{name}_DequantizeLinear"), attrs=attrs,
                                        inputs=inputs, outputs=[out]))
        self.counts["DequantizeLinear"] += 1
        self.bytes[0] += w.nbytes
        self.bytes[1] += ((q.size + 1) // 2 if four else q.nbytes) + qp.scale.nbytes + \
            (((zp.size + 1) // 2 if four else zp.nbytes) if len(inputs) > 2 else 0)
        return out

    def matmulnbits(self, node: gs.Node, w: np.ndarray, q: np.ndarray, qp: QParams, level: int) -> None:
        """Replace MatMul(X, W[K, N]) by MatMulNBits with the same output tensor."""
        b, scales, zps = matmulnbits_inputs(q, qp)
        name = node.inputs[1].name
        inputs = [node.inputs[0], self.const(f"{name}_nbits", b), self.const(f"{name}_nbits_scales", scales)]
        if zps is not None:
            inputs.append(self.const(f"{name}_nbits_zero_points", zps))
        k, n = w.shape
        new = gs.Node("MatMulNBits", self.unique(f"{node.name}_MatMulNBits"), domain=MS_DOMAIN, inputs=inputs,
                      outputs=list(node.outputs),
                      attrs={"K": int(k), "N": int(n), "bits": 4, "block_size": int(qp.block_size),
                             "accuracy_level": int(level)})
        node.outputs.clear()
        self.graph.nodes.append(new)
        self.counts["MatMulNBits"] += 1
        self.bytes[0] += w.nbytes
        self.bytes[1] += b.nbytes + scales.nbytes + (zps.nbytes if zps is not None else 0)


def _stored_int8(t: gs.Tensor, depth: int = 4) -> bool:
    """Whether ``t`` is computed (through at most ``depth`` Transpose / Reshape / Cast / Mul ops) from an int8
    constant, as quantize_embedding's dequantized table is."""
    v = const_value(t)
    if v is not None:
        return v.dtype == np.int8
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if depth == 0 or node is None or node.op not in ("Transpose", "Reshape", "Cast", "Mul") or not node.inputs:
        return False
    return _stored_int8(node.inputs[0], depth - 1)


def _target(p: PassBase, node: gs.Node, w: np.ndarray, decline) -> tuple[int | None, int | None]:
    """(axis, block) the weight of ``node`` is quantized with (override precedence, per-block fallbacks)."""

    gran = p.overrides.resolve(node.name).get("weight_granularity", p.config.weight_granularity.value)
    if gran == Granularity.PER_BLOCK.value:
        axis = block_axis(node, w)
        if axis is not None:
            return axis, p.config.weight_block
        decline(f"{node.op} weight of rank {w.ndim} has no reduction-axis block layout: quantized per output "
                "channel instead")
        gran = Granularity.PER_CHANNEL.value
    return (weight_axis(node, w, 1) if gran == Granularity.PER_CHANNEL.value else None), None


def _quantize_graph(p: PassBase, graph: gs.Graph, names: NameScope, ctx: PassContext, int4: bool,
                    declined: list[Declined], used: set[str]) -> tuple[Counter, Counter, list[int]]:
    cfg = p.config
    em = _Emitter(graph, names, int4)
    done: Counter = Counter()
    cache: dict[tuple, gs.Tensor] = {}
    for node in list(graph.nodes):
        if node.op not in COMPUTE_OPS or len(node.inputs) < 2:
            continue

        def decline(why: str, node: gs.Node = node) -> None:
            declined.append(Declined(p.name, node.name, node.op, why))

        w = const_value(node.inputs[1])
        if node.op not in cfg.compute_ops:
            decline(f"{node.op} is not in this recipe's compute_ops {list(cfg.compute_ops)}")
        elif p.overrides.resolve(node.name).get("quantize", True) is False:
            decline("excluded by override")
        elif w is None and _stored_int8(node.inputs[1]):
            decline("weight is computed from an int8 constant (a head tied to the int8 embedding table of "
                    "quantize_embedding): kept as it is")
        elif w is None:
            decline("weight is not constant: left float (weight-only quantization)")
        elif w.dtype.kind != "f":
            decline("weight is not float")
        elif node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            decline("Gemm with transA=1")
        else:
            t = node.inputs[1]
            axis, block = _target(p, node, w, decline)
            q, qp = p._weight(t.name, w, axis, ctx, block)
            if t.name in ctx.weight_hints and t.name not in used:
                used.add(t.name)
                done["hints_used"] += 1
            nbits = (block and cfg.weight_format is WeightFormat.MATMULNBITS and node.op == "MatMul" and w.ndim == 2
                     and const_value(node.inputs[0]) is None)
            if nbits:
                em.matmulnbits(node, w, q, qp, cfg.nbits_accuracy_level)
            else:
                key = (t.name, axis, block)
                if key not in cache:
                    cache[key] = em.dq(t.name, w, q, qp)
                node.inputs[1] = cache[key]
            done[node.op] += 1
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return done, em.counts, em.bytes


def quantize_weights_only(p: PassBase, graph: gs.Graph, ctx: PassContext) -> PassResult:
    """The weight-only rewrite of the main graph and every If branch (Loop/Scan bodies declined)."""
    cfg = p.config
    graph, int4 = p._weight_storage(graph, ctx)
    if int4:
        graph.ir_version = max(int(graph.ir_version or 0), INT4_IR_VERSION)
    names = NameScope(graph)
    graphs = [graph] + [b for _, _, b in if_branches(graph)]
    ids = {id(g) for g in graphs}
    declined = [Declined(p.name, g.name, "subgraph", f"quantization inside Loop/Scan bodies is not supported: "
                         f"{len(g.nodes)} nodes left float")
                for g in list(iter_graphs(graph))[1:] if id(g) not in ids and g.nodes]
    nodes, inserted, nbytes, used = Counter(), Counter(), [0, 0], set()
    for g in graphs:
        d, c, b = _quantize_graph(p, g, names, ctx, int4, declined, used)
        nodes, inserted = nodes + d, inserted + c
        nbytes = [nbytes[0] + b[0], nbytes[1] + b[1]]
    hints = nodes.pop("hints_used", 0)
    for name in sorted(set(ctx.weight_hints) - used):
        declined.append(Declined(p.name, name, "weight hint", "hint not used: no weight-only quantized node reads "
                                 "this weight"))
    for name in sorted(ctx.qparam_hints):
        declined.append(Declined(p.name, name, "activation hint", "hint not used: weight-only mode leaves "
                                 "activations float"))
    n = sum(nodes.values())
    stats = {"mode": "weight_only", "quantized_nodes": dict(sorted(nodes.items())),
             "quantized_tensors": sum(inserted.values()),  # weights (activations stay float)
             "inserted": dict(sorted(inserted.items())), "weight_bytes_fp32": nbytes[0],
             "weight_bytes_quantized": nbytes[1], "hints_used": {"activation": 0, "weight": hints},
             "weight_storage": "int4" if int4 else "int8", "weight_bits": cfg.weight_bits,
             "weight_granularity": cfg.weight_granularity.value,
             "weight_block": cfg.weight_block if cfg.uses_blocks else None, "weight_format": cfg.weight_format.value}
    if n == 0:
        declined.append(p._nothing_quantized(graph))
    logger.info("weight-only: %d nodes, weights %d -> %d bytes", n, nbytes[0], nbytes[1])
    return PassResult(graph, n > 0, stats, declined)
