"""Quantized weight reconstruction (GPTQ, RepQuant's "quantized weight reconstruction"): re-fit the integer weights
of each compute op so that its quantized output best matches fp32 on the calibration activations.

Objective, per layer with weight rows W [N, K] (output channels x input features) and calibration inputs X [K, M]:

    min_Q ||W·X − (s ⊙ Q)·X||²,   Q_ij ∈ {−q, …, q},   q = 2^(b−1) − 1,   s_i = max_j |W_ij| / q

on the fixed per-output-channel grid insert_qdq uses (symmetric, restricted range, computed from the original
weights: the grid never moves, only which grid point each weight takes). GPTQ (Frantar et al., 2023) solves it
greedily column by column: with H = 2·X·Xᵀ + λI (λ = damp·mean diag H) and U the upper Cholesky factor of H⁻¹,
quantizing column j leaves the error e = (w_j − s·q_j) / U_jj, compensated on the columns not yet quantized,
W[:, j:] −= e·U[j, j:]; updates across blocks of ``block_size`` columns are applied lazily (one matmul per block).
With ``act_order`` columns are visited in order of decreasing diag H. Columns whose input is always 0 keep plain
rounding.

Layouts (axis = the per-channel axis insert_qdq's ``weight_axis`` gives):
  MatMul(X, W[K, N])            rows Wᵀ, axis 1; X's last axis is K
  Gemm(X, B[, C], transB)       rows B (axis 0) if transB else Bᵀ (axis 1); transA declined
  Conv(X, W[M, C/g, kh(, kw)])  rows of group g: W[g·M/g : (g+1)·M/g].reshape(M/g, C/g·kh·kw), axis 0. X is the
                                im2col of the input (pads / auto_pad, strides, dilations) with features ordered
                                (channel, kh, kw) as in W's reshape; H is built per group (one batched [g, K, K]
                                tensor), so grouped and depthwise convs (K = kh·kw per group) cost no more than
                                dense ones. 1-D convs run as 2-D with height 1; 3-D convs are declined.
A weight read by several nodes of the same layout is fitted to the sum of their Hessians.

Per-block scales (``weight_block`` = B > 0, for insert_qdq's weight-only ``weight_granularity: per_block`` with the
same ``weight_block``): the grid is ``s_{i,b} = max_{j in block b} |W_ij| / q`` per output channel i and block b of B
consecutive input features (:func:`qcompile.quant_math.block_qparams`, partial last block), expanded to one scale per
(i, j); GPTQ runs unchanged with column j quantized on its own block's scale (with ``act_order`` the scales are
permuted with the columns: "static groups"). ``weight_block`` is the scale granularity; ``block_size`` stays
GPTQ's lazy-update batch of columns, unrelated. MatMul / Gemm only (Conv declined).

Asymmetric grids (``symmetric: false``, for insert_qdq's ``weight_symmetric: false``, ``weight_dtype: uint8``): the
grid is the min/max one, ``W ≈ s·(Q − z)`` with Q in [0, 2^b − 1] and an integer zero point z per channel (per block),
and GPTQ rounds ``w/s + z`` onto it; the hint holds uint8 values.

Output: ``ctx.weight_hints[W name] = (int8 values in W's own layout, QParams(scale [C], zero_point 0, axis))``
(per-block: QParams of :func:`qcompile.quant_math.block_qparams`, blocks along W's reduction axis; uint8 values and
zero points when asymmetric).
The float weight stays in the graph (the graph is unchanged: ``modified`` is False) and insert_qdq quantizes with
the hint. ``bits`` and ``symmetric`` must equal the recipe's insert_qdq ``weight_bits`` and ``weight_symmetric``: the
hint carries the scale of a ``bits`` grid. Give this pass the same per-node overrides as insert_qdq (a node insert_qdq
leaves float or quantizes per tensor should get ``{"reconstruct": false}``).
Limits: X are the float graph's activations (layers are fitted independently, not on the quantized outputs of
earlier layers) and activation quantization is not modelled. Declined with a reason: overrides, unsupported
layouts, nodes inside If/Loop/Scan bodies, non-finite activations, and layers whose reconstruction does not beat
round-to-nearest on the calibration data (insert_qdq's own rounding then stands).
Stats per layer: relative output error ||ΔW·X||² / ||W·X||² on the calibration inputs (bias-free output), for
round-to-nearest and for the reconstruction.
Cost: numpy only. Inputs are gathered into blocks of >= 1024 rows per X·Xᵀ update; Hessians of at most
``H_BUDGET_BYTES`` are held at once (further layers take further ORT sweeps over the samples); U comes from one
Cholesky factorization and a blocked triangular inverse. vit-digits: 0.1 s; all-MiniLM-L6-v2 (36 layers): ~20 s.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from qcompile.calibrate import activations
from qcompile.errors import ConfigError
from qcompile.ir import iter_graphs
from qcompile.match import Declined, const_value
from qcompile.overrides import OverrideMap
from qcompile.pass_infra import PassBase, PassContext, PassResult
from qcompile.quant_math import block_qparams, expand_blocks, weight_qparams
from qcompile.types import ConfigBase, PassKind, QParams, QuantDType

logger = logging.getLogger(__name__)

OPS = ("MatMul", "Gemm", "Conv")
H_BUDGET_BYTES = 256 << 20  # Hessians held at once; layers beyond it are collected in further ORT sweeps
FLUSH_COLUMNS = 1024  # input rows gathered before one x·xᵀ update (at least K)


@dataclass(frozen=True)
class ReconstructConfig(ConfigBase):
    bits: int = 8  # must equal insert_qdq's weight_bits
    max_samples: int = 64
    block_size: int = 128  # GPTQ's lazy-update batch of columns (not the quantization block)
    weight_block: int = 0  # per-block scales of this many input features (insert_qdq's weight_block); 0 = per channel
    damp: float = 0.01
    act_order: bool = True
    symmetric: bool = True  # = insert_qdq.weight_symmetric (False: uint8 storage with zero points, weight_dtype uint8)
    overrides: dict = field(default_factory=dict)

    def validate(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"reconstruct_weights.bits must be in [2, 8], got {self.bits}")
        if self.max_samples < 1 or self.block_size < 1:
            raise ConfigError("reconstruct_weights.max_samples and block_size must be >= 1")
        if isinstance(self.weight_block, bool) or self.weight_block not in (0, 16, 32, 64, 128, 256):
            raise ConfigError(f"reconstruct_weights.weight_block must be 0 (per channel) or one of 16, 32, 64, 128, "
                              f"256, got {self.weight_block!r}")
        if not 0.0 < self.damp < 1.0:
            raise ConfigError(f"reconstruct_weights.damp must be in (0, 1), got {self.damp}")
        OverrideMap.build(self.overrides, {"reconstruct"}, "reconstruct_weights.overrides")


@dataclass
class _Layer:
    weight: str
    w: np.ndarray  # as stored in the graph
    axis: int
    rows: np.ndarray  # [G, N, K] float32
    nodes: list[gs.Node]
    h: np.ndarray | None = None  # [G, K, K] float64, sum of x·xᵀ
    count: int = 0
    bad: str = ""
    pending: list = field(default_factory=list)  # im2col blocks [G, K, L] not yet in h (fewer, larger matmuls)

    def flush(self) -> None:
        if self.pending:
            cols = np.concatenate(self.pending, axis=2)
            self.pending = []
            if self.h is None:
                self.h = np.zeros((cols.shape[0], cols.shape[1], cols.shape[1]))
            self.h += cols @ np.swapaxes(cols, 1, 2)
            self.count += cols.shape[2]


def _layout(node: gs.Node, w: np.ndarray) -> tuple[np.ndarray, int] | str:
    """(rows [G, N, K], per-channel axis) or why the node is declined."""
    if node.op == "MatMul":
        return (w.T[None], 1) if w.ndim == 2 else f"MatMul weight of rank {w.ndim} (only 2-D)"
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)):
            return "Gemm with transA=1"
        if w.ndim != 2:
            return "Gemm weight not 2-D"
        return (w[None], 0) if int(node.attrs.get("transB", 0)) else (w.T[None], 1)
    g = int(node.attrs.get("group", 1))
    if w.ndim not in (3, 4):
        return f"Conv with {w.ndim - 2} spatial dims (only 1-D and 2-D)"
    if w.shape[0] % g:
        return f"Conv output channels {w.shape[0]} not divisible by group {g}"
    return w.reshape(g, w.shape[0] // g, -1), 0


def _from_rows(q: np.ndarray, layer: _Layer) -> np.ndarray:
    """Integer rows [G, N, K] back into the weight's own layout."""
    return q[0].T if layer.axis == 1 else q.reshape(layer.w.shape)


def _conv_columns(node: gs.Node, x: np.ndarray, kernel: tuple[int, ...], groups: int) -> np.ndarray:
    """im2col of a Conv input [N, C, (H,) W]: [G, C/g·kh·kw, N·L], features ordered (channel, kh, kw)."""
    nd = len(kernel)
    lead = 2 - nd  # a 1-D conv runs as 2-D with height 1 (stride 1, no padding along it)
    kh, kw = (1,) * lead + tuple(kernel)
    x = x.reshape(x.shape[0], x.shape[1], *([1] * lead), *x.shape[2:])
    st = [1] * lead + [int(v) for v in node.attrs.get("strides", [1] * nd)]
    dil = [1] * lead + [int(v) for v in node.attrs.get("dilations", [1] * nd)]
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    begin, end = [0, 0], [0, 0]
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for i, k in enumerate((kh, kw)):
            size = x.shape[2 + i]
            total = max(0, (-(-size // st[i]) - 1) * st[i] + (k - 1) * dil[i] + 1 - size)
            begin[i] = total // 2 if auto == "SAME_UPPER" else total - total // 2
            end[i] = total - begin[i]
    elif auto != "VALID":
        p = [int(v) for v in node.attrs.get("pads", [0] * (2 * nd))]
        begin, end = [0] * lead + p[:nd], [0] * lead + p[nd:]
    x = np.pad(x, ((0, 0), (0, 0), (begin[0], end[0]), (begin[1], end[1])))
    oh = (x.shape[2] - (kh - 1) * dil[0] - 1) // st[0] + 1
    ow = (x.shape[3] - (kw - 1) * dil[1] - 1) // st[1] + 1
    cols = np.empty((x.shape[1], kh, kw, x.shape[0], oh, ow), np.float32)
    for i in range(kh):
        for j in range(kw):
            win = x[:, :, i * dil[0]: i * dil[0] + st[0] * (oh - 1) + 1: st[0],
                    j * dil[1]: j * dil[1] + st[1] * (ow - 1) + 1: st[1]]
            cols[:, i, j] = win.transpose(1, 0, 2, 3)
    return cols.reshape(groups, -1, x.shape[0] * oh * ow)


def _inv_upper(r: np.ndarray) -> np.ndarray:
    """Inverse of upper-triangular matrices [G, K, K] by blocks, [[A, B], [0, C]]⁻¹ = [[A⁻¹, −A⁻¹·B·C⁻¹], [0, C⁻¹]]:
    matmuls only, about a quarter of the work of a general inverse."""
    k = r.shape[-1]
    if k <= 256:
        return np.triu(np.linalg.inv(r))
    m = k // 2
    a, c = _inv_upper(r[:, :m, :m]), _inv_upper(r[:, m:, m:])
    out = np.zeros_like(r)
    out[:, :m, :m], out[:, m:, m:] = a, c
    out[:, :m, m:] = -(a @ r[:, :m, m:]) @ c
    return out


def _upper_inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """U [G, K, K] upper with (H + λI)⁻¹ = Uᵀ·U, λ = damp·mean diag H (raised tenfold while not positive definite).

    With J the exchange matrix, J·H·J = M·Mᵀ (Cholesky) gives H = R·Rᵀ with R = J·M·J upper, so U = R⁻¹: one
    factorization and one inverse instead of inverting H and factorizing again."""
    k = h.shape[-1]
    lam = damp * np.einsum("gkk->g", h) / k
    for _ in range(6):
        try:
            m = np.linalg.cholesky(h[:, ::-1, ::-1] + lam[:, None, None] * np.eye(k))
            return _inv_upper(np.ascontiguousarray(m[:, ::-1, ::-1]))
        except np.linalg.LinAlgError:
            lam = lam * 10
    raise np.linalg.LinAlgError("Hessian not positive definite even with 1e5x damping")


def gptq(rows: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int, block: int = 128, damp: float = 0.01,
         act_order: bool = True, zero: np.ndarray | None = None, qmin: int | None = None) -> np.ndarray:
    """Integers [G, N, K] on the grid ``scale`` ([G, N] per row, or [G, N, K] per weight: per-block scales
    expanded) that minimize ||(W − s·(Q − z))·X||² given h = X·Xᵀ [G, K, K]; Q in [qmin, qmax] (qmin defaults to
    −qmax, the symmetric restricted range), zero points ``zero`` shaped like ``scale`` (default 0)."""
    G, N, K = rows.shape
    w = rows.astype(np.float32)  # a copy
    s = scale.astype(np.float32)
    per_col = s.ndim == 3
    z = np.zeros_like(s) if zero is None else np.asarray(zero, np.float32)
    lo = -qmax if qmin is None else qmin
    h = h.astype(np.float64)
    idx = np.arange(K)
    gd, kd = np.nonzero(h[:, idx, idx] == 0)
    h[gd, kd, kd] = 1.0  # inputs always 0: no information, plain rounding
    if act_order:
        perm = np.argsort(-h[:, idx, idx], axis=1, kind="stable")  # [G, K]
        w = np.take_along_axis(w, perm[:, None, :], axis=2)
        if per_col:
            s = np.take_along_axis(s, perm[:, None, :], axis=2)
            z = np.take_along_axis(z, perm[:, None, :], axis=2)
        h = h[np.arange(G)[:, None, None], perm[:, :, None], perm[:, None, :]]
    u = _upper_inverse_cholesky(h, damp).astype(np.float32)
    q = np.zeros_like(w)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        w1 = w[:, :, i1:i2].copy()
        err = np.zeros_like(w1)
        u1 = u[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, :, i]
            sc, zc = (s[:, :, i1 + i], z[:, :, i1 + i]) if per_col else (s, z)
            qi = np.clip(np.rint(col / sc) + zc, lo, qmax)
            q[:, :, i1 + i] = qi
            e = (col - (qi - zc) * sc) / u1[:, i, i][:, None]
            w1[:, :, i:] -= e[:, :, None] * u1[:, None, i, i:]
            err[:, :, i] = e
        w[:, :, i2:] -= err @ u[:, i1:i2, i2:]
    if act_order:
        q = np.take_along_axis(q, np.argsort(perm, axis=1)[:, None, :], axis=2)
    return q


def rel_errors(rows: np.ndarray, candidates: list[np.ndarray], h: np.ndarray) -> list[float]:
    """||(W − Ŵ)·X||² / ||W·X||² for each candidate Ŵ, from h = X·Xᵀ (per group, summed)."""
    w = rows.astype(np.float64)
    den = float(np.sum((w @ h) * w))
    d = np.concatenate([w - c for c in candidates], axis=1)  # [G, n·N, K]
    num = ((d @ h) * d).reshape(d.shape[0], len(candidates), -1).sum(axis=(0, 2))
    return [float(v) / den if den > 0 else 0.0 for v in num]


class ReconstructWeightsPass(PassBase):
    name = "reconstruct_weights"
    kind = PassKind.APPROXIMATE

    def __init__(self, config: ReconstructConfig | None = None) -> None:
        self.config = config or ReconstructConfig()
        self.overrides = OverrideMap.build(self.config.overrides, {"reconstruct"}, "reconstruct_weights.overrides")
        self.dtype = QuantDType.INT8 if self.config.symmetric else QuantDType.UINT8  # = insert_qdq.weight_dtype

    def _layers(self, graph: gs.Graph, declined: list[Declined]) -> list[_Layer]:
        def decline(node: gs.Node, why: str) -> None:
            declined.append(Declined(self.name, node.name, node.op, why))

        by_weight: dict[str, _Layer] = {}
        excluded: set[str] = set()
        for node in graph.nodes:
            if node.op == "ConvTranspose":
                decline(node, "ConvTranspose weight reconstruction is not supported")
            if node.op not in OPS or len(node.inputs) < 2:
                continue
            w = const_value(node.inputs[1])
            if const_value(node.inputs[0]) is not None:
                decline(node, "first input is constant")
            elif w is None:
                decline(node, "weight is not constant")
            elif w.dtype.kind != "f":
                decline(node, "weight is not float")
            elif self.overrides.resolve(node.name).get("reconstruct", True) is False:
                decline(node, "excluded by override")
                excluded.add(node.inputs[1].name)
            elif isinstance(lay := _layout(node, w), str):
                decline(node, lay)
            else:
                rows, axis = lay
                name = node.inputs[1].name
                layer = by_weight.setdefault(name, _Layer(name, w, axis, np.ascontiguousarray(rows, np.float32), []))
                if layer.axis != axis or layer.rows.shape != rows.shape:
                    layer.bad = "weight shared by nodes with different layouts"
                layer.nodes.append(node)
        out = []
        for name, layer in by_weight.items():
            if name in excluded:
                layer.bad = "weight shared with a node excluded by override"
            if layer.bad:
                for n in layer.nodes:
                    decline(n, layer.bad)
            else:
                out.append(layer)
        return out

    def _collect(self, graph: gs.Graph, ctx: PassContext, layers: list[_Layer]) -> None:
        """Accumulate h = Σ x·xᵀ for every layer from ORT runs of the float graph, within a memory budget."""
        graph_inputs = {t.name for t in graph.inputs}
        samples = ctx.samples[: self.config.max_samples]
        chunks, cur, size = [], [], 0
        for layer in layers:
            G, _, K = layer.rows.shape
            nbytes = G * K * K * 8 + G * K * max(K, FLUSH_COLUMNS) * 4  # h and the pending columns
            if cur and size + nbytes > H_BUDGET_BYTES:
                chunks.append(cur)
                cur, size = [], 0
            cur.append(layer)
            size += nbytes
        if cur:
            chunks.append(cur)
        for chunk in chunks:
            names = sorted({n.inputs[0].name for layer in chunk for n in layer.nodes} - graph_inputs)
            stream = activations(graph, ctx.model, samples, names) if names else ({} for _ in samples)
            for feeds, values in zip(samples, stream):
                vals = {**feeds, **values}
                for layer in chunk:
                    for node in layer.nodes:
                        self._accumulate(layer, node, vals[node.inputs[0].name])
            for layer in chunk:
                layer.flush()

    @staticmethod
    def _accumulate(layer: _Layer, node: gs.Node, x: np.ndarray) -> None:
        if layer.bad:
            return
        x = np.asarray(x, np.float32)
        if not np.all(np.isfinite(x)):
            layer.bad = f"input {node.inputs[0].name} has non-finite values"
            return
        G, _, K = layer.rows.shape
        if node.op == "Conv":
            cols = _conv_columns(node, x, tuple(layer.w.shape[2:]), G)
        else:
            cols = x.reshape(-1, x.shape[-1] if x.ndim else 1).T[None]
        if cols.shape[1] != K:
            layer.bad = f"input features {cols.shape[1]} do not match the weight's {K}"
            return
        layer.pending.append(cols)
        if sum(c.shape[2] for c in layer.pending) >= max(K, FLUSH_COLUMNS):
            layer.flush()

    def _grid(self, layer: _Layer) -> tuple[np.ndarray, np.ndarray, QParams]:
        """(scale, zero point: [G, N] per row or [G, N, K] per weight (per-block, expanded); the hint's QParams)."""
        cfg = self.config
        block = cfg.weight_block
        if block:  # MatMul / Gemm: rows = w.T (axis 1, blocks along w's axis 0) or w (transB, blocks along axis 1)
            baxis = 0 if layer.axis == 1 else 1
            qp = block_qparams(layer.w, baxis, block, self.dtype, cfg.symmetric, cfg.bits)

            def rows(v: np.ndarray) -> np.ndarray:
                full = expand_blocks(np.asarray(v, np.float32), baxis, block, layer.w.shape[baxis])
                return (full.T if layer.axis == 1 else full)[None].astype(np.float32)

            return rows(qp.scale), rows(qp.zero_point), qp
        qp = weight_qparams(layer.w, layer.axis, self.dtype, cfg.symmetric, cfg.bits)
        shape = layer.rows.shape[:2]
        return (np.asarray(qp.scale, np.float32).reshape(shape),
                np.asarray(qp.zero_point, np.float32).reshape(shape), qp)

    def call(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        cfg = self.config
        declined: list[Declined] = []
        for g in list(iter_graphs(graph))[1:]:
            n = sum(node.op in OPS for node in g.nodes)
            if n:
                declined.append(Declined(self.name, g.name, "subgraph", f"weight reconstruction inside If/Loop/Scan "
                                         f"bodies is not supported: {n} compute nodes keep round-to-nearest"))
        stats: dict = {"bits": cfg.bits, "reconstructed": 0, "samples": 0, "layers": []}
        if not ctx.samples:
            declined.append(Declined(self.name, "", "", "no calibration samples: reconstruction needs activations"))
            return PassResult(graph, False, stats, declined)
        layers = []
        for layer in self._layers(graph, declined):
            if layer.weight in ctx.weight_hints:  # an earlier pass decided these integers: not ours to redo
                declined.extend(Declined(self.name, n.name, n.op, "weight already hinted by an earlier pass")
                                for n in layer.nodes)
            elif cfg.weight_block and layer.nodes[0].op == "Conv":
                declined.extend(Declined(self.name, n.name, n.op, "per-block scales (weight_block) are for MatMul / "
                                         "Gemm weights") for n in layer.nodes)
            else:
                layers.append(layer)
        self._collect(graph, ctx, layers)
        stats["samples"] = min(len(ctx.samples), cfg.max_samples)
        qmin, qmax = ((-(2 ** (cfg.bits - 1) - 1), 2 ** (cfg.bits - 1) - 1) if cfg.symmetric
                      else self.dtype.qrange(cfg.bits))
        for layer in layers:
            node = layer.nodes[0]
            if layer.bad or layer.h is None:
                declined.append(Declined(self.name, node.name, node.op, layer.bad or "no activations collected"))
                continue
            h = 2.0 * layer.h / max(layer.count, 1)
            scale, zero, qp = self._grid(layer)
            full, zfull = (scale, zero) if scale.ndim == 3 else (scale[..., None], zero[..., None])
            rtn = np.clip(np.rint(layer.rows / full) + zfull, qmin, qmax)
            try:
                q = gptq(layer.rows, h, scale, qmax, cfg.block_size, cfg.damp, cfg.act_order, zero, qmin)
            except np.linalg.LinAlgError as exc:
                declined.append(Declined(self.name, node.name, node.op, str(exc)))
                continue
            before, after = rel_errors(layer.rows, [(rtn - zfull) * full, (q - zfull) * full], h)
            entry = {"node": node.name, "op": node.op, "weight": layer.weight, "groups": int(layer.rows.shape[0]),
                     "rtn_rel_mse": before, "reconstructed_rel_mse": after}
            stats["layers"].append(entry)
            if not after < before:
                declined.append(Declined(self.name, node.name, node.op, f"reconstruction did not beat "
                                         f"round-to-nearest ({after:.3g} vs {before:.3g}): left to insert_qdq"))
                continue
            ctx.weight_hints[layer.weight] = (_from_rows(q, layer).astype(self.dtype.numpy), qp)
            stats["reconstructed"] += 1
        done = [e for e in stats["layers"] if e["reconstructed_rel_mse"] < e["rtn_rel_mse"]]
        if done:
            stats["mean_error_ratio"] = float(np.mean([e["reconstructed_rel_mse"] / max(e["rtn_rel_mse"], 1e-30)
                                                       for e in done]))
        logger.info("reconstructed %d of %d layers", stats["reconstructed"], len(layers))
        return PassResult(graph, False, stats, declined)
