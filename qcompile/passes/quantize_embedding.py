"""Weight-only int8 embedding tables: ``Gather(E, ids)`` with a constant float table E [V, H] (axis 0).

Identity (per-row symmetric quantization, ``E ≈ diag(s)·E_q``, ``s_v = max|E_v| / 127``):

    Gather(E, ids) ≈ Cast(Gather(E_q, ids), float) · Gather(s[:, None], ids)

Only the looked-up rows are dequantized, at run time, so the file shrinks ~4x (MiniLM's 30522 x 384 word table is half
the model) at the cost of three small ops per lookup; a DequantizeLinear on the whole table would dequantize all of it
every inference. Per-row scales keep rare tokens with small norms accurate.

Tied tables (``tied: true``): a table that other nodes read too (a language model's head tied to its embedding,
``MatMul(h, Transpose(E))``) would otherwise stay float in the file for them. They read
``Cast(E_q)·s`` instead (Cast and Mul like the lookups; a DequantizeLinear would read as an already quantized model
to insert_qdq): one int8 table serves both (smollm2-135m: the 113 MB float table becomes 28 MB); ONNX Runtime folds
the two ops over constants once, when the session is created. The head's weights then carry the
same per-row int8 error as the lookups (int8 with a scale per vocabulary entry = per output channel of the head).
Declined: non-constant or non-float tables, tables below ``min_elements``, Gather on another axis.
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
    tied: bool = True  # other readers of a quantized table (a tied LM head) read the dequantized int8 table


class QuantizeEmbeddingPass(PassBase):
    name = "quantize_embedding"
    kind = PassKind.QUANTIZE

    def __init__(self, config: EmbeddingConfig | None = None) -> None:
        self.config = config or EmbeddingConfig()

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        uniq = NameScope(graph)
        done = tied = 0
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
                if self.config.tied:
                    tied += self._tie(g, node.inputs[0], node, qt, st, uniq)
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
        return PassResult(graph, done > 0, {"quantized_lookups": done, "tied_readers": tied,
                                            "table_bytes_fp32": before, "table_bytes_quantized": after}, declined)

    @staticmethod
    def _tie(g: gs.Graph, table: gs.Tensor, gather: gs.Node, qt: gs.Constant, st: gs.Constant,
             uniq: NameScope) -> int:
        """Point the table's readers other than Gathers on axis 0 at ``Cast(qt)·st``."""
        readers = [n for n in table.outputs if n is not gather and n in g.nodes
                   and not (n.op == "Gather" and n.inputs[0] is table and int(n.attrs.get("axis", 0)) == 0)]
        if not readers:
            return 0
        cast = gs.Variable(uniq(f"{table.name}_int8_float"), dtype=np.float32, shape=list(table.shape))
        deq = gs.Variable(uniq(f"{table.name}_dequantized"), dtype=np.float32, shape=list(table.shape))
        g.nodes.extend([  # Cast and Mul, not DequantizeLinear: the model holds no Q/DQ before insert_qdq runs
            gs.Node("Cast", uniq(f"{table.name}_cast"), attrs={"to": 1}, inputs=[qt], outputs=[cast]),
            gs.Node("Mul", uniq(f"{table.name}_dequantize"), inputs=[cast, st], outputs=[deq])])
        for n in readers:
            for i, t in enumerate(n.inputs):
                if t is table:
                    n.inputs[i] = deq
        return len(readers)
