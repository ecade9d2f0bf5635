"""Exact top-k selection by magnitude without sorting.

TIES, breadcrumbs and the analysis tools need "the k largest magnitudes of a
tensor" (or of a whole model).  Sorting each tensor costs O(n log n) and, in
XLA on the CPU, far more than the merge itself.  Instead we find the k-th
largest value ``v_k`` by a search over *counts*:

    c(t) = #{x > t}                      (one fused reduction over the tensor)

``c`` is non-increasing, and ``v_k`` is the smallest t with ``c(t) < k``.  The
search runs over the int32 bit patterns of non-negative float32 values (which
are ordered like the values), starts from a bracket read off a small strided
sample, and steps by secant interpolation with a bisection guard.  On smooth
data it needs 3-6 counting passes; the worst case is ~32.  It stops early as
soon as some t has ``c(t) == k`` exactly, which is the usual outcome for
real-valued weights.  Ties at ``v_k`` are broken by flat index so that exactly
k entries are kept.

A count is written as ``sum(min(max(x - t, 0) * 2**126, 1))`` (with ``x``
and ``t`` scaled up first, see ``_gt_step``) rather than ``sum(x > t)``
because XLA:CPU fuses the former into a single pass and materialises a mask
for the latter.  Magnitudes and thresholds both above 2**104
(~2e31) are not told apart.  (Eager merges on the CPU run the same search
from the host, in ``cpu/search.py``.)

Everything here is jittable and works on sharded arrays: the counts are
reductions (partial sums plus an all-reduce of scalars), never a gather.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.merging.tree import like, replicate

_BIG = 2.0**126
_UP = 2.0**24
_FMAX = float(np.finfo(np.float32).max)
_SAMPLE = 1 << 16
_INF_BITS = 0x7F800000
_FLAT_MAX = 1 << 22  # a population of several arrays up to this size is searched as one flat array


class Threshold(NamedTuple):
    """Keep ``x > value``, plus the first ``ties`` entries (flat order) equal to ``value``."""

    value: jax.Array  # float32 scalar
    ties: jax.Array  # int32 scalar, 0 in the common case


def _rows(x: jax.Array) -> jax.Array:
    """At least 2-D, with rows short enough that a float32 row count is exact (< 2**24)."""
    if x.ndim >= 2 and x.shape[-1] < (1 << 24):
        return x  # reduce the last axis in place: no reshape of (maybe sharded) leaves
    n = x.size
    if n < (1 << 24):
        return x.reshape(1, -1)
    for cols in (4096, 1024, 256, 64, 16):
        if n % cols == 0:
            return replicate(x).reshape(-1, cols)
    return replicate(x).reshape(1, -1)  # float32 count may be off by rounding past 2**24


def _gt_step(x, t):
    """1.0 where ``x > t``, else 0.0, for non-negative ``x``, as fused arithmetic.

    Both sides are scaled by 2**24 before subtracting, so the difference of two
    normal floats is never subnormal (XLA:CPU would flush it to 0); subnormal
    ``x`` or ``t`` act as 0, as in XLA:CPU's comparisons.
    """
    return jnp.minimum(jnp.maximum(x * _UP - jnp.minimum(t * _UP, _FMAX), 0.0) * _BIG, 1.0)


def count_greater(x: jax.Array, t: jax.Array) -> jax.Array:
    """Exact int32 count of ``x > t`` for non-negative float32 ``x`` (one fused pass)."""
    step = _gt_step(_rows(x), t)
    return jnp.sum(jnp.sum(step, axis=-1).astype(jnp.int32))


def _count_all(xs: Sequence[jax.Array], t) -> jax.Array:
    return sum(count_greater(x, t) for x in xs)


def _strided_sample(x: jax.Array, size: int) -> jax.Array:
    """About ``size`` entries spread evenly over every axis (no gather)."""
    if x.size <= size:
        return replicate(x).reshape(-1)
    stride = max(1, math.ceil((x.size / size) ** (1.0 / x.ndim)))
    idx = tuple(slice(None, None, stride if d > 1 else None) for d in x.shape)
    return replicate(x[idx]).reshape(-1)


def _bits(v):
    return lax.bitcast_convert_type(jnp.asarray(v, jnp.float32), jnp.int32)


def _value(b):
    return lax.bitcast_convert_type(b, jnp.float32)


def kth_largest(xs: Sequence[jax.Array], k: int, sample_steps: int = 3) -> Threshold:
    """The threshold that keeps exactly the ``k`` largest entries of ``xs`` together.

    ``xs`` are non-negative float32 arrays (magnitudes) treated as one
    population; pass a single array for per-tensor trimming or every leaf of a
    model for global trimming.  ``1 <= k <= total size`` must hold; ``k`` may
    be traced (one compiled search serves every density).

    Several arrays totalling at most ``_FLAT_MAX`` entries are concatenated
    first.  Phase 1 interpolates over the *values of a sorted sample* (``sample_steps``
    counting passes, unrolled): on real weights the counts are nearly linear in
    the sample rank, and on low-precision deltas, whose magnitudes take few
    distinct values, it lands on the tie plateau holding the k-th value.  One
    more count checks that.  Phase 2, a secant/bisection search over float
    bit patterns inside the bracket, runs only when needed.
    """
    xs = [jnp.asarray(x, jnp.float32) for x in xs]
    n = sum(x.size for x in xs)
    if isinstance(k, (int, np.integer)) and not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if len(xs) > 1 and n <= _FLAT_MAX:
        # one counting reduction per pass instead of one per array (and one small
        # program to compile); the threshold found is the same population's
        xs = [jnp.concatenate([replicate(x).reshape(-1) for x in xs])]
    k = jnp.asarray(k, jnp.int32)
    sample = jnp.sort(jnp.concatenate([_strided_sample(x, max(1, _SAMPLE * x.size // n)) for x in xs]))
    s = sample.shape[0]

    # Bracket invariant: c(lo) >= k > c(hi), where c(t) = #{x > t}; lo = -1 means -inf.
    b_lo, c_lo = jnp.int32(-1), jnp.int32(n)
    b_hi, c_hi = jnp.int32(_INF_BITS), jnp.int32(0)
    i_lo, i_hi = jnp.int32(-1), jnp.int32(s)  # the bracket in sample ranks
    guess = jnp.clip(jnp.round((1 - k.astype(jnp.float32) / n) * s), 0, s - 1).astype(jnp.int32)
    for _ in range(sample_steps):
        b = _bits(sample[guess])
        c = _count_all(xs, _value(b))
        up = c >= k  # the k-th value is above sample[guess]
        b_lo, c_lo, i_lo = jnp.where(up, b, b_lo), jnp.where(up, c, c_lo), jnp.where(up, guess, i_lo)
        b_hi, c_hi, i_hi = jnp.where(up, b_hi, b), jnp.where(up, c_hi, c), jnp.where(up, i_hi, guess)
        # interpolate the next sample rank from the counts at the bracket ends
        frac = (c_lo - k).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
        lo_r, hi_r = i_lo.astype(jnp.float32), i_hi.astype(jnp.float32)
        guess = jnp.clip(jnp.round(lo_r + frac * (hi_r - lo_r)).astype(jnp.int32), i_lo + 1, i_hi - 1)
        guess = jnp.clip(guess, 0, s - 1)
    # Is hi itself the k-th value (a tie plateau)?  c(prev(hi)) >= k says so.
    c_below_hi = jnp.where(b_hi > 0, _count_all(xs, _value(jnp.maximum(b_hi - 1, 0))), n)
    done = (c_below_hi >= k) | (c_lo == k) | (b_hi - b_lo <= 1)
    b_lo = jnp.where(c_below_hi >= k, jnp.maximum(b_hi - 1, b_lo), b_lo)
    c_lo = jnp.where(c_below_hi >= k, c_below_hi, c_lo)

    def cond(state):
        b_lo, b_hi, c_lo, c_hi, _ = state
        return (c_lo != k) & (b_hi - b_lo > 1)

    def body(state):
        b_lo, b_hi, c_lo, c_hi, it = state
        width = b_hi - b_lo
        # secant step on (bits, count), every third step a plain bisection
        frac = (c_lo - k).astype(jnp.float32) / jnp.maximum(c_lo - c_hi, 1).astype(jnp.float32)
        guess = b_lo + jnp.round(frac * width.astype(jnp.float32)).astype(jnp.int32)
        mid = jnp.clip(jnp.where(it % 3 == 2, b_lo + width // 2, guess), b_lo + 1, b_hi - 1)
        c = _count_all(xs, _value(mid))
        up = c >= k
        return (jnp.where(up, mid, b_lo), jnp.where(up, b_hi, mid), jnp.where(up, c, c_lo), jnp.where(up, c_hi, c), it + 1)

    def search(state):
        return lax.while_loop(cond, body, state)

    state = (b_lo, b_hi, c_lo, c_hi, jnp.int32(0))
    b_lo, b_hi, c_lo, c_hi, _ = lax.cond(done, lambda st: st, search, state)
    # c(lo) == k: keep x > value(lo), exactly k.  Otherwise hi is the k-th
    # value: keep x > hi (c_hi of them) plus k - c_hi of the ties at hi.
    exact = (c_lo == k) & (b_lo >= 0)
    value = jnp.where(exact, _value(jnp.maximum(b_lo, 0)), _value(b_hi))
    ties = jnp.where(exact, 0, k - c_hi).astype(jnp.int32)
    return Threshold(value, ties)


def _row_counts_equal(x2, value):
    """Per-row int32 count of ``x2 == value`` (x2 2-D, non-negative), as two fused counts."""
    below = _value(jnp.maximum(_bits(value) - 1, 0))
    gt = lambda t: jnp.sum(_gt_step(x2, t), axis=-1).astype(jnp.int32)
    at_least = jnp.where(_bits(value) > 0, gt(below), x2.shape[-1])
    return at_least - gt(value)


def keep_mask(x: jax.Array, th: Threshold, offset: jax.Array | int = 0) -> jax.Array:
    """Boolean mask of the entries of ``x`` (magnitudes) kept by ``th``.

    ``offset`` is the number of tied entries that precede ``x`` in flat order
    (for global trimming over several leaves); ties are broken by flat index:
    whole rows of ties first (a cumulative sum over per-row counts), then a
    cumulative sum inside the one row where the quota runs out.
    """
    x = jnp.asarray(x, jnp.float32)

    def with_ties():
        xr = replicate(x)
        x2 = xr.reshape(1, -1) if xr.ndim < 2 else xr.reshape(-1, xr.shape[-1])
        need = th.ties - offset  # ties this leaf may still keep
        per_row = _row_counts_equal(x2, th.value)
        before = jnp.cumsum(per_row) - per_row  # ties in earlier rows
        eq = x2 == th.value
        # the row where the quota runs out gets an in-row rank
        cut = jnp.clip(jnp.searchsorted(before + per_row, need, side="left"), 0, x2.shape[0] - 1)
        in_row = jnp.cumsum(lax.dynamic_index_in_dim(eq, cut, 0, keepdims=False).astype(jnp.int32)) - 1
        rank = jnp.where(jnp.arange(x2.shape[0])[:, None] == cut, before[:, None] + in_row[None, :], before[:, None])
        keep_tie = eq & (rank < need)
        return like(((x2 > th.value) | keep_tie).reshape(x.shape), x)

    return lax.cond(th.ties > 0, with_ties, lambda: x > th.value)


def ties_before(xs: Sequence[jax.Array], th: Threshold) -> list[jax.Array]:
    """For global trimming: how many entries equal to the threshold precede each leaf."""
    out, acc = [], jnp.int32(0)
    for x in xs:
        out.append(acc)
        acc = acc + jnp.sum(jnp.asarray(x, jnp.float32) == th.value, dtype=jnp.int32)
    return out


def topk_mask(x: jax.Array, k: int) -> jax.Array:
    """Mask of exactly the ``k`` largest-magnitude entries of ``x`` (k may be 0 or x.size)."""
    if k <= 0:
        return jnp.zeros(x.shape, bool)
    if k >= x.size:
        return jnp.ones(x.shape, bool)
    mag = jnp.abs(jnp.asarray(x, jnp.float32))
    return keep_mask(mag, kth_largest([mag], k))
