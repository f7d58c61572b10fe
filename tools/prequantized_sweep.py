"""QDQ models ONNX Runtime's own quantizer made, compiled by qcompile as they are (``--recipe prequantized``) for
each target: the zoo models quantized by ``quantize_static`` (QDQ, per-channel int8 weights, uint8 activations,
MinMax, after ``quant_pre_process``, on the calibration samples qcompile's w8a8 uses), then for every target the
task metric on the test set against fp32 beside ONNX Runtime's own run of the same QDQ file, the share of integer
tensors equal to the integer reference (the probe build) and of the main build's outputs (what ``qcompile run``
runs), and the compile seconds.

    python tools/prequantized_sweep.py                                        # 4 zoo models, onnxruntime + tvm-x86
    python tools/prequantized_sweep.py --models digits-cnn --targets mcu-cortex-m4 --test 50
    python tools/prequantized_sweep.py --models --chains 2 4 6 --targets tvm-x86 tvm-aarch64   # elementwise chains
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_sweep import print_table, quiet_logs  # noqa: E402
from bench import CalibrationMethod, log, ort_static, run_all, session  # noqa: E402

MODELS = ["digits-cnn", "resnet-digits", "mobilenetv2-digits", "vit-digits"]


def chain_model(links: int, work: Path) -> tuple[Path, Path]:
    """``Conv -> (Mul c, Add d) x links -> Conv`` quantized by ONNX Runtime's quantize_static (QDQ, per-channel): a
    Q/DQ pair after every Mul and Add, as it writes any elementwise chain; (QDQ model, calibration npz)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["h0"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.3).astype(np.float32), "w2")]
    for i in range(links):
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, (1, 8, 1, 1)).astype(np.float32), f"c{i}"),
                  numpy_helper.from_array(rng.uniform(-0.5, 0.5, (1, 8, 1, 1)).astype(np.float32), f"d{i}")]
        nodes += [helper.make_node("Mul", [f"h{i}", f"c{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"d{i}"], [f"h{i + 1}"])]
    nodes.append(helper.make_node("Conv", [f"h{links}", "w2"], ["y"]))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    fp, qp, cp = work / f"chain{links}.onnx", work / f"chain{links}.qdq.onnx", work / f"chain{links}.npz"
    onnx.save(model, str(fp))
    data = [{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    with contextlib.redirect_stdout(sys.stderr):
        quantize_static(str(fp), str(qp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    np.savez(cp, x=np.concatenate([d["x"] for d in data]))
    return qp, cp


def sweep_chain(links: int, targets: list[str], work: Path) -> list[dict]:
    """:func:`chain_model` compiled for each target: bit-exactness and compile seconds (no task metric)."""
    import qcompile

    qp, cp = chain_model(links, work)
    rows = []
    for target in targets:
        row = {"model": f"ort-chain-{links}", "target": target}
        t0 = time.perf_counter()
        try:
            art = qcompile.compile(str(qp), calib=str(cp), recipe="prequantized", target=target,
                                   out_dir=work / f"chain{links}-{target}", measure_latency=False, check_numerics=False)
            lsb = art.report.get("lsb_vs_reference", {}).get(target, {})
            main = [m.get("equal") for m in lsb.get("main_outputs") or []]
            row.update(result="ok", int_equal=lsb.get("equal", lsb.get("error")),
                       main_equal=min(main) if main and None not in main else None)
        except Exception as exc:  # noqa: BLE001 - a failure is a row of the sweep
            row["result"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}"
        row["s"] = round(time.perf_counter() - t0, 1)
        log(f"  {row}")
        rows.append(row)
    return rows


def sweep_model(name: str, targets: list[str], n_test: int, work: Path) -> list[dict]:
    import onnx
    import qcompile_zoo as zoo
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import qcompile
    from qcompile.dataset import load_samples
    from qcompile.recipe import load_recipe

    entry = zoo.build(name)
    proto = onnx.load(str(entry.model), load_external_data=False)
    test = load_samples(proto, entry.test, "test")[:n_test]
    calib = load_samples(proto, entry.calib, "calibration", max_samples=load_recipe("w8a8").calibration.max_samples)
    mdir = work / name
    mdir.mkdir(parents=True, exist_ok=True)
    with contextlib.redirect_stdout(sys.stderr), contextlib.chdir(mdir):  # ORT prints progress, leaves temp files
        quant_pre_process(str(entry.model), str(mdir / "pre.onnx"))
        qdq = ort_static(mdir / "pre.onnx", mdir / "ort-qdq.onnx", calib, CalibrationMethod.MinMax)
    fp32 = run_all(session(entry.model), test)
    ort_q = run_all(session(qdq), test)
    batch = {k: np.concatenate([s[k] for s in test], axis=0) for k in test[0]}  # the subset, for its labels
    ort_metric = zoo.evaluate(name, ort_q, fp32, entry, batch)
    rows = []
    for target in targets:
        row = {"model": name, "target": target, "ort_qdq_metric": round(ort_metric, 4)}
        t0 = time.perf_counter()
        try:
            art = qcompile.compile(str(qdq), calib=str(entry.calib), recipe="prequantized", target=target,
                                   out_dir=mdir / target, measure_latency=False, check_numerics=False)
            row["s"] = round(time.perf_counter() - t0, 1)
            got = art.run(batch)
            row.update(result="ok", metric=round(zoo.evaluate(name, got, fp32, entry, batch), 4))
            lsb = art.report.get("lsb_vs_reference", {}).get(target, {})
            row["int_equal"] = lsb.get("equal", lsb.get("error"))
            main = [m.get("equal") for m in lsb.get("main_outputs") or []]
            row["main_equal"] = min(main) if main and None not in main else None
            row["float_ops"] = len(art.report.get("fallbacks") or []) if target != "onnxruntime" else None
        except Exception as exc:  # noqa: BLE001 - a failure is a row of the sweep
            row.update(result=f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:140] if str(exc) else ''}",
                       s=round(time.perf_counter() - t0, 1))
        log(f"  {row}")
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--targets", nargs="*", default=["onnxruntime", "tvm-x86"])
    ap.add_argument("--test", type=int, default=200, help="test samples per model (batch 1 each)")
    ap.add_argument("--chains", nargs="*", type=int, default=[], metavar="LINKS",
                    help="also ORT-quantized Conv -> (Mul, Add) x LINKS -> Conv models (bit-exactness, compile s)")
    args = ap.parse_args(argv)
    quiet_logs("qcompile")
    rows = []
    with tempfile.TemporaryDirectory(prefix="qc-prequantized-") as tmp:
        for name in args.models:
            log(f"{name}")
            rows += sweep_model(name, args.targets, args.test, Path(tmp))
        for links in args.chains:
            rows += sweep_chain(links, [t for t in args.targets if t != "onnxruntime"], Path(tmp))
    print(f"`python tools/prequantized_sweep.py {' '.join(sys.argv[1:] if argv is None else argv)}` (ORT "
          f"quantize_static QDQ, per-channel, MinMax; metric vs fp32 on the test samples)\n")
    print_table(rows, ["model", "target", "result", "metric", "ort_qdq_metric", "int_equal", "main_equal", "float_ops",
                       "s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
