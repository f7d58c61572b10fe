"""LSTM / GRU / RNN unrolled over a static sequence (qcompile.recurrent): the unrolled float graph against ONNX
Runtime's recurrent kernels (onnx's reference where ORT has none: layout 1) for every direction, layout, initial
state, peepholes, clip and GRU's linear_before_reset; the cases kept as they are, with their reasons; and a CNN +
bidirectional LSTM (a CRNN text recognizer's shape) built for tvm-x86, bit-exact against the integer reference."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import vi
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from qcompile import lowering
from qcompile.recurrent import MAX_STEPS, unroll

RNG = np.random.default_rng(7)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _model(op, direction="forward", layout=0, init=True, peep=False, lbr=0, clip=None, steps=5, bias=True,
           lens=None, weights_input=False):
    batch, inp, hidden = 2, 6, 4
    dirs = 2 if direction == "bidirectional" else 1
    g = GATES[op]
    w = (RNG.standard_normal((dirs, g * hidden, inp)) * 0.5).astype(np.float32)
    r = (RNG.standard_normal((dirs, g * hidden, hidden)) * 0.5).astype(np.float32)
    xs = [steps, batch, inp] if layout == 0 else [batch, steps, inp]
    ss = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    inputs, feeds, inits = [vi("x", xs)], {"x": RNG.standard_normal(xs).astype(np.float32)}, []
    if weights_input:
        inputs.append(vi("W", list(w.shape)))
        feeds["W"] = w
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    inits.append(numpy_helper.from_array(r, "R"))
    ins = ["x", "W", "R", ""]
    if bias:
        inits.append(numpy_helper.from_array((RNG.standard_normal((dirs, 2 * g * hidden)) * 0.5).astype(np.float32),
                                             "B"))
        ins[3] = "B"
    ins.append("")
    if lens is not None:
        inits.append(numpy_helper.from_array(np.array(lens, np.int32), "lens"))
        ins[4] = "lens"
    for s in ("h0", "c0")[:2 if op == "LSTM" else 1]:
        if init:
            inputs.append(vi(s, ss))
            feeds[s] = RNG.standard_normal(ss).astype(np.float32)
            ins.append(s)
        else:
            ins.append("")
    if peep:
        inits.append(numpy_helper.from_array(RNG.standard_normal((dirs, 3 * hidden)).astype(np.float32), "P"))
        ins.append("P")
    attrs = {"hidden_size": hidden, "direction": direction, "layout": layout}
    if op == "GRU":
        attrs["linear_before_reset"] = lbr
    if clip is not None:
        attrs["clip"] = clip
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    graph = helper.make_graph([helper.make_node(op, ins, outs, name="rec", **attrs)], "g", inputs,
                              [helper.make_tensor_value_info(o, 1, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model, feeds


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


CASES = [{"op": op, "direction": d, "layout": lay, "init": init} for op in GATES
         for d in ("forward", "reverse", "bidirectional") for lay in (0, 1) for init in (True, False)]
CASES += [{"op": "LSTM", "direction": "bidirectional", "peep": True}, {"op": "LSTM", "layout": 1, "init": False, "peep": True},
          {"op": "GRU", "direction": "bidirectional", "layout": 1, "lbr": 1}, {"op": "GRU", "init": False, "lbr": 1},
          {"op": "GRU", "direction": "reverse", "lbr": 1, "clip": 0.8}, {"op": "LSTM", "clip": 0.5},
          {"op": "RNN", "init": False, "bias": False}, {"op": "LSTM", "lens": [5, 5]}]


@pytest.mark.parametrize("case", CASES, ids=["-".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
def test_unrolled_matches_the_recurrent_op(case):
    model, feeds = _model(**case)
    unrolled, notes = unroll(model)
    assert [n["op"] for n in notes] == [case["op"]] and notes[0]["reason"].startswith("float: unrolled over its 5")
    assert not any(n.op_type in GATES for n in unrolled.graph.node)
    # ORT has no batch-major (layout 1) recurrent kernels: onnx's reference is the oracle there
    want = ReferenceEvaluator(model).run(None, feeds) if case.get("layout") else _ort(model, feeds)
    got = _ort(unrolled, feeds)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw,reason", [
    ({"lens": [5, 3]}, "sequence_lens"),
    ({"weights_input": True}, "weights are not constants"),
    ({"steps": MAX_STEPS + 1}, f"more than the {MAX_STEPS}"),
])
def test_kept_with_reason(kw, reason):
    model, _ = _model("LSTM", **kw)
    unrolled, notes = unroll(model)
    assert [n.op_type for n in unrolled.graph.node] == ["LSTM"]
    assert notes[0]["reason"].startswith("kept as LSTM") and reason in notes[0]["reason"]


def test_dynamic_sequence_kept_then_unrolled_once_specialized():
    model, feeds = _model("GRU")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    assert unroll(model)[1][0]["reason"] == "kept as GRU: its sequence length is not static"
    low = lowering.lower(lowering.specialize(model, {k: list(v.shape) for k, v in feeds.items()}))
    assert low.fallbacks[0]["op"] == "GRU" and low.fallbacks[0]["reason"].startswith("float: unrolled over its 5")
    assert sum(f["op"] == "GRU" for f in low.fallbacks) == 1 and len(low.fallbacks) == 1  # one row, not one per op
    np.testing.assert_allclose(_ort(low.model, feeds)[0], _ort(model, feeds)[0], rtol=1e-5, atol=1e-6)


def test_crnn_on_tvm_x86_bit_exact(tmp_path):
    """A conv feature extractor, a bidirectional LSTM over its columns and a linear classifier per column: TVM's
    importer has no LSTM, so this was declined on every TVM target; now tvm-x86 builds it and its integer tensors and
    outputs equal the integer reference's."""
    pytest.importorskip("tvm")
    torch = pytest.importorskip("torch")
    import qcompile

    class CRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.lstm = torch.nn.LSTM(8 * 4, 16, batch_first=True, bidirectional=True)
            self.fc = torch.nn.Linear(32, 11)

        def forward(self, x):
            f = torch.relu(self.conv(x))  # [b, 8, 4, w]
            f = f.flatten(1, 2).transpose(1, 2)  # [b, w, 32]
            y, _ = self.lstm(f)
            return self.fc(y)

    x = np.random.default_rng(0).standard_normal((8, 1, 4, 6)).astype(np.float32)
    path = tmp_path / "crnn.onnx"
    torch.onnx.export(CRNN().eval(), (torch.from_numpy(x[:1]),), str(path), input_names=["x"], opset_version=17,
                      dynamo=False, dynamic_axes={"x": {0: "b"}})
    assert any(n.op_type == "LSTM" for n in onnx.load(str(path)).graph.node)
    np.save(tmp_path / "calib.npy", x)
    art = qcompile.compile(str(path), calib=str(tmp_path / "calib.npy"), recipe="w8a8", target="tvm-x86",
                           out_dir=tmp_path / "out", measure_latency=False, check_numerics=False)
    lsb = art.report["lsb_vs_reference"]["tvm-x86"]
    assert lsb["equal"] == 1.0 and all(m["equal"] == 1.0 for m in lsb["main_outputs"])
    rows = [f for f in art.report["fallbacks"] if f["op"] == "LSTM"]
    assert len(rows) == 1 and rows[0]["reason"].startswith("float: unrolled over its 6 steps")
    qdq = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert [d["op"] for d in qdq["declined"]] == ["LSTM"] and "kept float" in qdq["declined"][0]["reason"]
    ref = _ort(onnx.load(str(path)), {"x": x[:1]})[0]
    got = next(iter(art.run({"x": x[:1]}).values()))
    assert float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got)) > 0.99
