"""The `qcompile` command end to end on a tiny model, including every bad-input path."""
import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import helpers


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompile.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    onnx.save(helpers.cnn(), str(d / "m.onnx"))
    np.savez(d / "c.npz", **helpers.cnn_calib(8))
    return d


def test_compile_run_inspect_recipes(files, tmp_path):
    out = tmp_path / "out"
    r = cli("compile", files / "m.onnx", "--calib", files / "c.npz", "--recipe", "w8a8", "--target",
            "onnxruntime", "-o", out)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.qdq.onnx", "report.html", "report.json"]
    assert "SQNR" in r.stdout and "data:image/png;base64" in (out / "report.html").read_text()
    x = helpers.rand(3, 3, 8, 8)
    np.savez(tmp_path / "x.npz", x=x)
    r = cli("run", out, "--inputs", tmp_path / "x.npz", "-o", tmp_path / "y.npz")
    assert r.returncode == 0, r.stderr
    y = np.load(tmp_path / "y.npz")["y"]
    sess = ort.InferenceSession(str(out / "model.qdq.onnx"), providers=["CPUExecutionProvider"])
    ref = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert cli("inspect", files / "m.onnx").stdout.count("Conv") >= 1
    assert "w8a8-dynamic" in cli("recipes").stdout
    assert "insert_qdq" in cli("recipes", "w8a8").stdout


def _bad(files, tmp_path, name):
    """Writes the bad input for `name` and returns compile arguments."""
    model, calib, extra = files / "m.onnx", files / "c.npz", []
    if name == "missing_model":
        model = tmp_path / "none.onnx"
    elif name == "corrupt_model":
        model = tmp_path / "bad.onnx"
        model.write_bytes(b"\x12\x34garbage")
    elif name == "calib_keys":
        calib = tmp_path / "k.npz"
        np.savez(calib, input=helpers.rand(2, 3, 8, 8))
    elif name == "calib_shape":
        calib = tmp_path / "s.npz"
        np.savez(calib, x=helpers.rand(2, 3, 9, 9))
    elif name == "calib_dtype":
        calib = tmp_path / "d.npz"
        np.savez(calib, x=np.ones((2, 3, 8, 8), np.float64))
    elif name == "calib_nan":
        calib = tmp_path / "n.npz"
        x = helpers.rand(2, 3, 8, 8)
        x[1, 0, 0, 0] = np.nan
        np.savez(calib, x=x)
    elif name == "opset":
        m = helpers.cnn()
        m.opset_import[0].version = 9
        model = tmp_path / "o9.onnx"
        onnx.save(m, str(model))
    elif name == "recipe_key":
        extra = ["--recipe", tmp_path / "r.yaml"]
        (tmp_path / "r.yaml").write_text("name: r\npasses: [fold_constants]\nbogus: 1\n")
    elif name == "unknown_recipe":
        extra = ["--recipe", "w3a3"]
    elif name == "external_escape":
        d = tmp_path / "ext"
        d.mkdir()
        onnx.save_model(helpers.cnn(), str(d / "m.onnx"), save_as_external_data=True, location="w.bin",
                        size_threshold=0)
        m = onnx.load(str(d / "m.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "../../../etc/hostname"
        (d / "m.onnx").write_bytes(m.SerializeToString())
        model = d / "m.onnx"
    elif name == "fails_at_run":  # loads, fails in ONNX Runtime's kernel (as a Mamba export's 2-D Tile repeats do)
        x = helpers.vi("x", ["n", 3])
        shape2d = onnx.numpy_helper.from_array(np.array([1, 2], np.int64), "shape2d")
        g = onnx.helper.make_graph([onnx.helper.make_node("Shape", ["x"], ["s"]),
                                    onnx.helper.make_node("Reshape", ["s", "shape2d"], ["reps"]),
                                    onnx.helper.make_node("Tile", ["x", "reps"], ["y"])], "t", [x],
                                   [helpers.vi("y", ["a", "b"])], [shape2d])
        model = tmp_path / "tile.onnx"
        onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)]), str(model))
        calib = tmp_path / "t.npz"
        np.savez(calib, x=helpers.rand(4, 2, 3))
    return ["compile", model, "--calib", calib, *extra]


@pytest.mark.parametrize("name", ["missing_model", "corrupt_model", "calib_keys", "calib_shape", "calib_dtype",
                                  "calib_nan", "opset", "recipe_key", "unknown_recipe", "external_escape",
                                  "fails_at_run"])
def test_bad_input_one_line_nonzero_nothing_written(files, tmp_path, name):
    out = tmp_path / "out"
    r = cli(*_bad(files, tmp_path, name), "-o", out)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qcompile: error:"), r.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_option_the_target_does_not_take_names_what_it_takes():
    from qcompile.errors import ConfigError
    from qcompile.targets import get_target

    with pytest.raises(ConfigError, match=r"does not take option\(s\) \['threads'\]; it takes none"):
        get_target("onnxruntime", threads=2)  # before: "it takes ['args', 'kwargs']" (object.__init__'s signature)


def test_target_registry_options_match_constructors():
    """Every option the registry (and so the CLI) offers a target is a parameter of that target's constructor, and
    every constructor parameter is offered: the CLI cannot drift from the targets."""
    import importlib
    import inspect

    from qcompile import targets

    for name, info in targets.TARGETS.items():
        if info.needs_tvm:
            pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
        klass = getattr(importlib.import_module(info.module), info.cls)
        params = set() if klass.__init__ is object.__init__ else set(inspect.signature(klass.__init__).parameters)
        params -= {"self", "target", "schedules"}  # programmatic only: a target dict, the benchmark's TVM baseline
        assert set(info.options) == params, name
        assert all(o in targets.OPTIONS for o in info.options)


def test_calibration_folder_and_npy_inputs(files, tmp_path):
    """``--calib`` a folder of .npz files (one per sample, as dumped by a data loader) gives the same model as the
    one .npz holding them all; ``run --inputs`` an .npy for this one-input model."""
    calib = np.load(files / "c.npz")["x"]
    folder = tmp_path / "calib"
    folder.mkdir()
    for i in range(len(calib)):
        np.savez(folder / f"sample_{i:03d}.npz", x=calib[i:i + 1])
    outs = {}
    for tag, src in (("folder", folder), ("file", files / "c.npz")):
        outs[tag] = tmp_path / tag
        r = cli("compile", files / "m.onnx", "--calib", src, "-o", outs[tag])
        assert r.returncode == 0, r.stderr
    assert (outs["folder"] / "model.qdq.onnx").read_bytes() == (outs["file"] / "model.qdq.onnx").read_bytes()
    x = helpers.rand(2, 3, 8, 8)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x=x)
    for src in ("x.npy", "x.npz"):
        r = cli("run", outs["folder"], "--inputs", tmp_path / src, "-o", tmp_path / f"{src}.out.npz")
        assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy.out.npz")["y"], np.load(tmp_path / "x.npz.out.npz")["y"])


def test_quantize_api_is_compiles_qdq_model_without_files(files, tmp_path, monkeypatch):
    """``qcompile.quantize`` returns the QDQ model ``compile`` writes (same nodes, same initializers), in memory."""
    import qcompile

    monkeypatch.chdir(tmp_path)
    q = qcompile.quantize(str(files / "m.onnx"), calib=str(files / "c.npz"), recipe="w8a8", check_numerics=False)
    assert not list(tmp_path.iterdir())  # nothing written
    art = qcompile.compile(str(files / "m.onnx"), calib=str(files / "c.npz"), recipe="w8a8", out_dir=tmp_path / "o",
                           check_numerics=False, measure_latency=False)
    written = onnx.load(str(art.out_dir / "model.qdq.onnx"))
    assert [(n.op_type, list(n.input)) for n in q.graph.node] == \
        [(n.op_type, list(n.input)) for n in written.graph.node]
    assert sum(n.op_type == "QuantizeLinear" for n in q.graph.node) > 0
    a = {i.name: onnx.numpy_helper.to_array(i) for i in q.graph.initializer}
    b = {i.name: onnx.numpy_helper.to_array(i) for i in written.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_value_dependent_output_shape_is_reported_not_compared(tmp_path):
    """NonZero's output has as many columns as non-zero inputs, which quantization changes (a ReLU output near zero
    rounds to it): the compile crashed comparing fp32 and quantized outputs of different sizes; the report now
    says so for that output."""
    path, calib = helpers.save_with_calib(tmp_path, helpers.conv_then("NonZero"))
    r = cli("compile", path, "--calib", calib, "-o", tmp_path / "o", "--no-latency")
    assert r.returncode == 0, r.stderr
    y = json.loads((tmp_path / "o" / "report.json").read_text())["outputs"]["y"]
    assert "elements in fp32" in y["shape_differs"] and "sqnr_db" not in y, y
    assert "output y: not compared with fp32" in r.stdout + r.stderr
