"""Merging a tensor in row blocks, so memory does not grow with the tensor's size.

A tensor too large to merge whole is read, merged and written in blocks of
leading rows.  What a method needs of the whole tensor is gathered first, by
streaming passes over the blocks; then each block is merged and written in
place:

====================  ===============================================  ============
method                whole-tensor statistics (passes)                 blocks equal
====================  ===============================================  ============
linear, task_arith-   none                                             bit for bit
metic, negate,
model_stock per row
ties, breadcrumbs     each model's exact top-k threshold from a        bit for bit
                      histogram of ``|tau|``'s float bits (1-2)
dare, della           none: masks are drawn per ``sparsify.blocked_    bit for bit
                      draw`` block, which the row blocks align to;
                      the L1 rescale's two sums (1)                    to float32
                                                                       summation
slerp, model_stock    norms and dot products (1)                       order
====================  ===============================================  ============

The top-k threshold is ``topk.Threshold``: keep ``|tau| > value`` and the
first ``ties`` entries equal to it in flat order.  Blocks are merged in row
order, each told how many ties earlier blocks held, exactly as
``sparsify.magnitude_global`` trims over several leaves.  The same selection
over every tensor of a model is the TIES paper's global trim (``trim:
global``): ``global_thresholds``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from research.merging.merge import merge as _merge, model_keys
from research.merging import methods, registry, sparsify, task_vectors, topk, tree
from research.merging.cpu import kernels
from research.merging.cpu.leaf import (Kept, _block_key_data, _della_probs_jit, _della_probs_table,
                                       _della_ranks_jit, _mix_jit)

CHUNK_ENTRIES = 1 << 23  # entries per model in one row block
MIN_ENTRIES = 1 << 24  # tensors above this many entries are merged in blocks


def block_rows(shape) -> int:
    """Rows per block: a multiple of ``sparsify.draw_blocks``' rows (so each block's
    random masks are whole draws), about ``CHUNK_ENTRIES`` entries."""
    per_row = math.prod(shape[1:])
    _, rb = sparsify.draw_blocks(shape)
    return rb * max(1, CHUNK_ENTRIES // max(1, rb * per_row))


def chunked(shape) -> bool:
    """Whether a tensor of ``shape`` is merged in row blocks (2-D and up: DELLA ranks
    within rows of the ``[shape[0], -1]`` view, which blocks of rows keep whole)."""
    return len(shape) >= 2 and math.prod(shape) > MIN_ENTRIES and shape[0] > 1


def spans(rows: int, step: int):
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


# --- exact top-k thresholds from histograms -------------------------------------------


def _level1(counts, k: int):
    """The level-1 bin holding the k-th largest and how many entries lie above it."""
    above = np.cumsum(counts[::-1])[::-1] - counts  # entries in higher bins
    b = int(np.nonzero((above < k) & (above + counts >= k))[0][-1])
    return b, int(above[b])


def select(read_pairs, n: int, k: int) -> topk.Threshold:
    """The threshold keeping exactly the ``k`` largest ``|ft - base|`` (ties by flat
    order) over the blocks that ``read_pairs()`` yields as ``(ft, base)``, ``n``
    entries in all.  One pass, or two when the k-th value's bin holds several values."""
    if k <= 0:
        return topk.Threshold(np.float32(np.inf), np.int32(0))
    if k >= n:
        return topk.Threshold(np.float32(-1.0), np.int32(0))
    h1 = kernels.MagnitudeHistogram()
    for ft, base in read_pairs():
        h1.add(ft, base)
    counts, lo, hi, bad = h1.arrays()
    if bad:
        raise tree.MergeError("NaN or Inf in ft - base")
    b, above = _level1(counts, k)
    if lo[b] == hi[b]:
        value_bits, greater = int(lo[b]), above
    else:
        h2 = kernels.MagnitudeHistogram(within=b)
        for ft, base in read_pairs():
            h2.add(ft, base)
        low_counts = h2.arrays()[0]
        low, greater = _level1(low_counts, k - above)
        value_bits, greater = (b << kernels.MagnitudeHistogram.LOW) | low, above + greater
    value = np.asarray(value_bits, np.uint32).view(np.float32)
    return topk.Threshold(np.float32(value), np.int32(k - greater))


# --- per-block programs ----------------------------------------------------------------


@jax.jit
def _trim_mask(ft, base, trims):
    """Per model, ``(mask, ties in this block)`` for ``trims = [(keep, offset), (top, offset)?]``
    (breadcrumbs drop its top cut); ties are the entries equal to each threshold."""
    mag = jnp.abs(ft.astype(jnp.float32) - base.astype(jnp.float32))
    masks, ties = [], []
    for th, off in trims:
        masks.append(topk.keep_mask(mag, th, off))
        ties.append(jnp.sum(mag == th.value, dtype=jnp.int32))
    mask = masks[0] if len(masks) == 1 else masks[0] & ~masks[1]
    return mask, ties


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


@functools.partial(jax.jit, static_argnames=("density", "rows", "cols", "uniform"))
def _draw_blocks(keys, density, rows, cols, uniform):
    """The XLA twin of the numba draws: each key's whole ``(rb, cols)`` draw, joined and
    cut to ``rows`` (as ``sparsify.blocked_draw`` cuts the last block)."""
    rb = -(-rows // keys.shape[0])
    draw = (lambda k: jax.random.uniform(k, (rb, cols))) if uniform else (
        lambda k: jax.random.bernoulli(k, density, (rb, cols)))
    return jax.lax.map(draw, keys).reshape(-1, cols)[:rows]


class Tensor:
    """One tensor of every input, read in row blocks: ``base`` (or None) and ``models``
    are callables ``(start, stop) -> array``."""

    def __init__(self, name, shape, base, models, rows=None):
        shape = tuple(shape) or (1,)  # a scalar reads as one row
        self.name, self.shape, self.base, self.models = name, shape, base, models
        self.rows = rows or self.shape[0]  # rows to merge (fewer where vocabularies differ)
        self.step = block_rows(self.shape)

    def spans(self):
        return spans(self.rows, self.step)

    def pairs(self, i):
        """Model ``i``'s blocks as ``(ft, base)`` pairs, in row order."""
        return lambda: ((self.models[i](*sp), self.base(*sp)) for sp in self.spans())

    def read(self, sp):
        base = None if self.base is None else self.base(*sp)
        return base, [m(*sp) for m in self.models]


def _screen(t: Tensor, base, models) -> None:
    names = ["base"] * (base is not None) + [f"model {i}" for i in range(len(models))]
    tree.check_finite([{t.name: x} for x in ([base] if base is not None else []) + models], names)


def merge_blocks(method: str, opts, t: Tensor, key, out_dtype, write) -> None:
    """Merge ``t`` block by block, handing each merged block to ``write(rows_array)``."""
    n = len(t.models)
    out_dtype = jnp.dtype(out_dtype)
    if method in ("linear", "task_arithmetic", "negate") or (method == "model_stock" and opts["filter_wise"]):
        for sp in t.spans():  # elementwise (or row-local): each block is a merge of its own
            base, models = t.read(sp)
            params = dict(opts.values) if isinstance(opts, registry.Settings) else _tv_params(opts)
            b = None if base is None or method == "linear" else {t.name: base}
            write(np.asarray(_merge(method, [{t.name: m} for m in models], base=b, out_dtype=out_dtype,
                                             **params)[t.name]))
        return
    if method in ("slerp", "model_stock"):
        return _merge_by_coefficients(method, opts, t, out_dtype, write)
    if opts.sparsify in ("magnitude", "magnitude_outliers"):
        trims = [trim_thresholds(t, i, opts) for i in range(n)]
        return merge_trimmed(opts, t, trims, out_dtype, write)
    return _merge_random(opts, t, model_keys(key, t.name, n), out_dtype, write)


def _tv_params(opts) -> dict:
    return {"weight": list(opts.weight), "lam": opts.lam, "normalize": opts.normalize, "divide_by": opts.divide_by}


def trim_thresholds(t: Tensor, i: int, opts) -> list:
    """Model ``i``'s thresholds for this tensor: TIES one, breadcrumbs ``(keep, top)``."""
    size = t.rows * math.prod(t.shape[1:])
    d = opts.density[i]
    if opts.sparsify == "magnitude":
        ks = [size if d >= 1 else int(d * size)]
    elif d >= 1:
        return []
    else:
        n_top, n_keep = sparsify.outlier_counts(size, d, opts.gamma[i])
        ks = [n_keep, n_top]
    try:
        return [select(t.pairs(i), size, k) for k in ks]
    except tree.MergeError:
        _screen_all(t)
        raise


def _screen_all(t: Tensor) -> None:
    for sp in t.spans():
        _screen(t, *t.read(sp))


def merge_trimmed(opts, t: Tensor, trims, out_dtype, write, offsets=None) -> list:
    """The merge pass of a trim: ``trims[i]`` model ``i``'s thresholds, ``offsets[i]`` the
    ties at each that come before this tensor (global trim).  Returns the offsets
    after it."""
    offsets = [list(o) for o in offsets] if offsets else [[0] * len(tr) for tr in trims]
    factors = _trim_l1_factors(t, trims, offsets) if opts.rescale else None
    for sp in t.spans():
        base, models = t.read(sp)
        kept = []
        for i, m in enumerate(models):
            if not trims[i]:
                kept.append(Kept())
                continue
            mask, ties = _trim_mask(m, base, [(th, np.int32(o)) for th, o in zip(trims[i], offsets[i])])
            offsets[i] = [o + int(c) for o, c in zip(offsets[i], ties)]
            kept.append(Kept(mask=mask, mul=None if factors is None else factors[i]))
        write(np.asarray(_mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype)))
    return offsets


def _no_rescale(opts):
    return dataclasses.replace(opts, rescale=False)  # the L1 factor comes with the masks


def _trim_l1_factors(t: Tensor, trims, offsets) -> list:
    sums = [[0.0, 0.0] for _ in trims]
    offs = [list(o) for o in offsets]
    for sp in t.spans():
        base, models = t.read(sp)
        for i, m in enumerate(models):
            if trims[i]:
                mask, ties = _trim_mask(m, base, [(th, np.int32(o)) for th, o in zip(trims[i], offs[i])])
                offs[i] = [o + int(c) for o, c in zip(offs[i], ties)]
                _add_sums(sums[i], _kept_sums(m, base, mask))
    return [_factor(s) for s in sums]


def _add_sums(acc, pair):
    acc[0] += float(pair[0])
    acc[1] += float(pair[1])


def _factor(s, eps: float = 1e-7):
    """``sparsify.l1_factor`` from streamed sums."""
    before, after = s
    return np.float32(before / after) if before >= eps and after >= eps else np.float32(1.0)


def _random_kept(opts, i, m, base, keys, b0, b1, rb):
    """Model ``i``'s DARE or DELLA keep mask for one block (draw blocks ``b0:b1``)."""
    d = opts.density[i]
    rows, cols = m.shape[0], math.prod(m.shape[1:])
    block_keys = keys[b0:b1]
    host = kernels.usable(m, base)
    if opts.sparsify == "della":
        ranks = kernels.row_ranks(m, base) if host else _della_ranks_jit(m, base)
        eps = opts.epsilon[i]
        if host:
            mask = kernels.below_table(block_keys, rb, ranks, _della_probs_table(cols, d, eps))
        else:
            u = _draw_blocks(jax.random.wrap_key_data(block_keys), d, rows, cols, True)
            mask = u < _della_probs_jit(ranks, d, eps)
        div = _della_probs_jit(ranks, d, eps) if opts.rescale_mode == "inverse" else None
    else:
        if host:
            mask = kernels.bernoulli(block_keys, rb, d, (rows, cols))
        else:
            mask = _draw_blocks(jax.random.wrap_key_data(block_keys), d, rows, cols, False)
        div = jnp.float32(d) if opts.rescale_mode == "inverse" else None
    mask = jnp.reshape(mask, m.shape)
    return mask, (None if div is None else jnp.reshape(div, m.shape) if jnp.ndim(div) else div)


def _merge_random(opts, t: Tensor, model_keys, out_dtype, write) -> None:
    n_draw, rb = sparsify.draw_blocks(t.shape)
    keys = [np.asarray(_block_key_data(k, n_draw)) for k in model_keys]
    per_block = t.step // rb
    l1 = opts.rescale and opts.rescale_mode == "l1"
    sums = [[0.0, 0.0] for _ in t.models]
    for pass_ in (["sums"] if l1 else []) + ["merge"]:
        for c, sp in enumerate(t.spans()):
            base, models = t.read(sp)
            if pass_ == "sums" or not l1:
                _screen(t, base, models)
            b0, b1 = c * per_block, (c + 1) * per_block
            kept = []
            for i, m in enumerate(models):
                if opts.density[i] >= 1:
                    kept.append(Kept())
                    continue
                mask, div = _random_kept(opts, i, m, base, keys[i], b0, b1, rb)
                if pass_ == "sums":
                    _add_sums(sums[i], _kept_sums(m, base, mask))
                    continue
                mul = _factor(sums[i]) if l1 else None
                kept.append(Kept(mask=mask, div=div if opts.rescale else None, mul=mul))
            if pass_ == "merge":
                write(np.asarray(_mix_jit(base, models, kept, opts=_no_rescale(opts), out_dtype=out_dtype)))


def _merge_by_coefficients(method, opts, t: Tensor, out_dtype, write) -> None:
    """SLERP and Model Stock: scalars from one pass of sums, then ``sum_i c_i theta_i``."""
    n = len(t.models)
    acc = None
    for sp in t.spans():
        base, models = t.read(sp)
        _screen(t, base, models)
        if method == "slerp":
            models = ([base] if base is not None else []) + models  # slerp(base, model) as merge() takes it
            parts = _slerp_sums(*(m.astype(np.float32) for m in models))
        else:
            g = _gram_block(models, base, tuple(range(len(t.shape))))
            parts = [float(g[i, j].reshape(())) for i in range(n) for j in range(i, n)]
        acc = parts if acc is None else [a + float(p) for a, p in zip(acc, parts)]
    if method == "slerp":
        s00, s11, s01 = acc
        eps = 1e-8
        dot = s01 / (max(math.sqrt(s00), eps) * max(math.sqrt(s11), eps))
        s0, s1 = (float(x) for x in methods.slerp_coefficients(opts["t"], jnp.float32(dot)))
        coefs, base_coef, use_base = [s0, s1], 0.0, False
    else:
        pairs = [(i, j) for i in range(n) for j in range(i, n)]
        gram = {p: jnp.float32(v) for p, v in zip(pairs, acc)}
        ratio = float(methods.model_stock_ratio(gram, n))
        coefs, base_coef, use_base = [ratio / n] * n, 1.0 - ratio, True
    for sp in t.spans():
        base, models = t.read(sp)
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
    n_total = sum(t.rows * math.prod(t.shape[1:]) for t in tensors)
    out = []
    for i in range(len(tensors[0].models)):
        k = int(opts.density[i] * n_total)
        pairs = lambda i=i: (pair for t in tensors for pair in t.pairs(i)())
        out.append(select(pairs, n_total, k))
    return out
