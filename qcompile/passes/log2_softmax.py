"""Log-domain quantization of post-Softmax attention probabilities (RepQ-ViT's log√2 -> log2 reparameterization).

Quantizer (b bits, codes 0..L with L = 2^b - 1, m = 1 for ``log2`` and m = 2 for ``log_sqrt2``, scale s > 0):

    q = clamp(round(-m·log2(A/s)), 0, L)   (A = 0 -> L)        Â = s·2^(-q/m) for q < L,  Â = 0 for q = L

The top code means exactly 0, so masked attention stays 0 and q fits in b bits (RepQ-ViT's simulation code zeroes
values past the range but keeps the clamped code, which needs one more bit). ``log_sqrt2`` is RepQ-ViT's calibration
quantizer; at inference it is reparameterized to log2 shifts by parity (their code writes the same values as
``Δ·2^(-⌈q/2⌉)·(1 + (√2-1)·(q mod 2))``; the floor form is emitted so the odd factor 1/√2 is below 1):

    Â = s·2^(-⌊q/2⌋)·(1 - (1-1/√2)·(q mod 2)) = s·E + (s/√2)·O,
    E = 2^(-(q>>1))·[q even, q < L],   O = 2^(-(q>>1))·[q odd, q < L]

E and O hold powers of two or 0, so ``A·V ≈ s·(E·V) + (s/√2)·(O·V)``: two MatMuls of shift-only operands,
the parity factor folded into the output scale of the odd one. One MatMul with a per-element 1/√2 factor would need
a real multiply per product; two shift-add MatMuls are what shift hardware runs. ``log2``: one MatMul on 2^(-q).

Rewrite, for a float32 Softmax output P read by MatMul nodes of its own graph (other readers keep reading P):

    Log(P) -> Mul(-m/ln2) [-> Add(m·log2 s)] -> Floor -> Clip(0, L) -> Cast(uint8) = q0 (estimate)
    q0 -> Cast(int32) -> Gather(C) -> LessOrEqual(P, ·) -> Cast(int32) -> Add(q0, ·) -> Cast(uint8) = q
    q -> Cast(int32) -> Gather(T) -> MatMul [-> Mul(s)]                                          (log2)
    q -> Cast(int32) -> Gather(TE), Gather(TO) -> MatMul, MatMul -> [Mul(s)], Mul(s/√2) -> Add    (log_sqrt2)

C[k] (k < L) is the largest float32 below the decision boundary s·2^(-(k+½)/m), C[k >= L] = -1; tables have 256
entries so any uint8 indexes them. ONNX Runtime's Log is not correctly rounded (up to 3.4 ulp on (0, 1]), so a bare
``Round(Log)`` would disagree with the real-valued quantizer next to boundaries; ``Floor`` of the estimate is q or
q-1 (its error is far below ½ level) and the comparison against C adds the missing 1: q is exactly the real-valued
quantizer for every float32 input, as the numpy reference :func:`log2_quantize` computes it. Masked positions
(Softmax of -inf / float-min = 0) give Log = -inf -> q = L -> 0; a NaN row (all -inf) gives some level instead of
NaN. Declined: Softmax outputs no MatMul reads, non-float32 outputs, overrides, ``scale: mse`` without calibration
samples or inside control flow. Tensor names and the pattern for lowerings: docs/log2_softmax.md.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from decimal import Decimal, localcontext
from functools import lru_cache

import numpy as np
import onnx_graphsurgeon as gs
from onnx import TensorProto

from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.ir import NameScope, iter_graphs
from qcompile.match import Declined
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.types import ConfigBase, PassKind

logger = logging.getLogger(__name__)
MODES = ("log2", "log_sqrt2")
SCALES = ("one", "mse")
OVERRIDE_KEYS = {"log2", "bits", "mode", "scale"}
TABLE = 256  # every uint8 level indexes every table


@dataclass(frozen=True)
class Log2SoftmaxConfig(ConfigBase):
    bits: int = 4  # RepQ-ViT's W4A4 setting; codes are stored as uint8
    mode: str = "log_sqrt2"
    scale: str = "one"  # "one": s = 1 (A <= 1); "mse": s from calibration quantiles, least squared error
    max_samples: int = 32
    overrides: dict = field(default_factory=dict)  # Softmax node name / "re:" -> {log2, bits, mode, scale}

    def validate(self) -> None:
        _check(self.bits, self.mode, self.scale, "log2_softmax")
        if self.max_samples < 1:
            raise ConfigError("log2_softmax.max_samples must be >= 1")
        OverrideMap.build(self.overrides, OVERRIDE_KEYS, "log2_softmax.overrides")
        for key, val in self.overrides.items():
            if not isinstance(val.get("log2", True), bool):
                raise ConfigError(f"log2_softmax.overrides[{key!r}].log2 must be true/false")
            _check(val.get("bits", self.bits), val.get("mode", self.mode), val.get("scale", self.scale),
                   f"log2_softmax.overrides[{key!r}]")


def _check(bits, mode, scale, where: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ConfigError(f"{where}.bits must be an integer in [2, 8], got {bits!r}")
    if mode not in MODES:
        raise ConfigError(f"{where}.mode must be one of {list(MODES)}, got {mode!r}")
    if scale not in SCALES:
        raise ConfigError(f"{where}.scale must be one of {list(SCALES)}, got {scale!r}")


# ----------------------------------------------------------------------------------------------- numerics

def _m(mode: str) -> int:
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return 1 if mode == "log2" else 2


def _below(t: Decimal) -> np.float32:
    """The largest float32 strictly below the positive real t (0 when t is below the smallest subnormal)."""
    f = np.float32(float(t))
    while f > 0 and Decimal(float(f)) >= t:
        f = np.nextafter(f, np.float32(-1))
    while Decimal(float(np.nextafter(f, np.float32(np.inf)))) < t:
        f = np.nextafter(f, np.float32(np.inf))
    return f


@lru_cache(maxsize=64)
def thresholds(bits: int, mode: str, scale: float = 1.0) -> np.ndarray:
    """C[k] = largest float32 < s·2^(-(k+½)/m) for k < L, -1 for k >= L: q >= k+1  <=>  A <= C[k]  (256 entries)."""
    m, levels = _m(mode), 2 ** bits - 1
    out = np.full(TABLE, -1.0, np.float32)
    with localcontext() as dc:
        dc.prec = 60
        s = Decimal(float(np.float32(scale)))
        for k in range(levels):
            out[k] = _below(s * Decimal(2) ** (Decimal(-(2 * k + 1)) / Decimal(2 * m)))
    out.setflags(write=False)
    return out


@lru_cache(maxsize=64)
def shift_tables(bits: int, mode: str) -> tuple[np.ndarray, ...]:
    """Shift operands by level: (2^-q,) for log2; (E, O) = 2^-(q>>1) on even / odd q for log_sqrt2; 0 at q >= L."""
    levels = 2 ** bits - 1
    k = np.arange(TABLE)
    live = k < levels
    if _m(mode) == 1:
        tabs = (np.where(live, np.ldexp(1.0, -k), 0.0),)
    else:
        p = np.where(live, np.ldexp(1.0, -(k >> 1)), 0.0)
        tabs = (np.where(k % 2 == 0, p, 0.0), np.where(k % 2 == 1, p, 0.0))
    out = tuple(np.asarray(t, np.float32) for t in tabs)
    for t in out:
        t.setflags(write=False)
    return out


def output_scales(mode: str, scale: float) -> tuple[np.float32, ...]:
    """Scalars applied to the MatMul output(s): (s,) for log2, (s, s/√2) for log_sqrt2."""
    s = float(np.float32(scale))
    return (np.float32(s),) if _m(mode) == 1 else (np.float32(s), np.float32(s * 2.0 ** -0.5))


def log2_quantize(a: np.ndarray, bits: int, mode: str = "log_sqrt2", scale: float = 1.0
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Reference: (levels uint8, dequantized float32) of A >= 0, exact in the reals (no libm rounding).

    levels = clamp(round(-m·log2(A/s)), 0, L) (A = 0 -> L); dequantized = s·2^(-q/m) correctly rounded, 0 at q = L.
    """
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits must be in [2, 8], got {bits}")
    levels = 2 ** bits - 1
    asc = thresholds(bits, mode, scale)[:levels][::-1]  # ascending
    a = np.asarray(a, np.float32)
    q = (levels - np.searchsorted(asc, a, side="left")).astype(np.uint8)
    return q, dequantize(q, bits, mode, scale)


def dequantize(levels: np.ndarray, bits: int, mode: str = "log_sqrt2", scale: float = 1.0) -> np.ndarray:
    """The direct formula s·2^(-q/m) (0 at q >= L), correctly rounded to float32."""
    return _value_table(bits, mode, float(np.float32(scale)))[np.asarray(levels, np.int64)]


@lru_cache(maxsize=64)
def _value_table(bits: int, mode: str, scale: float) -> np.ndarray:
    m, levels = _m(mode), 2 ** bits - 1
    out = np.zeros(TABLE, np.float32)
    with localcontext() as dc:
        dc.prec = 60
        for k in range(levels):
            out[k] = np.float32(float(Decimal(scale) * Decimal(2) ** (Decimal(-k) / Decimal(m))))
    return out


def _mse_scale(values: np.ndarray, bits: int, mode: str) -> float:
    """RepQ-ViT's search: s among 1, max and the 99.9 / 99.99 / 99.999th percentiles, least squared error."""
    cands = {1.0, float(values.max())} | {float(np.quantile(values, p)) for p in (0.999, 0.9999, 0.99999)}
    cands = sorted(c for c in cands if c > 0)
    errs = [float(np.sum((log2_quantize(values, bits, mode, c)[1].astype(np.float64) - values) ** 2)) for c in cands]
    return float(np.float32(cands[int(np.argmin(errs))]))


# ----------------------------------------------------------------------------------------------- rewrite

class Log2SoftmaxPass(PassBase):
    name = "log2_softmax"
    kind = PassKind.APPROXIMATE

    def __init__(self, config: Log2SoftmaxConfig | None = None) -> None:
        self.config = config or Log2SoftmaxConfig()
        self.overrides = OverrideMap.build(self.config.overrides, OVERRIDE_KEYS, "log2_softmax.overrides")

    def _settings(self, node: gs.Node) -> dict:
        o = self.overrides.resolve(node.name)
        c = self.config
        return {"log2": o.get("log2", True), "bits": o.get("bits", c.bits), "mode": o.get("mode", c.mode),
                "scale": o.get("scale", c.scale)}

    def _match(self, g: gs.Graph, node: gs.Node, cfg: dict, main: bool, has_samples: bool) -> tuple[list, str]:
        """(MatMul readers in the Softmax's own graph as (node, input index), reason if declined)."""
        p, own = node.outputs[0], {id(n) for n in g.nodes}
        if cfg["log2"] is False:
            return [], "excluded by override"
        dt = p.dtype if p.dtype is not None else node.inputs[0].dtype
        if dt is None or np.dtype(dt) != np.float32:
            return [], f"Softmax output dtype is {dt}; only float32 is supported"
        readers = [(c, i) for c in p.outputs if c.op == "MatMul" and id(c) in own
                   for i, x in enumerate(c.inputs) if x is p]
        twice = {c.name for c, _ in readers if sum(x is p for x in c.inputs) > 1}
        readers = [(c, i) for c, i in readers if c.name not in twice]
        if not readers:
            others = sorted({c.op for c in p.outputs}) or ["none (graph output)"]
            return [], f"Softmax output feeds no MatMul (readers: {', '.join(others)})"
        if cfg["scale"] == "mse" and not (main and has_samples):
            why = "no calibration samples" if main else "inside control flow (calibrated on the main graph only)"
            return [], f"scale 'mse' needs calibrated Softmax values: {why}"
        return readers, ""

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        declined: list[Declined] = []
        todo = []
        for g in iter_graphs(graph):
            for node in g.nodes:
                if node.op != "Softmax":
                    continue
                cfg = self._settings(node)
                readers, why = self._match(g, node, cfg, g is graph, bool(ctx.samples))
                if why:
                    declined.append(Declined(self.name, node.name, node.op, why))
                else:
                    todo.append((g, node, cfg, readers))
        scales = self._calibrate(graph, ctx, [(n, c) for _, n, c, _ in todo if c["scale"] == "mse"])
        uniq = NameScope(graph)
        stats: dict = {"softmax": 0, "matmuls": 0, "per_softmax": {}}
        for g, node, cfg, readers in todo:
            s = scales.get(node.name, 1.0)
            q = self._quantizer(g, node.outputs[0], cfg["bits"], cfg["mode"], s, uniq)
            ctx.exact_tensors.update(
                self._dequantize(g, q, node.outputs[0].name, readers, cfg["bits"], cfg["mode"], s, uniq))
            stats["softmax"] += 1
            stats["matmuls"] += len(readers)
            stats["per_softmax"][node.name] = {"bits": cfg["bits"], "mode": cfg["mode"], "scale": s}
        for g in {id(g): g for g, *_ in todo}.values():
            g.toposort()
        logger.info("log2_softmax: %d Softmax outputs, %d MatMuls", stats["softmax"], stats["matmuls"])
        return PassResult(graph, bool(todo), stats, declined)

    def _calibrate(self, graph: gs.Graph, ctx: PassContext, nodes: list) -> dict[str, float]:
        if not nodes:
            return {}
        names = [n.outputs[0].name for n, _ in nodes]
        vals: dict[str, list] = {n: [] for n in names}
        rng = np.random.default_rng(0)
        for values in activations(graph, ctx.model, ctx.samples[: self.config.max_samples], names):
            for n, v in values.items():
                v = np.asarray(v, np.float32).reshape(-1)
                vals[n].append(v if v.size <= 65536 else rng.choice(v, 65536, replace=False))
        out = {}
        for node, cfg in nodes:
            v = np.concatenate(vals[node.outputs[0].name])
            out[node.name] = _mse_scale(v[np.isfinite(v)], cfg["bits"], cfg["mode"])
        return out

    @staticmethod
    def _quantizer(g: gs.Graph, p: gs.Tensor, bits: int, mode: str, s: float, uniq: NameScope) -> gs.Variable:
        """Append the quantizer reading P; return q (uint8, named ``<P>_log2_levels``)."""
        m, levels, base = _m(mode), 2 ** bits - 1, f"{p.name}_log2"

        def op(kind: str, suffix: str, inputs: list, dtype, **attrs) -> gs.Variable:
            out = gs.Variable(uniq(f"{base}_{suffix}"), dtype=dtype, shape=p.shape)
            g.nodes.append(gs.Node(kind, uniq(f"{base}_{kind}_{suffix}"), attrs=attrs, inputs=inputs, outputs=[out]))
            return out

        def const(suffix: str, value) -> gs.Constant:
            return gs.Constant(uniq(f"{base}_{suffix}"), np.asarray(value))

        u = op("Mul", "neg_log", [op("Log", "ln", [p], np.float32),
                                  const("neg_log2_factor", np.float32(-m / np.log(2.0)))], np.float32)
        if np.float32(s) != np.float32(1.0):
            u = op("Add", "neg_log_shifted", [u, const("log2_scale_term", np.float32(m * np.log2(np.float32(s))))],
                   np.float32)
        f = op("Clip", "clip", [op("Floor", "floor", [u], np.float32), const("clip_min", np.float32(0)),
                                const("clip_max", np.float32(levels))], np.float32)
        q0 = op("Cast", "estimate", [f], np.uint8, to=TensorProto.UINT8)
        i0 = op("Cast", "estimate_index", [q0], np.int32, to=TensorProto.INT32)
        thr = op("Gather", "threshold", [const("thresholds", thresholds(bits, mode, s)), i0], np.float32, axis=0)
        carry = op("Cast", "carry", [op("LessOrEqual", "below", [p, thr], np.bool_)], np.int32, to=TensorProto.INT32)
        return op("Cast", "levels", [op("Add", "sum", [i0, carry], np.int32)], np.uint8, to=TensorProto.UINT8)

    @staticmethod
    def _dequantize(g: gs.Graph, q: gs.Variable, pname: str, readers: list, bits: int, mode: str, s: float,
                    uniq: NameScope) -> list[str]:
        """Shift operands from q, then rewire every MatMul reader (split in two for log_sqrt2); returns the
        operands' names (exact powers of two or 0: the Q/DQ pass must not requantize them)."""
        base = f"{pname}_log2"
        idx = gs.Variable(uniq(f"{base}_levels_index"), dtype=np.int32, shape=q.shape)
        g.nodes.append(gs.Node("Cast", uniq(f"{base}_Cast_levels_index"), attrs={"to": TensorProto.INT32},
                               inputs=[q], outputs=[idx]))
        parts = ("shift",) if _m(mode) == 1 else ("shift_even", "shift_odd")
        ops = []
        for part, tab in zip(parts, shift_tables(bits, mode)):
            t = gs.Variable(uniq(f"{base}_{part}"), dtype=np.float32, shape=q.shape)
            g.nodes.append(gs.Node("Gather", uniq(f"{base}_Gather_{part}"), attrs={"axis": 0},
                                   inputs=[gs.Constant(uniq(f"{base}_{part}_table"), tab), idx], outputs=[t]))
            ops.append(t)
        for mm, i in readers:
            y, scales = mm.outputs[0], output_scales(mode, s)
            if len(ops) == 1 and scales[0] == 1:
                mm.inputs[i] = ops[0]  # log2 with s = 1: the MatMul reads the shift operand, output unchanged
                continue
            terms = []
            for k, (part, t, sc) in enumerate(zip(parts, ops, scales)):
                r = gs.Variable(uniq(f"{y.name}_log2_{part}"), dtype=y.dtype)
                ins = list(mm.inputs)
                ins[i] = t
                if k == 0:
                    mm.inputs[i] = t
                    mm.outputs[0] = r
                else:
                    g.nodes.append(gs.Node("MatMul", uniq(f"{mm.name}_log2_{part}"), inputs=ins, outputs=[r]))
                if sc != 1:
                    out = y if len(ops) == 1 else gs.Variable(uniq(f"{r.name}_scaled"), dtype=y.dtype)
                    g.nodes.append(gs.Node("Mul", uniq(f"{mm.name}_log2_scale_{part}"),
                                           inputs=[r, gs.Constant(uniq(f"{r.name}_scale"), np.asarray(sc))],
                                           outputs=[out]))
                    r = out
                terms.append(r)
            if len(ops) > 1:
                g.nodes.append(gs.Node("Add", uniq(f"{mm.name}_log2_parity_sum"), inputs=terms, outputs=[y]))
        return [t.name for t in ops]
