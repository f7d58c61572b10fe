"""Learned rotations (SpinQuant, Liu et al., 2024): an orthogonal ``R`` optimized on calibration activations so that
the per-token quantized, rotated activations reproduce each linear layer's output best.

A site is one activation ``X`` [T, d] (calibration rows) with the weights that read it, summarized by
``G = Σ_W W·Wᵀ / ‖X·W‖²`` (each reader's output energy normalized to 1, so a wide head does not outweigh a
projection). Rotating ``X`` by ``R`` and folding ``Rᵀ`` into the readers leaves ``X·W`` unchanged; quantizing the
rotated input changes it by ``E·Rᵀ·W`` with ``E = Q(X·R) − X·R``, so the loss is

    L(R) = Σ_sites  tr(E·Rᵀ·G·R·Eᵀ) / T          (the relative output error energy of every reader)

``Q`` is the recipe's per-token symmetric quantizer (``bits``, scale from ``clip`` · each row's largest magnitude,
round half to even, saturated), with the straight-through estimator for the rounding. Weights are left unquantized
in the loss, as SpinQuant does when GPTQ picks the weight integers afterwards. ``R = R₀·cay(A − Aᵀ)`` stays
orthogonal for any ``A`` (the Cayley transform of a skew-symmetric matrix), initialized at ``R₀`` (the randomized
Hadamard or random rotation the pass would use otherwise) with ``A = 0`` and optimized by Adam on random row batches;
the best ``R`` seen on all rows (never worse than ``R₀``) is returned in float64, re-orthogonalized by its polar
factor. A rotation applied at run time as a Kronecker product ``A ⊗ B`` (``passes/_hadamard.py``) is learned factor
by factor, so it keeps that structure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from qcompile.errors import ConfigError

logger = logging.getLogger(__name__)


def require_torch():
    """torch, or a ConfigError saying how to install it."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is in the learn/zoo extras the tests install
        raise ConfigError("learned rotations need torch: pip install 'qcompile[learn]'") from e
    return torch


@dataclass
class Site:
    x: np.ndarray  # [T, d] calibration rows of the activation
    weights: list[np.ndarray]  # the readers' weights [d, N] (γ folded), as they read the unrotated X

    def gram(self) -> np.ndarray:
        x = self.x.astype(np.float64)
        h = x.T @ x / len(x)
        g = np.zeros_like(h)
        for w in self.weights:
            ww = w.astype(np.float64) @ w.T.astype(np.float64)
            g += ww / max(float(np.sum(h * ww)), 1e-30)  # ‖X·W‖²/T = tr(Wᵀ·H·W) = Σ H ∘ W·Wᵀ: no [T, N] product
        return g


def cayley(a, eye):
    """``(I − S)·(I + S)⁻¹`` with ``S = A − Aᵀ``: orthogonal for every ``A`` (``S`` is skew-symmetric, so ``I + S`` is
    invertible), the identity at ``A = 0``."""
    import torch

    s = a - a.T
    return torch.linalg.solve(eye + s, eye - s)  # (I + S)⁻¹(I − S): the two factors commute


def learn_rotation(sites: list[Site], r0: np.ndarray | list[np.ndarray], bits: int, clip: float, steps: int,
                   lr: float, batch: int, seed: int, scale_weight_bits: int | None = None, max_cols: int = 1024
                   ) -> tuple[np.ndarray | list[np.ndarray], dict]:
    """The learned ``R`` [d, d] (float64, orthogonal) and stats: the loss at ``R₀`` and at ``R`` on all rows.

    ``r0`` may be a list of orthogonal factors whose Kronecker product is ``R₀`` (a structured rotation applied at run
    time as reshaped MatMuls): each factor is then learned, ``R = ⊗ᵢ R₀ᵢ·cay(Aᵢ)`` stays a Kronecker product, and the
    learned factors are returned as a list.

    ``scale_weight_bits`` (OSTQuant's learnable scaling beside the rotation): every site also learns a positive
    per-channel scale ``s`` in the rotated basis, its activation quantized as ``Q(X·R/s)`` and each reader's weight as
    ``Q_w(diag(s)·Rᵀ·W)`` (per output channel, symmetric, that many bits, straight-through): a scale trades activation
    error for weight error, so both are in this loss, each reader's relative output error measured on at most
    ``max_cols`` of its output channels (a vocabulary-wide head is sampled). Stats ``scales`` list each site's ``s``.
    """
    torch = require_torch()
    factors = r0 if isinstance(r0, list) else [r0]
    qmax = float((1 << (bits - 1)) - 1)
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.from_numpy(np.ascontiguousarray(s.x, dtype=np.float32)) for s in sites]
    bases = [torch.from_numpy(f.astype(np.float32)) for f in factors]
    d = int(np.prod([len(f) for f in factors]))
    scaled = scale_weight_bits is not None
    if scaled:
        wmax = float((1 << (scale_weight_bits - 1)) - 1)
        rng = np.random.default_rng(seed)
        ws = [[torch.from_numpy(np.ascontiguousarray(
            w[:, np.sort(rng.choice(w.shape[1], max_cols, replace=False))] if w.shape[1] > max_cols else w,
            dtype=np.float32)) for w in s.weights] for s in sites]
        log_s = [torch.zeros(d, requires_grad=True) for _ in sites]
    else:
        gs_ = [torch.from_numpy(s.gram().astype(np.float32)) for s in sites]
        log_s = []

    def ste(y):
        return y + (torch.round(y) - y).detach()

    def quantize(x):
        s = torch.clamp(x.abs().amax(dim=-1, keepdim=True) * (clip / qmax), min=1e-12)
        return torch.clamp(ste(x / s), -qmax, qmax) * s

    def quantize_w(w):  # per output channel (column), symmetric
        s = torch.clamp(w.abs().amax(dim=0, keepdim=True) / wmax, min=1e-12)
        return torch.clamp(ste(w / s), -wmax, wmax) * s

    def loss(r, rows=None):
        total = 0.0
        for i, x in enumerate(xs):
            if rows is not None:
                x = x[torch.randint(0, len(x), (min(rows, len(x)),), generator=gen)]
            xr = x @ r
            if not scaled:
                z = (quantize(xr) - xr) @ r.T
                total = total + ((z @ gs_[i]) * z).sum() / len(x)
                continue
            sc = torch.exp(log_s[i])
            xq = quantize(xr / sc)
            for w in ws[i]:
                y = x @ w
                yq = xq @ quantize_w((r.T @ w) * sc[:, None])
                total = total + ((yq - y) ** 2).sum() / torch.clamp((y ** 2).sum(), min=1e-30)
        return total

    def kron(mats):
        out = mats[0]
        for m in mats[1:]:
            out = torch.kron(out, m)
        return out

    params = [torch.zeros(len(f), len(f), requires_grad=True) for f in factors]
    eyes = [torch.eye(len(f)) for f in factors]
    opt = torch.optim.Adam(params + log_s, lr=lr)

    def rotation():
        return kron([b @ cayley(a, e) for b, a, e in zip(bases, params, eyes)])

    def snapshot():
        return [a.detach().clone() for a in params + log_s]

    with torch.no_grad():
        start = float(loss(kron(bases)))
    best, best_p = start, snapshot()
    for step in range(steps):
        opt.zero_grad()
        loss(rotation(), batch).backward()
        opt.step()
        if (step + 1) % max(steps // 5, 1) == 0 or step + 1 == steps:
            with torch.no_grad():
                full = float(loss(rotation()))
            logger.info("learned rotation d=%d: step %d/%d, loss %.5g (start %.5g)", d, step + 1, steps, full, start)
            if full < best:
                best, best_p = full, snapshot()
    out = []
    for f, a in zip(factors, best_p):
        r = f @ cayley(a.double(), torch.eye(len(f), dtype=torch.float64)).numpy()
        u, _, vt = np.linalg.svd(r)  # the nearest orthogonal matrix: float32 steps leave ~1e-7 drift
        out.append(u @ vt)
    stats = {"loss_start": round(start, 6), "loss": round(best, 6)}
    if scaled:
        stats["scales"] = [np.exp(v.double().numpy()) for v in best_p[len(factors):]]
    return (out if isinstance(r0, list) else out[0]), stats


__all__ = ["Site", "learn_rotation", "require_torch"]
