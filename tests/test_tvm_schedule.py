"""The epilogue schedule rule (qcompile/targets/tvm/schedules/rules.py) on small hand-written kernels: the schedules it
picks are the fast ones (vector loops where they pay) and compute the same values as TVM's default lowering."""
from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm", reason="the tvm extra is part of the CI install")
from tvm import relax  # noqa: E402

from qcompile.targets.tvm.schedules.rules import fusion_passes, schedule_pass  # noqa: E402

TARGET = {"kind": "llvm"}


def _scheduled(mod):
    tgt = tvm.target.Target(TARGET)
    with tgt:
        return tvm.transform.Sequential(fusion_passes(tgt) + [schedule_pass(parallel=False)])(mod)


def _run(mod, *args):
    tgt = tvm.target.Target(TARGET)
    ex = tvm.compile(mod, tgt, relax_pipeline=relax.get_pipeline("default"))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in args]).numpy()


def _kernels(mod) -> dict[str, str]:
    """Every kernel's TIR after TVM's own lowering (VectorizeLoop included): a loop TVM had to scalarize has no
    vector (``T.Ramp``) accesses left, whatever the schedule asked for."""
    tgt = tvm.target.Target(TARGET)
    funcs = {gv: f.with_attr("global_symbol", gv.name_hint) for gv, f in mod.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    tir = tvm.tirx.transform.BindTarget(tgt.with_host(tgt))(tvm.IRModule(funcs))
    pipeline, _, _ = tvm.tirx.get_default_tir_pipeline(tgt)
    with tvm.transform.PassContext():
        tir = pipeline(tir)
    return {gv.name_hint: f.script() for gv, f in tir.functions.items()}


def _pad_module(c: int, h: int, w: int):
    """int32 -> (x * 3) >> 1 -> clip -> uint8 -> zero pad 1: a requantization epilogue feeding the next conv's pad."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, c, h, w), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.right_shift(relax.op.multiply(x, relax.const(3, "int32")), relax.const(1, "int32")))
            y = bb.emit(relax.op.astype(relax.op.clip(y, 0, 255), "uint8"))
            y = bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, 1, 1, 1, 1]))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_padded_epilogue_vectorizes_its_interior_and_is_exact():
    mod = _pad_module(8, 16, 16)
    scripts = _kernels(_scheduled(mod))
    (script,) = [s for s in scripts.values() if "T.if_then_else" in s or "T.Select" in s or "if " in s]
    assert "T.Ramp" in script, script  # without the interior split TVM scalarizes the whole row
    x = np.random.default_rng(0).integers(-300, 400, (1, 8, 16, 16), dtype=np.int32)
    want = np.pad(np.clip((x * 3) >> 1, 0, 255).astype(np.uint8), [(0, 0), (0, 0), (1, 1), (1, 1)])
    np.testing.assert_array_equal(_run(_scheduled(mod), x), want)


def _depthwise(stride: int):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 18, 18), "uint8"))
    w = np.random.default_rng(1).integers(-128, 128, (8, 1, 3, 3), dtype=np.int8)
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, groups=8, out_dtype="int32"))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, relax.const(4, "int32")), -128, 127),
                                        "int8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), w


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_conv_vectorizes_outputs_only_at_unit_stride(stride):
    mod, w = _depthwise(stride)
    scripts = _kernels(_scheduled(mod))
    (script,) = [s for s in scripts.values() if "conv2d" in s]
    # stride 1: 16 neighbouring outputs read 16 neighbouring inputs (vector loads); stride 2 would gather
    assert ("T.Ramp" in script) == (stride == 1), script
    x = np.random.default_rng(2).integers(0, 256, (1, 8, 18, 18), dtype=np.uint8)
    n = (18 - 3) // stride + 1
    acc = np.zeros((1, 8, n, n), np.int64)
    for kh in range(3):
        for kw in range(3):
            patch = x[:, :, kh:kh + stride * (n - 1) + 1:stride, kw:kw + stride * (n - 1) + 1:stride].astype(np.int64)
            acc += patch * w[:, 0, kh, kw].astype(np.int64)[None, :, None, None]
    want = np.clip(acc.astype(np.int32) >> 4, -128, 127).astype(np.int8)
    np.testing.assert_array_equal(_run(_scheduled(mod), x), want)


def test_strided_max_pool_walks_rows_of_outputs_inside_its_window_and_is_exact():
    """A 3x3/2 max pool (resnet18's) alone in its kernel: the window loops go outside a row of outputs (what LLVM
    vectorizes with strided loads; one output at a time re-walks the 3x3 window: resnet18's pool 1.36 -> 0.25 ms)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8, 18, 18), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.nn.max_pool2d(x, (3, 3), (2, 2), (1, 1, 1, 1))))
        bb.emit_func_output(out)
    mod = _scheduled(bb.get())
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    sch = tvm.s_tir.Schedule(func)
    inner = sch.get(sch.get_loops(sch.get_sblock("pool_max_update"))[-1])  # after decompose_reduction
    assert int(inner.extent) == 9  # the 9 outputs of a row, not the 3 taps of the window
    xin = np.random.default_rng(3).integers(0, 256, (1, 8, 18, 18), dtype=np.uint8)
    xp = np.pad(xin, [(0, 0), (0, 0), (1, 1), (1, 1)])
    want = np.max([xp[:, :, i:i + 17:2, j:j + 17:2] for i in range(3) for j in range(3)], axis=0)
    np.testing.assert_array_equal(_run(mod, xin), want)



def _conv_then_pad(cin: int, groups: int, stride: int, pads: tuple[int, int, int, int]):
    """u8 x s8 conv -> requantize -> uint8 -> pad with the zero point (the next conv's padding where its input's zero
    point is not 0: FuseOps puts that pad at the end of this conv's kernel)."""
    rng = np.random.default_rng(4)
    w = rng.integers(-128, 128, (8, cin // groups, 3, 3), dtype=np.int8)
    top, left, bottom, right = pads
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, cin, 14, 14), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, groups=groups, out_dtype="int32"))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, relax.const(9, "int32")), 0, 255),
                                        "uint8"))
            y = bb.emit(relax.op.nn.pad(y, [0, 0, 0, 0, top, bottom, left, right], pad_value=7.0))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), w


@pytest.mark.parametrize("pads", [(0, 0, 1, 1), (1, 1, 1, 1), (2, 0, 0, 1)])
@pytest.mark.parametrize("cin,groups,stride", [(32, 1, 1), (8, 8, 1), (8, 8, 2)],
                         ids=["long_reduction", "depthwise", "strided_depthwise"])
def test_pad_after_a_reduction_epilogue_writes_its_border(cin, groups, stride, pads):
    """Each of the rule's three ways of moving an epilogue under a reduction's loops (one output at a time, a vector
    of outputs, a row of outputs inside a strided window) kept only the points that read an output of the reduction:
    a pad at the end of the epilogue lost its border (Keras' "same" padding of a stride-2 conv, bottom and right
    only: none of EfficientNetV2-B0's outputs right on tvm-x86, tvm-aarch64, Cortex-M and Hexagon). Every point of
    the padded output must be written, the border with the zero point."""
    mod, w = _conv_then_pad(cin, groups, stride, pads)
    x = np.random.default_rng(5).integers(0, 256, (1, cin, 14, 14), dtype=np.uint8)
    n = (14 - 3) // stride + 1
    per = cin // groups
    acc = np.zeros((1, 8, n, n), np.int64)
    for o in range(8):
        g = o // (8 // groups)
        for kh in range(3):
            for kw in range(3):
                patch = x[:, g * per:(g + 1) * per, kh:kh + stride * (n - 1) + 1:stride,
                          kw:kw + stride * (n - 1) + 1:stride].astype(np.int64)
                acc[:, o] += np.einsum("bchw,c->bhw", patch, w[o, :, kh, kw].astype(np.int64))
    top, left, bottom, right = pads
    want = np.pad(np.clip(acc >> 9, 0, 255).astype(np.uint8), [(0, 0), (0, 0), (top, bottom), (left, right)],
                  constant_values=7)
    np.testing.assert_array_equal(_run(_scheduled(mod), x), want)


def _chain(links: int):
    """An elementwise chain whose every link reads the one before at two places (``y·3 + (y >> 1)``), as a
    requantization reads its input for the product and for the rounding's sign: (PrimFunc, numpy reference)."""
    from tvm import te

    def link(p, k):
        return te.compute((64,), lambda i: p[i] * 3 + (p[i] >> 1), name=f"link{k}")

    def ref(v):
        for _ in range(links):
            v = v * 3 + (v >> 1)
        return v

    a = te.placeholder((64,), "int32", name="a")
    y = a
    for k in range(links):
        y = link(y, k)
    return te.create_prim_func([a, y]), ref


def test_inlining_stops_where_it_would_copy_a_chain_exponentially():
    """dlight's try_inline folded such a chain into one expression that doubled per link (ONNX Runtime's quantized
    models put a requantization after every Add and Mul: four Mul/Add links took a build past 300 s). The bounded
    inlining keeps a link as its own loop nest once copying it costs more than INLINE_COPY_LIMIT reads: every block
    stays small, and the kernel computes the same values."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    from qcompile.targets.tvm.schedules.inline import INLINE_COPY_LIMIT, _loads, bounded_inline

    func, ref = _chain(12)
    sch = s_tir.Schedule(func)
    left = bounded_inline(sch, list(dl.normalize_prim_func(sch)))
    sizes = [_loads(sch.get(b.block_rv).body) for b in left]
    assert 1 < len(left) < 12 and max(sizes) <= 2 * INLINE_COPY_LIMIT, sizes
    unbounded = s_tir.Schedule(func)
    rest = dl.try_inline(unbounded, list(dl.normalize_prim_func(unbounded)))
    assert [_loads(unbounded.get(b.block_rv).body) for b in rest] == [2 ** 12]  # what it was
    x = np.arange(-32, 32, dtype=np.int32)
    lib = tvm.compile(tvm.IRModule({"main": sch.mod["main"]}), target="llvm")
    out = tvm.runtime.tensor(np.zeros(64, np.int32))
    lib["main"](tvm.runtime.tensor(x), out)
    np.testing.assert_array_equal(out.numpy(), ref(x))  # int32 wraps as the kernel's arithmetic does
