"""LSTM, GRU and RNN unrolled over a static sequence into the ONNX ops they are defined by.

TVM's ONNX importer has no recurrent op (a CRNN text recognizer, a keyword spotter or ddddocr's captcha reader were
declined on every TVM target), and the integer reference and the TVM targets must run the same float computation.
Once a model's shapes are fixed (:func:`qcompile.lowering.specialize`), each recurrent node whose sequence length is
static becomes, per direction: one MatMul of the whole sequence with the input weights (the biases added once), then
per step a MatMul of the previous hidden state with the recurrent weights, the gates split and activated, and the
state update, exactly as the ONNX operator definitions write them (gate orders iofc, zrh; peepholes; ``clip``;
``linear_before_reset``; ``layout`` 0 and 1; forward, reverse and bidirectional). A zero initial state (absent, or a
constant of zeros as exporters write it) skips the first step's recurrent MatMul.

Left as they are, with the reason (the target then declines the op): a sequence length that is not static or above
:data:`MAX_STEPS`, weights that are not constants, per-sample ``sequence_lens``, ``input_forget``, activations other
than Sigmoid / Tanh / Relu or with parameters.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompile.protos import graph_constants

logger = logging.getLogger(__name__)

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
MAX_STEPS = 512  # per direction: each step is ~10-15 nodes, all of them kernels for a TVM target
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_ACTS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}


class _Keep(Exception):
    """The node stays as it is, for this reason."""


class _Builder:
    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], 0

    def name(self, tag: str) -> str:
        self._n += 1
        return f"{self.prefix}/{tag}_{self._n}"

    def const(self, value: np.ndarray, tag: str = "c") -> str:
        name = self.name(tag)
        self.inits.append(numpy_helper.from_array(np.array(value, order="C"), name))  # 0-d stays 0-d
        return name

    def op(self, op: str, inputs: list[str], tag: str | None = None, outputs: int = 1, **attrs) -> list[str]:
        base = self.name(tag or op)
        outs = [f"{base}_out{i}" if outputs > 1 else f"{base}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=base, **attrs))
        return outs

    def one(self, op: str, inputs: list[str], **attrs) -> str:
        return self.op(op, inputs, **attrs)[0]


def unroll(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[dict]]:
    """``model`` with every recurrent node of its main graph that can be unrolled replaced by its ops; one
    ``{"node", "op", "reason"}`` per recurrent node, unrolled (its float ops) or kept (why)."""
    if not any(n.op_type in RECURRENT_OPS and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model, []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - the sequence length is then unknown: every node kept, with that reason
        inferred = model
    shapes = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    consts = graph_constants(model.graph)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    notes = []
    for node in model.graph.node:
        if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
            out.graph.node.append(node)
            continue
        name = node.name or node.output[0]
        try:
            b = _Builder(name)
            steps = _unroll_node(node, b, shapes, consts)
        except _Keep as why:
            out.graph.node.append(node)
            notes.append({"node": name, "op": node.op_type, "reason": f"kept as {node.op_type}: {why}"})
            continue
        out.graph.node.extend(b.nodes)
        out.graph.initializer.extend(b.inits)
        notes.append({"node": name, "op": node.op_type, "reason": f"float: unrolled over its {steps} steps into "
                      "MatMul and elementwise ops (no integer recurrent op in docs/integer.md)"})
    unrolled = sum(n["reason"].startswith("float") for n in notes)
    if unrolled:
        logger.info("unrolled %d recurrent node(s) over their static sequences", unrolled)
    return out, notes


def _unroll_node(node: onnx.NodeProto, b: _Builder, shapes: dict, consts: dict) -> int:
    op = node.op_type
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    ins = list(node.input) + [""] * (8 - len(node.input))
    x_name, w_name, r_name, b_name, lens_name, h0_name = ins[:6]
    c0_name, p_name = (ins[6], ins[7]) if op == "LSTM" else ("", "")
    layout = int(attrs.get("layout", 0))
    direction = attrs.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else direction
    dirs = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[direction]
    hidden = int(attrs["hidden_size"])
    gates = _GATES[op]
    if int(attrs.get("input_forget", 0)):
        raise _Keep("input_forget (coupled input and forget gates) is not unrolled")
    if attrs.get("activation_alpha") or attrs.get("activation_beta"):
        raise _Keep("activations with parameters are not unrolled")
    acts = [a.decode() if isinstance(a, bytes) else a for a in attrs.get("activations", [])] or \
        _DEFAULT_ACTS[op] * len(dirs)
    try:
        acts = [_ACTS[a.lower()] for a in acts]
    except KeyError as exc:
        raise _Keep(f"activation {exc.args[0]} is not unrolled") from None
    per = len(_DEFAULT_ACTS[op])
    if len(acts) != per * len(dirs):
        raise _Keep(f"{len(acts)} activations for {len(dirs)} direction(s)")
    clip = attrs.get("clip")
    x_shape = shapes.get(x_name)
    steps = x_shape[1 if layout else 0] if x_shape and len(x_shape) == 3 else None
    if not steps:
        raise _Keep("its sequence length is not static")
    if steps > MAX_STEPS:
        raise _Keep(f"{steps} steps, more than the {MAX_STEPS} unrolled")
    w, r = consts.get(w_name), consts.get(r_name)
    if w is None or r is None:
        raise _Keep("its weights are not constants")
    bias = consts.get(b_name) if b_name else np.zeros((len(dirs), 2 * gates * hidden), np.float32)
    if bias is None:
        raise _Keep("its bias is not constant")
    if lens_name:
        lens = consts.get(lens_name)
        if lens is None or np.any(lens != steps):
            raise _Keep("per-sample sequence_lens (lengths shorter than the sequence) are not unrolled")
    peep = consts.get(p_name) if p_name else None
    if p_name and peep is None:
        raise _Keep("its peepholes are not constant")
    initial = []
    for s in (h0_name, c0_name):
        v = consts.get(s) if s else None
        initial.append(None if not s or (v is not None and not np.any(v)) else s)  # a zero state: none
    if layout:  # [batch, seq, in] -> [seq, batch, in]; states [batch, dirs, hidden] -> [dirs, batch, hidden]
        x_name = b.one("Transpose", [x_name], perm=[1, 0, 2])
        initial = [b.one("Transpose", [s], perm=[1, 0, 2]) if s else None for s in initial]
    dtype = w.dtype
    lbr = op == "GRU" and bool(int(attrs.get("linear_before_reset", 0)))
    step = {"LSTM": _lstm_step, "GRU": _gru_step, "RNN": _rnn_step}[op]
    ys, hs, cs = [], [], []
    for d, reverse in enumerate(dirs):
        wb, rb = bias[d, :gates * hidden], bias[d, gates * hidden:]
        if lbr:
            x_bias = wb + np.concatenate([rb[:2 * hidden], np.zeros(hidden, dtype)])  # Rbh stays inside r·(...)
            inner_bias = rb[2 * hidden:]
        else:
            x_bias, inner_bias = wb + rb, None
        xw = b.one("MatMul", [x_name, b.const(np.ascontiguousarray(w[d].T), "W")])
        xw = b.one("Add", [xw, b.const(x_bias.astype(dtype), "B")])
        state = [b.one("Gather", [s, b.const(np.array(d, np.int64), "dir")], axis=0) if s else None
                 for s in initial]
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        y_at = {}
        for t in order:
            xt = b.one("Gather", [xw, b.const(np.array(t, np.int64), "t")], axis=0)  # [batch, gates*hidden]
            state = step(b, xt, state, r[d], acts[d * per:(d + 1) * per], hidden, clip, dtype,
                         peep[d] if peep is not None else None, inner_bias, lbr)
            y_at[t] = state[0]
        ys.append(b.one("Concat", [b.one("Unsqueeze", [y_at[t], b.const(np.array([0, 1], np.int64), "ax")])
                                   for t in range(steps)], axis=0))  # [seq, 1, batch, hidden]
        hs.append(b.one("Unsqueeze", [state[0], b.const(np.array([0], np.int64), "ax")]))
        if op == "LSTM":
            cs.append(b.one("Unsqueeze", [state[1], b.const(np.array([0], np.int64), "ax")]))
    results = [b.one("Concat", ys, axis=1), b.one("Concat", hs, axis=0)]
    if op == "LSTM":
        results.append(b.one("Concat", cs, axis=0))
    for i, res in enumerate(results):
        if i >= len(node.output) or not node.output[i]:
            continue
        if layout:
            res = b.one("Transpose", [res], perm=[2, 0, 1, 3] if i == 0 else [1, 0, 2])
        b.nodes.append(helper.make_node("Identity", [res], [node.output[i]], name=b.name("out")))
    return steps


def _gate(b: _Builder, pre: str, act: str, clip) -> str:
    if clip is not None:
        c = float(clip)
        pre = b.one("Clip", [pre, b.const(np.array(-c, np.float32), "lo"), b.const(np.array(c, np.float32), "hi")])
    return b.one(act, [pre])


def _recur(b: _Builder, xt: str, h: str | None, r: np.ndarray) -> str:
    """``xt + h·Rᵀ`` (``xt`` alone for a zero state)."""
    if h is None:
        return xt
    return b.one("Add", [xt, b.one("MatMul", [h, b.const(np.ascontiguousarray(r.T), "R")])])


def _split(b: _Builder, x: str, parts: int, hidden: int) -> list[str]:
    if parts == 1:
        return [x]
    return b.op("Split", [x, b.const(np.full(parts, hidden, np.int64), "split")], outputs=parts, axis=1)


def _lstm_step(b, xt, state, r, acts, hidden, clip, dtype, peep, _inner, _lbr):
    h, c = state
    f_act, g_act, h_act = acts
    i, o, f, cc = _split(b, _recur(b, xt, h, r), 4, hidden)
    if peep is not None and c is not None:
        i = b.one("Add", [i, b.one("Mul", [c, b.const(peep[:hidden].astype(dtype), "Pi")])])
        f = b.one("Add", [f, b.one("Mul", [c, b.const(peep[2 * hidden:].astype(dtype), "Pf")])])
    i, cc = _gate(b, i, f_act, clip), _gate(b, cc, g_act, clip)
    new_c = b.one("Mul", [i, cc])
    if c is not None:
        new_c = b.one("Add", [b.one("Mul", [_gate(b, f, f_act, clip), c]), new_c])
    if peep is not None:
        o = b.one("Add", [o, b.one("Mul", [new_c, b.const(peep[hidden:2 * hidden].astype(dtype), "Po")])])
    new_h = b.one("Mul", [_gate(b, o, f_act, clip), b.one(h_act, [new_c])])
    return [new_h, new_c]


def _gru_step(b, xt, state, r, acts, hidden, clip, dtype, _peep, inner_bias, lbr):
    h = state[0]
    f_act, g_act = acts
    xz, xr, xh = _split(b, xt, 3, hidden)
    if h is None:
        hz = hr = None
    else:
        hz, hr = _split(b, b.one("MatMul", [h, b.const(np.ascontiguousarray(r[:2 * hidden].T), "Rzr")]), 2,
                        hidden)
    z = _gate(b, b.one("Add", [xz, hz]) if hz else xz, f_act, clip)
    rg = _gate(b, b.one("Add", [xr, hr]) if hr else xr, f_act, clip)
    rh = np.ascontiguousarray(r[2 * hidden:].T)
    if lbr:  # r · (h·Rhᵀ + Rbh)
        lin = b.const(inner_bias.astype(dtype), "Rbh")
        if h is not None:
            lin = b.one("Add", [b.one("MatMul", [h, b.const(rh, "Rh")]), lin])
        pre = b.one("Add", [xh, b.one("Mul", [rg, lin])])
    else:  # (r · h)·Rhᵀ, the biases in xh already
        pre = xh if h is None else b.one("Add", [xh, b.one("MatMul", [b.one("Mul", [rg, h]), b.const(rh, "Rh")])])
    cand = _gate(b, pre, g_act, clip)
    one_minus_z = b.one("Sub", [b.const(np.array(1, dtype), "one"), z])
    new_h = b.one("Mul", [one_minus_z, cand])
    if h is not None:
        new_h = b.one("Add", [new_h, b.one("Mul", [z, h])])
    return [new_h]


def _rnn_step(b, xt, state, r, acts, _hidden, clip, _dtype, _peep, _inner, _lbr):
    return [_gate(b, _recur(b, xt, state[0], r), acts[0], clip)]
