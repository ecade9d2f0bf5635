"""numba kernels for eager merges on the CPU: TIES/breadcrumbs passes, DELLA ranks,
DARE/DELLA masks and their merge pass.

Several steps of the task-vector merges are slow in XLA:CPU and simple loops
in numba, over ``d = |ft - base|`` (float32) of one tensor:

* ``probe_counts`` (and ``pair_counts``, one probe): per row of the
  ``[rows, last]`` view, how many ``d`` exceed a threshold ``t`` and how many
  exceed the next float below it (``>= t``), plus how many are not finite,
  for several (model, threshold) probes in one pass over the base and every
  model.  The host-driven top-k searches of ``select`` (TIES, breadcrumbs)
  start with one such pass for all models; on bf16 deltas it usually ends
  them.
* ``cut_merge``: the merge pass of TIES and breadcrumbs once their cuts are
  known (trim, sign vote, disjoint weighted mean, lambda).
  It and the counting pass are written out per number of models
  (``_unrolled``).
* ``row_ranks``: the rank of each ``d`` along axis 1 of a ``[rows, n,
  cols]`` view (stable: ties by position), which DELLA's keep probabilities
  need (``leaf.host_ranks``: ``sparsify.della_shape``).  XLA sorts twice
  (``argsort(argsort(d))``); the kernel radix-sorts the float bits.
* ``bernoulli``/``below_table``: DARE's and DELLA's keep masks, drawn by a
  threefry2x32 that gives JAX's bits exactly; ``della_masks``: DELLA's,
  ranking exactly only the entries whose draw needs it, within rows (or
  down the columns of a strip: ``della_strip_masks``); ``random_merge``:
  DARE's whole merge pass with the masks drawn inline (none is stored) or
  given (``Masks``, one bit an entry, as the mask kernels write them).

They read the arrays in place: a JAX array on one CPU device is viewed as
NumPy without a copy, bf16 as its uint16 bits (decoded by a shift).  Only bf16
and float32 tensors on one CPU device take these paths (``usable``);
everything else keeps the XLA programs, which give the same results.

The results agree bit for bit with the XLA programs (the tests check it).
XLA:CPU runs with subnormals flushed to zero (inputs and results).  The
ranks and the flushing count flush them too; the fast counting pass and the
merge passes flush nothing.  An entry whose inputs have no non-zero
magnitude below 2**-32 never meets a subnormal (``cut_merge`` says why).
The passes report the rows that hold other entries: the counting pass
counts those rows again with the flushes, and the caller merges those
entries again by the XLA program (``tiny_entries``, ``leaf.patch_tiny``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.safetensors_io import aligned_empty

# Outputs are 64-byte aligned, so that passing them to JAX on the CPU aliases
# them instead of copying (a merge holds one mask per model).
_DTYPES = ("bfloat16", "float32")
# numba's fallback thread pool ("workqueue", used when no OpenMP/TBB runtime is
# installed) must not be entered from two threads at once.
_LOCK = threading.Lock()
_TINY = np.float32(np.finfo(np.float32).tiny)


@functools.cache
def _has_numba() -> bool:
    # numba is a dependency; the XLA programs remain the fallback where it cannot load
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _loops():
    return importlib.import_module("research.merging.cpu._loops")


@functools.cache
def _generated():
    _loops()  # numba set up first
    return importlib.import_module("research.merging.cpu._unrolled")


def usable(*arrays) -> bool:
    """Whether these (same-dtype) arrays can go through these kernels: numba
    installed, bf16 or float32, C-contiguous in memory on the host (NumPy, or
    JAX on one CPU device)."""
    if not _has_numba():
        return False
    for x in arrays:
        if str(x.dtype) not in _DTYPES or x.size == 0:
            return False
        if isinstance(x, np.ndarray):
            if not x.flags.c_contiguous:
                return False
            continue
        sharding = getattr(x, "sharding", None)
        if sharding is None or len(sharding.device_set) != 1:
            return False
        if next(iter(sharding.device_set)).platform != "cpu":
            return False
    return True


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``.  numba compiles a kernel once per type of its
    arguments, and whether an array is writable is part of its type: the
    kernels' inputs (JAX arrays, which NumPy views read-only, or mapped and
    read tensors, which are writable) are all passed read-only, so that each
    kernel is compiled once per dtype, not twice."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def _host_view(x, rows_first: bool = False) -> np.ndarray:
    """``x`` as a read-only 2-D NumPy view without copying (bf16 as uint16 bits):
    ``[rows, last]``, or ``[shape[0], -1]`` with ``rows_first``."""
    a = np.asarray(x)
    if a.ndim < 2:
        a = a.reshape(1, -1)
    else:
        a = a.reshape(a.shape[0], -1) if rows_first else a.reshape(-1, a.shape[-1])
    return _readonly(a.view(np.uint16) if a.dtype.name == "bfloat16" else a)


ROW_MAX = 2**31 - 1  # the most entries of a row that the kernels count or rank in 32 bits (one call)


def probe_counts(base, fts, probe_model, t_gt, t_ge):
    """Top-k counts of several probes in one pass over ``base`` and ``fts``: probe ``p``
    counts ``d = |fts[probe_model[p]] - base|`` (float32) per row above
    ``t_gt[p]`` and above ``t_ge[p]``.  Returns ``gt`` and ``ge`` (``[probes,
    rows]`` int64), ``bad`` (the same: how many ``d`` are NaN/Inf) and
    ``tiny``: per row (bool), whether ``base`` or a probed ``ft`` holds a non-zero
    magnitude below 2**-32 (``tiny_entries``).

    Thresholds are float32; subnormal ones act as 0, and subnormal inputs and
    differences count as 0, as in XLA:CPU.  The pass skips those flushes and
    the NaN/Inf counts, which make it compute-bound (it only notes whether
    either could matter), and counts again with them where they could.
    """
    b = _host_view(base)
    views = tuple(_host_view(f) for f in fts)
    if b.shape[1] > ROW_MAX:  # the kernels count in 32-bit lanes: longer rows in parts
        parts = [probe_counts(b[:, lo:lo + ROW_MAX], [v[:, lo:lo + ROW_MAX] for v in views], probe_model, t_gt, t_ge)
                 for lo in range(0, b.shape[1], ROW_MAX)]
        gt, ge, bad = (sum(part[j] for part in parts) for j in range(3))
        return gt, ge, bad, np.logical_or.reduce([part[3] for part in parts])
    n_probes, rows = len(probe_model), b.shape[0]
    gt, ge = (np.empty((n_probes, rows), np.int64) for _ in range(2))
    bad = np.zeros((n_probes, rows), np.int64)
    any_bad, tiny = np.empty(rows, np.bool_), np.empty(rows, np.bool_)
    flushed = lambda ts: np.array([0.0 if abs(t) < _TINY else t for t in ts], np.float32)
    t_gt, t_ge = flushed(t_gt), flushed(t_ge)
    unrolled = _generated().probe_counts(tuple(int(i) for i in probe_model))
    with _LOCK:
        unrolled(b, views, t_gt, t_ge, gt, ge, any_bad, tiny)
        if tiny.any() or any_bad.any():  # count again, exactly as XLA:CPU does, with NaN/Inf per probe
            for p, i in enumerate(probe_model):
                _loops().probe_counts_flushed(b, views[i], t_gt[p], t_ge[p], _TINY, gt[p], ge[p], bad[p])
    return gt, ge, bad, tiny


def tiny_entries(base, fts, rows, shape=None) -> np.ndarray:
    """Flat positions (int64, ascending) of the entries of ``rows`` where ``base`` or
    some ``ft`` holds a non-zero magnitude below 2**-32: the only ones where
    the merge passes, which flush no subnormal, can differ from XLA:CPU.
    ``rows`` index the ``[rows, last]`` view, or the ``shape`` view if given."""
    views = [_host_view(x) if shape is None else _as_2d(x, shape) for x in (base, *fts)]
    rows = np.asarray(rows, np.int64)
    hit = np.zeros((len(rows), views[0].shape[1]), np.bool_)
    for v in views:
        bits = v[rows]
        if bits.dtype == np.uint16:  # bf16
            mag = bits & np.uint16(0x7FFF)
            hit |= (mag != 0) & (mag < np.uint16(95 << 7))
        else:
            mag = bits.view(np.uint32) & np.uint32(0x7FFFFFFF)
            hit |= (mag != 0) & (mag < np.uint32(95 << 23))
    r, c = np.nonzero(hit)
    return rows[r] * views[0].shape[1] + c


def pair_counts(ft, base, t_gt, t_ge):
    """Per-row ``#[d > t_gt]``, ``#[d > t_ge]`` and ``#[d not finite]`` (int64 arrays)
    for ``d = |ft - base|`` in float32: one probe of ``probe_counts``."""
    gt, ge, bad, _ = probe_counts(base, (ft,), [0], [t_gt], [t_ge])
    return gt[0], ge[0], bad[0]


def _as_f32(a: np.ndarray) -> np.ndarray:
    """A float32 copy of a ``_host_view`` (bf16 bits decoded), subnormals flushed."""
    x = (a.astype(np.uint32) << 16).view(np.float32) if a.dtype == np.uint16 else a.astype(np.float32)
    return np.where(np.abs(x) < _TINY, np.float32(0), x)


def _abs_delta(f: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # an overflow is Inf, as in the counting kernels
        d = np.abs(_as_f32(f) - _as_f32(b))
    return np.where(d < _TINY, np.float32(0), d)


_SAMPLE_RUN = 64  # consecutive entries per sampled run: whole cache lines


def sample_abs_deltas(base, fts, size: int) -> np.ndarray:
    """``[models, ~size]``: each model's ``|ft - base|`` (float32, subnormals flushed,
    unsorted) at the same positions: runs of ``_SAMPLE_RUN`` consecutive entries
    spread evenly over the flat order.  The samples only guide the top-k
    searches (their counts are exact); runs read a few cache lines where a
    strided sample reads all of them."""
    b = _host_view(base).reshape(-1)
    views = tuple(_host_view(f).reshape(-1) for f in fts)
    runs = max(1, size // _SAMPLE_RUN)
    if b.size <= 2 * size:  # small tensors: all of it
        step, run, runs = b.size, b.size, 1
    else:
        step, run = b.size // runs, _SAMPLE_RUN
    out = np.empty((len(views), runs * run), np.float32)
    for v, row in zip(views, out):
        _loops().sample_abs_deltas(b, v, step, run, _TINY, row)
    return out


def abs_delta_row(ft, base, row: int) -> np.ndarray:
    """Row ``row`` of ``|ft - base|``'s ``[rows, last]`` view, as the counting kernels see it."""
    return _abs_delta(_host_view(ft)[row], _host_view(base)[row])


def row_ranks(ft, base, view=None) -> np.ndarray:
    """Rank (0 = smallest) of each ``|ft - base|`` along axis 1 of ``view``, a shape
    ``[rows, n, cols]`` of the same entries in order (default ``[shape[0], -1,
    1]``: within each row), ties by position: ``argsort(argsort(d, axis=1),
    axis=1)``.  Returned as the ``[rows, n * cols]`` table of the entries in
    order; uint16 when ``n <= 2**16`` (half the memory), else int32."""
    f, b = _host_view(ft, rows_first=True), _host_view(base, rows_first=True)
    view = (f.shape[0], f.shape[1], 1) if view is None else tuple(view)
    out = aligned_empty(view, np.uint16 if view[1] <= (1 << 16) else np.int32)
    with _LOCK:
        if view[2] == 1:
            _loops().row_ranks(f.reshape(view[:2]), b.reshape(view[:2]), _TINY, out.reshape(view[:2]))
        else:
            _loops().axis1_ranks(f.reshape(view), b.reshape(view), _TINY, out)
    return out.reshape(view[0], -1)


_NO_CUT = (np.float32(np.inf), 0, 0)  # a top cut that removes nothing
_SAFE_SCALE = (2.0**-16, 2.0**16)


class MagnitudeHistograms:
    """Histograms of ``|ft_i - base|``'s float32 bits, one per model, over blocks of one
    tensor (or many), for exact top-k selection in streaming passes: ``add`` each
    block (one pass over the base and every model), then ``counts()``.  Level 1
    keys the high 15 bits (``bits >> 16``); level 2 the low 16 bits of the entries
    in one level-1 bin per model (``within``).  Subnormals count as 0, as in
    XLA:CPU; NaN/Inf are counted apart (``bad()``)."""

    LOW = 16

    def __init__(self, n_models: int, within=None):
        self.within = np.full(n_models, -1, np.int64) if within is None else np.asarray(within, np.int64)
        self.level = 1 if within is None else 2
        bins = 1 << (15 if within is None else self.LOW)
        w = max(1, numba_threads())
        self.hist = np.zeros((w, n_models, bins), np.int64)
        self._bad = np.zeros((w, n_models), np.int64)

    def add(self, base, fts) -> None:
        b, views = _host_view(base), tuple(_host_view(f) for f in fts)
        shift, mask = (self.LOW, (1 << 15) - 1) if self.level == 1 else (0, (1 << self.LOW) - 1)
        with _LOCK:
            _loops().magnitude_histograms(b, views, shift, mask, self.within, self.LOW, _TINY, self.hist, self._bad)

    def counts(self) -> np.ndarray:
        """``[models, bins]`` counts."""
        return self.hist.sum(0)

    def bad(self) -> np.ndarray:
        return self._bad.sum(0)


def _cut_arrays(cuts):
    """Per model ``(value, value_ge, row, col)`` arrays: ``|d| > value_ge`` is ``|d| >= value``
    for the non-negative, non-subnormal ``|d|`` that ``cut_merge`` meets."""
    v = np.array([0.0 if abs(float(c[0])) < _TINY else float(c[0]) for c in cuts], np.float32)
    ge = np.where(v == 0, np.float32(-1.0), np.nextafter(v, np.float32(-np.inf)))
    rows = np.array([int(c[1]) for c in cuts], np.int64)
    cols = np.array([int(c[2]) for c in cuts], np.int64)
    return v, ge, rows, cols


def _safe_scale(x: float) -> bool:
    return x == 0 or _SAFE_SCALE[0] <= abs(x) <= _SAFE_SCALE[1]


def scales_ok(weights, lam) -> bool:
    """Whether the merge passes match XLA with these weights and ``lam``: each 0 or
    in [2**-16, 2**16] (see ``cut_merge``)."""
    return all(_safe_scale(float(w)) for w in weights) and _safe_scale(float(lam))


def _mix_inputs(weights, consensus, divide_by: str, shape, out_dtype):
    """The merge passes' weights, per-model divisor weights, the constant divisor's
    float32 reciprocal (XLA divides by a scalar so) and the output buffer."""
    n = len(weights)
    w = np.asarray(weights, np.float32)
    dw = w if divide_by == "weight" else np.ones(n, np.float32)
    if consensus is None:
        total = float(sum(weights)) if divide_by == "weight" else float(n)
        inv_div = np.float32(1) / np.float32(total if abs(total) >= 1e-8 else 1.0)
    else:
        inv_div = np.float32(1.0)
    out = aligned_empty(shape, np.uint16 if np.dtype(out_dtype).name == "bfloat16" else np.float32)
    return w, dw, inv_div, out


def cut_merge(base, fts, keep, top, weights, *, consensus, vote_on, normalize, divide_by, lam, out_dtype):
    """The task-vector merge of trims given as cuts (TIES, breadcrumbs), one pass.

    ``keep[i]``/``top[i]``: model ``i`` keeps ``|d|`` passing cut ``keep[i]``
    (``(value, row, col)``, see ``search.Cut``) and not passing ``top[i]``
    (``None``: nothing removed).  The options are ``consensus.disjoint_sum``'s.
    Returns the merged leaf as NumPy (``out_dtype``: bf16 or float32), or None
    where the result could differ from XLA's: weights or ``lam`` outside
    [2**-16, 2**16] (other than 0).

    The kernel flushes nothing, where XLA:CPU flushes subnormals.  The caller
    rules out NaN/Inf (``probe_counts`` reports them), and merges again the
    entries with a non-zero input magnitude below 2**-32 (``tiny_entries``).
    At every other entry each difference is 0 or above 2**-55, each weighted
    one above 2**-71, each mean above 2**-90, and each sum of them cancels to
    0 or to at least the smallest spacing of its terms: no intermediate is
    subnormal, and the result is XLA's.
    """
    if not all(_safe_scale(float(w)) for w in weights) or not _safe_scale(float(lam)):
        return None
    n = len(fts)
    b = _host_view(base)
    views = tuple(_host_view(f) for f in fts)
    kv, kge, kr, kc = _cut_arrays(keep)
    tv, tge, tr, tc = _cut_arrays([_NO_CUT if t is None else t for t in top])
    w, dw, inv_div, out = _mix_inputs(weights, consensus, divide_by, b.shape, out_dtype)
    chunks = min(b.shape[0], 16 * numba_threads())
    gen = _generated()
    mode = gen.merge_mode({None: 0, "sum": 1, "count": 2}[consensus], bool(normalize), float(lam) == 1.0,
                          vote_on == "raw", any(t is not None for t in top), all(float(x) == 1.0 for x in weights))
    with _LOCK:
        gen.cut_merge(n, mode)(b, views, kv, kge, kr, kc, tv, tge, tr, tc, w, dw,
                               inv_div, np.float32(lam), chunks, out)
    return out.view(out_dtype).reshape(np.shape(base))


def _draw_view(x, block_rows: int) -> np.ndarray:
    """``x`` as the 2-D NumPy view the DARE kernels draw over and sum by rows: ``[-1,
    shape[-1]]``; a 1-D ``x`` as one row, or, drawn in blocks of ``block_rows``
    entries, as ``[n, 1]``.  A draw's counter is the flat index within its block
    of leading rows, so each row of this view lies within one block and draws
    the bits it draws in ``x``'s own shape (``_view_rows``)."""
    a = np.asarray(x)
    if a.ndim >= 2:
        a = a.reshape(-1, a.shape[-1])
    else:
        a = a.reshape(1, -1) if block_rows >= a.size else a.reshape(-1, 1)
    return _readonly(a.view(np.uint16) if a.dtype.name == "bfloat16" else a)


def _view_rows(shape, block_rows: int) -> int:
    """Rows of ``_draw_view`` in ``block_rows`` leading rows of a tensor of ``shape``."""
    return block_rows * math.prod(shape[1:-1])


def _as_2d(x, shape) -> np.ndarray:
    a = np.asarray(x).reshape(shape)
    return _readonly(a.view(np.uint16) if a.dtype.name == "bfloat16" else a)


def _key_array(block_keys):
    """Every model's draw-block keys as one ``[n, blocks, 2]`` uint32 array (zeros
    where a model draws nothing), and the number of blocks."""
    blocks = max(1 if k is None else len(k) for k in block_keys)
    keys = np.zeros((len(block_keys), blocks, 2), np.uint32)
    for i, k in enumerate(block_keys):
        if k is not None:
            keys[i, : len(k)] = np.asarray(k, np.uint32).reshape(-1, 2)
    return keys, blocks


def _draw_args(base, fts, block_keys, block_rows: int, density):
    """The draw views, per-model keys/probabilities and the view's rows per draw block
    of ``random_masks``/``random_merge``."""
    keys, _ = _key_array(block_keys)
    p = np.array([2.0 if k is None else d for k, d in zip(block_keys, density)], np.float32)  # 2: keep everything
    rows = _view_rows(np.shape(base), block_rows)
    return _draw_view(base, block_rows), tuple(_draw_view(f, block_rows) for f in fts), keys, p, rows


class Masks(NamedTuple):
    """Keep masks of ``n`` models over a ``[rows, cols]`` view, one bit an entry:
    ``bits[i, r]`` is ``np.packbits(mask[i, r])`` (``[n, rows, ceil(cols / 8)]``
    uint8, each row padded to whole bytes)."""

    bits: np.ndarray
    cols: int

    def unpacked(self) -> np.ndarray:
        """``[n, rows, cols]`` bool."""
        return np.unpackbits(self.bits, axis=-1, count=self.cols).view(np.bool_)

    def at(self, i: int, flat) -> np.ndarray:
        """Model ``i``'s mask at flat positions ``flat`` of the view (bool)."""
        r, c = np.divmod(np.asarray(flat, np.int64), self.cols)
        return ((self.bits[i, r, c >> 3] >> (7 - (c & 7)).astype(np.uint8)) & 1).astype(np.bool_)


def _masks_out(n: int, shape) -> Masks:
    return Masks(np.empty((n, shape[0], -(-shape[1] // 8)), np.uint8), shape[1])


def _sums_out(n: int, rows: int, sums: bool) -> np.ndarray:
    """Where a mask kernel writes the L1 rescale's per-row sums: ``[n, rows, 2]``, or
    ``[n, 0, 2]`` for none."""
    return np.empty((n, rows if sums else 0, 2), np.float64)


def random_masks(base, fts, block_keys, block_rows: int, density, sums: bool = True, row0: int = 0):
    """DARE's keep masks, drawn as ``bernoulli`` draws them (``block_keys[i]``: model
    ``i``'s draw-block keys, ``[blocks, 2]`` uint32, None: it keeps everything;
    ``block_rows``: leading rows of ``base`` per draw block), and the L1
    rescale's sums.  ``base`` and ``fts`` may be a part of the tensor drawn: the
    rows of its ``_draw_view`` from ``row0`` on, ``block_keys`` those of the
    blocks they lie in.  Returns ``(masks, sums)``: ``Masks`` over ``_draw_view``,
    and per row ``sum |d|`` and ``sum |d|`` over the kept entries, ``[n, rows, 2]``
    float64 (each a function of its row alone; None unless ``sums``)."""
    b, views, keys, p, rows_per_block = _draw_args(base, fts, block_keys, block_rows, density)
    masks = _masks_out(len(fts), b.shape)
    out = _sums_out(len(fts), b.shape[0], sums)
    with _LOCK:
        for i, view in enumerate(views):
            _loops().draw_masks(b, view, keys[i], rows_per_block, row0, p[i], masks.bits[i], out[i])
    return masks, out if sums else None


# Rows where DELLA's mask kernel needs more exact ranks than this (beyond those
# of ties) are ranked whole, in fewer each rank is counted over the row
# (``_loops.della_masks``).  A row costs about as much either way near 200.
DELLA_COUNT_MAX = 200


def della_masks(base, fts, block_keys, block_rows: int, tables, sums: bool = True, *,
                count_max: int = DELLA_COUNT_MAX):
    """DELLA's keep masks, ``uniform < tables[i][rank]`` (``below_table``'s, from
    ``row_ranks``' ranks, without storing them), and the L1 rescale's sums, as
    ``random_masks`` returns them over the ``[shape[0], -1]`` view.
    ``block_keys[i]``: model ``i``'s draw-block keys, None where it keeps
    everything; ``tables[i]``: its keep probability of each rank, non-decreasing;
    ``count_max``: see ``DELLA_COUNT_MAX`` (the masks do not depend on it).
    None where the draw's blocks are not rows of that view (a 1-D tensor drawn
    in blocks), or where rows hold 2**31 entries or more."""
    keys, blocks = _key_array(block_keys)
    if blocks > 1 and np.ndim(base) < 2:
        return None
    b = _host_view(base, rows_first=True)
    if b.shape[1] > ROW_MAX:  # the kernel's ranks are int32
        return None
    views = tuple(_host_view(f, rows_first=True) for f in fts)
    tab = np.full((len(fts), b.shape[1]), 2.0, np.float32)  # uniforms are < 1: everything kept
    for i, (k, t) in enumerate(zip(block_keys, tables)):
        if k is not None:
            tab[i] = np.asarray(t, np.float32)
    if (np.diff(tab, axis=1) < 0).any():
        raise ValueError("della_masks: a keep-probability table decreases with the rank")
    masks = _masks_out(len(fts), b.shape)
    out = _sums_out(len(fts), b.shape[0], sums)
    rows_per_block = block_rows if blocks > 1 else b.shape[0]
    with _LOCK:
        for i, view in enumerate(views):
            _loops().della_masks(b, view, keys[i], rows_per_block, 0, tab[i], _TINY, count_max, masks.bits[i], out[i])
    return masks, out if sums else None


def della_strip_masks(base, ft, block_keys, block_rows: int, table, *, row0: int, col0: int, row_len: int,
                      sums: bool = True, count_max: int = DELLA_COUNT_MAX):
    """DELLA's keep mask of a strip ``[n, w]`` of a matrix, ranked down its columns:
    ``uniform < table[rank]``, ``rank`` that of ``|ft - base|`` among the ``n``
    entries of its column, ties by row (``row_ranks``' ranks of the ``[1, n, w]``
    view, without storing them), and the uniforms ``below_table``'s for rows
    ``row0:`` and columns ``col0:`` of a draw of rows ``row_len`` long
    (``block_keys``: those of the draw's blocks).  Returns the mask bit-packed
    along each row (``[n, ceil(w / 8)]`` uint8, ``np.packbits``' layout) and,
    with ``sums``, per column ``sum |ft - base|`` and the sum over the entries it
    keeps (``[w, 2]`` float64, summed as ``della_masks`` sums a row; else None).
    ``table``: non-decreasing, ``n`` long; ``n < 2**31``."""
    b, f = (_as_2d(np.ascontiguousarray(x), np.shape(x)) for x in (base, ft))
    n, w = b.shape
    table = np.asarray(table, np.float32)
    if table.shape != (n,) or (np.diff(table) < 0).any():
        raise ValueError(f"della_strip_masks: the keep-probability table must be {n} non-decreasing entries")
    if n > ROW_MAX:  # the kernel's ranks are int32
        raise ValueError(f"della_strip_masks: columns of {n} entries are longer than {ROW_MAX}")
    keys = _readonly(np.asarray(block_keys, np.uint32).reshape(-1, 2))
    bits = np.empty((n, -(-w // 8)), np.uint8)
    out = np.empty((w if sums else 0, 2), np.float64)
    with _LOCK:
        _loops().della_strip_masks(b, f, keys, block_rows, row0, col0, row_len, table, _TINY, count_max, bits, out)
    return bits, out if sums else None


def random_merge(base, fts, weights, *, block_keys=None, block_rows: int = 0, row0: int = 0, density=None, masks=None,
                 scale, consensus, vote_on, normalize, divide_by, lam, out_dtype):
    """DARE's task-vector merge pass, merged as ``cut_merge`` merges.

    The keep masks are drawn inline (``block_keys``, ``block_rows``, ``row0`` and
    ``density`` as for ``random_masks``; none is stored), or read from
    ``masks`` (``random_masks``' ``Masks``).  A kept delta is multiplied by
    ``scale[i]``: ``1 / p`` for the inverse rescale (XLA divides by a scalar
    so, by its float32 reciprocal), the L1 rescale's factor, or 1.  The options are ``consensus.disjoint_sum``'s.
    Returns ``(leaf, flags)``: the merged leaf as NumPy (``out_dtype``: bf16 or
    float32) and per row 1 where its inputs hold a non-zero magnitude below
    2**-32, 2 where a difference is NaN/Inf.  Without NaN/Inf, the leaf is
    XLA's bit for bit but at the entries ``tiny_entries`` lists in the rows
    flagged 1 (``cut_merge`` says why).  None where weights or
    ``lam`` are outside [2**-16, 2**16] (other than 0).
    """
    if not all(_safe_scale(float(w)) for w in weights) or not _safe_scale(float(lam)):
        return None
    n = len(fts)
    drawn = masks is None
    if drawn:
        b, views, keys, p, rows_per_block = _draw_args(base, fts, block_keys, block_rows, density)
        bits = np.zeros((n, 1, 1), np.uint8)
    else:
        shape = (masks.bits.shape[1], masks.cols)  # the masks' view: flat order is the same in any 2-D view
        b = _as_2d(base, shape)
        views = tuple(_as_2d(f, shape) for f in fts)
        bits = masks.bits
        keys, p, rows_per_block, row0 = np.zeros((n, 1, 2), np.uint32), np.ones(n, np.float32), b.shape[0], 0
    w, dw, inv_div, out = _mix_inputs(weights, consensus, divide_by, b.shape, out_dtype)
    flags = np.zeros(b.shape[0], np.uint8)
    gen = _generated()
    mode = gen.merge_mode({None: 0, "sum": 1, "count": 2}[consensus], bool(normalize), float(lam) == 1.0,
                          vote_on == "raw", False, all(float(x) == 1.0 for x in weights))
    with _LOCK:
        gen.random_merge(n, mode, drawn)(b, views, keys, rows_per_block, row0, p, bits, np.asarray(scale, np.float32), w,
                                         dw, inv_div, np.float32(lam), out, flags)
    return out.view(np.dtype(out_dtype)).reshape(np.shape(base)), flags


def numba_threads() -> int:
    return _loops().numba.get_num_threads()


def random_ok(key=None) -> bool:
    """Whether draws from ``key`` (None: a key of the default implementation) can be
    made here bit for bit as JAX makes them: a threefry2x32 key, with
    ``jax_threefry_partitionable`` on (JAX's default)."""
    if not _has_numba() or not jax.config.jax_threefry_partitionable:
        return False
    if key is None:
        return jax.config.jax_default_prng_impl == "threefry2x32"
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return jax.config.jax_default_prng_impl == "threefry2x32" and key.shape == (2,)


def _draw(kernel, block_keys, block_rows: int, row0: int, shape, out_dtype, *args):
    rows = shape[0] if shape else 1
    out = aligned_empty((rows, math.prod(shape[1:]) if shape else 1), out_dtype)
    keys = _readonly(np.asarray(block_keys, np.uint32).reshape(-1, 2))
    with _LOCK:
        kernel(keys, block_rows, row0, *args, out)
    return out.reshape(shape)


def bernoulli(block_keys, block_rows: int, p: float, shape, row0: int = 0) -> np.ndarray:
    """``sparsify.blocked_draw(bernoulli(p), key, shape)``, bit for bit, given the raw
    data of each block's key (``[blocks, 2]`` uint32) and the rows per block; or
    rows ``row0:row0 + shape[0]`` of such a draw (``block_keys``: those of the
    blocks they lie in, the first holding row ``row0``)."""
    return _draw(_loops().bernoulli_blocks, block_keys, block_rows, row0, shape, np.bool_, np.float32(p))


def below_table(block_keys, block_rows: int, ranks: np.ndarray, table, row0: int = 0, split: int = 1, *,
                col0: int = 0, row_len: int | None = None) -> np.ndarray:
    """``uniform < table[ranks]`` over ``ranks``' 2-D shape, uniforms drawn as in ``bernoulli``:
    DELLA's keep mask from each rank's keep probability, without materialising either.
    ``split``: each row drawn as that many rows of equal length (the same bits; a
    row for each thread where ``ranks`` has few long rows).  ``col0``, ``row_len``:
    ``ranks`` is columns ``col0:`` of rows of the draw ``row_len`` long (default:
    its own rows)."""
    table = np.asarray(table, np.float32)
    r = ranks.reshape(ranks.shape[0] * split, -1)
    if (col0 or row_len is not None) and split != 1:
        raise ValueError("below_table: a strip of columns (col0, row_len) is drawn with split=1")
    out = _draw(_loops().below_table_blocks, block_keys, block_rows * split, row0 * split, r.shape, np.bool_,
                int(col0), int(r.shape[1] if row_len is None else row_len), r, table)
    return out.reshape(ranks.shape)


def _warm_trims(x, sparsify: str, n_models: int) -> None:
    """Load the counting and merge passes of an ``n_models`` TIES or breadcrumbs merge
    (the recipe's default options) and run them once on ``x``."""
    pair_counts(x, x, np.float32(0), np.float32(0))
    if n_models:
        twice = sparsify == "magnitude_outliers"
        _generated().probe_counts(tuple(i for i in range(n_models) for _ in range(1 + twice)))
        _generated().cut_merge(n_models, _generated().merge_mode(0 if twice else 1, not twice, True, has_top=twice,
                                                                 unit_weights=True))


_WARM = {  # sparsifier -> a tiny call that loads its kernels
    "magnitude": lambda x, n: _warm_trims(x, "magnitude", n),
    "magnitude_outliers": lambda x, n: _warm_trims(x, "magnitude_outliers", n),
    "random": lambda x, n: bernoulli(np.zeros((1, 2), np.uint32), 1, 0.5, (1, 1)),
    "della": lambda x, n: della_masks(x, [x], [np.zeros((1, 2), np.uint32)], 1, [np.zeros(x.shape[-1], np.float32)]),
}


def warm_up(sparsify: str | None, dtype="bfloat16", n_models: int = 0) -> threading.Thread | None:
    """Load numba and the kernels ``sparsify`` needs in a background thread
    (for trims, those of an ``n_models`` merge too).

    numba's first call in a process loads its type registries and the cached
    machine code, and each generated kernel more; a streaming merge spends
    that time while reading its first tensors.  Returns the
    thread, or None when nothing is to be loaded.
    """
    if sparsify not in _WARM or str(jnp.dtype(dtype)) not in _DTYPES or not _has_numba():
        return None
    x = jnp.zeros((1, 8), dtype)  # the array types real calls pass
    thread = threading.Thread(target=_WARM[sparsify], args=(x, n_models), name="numba-warm-up", daemon=True)
    thread.start()
    return thread
