"""Streaming range observers: one per calibrated tensor, fed batch after batch, memory bounded.

Every observer ignores (and counts) non-finite values and *sentinels*: finite magnitudes >= 1e30, which
real exports use as masks (an attention mask adds float32-min to the scores). Neither ever reaches a range.
If nothing usable was seen, `compute_range()` is `(0.0, 0.0)` and `stats["empty"]` is True.

Algorithms (L = 2**num_bits levels; `symmetric=True` always yields `lo == -hi`):

- ``minmax``: running min / max; with ``averaging_constant=c`` a moving average across updates like
  ONNX Runtime's, ``m <- m + c * (batch_m - m)``.
- ``percentile`` (``percentile=p`` in (50, 100]): lo / hi at the (100-p)-th / p-th percentile of the
  histogram (linear inside a bin, so within one bin width of the exact value); symmetric: p-th percentile of |x|.
- ``entropy``: TensorRT's KL search. For each candidate threshold i*w (i >= Q bins) the clipped reference
  P (outliers folded into the last bin) is quantized to Q bins of i/Q fine bins each (boundary bins split
  pro rata, not TensorRT's i // Q with the rest dumped in the last bin, whose result jumps with the bin
  grid) and expanded back evenly to Q_i; the i minimizing KL(P || Q_i) wins. Data of both signs (or
  ``symmetric``) are searched on |x| with Q = 2**(bits-1); one-signed data (post-ReLU, Softmax) on
  [0, t] (or [-t, 0]) with Q = 2**bits.
- ``mse``: expected error of a clip range from the histogram: rounding s**2/12 per in-range value
  (s = step) plus the squared distance to the clip bound for clipped values (bin centers, + w**2/12).
  Symmetric: every bin edge t on |x| (s = t/(2**(bits-1)-1)). Asymmetric: a <= 257 x 257 grid of
  (lo, hi) bin edges with lo <= 0 <= hi, then a full-resolution refinement around the best cell.

Histogram scheme (percentile, entropy, mse): ``bins`` (even, fixed) counts over [-R, R]. The first
non-zero batch sets R = max|x|. When a later batch exceeds R, R doubles (as often as needed) and each
doubling merges bins exactly: pad the counts with bins/2 empty bins on each side and sum neighbouring
pairs. Old edges are new edges, so nothing is re-binned and no data is stored (bins are half-open
[e, e + w) except the last, closed one, so a value equal to an old R sits one bin low after growth).
Zero is always a bin edge, so |x| folds exactly (counts[half + j] + counts[half - 1 - j]) and
non-negative values always land in the upper half. Per update: min, max, one multiply-add, bincount.
Histogram-based ranges are clamped to the observed [min, max] and then widened to contain 0.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np

from qcompile.errors import ConfigError

logger = logging.getLogger(__name__)

SENTINEL_MAGNITUDE = 1e30


def _clean(x: np.ndarray) -> tuple[np.ndarray, float, float, int, int]:
    """Flatten `x` to float32/64, drop non-finite and sentinel values: (values, min, max, n_nonfinite, n_sentinel)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiub":
        raise TypeError(f"observers take real numeric arrays, got dtype {a.dtype}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    a = a.reshape(-1)
    if a.size == 0:
        return a, 0.0, 0.0, 0, 0
    mn, mx = float(a.min()), float(a.max())
    if mn > -SENTINEL_MAGNITUDE and mx < SENTINEL_MAGNITUDE:  # NaN fails both comparisons
        return a, mn, mx, 0, 0
    n_nonfinite = a.size - int(np.count_nonzero(np.isfinite(a)))
    with np.errstate(invalid="ignore"):
        kept = a[np.abs(a) < SENTINEL_MAGNITUDE]
    n_sentinel = a.size - n_nonfinite - kept.size
    if kept.size == 0:
        return kept, 0.0, 0.0, n_nonfinite, n_sentinel
    return kept, float(kept.min()), float(kept.max()), n_nonfinite, n_sentinel


def _check(ok: bool, observer: str, param: str, value: Any, want: str) -> None:
    if not ok:
        raise ConfigError(f"observer {observer!r}: {param}={value!r} is invalid; expected {want}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


class Observer(ABC):
    """Streaming range observer. Subclasses declare extra parameters (with defaults) in `defaults`."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, num_bits: int = 8, symmetric: bool = False, **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            valid = ", ".join(["num_bits", "symmetric", *self.defaults])
            raise ConfigError(f"observer {self.name!r}: unknown parameter(s) {', '.join(unknown)}; valid: {valid}")
        _check(_is_int(num_bits) and 2 <= num_bits <= 16, self.name, "num_bits", num_bits, "an int in [2, 16]")
        _check(isinstance(symmetric, (bool, np.bool_)), self.name, "symmetric", symmetric, "a bool")
        self.num_bits, self.symmetric = int(num_bits), bool(symmetric)
        params = {k: v.item() if isinstance(v, np.generic) else v for k, v in params.items()}  # json-friendly
        self.params: dict[str, Any] = {**self.defaults, **params}
        self._configure()
        self.count = self.n_nonfinite = self.n_sentinel = 0
        self.min: float | None = None
        self.max: float | None = None
        self._range: tuple[float, float] | None = None

    def _configure(self) -> None:
        """Check `self.params` (ConfigError on a bad value) and set up the accumulation state."""

    def update(self, x: np.ndarray) -> None:
        """Observe one tensor (any shape, float16/32/64)."""
        values, mn, mx, n_nonfinite, n_sentinel = _clean(x)
        self.n_nonfinite += n_nonfinite
        self.n_sentinel += n_sentinel
        if values.size:
            self.count += values.size
            self.min = mn if self.min is None else min(self.min, mn)
            self.max = mx if self.max is None else max(self.max, mx)
            self._observe(values, mn, mx)
            self._range = None

    @abstractmethod
    def _observe(self, values: np.ndarray, mn: float, mx: float) -> None:
        """Accumulate finite, non-sentinel, non-empty `values` (1-D float32/64)."""

    @abstractmethod
    def _compute(self) -> tuple[float, float]:
        """The range from what was observed (only called when count > 0)."""

    def compute_range(self) -> tuple[float, float]:
        """(lo, hi) as python floats, lo <= hi; lo == -hi when symmetric; (0.0, 0.0) if nothing usable was seen."""
        if self._range is None:
            if self.count == 0:
                logger.warning("%s observer saw no finite values (%d non-finite, %d sentinel): range (0, 0)",
                               self.name, self.n_nonfinite, self.n_sentinel)
                lo, hi = 0.0, 0.0
            else:
                lo, hi = (float(v) for v in self._compute())
                lo, hi = min(lo, hi), max(lo, hi)
            if self.symmetric:
                t = max(abs(lo), abs(hi))
                lo, hi = -t, t
            self._range = (lo + 0.0, hi + 0.0)  # + 0.0 turns -0.0 into 0.0
        return self._range

    @property
    def stats(self) -> dict[str, Any]:
        lo, hi = self.compute_range()
        return {"observer": self.name, "num_bits": self.num_bits, "symmetric": self.symmetric,
                "params": dict(self.params), "count": self.count, "n_nonfinite": self.n_nonfinite,
                "n_sentinel": self.n_sentinel, "empty": self.count == 0, "min": self.min, "max": self.max,
                "range": [lo, hi]}


class MinMaxObserver(Observer):
    name = "minmax"
    defaults = {"averaging_constant": None}

    def _configure(self) -> None:
        c = self.params["averaging_constant"]
        _check(c is None or (_is_real(c) and 0.0 < c <= 1.0), self.name, "averaging_constant", c,
               "None or a float in (0, 1]")
        self._lo: float | None = None
        self._hi: float | None = None

    def _observe(self, values: np.ndarray, mn: float, mx: float) -> None:
        c = self.params["averaging_constant"]
        if self._lo is None or self._hi is None:
            self._lo, self._hi = mn, mx
        elif c is None:
            self._lo, self._hi = min(self._lo, mn), max(self._hi, mx)
        else:
            self._lo, self._hi = self._lo + c * (mn - self._lo), self._hi + c * (mx - self._hi)

    def _compute(self) -> tuple[float, float]:
        assert self._lo is not None and self._hi is not None
        return self._lo, self._hi


class _HistogramObserver(Observer):
    """Keeps a fixed-size histogram over [-R, R]; R doubles when needed (see the module docstring)."""

    defaults = {"bins": 2048}

    def _configure(self) -> None:
        b = self.params["bins"]
        _check(_is_int(b) and b % 2 == 0 and 16 <= b <= 1 << 22, self.name, "bins", b,
               "an even int in [16, 4194304]")
        self.bins = int(b)
        self.R = 0.0
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.n_zero = 0  # exact zeros (all in bin [0, w)): exactly representable whatever the range

    @property
    def bin_width(self) -> float:
        return 2.0 * self.R / self.bins

    @property
    def histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, edges) copies: `bins` counts over `bins + 1` edges spanning [-R, R]."""
        return self.counts.copy(), np.linspace(-self.R, self.R, self.bins + 1)

    def _grow(self, maxabs: float) -> None:
        k, r = 0, self.R
        while r < maxabs:
            r, k = r * 2.0, k + 1
        half = self.bins // 2
        for _ in range(min(k, self.bins.bit_length())):  # past that, all counts sit in the two centre bins
            padded = np.zeros(2 * self.bins, dtype=np.int64)
            padded[half:half + self.bins] = self.counts
            self.counts = padded.reshape(self.bins, 2).sum(axis=1)
        logger.debug("%s histogram range grows %g -> %g", self.name, self.R, r)
        self.R = r

    def _observe(self, values: np.ndarray, mn: float, mx: float) -> None:
        half = self.bins // 2
        maxabs = max(-mn, mx)
        if maxabs == 0.0:  # all zeros: bin [0, w) whatever R is or becomes
            self.counts[half] += values.size
            self.n_zero += values.size
            return
        self.n_zero += values.size - int(np.count_nonzero(values))
        if self.R == 0.0:
            self.R = maxabs
        elif maxabs > self.R:
            self._grow(maxabs)
        scale = half / self.R
        ftype = np.float32 if values.dtype == np.float32 and scale < 1e37 else np.float64
        t = values.astype(ftype, copy=False) * ftype(scale)
        t += ftype(half)  # in [0, bins] up to rounding; truncation below == floor
        idx = t.astype(np.intp)
        np.minimum(idx, self.bins - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.bins)

    def _halves(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts of x >= 0 and of -x > 0, each over [0, R] in bins/2 bins of width w."""
        half = self.bins // 2
        return self.counts[half:], self.counts[:half][::-1]

    def _compute(self) -> tuple[float, float]:
        if self.R == 0.0:
            return 0.0, 0.0
        lo, hi = self._search()
        assert self.min is not None and self.max is not None
        return min(max(lo, self.min), 0.0), max(min(hi, self.max), 0.0)

    @abstractmethod
    def _search(self) -> tuple[float, float]:
        """The range from the histogram (before clamping to the observed values)."""

    @property
    def stats(self) -> dict[str, Any]:
        return {**super().stats, "bins": self.bins, "hist_range": [-self.R, self.R], "bin_width": self.bin_width}


def _quantile(counts: np.ndarray, left: float, w: float, q: float) -> float:
    """The q-quantile of a histogram with first edge `left` and bin width `w`, linear inside the bin."""
    cum = np.cumsum(counts)
    target = q * float(cum[-1])
    if target >= cum[-1]:
        return left + (int(np.flatnonzero(counts)[-1]) + 1) * w
    i = int(np.searchsorted(cum, target, side="right"))  # first bin with cum > target, so counts[i] > 0
    prev = float(cum[i - 1]) if i else 0.0
    return left + (i + (target - prev) / float(counts[i])) * w


class PercentileObserver(_HistogramObserver):
    name = "percentile"
    defaults = {"bins": 2048, "percentile": 99.999}

    def _configure(self) -> None:
        super()._configure()
        p = self.params["percentile"]
        _check(_is_real(p) and 50.0 < p <= 100.0, self.name, "percentile", p, "a number in (50, 100]")

    def _search(self) -> tuple[float, float]:
        q, w = float(self.params["percentile"]) / 100.0, self.bin_width
        if self.symmetric:
            pos, neg = self._halves()
            t = _quantile(pos + neg, 0.0, w, q)
            return -t, t
        return _quantile(self.counts, -self.R, w, 1.0 - q), _quantile(self.counts, -self.R, w, q)


def _kl_search(hist: np.ndarray, nq: int) -> int:
    """TensorRT's search: the bin count i >= nq (threshold i*w) minimizing KL(P_i || Q_i).

    P_i is the histogram clipped at i bins (outliers folded into the last bin). Q_i quantizes the slice
    hist[:i] *without* the outliers (as TensorRT does, so that clipping shows up in the KL); it assigns fine bin k to
    quantized bin floor(k*nq/i) (the i fine bins shared out as evenly as possible, instead of TensorRT's
    remainder-in-the-last-bin, so the curve does not jump where i // nq changes), sums each quantized bin and
    spreads its mass back over that bin's *non-empty* fine bins only, as TensorRT does: spreading it over empty
    bins too would penalize every wide threshold on spiky data (ReLU outputs' exact zeros) and collapse ranges.
    """
    h = hist.astype(np.float64)
    n = int(np.flatnonzero(h)[-1]) + 1
    if n <= nq:
        return n
    best_i, best_kl = n, np.inf
    for i in range(nq, n + 1, max(1, (n - nq) // 1024)):
        p = h[:i].copy()
        p[-1] += h[i:n].sum()
        nz = p > 0
        idx = (np.arange(i) * nq) // i
        mass = np.bincount(idx, weights=h[:i], minlength=nq)  # Q from the unclipped slice: clipping costs KL
        count = np.bincount(idx, weights=nz.astype(np.float64), minlength=nq)
        q = np.where(nz, mass[idx] / np.maximum(count[idx], 1.0), 0.0)[nz]
        pp = p[nz] / p[nz].sum()
        qq = q / max(q.sum(), 1e-300)
        zero = qq <= 0.0
        if zero.any():  # MXNet/TensorRT smoothing: a bin P has and Q lacks costs a lot, not infinity
            n_zero = int(zero.sum())
            if n_zero == qq.size:
                continue
            qq = np.where(zero, 1e-4, qq - 1e-4 * n_zero / (qq.size - n_zero))
            if np.any(qq <= 0.0):
                continue
        kl = float(np.sum(pp * np.log(pp / qq)))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return best_i


class EntropyObserver(_HistogramObserver):
    name = "entropy"
    defaults = {"bins": 2048, "num_quantized_bins": None}

    def _configure(self) -> None:
        super()._configure()
        nq = self.params["num_quantized_bins"]
        _check(nq is None or (_is_int(nq) and nq >= 2), self.name, "num_quantized_bins", nq, "None or an int >= 2")

    def _search(self) -> tuple[float, float]:
        assert self.min is not None and self.max is not None
        nq = self.params["num_quantized_bins"]
        pos, neg = self._halves()
        # Exact zeros (ReLU outputs, padding) quantize without error at any threshold: a spike of them must not
        # drive the search (it would make every quantized bin around 0 look lossy and collapse the range).
        pos = pos.copy()
        pos[0] -= min(self.n_zero, int(pos[0]))
        if not pos.any() and not neg.any():
            return 0.0, 0.0
        if self.symmetric or (self.min < 0.0 < self.max):
            t = _kl_search(pos + neg, nq or 2 ** (self.num_bits - 1)) * self.bin_width
            return -t, t
        if self.max > 0.0:
            return 0.0, _kl_search(pos, nq or 2 ** self.num_bits) * self.bin_width
        return -_kl_search(neg, nq or 2 ** self.num_bits) * self.bin_width, 0.0


def _prefix_moments(counts: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Prefix sums (length n + 1) of n, n*c, n*c**2."""
    h = counts.astype(np.float64)
    z = np.zeros(1)
    return (np.concatenate([z, np.cumsum(h)]), np.concatenate([z, np.cumsum(h * centers)]),
            np.concatenate([z, np.cumsum(h * centers * centers)]))


class MSEObserver(_HistogramObserver):
    name = "mse"
    defaults = {"bins": 2048}

    def _search(self) -> tuple[float, float]:
        w = self.bin_width
        if self.symmetric:
            pos, neg = self._halves()
            folded = pos + neg
            n = int(np.flatnonzero(folded)[-1]) + 1
            p0, p1, p2 = _prefix_moments(folded[:n], (np.arange(n) + 0.5) * w)
            k = np.arange(1, n + 1)
            t = k * w
            s = t / (2 ** (self.num_bits - 1) - 1)
            t0, t1, t2 = p0[n] - p0[k], p1[n] - p1[k], p2[n] - p2[k]
            err = s * s / 12.0 * p0[k] + (t2 - 2.0 * t * t1 + t * t * t0) + w * w / 12.0 * t0
            t_best = float(t[int(np.argmin(err))])
            return -t_best, t_best
        N, half, steps = self.bins, self.bins // 2, 2 ** self.num_bits - 1
        nz = np.flatnonzero(self.counts)
        first, last = min(int(nz[0]), half), max(int(nz[-1]) + 1, half)
        p0, p1, p2 = _prefix_moments(self.counts, -self.R + (np.arange(N) + 0.5) * w)

        def err(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # a: lo edge indices [:, None], b: hi edge indices
            lo, hi = -self.R + a * w, -self.R + b * w
            s = (hi - lo) / steps
            r0, r1, r2 = p0[N] - p0[b], p1[N] - p1[b], p2[N] - p2[b]
            left = lo * lo * p0[a] - 2.0 * lo * p1[a] + p2[a] + w * w / 12.0 * p0[a]
            right = r2 - 2.0 * hi * r1 + hi * hi * r0 + w * w / 12.0 * r0
            return s * s / 12.0 * (p0[b] - p0[a]) + left + right

        A = np.unique(np.linspace(first, half, 257).round().astype(np.intp))
        B = np.unique(np.linspace(half, last, 257).round().astype(np.intp))
        ia, ib = np.unravel_index(int(np.argmin(err(A[:, None], B[None, :]))), (A.size, B.size))
        A2 = np.arange(A[max(ia - 1, 0)], A[min(ia + 1, A.size - 1)] + 1)  # refine at full resolution
        B2 = np.arange(B[max(ib - 1, 0)], B[min(ib + 1, B.size - 1)] + 1)
        ja, jb = np.unravel_index(int(np.argmin(err(A2[:, None], B2[None, :]))), (A2.size, B2.size))
        return -self.R + float(A2[ja]) * w, -self.R + float(B2[jb]) * w


OBSERVERS: dict[str, type[Observer]] = {
    cls.name: cls for cls in (MinMaxObserver, PercentileObserver, EntropyObserver, MSEObserver)
}


def make_observer(name: str, **params: Any) -> Observer:
    """Build a registered observer by name; unknown name, parameter or bad value -> ConfigError."""
    cls = OBSERVERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown observer {name!r}; valid choices: {', '.join(sorted(OBSERVERS))}")
    return cls(**params)
