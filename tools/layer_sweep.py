"""Layer kinds users' models carry, each in a small hand-written torch module exported by torch.onnx (TorchScript,
dynamic batch), compiled by qcompile: recurrent layers (LSTM, GRU), torch.einsum projections, 3-D convolutions and
transposed convolutions, pixel shuffle with reflect padding and InstanceNorm, GroupNorm, tied embeddings, mixed
integer / float / bool inputs with an int64 output, a weight on the left of a MatMul, scaled-dot-product and masked
attention, cumulative sums, nearest / bilinear / bicubic resizes, depthwise 1-D convs with GLU, unusual activations
(PReLU, Mish, ELU, SELU, LeakyReLU), transcendental activations back to back (Mish, Softplus, GELU, SiLU: the
chain that made TVM's LLVM code generator run for minutes), ceil-mode and count_include_pad pools with L2
normalization, a Python loop unrolled by the tracer; and what other models carry: a CTC head's LogSoftmax, a diffusion
timestep's sin/cos embedding of a float input, a YOLO neck and box decode, a float16 export, LocalResponseNorm,
DeepLab's ASPP with an argmax output, statistics pooling (std, logsumexp, L2 norm), per-head 3-D weights, a TopK
gather and scatter. Random weights: a robustness sweep, not an accuracy table; the columns are
``arch_sweep.compile_rows``'s.

    python tools/layer_sweep.py                                   # every case, w8a8, onnxruntime + tvm-x86
    python tools/layer_sweep.py --cases lstm conv3d --targets tvm-aarch64 mcu-cortex-m4
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arch_sweep import (
    add_sweep_args,
    compile_rows,
    print_table,
    quiet_logs,
    work_folder,
)

log = logging.getLogger("layer_sweep")


def _modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class LSTMNet(nn.Module):  # a CRNN's tail: conv features, a bidirectional LSTM, a per-step classifier
        def __init__(s):
            super().__init__()
            s.c, s.l, s.fc = nn.Conv1d(8, 16, 3, padding=1), nn.LSTM(16, 24, batch_first=True,
                                                                      bidirectional=True), nn.Linear(48, 10)

        def forward(s, x):
            return s.fc(s.l(F.relu(s.c(x)).transpose(1, 2))[0])

    class GRUNet(nn.Module):  # two stacked GRUs, the last step classified
        def __init__(s):
            super().__init__()
            s.l, s.fc = nn.GRU(8, 16, num_layers=2, batch_first=True), nn.Linear(16, 5)

        def forward(s, x):
            return s.fc(s.l(x.transpose(1, 2))[0][:, -1])

    class Conv3d(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.b = nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8)
            s.c2, s.fc = nn.Conv3d(8, 8, 3, stride=2, padding=1), nn.Linear(8, 4)

        def forward(s, x):
            return s.fc(F.relu(s.c2(F.relu(s.b(s.c(x))))).mean((2, 3, 4)))

    class ConvT3d(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.t = nn.Conv3d(3, 8, 3, stride=2, padding=1), nn.ConvTranspose3d(8, 4, 2, stride=2)

        def forward(s, x):
            return s.t(F.relu(s.c(x)))

    class ConvT1d(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.t = nn.Conv1d(8, 16, 3, padding=1), nn.ConvTranspose1d(16, 8, 4, stride=2, padding=1)

        def forward(s, x):
            return s.t(F.relu(s.c(x)))

    class PixelShuffle(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.Conv2d(3, 12, 3, padding=1, padding_mode="reflect")
            s.n, s.c2 = nn.InstanceNorm2d(3, affine=True), nn.Conv2d(3, 3, 3, padding=1)

        def forward(s, x):
            return s.c2(F.relu(s.n(F.pixel_shuffle(s.c(x), 2))))

    class GroupNorm(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.g, s.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.Conv2d(16, 8, 1)

        def forward(s, x):
            return s.c2(F.silu(s.g(s.c(x))))

    class Einsum(nn.Module):
        def __init__(s):
            super().__init__()
            s.w, s.v = nn.Parameter(torch.randn(16, 32) * 0.2), nn.Parameter(torch.randn(32, 8) * 0.2)

        def forward(s, x):
            return torch.einsum("bsd,de->bse", torch.relu(torch.einsum("bcs,cd->bsd", x, s.w)), s.v)

    class Tied(nn.Module):
        def __init__(s):
            super().__init__()
            s.e, s.l = nn.Embedding(100, 32), nn.Linear(32, 32)

        def forward(s, ids):
            return torch.tanh(s.l(s.e(ids))) @ s.e.weight.t()

    class Mixed(nn.Module):
        def __init__(s):
            super().__init__()
            s.e, s.f, s.o = nn.Embedding(50, 16), nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(s, ids, feat, mask):
            h = (s.e(ids) + s.f(feat).unsqueeze(1)).masked_fill(~mask.unsqueeze(-1), 0.0)
            return s.o(h.sum(1)), h.argmax(-1)

    class LeftMatMul(nn.Module):
        def __init__(s):
            super().__init__()
            s.w, s.c = nn.Parameter(torch.randn(12, 8) * 0.3), nn.Conv1d(8, 8, 1)

        def forward(s, x):
            return torch.relu(s.w @ s.c(x))

    class SDPA(nn.Module):
        def __init__(s):
            super().__init__()
            s.q, s.k, s.v, s.o = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)

        def forward(s, x):
            x = x.transpose(1, 2)
            b, n, _ = x.shape
            q, k, v = [m(x).reshape(b, n, 4, 8).transpose(1, 2) for m in (s.q, s.k, s.v)]
            return s.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, 32))

    class MaskedAttention(nn.Module):
        def __init__(s):
            super().__init__()
            s.qkv, s.o = nn.Linear(8, 96), nn.Linear(32, 8)

        def forward(s, x):
            x = x.transpose(1, 2)
            q, k, v = s.qkv(x).split(32, -1)
            n = x.shape[1]
            a = (q @ k.transpose(1, 2)) / 5.6
            a = a.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            return s.o(a.softmax(-1) @ v)

    class CumSum(nn.Module):
        def __init__(s):
            super().__init__()
            s.l = nn.Linear(8, 8)

        def forward(s, x):
            return torch.cumsum(s.l(x.transpose(1, 2)), 1)

    class Resize(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.c2, s.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 3,
                                                                                                      padding=1)

        def forward(s, x):
            y = F.interpolate(F.relu(s.c(x)), scale_factor=2, mode="nearest")
            y = F.interpolate(F.relu(s.c2(y)), scale_factor=0.5, mode="bilinear", align_corners=True)
            return s.c3(F.interpolate(y, size=(20, 20), mode="bicubic"))

    class DepthwiseConv1d(nn.Module):  # a Conformer convolution module
        def __init__(s):
            super().__init__()
            s.pw, s.dw = nn.Conv1d(8, 32, 1), nn.Conv1d(16, 16, 31, padding=15, groups=16)
            s.bn, s.o = nn.BatchNorm1d(16), nn.Conv1d(16, 8, 1)

        def forward(s, x):
            return s.o(F.silu(s.bn(s.dw(F.glu(s.pw(x), dim=1)))))

    class Activations(nn.Module):
        def __init__(s):
            super().__init__()
            s.c = nn.ModuleList([nn.Conv2d(3, 8, 3, padding=1)] + [nn.Conv2d(8, 8, 1) for _ in range(3)])
            s.p, s.o = nn.PReLU(8), nn.Conv2d(8, 4, 1)

        def forward(s, x):
            y = F.mish(s.c[1](s.p(s.c[0](x))))
            y = F.elu(s.c[2](y))
            return s.o(F.selu(F.leaky_relu(s.c[3](y), 0.2)))

    class ActivationChain(nn.Module):  # float regions of several specified functions in one fused kernel
        def __init__(s):
            super().__init__()
            s.a, s.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

        def forward(s, x):
            return s.b(F.silu(F.gelu(F.softplus(F.mish(s.a(x))))))

    class Pools(nn.Module):
        def __init__(s):
            super().__init__()
            s.c, s.c2, s.fc = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

        def forward(s, x):
            y = F.max_pool2d(F.relu(s.c(x)), 3, 2, ceil_mode=True)
            y = F.avg_pool2d(s.c2(y), 3, 1, padding=1, count_include_pad=False)
            return F.normalize(s.fc(y.amax((2, 3))), dim=-1)

    class TracedLoop(nn.Module):  # a recurrence written as a Python loop: the tracer unrolls it
        def __init__(s):
            super().__init__()
            s.l = nn.Linear(8, 8)

        def forward(s, x):
            h = x[:, :, 0]
            for i in range(x.shape[2]):
                h = torch.tanh(s.l(h) + x[:, :, i])
            return h

    class LogSoftmax(nn.Module):  # a CTC acoustic model's head: per-frame log-probabilities
        def __init__(s):
            super().__init__()
            s.c, s.fc = nn.Conv1d(8, 16, 3, padding=1), nn.Linear(16, 12)

        def forward(s, x):
            return F.log_softmax(s.fc(F.relu(s.c(x)).transpose(1, 2)), dim=-1)

    class Timestep(nn.Module):  # a diffusion UNet block: sinusoidal embedding of a float timestep input
        def __init__(s):
            super().__init__()
            s.c, s.t1, s.t2, s.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16, 32), nn.Linear(32, 16), \
                nn.Conv2d(16, 3, 3, padding=1)
            s.register_buffer("f", torch.exp(-math.log(1000.0) * torch.arange(8) / 8))

        def forward(s, x, t):
            a = t[:, None] * s.f[None]
            e = s.t2(F.silu(s.t1(torch.cat([torch.sin(a), torch.cos(a)], -1))))
            return s.c2(F.silu(s.c(x) + e[:, :, None, None]))

    class YoloHead(nn.Module):  # a YOLO neck and decode: upsample + concat, sigmoid, grid offsets, anchors squared
        def __init__(s):
            super().__init__()
            s.a, s.b = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
            s.n, s.h = nn.Conv2d(48, 16, 1), nn.Conv2d(16, 2 * 7, 1)
            gy, gx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
            s.register_buffer("grid", torch.stack((gx, gy), -1).reshape(1, 1, 8, 8, 2))
            s.register_buffer("anchor", torch.tensor([[10.0, 13.0], [16.0, 30.0]]).reshape(1, 2, 1, 1, 2))

        def forward(s, x):
            p3 = F.silu(s.a(x))
            p4 = F.silu(s.b(p3))
            y = s.h(F.silu(s.n(torch.cat([F.interpolate(p4, scale_factor=2.0, mode="nearest"), p3], 1))))
            y = y.reshape(-1, 2, 7, 8, 8).permute(0, 1, 3, 4, 2).sigmoid()
            xy, wh, conf = y.split((2, 2, 3), -1)
            xy = (xy * 2 - 0.5 + s.grid) * 2.0
            wh = (wh * 2) ** 2 * s.anchor
            return torch.cat((xy, wh, conf), -1).reshape(-1, 128, 7)

    class Half(nn.Module):  # exported in float16, as a user who ran .half() before torch.onnx.export
        def __init__(s):
            super().__init__()
            s.c, s.c2, s.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, 2, 1), nn.Linear(16, 5)

        def forward(s, x):
            return s.fc(F.gelu(s.c2(F.relu(s.c(x)))).mean((2, 3)))

    class LRN(nn.Module):  # a 2014 CNN: local response normalization between conv and pool
        def __init__(s):
            super().__init__()
            s.c, s.n, s.c2 = nn.Conv2d(3, 16, 5, padding=2), nn.LocalResponseNorm(5), nn.Conv2d(16, 8, 3)

        def forward(s, x):
            return s.c2(F.max_pool2d(s.n(F.relu(s.c(x))), 3, 2))

    class ASPP(nn.Module):  # DeepLab: parallel dilated convs + a pooled branch, upsampled and concatenated
        def __init__(s):
            super().__init__()
            s.s = nn.Conv2d(3, 16, 3, 2, 1)
            s.b = nn.ModuleList([nn.Conv2d(16, 8, 1)] + [nn.Conv2d(16, 8, 3, padding=r, dilation=r) for r in (2, 4)])
            s.p, s.o = nn.Conv2d(16, 8, 1), nn.Conv2d(32, 5, 1)

        def forward(s, x):
            f = F.relu(s.s(x))
            g = F.relu(s.p(F.adaptive_avg_pool2d(f, 1))).expand(-1, -1, f.shape[2], f.shape[3])
            y = s.o(torch.cat([F.relu(b(f)) for b in s.b] + [g], 1))
            return F.interpolate(y, size=x.shape[2:], mode="bilinear", align_corners=True).argmax(1)

    class Reductions(nn.Module):  # statistics pooling (x-vector): mean, std, logsumexp, L2 norm
        def __init__(s):
            super().__init__()
            s.c, s.fc = nn.Conv1d(8, 16, 3, padding=1), nn.Linear(48, 6)

        def forward(s, x):
            h = F.relu(s.c(x))
            st = torch.cat([h.mean(-1), torch.sqrt(h.var(-1) + 1e-5), torch.logsumexp(h, -1)], -1)
            return s.fc(st) / torch.linalg.vector_norm(st, dim=-1, keepdim=True)

    class HeadWeights(nn.Module):  # per-head weights: a MatMul with a constant 3-D right operand
        def __init__(s):
            super().__init__()
            s.w, s.o = nn.Parameter(torch.randn(4, 8, 6) * 0.3), nn.Linear(24, 8)

        def forward(s, x):
            h = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], 4, 2).repeat(1, 1, 1, 4).transpose(1, 2)
            y = torch.relu(h @ s.w)  # (b, 4, s, 6)
            return s.o(y.transpose(1, 2).reshape(x.shape[0], x.shape[2], 24))

    class GatherScatter(nn.Module):  # top-k token pooling: gather along a dim by indices, scatter back
        def __init__(s):
            super().__init__()
            s.l, s.o = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(s, x):
            h = s.l(x.transpose(1, 2))
            idx = h.sum(-1).topk(4, -1).indices[..., None].expand(-1, -1, 8)
            top = torch.relu(s.o(torch.gather(h, 1, idx)))
            return h.scatter(1, idx, top)

    return locals()


def _seq(n: int, rng) -> dict:
    return {"x": rng.standard_normal((n, 8, 12)).astype(np.float32)}


def _img(n: int, rng) -> dict:
    return {"x": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}


def _vol(n: int, rng) -> dict:
    return {"x": rng.standard_normal((n, 3, 6, 8, 8)).astype(np.float32)}


# name -> (module class name, input maker)
CASES = {
    "lstm": ("LSTMNet", _seq), "gru": ("GRUNet", _seq), "einsum": ("Einsum", lambda n, r: {
        "x": r.standard_normal((n, 16, 10)).astype(np.float32)}),
    "conv3d": ("Conv3d", _vol), "convtranspose3d": ("ConvT3d", _vol), "convtranspose1d": ("ConvT1d", _seq),
    "pixel-shuffle": ("PixelShuffle", _img), "groupnorm": ("GroupNorm", _img),
    "tied-embedding": ("Tied", lambda n, r: {"ids": r.integers(0, 100, (n, 7)).astype(np.int64)}),
    "mixed-inputs": ("Mixed", lambda n, r: {"ids": r.integers(0, 50, (n, 5)).astype(np.int64),
                                            "feat": r.standard_normal((n, 8)).astype(np.float32),
                                            "mask": r.random((n, 5)) > 0.3}),
    "left-matmul": ("LeftMatMul", _seq), "sdpa": ("SDPA", _seq), "masked-attention": ("MaskedAttention", _seq),
    "cumsum": ("CumSum", _seq), "resize": ("Resize", _img), "depthwise-conv1d": ("DepthwiseConv1d", _seq),
    "activations": ("Activations", _img),
    "activation-chain": ("ActivationChain", _img), "pools": ("Pools", _img), "traced-loop": ("TracedLoop", _seq),
    "log-softmax": ("LogSoftmax", _seq), "timestep-embedding": ("Timestep", lambda n, r: {
        **_img(n, r), "t": r.uniform(0, 1000, (n,)).astype(np.float32)}),
    "yolo-head": ("YoloHead", lambda n, r: {"x": r.standard_normal((n, 3, 32, 32)).astype(np.float32)}),
    "float16": ("Half", lambda n, r: {k: v.astype(np.float16) for k, v in _img(n, r).items()}),
    "lrn": ("LRN", _img), "aspp": ("ASPP", _img), "reductions": ("Reductions", _seq),
    "head-weights": ("HeadWeights", _seq), "gather-scatter": ("GatherScatter", _seq),
}


def sweep_one(name: str, targets: list[str], recipes: list[str], opset: int, work: Path) -> list[dict]:
    import torch

    cls, make = CASES[name]
    torch.manual_seed(0)
    model = _modules()[cls]().eval()
    if name == "float16":
        model = model.half()
    example = make(2, np.random.default_rng(0))
    path = work / f"{name}.onnx"
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(model, tuple(torch.from_numpy(v) for v in example.values()), str(path),
                              input_names=list(example), opset_version=opset, dynamo=False,
                              dynamic_axes={k: {0: "batch"} for k in example})
    except Exception as e:  # noqa: BLE001 - an export failure is a row
        return [{"case": name, "target": "-", "result": f"export failed: {type(e).__name__}: "
                 f"{str(e).splitlines()[0][:100] if str(e) else ''}"}]
    rng = np.random.default_rng(1)
    calib, test = make(16, rng), make(4, rng)
    np.savez(work / f"{name}.calib.npz", **calib)
    return compile_rows({"case": name}, path, work / f"{name}.calib.npz", test, targets, recipes, work)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    add_sweep_args(ap)
    args = ap.parse_args(argv)
    quiet_logs("qcompile", "torch")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown cases {unknown}; known: {list(CASES)}")
    rows = []
    with work_folder(args.keep) as work:
        for name in args.cases:
            rows += sweep_one(name, args.targets, args.recipes, args.opset, work)
    print(f"`python tools/layer_sweep.py {' '.join(sys.argv[1:])}` (TorchScript exporter, dynamic batch, opset "
          f"{args.opset})\n")
    print_table(rows, ["case", "recipe", "target", "result", "cosine", "min_layer_sqnr", "int_equal", "main_equal",
                       "s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
