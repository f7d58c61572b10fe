"""Tiny models for tests, built directly with onnx.helper (no torch)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr), name)


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def bn_params(prefix: str, c: int) -> list[onnx.TensorProto]:
    return [init(f"{prefix}_g", RNG.uniform(0.5, 1.5, c).astype(np.float32)),
            init(f"{prefix}_b", RNG.uniform(-1, 1, c).astype(np.float32)),
            init(f"{prefix}_m", RNG.uniform(-1, 1, c).astype(np.float32)),
            init(f"{prefix}_v", RNG.uniform(0.5, 2, c).astype(np.float32))]


def bn(prefix: str, x: str, y: str) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization", [x, f"{prefix}_g", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"],
                            [y], name=prefix, epsilon=1e-5)


def make(nodes, inputs, outputs, inits, opset: int = 13, name: str = "g") -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def vi(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def rmsnorm(x: str, g: str, out: str) -> list[onnx.NodeProto]:
    """RMSNorm as exporters decompose it: ``x / sqrt(mean(x·x) + eps) · γ`` (an ``eps`` initializer is expected)."""
    return [helper.make_node("Mul", [x, x], [f"{out}_sq"], name=f"{out}_sq"),
            helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_ms"], name=f"{out}_mean", axes=[-1]),
            helper.make_node("Add", [f"{out}_ms", "eps"], [f"{out}_mse"], name=f"{out}_eps"),
            helper.make_node("Sqrt", [f"{out}_mse"], [f"{out}_rms"], name=f"{out}_sqrt"),
            helper.make_node("Div", [x, f"{out}_rms"], [f"{out}_n"], name=f"{out}_div"),
            helper.make_node("Mul", [f"{out}_n", g], [out], name=f"{out}_gamma")]


def cnn(c: int = 8) -> onnx.ModelProto:
    """Conv-BN-Relu -> Conv-BN-Clip(0,6) + residual -> GlobalAveragePool -> Flatten -> Gemm."""
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        bn("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "cb2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        bn("bn2", "c2", "b2"),
        helper.make_node("Clip", ["b2", "zero", "six"], ["r2"], name="relu6"),
        helper.make_node("Add", ["r2", "r1"], ["a"], name="residual"),
        helper.make_node("Relu", ["a"], ["ra"], name="relu_a"),
        helper.make_node("Conv", ["ra", "w3"], ["c3"], name="conv3"),
        helper.make_node("GlobalAveragePool", ["c3"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    inits = [init("w1", rand(c, 3, 3, 3, scale=0.3)), init("w2", rand(c, c, 3, 3, scale=0.2)),
             init("cb2", rand(c, scale=0.1)), init("w3", rand(c, c, 1, 1, scale=0.3)),
             init("zero", np.array(0, np.float32)), init("six", np.array(6, np.float32)),
             init("wf", rand(10, c, scale=0.3)), init("bf", rand(10, scale=0.1))]
    inits += bn_params("bn1", c) + bn_params("bn2", c)
    return make(nodes, [vi("x", ["N", 3, 8, 8])], [vi("y", ["N", 10])], inits)


def cnn_calib(n: int = 16) -> dict[str, np.ndarray]:
    return {"x": rand(n, 3, 8, 8)}


def attention(seq: int = 8, d: int = 16) -> onnx.ModelProto:
    """A BERT-like attention block with an additive float32-min mask built from an int64 attention_mask."""
    fmin = np.finfo(np.float32).min
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_proj"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("MatMul", ["x", "wk"], ["k0"], name="k_proj"),
        helper.make_node("Add", ["k0", "bk"], ["k"], name="k_bias"),
        helper.make_node("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
        helper.make_node("Mul", ["s0", "inv_sqrt_d"], ["s1"], name="scale"),
        helper.make_node("Cast", ["mask"], ["mf"], name="mask_cast", to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mf"], ["inv"], name="mask_inv"),
        helper.make_node("Mul", ["inv", "fmin"], ["madd0"], name="mask_mul"),
        helper.make_node("Unsqueeze", ["madd0", "ax1"], ["madd"], name="mask_unsq"),
        helper.make_node("Add", ["s1", "madd"], ["s2"], name="mask_add"),
        helper.make_node("Softmax", ["s2"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["x", "wv"], ["v0"], name="v_proj"),
        helper.make_node("Add", ["v0", "bv"], ["v"], name="v_bias"),
        helper.make_node("MatMul", ["p", "v"], ["o"], name="context"),
        helper.make_node("Add", ["o", "x"], ["y"], name="residual"),
    ]
    inits = [init("wq", rand(d, d, scale=0.3)), init("bq", rand(d, scale=0.1)),
             init("wk", rand(d, d, scale=0.3)), init("bk", rand(d, scale=0.1)),
             init("wv", rand(d, d, scale=0.3)), init("bv", rand(d, scale=0.1)),
             init("inv_sqrt_d", np.array(1 / np.sqrt(d), np.float32)), init("one", np.array(1, np.float32)),
             init("fmin", np.array(fmin, np.float32)), init("ax1", np.array([1], np.int64))]
    return make(nodes, [vi("x", ["N", seq, d]), vi("mask", ["N", seq], TensorProto.INT64)],
                [vi("y", ["N", seq, d])], inits)


def attention_calib(n: int = 8, seq: int = 8, d: int = 16) -> dict[str, np.ndarray]:
    mask = np.ones((n, seq), np.int64)
    for i in range(n):
        mask[i, seq - (i % 4):] = 0
    return {"x": rand(n, seq, d), "mask": mask}


def if_model() -> onnx.ModelProto:
    """The whole network inside an If on a bool input, as some exporters produce: then = Conv-Relu-Conv, else = Conv."""
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["t1"], name="then_conv1", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["t1"], ["t2"], name="then_relu"),
         helper.make_node("Conv", ["t2", "w2"], ["t_out"], name="then_conv2", pads=[1, 1, 1, 1])],
        "then", [], [vi("t_out", None)])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w3"], ["e_out"], name="else_conv", pads=[1, 1, 1, 1])],
        "else", [], [vi("e_out", None)])
    nodes = [helper.make_node("If", ["flag"], ["feat"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("GlobalAveragePool", ["feat"], ["p"], name="gap"),
             helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wf"], ["y"], name="fc", transB=1)]
    inits = [init("w1", rand(8, 3, 3, 3, scale=0.3)), init("w2", rand(8, 8, 3, 3, scale=0.2)),
             init("w3", rand(8, 3, 3, 3, scale=0.3)), init("wf", rand(10, 8, scale=0.3))]
    return make(nodes, [vi("x", [1, 3, 8, 8]), vi("flag", [], TensorProto.BOOL)], [vi("y", [1, 10])], inits)


def save_with_calib(folder, model: onnx.ModelProto) -> tuple:
    """``folder/m.onnx`` and ``folder/calib.npz`` (4 random samples per input): what ``qcompile compile`` takes."""
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    calib = {i.name: rand(4, *[d.dim_value for d in i.type.tensor_type.shape.dim][1:]) for i in model.graph.input}
    np.savez(folder / "calib.npz", **calib)
    return path, folder / "calib.npz"


def conv_then(op: str) -> onnx.ModelProto:
    """Conv -> Relu -> ``op`` ("TopK" after a Flatten, "NonZero", "ScatterElements" of its own values, or
    "SqueezeIf": a channel max squeezed under an If on its shape; node name 'the_op'): a quantizable model with an
    op whose output shape, lowering or control flow depends on the data or on the shapes."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu")]
    inits = [init("w", rand(4, 1, 3, 3, scale=0.3))]
    if op == "TopK":
        nodes += [helper.make_node("Flatten", ["r"], ["f"], name="flat"),
                  helper.make_node("TopK", ["f", "k"], ["y", "i"], name="the_op")]
        inits.append(init("k", np.array([3], np.int64)))
        outputs = [vi("y", [1, 3]), vi("i", [1, 3], TensorProto.INT64)]
    elif op == "NonZero":
        nodes.append(helper.make_node("NonZero", ["r"], ["y"], name="the_op"))
        outputs = [vi("y", [4, None], TensorProto.INT64)]
    elif op == "ScatterElements":  # the first 8 values written back over 8 others (TOPI's kernel: IR builder loops)
        nodes += [helper.make_node("Flatten", ["r"], ["f"], name="flat"),
                  helper.make_node("Slice", ["f", "s0", "s1", "s_ax"], ["u"], name="first"),
                  helper.make_node("ScatterElements", ["f", "idx", "u"], ["y"], name="the_op", axis=1)]
        inits += [init("s0", np.array([0], np.int64)), init("s1", np.array([8], np.int64)),
                  init("s_ax", np.array([1], np.int64)),
                  init("idx", np.array([[200, 3, 77, 150, 9, 255, 31, 64]], np.int64))]
        outputs = [vi("y", [1, 256])]
    elif op == "SqueezeIf":  # TorchScript's x.squeeze(1) of a dimension it cannot see: If(Shape(x)[1] == 1, ...)
        one, axes = helper.make_tensor("one", TensorProto.INT64, [], [1]), helper.make_tensor("a", TensorProto.INT64,
                                                                                               [1], [1])
        nodes += [helper.make_node("ReduceMax", ["r"], ["m"], name="max", axes=[1], keepdims=1),
                  helper.make_node("Shape", ["m"], ["s"], name="shape"),
                  helper.make_node("Constant", [], ["d"], name="d", value=helper.make_tensor("d", TensorProto.INT64,
                                                                                             [], [1])),
                  helper.make_node("Gather", ["s", "d"], ["n"], name="gather", axis=0),
                  helper.make_node("Constant", [], ["one"], name="one", value=one),
                  helper.make_node("Equal", ["n", "one"], ["cond"], name="eq"),
                  helper.make_node("If", ["cond"], ["y"], name="the_op", then_branch=helper.make_graph(
                      [helper.make_node("Constant", [], ["axes"], value=axes),
                       helper.make_node("Squeeze", ["m", "axes"], ["sq"])], "then", [], [vi("sq", [1, 8, 8])]),
                      else_branch=helper.make_graph([helper.make_node("Identity", ["m"], ["id"])], "else", [],
                                                    [vi("id", [1, 1, 8, 8])]))]
        outputs = [vi("y", [1, 8, 8])]
    else:
        raise ValueError(op)
    return make(nodes, [vi("x", [1, 1, 8, 8])], outputs, inits, opset=17)


def compile_exact(tmp_path, model: onnx.ModelProto, target: str, recipe: str = "w8a8"):
    """``model`` (with 4 random calibration samples) compiled with ``recipe`` for ``target`` into ``tmp_path/o``,
    checked to have every integer op bit-exact and every integer tensor equal to the reference: (artifacts, its
    comparison)."""
    from qcompile import driver

    path, calib = save_with_calib(tmp_path, model)
    art = driver.compile(str(path), calib=str(calib), recipe=recipe, target=target, out_dir=tmp_path / "o",
                         check_numerics=False, measure_latency=False)
    lsb = art.report["lsb_vs_reference"][target]
    assert "error" not in lsb and lsb["integer_ops_exact"] and lsb["max_lsb"] == 0, \
        {k: v for k, v in lsb.items() if k != "tensors"}
    return art, lsb


def assert_main_build_equal(lsb: dict) -> None:
    """The build ``qcompile run`` runs (``main``, compiled apart from the probe the per-tensor comparison reads, and
    fused further) gives the reference's outputs exactly: a schedule that is wrong only there (an epilogue that lost
    a pad's border) shows nowhere else in the report."""
    main = lsb.get("main_outputs")
    assert main and all(o.get("equal") == 1.0 for o in main), main


def one_step_through(out_dir, tensor: str, weight: np.ndarray, axes) -> float:
    """How far ONNX Runtime may be from the integer reference on a float output: its kernels round ``tensor``'s
    requantization differently at times (one step of its grid), which the float layer after it sums over ``axes``
    of ``weight`` (all ones for a plain sum). A wrong pad mode, a dropped predicate or a lost kernel is far more."""
    q = onnx.load(str(out_dir / "model.qdq.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    dq, = [n for n in q.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == f"{tensor}_quantized"]
    return float(inits[dq.input[1]]) * float(np.abs(weight).sum(axis=axes).max())


def zoo_fp32(entry, test: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fp32 zoo model's outputs on ``test`` (ONNX Runtime), batch along axis 0: the metric's baseline."""
    from qcompile import dataset, numerics
    model = onnx.load(str(entry.model))
    sess = numerics.session(str(entry.model), optimize=True)
    outs = [numerics.run(sess, s) for s in dataset.split_samples(model, test, "test")]
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
