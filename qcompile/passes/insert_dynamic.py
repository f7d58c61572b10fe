"""Dynamic quantization: int8 weights offline, activations quantized at run time per tensor.

For ``y = x·W (+ b)`` with a constant W [K, N] (MatMul, or Gemm with transA = 0, converted: B -> B^T if transB,
alpha folded into the weight scale, beta·C into the bias):

    (x_q, s_x, z_x) = DynamicQuantizeLinear(x)                   # uint8, per tensor, at run time
    y = Cast(MatMulInteger(x_q, W_q, z_x, z_w), float) · (s_x · s_w)   (+ b)

with W_q int8 symmetric per output column (s_w [N], z_w = 0). This is the pattern ONNX Runtime's
``quantize_dynamic`` emits and fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat (u8 x s8, fast on x86).
Declined: non-constant weights, Gemm with transA, rank-1 activations.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile import quant_math
from qcompile.errors import ConfigError
from qcompile.ir import NameScope, if_branches, iter_graphs
from qcompile.match import Declined, const_value, is_float
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import ConfigBase, Granularity, PassKind, QuantDType


@dataclass(frozen=True)
class DynamicConfig(ConfigBase):
    weight_granularity: Granularity = Granularity.PER_CHANNEL
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.weight_granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR):
            raise ConfigError(f"insert_dynamic.weight_granularity must be per_channel or per_tensor, got "
                              f"{self.weight_granularity.value} (block-wise weights: insert_qdq with weight_only)")
        bad = set(self.op_types) - {"MatMul", "Gemm"}
        if bad:
            raise ConfigError(f"insert_dynamic.op_types {sorted(bad)} not supported; choose MatMul, Gemm")
        OverrideMap.build(self.overrides, {"quantize", "weight_granularity"}, "insert_dynamic.overrides")


class InsertDynamicPass(PassBase):
    name = "insert_dynamic"
    kind = PassKind.QUANTIZE

    def __init__(self, config: DynamicConfig | None = None) -> None:
        self.config = config or DynamicConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"quantize", "weight_granularity"},
                                           "insert_dynamic.overrides")

    def _weight(self, node: gs.Node) -> tuple[np.ndarray | None, np.ndarray | None, float, str]:
        """(W [K,N], bias or None, alpha, reason-if-declined)."""
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or w.dtype.kind != "f":
            return None, None, 1.0, "weight is not a float constant"
        if const_value(node.inputs[0]) is not None or not is_float(node.inputs[0]):
            return None, None, 1.0, "input is constant or not float"
        if node.op == "MatMul":
            return (w, None, 1.0, "") if w.ndim == 2 else (None, None, 1.0, "weight is not a matrix")
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

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        counts: Counter = Counter()
        uniq = NameScope(graph)

        graphs = [graph] + [b for _, _, b in if_branches(graph)]
        ids = {id(g) for g in graphs}
        for g in list(iter_graphs(graph))[1:]:
            if id(g) not in ids and g.nodes:
                declined.append(Declined(self.name, g.name, "subgraph", "quantization inside Loop/Scan bodies is "
                                         f"not supported: {len(g.nodes)} nodes left float"))
        for g in graphs:
            self._quantize_graph(g, uniq, counts, declined)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(counts), {"quantized_nodes": dict(counts)}, declined)

    def _quantize_graph(self, graph: gs.Graph, uniq, counts: Counter, declined: list[Declined]) -> None:
        dq_cache: dict[str, tuple] = {}
        for node in list(graph.nodes):
            if node.op in ("Conv", "ConvTranspose"):
                declined.append(Declined(self.name, node.name, node.op, "dynamic quantization covers MatMul/Gemm; "
                                         "convolutions stay float (use a static recipe such as w8a8)"))
            if node.op not in self.config.op_types:
                continue
            ov = self.overrides.resolve(node.name)
            if ov.get("quantize", True) is False:
                declined.append(Declined(self.name, node.name, node.op, "excluded by override"))
                continue
            w, bias, alpha, why = self._weight(node)
            if w is None:
                declined.append(Declined(self.name, node.name, node.op, why))
                continue
            gran = ov.get("weight_granularity", self.config.weight_granularity.value)
            x, y = node.inputs[0], node.outputs[0]
            base = node.name or y.name
            if x.name not in dq_cache:  # one DynamicQuantizeLinear per activation, shared by its consumers
                outs = [gs.Variable(uniq(f"{x.name}_{s}"), dtype=d, shape=sh) for s, d, sh in
                        (("quantized", np.uint8, x.shape), ("scale", np.float32, []), ("zero_point", np.uint8, []))]
                graph.nodes.append(gs.Node("DynamicQuantizeLinear", uniq(f"{x.name}_DynamicQuantizeLinear"),
                                           inputs=[x], outputs=outs))
                dq_cache[x.name] = tuple(outs)
            xq, xs, xz = dq_cache[x.name]
            qp = quant_math.weight_qparams(w, 1 if gran == Granularity.PER_CHANNEL.value else None, QuantDType.INT8)
            wq = quant_math.quantize_weight(w, qp, QuantDType.INT8)
            acc = gs.Variable(uniq(f"{base}_int32"), dtype=np.int32)
            accf = gs.Variable(uniq(f"{base}_int32_float"), dtype=np.float32)
            scale = gs.Variable(uniq(f"{base}_output_scale"), dtype=np.float32)
            w_scale = (qp.scale * np.float32(alpha)).astype(np.float32)
            mm_out = gs.Variable(uniq(f"{base}_dynamic_out"), dtype=np.float32) if bias is not None else y
            new = [
                gs.Node("MatMulInteger", uniq(f"{base}_MatMulInteger"),
                        inputs=[xq, gs.Constant(uniq(f"{base}_W_quantized"), wq), xz,
                                gs.Constant(uniq(f"{base}_W_zero_point"), qp.zero_point)], outputs=[acc]),
                gs.Node("Mul", uniq(f"{base}_scale_Mul"),
                        inputs=[xs, gs.Constant(uniq(f"{base}_W_scale"), w_scale)], outputs=[scale]),
                gs.Node("Cast", uniq(f"{base}_Cast"), attrs={"to": 1}, inputs=[acc], outputs=[accf]),
                gs.Node("Mul", uniq(f"{base}_output_Mul"), inputs=[accf, scale], outputs=[mm_out]),
            ]
            if bias is not None:
                new.append(gs.Node("Add", uniq(f"{base}_bias_Add"),
                                   inputs=[mm_out, gs.Constant(uniq(f"{base}_bias"), bias)], outputs=[y]))
            node.outputs.clear()
            node.inputs.clear()
            graph.nodes.extend(new)
            counts[node.op] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
