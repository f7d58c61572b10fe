"""The `qcompile` command: compile, run, inspect, recipes, zoo."""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from qcompile.errors import QCompileError

logger = logging.getLogger(__name__)


def _cmd_compile(a: argparse.Namespace) -> int:
    from qcompile import driver, report

    from qcompile.targets import OPTIONS

    opts = {k: getattr(a, k) for k in OPTIONS if getattr(a, k) is not None}
    art = driver.compile(a.model, calib=a.calib, recipe=a.recipe, target=a.target, out_dir=a.output,
                         max_samples=a.max_samples, check_numerics=not a.no_check,
                         measure_latency=not a.no_latency, dump_dir=a.dump, target_options=opts)
    sys.stdout.write(report.summary(art.report) + f"\n  wrote {art.out_dir}\n")
    return 0


def _cmd_run(a: argparse.Namespace) -> int:
    from qcompile import dataset, driver
    from qcompile.ir import atomic_write_bytes

    outputs = driver.run_artifact(a.out_dir, dataset.load_npz(a.inputs, "input"), a.target, rpc=a.rpc, key=a.key)
    import io

    buf = io.BytesIO()
    np.savez(buf, **outputs)
    atomic_write_bytes(a.output, buf.getvalue())
    sys.stdout.write(f"wrote {a.output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items()) + "\n")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    from qcompile import dataset, driver

    if a.runs < 1:
        raise QCompileError("--runs must be at least 1")
    r = driver.bench_artifact(a.out_dir, dataset.load_npz(a.inputs, "input"), a.runs, rpc=a.rpc, key=a.key)
    line = (f"{r['target']} on {r['where']}: median {r['median_ms']:.3f} ms, p90 {r['p90_ms']:.3f} ms, "
            f"min {r['min_ms']:.3f} ms over {r['runs']} runs")
    if "integer_ops_exact" in r:
        line += f"; integer ops bit-exact with the reference: {r['integer_ops_exact']}, integer tensors equal end " \
                f"to end: {100 * (r['equal'] or 0):.2f}%"
    sys.stdout.write(line + "\n")
    return 0 if r.get("integer_ops_exact") is not False else 1


def _cmd_inspect(a: argparse.Namespace) -> int:
    from qcompile import dataset, ir

    model = ir.load_model(a.model)
    ops = Counter(n.op_type for n in model.graph.node)
    g = ir.to_graph(model)
    lines = [f"{a.model}: opset {ir.default_opset(model)}, {len(model.graph.node)} nodes, "
             f"{len(model.graph.initializer)} initializers, {model.ByteSize() / 1e6:.2f} MB"]
    for s in dataset.input_specs(model):
        lines.append(f"  input  {s.name}: {s.dtype} {list(s.shape) if s.shape is not None else 'rank unknown'}")
    for o in model.graph.output:
        lines.append(f"  output {o.name}")
    lines.append("  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))
    sub = ir.subgraph_node_count(g)
    if sub:
        lines.append(f"  control flow: {sub} nodes inside subgraphs")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_recipes(a: argparse.Namespace) -> int:
    from qcompile.recipe import builtin_recipes, load_recipe

    if a.name:
        sys.stdout.write(load_recipe(a.name).to_yaml())
        return 0
    for name, r in builtin_recipes().items():
        sys.stdout.write(f"{name:18s} {r.description}\n")
    return 0


def _cmd_zoo(a: argparse.Namespace) -> int:
    try:
        import qcompile_zoo as zoo
    except ImportError as exc:
        raise QCompileError(f"the model zoo needs the zoo extra: pip install -e '.[zoo]' ({exc})") from None
    if a.action == "list":
        for n in zoo.names():
            sys.stdout.write(f"{n:20s} {zoo.describe(n)}\n")
        return 0
    if not a.name:
        raise QCompileError("zoo export needs a model name (qcompile zoo list)")
    try:
        entry = zoo.build(a.name)
    except ValueError as exc:
        raise QCompileError(str(exc)) from None
    dest = Path(a.output or ".")
    dest.mkdir(parents=True, exist_ok=True)
    import shutil

    for src, suffix in ((entry.model, ".onnx"), (entry.calib, ".calib.npz"), (entry.test, ".test.npz")):
        shutil.copyfile(src, dest / f"{entry.name}{suffix}")
    if entry.labels is not None:
        shutil.copyfile(entry.labels, dest / f"{entry.name}.labels.npy")
    sys.stdout.write(f"wrote {dest / entry.name}.onnx (+ .calib.npz, .test.npz)\n")
    return 0


def _rpc_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpc", default=None, help="HOST:PORT of a TVM RPC tracker: run on a device behind it "
                                               "(tvm-x86 / tvm-aarch64 static builds)")
    p.add_argument("--key", default=None, help="the device key at the tracker (with --rpc)")


def build_parser() -> argparse.ArgumentParser:
    from qcompile import targets

    p = argparse.ArgumentParser(prog="qcompile", description="ONNX graph-level quantization compiler")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="quantize a model for a target")
    c.add_argument("model")
    c.add_argument("--calib", help=".npz with one array per model input (samples along the first axis), an .npy for a "
                   "one-input model, or a folder of such files (read in name order)")
    c.add_argument("--recipe", default="w8a8", help="built-in recipe name or YAML file (qcompile recipes)")
    c.add_argument("--target", default="onnxruntime",
                   help="; ".join(f"{n}: {targets.TARGETS[n].summary}" for n in targets.names())
                   + " (TVM targets need the tvm extra)")
    for opt in targets.OPTIONS.values():
        flag = "--" + opt.name.replace("_", "-")
        where = ", ".join(targets.takes(opt.name))
        if opt.kind is bool:
            c.add_argument(flag, dest=opt.name, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{where}: {opt.help}")
        else:
            c.add_argument(flag, dest=opt.name, type=opt.kind, default=None, choices=opt.choices or None,
                           help=f"{where}: {opt.help}")
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument("--max-samples", type=int, default=None)
    c.add_argument("--no-check", action="store_true", help="skip the numerics check of equivalence passes")
    c.add_argument("--no-latency", action="store_true", help="skip latency measurement in the report")
    c.add_argument("--dump", default=None, help="write the model after every pass to this folder")
    c.set_defaults(fn=_cmd_compile)
    r = sub.add_parser("run", help="run a built artifact on a batch of inputs")
    r.add_argument("out_dir")
    r.add_argument("--inputs", required=True)
    r.add_argument("-o", "--output", required=True)
    r.add_argument("--target", default=None, help="default: the target the folder was compiled for")
    _rpc_flags(r)
    r.set_defaults(fn=_cmd_run)
    b = sub.add_parser("bench", help="time a built artifact (median of repeated runs) and check it against the "
                                     "integer reference")
    b.add_argument("out_dir")
    b.add_argument("--inputs", required=True, help=".npz of inputs; the first sample is timed")
    b.add_argument("--runs", type=int, default=50)
    _rpc_flags(b)
    b.set_defaults(fn=_cmd_bench)
    i = sub.add_parser("inspect", help="describe a model")
    i.add_argument("model")
    i.set_defaults(fn=_cmd_inspect)
    rc = sub.add_parser("recipes", help="list built-in recipes, or print one as YAML")
    rc.add_argument("name", nargs="?")
    rc.set_defaults(fn=_cmd_recipes)
    z = sub.add_parser("zoo", help="list or export zoo models")
    z.add_argument("action", choices=["list", "export"])
    z.add_argument("name", nargs="?")
    z.add_argument("-o", "--output", default=None)
    z.set_defaults(fn=_cmd_zoo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except QCompileError as exc:
        sys.stderr.write(f"qcompile: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("qcompile: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
