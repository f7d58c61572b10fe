"""Dynamic quantization: int8 weights offline, activations quantized at run time per tensor or per token.

For ``y = x·W (+ b)`` with a constant W [K, N] (MatMul, or Gemm with transA = 0, converted: B -> B^T if transB,
alpha folded into the weight scale, beta·C into the bias):

    (x_q, s_x, z_x) = DynamicQuantizeLinear(x)                   # uint8, per tensor, at run time
    y = Cast(MatMulInteger(x_q, W_q, z_x, z_w), float) · (s_x · s_w)   (+ b)

with W_q int8 symmetric per output column (s_w [N], z_w = 0). This is the pattern ONNX Runtime's
``quantize_dynamic`` emits and fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat (u8 x s8, fast on x86).
``activation_granularity: per_token`` quantizes each row of the GEMM with its own scale instead
(:mod:`qcompile.passes._dynamic`). Declined: non-constant weights, Gemm with transA.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from qcompile.errors import ConfigError
from qcompile.ir import NameScope, default_opset, if_branches, iter_graphs
from qcompile.match import Declined
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.passes._dynamic import (
    integer_linear,
    linear_weight,
    per_tensor_input,
    per_token_input,
    weight_integers,
)
from qcompile.types import ConfigBase, Granularity, PassKind


@dataclass(frozen=True)
class DynamicConfig(ConfigBase):
    weight_granularity: Granularity = Granularity.PER_CHANNEL
    activation_granularity: Granularity = Granularity.PER_TENSOR  # or per_token (passes/_dynamic.py)
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if self.weight_granularity not in (Granularity.PER_CHANNEL, Granularity.PER_TENSOR):
            raise ConfigError(f"insert_dynamic.weight_granularity must be per_channel or per_tensor, got "
                              f"{self.weight_granularity.value} (block-wise weights: insert_qdq with weight_only)")
        if self.activation_granularity not in (Granularity.PER_TENSOR, Granularity.PER_TOKEN):
            raise ConfigError(f"insert_dynamic.activation_granularity must be per_tensor or per_token, got "
                              f"{self.activation_granularity.value}")
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
            self._quantize_graph(g, uniq, counts, declined, int(graph.opset or default_opset(ctx.model)))
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, bool(counts), {"quantized_nodes": dict(counts)}, declined)

    def _quantize_graph(self, graph: gs.Graph, uniq, counts: Counter, declined: list[Declined], opset: int) -> None:
        dq_cache: dict[str, tuple] = {}
        per_token = self.config.activation_granularity is Granularity.PER_TOKEN
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
            w, bias, alpha, why = linear_weight(node)
            if w is None:
                declined.append(Declined(self.name, node.name, node.op, why))
                continue
            gran = ov.get("weight_granularity", self.config.weight_granularity.value)
            x = node.inputs[0]
            if x.name not in dq_cache:  # one quantized activation, shared by its consumers
                dq_cache[x.name] = (per_token_input(graph, uniq, x, 8, opset) if per_token
                                    else per_tensor_input(graph, uniq, x))
            integer_linear(graph, uniq, node, *dq_cache[x.name],
                           *weight_integers(w, gran == Granularity.PER_CHANNEL.value), bias, alpha, per_token)
            counts[node.op] += 1
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
