"""Merging a tensor in row blocks, so memory does not grow with the tensor's size.

A tensor too large to merge whole is read, merged and written in blocks of
leading rows: of the tensor itself, or of its ``[-1, shape[-1]]`` view, so
that a 3-D tensor (fused experts) is cut within its leading rows too
(``block_shape``), for the methods that see a tensor only in flat order
(``FLAT_METHODS``), Model Stock (with ``filter_wise``, a ratio per row of
that view), DARE where the numba threefry draws its masks
(``DRAWN_FLAT_METHODS``), and DELLA where its masks of a 3-D tensor come from
column strips of each expert (``STRIP_METHODS``, ``expert_masks``).  What a
method needs of the whole tensor is gathered first, by streaming passes over
the blocks; then each block is merged and written in place:

====================  ===============================================  ============
method                whole-tensor statistics (passes)                 blocks equal
====================  ===============================================  ============
linear, task_arith-   none                                             bit for bit
metic, negate, pass-
through, model_stock
per row
ties, breadcrumbs     each model's exact top-k threshold from a        bit for bit
                      histogram of ``|tau|``'s float bits (1-2)
dare, della           none: masks are drawn per ``sparsify.blocked_    bit for bit
                      draw`` block (a row block may start within one:  (XLA's path:
                      ``Tensor.draw_span``); the L1 rescale's two      the L1 to
                      sums (1), per row (``cpu.leaf.dare_factor``)     summation
                                                                       order)
della, 3-D in flat    each expert's masks and L1 sums, from strips of  masks bit for
blocks                its columns (1, ``expert_masks``); with the      bit, the L1 to
                      inverse rescale none: each expert merged strip   summation
                      by strip, its rows written at once               order
slerp, model_stock    norms and dot products (1)                       to summation
                                                                       order
====================  ===============================================  ============

The top-k threshold is ``topk.Threshold``: keep ``|tau| > value`` and the
first ``ties`` entries equal to it in flat order.  Blocks are merged in row
order, each told how many ties earlier blocks held, exactly as
``sparsify.magnitude_global`` trims over several leaves.  The same selection
over every tensor of a model is the TIES paper's global trim (``trim:
global``): ``global_thresholds``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from research.merging.merge import merge as _merge, model_keys
from research.merging import cpu, methods, registry, sparsify, task_vectors, topk, tree
from research.merging.cpu import kernels, search
from research.merging.stream import expert_masks
from research.merging.cpu.leaf import (Kept, _block_key_data, _della_probs_jit, _della_probs_table, _della_ranks_jit,
                                       _mix_jit, cut_merge, dare_applies, dare_factor, dare_merge, host_ranks,
                                       masks_merge, random_masks, row_bits, table_split)

# Sizes per model, at the dtype the tensors are merged in (the config's ``dtype``,
# else the checkpoint's).  A float32 merge of bf16 checkpoints reads them as
# they are (the merge widens each entry as it computes), in blocks sized for float32.
CHUNK_BYTES = 16 << 20  # of one row block
MIN_BYTES = 32 << 20  # tensors above this are merged in blocks
MASK_BUDGET = 256 << 20  # bytes of DARE and DELLA keep masks (one bit per entry) kept between a tensor's passes


# Methods whose merge of a tensor depends on its entries in flat order alone:
# their blocks may be rows of the tensor's [-1, shape[-1]] view, as may Model
# Stock's (with ``filter_wise``, one ratio per row of that view).  Not DELLA
# (it ranks along axis 1).
FLAT_METHODS = frozenset({"linear", "task_arithmetic", "negate", "passthrough", "slerp", "ties", "breadcrumbs",
                          "breadcrumbs_ties"})
# DARE's masks are drawn per block of leading rows, the counter of an entry its flat
# index in the block; where the numba threefry draws them (``draws_on_host``),
# from any row of the ``[-1, shape[-1]]`` view on, so its blocks may be flat too.
DRAWN_FLAT_METHODS = frozenset({"dare_linear", "dare_ties"})
# DELLA's masks of a 3-D tensor, where the numba kernels rank and draw them
# (``strips_on_host``), come from column strips of whole experts
# (``expert_masks``), so its blocks may be flat too; with the inverse rescale,
# which needs each entry's keep probability, each expert is merged by strips.
STRIP_METHODS = frozenset({"della", "della_linear"})


def draws_on_host(dtype) -> bool:
    """Whether DARE's masks for a tensor merged at ``dtype`` are drawn by the numba
    threefry (``cpu.kernels.bernoulli``) rather than by ``jax.random``."""
    return str(jnp.dtype(dtype)) in ("bfloat16", "float32") and kernels.random_ok()  # the keys are jax.random.key's


def strips_on_host(dtype) -> bool:
    """Whether DELLA's masks of a 3-D tensor merged at ``dtype`` can be made from column
    strips of its experts (``expert_masks``): by the CPU backend's numba kernels."""
    return cpu.ENABLED and draws_on_host(dtype)


def block_shape(shape, method: str, host_draws: bool = False) -> tuple:
    """The shape whose leading rows a tensor of ``shape`` is merged in blocks of:
    ``[prod(shape[:-1]), shape[-1]]`` for a tensor of 3 or more axes under a
    ``FLAT_METHODS`` method, Model Stock, a ``DRAWN_FLAT_METHODS`` one whose
    masks are drawn on the host (``host_draws``), or, for a 3-D tensor of rows
    longer than 1, a ``STRIP_METHODS`` one where ``host_draws`` means
    ``strips_on_host``; else ``shape``."""
    shape = tuple(shape)
    flat = (method in FLAT_METHODS or method == "model_stock" or (host_draws and method in DRAWN_FLAT_METHODS)
            or (host_draws and method in STRIP_METHODS and len(shape) == 3 and shape[-1] > 1))
    return (math.prod(shape[:-1]), shape[-1]) if len(shape) > 2 and flat else shape


def block_rows(shape, itemsize: int, aligned: bool = True) -> int:
    """Rows per block, about ``CHUNK_BYTES`` of entries of ``itemsize`` bytes: with
    ``aligned``, a multiple of ``sparsify.draw_blocks``' rows (so each block's
    random masks are whole draws)."""
    per_row = math.prod(shape[1:]) * itemsize
    _, rb = sparsify.draw_blocks(shape) if aligned else (1, 1)
    return rb * max(1, CHUNK_BYTES // max(1, rb * per_row))


def chunked(shape, itemsize: int) -> bool:
    """Whether a tensor of ``shape`` merged at ``itemsize`` bytes an entry is merged in
    row blocks (2-D and up: DELLA ranks along axis 1, ``sparsify.della_shape``,
    which blocks of rows keep whole)."""
    return len(shape) >= 2 and math.prod(shape) * itemsize > MIN_BYTES and shape[0] > 1


def spans(rows: int, step: int):
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


# --- exact top-k thresholds from histograms -------------------------------------------


def _level(counts, k: int):
    """The bin holding the k-th largest and how many entries lie in higher bins."""
    above = np.cumsum(counts[::-1])[::-1] - counts  # entries in higher bins
    b = int(np.nonzero((above < k) & (above + counts >= k))[0][-1])
    return b, int(above[b])


SAMPLE = 1 << 16  # entries per model in the sample that guesses each k-th value


def _guess(sample: np.ndarray, n: int, k: int) -> float:
    """The sample's estimate of the k-th largest of ``n`` (as ``cpu.search`` starts)."""
    rank = search._first_rank(len(sample), n, k)
    return float(np.partition(sample, rank)[rank])


def _probe(blocks, probes, guesses):
    """One counting pass: per probe ``(model, k)``, ``#[d > guess]`` and ``#[d >= guess]``."""
    below = [float(np.nextafter(np.float32(g), np.float32(-1))) if g > 0 else -1.0 for g in guesses]
    gt = np.zeros(len(probes), np.int64)
    ge = np.zeros(len(probes), np.int64)
    for base, fts in blocks():
        g, e, bad, _ = kernels.probe_counts(base, fts, [i for i, _, _ in probes], guesses, below)
        if bad.any():
            raise tree.MergeError("NaN or Inf in ft - base")
        gt += g.sum(1)
        ge += np.where(np.asarray(guesses)[:, None] > 0, e, kernels._host_view(base).shape[1]).sum(1)
    return gt, ge


def thresholds(blocks, n: int, ks, sample=None) -> list:
    """Per model ``i``, the ``topk.Threshold`` keeping exactly the ``k`` largest
    ``|ft_i - base|`` (ties by flat order) for each ``k`` in ``ks[i]``, over the
    blocks that ``blocks()`` yields as ``(base, [ft_i])``, ``n`` entries in all.

    ``sample`` (``[models, m]`` of ``|ft_i - base|``) guesses each k-th value;
    one counting pass checks the guess, which on low-precision deltas usually
    lands on the k-th value's tie plateau.  Otherwise two histogram passes
    find it: the high 15 float bits give its bin, the low 16 bits inside that
    bin the value (the bits of a non-negative float order like its value)."""
    out = [[None] * len(kl) for kl in ks]
    probes = []
    for i, kl in enumerate(ks):
        for j, k in enumerate(kl):
            if k <= 0:
                out[i][j] = topk.Threshold(np.float32(np.inf), np.int32(0))
            elif k >= n:
                out[i][j] = topk.Threshold(np.float32(-1.0), np.int32(0))
            else:
                probes.append((i, j, k))
    if probes and sample is not None:
        guesses = [_guess(sample[i], n, k) for i, _, k in probes]
        gt, ge = _probe(blocks, probes, guesses)
        left = []
        for p, (i, j, k) in enumerate(probes):
            if gt[p] < k <= ge[p]:  # the guess is the k-th value
                out[i][j] = topk.Threshold(np.float32(guesses[p]), np.int32(k - gt[p]))
            else:
                left.append((i, j, k))
        probes = left
    if not probes:
        return out
    models = sorted({i for i, _, _ in probes})
    h1 = kernels.MagnitudeHistograms(len(models))
    for base, fts in blocks():
        h1.add(base, [fts[i] for i in models])
    if h1.bad().any():
        raise tree.MergeError("NaN or Inf in ft - base")
    c1 = h1.counts()
    level1 = [_level(c1[models.index(i)], k) for i, _, k in probes]
    h2 = kernels.MagnitudeHistograms(len(probes), within=[b for b, _ in level1])
    for base, fts in blocks():
        h2.add(base, [fts[i] for i, _, _ in probes])
    c2 = h2.counts()
    for p, ((i, j, k), (b, above)) in enumerate(zip(probes, level1)):
        low, in_bin_above = _level(c2[p], k - above)
        value = np.asarray((b << kernels.MagnitudeHistograms.LOW) | low, np.uint32).view(np.float32)
        out[i][j] = topk.Threshold(np.float32(value), np.int32(k - above - in_bin_above))
    return out


def _block_cut(th, offset: int, ft, base, gt, ge):
    """``th`` over the whole tensor, with ``offset`` of its ties in earlier blocks, as a
    ``search.Cut`` of this block (``gt``/``ge``: per-row counts of ``> value`` and
    ``>= value``); returns ``(cut, ties in this block)``."""
    value = float(th.value)
    if not 0 <= value < np.inf:  # keep everything (-1) or nothing (inf)
        return search.Cut(np.float32(value), np.int32(0), np.int32(0)), 0
    per_row = ge - gt
    total = int(per_row.sum())
    need = int(th.ties) - offset
    rows = per_row.shape[0]
    if need <= 0:
        return search.Cut(np.float32(value), np.int32(0), np.int32(0)), total
    if need >= total:
        return search.Cut(np.float32(value), np.int32(rows), np.int32(0)), total
    cum = np.cumsum(per_row)
    row = int(np.searchsorted(cum, need, side="left"))
    left = need - (int(cum[row - 1]) if row else 0)
    eq = kernels.abs_delta_row(ft, base, row) == np.float32(value)
    col = int(np.flatnonzero(eq)[left - 1]) + 1
    return search.Cut(np.float32(value), np.int32(row), np.int32(col)), total


def _cuts(base, models, trims, offsets):
    """Every model's block-local cuts, from one counting pass over the block (numba):
    ``(cuts, offsets after, finite, tiny)``, ``tiny`` per row of the block (see
    ``kernels.probe_counts``).  A model without a threshold to count is probed
    at Inf, which counts nothing but screens it."""
    probes = [(i, j) for i, tr in enumerate(trims) for j, th in enumerate(tr) if 0 <= float(th.value) < np.inf]
    probes += [(i, None) for i in range(len(models)) if not any(p[0] == i for p in probes)]
    vals = [np.inf if j is None else float(trims[i][j].value) for i, j in probes]
    below = [float(np.nextafter(np.float32(v), np.float32(-1))) if v > 0 else -1.0 for v in vals]
    gt, ge, bad, tiny = kernels.probe_counts(base, models, [i for i, _ in probes], vals, below)
    finite = not bad.any()
    cols = kernels._host_view(base).shape[1]
    cuts, new = [[] for _ in trims], [list(o) for o in offsets]
    for i, tr in enumerate(trims):
        for j, th in enumerate(tr):
            if (i, j) in probes:
                p = probes.index((i, j))
                g, e = gt[p], (ge[p] if float(th.value) > 0 else np.full_like(gt[p], cols))
            else:
                g = e = None
            cut, ties = _block_cut(th, offsets[i][j], models[i], base, g, e)
            cuts[i].append(cut)
            new[i][j] += ties
    return cuts, new, finite, tiny


# --- per-block programs ----------------------------------------------------------------


@jax.jit
def _kept_sums(ft, base, mask):
    """``sum |tau|`` and ``sum |tau * mask|`` of one block, in float32."""
    tau = ft.astype(jnp.float32) - base.astype(jnp.float32)
    return jnp.sum(jnp.abs(tau)), jnp.sum(jnp.abs(jnp.where(mask, tau, 0.0)))


@functools.partial(jax.jit, static_argnames=("axes",))
def _gram_block(models, base, axes):
    cd = jnp.float32
    return methods._gram([m.astype(cd) - base.astype(cd) for m in models], axes)


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _combine(models, base, coefs, base_coef, *, out_dtype):
    out = sum(c * m.astype(jnp.float32) for c, m in zip(coefs, models))
    if base is not None:
        out = out + base_coef * base.astype(jnp.float32)
    return out.astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("density", "rows", "cols", "uniform", "rb"))
def _draw_blocks(keys, row0, density, rows, cols, uniform, rb):
    """The XLA twin of the numba draws: each key's whole ``(rb, cols)`` draw, joined, and
    rows ``row0:row0 + rows`` of them (``sparsify.blocked_draw``'s rows)."""
    draw = (lambda k: jax.random.uniform(k, (rb, cols))) if uniform else (
        lambda k: jax.random.bernoulli(k, density, (rb, cols)))
    return jax.lax.dynamic_slice_in_dim(jax.lax.map(draw, keys).reshape(-1, cols), row0, rows)


_READER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="block-reader")


def read_ahead(blocks):
    """``t.read(sp)`` for each ``(t, sp)`` of ``blocks``, in order, the next one read in
    a background thread meanwhile: at most two blocks are held at once."""
    it = iter(blocks)
    nxt = next(it, None)
    pending = _READER.submit(nxt[0].read, nxt[1]) if nxt is not None else None
    while pending is not None:
        block = pending.result()
        nxt = next(it, None)
        pending = _READER.submit(nxt[0].read, nxt[1]) if nxt is not None else None
        yield block
        del block


class Tensor:
    """One tensor of every input, read in row blocks: ``base`` (or None) and ``models``
    are callables ``(start, stop) -> array`` of rows of ``shape`` (``block_shape``'s),
    of entries of ``itemsize`` bytes.  ``own_shape``: the tensor's shape, where
    ``shape`` is its ``[-1, shape[-1]]`` view (random masks are drawn in blocks
    of its leading rows; blocks of the tensor's own rows are whole draws,
    ``block_rows``).  ``columns``: ``(base, models)`` callables ``(start, stop,
    c0, c1) -> array`` of columns ``c0:c1`` of rows of ``shape``, read apart
    from the rest of the rows (``expert_masks``), or None."""

    def __init__(self, name, shape, base, models, rows=None, *, itemsize: int, own_shape=None, columns=None):
        shape = tuple(shape) or (1,)  # a scalar reads as one row
        own = tuple(own_shape or shape)
        self.name, self.shape, self.base, self.models, self.own, self.columns = name, shape, base, models, own, columns
        self.itemsize = itemsize
        self.rows = rows or self.shape[0]  # rows to merge (fewer where vocabularies differ)
        self.size = self.rows * math.prod(self.shape[1:])  # entries to merge
        self.step = block_rows(self.shape, itemsize, aligned=own == shape)
        self.draws, rb = sparsify.draw_blocks(own)  # random masks: draw blocks, and rows of ``shape`` in each
        self.draw_rows = rb * (self.shape[0] // own[0])

    def spans(self):
        return spans(self.rows, self.step)

    def draw_span(self, sp) -> tuple[int, int, int]:
        """The draw blocks ``b0:b1`` that rows ``sp`` lie in, and the first row's index
        within block ``b0``."""
        b0 = sp[0] // self.draw_rows
        return b0, -(-sp[1] // self.draw_rows), sp[0] - b0 * self.draw_rows

    def read(self, sp):
        base = None if self.base is None else self.base(*sp)
        return base, [m(*sp) for m in self.models]

    def blocks(self):
        """``(base, models)`` of every block in row order, each read while the caller
        works on the one before (``read_ahead``)."""
        return read_ahead((self, sp) for sp in self.spans())

    def blocks_at(self):
        """``((base, models), span)`` of every block, as ``blocks`` reads them: a block
        is let go when the caller asks for the next.  (Not ``zip``: under
        ``enumerate``, a zip keeps the result tuple of two items back, and with it a block.)"""
        spans = iter(self.spans())
        for block in self.blocks():
            yield block, next(spans)
            del block

    def sample_rows(self, rows: int):
        """``rows`` rows spread evenly over the tensor, as one block ``(base, models)``."""
        picks = np.unique(np.linspace(0, self.rows - 1, max(1, min(rows, self.rows))).astype(int))
        parts = [self.read((r, r + 1)) for r in picks]
        base = np.concatenate([p[0] for p in parts])
        return base, [np.concatenate([p[1][i] for p in parts]) for i in range(len(self.models))]


def sample(tensors, size: int = SAMPLE) -> np.ndarray:
    """``[models, ~size]`` of ``|ft_i - base|`` from rows of every tensor, in proportion
    to the tensors' sizes (the guesses of ``thresholds``)."""
    total = sum(t.size for t in tensors)
    parts = []
    for t in tensors:
        cols = math.prod(t.shape[1:])
        want = size * t.rows * cols / total / cols  # rows of this tensor in the sample
        if want >= 0.5 or t is tensors[0]:
            base, models = t.sample_rows(max(1, round(want)))
            parts.append(kernels.sample_abs_deltas(base, models, base.size))
    return np.concatenate(parts, axis=1)


def _row_slices(x, itemsize: int) -> list:
    """``x``'s ``[-1, shape[-1]]`` view in slices of rows of about ``CHUNK_BYTES`` (one
    slice where ``x`` is no larger): what an XLA check or sum of a block is given
    at a time, as XLA copies each input it is given (a mapped block is not
    aligned for it to take as it is), and a block may be a whole expert."""
    v = np.reshape(x, (-1, np.shape(x)[-1]) if np.ndim(x) > 1 else (1, -1))
    step = max(1, CHUNK_BYTES // max(1, v.shape[1] * itemsize))
    return [v[a:b] for a, b in spans(v.shape[0], step)]


def _screen(t: Tensor, base, models) -> None:
    """Raise ``tree.MergeError`` naming the input whose block holds NaN or Inf."""
    names = ["base"] * (base is not None) + [f"model {i}" for i in range(len(models))]
    xs = ([base] if base is not None else []) + models
    itemsize = max(x.dtype.itemsize for x in xs)  # one slicing for all, so zip pairs every slice
    for part in zip(*(_row_slices(x, itemsize) for x in xs)):
        tree.check_finite([{t.name: x} for x in part], names)


def merge_blocks(method: str, opts, t: Tensor, key, out_dtype, write) -> None:
    """Merge ``t`` block by block, handing each merged block to ``write(rows_array)``."""
    n = len(t.models)
    out_dtype = jnp.dtype(out_dtype)
    if method in ("linear", "task_arithmetic", "negate", "passthrough") or (method == "model_stock"
                                                                           and opts["filter_wise"]):
        for base, models in t.blocks():  # elementwise (or row-local): each block is a merge of its own
            params = dict(opts.values) if isinstance(opts, registry.Settings) else _tv_params(opts)
            b = None if base is None or not registry.get(method).uses_base else {t.name: base}
            write(np.asarray(_merge(method, [{t.name: m} for m in models], base=b, out_dtype=out_dtype,
                                             **params)[t.name]))
        return
    if method in ("slerp", "model_stock"):
        return _merge_by_coefficients(method, opts, t, out_dtype, write)
    if opts.sparsify in ("magnitude", "magnitude_outliers"):
        return merge_trimmed(opts, t, tensor_thresholds(t, opts), out_dtype, write)
    return _merge_random(opts, t, model_keys(key, t.name, n), out_dtype, write)


def _tv_params(opts) -> dict:
    return {"weight": list(opts.weight), "lam": opts.lam, "normalize": opts.normalize, "divide_by": opts.divide_by}


def tensor_thresholds(t: Tensor, opts) -> list:
    """Every model's thresholds for this tensor (two streaming passes)."""
    try:
        return thresholds(t.blocks, t.size, [task_vectors.trim_ks(opts, i, t.size) for i in range(len(t.models))],
                          sample([t]))
    except tree.MergeError:
        _screen_all(t)
        raise


def _screen_all(t: Tensor) -> None:
    for base, models in t.blocks():
        _screen(t, base, models)


def _trimmed_blocks(t: Tensor, trims, offsets):
    """Each block with every model's cuts: ``(base, models, cuts, finite, tiny)``;
    ``offsets`` (ties before the block, per model and threshold) advance in place."""
    for base, models in t.blocks():
        cuts, offsets[:], finite, tiny = _cuts(base, models, trims, offsets)
        yield base, models, cuts, finite, tiny


@jax.jit
def _cut_sums(ft, base, cuts):
    tau = ft.astype(jnp.float32) - base.astype(jnp.float32)
    mag = jnp.abs(tau)
    mask = search.keep_mask_cut(mag, cuts[0])
    if len(cuts) > 1:
        mask = mask & ~search.keep_mask_cut(mag, cuts[1])
    return jnp.sum(mag), jnp.sum(jnp.where(mask, mag, 0.0))


def merge_trimmed(opts, t: Tensor, trims, out_dtype, write, offsets=None) -> list:
    """The merge pass of a trim: ``trims[i]`` model ``i``'s thresholds, ``offsets[i]`` the
    ties at each that come before this tensor (global trim).  Each block is merged
    by the numba pass where it applies, else by XLA.  Returns the offsets after it."""
    offsets = [list(o) for o in offsets] if offsets else [[0] * len(tr) for tr in trims]
    factors = None
    if opts.rescale:  # the L1 factor of each model's whole trimmed tensor, streamed
        sums = [[0.0, 0.0] for _ in trims]
        for base, models, cuts, _, _ in _trimmed_blocks(t, trims, [list(o) for o in offsets]):
            for i, m in enumerate(models):
                if cuts[i]:
                    _add_sums(sums[i], _cut_sums(m, base, tuple(cuts[i])))
        factors = [_factor(x) for x in sums]
    for base, models, cuts, finite, tiny in _trimmed_blocks(t, trims, offsets):
        kept = [Kept(cuts=tuple(c), mul=None if factors is None else factors[i]) if c else Kept()
                for i, c in enumerate(cuts)]
        leaf = cut_merge(base, models, kept, finite, tiny, opts, out_dtype)
        if leaf is None:
            if not finite:
                _screen(t, base, models)
            leaf = _mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype)
        write(np.asarray(leaf))
    return offsets


def _no_rescale(opts):
    return dataclasses.replace(opts, rescale=False)  # the L1 factor comes with the masks


def _add_sums(acc, pair):
    acc[0] += float(pair[0])
    acc[1] += float(pair[1])


def _factor(s, eps: float = 1e-7):
    """``sparsify.l1_factor`` from streamed sums."""
    before, after = s
    return np.float32(before / after) if before >= eps and after >= eps else np.float32(1.0)


def _random_kept(opts, i, m, base, block_keys, rb: int, row0: int):
    """Model ``i``'s DARE or DELLA keep mask for one block: rows ``row0:`` of draws in
    blocks of ``rb`` of its leading rows, from ``block_keys``."""
    d = opts.density[i]
    rows, cols = m.shape[0], math.prod(m.shape[1:])
    host = kernels.usable(m, base)
    if opts.sparsify == "della":
        ranks = host_ranks(m, base) if host else _della_ranks_jit(m, base)
        eps, n = opts.epsilon[i], sparsify.della_shape(m.shape)[1]
        if host:
            mask = kernels.below_table(block_keys, rb, ranks, _della_probs_table(n, d, eps), row0, table_split(m.shape))
        else:
            u = _draw_blocks(jax.random.wrap_key_data(block_keys), row0, d, rows, cols, True, rb)
            mask = u < _della_probs_jit(ranks, n, d, eps)
        div = _della_probs_jit(ranks, n, d, eps) if opts.rescale_mode == "inverse" else None
    else:
        if host:
            mask = kernels.bernoulli(block_keys, rb, d, (rows, cols), row0)
        else:
            mask = _draw_blocks(jax.random.wrap_key_data(block_keys), row0, d, rows, cols, False, rb)
        div = jnp.float32(d) if opts.rescale_mode == "inverse" else None
    mask = mask.reshape(m.shape)  # a NumPy mask stays one
    return mask, (None if div is None else jnp.reshape(div, m.shape) if jnp.ndim(div) else div)


def _block_kept_sums(m, base, mask) -> list:
    """``_kept_sums`` of one block, its ``_row_slices`` summed apart and added in float64."""
    acc = [0.0, 0.0]
    for parts in zip(*(_row_slices(x, m.dtype.itemsize) for x in (m, base, mask))):
        _add_sums(acc, _kept_sums(*parts))
    return acc


def _masks_fit(t: Tensor) -> bool:
    """Whether every model's keep mask of ``t``, one bit an entry, fits ``MASK_BUDGET``."""
    return t.size * len(t.models) <= 8 * MASK_BUDGET


def _span_keys(t: Tensor, keys, sp) -> tuple[list, int]:
    """Every model's keys of the draw blocks that rows ``sp`` lie in (None where the
    model keeps every entry), and the first row's index in the first of them."""
    b0, b1, row0 = t.draw_span(sp)
    return [None if k is None else k[b0:b1] for k in keys], row0


def _dare_blocks(opts, t: Tensor, keys, out_dtype, write) -> bool:
    """DARE or DELLA in row blocks by the numba passes (``cpu.leaf.dare_merge``); the L1
    rescale's factors from a first pass of per-row sums.  False, having written
    nothing, where the first block shows that the passes do not apply.  ``keys``:
    every model's draw-block keys, None where it keeps every entry."""
    factors = kept_masks = None
    if opts.rescale and opts.rescale_mode == "l1":
        rows = [[] for _ in t.models]
        # the masks (one bit an entry) kept for the merge pass where they fit MASK_BUDGET; else drawn again
        kept_masks = [] if _masks_fit(t) else None
        for (base, models), sp in t.blocks_at():
            block_keys, row0 = _span_keys(t, keys, sp)
            applies = dare_applies(opts, base, models, out_dtype)
            drawn = applies and random_masks(opts, base, models, block_keys, t.draw_rows, row0=row0)
            if not drawn:  # nothing written yet
                return False
            masks, sums = drawn
            if kept_masks is not None:
                kept_masks.append(masks)
            for i in range(len(models)):
                rows[i].append(sums[i])
            del masks
        factors = [dare_factor(np.concatenate(r)) if k is not None else np.float32(1.0) for r, k in zip(rows, keys)]
    for c, ((base, models), sp) in enumerate(t.blocks_at()):
        masks = None if kept_masks is None else kept_masks[c]
        block_keys, row0 = _span_keys(t, keys, sp)
        leaf = dare_merge(base, models, opts, block_keys, t.draw_rows, out_dtype, factors, masks=masks,
                          screen=lambda: _screen(t, base, models), row0=row0)
        if leaf is None:
            if c == 0:
                return False
            kept = []  # too many tiny magnitudes in this block to merge again apart: the XLA pass on the same masks
            for i, (m, k) in enumerate(zip(models, block_keys)):
                mask, div = (None, None) if k is None else _random_kept(opts, i, m, base, k, t.draw_rows, row0)
                kept.append(Kept() if k is None else Kept(mask=mask, div=div if opts.rescale else None))
            leaf = np.asarray(_mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype))
        write(leaf)
    return True


def _merge_random(opts, t: Tensor, model_keys, out_dtype, write) -> None:
    """DARE or DELLA over ``t``'s blocks: by the numba passes (``_dare_blocks``) where they
    apply; else each model's mask drawn per block (``_random_kept``), the L1
    factors from a first pass of sums, and the merge pass (``_merge_on_masks``)."""
    # a model with density >= 1 keeps every entry: it draws no mask (DELLA's table would drop some)
    keys = [np.asarray(_block_key_data(k, t.draws)) if d < 1 else None for k, d in zip(model_keys, opts.density)]
    l1 = opts.rescale and opts.rescale_mode == "l1"
    if expert_masks.applies(t.shape, t.own, opts.sparsify):
        if opts.rescale and opts.rescale_mode == "inverse":
            return _merge_expert_strips_inverse(opts, t, keys, out_dtype, write)
        return _merge_expert_strips(opts, t, keys, out_dtype, write)
    if all(kernels.random_ok(k) for k in model_keys) and _dare_blocks(opts, t, keys, out_dtype, write):
        return
    cols = t.shape[-1]
    sums = [[0.0, 0.0] for _ in t.models]
    # the L1 pass's masks, one bit an entry, kept for the merge pass where they fit MASK_BUDGET
    kept_bits = {} if l1 and _masks_fit(t) else None
    for pass_ in (["sums"] if l1 else []) + ["merge"]:
        for c, ((base, models), sp) in enumerate(t.blocks_at()):
            block_keys, row0 = _span_keys(t, keys, sp)
            if pass_ == "sums" or not l1:
                _screen(t, base, models)
            bits, divs = [None] * len(models), [None] * len(models)  # the merge pass's masks, as Masks rows
            for i, m in enumerate(models):
                if block_keys[i] is None:
                    continue
                if pass_ == "merge" and kept_bits is not None:
                    bits[i] = kept_bits.pop((c, i))
                    continue
                mask, divs[i] = _random_kept(opts, i, m, base, block_keys[i], t.draw_rows, row0)
                if pass_ == "sums":
                    _add_sums(sums[i], _block_kept_sums(m, base, mask))
                if pass_ == "merge" or kept_bits is not None:
                    bits[i] = row_bits(mask, cols)
                if kept_bits is not None:
                    kept_bits[c, i] = bits[i]
            if pass_ == "merge":
                factors = [_factor(x) if l1 else np.float32(1.0) for x in sums]
                write(_merge_on_masks(opts, base, models, bits, divs, factors, out_dtype, lambda: _screen(t, base, models)))


def _merge_expert_strips(opts, t: Tensor, keys, out_dtype, write) -> None:
    """DELLA over a 3-D tensor in rows of its ``[-1, cols]`` view, each block's masks its
    rows of its experts' (``expert_masks``): with the L1 rescale, a first pass over
    the experts' column strips for its sums (the masks kept for the merge pass
    where they fit ``MASK_BUDGET``), then the merge pass over the blocks, which
    screens them."""
    l1 = opts.rescale and opts.rescale_mode == "l1"
    experts = expert_masks.ExpertMasks(opts, t, keys, CHUNK_BYTES, keep=l1 and _masks_fit(t))
    factors = [np.float32(1.0)] * len(t.models)
    if l1:
        factors = [np.float32(1.0) if s is None else dare_factor(s) for s in experts.l1_sums()]
    for (base, models), sp in t.blocks_at():
        bits = [None if k is None else experts.rows(i, sp) for i, k in enumerate(keys)]
        write(_merge_on_masks(opts, base, models, bits, [None] * len(models), factors, out_dtype,
                              lambda: _screen(t, base, models), screened=False))


def _merge_expert_strips_inverse(opts, t: Tensor, keys, out_dtype, write) -> None:
    """DELLA with the inverse rescale over a 3-D tensor: each entry kept is divided by its
    own keep probability, which bit masks do not carry, so each expert is merged
    strip by strip of its columns (every input's strip, each model's ranks, mask
    and divisors: ``expert_masks.strip_kept``) into its rows of the output,
    written whole (rows of the ``[-1, cols]`` view)."""
    experts, n, cols = t.own
    width = expert_masks.strip_width(n, cols, t.itemsize, CHUNK_BYTES)
    read_base, read_models = t.columns
    for e in range(experts):
        rows = (e * n, (e + 1) * n)
        out = np.empty((n, cols), out_dtype)
        for c0 in range(0, cols, width):
            c1 = min(c0 + width, cols)
            base = read_base(*rows, c0, c1)
            models = [read(*rows, c0, c1) for read in read_models]
            _screen(t, base, models)
            kept = [Kept() if k is None else expert_masks.strip_kept(opts, i, m, base, k, t.draw_rows, e * n, c0, cols)
                    for i, (m, k) in enumerate(zip(models, keys))]
            out[:, c0:c1] = np.asarray(_mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype))
            del base, models, kept
        write(out)
        del out


def _merge_on_masks(opts, base, models, bits, divs, factors, out_dtype, screen, screened: bool = True) -> np.ndarray:
    """One block's merge pass on each model's keep mask (``row_bits``; None: it keeps
    every entry), ``divs`` (the inverse rescale's) and L1 ``factors``: DELLA's by the
    numba pass (``cpu.leaf.masks_merge``, which calls ``screen()`` where it meets
    NaN or Inf) where it applies, else by the XLA program, after ``screen()``
    unless the block was ``screened`` already."""
    leaf = masks_merge(base, models, opts, bits, factors, out_dtype, screen)
    if leaf is not None:
        return np.asarray(leaf)
    if not screened:
        screen()
    cols = base.shape[-1]
    kept = [Kept() if b is None else Kept(
        mask=np.unpackbits(b, axis=-1, count=cols).view(bool).reshape(np.shape(m)),
        div=divs[i] if opts.rescale else None, mul=factors[i] if opts.rescale and opts.rescale_mode == "l1" else None)
        for i, (m, b) in enumerate(zip(models, bits))]
    return np.asarray(_mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype))


def _merge_by_coefficients(method, opts, t: Tensor, out_dtype, write) -> None:
    """SLERP and Model Stock: scalars from one pass of sums, then ``sum_i c_i theta_i``."""
    n = len(t.models)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    acc = None
    for base, models in t.blocks():
        _screen(t, base, models)
        if method == "slerp":
            models = ([base] if base is not None else []) + models  # slerp(base, model) as merge() takes it
            parts = _slerp_sums(*(m.astype(np.float32) for m in models))
        else:
            g = _gram_block(models, base, tuple(range(len(t.shape))))
            parts = [float(g[p].reshape(())) for p in pairs]
        acc = parts if acc is None else [x + p for x, p in zip(acc, parts)]
    if method == "slerp":
        s00, s11, s01 = acc
        eps = 1e-8
        dot = s01 / (max(math.sqrt(s00), eps) * max(math.sqrt(s11), eps))
        s0, s1 = (float(x) for x in methods.slerp_coefficients(opts["t"], jnp.float32(dot)))
        coefs, base_coef, use_base = [s0, s1], 0.0, False
    else:
        gram = {p: jnp.float32(v) for p, v in zip(pairs, acc)}
        ratio = float(methods.model_stock_ratio(gram, n))
        coefs, base_coef, use_base = [ratio / n] * n, 1.0 - ratio, True
    for base, models in t.blocks():
        if method == "slerp" and base is not None:
            models = [base] + models
        write(np.asarray(_combine(models, base if use_base else None, coefs, base_coef, out_dtype=out_dtype)))


@jax.jit
def _slerp_sums_jit(v0, v1):
    return jnp.sum(v0 * v0), jnp.sum(v1 * v1), jnp.sum(v0 * v1)


def _slerp_sums(v0, v1):
    return [float(x) for x in _slerp_sums_jit(v0, v1)]


# --- the TIES paper's global trim over a whole streamed model --------------------------


def global_thresholds(tensors, opts) -> list:
    """Per model, one ``topk.Threshold`` over every tensor of ``tensors`` (``Tensor``s, in
    the order their ties are counted): the global trim's exact top-k."""
    n_total = sum(t.size for t in tensors)
    blocks = lambda: read_ahead((t, sp) for t in tensors for sp in t.spans())
    ks = [[sparsify.keep_count(d, n_total)] for d in opts.density]
    return [tr[0] for tr in thresholds(blocks, n_total, ks, sample(tensors))]
