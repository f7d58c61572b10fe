"""Residual-stream rotation (passes/rotate.py): found from the graph on the zoo decoder, fp32-exact under the numerics
instrument, tied heads untied, what it declines; and the instrument's rounding floor on models with mask sentinels."""
import numpy as np
import onnx
import pytest
from onnx import helper

import qcompile
from qcompile import ir, numerics
from qcompile.errors import ConfigError
from qcompile.instruments import NumericsInstrument
from qcompile.pass_infra import PassContext, PassManager
from qcompile.passes._hadamard import hadamard, hadamard_split, kron_all, online_factors, randomized_kron_factors
from qcompile.passes._spin import Site, learn_rotation
from qcompile.passes.rotate import (
    ONLINE_SUFFIX,
    RotateConfig,
    RotateResidualPass,
    _insert_online,
    random_orthogonal,
    randomized_hadamard,
)
from qcompile.recipe import Recipe

import helpers

zoo = pytest.importorskip("qcompile_zoo")


def test_rotations_are_orthogonal():
    rng = np.random.default_rng(0)
    for q in (randomized_hadamard(64, rng), random_orthogonal(48, rng)):
        np.testing.assert_allclose(q @ q.T, np.eye(len(q)), atol=1e-12)
    for d in (8, 12, 24, 576):  # every entry ±1/√d: no channel keeps its own axis
        h = randomized_hadamard(d, rng)
        np.testing.assert_allclose(h @ h.T, np.eye(d), atol=1e-12)
        np.testing.assert_allclose(np.abs(h) * np.sqrt(d), 1.0, rtol=1e-12)
    assert randomized_hadamard(11008, rng) is None  # 43·2^j has no construction here: the pass falls back to random


def test_hadamard_constructions_and_splits():
    """Sylvester, Paley I (q ≡ 3 mod 4) and Paley II (q ≡ 1 mod 4) orders; the widths of real models split as a small
    known Hadamard times a power of two."""
    for m in (1, 2, 4, 12, 20, 28, 36, 44, 60, 76, 108, 172 * 2 * 2 * 2):
        h = hadamard(m)
        if m == 1376:  # 1376 = 32·43: none of the constructions
            assert h is None
            continue
        assert h is not None and set(np.unique(h)) <= {-1, 1}, m
        np.testing.assert_array_equal(h @ h.T, m * np.eye(m, dtype=np.int64))
    assert hadamard(6) is None and hadamard(3) is None  # no Hadamard of these orders exists
    assert hadamard_split(576) == (36, 16) and hadamard_split(1536) == (12, 128) and hadamard_split(384) == (12, 32)
    assert hadamard_split(4096) == (1, 4096) and hadamard_split(11008) is None
    rng = np.random.default_rng(1)
    for d, kind, sizes in ((1536, "hadamard", [12, 128]), (128, "hadamard", [8, 16]), (12, "hadamard", [12]),
                           (11008, "random x hadamard", [43, 256]), (7, "random", [7])):
        factors, got = online_factors(d, rng)
        assert got == kind and [len(f) for f in factors] == sizes, (d, got)
        if d <= 1536:
            r = kron_all(factors)
            np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-12)


@pytest.mark.parametrize("known_rank", [True, False])
def test_structured_online_rotation_graph(known_rank):
    """x·(A ⊗ B) as Reshape → MatMul(B) → MatMul(Aᵀ, ·) → Reshape equals the dense product, with the leading dims
    dynamic, and with x's rank unknown (a Shape node restores it)."""
    import onnx_graphsurgeon as gs

    from qcompile.ir import NameScope

    rng = np.random.default_rng(2)
    factors = randomized_kron_factors(48, rng)
    w = rng.standard_normal((48, 5)).astype(np.float32)
    x = gs.Variable("x", dtype=np.float32, shape=["b", "s", 48])
    y = gs.Variable("y", dtype=np.float32, shape=["b", "s", 5])
    writer = gs.Node("MatMul", "down", inputs=[x, gs.Constant("W", w)], outputs=[y])
    graph = gs.Graph(nodes=[writer], inputs=[x], outputs=[y], opset=17)
    if not known_rank:
        x.shape = None
    _insert_online(graph, NameScope(graph), writer, factors)
    graph.toposort()
    names = [n.name for n in graph.nodes if n is not writer]
    assert len(names) == (4 if known_rank else 5) and all(n.endswith(ONLINE_SUFFIX) for n in names)
    xs = rng.standard_normal((2, 3, 48)).astype(np.float32)
    got = numerics.session(gs.export_onnx(graph).SerializeToString()).run(None, {"x": xs})[0]
    np.testing.assert_allclose(got, xs @ kron_all(factors) @ w, rtol=1e-4, atol=1e-4)


def test_learned_rotation_lowers_the_quantized_error_and_stays_orthogonal():
    """SpinQuant's objective on activations with one outlier channel: from a random rotation (which spreads the
    outlier), the learned R lowers the per-token int4 output error further; R is orthogonal to float64 precision."""
    rng = np.random.default_rng(0)
    d = 24
    gain = np.ones(d)
    gain[[3, 17]] = [40.0, 12.0]
    sites = [Site((rng.standard_normal((512, d)) * gain).astype(np.float32), [rng.standard_normal((d, 32))])
             for _ in range(2)]
    r0 = random_orthogonal(d, rng)
    r, st = learn_rotation(sites, r0, bits=4, clip=0.9, steps=60, lr=0.02, batch=128, seed=0)
    np.testing.assert_allclose(r @ r.T, np.eye(d), atol=1e-12)
    assert st["loss"] < 0.8 * st["loss_start"], st
    assert not np.allclose(r, r0)


def test_learned_rotation_config_is_checked():
    for bad in ({"rotation": "spin"}, {"act_clip": 0.0}, {"act_bits": 1}, {"steps": -1}, {"lr": 0.0},
                {"scaling": True}, {"rotation": "learned", "scaling": True, "weight_bits": 1}):
        with pytest.raises(ConfigError):
            RotateConfig(**bad).validate()


def tiny_decoder(tied: bool = True, d: int = 16, v: int = 32) -> onnx.ModelProto:
    """Embedding -> 2 pre-norm blocks (RMSNorm with γ, a linear read by the norm, a linear writing the residual) ->
    final RMSNorm -> head (tied: MatMul with Transpose of the embedding table)."""
    rng = np.random.default_rng(3)
    inits = [helpers.init("E", rng.normal(0, 1, (v, d)).astype(np.float32)),
             helpers.init("eps", np.array(1e-6, np.float32))]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["h0"], name="embed")]
    h = "h0"
    for i in range(2):
        inits += [helpers.init(f"g{i}", rng.uniform(0.5, 2, d).astype(np.float32)),
                  helpers.init(f"w{i}", rng.normal(0, 0.3, (d, 2 * d)).astype(np.float32)),
                  helpers.init(f"o{i}", rng.normal(0, 0.3, (2 * d, d)).astype(np.float32))]
        nodes += helpers.rmsnorm(h, f"g{i}", f"n{i}")
        nodes += [helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"a{i}"], name=f"up{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"o{i}"], [f"u{i}"], name=f"down{i}"),
                  helper.make_node("Add", [h, f"u{i}"], [f"h{i + 1}"], name=f"res{i}")]
        h = f"h{i + 1}"
    inits.append(helpers.init("gf", rng.uniform(0.5, 2, d).astype(np.float32)))
    nodes += helpers.rmsnorm(h, "gf", "nf")
    if tied:
        nodes += [helper.make_node("Transpose", ["E"], ["Et"], name="tie", perm=[1, 0]),
                  helper.make_node("MatMul", ["nf", "Et"], ["logits"], name="head")]
    else:
        inits.append(helpers.init("H", rng.normal(0, 0.3, (d, v)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["nf", "H"], ["logits"], name="head"))
    return helpers.make(nodes, [helpers.vi("ids", [1, 8], onnx.TensorProto.INT64)],
                        [helpers.vi("logits", [1, 8, v])], inits)


def tiny_vit(norm: str, d: int = 16, v: int = 5) -> onnx.ModelProto:
    """ViT-like, pre-LayerNorm: x [1, 8, 12] projected (MatMul + position constant: no embedding table) -> 2 blocks
    (LayerNorm, a linear with bias read by it, a linear with bias writing the residual) -> final LayerNorm -> the first
    token (Gather on axis 1) -> Gemm head (transB). ``norm``: ``fused`` (LayerNormalization) or ``decomposed``."""
    rng = np.random.default_rng(5)
    inits = [helpers.init("P", rng.normal(0, 1, (12, d)).astype(np.float32)),
             helpers.init("pos", rng.normal(0, 1, (8, d)).astype(np.float32)),
             helpers.init("eps", np.array(1e-5, np.float32)), helpers.init("two", np.array(2.0, np.float32)),
             helpers.init("tok", np.array(0, np.int64)),
             helpers.init("H", rng.normal(0, 0.3, (v, d)).astype(np.float32)),
             helpers.init("hb", rng.normal(0, 0.3, v).astype(np.float32))]
    nodes = [helper.make_node("MatMul", ["x", "P"], ["p"], name="patch"),
             helper.make_node("Add", ["p", "pos"], ["h0"], name="pos_add")]

    def layernorm(x: str, k: str, out: str) -> list:
        inits.extend([helpers.init(f"{k}_g", rng.uniform(0.5, 2, d).astype(np.float32)),
                      helpers.init(f"{k}_b", rng.normal(0, 0.5, d).astype(np.float32))])
        if norm == "fused":
            return [helper.make_node("LayerNormalization", [x, f"{k}_g", f"{k}_b"], [out], name=k, axis=-1)]
        return [helper.make_node("ReduceMean", [x], [f"{k}_m"], name=f"{k}_mean", axes=[-1]),
                helper.make_node("Sub", [x, f"{k}_m"], [f"{k}_c"], name=f"{k}_sub"),
                helper.make_node("Pow", [f"{k}_c", "two"], [f"{k}_sq"], name=f"{k}_pow"),
                helper.make_node("ReduceMean", [f"{k}_sq"], [f"{k}_v"], name=f"{k}_var", axes=[-1]),
                helper.make_node("Add", [f"{k}_v", "eps"], [f"{k}_ve"], name=f"{k}_eps"),
                helper.make_node("Sqrt", [f"{k}_ve"], [f"{k}_s"], name=f"{k}_sqrt"),
                helper.make_node("Div", [f"{k}_c", f"{k}_s"], [f"{k}_n"], name=f"{k}_div"),
                helper.make_node("Mul", [f"{k}_n", f"{k}_g"], [f"{k}_ng"], name=f"{k}_gamma"),
                helper.make_node("Add", [f"{k}_ng", f"{k}_b"], [out], name=f"{k}_beta")]

    h = "h0"
    for i in range(2):
        inits += [helpers.init(f"w{i}", rng.normal(0, 0.3, (d, 2 * d)).astype(np.float32)),
                  helpers.init(f"wb{i}", rng.normal(0, 0.3, 2 * d).astype(np.float32)),
                  helpers.init(f"o{i}", rng.normal(0, 0.3, (2 * d, d)).astype(np.float32)),
                  helpers.init(f"ob{i}", rng.normal(0, 0.3, d).astype(np.float32))]
        nodes += layernorm(h, f"ln{i}", f"n{i}")
        nodes += [helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"a{i}"], name=f"up{i}"),
                  helper.make_node("Add", [f"a{i}", f"wb{i}"], [f"ab{i}"], name=f"up_bias{i}"),
                  helper.make_node("Relu", [f"ab{i}"], [f"r{i}"], name=f"act{i}"),
                  helper.make_node("MatMul", [f"r{i}", f"o{i}"], [f"u{i}"], name=f"down{i}"),
                  helper.make_node("Add", [f"ob{i}", f"u{i}"], [f"ub{i}"], name=f"down_bias{i}"),
                  helper.make_node("Add", [h, f"ub{i}"], [f"h{i + 1}"], name=f"res{i}")]
        h = f"h{i + 1}"
    nodes += layernorm(h, "lnf", "nf")
    nodes += [helper.make_node("Gather", ["nf", "tok"], ["cls"], name="cls_token", axis=1),
              helper.make_node("Gemm", ["cls", "H", "hb"], ["logits"], name="head", transB=1)]
    return helpers.make(nodes, [helpers.vi("x", [1, 8, 12])], [helpers.vi("logits", [1, v])], inits, opset=17)


def _run_pass(model: onnx.ModelProto, config: RotateConfig | None = None):
    model = onnx.shape_inference.infer_shapes(ir.normalize(model))
    feeds = [{"ids": np.random.default_rng(i).integers(0, 32, (1, 8)).astype(np.int64)} for i in range(4)] \
        if model.graph.input[0].name == "ids" else [numerics.seeded_inputs(model, i) for i in range(4)]
    ctx = PassContext(model=model, samples=feeds)
    graph = PassManager([RotateResidualPass(config)], [NumericsInstrument()]).run(ir.to_graph(model), ctx)
    return model, ir.to_model(graph, model), feeds, ctx.records[-1]


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_decoder_rotation_exact(tied):
    model, rotated, feeds, rec = _run_pass(tiny_decoder(tied), RotateConfig(rotation="hadamard"))
    assert rec["modified"] and rec["numerics"]["checked"]
    st = rec["stats"]
    assert (st["rotation"], st["writers"], st["norms"], st["readers"], st["tied_head"]) == \
        ("hadamard", 2, 3, 3, tied)
    a, b = numerics.session(model.SerializeToString()), numerics.session(rotated.SerializeToString())
    for f in feeds:
        np.testing.assert_allclose(b.run(None, f)[0], a.run(None, f)[0], rtol=1e-4, atol=1e-4)
    # the stream really is rotated: the embedding table is no longer the original one, and γ moved into the readers
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in rotated.graph.initializer}
    e0 = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "E"))
    gathered = next(n for n in rotated.graph.node if n.op_type == "Gather").input[0]
    assert not np.allclose(tables[gathered], e0)
    assert all(np.all(v == 1.0) for k, v in tables.items() if "unit_gamma" in k)


@pytest.mark.parametrize("d", [16, 24])
def test_online_rotation_of_writer_inputs_exact(d):
    """online: every residual writer reads x·R computed at run time, Rᵀ folded into its weight."""
    model, rotated, feeds, rec = _run_pass(tiny_decoder(tied=True, d=d), RotateConfig(online=True))
    split = {16: "4x8", 24: "12x4"}[d]  # the writers read 2·d channels: a Kronecker product of two Hadamards
    assert rec["modified"] and rec["numerics"]["checked"] and rec["stats"]["online"] == {f"hadamard {split}": 2}
    assert rec["stats"]["rotation"] == "hadamard"  # d = 24 = 12·2 too
    online = [n for n in rotated.graph.node if n.name.endswith(ONLINE_SUFFIX)]
    assert [n.op_type for n in online].count("MatMul") == 4 and len(online) == 8
    readers = {i: n for n in rotated.graph.node for i in n.input}
    for n in (n for n in online if n.name.endswith("_merge" + ONLINE_SUFFIX)):  # each feeds a writer, whose output
        writer = readers[n.output[0]]  # is added to the stream
        assert writer.op_type == "MatMul" and readers[writer.output[0]].op_type == "Add"
    a, b = numerics.session(model.SerializeToString()), numerics.session(rotated.SerializeToString())
    for f in feeds:
        np.testing.assert_allclose(b.run(None, f)[0], a.run(None, f)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm", ["fused", "decomposed"])
@pytest.mark.parametrize("rotation", ["hadamard", "learned"])
def test_layernorm_stream_centered_and_rotated_exact(norm, rotation):
    """A pre-LayerNorm stream (ViT-like) with no embedding table: centered (SliceGPT) so that its LayerNorms become
    RMSNorms, rotated from a run-time MatMul at its start, LayerNorm β folded into the readers' biases (a Gemm head
    behind a class-token Gather); fused and decomposed LayerNorms; fp32-exact."""
    config = RotateConfig(rotation=rotation, online=True, steps=10, max_tokens=64)
    model, rotated, feeds, rec = _run_pass(tiny_vit(norm), config)
    st = rec["stats"]
    assert rec["modified"] and rec["numerics"]["checked"], rec
    assert st["layernorm"].startswith("3 LayerNorms made RMSNorms") and st["start"].startswith("run-time MatMul 16x16")
    assert (st["writers"], st["norms"], st["readers"]) == (2, 3, 3)
    ops = [n.op_type for n in rotated.graph.node]
    assert "LayerNormalization" not in ops and ops.count("Sub") == 0  # no mean subtraction left
    a, b = numerics.session(model.SerializeToString()), numerics.session(rotated.SerializeToString())
    for f in feeds:
        np.testing.assert_allclose(b.run(None, f)[0], a.run(None, f)[0], rtol=1e-4, atol=1e-4)


def test_learned_rotation_on_tiny_decoder_exact():
    """rotation: learned folds the optimized (not the Hadamard) residual and online rotations, still fp32-exact."""
    model, rotated, feeds, rec = _run_pass(tiny_decoder(tied=True), RotateConfig(rotation="learned", online=True,
                                                                                  steps=20, max_tokens=64))
    st = rec["stats"]
    assert rec["modified"] and rec["numerics"]["checked"] and st["rotation"] == "learned from hadamard"
    assert st["online"] == {"learned from hadamard 4x8": 2}
    assert set(st["learned_loss"]) == {"residual", "down0", "down1"}
    a, b = numerics.session(model.SerializeToString()), numerics.session(rotated.SerializeToString())
    for f in feeds:
        np.testing.assert_allclose(b.run(None, f)[0], a.run(None, f)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model", ["decoder", "vit"])
def test_learned_rotation_with_ostquant_scaling_exact(model):
    """scaling: true (OSTQuant): per-norm channel scales learned with the rotation, the joint loss (int4 activations
    and weights) lowered, folded exactly: into the RMSNorm's γ, or a Mul after a LayerNorm made RMSNorm."""
    m = tiny_decoder(tied=True) if model == "decoder" else tiny_vit("fused")
    model_, rotated, feeds, rec = _run_pass(m, RotateConfig(rotation="learned", online=True, scaling=True, steps=20,
                                                            max_tokens=64))
    st = rec["stats"]
    assert rec["modified"] and rec["numerics"]["checked"] and st["scaling"].startswith("3 norms, scales")
    lo, hi = (float(v) for v in st["scaling"].split("scales ")[1].split("-"))
    assert lo < 1.0 < hi  # the scales moved
    start, end = (float(v) for v in st["learned_loss"]["residual"].split(" -> "))
    assert end < start
    a, b = numerics.session(model_.SerializeToString()), numerics.session(rotated.SerializeToString())
    for f in feeds:
        np.testing.assert_allclose(b.run(None, f)[0], a.run(None, f)[0], rtol=1e-4, atol=1e-4)


def test_declines_stream_outputs_and_models_without_a_stream():
    m = tiny_decoder(tied=False)
    m.graph.output.append(helpers.vi("h1", [1, 8, 16]))  # the stream leaves the graph: it would come out rotated
    _, _, _, rec = _run_pass(m)
    assert not rec["modified"] and "graph output" in rec["declined"][0]["reason"]
    _, _, _, rec = _run_pass(helpers.attention())  # no residual stream at all
    assert not rec["modified"] and "0 residual streams" in rec["declined"][0]["reason"]


def test_post_norm_transformer_declined_by_name():
    """MiniLM (BERT, post-norm: every residual sum goes only into a LayerNorm) is declined for its structure; the
    pre-norm ViT, whose last residual sum alone feeds only the final norm, is not called post-norm."""
    from qcompile.passes._stream import find_stream as _find

    _, why = _find(ir.to_graph(onnx.load(str(zoo.build("minilm").model))))
    assert why.startswith("post-norm transformer") and "12 residual sums" in why, why
    _, why = _find(ir.to_graph(onnx.load(str(zoo.build("vit-digits").model))))
    assert "post-norm" not in why and why


@pytest.mark.parametrize("online", [False, True])
def test_zoo_decoder_rotation_fp32_exact(tmp_path, online):
    """llama-bytes (d = 128: randomized Hadamard) through the CLI's compile path, instrument on."""
    e = zoo.build("llama-bytes")
    rec = Recipe.from_dict({"name": "rot", "passes": ["fold_constants", {"name": "rotate_residual",
                                                                          "online": online}]})
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=rec, out_dir=tmp_path, measure_latency=False)
    r = next(p for p in art.report["passes"] if p["pass"] == "rotate_residual")
    assert r["modified"] and r["numerics"]["checked"] and r["stats"]["rotation"] == "hadamard"
    assert (r["stats"]["writers"], r["stats"]["norms"], r["stats"]["readers"]) == (8, 9, 21)
    assert sum(r["stats"]["online"].values()) == (8 if online else 0)
    assert art.report["outputs"]["logits"]["sqnr_db"] > 100


@pytest.mark.parametrize("name", ["vit-digits", "minilm"])
def test_zoo_layernorm_transformers_rotation_fp32_exact(tmp_path, name):
    """vit-digits (pre-LayerNorm, patch-embedding start, class-token head): the whole stream rotated, fp32-exact.
    MiniLM (post-LayerNorm BERT): the stream declined by name, the writers' inputs still rotated at run time."""
    e = zoo.build(name)
    rec = Recipe.from_dict({"name": "rot", "passes": ["fold_constants", {"name": "rotate_residual", "online": True}]})
    art = qcompile.compile(str(e.model), calib=str(e.calib), recipe=rec, out_dir=tmp_path, measure_latency=False,
                           max_samples=4)
    r = next(p for p in art.report["passes"] if p["pass"] == "rotate_residual")
    assert r["modified"] and r["numerics"]["checked"]
    if name == "vit-digits":
        assert r["stats"]["rotation"] == "hadamard" and r["stats"]["layernorm"].startswith("9 LayerNorms")
        assert (r["stats"]["writers"], r["stats"]["readers"]) == (8, 9) and not r["declined"]
        assert r["stats"]["online"] == {"hadamard 8x8": 4, "hadamard 8x16": 4}
    else:
        assert r["stats"]["rotation"] == "none (post-norm)" and "post-norm" in r["declined"][0]["reason"]
        assert r["stats"]["online"] == {"hadamard 12x32": 6, "hadamard 12x128": 6}
    assert all(o["sqnr_db"] > 100 for o in art.report["outputs"].values())


def test_rounding_floor_survives_mask_sentinels():
    """A computed float-min (a mask) moved by one ulp outward overflows, and -inf·0 is NaN; a negative base to the
    power 2·(1 + ulp) is NaN too. Either would make the rounding floor NaN and refuse every exact rewrite."""
    fmin = np.finfo(np.float32).min
    nodes = [helper.make_node("Mul", ["x", "zero"], ["z0"]),
             helper.make_node("Sub", ["z0", "x"], ["neg"]),
             helper.make_node("Pow", ["neg", "two"], ["sq"]),  # NaN if the exponent 2 were moved by an ulp
             helper.make_node("Mul", ["sq", "zero"], ["z"]),
             helper.make_node("Add", ["z", "fmin"], ["mask"]),  # a computed value at float min
             helper.make_node("Mul", ["mask", "zero"], ["gone"]),  # 0 in fp32, NaN if mask became -inf
             helper.make_node("Add", ["x", "gone"], ["y"])]
    m = helpers.make(nodes, [helpers.vi("x", [1, 4])], [helpers.vi("y", [1, 4])],
                     [helpers.init("zero", np.array(0.0, np.float32)), helpers.init("fmin", np.array(fmin, np.float32)),
                      helpers.init("two", np.array(2.0, np.float32))])
    p = numerics.perturbed(m)
    y = numerics.session(p.SerializeToString()).run(None, {"x": np.ones((1, 4), np.float32)})[0]
    assert np.all(np.isfinite(y)) and np.allclose(y, 1.0, rtol=1e-6)
