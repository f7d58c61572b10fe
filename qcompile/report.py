"""The compile report: per-layer error against fp32, sizes, latency, what each pass did and declined and why.

Written as ``report.json`` (machine-readable) and ``report.html`` (a person's view, with a per-layer SQNR plot);
:func:`summary` gives the short terminal text.
"""
from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from qcompile import dataset, numerics
from qcompile.ir import atomic_write_bytes
from qcompile.protos import iter_graph_protos

logger = logging.getLogger(__name__)

QUANT_INPUT_OPS = ("DequantizeLinear",)


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 tensors according to shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    vis = list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)
    return {v.name for v in vis if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}


def quantized_layers(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """(node name, op, float output tensor) of every node that reads a dequantized activation or weight."""
    dq_outputs = {o for n in model.graph.node if n.op_type in QUANT_INPUT_OPS for o in n.output}
    floats = float_tensors(model)
    out = []
    for n in model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if any(i in dq_outputs for i in n.input) and n.output and n.output[0] in floats:
            out.append((n.name, n.op_type, n.output[0]))
    return out


def _with_outputs(model: onnx.ModelProto, names: Sequence[str], elem: int | None = onnx.TensorProto.FLOAT
                  ) -> onnx.ModelProto:
    """A copy with `names` as extra outputs (typed `elem`, or untyped when None: ORT infers integer types)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, elem, None) if elem is not None
                                  else onnx.helper.make_empty_tensor_value_info(n))
    return m


def layer_errors(ref_model: onnx.ModelProto, q_model: onnx.ModelProto,
                 samples: Sequence[dict[str, np.ndarray]]) -> list[dict]:
    layers = quantized_layers(q_model)
    ref_names = {t for n in ref_model.graph.node for t in n.output}
    layers = [item for item in layers if item[2] in ref_names]
    names = [t for _, _, t in layers]
    if not names or not samples:
        return []
    s_ref = numerics.session(_with_outputs(ref_model, names))
    s_q = numerics.session(_with_outputs(q_model, names))
    acc: dict[str, list] = {n: [[], []] for n in names}
    for feeds in samples:
        r = numerics.run(s_ref, feeds, names)
        q = numerics.run(s_q, feeds, names)
        for n in names:
            acc[n][0].append(np.asarray(r[n], np.float32).ravel())
            acc[n][1].append(np.asarray(q[n], np.float32).ravel())
    return [{"node": node, "op": op, "tensor": t, **_errors(*acc[t])} for node, op, t in layers]


def _errors(refs: list[np.ndarray], tests: list[np.ndarray]) -> dict:
    """SQNR, cosine and largest difference of ``tests`` against ``refs`` (per sample, flattened), or, where a sample's
    sizes differ (a value-dependent shape: NonZero's indices), ``shape_differs`` saying so: nothing to compare."""
    for a, b in zip(refs, tests):
        if a.size != b.size:
            return {"shape_differs": f"{a.size} elements in fp32, {b.size} quantized (a value-dependent shape)"}
    m = numerics.compare(np.concatenate(refs), np.concatenate(tests))
    return {"sqnr_db": round(m["sqnr_db"], 3), "cosine": round(m["cosine"], 6), "max_abs": float(m["max_abs"])}


def output_errors(ref_model: onnx.ModelProto, q_model: onnx.ModelProto,
                  samples: Sequence[dict[str, np.ndarray]]) -> dict[str, dict]:
    s_ref, s_q = numerics.session(ref_model, optimize=True), numerics.session(q_model, optimize=True)
    acc: dict[str, list] = {}
    for feeds in samples:
        r = numerics.run(s_ref, feeds)
        q = numerics.run(s_q, feeds, list(r))
        for k in r:
            acc.setdefault(k, [[], []])
            acc[k][0].append(np.asarray(r[k], np.float64).ravel())
            acc[k][1].append(np.asarray(q[k], np.float64).ravel())
    return {k: _errors(a, b) for k, (a, b) in acc.items()}


def reference_run(q_model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], *, outputs: bool = True):
    """The integer reference on `samples`, once for every comparison: (interpreter, integer tensors per sample, graph
    outputs per sample), or a report entry ``{"error": ...}`` saying why it cannot run this model. ``outputs=False``
    (no target's outputs to compare): a model without a QuantizeLinear, which has no integer tensor, is not run
    ((None, [], []): an fp32 recipe's SmolLM2 spent 31 s in the reference's float MatMuls for an empty table)."""
    from qcompile.errors import NumericsError
    from qcompile.lowering import weight_only_blocks
    from qcompile.reference import Interpreter

    why = weight_only_blocks(q_model)
    if why:  # weight-only int4 (w4a16): float activations, nothing integer to compare
        return {"error": f"no integer reference for weight-only block weights ({why})"}
    if not outputs and not any(n.op_type == "QuantizeLinear" for g in iter_graph_protos(q_model.graph)
                               for n in g.node):
        return None, [], []
    try:
        interp = Interpreter(_static_for(q_model, samples))
        runs = [interp.run(feeds) for feeds in samples]
        return interp, [r[1] for r in runs], [r[0] for r in runs]
    except NumericsError as exc:  # int32 overflow: a finding about the model, reported
        return {"error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the compile; the report says why
        logger.warning("integer reference could not run this model: %s", exc)
        return {"error": f"the integer reference cannot run this model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200]}"}


def _static_for(q_model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """``q_model`` specialized to the samples' input shapes where it has dynamic axes and every sample has the same
    shapes: the lowering the TVM targets build from their example (``lowering.specialize``), so a
    GlobalAveragePool over dynamic spatial axes is the integer average there and here, not a float region here
    only (PP-OCR's classifier, input [-1, 3, ?, ?]: a 1-LSB tie at its first squeeze-excite pool, carried on)."""
    from qcompile.lowering import specialize

    specs = dataset.input_specs(q_model)
    if not samples or all(s.shape is not None and all(isinstance(d, int) and d > 0 for d in s.shape) for s in specs):
        return q_model
    shapes = {s.name: [list(np.shape(x[s.name])) for x in samples if s.name in x] for s in specs}
    if any(not v or any(v_ != v[0] for v_ in v) for v in shapes.values()):
        return q_model  # samples of different shapes: the model stays dynamic
    return specialize(q_model, {k: v[0] for k, v in shapes.items()})


def lsb_vs_reference(q_model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], ref=None) -> dict:
    """Per quantized tensor (QuantizeLinear output), the integer difference between ONNX Runtime (its fused integer
    kernels, which requantize in float) and qcompile's integer reference (docs/integer.md). `ref`: a
    :func:`reference_run` of the same samples, to share."""
    ref = ref if ref is not None else reference_run(q_model, samples)
    if isinstance(ref, dict):
        return ref
    refs = ref[1]
    names = list(refs[0]) if refs else []
    if not names:
        return {"tensors": []}
    sess = numerics.session(_with_outputs(q_model, names, elem=None), optimize=True)
    return _lsb_table(refs, [numerics.run(sess, feeds, names) for feeds in samples])


def _lsb_table(refs: list[dict[str, np.ndarray]], gots: list[dict[str, np.ndarray]]) -> dict:
    """Per tensor, |got - ref| in LSB over the samples: max, share equal, share within 1 LSB."""
    names = [k for k in refs[0] if k in gots[0]]
    diffs = {k: np.concatenate([np.abs(g[k].astype(np.int64) - r[k].astype(np.int64)).ravel()
                                for g, r in zip(gots, refs)]) for k in names}
    if not names:
        return {"samples": len(refs), "tensors": []}
    rows = []
    for k in names:
        d = diffs[k]
        rows.append({"tensor": k, "max_lsb": int(d.max()) if d.size else 0,
                     "equal": round(float(np.mean(d == 0)), 6), "within_1_lsb": round(float(np.mean(d <= 1)), 6)})
    all_d = np.concatenate(list(diffs.values()))
    return {"samples": len(refs), "tensors": rows, "equal": round(float(np.mean(all_d == 0)), 6),
            "within_1_lsb": round(float(np.mean(all_d <= 1)), 6), "max_lsb": int(all_d.max())}


def target_lsb(q_model: onnx.ModelProto, samples: Sequence[dict[str, np.ndarray]], runner, ref=None) -> dict:
    """A built target against the integer reference, per integer tensor (the target's `probe` entry point).

    Two views: end to end (float regions run by the target may flip a QuantizeLinear at a rounding tie, which
    then propagates), and integer ops alone (the reference replayed from the target's own values at the
    float->integer borders: must be bit-exact, ``integer_ops_exact``). `ref`: a :func:`reference_run`, to share."""
    ref = ref if ref is not None else reference_run(q_model, samples)
    if isinstance(ref, dict):
        return ref
    interp, refs, ref_outs = ref
    try:
        gots = [runner.probe(s) for s in samples]
        replays = [interp.replay(s, g) for s, g in zip(samples, gots)]
        # the build users run (``main``: the model's outputs alone) is compiled apart from the probe, and fused
        # further (no integer tensor has to be kept): its outputs against the reference's too, where the runner
        # has that build (a device's recorded probe outputs, tools/gpu_bench.py, have only the probe)
        mains = runner.run(list(samples)) if callable(getattr(runner, "run", None)) else None
    except Exception as exc:  # noqa: BLE001 - a diagnostic must not fail the compile; the report says why
        logger.warning("target vs integer reference comparison failed: %s", exc)
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    out = _lsb_table(refs, gots)
    ops = _lsb_table(replays, gots)
    out["integer_ops_exact"] = bool(ops.get("max_lsb", 0) == 0)
    out["borders"] = len(interp.border_names)
    out["float_outputs"] = _float_output_table(ref_outs, gots)
    if mains is not None:
        out["main_outputs"] = _float_output_table(ref_outs, mains, floats_only=False)
    return out


def _float_output_table(refs: list[dict[str, np.ndarray]], gots: list[dict[str, np.ndarray]],
                        floats_only: bool = True) -> list[dict]:
    """Per float graph output (a float region after the last integer tensor: a final Softmax, a float head), the
    target against the reference: share of elements equal bit for bit, and the largest difference relative to the
    output's largest magnitude. The reference's float ops are numpy's (its sums pairwise, not in index order), so
    a correct target can differ in the last bits; a kernel that computes something else shows as a large one.
    ``floats_only=False``: every graph output (the main build's, integer ones included)."""
    rows = []
    for k in (refs[0] if refs else {}):
        if k not in gots[0] or (floats_only and not np.issubdtype(np.asarray(refs[0][k]).dtype, np.floating)):
            continue
        r = np.concatenate([np.asarray(x[k], np.float64).ravel() for x in refs])
        g = np.concatenate([np.asarray(x[k], np.float64).ravel() for x in gots])
        if r.shape != g.shape:
            rows.append({"output": k, "error": f"shape {g.shape} vs the reference's {r.shape}"})
            continue
        scale = float(np.abs(r).max()) if r.size else 0.0
        diff = np.abs(g - r)
        rows.append({"output": k, "equal": round(float(np.mean(g == r)), 6) if r.size else 1.0,
                     "max_rel": float(diff.max() / scale) if scale > 0 and r.size else float(diff.max(initial=0.0))})
    return rows


def latency_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of one ORT run (all optimizations, 1 thread)."""
    sess = numerics.session(model, optimize=True, threads=1)
    for _ in range(warmup):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def _plot_png(layers: list[dict]) -> bytes | None:
    if not layers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vals = [min(r["sqnr_db"], 80.0) for r in layers if "sqnr_db" in r]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.18 * len(vals)), 3.2), dpi=90)
    ax.bar(range(len(vals)), vals, color="#3b6ea5")
    ax.set_xlabel("quantized layer (graph order)")
    ax.set_ylabel("SQNR vs fp32 [dB]")
    ax.set_title("per-layer SQNR (accumulated error)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _table(rows: list[dict], cols: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(report: dict) -> str:
    png = _plot_png(report.get("layers", []))
    img = f'<img alt="per-layer SQNR" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""
    passes = [{"pass": p["pass"], "kind": p["kind"], "modified": p["modified"], "seconds": p.get("seconds", ""),
               "stats": _short(json.dumps(p["stats"], default=_json_default)),
               "numerics": json.dumps(p.get("numerics", ""))}
              for p in report.get("passes", [])]
    declined = [d for p in report.get("passes", []) for d in p["declined"]]
    lsb_html = _lsb_html(report)
    sizes = [{"artifact": k, "bytes": v} for k, v in report.get("sizes", {}).items()]
    outputs = [{"output": k, **v} for k, v in report.get("outputs", {}).items()]
    lat = [{"model": k, "ms": v} for k, v in report.get("latency_ms", {}).items()]
    half = report.get("model", {}).get("computed_in_float32_from")
    widened = (f"; a {html.escape(half)} model, computed and quantized in float32 (fp32 below: that model)"
               if half else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>qcompile report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px}}</style></head><body>
<h1>qcompile report: {html.escape(report.get('model', {}).get('name', ''))}</h1>
<p>recipe <b>{html.escape(report.get('recipe', {}).get('name', ''))}</b>, target
<b>{html.escape(report.get('target', ''))}</b>, {report.get('calibration', {}).get('num_samples', 0)} calibration
samples{widened}</p>
<h2>Outputs vs fp32</h2>{_table(outputs, ["output", "sqnr_db", "cosine", "max_abs"])}
<h2>Sizes</h2>{_table(sizes, ["artifact", "bytes"])}
<h2>Latency (ONNX Runtime, 1 thread, median)</h2>{_table(lat, ["model", "ms"])}
{lsb_html}
<h2>Ops left in float (the integer lowering's fallbacks)</h2>{_table(report.get('fallbacks', []), ["node", "op", "reason"])}
{_mixed_html(report.get("mixed_precision"))}
<h2>Per-layer error</h2>{img}{_table(report.get('layers', []), ["node", "op", "tensor", "sqnr_db", "cosine",
                                                                 "max_abs"])}
<h2>Passes</h2>{_table(passes, ["pass", "kind", "modified", "seconds", "stats", "numerics"])}
<h2>Declined</h2>{_table(declined, ["pass", "node", "op", "reason"])}
</body></html>"""


def _mixed_html(mp: dict | None) -> str:
    """Mixed precision (w8a8-auto): which layers were kept float and why, the sorted sensitivity table, the latency
    regions."""
    if not mp:
        return ""
    out = [f"<h2>Mixed precision</h2><p>{len(mp.get('float_layers', []))} of {mp.get('quantized_layers', 0)} "
           f"quantizable layers kept float: {html.escape(', '.join(mp.get('float_layers', [])) or 'none')}</p>"]
    acc = mp.get("accuracy")
    if acc:
        out.append(f"<p>accuracy: {html.escape(acc['metric'])} fully quantized {acc['quantized_metric']}, final "
                   f"{acc['final_metric']} (target {acc['target']}, {'met' if acc['target_met'] else 'NOT met'}; "
                   f"{acc['samples']} calibration samples, {acc['seconds']} s)"
                   + (f"; {html.escape(acc['reason'])}" if "reason" in acc else "") + "</p>")
        out.append("<h3>Sensitivity (gain of keeping one layer float, most sensitive first)</h3>"
                   + _table(acc.get("sensitivity", []), ["node", "gain", "fine_gain", "sqnr_gain_db"]))
    lat = mp.get("latency")
    if lat:
        out.append(f"<p>latency: {lat['quantized_ms']} ms vs fp32 {lat['float_ms']} ms = {lat['ratio']}x (max "
                   f"{lat['max_ratio']}x)" + (f"; {html.escape(lat['reason'])}" if "reason" in lat else "") + "</p>"
                   + _table(lat.get("regions", []), ["first", "last", "layers", "quantized_ms", "float_ms",
                                                     "kept_float"]))
    return "\n".join(out)


def _lsb_html(report: dict) -> str:
    parts = []
    for tgt, t in report.get("lsb_vs_reference", {}).items():
        head = f"<h2>{html.escape(tgt)} vs the integer reference (LSB per quantized tensor)</h2>"
        if "integer_ops_exact" in t:
            head += (f"<p>integer ops alone (replayed from the target's float-&gt;integer border values): "
                     f"{'bit-exact' if t['integer_ops_exact'] else 'NOT bit-exact'}</p>")
        parts.append(head + (f"<p>{html.escape(t['error'])}</p>" if "error" in t else
                             _table(t.get("tensors", []), ["tensor", "max_lsb", "equal", "within_1_lsb"])))
        if t.get("float_outputs"):
            parts.append("<p>float outputs (after the last integer tensor) vs the reference's:</p>"
                         + _table(t["float_outputs"], ["output", "equal", "max_rel", "error"]))
        if t.get("main_outputs"):
            parts.append("<p>the main build's outputs (what <code>qcompile run</code> runs) vs the reference's:</p>"
                         + _table(t["main_outputs"], ["output", "equal", "max_rel", "error"]))
    return "\n".join(parts)


def _short(text: str, limit: int = 400) -> str:
    return text if len(text) <= limit else text[:limit] + " ... (all of it in report.json)"


def write(report: dict, out_dir: Path) -> None:
    atomic_write_bytes(out_dir / "report.json", json.dumps(report, indent=1, sort_keys=True,
                                                            default=_json_default).encode())
    atomic_write_bytes(out_dir / "report.html", to_html(report).encode())


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def summary(report: dict) -> str:
    lines = [f"qcompile: {report['model']['name']} -> {report['target']} with recipe {report['recipe']['name']}"]
    if "computed_in_float32_from" in report["model"]:
        lines.append(f"  a {report['model']['computed_in_float32_from']} model: computed and quantized in float32, its "
                     "inputs and outputs keep their types")
    for k, v in report.get("outputs", {}).items():
        lines.append(f"  output {k}: SQNR {v['sqnr_db']:.1f} dB, cosine {v['cosine']:.4f} vs fp32" if "sqnr_db" in v
                     else f"  output {k}: not compared with fp32, {v['shape_differs']}")
    sz = report.get("sizes", {})
    if "fp32" in sz and "model" in sz:
        lines.append(f"  size {sz['fp32'] / 1e6:.2f} MB -> {sz['model'] / 1e6:.2f} MB")
    lat = report.get("latency_ms", {})
    if "fp32" in lat and "quantized" in lat:
        lines.append(f"  ORT latency {lat['fp32']:.3f} ms -> {lat['quantized']:.3f} ms "
                     f"({lat['quantized'] / lat['fp32']:.2f}x)")
    for tgt, lsb in report.get("lsb_vs_reference", {}).items():
        label = "ORT" if tgt == "onnxruntime" else tgt
        if "max_lsb" in lsb:
            exact = ""
            if "integer_ops_exact" in lsb:
                exact = "; integer ops " + ("bit-exact" if lsb["integer_ops_exact"] else "NOT bit-exact")
            lines.append(f"  {label} vs integer reference: {lsb['equal']:.2%} of quantized values equal, "
                         f"{lsb['within_1_lsb']:.3%} within 1 LSB, max {lsb['max_lsb']} LSB{exact}")
            rel = [o["max_rel"] for o in lsb.get("float_outputs", []) if "max_rel" in o]
            if rel:
                lines.append(f"    float outputs: largest difference {max(rel):.2e} of the output's magnitude")
            main = [o["max_rel"] for o in lsb.get("main_outputs", []) if "max_rel" in o]
            if main:
                lines.append(f"    main build's outputs: largest difference {max(main):.2e} of the output's magnitude")
        elif "error" in lsb:
            lines.append(f"  {label} vs integer reference: {lsb['error']}")
    fb = report.get("fallbacks", [])
    if fb:
        ops = Counter(f["op"] for f in fb)
        lines.append(f"  {len(fb)} ops left in float: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(8)))
    if report.get("model", {}).get("float_reference"):
        lines.append(f"  float reference: {report['model']['float_reference']}")
    q = sum(p["stats"].get("quantized_tensors", 0) for p in report.get("passes", []))
    pt = sum(p["stats"].get("per_token_inputs", 0) for p in report.get("passes", []))
    nd = sum(len(p["declined"]) for p in report.get("passes", []))
    lines.append(f"  {q} tensors quantized{f' (+{pt} per token at run time)' if pt else ''}, {nd} matches declined "
                 "(see report.html)")
    measured = [r for r in report.get("layers") or [] if "sqnr_db" in r]
    if measured:
        worst = min(measured, key=lambda r: r["sqnr_db"])
        lines.append(f"  worst layer {worst['node']} ({worst['op']}): SQNR {worst['sqnr_db']:.1f} dB")
    return "\n".join(lines)
