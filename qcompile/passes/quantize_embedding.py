"""Weight-only int8 embedding tables: ``Gather(E, ids)`` with a constant float table E [V, H] (axis 0).

Identity (per-row symmetric quantization, ``E ≈ diag(s)·E_q``, ``s_v = max|E_v| / 127``):

    Gather(E, ids) ≈ Cast(Gather(E_q, ids), float) · Gather(s[:, None], ids)

Only the looked-up rows are dequantized, at run time, so the file shrinks ~4x (MiniLM's 30522 x 384 word table is half
the model) at the cost of three small ops per lookup; a DequantizeLinear on the whole table would dequantize all of it
every inference. Per-row scales keep rare tokens with small norms accurate. Declined: non-constant or non-float
tables, tables below ``min_elements``, Gather on another axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.ir import NameScope, iter_graphs
from qcompile.match import Declined, const_value
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import ConfigBase, PassKind


@dataclass(frozen=True)
class EmbeddingConfig(ConfigBase):
    min_elements: int = 65536


class QuantizeEmbeddingPass(PassBase):
    name = "quantize_embedding"
    kind = PassKind.QUANTIZE

    def __init__(self, config: EmbeddingConfig | None = None) -> None:
        self.config = config or EmbeddingConfig()

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        uniq = NameScope(graph)
        done = 0
        before = after = 0

        for g in iter_graphs(graph):
            tables: dict[str, tuple[gs.Constant, gs.Constant]] = {}
            for node in [n for n in g.nodes if n.op == "Gather"]:
                e = const_value(node.inputs[0])
                if e is None or e.dtype.kind != "f" or e.ndim != 2 or int(node.attrs.get("axis", 0)) != 0:
                    continue
                if e.size < self.config.min_elements:
                    declined.append(Declined(self.name, node.name, node.op,
                                             f"table of {e.size} elements below min_elements"))
                    continue
                key = node.inputs[0].name
                if key not in tables:
                    s = np.abs(e).max(axis=1).astype(np.float32) / np.float32(127.0)
                    s = np.where(s > 0, s, np.float32(1.0)).astype(np.float32)
                    q = np.clip(np.rint(e / s[:, None]), -127, 127).astype(np.int8)
                    tables[key] = (gs.Constant(uniq(f"{key}_quantized"), q),
                                   gs.Constant(uniq(f"{key}_row_scale"), s[:, None].copy()))
                    before, after = before + e.nbytes, after + q.nbytes + s.nbytes
                qt, st = tables[key]
                ids, y = node.inputs[1], node.outputs[0]
                rows = gs.Variable(uniq(f"{y.name}_int8_rows"), dtype=np.int8)
                rows_f = gs.Variable(uniq(f"{y.name}_rows_float"), dtype=np.float32)
                scale = gs.Variable(uniq(f"{y.name}_row_scales"), dtype=np.float32)
                node.outputs.clear()
                node.inputs.clear()
                g.nodes.extend([
                    gs.Node("Gather", uniq(f"{node.name}_int8"), attrs={"axis": 0}, inputs=[qt, ids], outputs=[rows]),
                    gs.Node("Gather", uniq(f"{node.name}_scale"), attrs={"axis": 0}, inputs=[st, ids],
                            outputs=[scale]),
                    gs.Node("Cast", uniq(f"{node.name}_cast"), attrs={"to": 1}, inputs=[rows], outputs=[rows_f]),
                    gs.Node("Mul", uniq(f"{node.name}_dequantize"), inputs=[rows_f, scale], outputs=[y])])
                done += 1
            g.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(graph, done > 0, {"quantized_lookups": done, "table_bytes_fp32": before,
                                            "table_bytes_quantized": after}, declined)
