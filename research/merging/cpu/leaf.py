"""One leaf of an eager task-vector merge on the CPU: sparsifier state worked out
first (cuts, masks, rescale factors), then one merge pass.

Each model's state is a ``Kept``: what ``task_vectors.sparsify_leaf`` would
keep, given as a mask or as top-k cuts, and the rescale it would apply.  The
merge pass is ``task_vectors.mix`` over those kept deltas (an XLA program),
or, where they apply, the numba ``kernels.cut_merge`` (TIES, breadcrumbs) and
``kernels.random_merge`` (DARE, DELLA).  Those flush no subnormal, where
XLA:CPU flushes every one: the few entries where that can matter (an input
non-zero below 2**-32) are merged again by the XLA program (``patch_tiny``).
Each mask is drawn by its own call, so the random bits of all models are
never alive together.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from research.merging import sparsify, task_vectors, tree
from research.merging.cpu import kernels, search
from research.merging.cpu.search import NonFiniteInput

_SPARSIFIERS = ("magnitude", "magnitude_outliers", "random", "della")
_CUTS = ("magnitude", "magnitude_outliers")


class Kept(NamedTuple):
    """What one model keeps of one leaf: ``mask`` (a bool array, the leaf's shape) or
    ``cuts`` (``search.Cut``s: keep the first, minus the second if given); then the
    kept entries are divided by ``div`` and multiplied by ``mul`` (None: not).
    Trims with ``rescale`` restore the L1 norm inside the merge program."""

    mask: object = None
    cuts: tuple = ()
    mul: object = None
    div: object = None


def applies(opts, ref_leaf) -> bool:
    return (isinstance(opts, task_vectors.Options) and opts.sparsify in _SPARSIFIERS
            and not task_vectors.uses_global_trim(opts) and not isinstance(ref_leaf, jax.core.Tracer)
            and _on_cpu(ref_leaf))


def screens_inputs(opts) -> bool:
    """Every sparsifier here screens for NaN/Inf as it goes: the trims in their first
    counting pass, DARE and DELLA in their merge pass (a non-finite difference
    flags its row), and a leaf that takes neither pass by a screen of its own."""
    return opts.sparsify in _SPARSIFIERS


def _on_cpu(x) -> bool:
    """Host-prepared state pays off on XLA:CPU only; on an accelerator a host round
    trip per counting pass costs more than the in-graph search."""
    devices = x.devices() if isinstance(x, jax.Array) else jax.devices()
    return next(iter(devices)).platform == "cpu"


def _kept_delta(ft, base, kept: Kept, opts, at=None):
    tau = ft - base
    if kept.cuts:
        mag = jnp.abs(tau)
        mask = search.keep_mask_cut(mag, kept.cuts[0], at)
        if len(kept.cuts) > 1:
            mask = mask & ~search.keep_mask_cut(mag, kept.cuts[1], at)
    else:
        mask = kept.mask
    if mask is None:
        return tau
    out = jnp.where(mask, tau if kept.div is None else tau / kept.div, 0.0)
    if kept.mul is not None:
        out = out * kept.mul
    elif opts.rescale and opts.sparsify in _CUTS:
        out = out * sparsify.l1_factor(tau, out)
    return out


@functools.partial(jax.jit, static_argnames=("opts", "out_dtype"))
def _mix_jit(base, models, kept, at=None, *, opts, out_dtype):
    """The merge pass over the kept deltas.  ``at``: where ``base`` and ``models``
    hold some entries of the leaves (1-D), their ``(row, col)`` in the
    ``[rows, last]`` view, where cuts break their ties (masks in ``kept`` hold
    those entries too)."""
    base = base.astype(jnp.float32)
    deltas = [_kept_delta(m.astype(jnp.float32), base, k, opts, at) for m, k in zip(models, kept)]
    return task_vectors.mix(base, deltas, opts).astype(out_dtype)


# A leaf with more entries to merge again than this is merged whole by XLA.
PATCH_MAX = 1 << 14


def patch_tiny(leaf: np.ndarray, base, ms, flat, kept, opts) -> bool:
    """Merge again by the XLA program the entries at flat positions ``flat`` of a
    leaf a numba pass merged (those of ``kernels.tiny_entries``), and write
    them into ``leaf`` (NumPy, the leaves' shape).  ``kept[i]``: model ``i``'s
    ``Kept`` with cuts, or with its mask at those entries.  The entries are
    padded to a power of two (at least 256), so a merge compiles few
    programs.  Returns False, writing nothing, past ``PATCH_MAX`` entries.
    """
    m = len(flat)
    cols = np.shape(base)[-1] if np.ndim(base) else 1  # of the [rows, last] view, where cuts break ties
    if m > PATCH_MAX:
        return False
    size = max(256, 1 << (m - 1).bit_length())
    idx = np.zeros(size, np.int64)
    idx[:m] = flat
    pad = lambda a: np.pad(np.asarray(a), (0, size - m))
    kept = [k._replace(mask=pad(k.mask)) if k.mask is not None else k for k in kept]
    gather = lambda x: np.asarray(x).reshape(-1)[idx]
    at = (jnp.asarray(idx // cols, jnp.int32), jnp.asarray(idx % cols, jnp.int32))
    out = _mix_jit(gather(base), [gather(x) for x in ms], kept, at, opts=opts, out_dtype=leaf.dtype)
    leaf.flat[flat] = np.asarray(out)[:m]
    return True


@functools.partial(jax.jit, static_argnames=("density", "shape"))
def _dare_mask_jit(key, density: float, shape):
    return sparsify.dare_mask(key, density, shape)


@jax.jit
def _l1_factor_jit(ft, base, mask):
    """The L1 rescale factor of a DARE or DELLA keep mask (the leaf's entries in order,
    in any shape: its sparsifier's view)."""
    tau = ft.astype(jnp.float32) - base.astype(jnp.float32)
    return sparsify.l1_factor(tau, jnp.where(mask.reshape(tau.shape), tau, 0.0))


# DELLA's ranks are handled here as ``[rows, n * cols]`` tables, laid out as the
# ``[shape[0], -1]`` rows its masks are drawn over: each entry's rank among the
# ``n`` along axis 1 of ``sparsify.della_view``.
def _as_view(ranks, n: int):
    return ranks.reshape(ranks.shape[0], n, -1)


def host_ranks(ft, base) -> np.ndarray:
    """``kernels.row_ranks`` in DELLA's view: each ``|ft - base|`` ranked along axis 1
    of ``sparsify.della_shape``, as a ``[rows, n * cols]`` table."""
    return kernels.row_ranks(ft, base, sparsify.della_shape(np.shape(ft)))


@jax.jit
def _della_ranks_jit(ft, base):
    view = sparsify.della_view(ft.astype(jnp.float32) - base.astype(jnp.float32))
    ranks = tree.replicate(sparsify.della_ranks(view), axes=[1, 2])  # a sharded last axis cannot join the rank axis
    return ranks.reshape(view.shape[0], -1)


@functools.partial(jax.jit, static_argnames=("n", "density", "epsilon"))
def _della_mask_jit(key, ranks, n, density, epsilon):
    return sparsify.della_mask(key, _as_view(ranks, n), density, epsilon).reshape(ranks.shape)


@functools.partial(jax.jit, static_argnames=("n", "density", "epsilon"))
def _della_probs_jit(ranks, n, density, epsilon):
    return sparsify.della_probs(_as_view(ranks, n), density, epsilon).reshape(ranks.shape)


@functools.partial(jax.jit, static_argnames=("n", "density", "epsilon"))
def _della_probs_table(n, density, epsilon):
    """DELLA's keep probability of each rank among ``n``, as the merge program computes it."""
    return sparsify.della_probs(jnp.arange(n, dtype=jnp.int32)[None, :, None], density, epsilon)[0, :, 0]


@functools.partial(jax.jit, static_argnames="blocks")
def _block_key_data(key, blocks):
    """Raw data of the keys ``sparsify.blocked_draw`` uses with ``key``."""
    if blocks == 1:
        return jax.random.key_data(key)[None]
    return jax.random.key_data(jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(blocks)))


def _host_keys(key, shape):
    """The draw-block keys (raw data) and rows per block of a draw over ``shape``."""
    blocks, rows = sparsify.draw_blocks(shape)
    return np.asarray(_block_key_data(key, blocks)), rows


def _dare_mask_on_host(key, shape, density: float):
    """DARE's keep mask, ``bernoulli(density)`` over ``shape``, drawn by the numba
    threefry (bit for bit JAX's)."""
    keys, rows = _host_keys(key, shape)
    return kernels.bernoulli(keys, rows, density, shape)


def table_split(shape) -> int:
    """How many rows ``kernels.below_table`` draws each row of DELLA's rank table for a
    tensor of ``shape`` as: the ``n`` of ``sparsify.della_shape`` where its rows
    hold several axis-1 runs (3-D and up), else 1."""
    _, n, cols = sparsify.della_shape(shape)
    return n if cols > 1 else 1


def _della_mask_on_host(key, ranks, n: int, density: float, epsilon: float, shape):
    """DELLA's keep mask from ``ranks`` (a table of ranks among ``n``, see
    ``host_ranks``, of a tensor of ``shape``), drawn as ``_dare_mask_on_host`` draws."""
    keys, rows = _host_keys(key, ranks.shape)
    return kernels.below_table(keys, rows, ranks, _della_probs_table(n, density, epsilon), split=table_split(shape))


def _screen(base, ms) -> None:
    """Raise ``NonFiniteInput`` if ``base`` or a model's leaf holds NaN/Inf."""
    if not tree.all_finite([base, *ms]):
        raise NonFiniteInput("NaN or Inf in a leaf")


def _cut(ft, base, k: int, screen: bool = False) -> search.Cut:
    """Keep exactly the ``k`` largest ``|ft - base|`` (0 <= k <= size)."""
    if 0 < k < ft.size:
        return search.topk_cut_delta_host(ft, base, k, screen)
    if screen:
        _screen(base, [ft])
    return search.trivial_cut(ft.size, k)


def _random_state(ft, base, opts, key, i: int) -> Kept:
    """DARE's or DELLA's keep mask for model ``i`` (drawn by numba where it can),
    with what its rescale needs."""
    density = opts.density[i]
    if density >= 1:
        return Kept()
    on_host = kernels.usable(ft, base)
    draw_on_host = on_host and kernels.random_ok(key)
    if opts.sparsify == "della":
        ranks = host_ranks(ft, base) if on_host else _della_ranks_jit(ft, base)
        eps, n = opts.epsilon[i], sparsify.della_shape(ft.shape)[1]
        mask = (_della_mask_on_host(key, ranks, n, density, eps, ft.shape) if draw_on_host
                else _della_mask_jit(key, ranks, n, density, eps))
        if opts.rescale and opts.rescale_mode == "inverse":
            return Kept(mask=jnp.reshape(mask, ft.shape), div=jnp.reshape(_della_probs_jit(ranks, n, density, eps), ft.shape))
    else:
        mask = _dare_mask_on_host(key, ft.shape, density) if draw_on_host else _dare_mask_jit(key, density, ft.shape)
        if opts.rescale and opts.rescale_mode == "inverse":
            return Kept(mask=mask, div=jnp.float32(density))
    mul = _l1_factor_jit(ft, base, mask) if opts.rescale else None
    return Kept(mask=jnp.reshape(mask, ft.shape), mul=mul)


def dare_factor(row_sums) -> np.float32:
    """``sparsify.l1_factor`` from ``kernels.random_masks``'s per-row sums (``[rows, 2]``,
    every row of the tensor): the totals are exactly rounded sums of the rows', so
    they do not depend on how the rows were split into blocks."""
    before, after = math.fsum(row_sums[:, 0]), math.fsum(row_sums[:, 1])
    return np.float32(before / after) if before >= 1e-7 and after >= 1e-7 else np.float32(1.0)


def dare_applies(opts, base, ms, out_dtype) -> bool:
    """Whether ``dare_merge`` merges these leaves (else it returns None): DARE, or
    DELLA without the inverse rescale (whose divisor varies per entry)."""
    della = opts.sparsify == "della" and not (opts.rescale and opts.rescale_mode == "inverse")
    return ((opts.sparsify == "random" or della) and str(jnp.dtype(out_dtype)) in ("bfloat16", "float32")
            and kernels.scales_ok(opts.weight, opts.lam) and kernels.usable(base, *ms))


def random_masks(opts, base, ms, block_keys, block_rows: int, sums: bool = True, row0: int = 0):
    """DARE's or DELLA's keep masks of every model and the L1 rescale's per-row sums
    (``kernels.random_masks``, ``kernels.della_masks``; None unless ``sums``), or
    None where DELLA's kernel does not take the leaf: one that ranks along an
    axis 1 with more axes after it (the kernel ranks within rows), those of
    ``kernels.della_masks`` (a 1-D leaf over ``sparsify._MASK_BLOCK`` entries,
    drawn in blocks), and a part of a draw (``row0``: DARE's only)."""
    if opts.sparsify != "della":
        return kernels.random_masks(base, ms, block_keys, block_rows, opts.density, sums, row0)
    _, n, cols = sparsify.della_shape(np.shape(base))
    if cols > 1 or row0:
        return None
    tables = [None if k is None else _della_probs_table(n, d, e)
              for k, d, e in zip(block_keys, opts.density, opts.epsilon)]
    return kernels.della_masks(base, ms, block_keys, block_rows, tables, sums)


def dare_merge(base, ms, opts, block_keys, block_rows: int, out_dtype, factors=None, masks=None, screen=None,
               row0: int = 0):
    """DARE (``sparsify="random"``) or DELLA by the numba passes, or None where they
    do not apply (``dare_applies``; arrays off the host) or cannot match the XLA
    program (NaN/Inf: ``screen()`` is called first, to raise; more entries with
    tiny inputs than ``patch_tiny`` takes).

    ``block_keys[i]``: model ``i``'s draw-block keys (``_block_key_data``) for the
    rows of ``base``, blocks of ``block_rows``; ``base`` and ``ms`` may be rows
    ``row0:`` of the draw (``kernels.random_masks``).  DARE without the L1 rescale
    draws its masks inside the merge pass; otherwise the masks are drawn first
    (``random_masks``), with the sums the L1 rescale's factors need
    (``dare_factor``'s; ``factors``: given, for a tensor merged in blocks, and
    with them ``masks``, those ``random_masks`` drew for these rows, or None
    to draw them again).
    """
    if not dare_applies(opts, base, ms, out_dtype):
        return None
    out = str(jnp.dtype(out_dtype))
    keys = [None if d >= 1 else k for d, k in zip(opts.density, block_keys)]
    kw = dict(consensus=opts.consensus, vote_on=opts.vote_on, normalize=opts.normalize, divide_by=opts.divide_by,
              lam=opts.lam, out_dtype=out)
    l1 = opts.rescale and opts.rescale_mode == "l1"
    inline = not (l1 or opts.sparsify == "della")
    if inline:
        scale = [np.float32(1) / np.float32(d) if opts.rescale and k is not None else np.float32(1)
                 for d, k in zip(opts.density, keys)]
        res = kernels.random_merge(base, ms, opts.weight, block_keys=keys, block_rows=block_rows, row0=row0,
                                   density=opts.density, scale=scale, **kw)
        # as ``_random_state`` keeps them: the inverse rescale divides by the density
        rescaled = [dict(div=np.float32(d)) if opts.rescale else {} for d in opts.density]
    else:
        if masks is None:
            drawn = random_masks(opts, base, ms, keys, block_rows, sums=l1, row0=row0)
            if drawn is None:
                return None
            masks, sums = drawn
        if factors is None:
            factors = [dare_factor(sums[i]) if l1 and k is not None else np.float32(1.0) for i, k in enumerate(keys)]
        res = kernels.random_merge(base, ms, opts.weight, masks=masks, scale=factors, **kw)
        rescaled = [dict(mul=np.float32(f)) for f in factors]
    if res is None or not res[1].any():
        return None if res is None else res[0]
    leaf, flags = res
    if (flags & 2).any():  # NaN/Inf
        if screen is not None:
            screen()
    else:  # the entries with tiny inputs again, by XLA on the same masks
        if inline:
            masks, _ = kernels.random_masks(base, ms, keys, block_rows, opts.density, sums=False, row0=row0)
        shape = (masks.bits.shape[1], masks.cols)
        flat = kernels.tiny_entries(base, ms, np.flatnonzero(flags), shape)
        kept = [Kept() if k is None else Kept(mask=masks.at(i, flat), **rescaled[i]) for i, k in enumerate(keys)]
        if patch_tiny(leaf, base, ms, flat, kept, opts):
            return leaf
    if inline:
        return None  # the caller's XLA pass draws the masks again
    unpacked = masks.unpacked()  # the XLA pass, on the same masks and factors
    kept = [Kept() if k is None else Kept(mask=jnp.reshape(unpacked[i], np.shape(base)), **rescaled[i])
            for i, k in enumerate(keys)]
    return np.asarray(_mix_jit(base, ms, kept, opts=opts, out_dtype=jnp.dtype(out_dtype)))


def row_bits(mask, cols: int) -> np.ndarray:
    """A keep mask as the rows of ``kernels.Masks``: its ``[-1, cols]`` view's rows, bit-packed."""
    return np.packbits(np.asarray(mask).reshape(-1, cols), axis=-1)


def masks_merge(base, ms, opts, bits, factors, out_dtype, screen=None):
    """DELLA's merge pass by the numba pass (``dare_merge``) on masks drawn apart (each
    model's ``row_bits`` over ``[-1, last]``, None where it keeps every entry) and
    its L1 ``factors``, or None where that pass does not apply (``dare_applies``:
    not the inverse rescale) or cannot match the XLA program.  The streamed merge
    of a 3-D tensor takes it (``stream.chunked``), whose masks are kept bit-packed
    between its passes; an eager merge's XLA program on the unpacked masks is as
    fast."""
    if opts.sparsify != "della" or not dare_applies(opts, base, ms, out_dtype):
        return None
    cols = np.shape(base)[-1]
    every = np.full((np.size(base) // cols, -(-cols // 8)), 0xFF, np.uint8)
    masks = kernels.Masks(np.stack([every if b is None else b for b in bits]), cols)
    drawn = [None if b is None else True for b in bits]  # dare_merge asks only which models have masks
    return dare_merge(base, ms, opts, drawn, 1, out_dtype, factors, masks=masks, screen=screen)


def _dare_leaf(base, ms, opts, keys, out_dtype, screen: bool):
    if any(d < 1 and not kernels.random_ok(k) for d, k in zip(opts.density, keys)):
        return None
    blocks, rows = sparsify.draw_blocks(np.shape(base))
    block_keys = [np.asarray(_block_key_data(k, blocks)) if d < 1 else None for d, k in zip(opts.density, keys)]
    check = functools.partial(_screen, base, ms) if screen else None
    leaf = dare_merge(base, ms, opts, block_keys, rows, out_dtype, screen=check)
    return None if leaf is None else jax.device_put(leaf)


def _cuts_merge(base, ms, opts, out_dtype, screen: bool):
    """TIES/breadcrumbs: every model's cuts from one fused counting pass, then the
    numba merge pass where it applies.  Returns ``(leaf or None, states)``."""
    n = base.size
    fused = search.topk_cuts_host(base, ms, [task_vectors.trim_ks(opts, i, n) for i in range(len(ms))], screen)
    states = [Kept(cuts=tuple(cuts)) if cuts else Kept() for cuts in fused.cuts]
    leaf = cut_merge(base, ms, states, fused.finite, fused.tiny, opts, out_dtype)
    return (None if leaf is None else jax.device_put(leaf)), states


def cut_merge(base, ms, states, finite: bool, tiny, opts, out_dtype):
    """The numba merge pass of a trim (``kernels.cut_merge``) given every model's
    cuts (``states``, as ``Kept``), the entries with tiny inputs merged again
    by XLA (``tiny``: per row of the ``[rows, last]`` view, whether it holds
    some), or None where the XLA program must merge the whole leaf: NaN/Inf
    (``finite`` False), a rescale, another dtype."""
    out = str(jnp.dtype(out_dtype))
    if not finite or opts.rescale or out not in ("bfloat16", "float32"):
        return None
    n = base.size
    keep = [s.cuts[0] if s.cuts else search.trivial_cut(n, n) for s in states]  # no cut: keep everything
    top = [s.cuts[1] if len(s.cuts) > 1 else None for s in states]
    leaf = kernels.cut_merge(base, ms, keep, top, opts.weight, consensus=opts.consensus, vote_on=opts.vote_on,
                             normalize=opts.normalize, divide_by=opts.divide_by, lam=opts.lam, out_dtype=out)
    if leaf is not None and tiny.any():
        flat = kernels.tiny_entries(base, ms, np.flatnonzero(tiny))
        if not patch_tiny(leaf, base, ms, flat, states, opts):
            return None
    return leaf


def merge_leaf(base, ms, opts, keys, out_dtype, screen: bool = False):
    out_dtype = jnp.dtype(out_dtype or ms[0].dtype)
    if opts.sparsify in _CUTS:
        if kernels.usable(base, *ms):
            leaf, states = _cuts_merge(base, ms, opts, out_dtype, screen)
            if leaf is not None:
                return leaf
        else:
            states = []
            for i, m in enumerate(ms):
                cuts = tuple(_cut(m, base, k, screen) for k in task_vectors.trim_ks(opts, i, m.size))
                states.append(Kept(cuts=cuts) if cuts else Kept())
                if screen and not cuts:
                    _screen(base, [m])
    else:
        leaf = _dare_leaf(base, ms, opts, keys, out_dtype, screen)
        if leaf is not None:
            return leaf
        if screen:
            _screen(base, ms)
        states = [_random_state(m, base, opts, keys[i], i) for i, m in enumerate(ms)]
    return _mix_jit(base, ms, states, opts=opts, out_dtype=out_dtype)
