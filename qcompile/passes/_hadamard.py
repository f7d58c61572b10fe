"""Hadamard matrices of any order ``m·2^k`` whose small factor ``m`` has a classical construction, and their
randomized, normalized Kronecker form for rotations (QuaRot's "power of two times a known small Hadamard").

``H_n`` (entries ±1, ``H·Hᵀ = n·I``) exists for ``n`` = 1, 2 and multiples of 4 (conjectured for all). Built here:
Sylvester's doubling (``H_2 ⊗ H``), Paley I (``q + 1`` for a prime ``q ≡ 3 mod 4``: 4, 8, 12, 20, 24, 32, 44, 48, 60,
…) and Paley II (``2(q + 1)`` for a prime ``q ≡ 1 mod 4``: 12, 28, 36, 60, 76, …). A width ``n`` is split as
``n = a·b`` with ``b`` a power of two and ``a`` the smallest order with a construction (``a = 1`` for a power of
two): smollm2's 576 = 36·16 and 1536 = 12·128, BERT's 384 = 12·32 and 1536 = 12·128, LLaMA-2's 11008 = 172·64 has
none below 5504 (the orders 43·2^j need constructions these do not give): a random orthogonal matrix of the odd
part stands in for the small factor there (:func:`online_factors`).

Applied at run time, ``x·(A ⊗ B)`` for ``x`` reshaped to ``[…, a, b]`` is ``Aᵀ·X·B``: ``n·(a + b)`` multiply-adds
per token instead of ``n²``, and the constants are ``a² + b²`` numbers instead of ``n²``.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = χ(j − i)`` with χ the quadratic character mod the prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if x in squares else -1 for x in range(1, q)])
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley1(q: int) -> np.ndarray:
    """Order ``q + 1``, ``q ≡ 3 (mod 4)`` prime: ``I + S`` with the skew conference matrix ``S``."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order ``2(q + 1)``, ``q ≡ 1 (mod 4)`` prime: the symmetric conference matrix ``C`` doubled."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1],
                                                                                                          [1, -1]]))


@lru_cache(maxsize=None)
def _known(m: int) -> np.ndarray | None:
    if m == 1:
        return np.ones((1, 1), dtype=np.int64)
    if m == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if m % 4:
        return None
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        h = _paley1(m - 1)
    elif _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        h = _paley2(m // 2 - 1)
    else:
        half = _known(m // 2)
        if half is None:
            return None
        h = np.kron(_known(2), half)
    hf = h.astype(np.float64)  # exact: sums of at most m products of ±1; float for BLAS
    assert np.array_equal(hf @ hf.T, m * np.eye(m)), m  # a construction bug, never input-dependent
    return h


def hadamard(m: int) -> np.ndarray | None:
    """``H_m`` (int64 ±1, ``H·Hᵀ = m·I``) if one of the constructions above gives order ``m``, else None."""
    h = _known(int(m)) if m >= 1 else None
    return None if h is None else h.copy()


MAX_SMALL = 1024  # largest non-power-of-two factor searched for (its construction and check are O(m³))


def hadamard_split(n: int) -> tuple[int, int] | None:
    """``(a, b)``: ``n = a·b``, ``b`` a power of two, ``a`` the smallest order up to :data:`MAX_SMALL` with a known
    Hadamard matrix (1 for a power of two); None if there is none."""
    if n < 1:
        return None
    b = n & -n  # the largest power of two dividing n
    a = n // b
    while a <= MAX_SMALL:
        if _known(a) is not None:
            return a, b
        if b == 1:
            return None
        a, b = a * 2, b // 2
    return None


def kron_split(n: int) -> tuple[int, int] | None:
    """``(a, b)`` with ``a·b = n``, both > 1 and a Hadamard of each order, balanced for a power of two (``n·(a + b)``
    work at run time), or None where ``n`` has no such split."""
    split = hadamard_split(n)
    if split is None or split[1] == 1 or n < 4:
        return None
    a, b = split
    if a == 1:
        k = n.bit_length() - 1
        a, b = 1 << (k // 2), 1 << (k - k // 2)
    return a, b


def random_orthogonal(d: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian, signs fixed by R's diagonal), float64."""
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))[None, :]


def randomized_hadamard(d: int, rng: np.random.Generator) -> np.ndarray | None:
    """``diag(±1)·H_d/√d`` (float64) for any ``d`` with :func:`hadamard_split`, else None."""
    split = hadamard_split(d)
    if split is None:
        return None
    a, b = split
    h = np.kron(_known(a), _sylvester(b)).astype(np.float64)
    return rng.choice([-1.0, 1.0], size=d)[:, None] * h / np.sqrt(d)


def randomized_kron_factors(d: int, rng: np.random.Generator) -> list[np.ndarray] | None:
    """``[A, B]``, each ``diag(±1)·H/√order`` (float64, orthogonal), with ``A ⊗ B`` a randomized Hadamard of order
    ``d`` (:func:`kron_split`); None where ``d`` has none. The signs are ``s_A ⊗ s_B``, not independent per channel."""
    split = kron_split(d)
    if split is None:
        return None
    out = []
    for m in split:
        h = _known(m) if m & (m - 1) else _sylvester(m)
        out.append(rng.choice([-1.0, 1.0], size=m)[:, None] * h.astype(np.float64) / np.sqrt(m))
    return out


def online_factors(d: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
    """Orthogonal factors whose Kronecker product rotates a width ``d`` at run time, and what they are: a randomized
    Hadamard as two factors (:func:`randomized_kron_factors`); where ``d``'s non-power-of-two part has no known
    Hadamard, a random orthogonal matrix of that part times a randomized Hadamard of the power of two (LLaMA-2's
    11008 = 43·256); one dense matrix where ``d`` does not split (a known order such as 12, or an odd ``d``)."""
    factors = randomized_kron_factors(d, rng)
    if factors is not None:
        return factors, "hadamard"
    h = randomized_hadamard(d, rng)
    if h is not None:  # a known order that does not split (12, 20, …)
        return [h], "hadamard"
    b = d & -d
    if b >= 2 and d // b > 1:
        return [random_orthogonal(d // b, rng), randomized_hadamard(b, rng)], "random x hadamard"
    return [random_orthogonal(d, rng)], "random"


def _sylvester(b: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < b:
        h = np.block([[h, h], [h, -h]])
    return h


def kron_all(factors: list[np.ndarray]) -> np.ndarray:
    out = factors[0]
    for f in factors[1:]:
        out = np.kron(out, f)
    return out


__all__ = ["MAX_SMALL", "hadamard", "hadamard_split", "kron_all", "kron_split", "online_factors", "random_orthogonal",
           "randomized_hadamard", "randomized_kron_factors"]
