"""Which nodes and tensors the static Q/DQ pass quantizes: a plan computed before any rewrite.

Roles: compute ops (Conv, ConvTranspose, Gemm, MatMul) always take quantized inputs; chain ops (Add, Mul, Concat,
pools) and same-scale ops (MaxPool, Reshape, Transpose, ...) are quantized only inside an integer chain — when
their inputs come from quantized producers and every consumer of their output is quantized — so a residual
stream feeding LayerNorm, a bias Add, or mask arithmetic stays float. Relu/Clip directly after a quantized producer
are fused: the quantized tensor is the activation's output (its range starts at 0, so ONNX Runtime drops the op).
Compute outputs are quantized when the chain continues, and Conv outputs always (so ORT forms QLinearConv).
Tensors that carried mask sentinels or non-finite values during calibration are never quantized.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.match import Declined, const_value, is_float, producer

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
FUSED_ACTS = ("Relu", "Clip")


@dataclass
class QDQPlan:
    compute: list[gs.Node] = field(default_factory=list)  # quantized compute nodes
    chain: set[str] = field(default_factory=set)  # names of quantized chain / same-scale nodes
    out_tensor: dict[str, gs.Tensor] = field(default_factory=dict)  # node name -> effective output (after act)
    quantized_outputs: set[str] = field(default_factory=set)  # node names whose effective output is quantized
    same_scale_of: dict[str, str] = field(default_factory=dict)  # tensor -> tensor whose qparams it reuses
    declined: list[Declined] = field(default_factory=list)


def effective_output(node: gs.Node, outs: set[str]) -> gs.Tensor:
    """The node's output, or that of a Relu/Clip (constant bounds) that is its only consumer."""
    t = node.outputs[0]
    if len(t.outputs) == 1 and t.name not in outs:
        act = t.outputs[0]
        if act.op in FUSED_ACTS and all(const_value(x) is not None for x in act.inputs[1:] if x.name):
            return act.outputs[0]
    return t


def data_inputs(node: gs.Node, same_scale: tuple[str, ...]) -> list[gs.Tensor]:
    if node.op in same_scale:
        return [node.inputs[0]]
    return [t for t in node.inputs if t.name]


def plan_qdq(graph: gs.Graph, cfg, overrides, table, pass_name: str, exact: frozenset[str] = frozenset()
             ) -> QDQPlan:
    """`exact`: tensors already exact on a grid (log2 shift operands): never quantized, but their readers are."""
    plan = QDQPlan()
    outs = {t.name for t in graph.outputs}
    ins = {t.name for t in graph.inputs}

    def decline(node: gs.Node, reason: str) -> None:
        plan.declined.append(Declined(pass_name, node.name, node.op, reason))

    def bad_tensor(t: gs.Tensor) -> str:
        if not is_float(t):
            return f"tensor {t.name} is not float32" if t.dtype is not None else f"tensor {t.name} has no known type"
        if t.name not in table:
            return f"tensor {t.name} was not calibrated"
        if table[t.name].has_sentinels:
            return f"tensor {t.name} carries mask sentinels / non-finite values"
        p = producer(t)
        if p is not None and p.op in cfg.keep_float_outputs:
            return f"tensor {t.name} is the output of {p.op}, kept float by the recipe"
        return ""

    for node in graph.nodes:
        if node.op not in COMPUTE_OPS:
            continue
        if node.op not in cfg.compute_ops:
            decline(node, f"{node.op} is not in this recipe's compute_ops {list(cfg.compute_ops)}")
            continue
        if overrides.resolve(node.name).get("quantize", True) is False:
            decline(node, "excluded by override")
            continue
        w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if node.op in ("Conv", "ConvTranspose", "Gemm") and w is None:
            decline(node, f"{node.op} weight is not constant")
            continue
        if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
            decline(node, "Gemm with transA=1")
            continue
        if w is not None and w.dtype.kind != "f":
            decline(node, "weight is not float")
            continue
        acts = [t for t in node.inputs[:2] if const_value(t) is None]
        if len(acts) == 2 and not cfg.activation_matmul:
            decline(node, "activation x activation MatMul kept float (activation_matmul: false; ONNX Runtime's "
                          "integer kernel is slower than fp32 at attention sizes)")
            continue
        acts = [t for t in acts if t.name not in exact]
        why = next((r for r in (bad_tensor(t) for t in acts) if r), "")
        if not acts:
            why = "all inputs are constant or already exact"
        if why:
            decline(node, why)
            continue
        plan.compute.append(node)
        plan.out_tensor[node.name] = effective_output(node, outs)

    compute_names = {n.name for n in plan.compute}
    cands: dict[str, gs.Node] = {}
    for node in graph.nodes:
        if node.op not in cfg.chain_ops and node.op not in cfg.same_scale_ops:
            continue
        if overrides.resolve(node.name).get("quantize", True) is False:
            continue
        dins = data_inputs(node, cfg.same_scale_ops)
        if not dins or any(const_value(t) is not None for t in dins):
            continue
        if any(bad_tensor(t) for t in dins) or not is_float(node.outputs[0]):
            continue
        cands[node.name] = node
        plan.out_tensor[node.name] = effective_output(node, outs)

    def producer_ok(t: gs.Tensor, members: set[str]) -> bool:
        if t.name in ins:
            return True
        p = producer(t)
        if p is None:
            return False
        if p.op in FUSED_ACTS and producer(p.inputs[0]) is not None:
            p2 = producer(p.inputs[0])
            if p2.name in members and plan.out_tensor.get(p2.name) is t:
                return True
        return p.name in members and plan.out_tensor.get(p.name) is t

    def consumers_ok(t: gs.Tensor, members: set[str]) -> bool:
        return t.name not in outs and bool(t.outputs) and all(c.name in members for c in t.outputs)

    members = compute_names | set(cands)
    changed = True
    while changed:
        changed = False
        for name, node in list(cands.items()):
            t = plan.out_tensor[name]
            dins = data_inputs(node, cfg.same_scale_ops)
            up = (all if node.op in cfg.same_scale_ops else any)(producer_ok(x, members) for x in dins)
            if not (up and consumers_ok(t, members) and not bad_tensor(t)):
                del cands[name]
                members.discard(name)
                changed = True
    plan.chain = set(cands)
    for node in graph.nodes:  # topological: same-scale chains resolve front to back
        if node.name in plan.chain and node.op in cfg.same_scale_ops:
            src = node.inputs[0].name
            plan.same_scale_of[plan.out_tensor[node.name].name] = plan.same_scale_of.get(src, src)
    for node in plan.compute:
        t = plan.out_tensor[node.name]
        if bad_tensor(t) or t.name in outs:
            continue
        if consumers_ok(t, members) or node.op in ("Conv", "ConvTranspose"):
            plan.quantized_outputs.add(node.name)
    plan.quantized_outputs |= plan.chain
    return plan


INT4_OPSET, INT4_IR_VERSION = 21, 10  # first opset with INT4 DequantizeLinear, first IR with INT4 tensors


def weight_axis(node: gs.Node, w: np.ndarray, input_index: int) -> int | None:
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1 if int(node.attrs.get("group", 1)) == 1 else None
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and input_index == 1 and w.ndim >= 2:
        return w.ndim - 1
    return None


def block_axis(node: gs.Node, w: np.ndarray) -> int | None:
    """The reduction axis K of a MatMul / Gemm weight (the axis blocks run along); None for other layouts."""
    if node.op == "MatMul" and w.ndim >= 2:
        return w.ndim - 2
    if node.op == "Gemm" and w.ndim == 2:
        return 1 if int(node.attrs.get("transB", 0)) else 0
    return None
