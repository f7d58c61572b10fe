"""einsum_to_matmul: two-operand Einsum contractions become MatMul (fp32 agreement through the NumericsInstrument and
against ONNX Runtime's Einsum), constant operands become 2-D weights on the right, the rest is declined with a reason;
and a model written with torch.einsum is quantized end to end."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import init, make, rand, vi
from onnx import TensorProto, helper

import qcompile
from qcompile import ir
from qcompile.instruments import CheckerInstrument, NumericsInstrument
from qcompile.match import const_value
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes.einsum import EinsumToMatMulPass

# equation, shape of A, shape of B (None: a constant of the given static shape in `CONST`), A constant?
# "N" is a dynamic axis, fed as 3
CASES = [
    ("bsd,de->bse", ["N", 5, 16], [16, 8], "B"),  # a projection on a sequence (torch.einsum / EinsumDense)
    ("de,bsd->bse", [16, 8], ["N", 5, 16], "A"),  # the weight on the left: swapped to the right
    ("bcs,cd->bsd", ["N", 16, 5], [16, 8], "B"),  # channels-first activation: a Transpose before the MatMul
    ("abc,cde->abde", ["N", 5, 16], [16, 4, 6], "B"),  # kept weight axes: split again after the MatMul
    ("abcd,cde->abe", ["N", 5, 4, 6], [4, 6, 8], "B"),  # two contracted axes: flattened to one K
    ("...d,de->...e", ["N", 2, 5, 16], [16, 8], "B"),  # an ellipsis over a rank-4 activation
    ("bij,jk", ["N", 5, 16], [16, 8], "B"),  # implicit output: bik
    ("bhqd,bhkd->bhqk", ["N", 4, 5, 8], ["N", 4, 7, 8], None),  # attention scores, both operands computed
    ("bhqk,bhkd->bhqd", ["N", 4, 5, 7], ["N", 4, 7, 8], None),  # attention times values
    ("bqhd,bkhd->bhqk", ["N", 5, 4, 8], ["N", 7, 4, 8], None),  # heads in the middle: transposes on both
    ("bd,bd->b", ["N", 16], ["N", 16], None),  # a dot product per row: nothing kept
    ("bxyd,bd->bxy", ["N", 3, 5, 16], ["N", 16], None),  # two kept axes of A against a batch-shared vector
    ("i,j->ij", [5], [7], None),  # an outer product: nothing contracted
]


def _model(eq: str, sa, sb, const: str | None) -> tuple[onnx.ModelProto, dict]:
    feeds, inputs, inits = {}, [], []
    for name, shape, is_const in (("a", sa, const == "A"), ("b", sb, const == "B")):
        concrete = [3 if d == "N" else d for d in shape]
        if is_const:
            inits.append(init(name, rand(*concrete, scale=0.3)))
        else:
            inputs.append(vi(name, shape))
            feeds[name] = rand(*concrete)
    node = helper.make_node("Einsum", ["a", "b"], ["y"], name="es", equation=eq)
    rank = np.einsum(eq, *(np.zeros([3 if d == "N" else d for d in s]) for s in (sa, sb))).ndim
    return make([node], inputs, [vi("y", [None] * rank)], inits, opset=13), feeds


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(
        None, feeds)[0]


@pytest.mark.parametrize("eq,sa,sb,const", CASES, ids=[c[0] for c in CASES])
def test_einsum_becomes_matmul_fp32_exact(eq, sa, sb, const):
    model, feeds = _model(eq, sa, sb, const)
    model = ir.normalize(model)
    ctx = PassContext(model=model, samples=[feeds])
    g = PassManager([EinsumToMatMulPass()], [CheckerInstrument(), NumericsInstrument()]).run(ir.to_graph(model), ctx)
    rec = ctx.records[0]
    assert rec["modified"] and rec["stats"]["rewritten"] == 1 and not rec["declined"]
    assert rec["numerics"]["checked"]
    ops = [n.op for n in g.nodes]
    assert "Einsum" not in ops and ops.count("MatMul") == 1
    out = ir.to_model(g, model)
    np.testing.assert_allclose(_ort(out, feeds), _ort(model, feeds), rtol=1e-5, atol=1e-6)
    mm = next(n for n in g.nodes if n.op == "MatMul")
    if const:  # the weight: a 2-D constant on the right, as the quantizer's per-channel weights expect
        w = const_value(mm.inputs[1])
        assert w is not None and w.ndim == 2 and const_value(mm.inputs[0]) is None


@pytest.mark.parametrize("eq,sa,sb,reason", [
    ("bii,bi->b", [2, 4, 4], [2, 4], "repeated"),  # a diagonal
    ("bij,bj->b", [2, 4, 5], [2, 5], "summed within one operand"),
    ("...d,de->...e", None, [16, 8], "unknown rank"),  # A reshaped by a shape of unknown length
])
def test_einsum_declined_with_reason(eq, sa, sb, reason):
    if sa is None:
        nodes, inputs = [helper.make_node("Reshape", ["x", "s"], ["a"], name="r")], [vi("x", ["n"]),
                                                                                      vi("s", ["k"], TensorProto.INT64)]
    else:
        nodes, inputs = [], [vi("a", sa)]
    model = make(nodes + [helper.make_node("Einsum", ["a", "b"], ["y"], name="es", equation=eq)],
                 inputs + [vi("b", sb)], [vi("y", [None])], [], opset=13)
    ctx = PassContext(model=model)
    model = onnx.shape_inference.infer_shapes(ir.normalize(model))  # as the driver gives passes their graph
    g = PassManager([EinsumToMatMulPass()], [CheckerInstrument()]).run(ir.to_graph(model), ctx)
    rec = ctx.records[0]
    assert not rec["modified"] and "Einsum" in [n.op for n in g.nodes]
    assert len(rec["declined"]) == 1 and reason in rec["declined"][0]["reason"]


def test_torch_einsum_model_is_quantized(tmp_path):
    """A projection written with torch.einsum (exported as Einsum) was left float by every target; now its weights
    are int8 and ONNX Runtime runs it with integer kernels close to fp32."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(16, 32, generator=g) * 0.2)
            self.v = torch.nn.Parameter(torch.randn(32, 8, generator=g) * 0.2)

        def forward(self, x):
            return torch.einsum("bsd,de->bse", torch.relu(torch.einsum("bcs,cd->bsd", x, self.w)), self.v)

    path = tmp_path / "einsum.onnx"
    x = np.random.default_rng(0).standard_normal((16, 16, 10)).astype(np.float32)
    torch.onnx.export(Net().eval(), (torch.from_numpy(x[:2]),), str(path), input_names=["x"], opset_version=17,
                      dynamo=False, dynamic_axes={"x": {0: "b"}})
    np.save(tmp_path / "calib.npy", x)
    art = qcompile.compile(str(path), calib=str(tmp_path / "calib.npy"), recipe="w8a8", target="onnxruntime",
                           out_dir=tmp_path / "out", measure_latency=False)
    qdq = next(p for p in art.report["passes"] if p["pass"] == "insert_qdq")
    assert qdq["stats"]["quantized_nodes"].get("MatMul") == 2
    test = x[:4] + 0.1
    ref = _ort(onnx.load(str(path)), {"x": test})
    got = next(iter(art.run({"x": test}).values()))
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.999, cos
