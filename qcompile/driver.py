"""compile(model, calib, recipe, target) -> Artifacts: the one data flow, start to end.

Everything is built in a temporary sibling folder and moved into ``out_dir`` only when the whole run succeeded,
so a failed run leaves nothing half-written in ``out_dir``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from qcompile import calibrate as calib_mod
from qcompile import dataset, ir, report, upcast
from qcompile.errors import ConfigError, TargetError
from qcompile.instruments import CheckerInstrument, DumpInstrument, NumericsInstrument, TimingInstrument
from qcompile.observers import make_observer
from qcompile.passes.import_qdq import ImportQDQPass, float_model
from qcompile.pass_infra import Instrument, PassContext, PassManager
from qcompile.recipe import Recipe, load_recipe
from qcompile.targets import get_target, takes
from qcompile.targets.base import MODEL_FILE, write_model
from qcompile.types import PassKind

logger = logging.getLogger(__name__)


@dataclass
class Artifacts:
    out_dir: Path
    target: str
    files: dict[str, str] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def run(self, inputs: Mapping[str, np.ndarray], target: str | None = None) -> dict[str, np.ndarray]:
        return run_artifact(self.out_dir, inputs, target or self.target)


class _Snapshot(Instrument):
    """Keeps the float model as it was right before the first non-equivalence pass (the per-layer reference)."""

    def __init__(self) -> None:
        self.model: onnx.ModelProto | None = None
        self._last: Snapshot | None = None  # the last equivalence pass's result

    def before_pass(self, p, graph, ctx) -> None:
        if self.model is None and p.kind is not PassKind.EQUIVALENCE:
            last, self._last = self._last, None
            self.model = last.model if last is not None and last.built else ir.to_model(graph.copy(), ctx.model)

    def after_pass(self, p, before, after, result, ctx, record) -> None:
        if self.model is None and p.kind is PassKind.EQUIVALENCE:
            self._last = after


def _calibrator(recipe_passes):
    qpass = next(p for p in recipe_passes if p.needs_calibration)
    cfg = qpass.config

    def run(graph, ctx):
        names = calib_mod.float_activations(graph)
        return calib_mod.calibrate(graph, ctx.model, ctx.samples, names,
                                   lambda _n: make_observer(cfg.observer, num_bits=cfg.activation_bits,
                                                            symmetric=cfg.activation_symmetric,
                                                            **cfg.observer_params))
    return run


def _load(model) -> tuple[onnx.ModelProto, str]:
    if isinstance(model, onnx.ModelProto):
        return ir.normalize(model), model.graph.name or "model"
    return ir.load_model(model), Path(model).stem


@dataclass
class Quantized:
    """What the pass pipeline made of a model: ``model`` (the QDQ model), ``fp32`` (the loaded float model),
    ``reference`` (the float model right before the first quantizing pass: the per-layer reference)."""

    model: onnx.ModelProto
    fp32: onnx.ModelProto
    reference: onnx.ModelProto
    name: str
    recipe: Recipe
    samples: list[dict]
    context: PassContext
    float_reference: str = ""  # what ``fp32`` is when it is not the loaded model (a prequantized model's)


def _quantize(model, tgt, calib, recipe, max_samples, check_numerics, dump_dir) -> Quantized:
    rec = load_recipe(recipe).with_compute_ops(getattr(tgt, "integer_compute_ops", ()))
    fp32, name = _load(model)
    fp32 = onnx.shape_inference.infer_shapes(fp32)
    samples: list[dict] = []
    if calib is not None:
        arrays = calib if isinstance(calib, Mapping) else dataset.load_data(calib)
        samples = dataset.split_samples(fp32, arrays, "calibration",
                                        max_samples or rec.calibration.max_samples)
    elif rec.needs_calibration:
        raise ConfigError(f"recipe {rec.name!r} needs calibration data (--calib CALIB.npz)")
    passes = rec.build_passes()
    snap = _Snapshot()
    instruments: list[Instrument] = [CheckerInstrument(), snap]
    if check_numerics:
        instruments.append(NumericsInstrument())
    if dump_dir is not None:
        instruments.append(DumpInstrument(dump_dir))
    instruments.append(TimingInstrument())
    ctx = PassContext(model=fp32, samples=samples,
                      calibrator=_calibrator(passes) if rec.needs_calibration else None)
    manager = PassManager(passes, instruments)
    graph = manager.run(ir.to_graph(fp32), ctx)
    last = manager.last
    qmodel = last.model if last is not None and last.built else ir.to_model(graph, fp32)
    if any(p.name == ImportQDQPass.name for p in rec.passes):  # the file's own quantization: no float model in it
        ref, left = float_model(qmodel)
        why = ("the QDQ model without its rounding: constants dequantized, each Quantize/DequantizeLinear pair a "
               "Clip to its range" + (f" ({left} Q/DQ nodes it could not remove kept)" if left else ""))
        return Quantized(qmodel, ref, ref, name, rec, samples, ctx, float_reference=why)
    return Quantized(qmodel, fp32, snap.model or qmodel, name, rec, samples, ctx)


def quantize(model, *, calib=None, recipe: str | Recipe = "w8a8", target: str = "onnxruntime",
             max_samples: int | None = None, check_numerics: bool = True) -> onnx.ModelProto:
    """The QDQ model ``recipe`` makes of ``model`` for ``target`` (whose integer ops can differ: the TVM targets
    lower ConvTranspose too), in memory: the pass pipeline of :func:`compile` without building the target, the
    report or any file."""
    tgt = get_target(target)
    return _quantize(model, tgt, calib, recipe, max_samples, check_numerics, None).model


def compile(model, *, calib=None, recipe: str | Recipe = "w8a8", target: str = "onnxruntime",  # noqa: A001
            out_dir=None, max_samples: int | None = None, check_numerics: bool = True,
            measure_latency: bool = True, dump_dir=None, target_options: Mapping | None = None) -> Artifacts:
    tgt = get_target(target, **dict(target_options or {}))
    if out_dir is None:
        raise ConfigError("an output folder is required")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out} exists and is not a folder")
    q = _quantize(model, tgt, calib, recipe, max_samples, check_numerics, dump_dir)
    fp32, name, rec, samples, ctx, qmodel, ref = q.fp32, q.name, q.recipe, q.samples, q.context, q.model, q.reference

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        files = write_model(qmodel, tmp)  # every target's folder holds the QDQ model (ORT, integer reference)
        files.update(tgt.build(qmodel, tmp, samples[0] if samples else None))
        rep = _make_report(name, rec, tgt, fp32, ref, qmodel, samples, ctx, tmp, files, measure_latency)
        if q.float_reference:
            rep["model"]["float_reference"] = q.float_reference
        report.write(rep, tmp)
        files.update({"report": "report.json", "report_html": "report.html"})
        out.mkdir(parents=True, exist_ok=True)
        old = tmp / ".replaced"  # what an earlier compile left under the same names (a target's folder)
        for f in sorted(os.listdir(tmp)):
            if f == old.name:
                continue
            if (out / f).is_dir() and not (out / f).is_symlink():  # os.replace cannot overwrite a folder
                old.mkdir(exist_ok=True)
                os.replace(out / f, old / f)
            os.replace(tmp / f, out / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("wrote %s", out)
    return Artifacts(out, target, files, rep)


def _make_report(name, rec, tgt, fp32, ref, qmodel, samples, ctx, tmp, files, measure_latency) -> dict:
    target = tgt.name
    eval_samples = samples[:8]
    rep: dict = {
        "model": {"name": name, "opset": ir.default_opset(fp32), "nodes": len(fp32.graph.node),
                  "inputs": [i.name for i in fp32.graph.input],
                  **{"computed_in_float32_from": p.value for p in fp32.metadata_props if p.key == upcast.WIDENED_KEY}},
        "recipe": {"name": rec.name, "definition": rec.to_dict()},
        "target": target,
        "files": dict(files),
        "calibration": {"num_samples": len(samples)},
        "passes": ctx.records,
        "sizes": {"fp32": fp32.ByteSize(), "model": os.path.getsize(tmp / files["model"])},
    }
    if ctx.calibration is not None:
        rep["calibration"]["table"] = ctx.calibration.to_dict()["ranges"]
    mixed = [r["stats"]["mixed_precision"] for r in ctx.records if "mixed_precision" in r.get("stats", {})]
    if mixed:  # w8a8-auto's decisions, lifted to the top: layers kept float, sensitivity table, latency regions
        rep["mixed_precision"] = mixed[-1]
    if eval_samples:
        rep["outputs"] = report.output_errors(fp32, qmodel, eval_samples)
        rep["layers"] = report.layer_errors(ref, qmodel, eval_samples)
        # one reference run for every comparison; the graph outputs only where a target's are compared with them
        ref_run = report.reference_run(qmodel, eval_samples[:2], outputs=hasattr(tgt, "runner"))
        rep["lsb_vs_reference"] = {"onnxruntime": report.lsb_vs_reference(qmodel, eval_samples[:2], ref_run)}
        if hasattr(tgt, "runner"):
            runner = tgt.runner(tmp)
            rep["lsb_vs_reference"][target] = report.target_lsb(qmodel, eval_samples[:2], runner, ref_run)
            rep["fallbacks"] = runner.meta.get("fallbacks", [])
        if measure_latency:
            rep["latency_ms"] = {"fp32": round(report.latency_ms(fp32, eval_samples[0]), 4),
                                 "quantized": round(report.latency_ms(qmodel, eval_samples[0]), 4)}
    return rep


def _artifact(out_dir, inputs: Mapping[str, np.ndarray], target: str | None, rpc: str | None, key: str | None):
    """(target, runner, samples, batch form) of a built artifact folder; ``rpc``/``key``: the
    runner runs on a device behind that TVM RPC tracker (tvm-x86 / tvm-aarch64 static builds)."""
    out = Path(out_dir)
    if not out.is_dir():
        raise TargetError(f"artifact folder not found: {out}")
    if target is None:
        try:
            target = json.loads((out / "report.json").read_text()).get("target", "onnxruntime")
        except (OSError, ValueError):
            target = "onnxruntime"
    tgt = get_target(target)
    model_path = out / MODEL_FILE
    if not model_path.is_file():
        raise TargetError(f"{model_path} not found: is {out} a qcompile output folder?")
    header = onnx.load(str(model_path), load_external_data=False)
    inputs = dataset.for_inputs(header, inputs)
    samples = dataset.split_samples(header, inputs, "input")
    batch_form = all(s.shape is not None and inputs[s.name].ndim == len(s.shape)
                     for s in dataset.input_specs(header))
    if rpc is not None or key is not None:
        if rpc is None or key is None:
            raise ConfigError("--rpc and --key go together (the tracker HOST:PORT and the device key)")
        if target not in takes("rpc"):
            raise ConfigError(f"--rpc runs {' and '.join(takes('rpc'))} builds on remote devices; {out} was "
                              f"built for {target}")
        runner = tgt.runner(out, rpc=rpc, key=key)
    else:
        runner = tgt.runner(out) if hasattr(tgt, "runner") else None
    return tgt, runner, samples, batch_form


def run_artifact(out_dir, inputs: Mapping[str, np.ndarray], target: str | None = None, *, rpc: str | None = None,
                 key: str | None = None) -> dict[str, np.ndarray]:
    """Run a built artifact on a whole batch (same conventions as calibration data); outputs keyed by name.
    `target` defaults to the one the folder was compiled for (report.json), else ONNX Runtime. `rpc` (tracker
    ``HOST:PORT``) and `key`: on a device behind a TVM RPC tracker."""
    tgt, runner, samples, batch_form = _artifact(out_dir, inputs, target, rpc, key)
    results = runner.run(samples) if runner is not None else tgt.run(Path(out_dir), samples)
    join = np.concatenate if batch_form else np.stack
    return {k: join([r[k] for r in results], axis=0) for k in results[0]}


def bench_artifact(out_dir, inputs: Mapping[str, np.ndarray], runs: int = 50, *, rpc: str | None = None,
                   key: str | None = None, compare: int = 1) -> dict:
    """Latency of a built artifact on the first sample of `inputs` (median of `runs`; on the device itself
    through `rpc`/`key`), and its integer tensors on the first `compare` samples against the integer reference
    (``report.target_lsb``, as the compile report does for a local build)."""
    from qcompile.targets.tvm.rpc import local_time, summarize

    tgt, runner, samples, _ = _artifact(out_dir, inputs, None, rpc, key)
    if runner is None:
        raise TargetError(f"{tgt.name} builds have no runner to time")
    times = runner.time(samples[0], runs) if hasattr(runner, "time") else local_time(runner, samples[0], runs)
    res = {"target": tgt.name, "where": f"{key} via {rpc}" if rpc else "this machine", **summarize(times)}
    if compare:
        qmodel = onnx.load(str(Path(out_dir) / MODEL_FILE))
        lsb = report.target_lsb(qmodel, samples[:compare], runner)
        res["integer_ops_exact"] = lsb.get("integer_ops_exact")
        res["equal"] = lsb.get("equal")
        if "error" in lsb:
            res["reference_error"] = lsb["error"]
    return res
