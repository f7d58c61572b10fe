"""Benchmark qcompile's VNNI int8 kernels against TVM's default lowering and ONNX Runtime.

    TVM_NUM_THREADS=1 python tools/vnni_kernels.py             # all shapes, 1 thread
    TVM_NUM_THREADS=1 python tools/vnni_kernels.py --quick     # fewer repeats

For each shape (u8 activation × s8 constant weight → i32) it times, single-threaded:
  (a) tvm-default  the plain Relax op built by ``tvm.compile`` (default pipeline, no tuning)
  (b) tvm-vnni     the same module after ``qcompile.targets.tvm.kernels.x86_vnni.vnni_transform``
  (c) ort          ONNX Runtime 1 thread: ConvInteger / MatMulInteger (i32 out) and
                   QLinearConv / QLinearMatMul (u8 out, requantized); the faster is used
and prints median latencies and the ratio (b)/(c). Every VNNI result is checked
bit-exact against the default TVM build before timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import tvm  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from tvm import relax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qcompile.targets.tvm.kernels.x86_vnni import host_mcpu, vnni_transform  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "conv" or "matmul"
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    pad: int = 0  # conv only: symmetric zero padding (applied inside the op for all backends)


CASES = [
    Case("conv3x3 64->64 56x56", "conv", (1, 64, 56, 56), (64, 64, 3, 3), pad=1),
    Case("conv3x3 256->256 14x14", "conv", (1, 256, 14, 14), (256, 256, 3, 3), pad=1),
    Case("conv1x1 32->192 14x14", "conv", (1, 32, 14, 14), (192, 32, 1, 1)),
    Case("matmul M32 K384 N384", "matmul", (32, 384), (384, 384)),
    Case("matmul M32 K384 N1536", "matmul", (32, 384), (384, 1536)),
    Case("matmul M32 K1536 N384", "matmul", (32, 1536), (1536, 384)),
]


def _median_ms(fn: Callable[[], object], repeat: int, sample_ms: float = 20.0) -> float:
    """Median over ``repeat`` samples; each sample loops ``fn`` for about ``sample_ms``."""
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    once_ms = (time.perf_counter() - t0) * 1e3
    number = max(1, min(5000, int(sample_ms / max(once_ms, 1e-4))))
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - t0) / number * 1e3)
    return statistics.median(samples)


def _relax_module(case: Case, w: np.ndarray) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(case.x_shape, "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if case.kind == "conv":
                y = relax.op.nn.conv2d(x, relax.const(w), padding=case.pad, out_dtype="int32")
            else:
                y = relax.op.matmul(x, relax.const(w), out_dtype="int32")
            out = bb.emit_output(bb.emit(y))
        bb.emit_func_output(out)
    return bb.get()


def _ort_session(nodes: list, inits: list, x_shape: tuple[int, ...], out_type: int):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, x_shape)],
        [helper.make_tensor_value_info("y", out_type, None)], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _ort_variants(case: Case, w: np.ndarray) -> dict[str, ort.InferenceSession]:
    pads = [case.pad] * 4
    conv = case.kind == "conv"
    integer_op = "ConvInteger" if conv else "MatMulInteger"
    qlinear_op = "QLinearConv" if conv else "QLinearMatMul"
    attrs = {"pads": pads} if conv else {}
    f32 = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    zp_u8 = numpy_helper.from_array(np.array(0, np.uint8), "xzp")
    zp_i8 = numpy_helper.from_array(np.array(0, np.int8), "wzp")
    yzp = numpy_helper.from_array(np.array(128, np.uint8), "yzp")
    wt = numpy_helper.from_array(w, "w")
    sessions = {}
    try:
        sessions[integer_op] = _ort_session(
            [helper.make_node(integer_op, ["x", "w", "xzp", "wzp"], ["y"], **attrs)],
            [wt, zp_u8, zp_i8], case.x_shape, TensorProto.INT32)
    except Exception as exc:  # an ORT build without the u8×s8 kernel
        print(f"  ({integer_op} unavailable: {str(exc).splitlines()[0][:80]})")
    try:
        sessions[qlinear_op] = _ort_session(
            [helper.make_node(qlinear_op, ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"],
                              ["y"], **attrs)],
            [wt, zp_u8, zp_i8, yzp, f32("xs", 0.02), f32("ws", 0.01), f32("ys", 4.0)],
            case.x_shape, TensorProto.UINT8)
    except Exception as exc:
        print(f"  ({qlinear_op} unavailable: {str(exc).splitlines()[0][:80]})")
    return sessions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--mcpu", default=None, help="LLVM -mcpu (default: host)")
    args = ap.parse_args()
    repeat = 5 if args.quick else 15
    mcpu = args.mcpu or host_mcpu()
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    dev = tvm.cpu()
    rng = np.random.default_rng(0)
    print(f"target llvm -mcpu={mcpu}  TVM_NUM_THREADS={os.environ['TVM_NUM_THREADS']}  "
          f"tvm {tvm.__version__}  onnxruntime {ort.__version__}  (median ms)")
    header = (f"{'shape':26s} {'tvm-default':>11s} {'tvm-vnni':>9s} {'ort':>9s} "
              f"{'ort op':>14s} {'vnni/ort':>8s} {'default/vnni':>12s}")
    rows = [header, "-" * len(header)]
    for case in CASES:
        w = rng.integers(-128, 128, case.w_shape).astype(np.int8)
        x = rng.integers(0, 256, case.x_shape).astype(np.uint8)
        mod = _relax_module(case, w)
        x_tvm = tvm.runtime.tensor(x, dev)
        vm_default = relax.VirtualMachine(tvm.compile(mod, target), dev)
        vm_vnni = relax.VirtualMachine(tvm.compile(vnni_transform(mod, target), target), dev)
        ref = vm_default["main"](x_tvm).numpy()
        if not np.array_equal(vm_vnni["main"](x_tvm).numpy(), ref):
            raise SystemExit(f"{case.name}: VNNI result differs from the default build")
        t_default = _median_ms(lambda: vm_default["main"](x_tvm), 3)
        t_vnni = _median_ms(lambda: vm_vnni["main"](x_tvm), repeat)
        ort_times = {}
        for op, sess in _ort_variants(case, w).items():
            ort_times[op] = _median_ms(lambda s=sess: s.run(None, {"x": x}), repeat)
        ort_op, t_ort = min(ort_times.items(), key=lambda kv: kv[1])
        rows.append(f"{case.name:26s} {t_default:11.3f} {t_vnni:9.4f} {t_ort:9.4f} "
                    f"{ort_op:>14s} {t_vnni / t_ort:8.2f} {t_default / t_vnni:12.1f}")
        detail = "  ".join(f"{k}={v:.4f}" for k, v in ort_times.items())
        rows.append(f"{'':26s} ort: {detail}")
        print(rows[-2], flush=True)
    print()
    print("\n".join(rows))


if __name__ == "__main__":
    main()
