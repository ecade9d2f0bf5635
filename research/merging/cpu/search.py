"""Exact top-k of ``|ft - base|`` searched from the host: the CPU backend's twin of
``topk.kth_largest`` (the same bracket, sample and secant/bisection steps).

Inside one XLA program, a count whose threshold was computed by an earlier
count runs slower on XLA:CPU (its fused kernel then materialises its
broadcast constants), and so does a pass that counts several thresholds at
once.  Eager merges therefore drive the search from Python: one counting
pass per step, the threshold passed in, made by the numba kernel of
``kernels`` (bf16/float32 on one CPU device) or else by a small compiled XLA
call.  Each pass returns per-row counts, kept by threshold, so the tie break
at the end usually needs no further pass; the sample is sorted on the host.
``topk_cuts_host`` runs the first step of every model's search in one numba
pass over the base and all models (TIES: 4 tensors read once instead of 3
pairs).

The result is a ``Cut``: the same entries ``topk.topk_mask`` keeps (ties by
flat index), with the tie break resolved to a position.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from research.merging.cpu import kernels
from research.merging.topk import _INF_BITS, _SAMPLE, _gt_step, _strided_sample

# The fused host search starts from a smaller sample (reading and sorting it is
# most of its host work); its first guess still lands on the k-th value's tie
# plateau of bf16 deltas nearly always.
_HOST_SAMPLE = 1 << 15


class Cut(NamedTuple):
    """Keep ``x > value``, plus the entries equal to ``value`` before flat position
    ``(row, col)`` of the tensor's ``[rows, last]`` view (a host-resolved tie break)."""

    value: jax.Array
    row: jax.Array
    col: jax.Array


def _view2d(x):
    return x.reshape(1, -1) if x.ndim < 2 else x.reshape(-1, x.shape[-1])


def keep_mask_cut(x, cut: Cut, at=None):
    """The mask of a ``Cut``: one fused elementwise expression, no control flow.
    ``at``: where ``x`` holds some entries of the tensor, their ``(row, col)``
    in its ``[rows, last]`` view (arrays shaped as ``x``)."""
    if at is None:
        x2 = _view2d(jnp.asarray(x, jnp.float32))
        r, c = jnp.arange(x2.shape[0])[:, None], jnp.arange(x2.shape[1])[None, :]
    else:
        x2, (r, c) = jnp.asarray(x, jnp.float32), at
    before = (r < cut.row) | ((r == cut.row) & (c < cut.col))
    return ((x2 > cut.value) | ((x2 == cut.value) & before)).reshape(x.shape)


def _delta(ft, base):
    return ft.astype(jnp.float32) - base.astype(jnp.float32)


def _abs_delta(ft, base):
    return jnp.abs(_delta(ft, base))


class NonFiniteInput(ValueError):
    """A screening count pass met NaN/Inf in ``ft`` or ``base`` (or ``ft - base`` overflowed)."""


def _screen_term(delta, screen: bool):
    """``delta * 0``: 0, or NaN where ``ft - base`` is not finite, i.e. where ``ft``
    or ``base`` is NaN/Inf (or the difference overflowed).  Added to a count's
    row sums it screens the inputs in the same pass."""
    return delta * 0.0 if screen else 0.0


@functools.partial(jax.jit, static_argnames="screen")
def _row_greater_abs_delta(ft, base, t, screen=False):
    """Per-row count of ``|ft - base| > t`` as float32 (one reduction per program:
    the fast path); NaN in a row whose inputs are not finite when ``screen``."""
    delta = _view2d(_delta(ft, base))
    return jnp.sum(_gt_step(jnp.abs(delta), t) + _screen_term(delta, screen), axis=-1)


@jax.jit
def _sample_abs_delta(ft, base):
    return _strided_sample(_abs_delta(ft, base), _SAMPLE)


@jax.jit
def _row_equal_abs_delta(ft, base, value, row):
    d2 = _view2d(_abs_delta(ft, base))
    return lax.dynamic_index_in_dim(d2, row, 0, keepdims=False) == value


def _f32_bits(v) -> int:
    return int(np.asarray(v, np.float32).view(np.int32))


def _bits_f32(b: int):
    return np.asarray(b, np.int32).view(np.float32)


@functools.partial(jax.jit, static_argnames="screen")
def _row_pair_abs_delta(ft, base, t, t_below, screen=False):
    """Per-row ``(cols + 1) * #[d > t] + #[d > t_below]`` for ``d = |ft - base|``, one pass.

    The terms are non-negative integers, so while a row's sum stays below
    2**24 every partial sum is exact in float32, whatever the order; a
    result at or above 2**24 may be rounded and is not used.  With
    ``screen``, a row whose inputs hold NaN/Inf sums to NaN.
    """
    delta = _view2d(_delta(ft, base))
    d2 = jnp.abs(delta)
    w = float(d2.shape[1] + 1)
    gt = _gt_step(d2, t)
    ge = _gt_step(d2, t_below)
    return jnp.sum(gt * w + ge + _screen_term(delta, screen), axis=-1)


class _HostCounts:
    """Per-row counts of ``|ft - base| > t`` by bit pattern ``b`` of ``t``.

    One pass counts both ``> value(b)`` and ``> value(b - 1)`` (i.e.
    ``>= value(b)``), so a search that lands on the k-th value's tie plateau
    knows it at once: with the numba kernel of ``kernels`` (``kernel``,
    default where ``usable``), else with an XLA program while its packed row
    sums stay exact.  With ``screen``
    the first pass also screens ``ft`` and ``base`` for NaN/Inf (raising
    ``NonFiniteInput``), so no separate pass over the inputs is needed.
    """

    def __init__(self, ft, base, screen: bool = False, kernel: bool | None = None):
        self.ft, self.base, self.rows, self.screen = ft, base, {}, screen
        self.cols = _view2d(ft).shape[1]
        self.kernel = kernels.usable(ft, base) if kernel is None else kernel

    def _screened(self, finite: bool) -> None:
        """After a pass: raise if screening and it met NaN/Inf; one pass has seen every entry."""
        if self.screen and not finite:
            raise NonFiniteInput("NaN or Inf in ft - base")
        self.screen = False

    def _fetch(self, sums) -> np.ndarray:
        sums = np.asarray(sums)
        self._screened(not self.screen or bool(np.isfinite(sums).all()))
        return sums.astype(np.int64)

    def store(self, b: int, gt: np.ndarray, ge: np.ndarray) -> np.ndarray:
        self.rows[b] = gt
        if b > 0:
            self.rows.setdefault(b - 1, ge)
        return gt

    def per_row(self, b: int) -> np.ndarray:
        if b in self.rows:
            return self.rows[b]
        if self.kernel:  # numba: both counts exact, any row length
            below = _bits_f32(b - 1) if b > 0 else _bits_f32(b)
            gt, ge, bad = kernels.pair_counts(self.ft, self.base, _bits_f32(b), below)
            self._screened(not bad.any())
            return self.store(b, gt, ge)
        if b > 0:
            packed = self._fetch(_row_pair_abs_delta(self.ft, self.base, _bits_f32(b), _bits_f32(b - 1), self.screen))
            if packed.max(initial=0) < (1 << 24):  # exact: decode both counts
                return self.store(b, *np.divmod(packed, self.cols + 1))
        self.rows[b] = self._fetch(_row_greater_abs_delta(self.ft, self.base, _bits_f32(b), self.screen))
        return self.rows[b]

    def cached(self, b: int) -> int | None:
        return int(self.rows[b].sum()) if b in self.rows else None

    def __call__(self, b: int) -> int:
        return int(self.per_row(b).sum())


def _plateau(count, b: int, c: int, k: int):
    """``b`` with ``c(b) < k``: if ``c(b - 1)`` is already known and ``>= k``,
    ``value(b)`` is the k-th value; return the new ``(b_lo, c_lo)``."""
    below = count.cached(b - 1) if b > 0 else None
    return (b - 1, below) if below is not None and below >= k else None


class _Unsorted:
    """A sample sorted only once a second order statistic is asked of it: the first
    guess of a search usually ends it, and one partition is cheaper than a sort."""

    def __init__(self, values: np.ndarray):
        self.values, self.known, self.ordered = values, {}, False

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rank: int):
        if rank in self.known:
            return self.known[rank]
        if not self.ordered and not self.known:
            self.known[rank] = np.partition(self.values, rank)[rank]
            return self.known[rank]
        return np.asarray(self)[rank]

    def __array__(self, dtype=None, copy=None):
        if not self.ordered:
            self.values.sort()
            self.ordered = True
        return self.values


def _search_host(count, sample, n: int, k: int, sample_steps: int = 3):
    """The host twin of ``kth_largest``'s search: ``(b_lo, c_lo, b_hi, c_hi)``
    with ``c(lo) >= k > c(hi)`` and either ``c(lo) == k`` or ``hi`` the k-th value.
    ``sample``: sorted, or ``_Unsorted``."""
    s = len(sample)
    b_lo, c_lo, b_hi, c_hi = -1, n, _INF_BITS, 0
    i_lo, i_hi = -1, s
    guess = _first_rank(s, n, k)
    for _ in range(sample_steps):
        if not i_lo < guess < i_hi:
            break
        b = _f32_bits(sample[guess])
        c = count(b)
        if c >= k:
            b_lo, c_lo, i_lo = b, c, guess
        else:
            b_hi, c_hi, i_hi = b, c, guess
            found = _plateau(count, b, c, k)
            if found:
                b_lo, c_lo = found
                break
        if c == k:
            break
        frac = (c_lo - k) / max(c_lo - c_hi, 1)
        guess = int(round(i_lo + frac * (i_hi - i_lo)))
        guess = min(max(guess, i_lo + 1), i_hi - 1)
        # on tie plateaus, only sample values strictly inside the bracket are new
        ordered = np.asarray(sample)
        first = int(np.searchsorted(ordered, _bits_f32(b_lo), side="right")) if b_lo >= 0 else 0
        last = int(np.searchsorted(ordered, _bits_f32(b_hi), side="left")) - 1
        if first > last:
            break
        guess = min(max(guess, first), last)
    if c_lo != k and b_hi - b_lo > 1 and b_hi > 0:
        below = count(b_hi - 1)  # is hi itself the k-th value (a tie plateau)?
        if below >= k:
            b_lo, c_lo = b_hi - 1, below
    it = 0
    while c_lo != k and b_hi - b_lo > 1:
        width = b_hi - b_lo
        frac = (c_lo - k) / max(c_lo - c_hi, 1)
        mid = b_lo + width // 2 if it % 3 == 2 else b_lo + int(round(frac * width))
        mid = min(max(mid, b_lo + 1), b_hi - 1)
        c = count(mid)
        if c >= k:
            b_lo, c_lo = mid, c
        else:
            b_hi, c_hi = mid, c
            found = _plateau(count, mid, c, k)
            if found:
                b_lo, c_lo = found
        it += 1
    return b_lo, c_lo, b_hi, c_hi


def _first_rank(s: int, n: int, k: int) -> int:
    """The sample rank where the search for the k-th largest of ``n`` starts."""
    return min(s - 1, max(0, round((1 - k / n) * s)))


def _resolve(counts: _HostCounts, sample, k: int) -> Cut:
    """Search (from what ``counts`` already holds) and break ties: the ``Cut`` keeping
    exactly the ``k`` largest, ``0 < k < n``."""
    b_lo, c_lo, b_hi, c_hi = _search_host(counts, sample, counts.ft.size, k)
    if c_lo == k and b_lo >= 0:
        return Cut(np.float32(_bits_f32(b_lo)), np.int32(0), np.int32(0))
    # hi is the k-th value: keep everything above it and the first k - c_hi ties
    need = k - c_hi
    rows, cols = _view2d(counts.ft).shape
    at_least = counts.per_row(b_hi - 1) if b_hi > 0 else np.full(rows, cols, np.int64)
    per_row = at_least - counts.per_row(b_hi)  # both usually cached by the search
    cum = np.cumsum(per_row)
    row = int(np.searchsorted(cum, need, side="left"))
    left = need - (int(cum[row - 1]) if row else 0)
    value = _bits_f32(b_hi)
    if counts.kernel:
        eq = kernels.abs_delta_row(counts.ft, counts.base, row) == value
    else:
        eq = np.asarray(_row_equal_abs_delta(counts.ft, counts.base, value, row))
    col = int(np.flatnonzero(eq)[left - 1]) + 1
    return Cut(np.float32(value), np.int32(row), np.int32(col))


def trivial_cut(n: int, k: int) -> Cut:
    """The cut of ``k <= 0`` (keep nothing) or ``k >= n`` (keep everything)."""
    return Cut(np.float32(-1.0 if k >= n else np.inf), np.int32(0), np.int32(0))


def topk_cut_delta_host(ft, base, k: int, screen: bool = False, kernel: bool | None = None) -> Cut:
    """Exactly the ``k`` largest ``|ft - base|`` (ties by flat index) as a ``Cut``.

    ``screen``: raise ``NonFiniteInput`` if ``ft`` or ``base`` holds NaN/Inf
    (checked by the first counting pass, at no extra pass).  ``kernel``: count
    with the numba kernel of ``kernels`` (default: where ``usable``) or with
    XLA programs.
    """
    n = ft.size
    if isinstance(k, (int, np.integer)) and not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    k = jnp.asarray(k, jnp.int32)
    counts = _HostCounts(ft, base, screen, kernel)
    sample = np.sort(np.asarray(_sample_abs_delta(ft, base)))
    return _resolve(counts, sample, k)


class FusedCuts(NamedTuple):
    cuts: list  # per model, one Cut per requested k
    finite: bool  # no NaN/Inf in base, the fts, or their differences
    tiny: np.ndarray  # per row of the [rows, last] view: an input is non-zero below 2**-32 (``kernels.tiny_entries``)


def topk_cuts_host(base, fts: Sequence, ks: Sequence[Sequence[int]], screen: bool = False) -> FusedCuts:
    """``topk_cut_delta_host`` for several trims of several models against one base,
    their first counting passes fused into one pass over ``base`` and every ``ft``
    (numba; the arrays must be ``kernels.usable``).

    ``ks[i]``: the k of each trim of model ``i`` (TIES: one; breadcrumbs: two).
    The first count of each search is at its sample's first guess, which on
    low-precision deltas usually lands on the k-th value's tie plateau, so
    that one pass over the four tensors of a 3-model merge replaces three over
    two.  Every model is screened for NaN/Inf by that pass (``screen`` raises
    ``NonFiniteInput``).
    """
    n = base.size
    counts = [_HostCounts(ft, base, kernel=True) for ft in fts]
    samples = None
    if any(map(any, ks)):
        samples = [_Unsorted(row) for row in kernels.sample_abs_deltas(base, fts, _HOST_SAMPLE)]
    probes = []
    for i, k_list in enumerate(ks):
        for k in k_list:
            if 0 < k < n:
                probe = (i, _f32_bits(samples[i][_first_rank(len(samples[i]), n, k)]))
                if probe not in probes:
                    probes.append(probe)
        if not any(p[0] == i for p in probes):
            probes.append((i, _INF_BITS))  # screens the model, checks it for tiny magnitudes
    bits = [b for _, b in probes]
    gt, ge, bad, tiny = kernels.probe_counts(
        base, fts, [i for i, _ in probes], [_bits_f32(b) for b in bits], [_bits_f32(max(b - 1, 0)) for b in bits])
    finite = not bad.any()
    if screen and not finite:
        raise NonFiniteInput("NaN or Inf in ft - base")
    for p, (i, b) in enumerate(probes):
        counts[i].store(b, gt[p], ge[p])
    cuts = [[_resolve(counts[i], samples[i], k) if 0 < k < n else trivial_cut(n, k) for k in k_list]
            for i, k_list in enumerate(ks)]
    return FusedCuts(cuts, finite, tiny)
