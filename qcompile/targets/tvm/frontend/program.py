"""What every TVM target shares: QDQ model -> integer ONNX -> Relax (with a probe entry point), build, run.

Targets differ in schedules and packaging, never in arithmetic: they all start from :func:`lower_to_relax`.
The Relax module has two entry points: ``main`` (the model's outputs) and ``probe`` (the same graph returning
every integer tensor too: the report's per-layer LSB comparison with the integer reference).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qcompile import dataset
from qcompile.errors import TargetError
from qcompile.lowering import Lowered, lower, specialize
from qcompile.targets.tvm.frontend.io_cut import (
    NotStrippable,
    StrippedIO,
    strip_quantized_io,
)

logger = logging.getLogger(__name__)


META_FILE = "meta.json"


@dataclass
class Program:
    """A Relax module and what running it needs to know."""
    mod: object                      # tvm.IRModule
    inputs: list[dict]               # name, shape, dtype (the static shapes built for)
    outputs: list[str]
    probe: list[str]                 # integer tensor names returned by `probe` after the outputs
    lowered: Lowered
    import_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    quantized_io: StrippedIO | None = None  # set: `mod` takes/returns its integer tensors (lower_to_relax)
    quantized_io_reason: str = ""           # why the float I/O was kept, when it was asked for

    @property
    def returns(self) -> list[str]:
        """The tensors ``main`` returns: ``outputs``, or their integer tensors under quantized I/O."""
        return [o.q for o in self.quantized_io.outputs] if self.quantized_io else list(self.outputs)


def input_specs(model: onnx.ModelProto, example: dict[str, np.ndarray] | None) -> list[dict]:
    """Static input shapes: the example's (one calibration sample), else the model's with dynamic dims = 1."""
    specs = []
    for s in dataset.input_specs(model):
        if example is not None and s.name in example:
            shape = list(np.asarray(example[s.name]).shape)
        else:
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in s.shape or ()]
        specs.append({"name": s.name, "shape": [int(d) for d in shape], "dtype": s.dtype.name})
    return specs


def lower_to_relax(qmodel: onnx.ModelProto, example: dict[str, np.ndarray] | None, *, probe: bool = True,
                   quantized_io: bool = False) -> Program:
    """The Relax module of ``qmodel``'s integer form (``main``, and ``probe`` unless ``probe=False``).

    ``quantized_io``: where :func:`~.io_cut.strip_quantized_io` can cut the graph, ``main`` takes the
    quantized inputs and returns the integer outputs (``Program.quantized_io`` says how they map to the float
    ones; ``inputs`` / ``outputs`` stay the float interface); otherwise the float graph, and
    ``Program.quantized_io_reason`` says why. Off by default: the hosted targets keep float I/O.
    """
    from qcompile.targets.tvm.frontend.relax_import import to_relax

    t0 = time.perf_counter()
    low = lower(specialize(qmodel, {s["name"]: s["shape"] for s in input_specs(qmodel, example)}))
    specs = input_specs(low.model, example)
    shapes = {s["name"]: s["shape"] for s in specs}
    dtypes = {s["name"]: s["dtype"] for s in specs}
    outputs = [o.name for o in low.model.graph.output]
    graph, stripped, reason = low.model, None, ""
    if quantized_io:
        try:
            stripped = strip_quantized_io(low.model)
        except NotStrippable as exc:
            reason = str(exc)
            logger.info("float I/O kept: %s", reason)
        else:
            graph = stripped.model
            for q in stripped.inputs:
                shapes[q.q], dtypes[q.q] = shapes.pop(q.name), q.zero_point.dtype.name
                dtypes.pop(q.name)
    returns = [o.name for o in graph.graph.output]
    mod = to_relax(graph, shapes, dtypes)
    names: list[str] = []
    if probe:
        q_src = {n.output[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}
        produced = {o for n in graph.graph.node for o in n.output}
        names = sorted((q_src & produced) - set(outputs) - set(returns))
        m = onnx.ModelProto()
        m.CopyFrom(graph)
        m.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.UNDEFINED, None) for n in names)
        mod = merge_probe(mod, to_relax(m, shapes, dtypes))
    return Program(mod, specs, outputs, names, low, time.perf_counter() - t0, quantized_io=stripped,
                   quantized_io_reason=reason)


def merge_probe(mod, pmod):
    """One module with ``mod``'s ``main``, ``pmod``'s ``main`` as ``probe`` and the kernels (PrimFuncs) both call.

    TVM's ONNX importer writes some operators (Pad, Tile, Einsum, flips, dynamic Resize, Clip with tensor bounds) as
    PrimFuncs of its module (``emit_te``); both imports name theirs alike (``pad``, ``pad1``, ...). A probe kernel
    equal to main's of that name becomes a call to main's; a different one is renamed ``probe_<name>``."""
    import tvm
    import tvm_ffi
    from tvm import relax

    funcs = {gv: f for gv, f in mod.functions.items() if not isinstance(f, relax.Function)}
    by_name = {gv.name_hint: gv for gv in funcs}
    rename: dict[str, tvm.ir.GlobalVar] = {}
    for gv, f in pmod.functions.items():
        if isinstance(f, relax.Function):
            continue
        own = by_name.get(gv.name_hint)
        if own is not None and tvm_ffi.structural_equal(funcs[own], f):
            rename[gv.name_hint] = own
            continue
        new = tvm.ir.GlobalVar(f"probe_{gv.name_hint}") if own is not None else gv
        rename[gv.name_hint], funcs[new] = new, f

    @relax.expr_functor.mutator
    class _Calls(relax.PyExprMutator):
        def visit_global_var_(self, op):  # noqa: N802 (TVM's visitor name)
            return rename.get(op.name_hint, op)

    funcs[tvm.ir.GlobalVar("main")] = mod["main"]
    funcs[tvm.ir.GlobalVar("probe")] = _Calls().visit_expr(pmod["main"]).with_attr("global_symbol", "probe")
    return tvm.IRModule(funcs)


def entry_module(mod, which: str):
    """``mod`` with its Relax function ``which`` ("main" or "probe") as the module's ``main`` and every kernel
    (PrimFunc) it may call: what the static C executor lowers, one entry point per build."""
    import tvm
    from tvm import relax

    funcs = {gv: f for gv, f in mod.functions.items() if not isinstance(f, relax.Function)}
    funcs[tvm.ir.GlobalVar("main")] = mod[which].with_attr("global_symbol", "main")
    return tvm.IRModule(funcs)


def entries(prog: Program, mod=None) -> list[tuple[str, object, list[str]]]:
    """The two builds every TVM target makes of ``mod`` (default ``prog.mod``): ``("main", module, names)`` returning
    the model's outputs (their integer tensors under quantized I/O) and ``("probe", module, names)`` returning every
    integer tensor too, for the report's per-tensor comparison with the integer reference."""
    mod = prog.mod if mod is None else mod
    return [("main", entry_module(mod, "main"), prog.returns),
            ("probe", entry_module(mod, "probe"), prog.returns + prog.probe)]


def write_meta(out_dir: Path, prog: Program, extra: dict) -> None:
    meta = {"inputs": prog.inputs, "outputs": prog.outputs, "probe": prog.probe,
            "fallbacks": prog.lowered.fallbacks, "integer_nodes": prog.lowered.integer_nodes, **extra}
    (Path(out_dir) / META_FILE).write_text(json.dumps(meta, indent=1))


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise TargetError(f"{path} not found: build with this --target first")
    return json.loads(path.read_text())
