"""Merges outside the task-vector family: linear (model soup), SLERP, Model Stock,
negation.

Leaf functions on float32 tensors; ``merge.py`` lifts them over pytrees.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from jax import lax

SLERP_DOT_THRESHOLD = 0.9995


def linear(models: Sequence, weights: Sequence[float], normalize: bool = True):
    """Weighted average ``sum_i w_i theta_i / sum_i w_i`` (model soup); no base needed."""
    out = sum(w * m for w, m in zip(weights, models))
    total = sum(weights)
    if normalize and abs(total) >= 1e-8:
        out = out / total
    return out


def slerp(t: float, v0, v1, eps: float = 1e-8):
    """Spherical interpolation between two tensors, per tensor (mergekit semantics).

    The angle comes from the normalised tensors; the result mixes the
    *unnormalised* ones.  When |cos| > 0.9995 it falls back to linear
    interpolation ``(1-t) v0 + t v1``.
    """
    u0 = v0 / jnp.maximum(jnp.linalg.norm(v0), eps)
    u1 = v1 / jnp.maximum(jnp.linalg.norm(v1), eps)
    s0, s1 = slerp_coefficients(t, jnp.sum(u0 * u1))
    return s0 * v0 + s1 * v1


def slerp_coefficients(t: float, dot):
    """``(s0, s1)`` of ``s0 v0 + s1 v1`` for the cosine ``dot`` of the two tensors."""
    colinear = jnp.abs(dot) > SLERP_DOT_THRESHOLD
    theta0 = jnp.arccos(jnp.clip(dot, -1.0, 1.0))
    sin0 = jnp.where(colinear, 1.0, jnp.sin(theta0))
    s0 = jnp.sin(theta0 * (1 - t)) / sin0
    s1 = jnp.sin(theta0 * t) / sin0
    return jnp.where(colinear, 1 - t, s0), jnp.where(colinear, t, s1)


def _gram(taus, axes):
    """``{(i, j): sum(tau_i * tau_j over axes, keepdims)}`` for ``i <= j``, in one pass.

    One variadic reduction computes every product sum, so no ``tau_i`` is ever
    materialised (separate sums make XLA:CPU keep all of them in float32).  The trailing
    axes are reduced first, then the leading one, which keeps float32
    accumulation accurate on large tensors.
    """
    pairs = [(i, j) for i in range(len(taus)) for j in range(i, len(taus))]
    prods = tuple(taus[i] * taus[j] for i, j in pairs)
    add = lambda xs, ys: tuple(x + y for x, y in zip(xs, ys))
    inner = tuple(a for a in axes if a != 0) or axes
    sums = lax.reduce(prods, tuple(jnp.zeros((), p.dtype) for p in prods), add, inner)
    if inner != axes:  # then the leading axis
        sums = tuple(jnp.sum(s, axis=0) for s in sums)
    keep = tuple(1 if d in axes else n for d, n in enumerate(taus[0].shape))
    return {pair: s.reshape(keep) for pair, s in zip(pairs, sums)}


def model_stock(base, models: Sequence, filter_wise: bool = False):
    """Model Stock (Jang et al. 2024): interpolate the fine-tuned average toward the base.

    ``t = N cos / (1 + (N-1) cos)``, cos the mean pairwise cosine of the task
    vectors (per tensor, or with ``filter_wise`` per row of the last axis, as
    mergekit's ``filter_wise`` reduces ``dim=-1``: per output row of an ``[out,
    in]`` matrix, per ``x[e, r, :]`` of a 3-D tensor, one for a 1-D one), and
    ``theta = t * mean(theta_i) + (1 - t) * theta_base``.
    """
    # Reduce over every axis (or the last, filter-wise) without reshaping, so
    # sharded leaves stay sharded.
    axes = (base.ndim - 1,) if filter_wise and base.ndim >= 2 else tuple(range(base.ndim))
    n = len(models)
    t = model_stock_ratio(_gram([m - base for m in models], axes), n)
    avg = sum(models) / n
    return t * avg + (1 - t) * base


def model_stock_ratio(gram, n: int):
    """Model Stock's ``t = N cos / (1 + (N-1) cos)`` from the Gram sums ``gram[i, j]``; 0
    (the base) where ``|1 + (N-1) cos| < 1e-6``."""
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            den = jnp.sqrt(gram[i, i] * gram[j, j])
            cosines.append(jnp.clip(gram[i, j] / jnp.maximum(den, 1e-6), -1.0, 1.0))
    cos = sum(cosines) / len(cosines)
    den = 1 + (n - 1) * cos
    # cos = -1/(N-1) (opposite updates) has no finite t: keep the base there, as mergekit does
    singular = jnp.abs(den) < 1e-6
    return jnp.where(singular, 0.0, n * cos / jnp.where(singular, 1.0, den))


def negate(base, models: Sequence, weights: Sequence[float], lam: float = 1.0):
    """Task negation (Ilharco et al. 2023): ``theta_base - lam * sum_i w_i (theta_i - theta_base)``."""
    return base - lam * sum(w * (m - base) for w, m in zip(weights, models))
