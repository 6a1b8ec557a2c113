"""The spectral kernel: the singular value decompositions every SVD-based method is built from
(TSV-M and Iso-C today; Iso-CTS, CART, MASS, SMILE, Core Space, KnOTS, OPCM … next).

Exactness comes first. Every function computes in float64 and returns float64: what a float64
thin SVD of its input gives — the reference re-statement the tests compare against — to ≤ 1e-5
relative for every direction it uses, however ill-conditioned the input:

- :func:`svd`: the float64 thin SVD (LAPACK ``gesdd`` through ``torch.linalg.svd``, on the tall
  orientation, which measured 2.7× faster than the wide one for 768×3072).
- :func:`top_singular_triplets` (``U_k, s_k, Vh_k``) and :func:`polar_factor` (``U Vh`` and
  ``s``) first take the float64 eigen-decomposition of the smaller Gram matrix (4–7× cheaper than
  the SVD on one core). That is used only when it is **certified**: every singular value the
  result depends on is at least σ_max / :data:`GRAM_CONDITION_LIMIT`. Gram eigenvalues carry an
  absolute error of ~ε₆₄·σ_max², so a singular vector built from them is off by ~ε₆₄·(σ_max/σ)²:
  measured on 768×768 and 768×3072 matrices with log-spaced spectra, the polar factor's relative
  error was 4e-8 at σ_max/σ_min = 1e5, 3e-6 at 1e6 and 3e-3 at 1e7. Past the limit the float64
  SVD is computed instead. (Before this kernel the Gram path was used everywhere and directions
  below 8.8e-6·σ_max were dropped: Iso-C and TSV-M were 4–42 % off on ill-conditioned layers.)

**Numerically zero directions.** Where the input is (numerically) rank-deficient, the SVD's
vectors for its zero singular values are arbitrary, and so is anything built from them. This
kernel returns a defined answer: singular values ``σ_i ≤ σ_max · max(m, n) · ε₆₄`` (the rank
tolerance of NumPy's ``matrix_rank``) count as zero; their singular vectors are returned as zero
vectors, so the polar factor is the partial isometry ``U_r Vh_r`` over the numerical rank r (it
maps the null space to 0), and truncated triplets past the rank are zero. An all-zero input gives
all-zero outputs.

Decompositions run on one torch thread each (LAPACK's threads measured 100× slower when a core is
busy elsewhere); spread independent ones over cores with
:func:`fusion_bench.tensor_ops.parallel_map`.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import Tensor

GRAM_CONDITION_LIMIT = 1e5  # σ_max/σ up to which the Gram path is certified (error ≲ 1e-7)
EPS64 = torch.finfo(torch.float64).eps


@contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Float64 thin SVD ``a = U diag(s) Vh`` (s descending) of the 2-D tensor ``a``."""
    a64 = a.to(torch.float64)
    with one_thread():
        if a64.shape[0] < a64.shape[1]:  # gesdd is much faster on the tall orientation
            v, s, uh = torch.linalg.svd(a64.T, full_matrices=False)
            return uh.T, s, v.T
        return torch.linalg.svd(a64, full_matrices=False)


def zero_tolerance(s: Tensor, shape: tuple[int, ...]) -> float:
    """Singular values at or below this count as zero (NumPy ``matrix_rank``'s tolerance)."""
    return float(s[0]) * max(shape) * EPS64 if s.numel() else 0.0


def _gram(a64: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(σ descending from the Gram eigenvalues, eigenvectors, wide): the eigenvectors are the left
    singular vectors when ``wide`` (m ≤ n), the right ones otherwise."""
    wide = a64.shape[0] <= a64.shape[1]
    gram = a64 @ a64.T if wide else a64.T @ a64
    with one_thread():
        values, vectors = torch.linalg.eigh(gram)
    return values.flip(0).clamp(min=0.0).sqrt(), vectors.flip(1), wide


def _certified(s: Tensor, used: int) -> bool:
    """The Gram path is exact enough for the ``used`` largest singular values."""
    return used == 0 or bool(s[used - 1] * GRAM_CONDITION_LIMIT >= s[0])


def top_singular_triplets(a: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest singular triplets of the 2-D tensor ``a``: ``U`` (m×k), ``s`` (k),
    ``Vh`` (k×n), float64, as the float64 thin SVD truncated to k. Triplets whose singular value
    is numerically zero (or past min(m, n)) are zero."""
    m, n = a.shape
    r = min(m, n)
    k_used = min(k, r)
    a64 = a.to(torch.float64)
    f64 = torch.float64
    u_out, s_out, vh_out = (
        torch.zeros(m, k, dtype=f64),
        torch.zeros(k, dtype=f64),
        torch.zeros(k, n, dtype=f64),
    )
    if k_used == 0:
        return u_out, s_out, vh_out
    s, vectors, wide = _gram(a64)
    if s[0] > 0 and _certified(s, k_used):
        s, vectors = s[:k_used], vectors[:, :k_used]
        if wide:
            u, vh = vectors, (vectors.T @ a64) / s[:, None]
        else:
            u, vh = (a64 @ vectors) / s, vectors.T
    else:
        u, s, vh = svd(a64)
        u, s, vh = u[:, :k_used], s[:k_used], vh[:k_used]
        keep = s > zero_tolerance(s, a.shape)
        u, s, vh = u * keep, s * keep, vh * keep[:, None]
    u_out[:, :k_used], s_out[:k_used], vh_out[:k_used] = u, s, vh
    return u_out, s_out, vh_out


def polar_factor(a: Tensor) -> tuple[Tensor, Tensor]:
    """The orthogonal polar factor ``U Vh`` of the 2-D tensor ``a = U diag(s) Vh`` and its
    singular values ``s`` (descending), float64. Directions of numerically zero singular values are
    left out (a partial isometry, see the module docstring). The polar factor of an
    ill-conditioned matrix amplifies errors in its input by ~σ_max/σ_min: give float64 input when
    it was computed (a sum, a stack of singular vectors) rather than read."""
    a64 = a.to(torch.float64)
    s, vectors, wide = _gram(a64)
    if s.numel() == 0 or s[0] == 0:
        return torch.zeros(a.shape, dtype=torch.float64), s
    if _certified(s, s.numel()):
        projector = (vectors / s) @ vectors.T
        factor = projector @ a64 if wide else a64 @ projector
        return factor, s
    u, s, vh = svd(a64)
    keep = s > zero_tolerance(s, a.shape)
    return u[:, keep] @ vh[keep], s
