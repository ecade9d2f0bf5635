"""Sparsifiers: leaf functions that zero out part of one task vector.

Each takes a float32 delta ``tau`` (one tensor of one model) and returns the
sparsified delta, same shape and dtype.  They are the first stage of the
task-vector composition in ``task_vectors.py``; all are jittable.

=====================  ==========================================  =================
name                   keeps                                       papers / peers
=====================  ==========================================  =================
``magnitude``          the ``keep_count(density, n)`` largest      TIES (trim)
                       |tau|, at least one
``random``             each entry with probability ``density``     DARE
``magnitude_outliers`` drops the top ``gamma`` and the smallest,   Model Breadcrumbs
                       keeps ``int(density*n)``
``della``              entry with probability ``density - eps +    DELLA (MagPrune)
                       2*eps*rank/(n-1)`` (rank of |tau| along
                       dim 1, ``della_view``)
=====================  ==========================================  =================

Rescaling (``rescale=True``) restores the L1 norm of the tensor, as mergekit
does (``rescale_mode="l1"``).  The DARE and DELLA papers instead divide each
kept entry by its keep probability (``rescale_mode="inverse"``): 1/density for
DARE, 1/p_i for DELLA.  The two agree in expectation, not per draw.

The counts are mergekit's (release 0.1.5): TIES keeps at least one entry of a
non-empty tensor (``keep_count``); breadcrumbs keeps ``int(density*n)``, none
when that is 0.  Earlier mergekit releases kept nothing at all from
``magnitude_outliers`` when ``int(gamma*n) == 0`` (``indices[n_bot:-0]`` is
empty); here, as in 0.1.5, it then just drops the smallest entries.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from research.merging import topk
from research.merging.tree import like, replicate

RESCALE_MODES = ("l1", "inverse")


def l1_factor(tau, kept, eps: float = 1e-7):
    """The factor restoring ``kept``'s L1 norm to ``tau``'s (1 when either is ~0)."""
    before = jnp.sum(jnp.abs(tau))
    after = jnp.sum(jnp.abs(kept))
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0)


def _l1_rescale(tau, kept, eps: float = 1e-7):
    return kept * l1_factor(tau, kept, eps)


def keep_count(density: float, n: int) -> int:
    """How many of ``n`` entries TIES's trim keeps: ``int(density * n)``, but at least
    one of a non-empty tensor (as mergekit 0.1.5: a small tensor at a low density,
    a norm's 64 entries at 0.01, keeps its largest entry rather than none)."""
    return n if density >= 1 else min(n, max(1, int(density * n)))


def magnitude(tau, density: float, *, rescale: bool = False):
    """TIES's trim: keep the ``keep_count(density, tau.size)`` largest magnitudes
    (exactly; ties by flat index)."""
    if density >= 1:
        return tau
    kept = jnp.where(topk.topk_mask(tau, keep_count(density, tau.size)), tau, 0.0)
    return _l1_rescale(tau, kept) if rescale else kept


def magnitude_global(tau, threshold: topk.Threshold, tie_offset=0, *, rescale: bool = False):
    """TIES's trim over the whole model: keep what ``threshold`` keeps (found by
    ``topk.kth_largest`` over every leaf), ``tie_offset`` ties earlier in the model."""
    kept = jnp.where(topk.keep_mask(jnp.abs(tau), threshold, tie_offset), tau, 0.0)
    return _l1_rescale(tau, kept) if rescale else kept


_MASK_BLOCK = 1 << 22  # entries per independent draw


def draw_blocks(shape) -> tuple[int, int]:
    """``(blocks, rows per block)`` of ``blocked_draw`` for ``shape``; one block: one draw."""
    n = math.prod(shape)
    if n <= _MASK_BLOCK or not shape:
        return 1, shape[0] if shape else 1
    rows, per_row = shape[0], n // shape[0]
    rb = max(1, _MASK_BLOCK // max(per_row, 1))
    nb = -(-rows // rb)
    return nb, (rb if nb > 1 else rows)


def blocked_draw(draw, key, shape):
    """``draw(key, shape)``, in blocks of leading rows for tensors over ``_MASK_BLOCK`` entries.

    Block ``b`` is ``draw(fold_in(key, b), block_shape)``, one block at a time:
    threefry needs ~16 bytes of scratch per entry, 1 GB for a 65M-entry
    embedding if drawn at once.  Smaller tensors are one draw from ``key``.
    """
    nb, rb = draw_blocks(shape)
    if nb == 1:
        return draw(key, shape)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(nb))
    blocks = jax.lax.map(lambda k: draw(k, (rb, *shape[1:])), keys)
    return blocks.reshape((nb * rb, *shape[1:]))[: shape[0]]


def dare_mask(key, density: float, shape):
    """DARE's keep mask: each entry independently with probability ``density`` (drawn
    in blocks of rows for large tensors, see ``blocked_draw``)."""
    return blocked_draw(lambda k, s: jax.random.bernoulli(k, density, s), key, shape)


def random(tau, density: float, key, *, rescale: bool = False, rescale_mode: str = "l1"):
    """DARE: keep each entry with probability ``density`` (``dare_mask``)."""
    if density >= 1:
        return tau
    kept = jnp.where(dare_mask(key, density, tau.shape), tau, 0.0)
    if not rescale:
        return kept
    return kept / density if rescale_mode == "inverse" else _l1_rescale(tau, kept)


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' ``(n_top, n_keep_from_top)``: drop the ``n_top`` largest, keep up
    to the ``n_keep_from_top``-th largest, so ``int(density * n)`` entries stay."""
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top, n_bot = n_top + n_bot, 0
    return n_top, n - n_bot


def magnitude_outliers(tau, density: float, gamma: float = 0.01, *, rescale: bool = False):
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest magnitudes, then the
    smallest, keeping ``int(density * n)`` entries."""
    if density >= 1:
        return tau
    n_top, n_keep = outlier_counts(tau.size, density, gamma)
    kept = jnp.where(topk.topk_mask(tau, n_keep) & ~topk.topk_mask(tau, n_top), tau, 0.0)
    return _l1_rescale(tau, kept) if rescale else kept


def della_shape(shape) -> tuple[int, int, int]:
    """The view DELLA ranks in, ``[shape[0], shape[1], -1]`` (a 1-D tensor: ``[1, n, 1]``):
    each entry is ranked among those along its axis 1, as mergekit's
    ``della_magprune`` ranks along dim 1: within its row for a matrix, within
    ``x[i, :, j]`` for 3-D.  Flattening the last two axes gives the
    ``[shape[0], -1]`` rows the keep mask is drawn over."""
    if len(shape) < 2:
        return 1, math.prod(shape), 1
    return shape[0], shape[1], math.prod(shape[2:])


def della_view(x):
    """``x`` reshaped to ``della_shape(x.shape)`` (axes 2 and up unsharded first where
    there are several: a sharded minor axis cannot join the others)."""
    if x.ndim > 3:
        x = replicate(x, axes=list(range(2, x.ndim)))
    return x.reshape(della_shape(x.shape))


def della_ranks(view):
    """Rank of each ``|view|`` (``[rows, n, cols]``) among the ``n`` along axis 1
    (0 = smallest; ties by index)."""
    return jnp.argsort(jnp.argsort(jnp.abs(replicate(view, axes=[1])), axis=1), axis=1)


def della_probs(ranks, density: float, epsilon: float):
    """Keep probabilities, linear in the rank among the ``n = ranks.shape[1]``:
    ``density - epsilon`` (smallest) to ``density + epsilon`` (largest);
    ``density`` where ``n`` is 1 (where mergekit's ``(r - min) / (max - min)``
    is 0/0)."""
    n = ranks.shape[1]
    ranks = ranks.astype(jnp.float32)
    rank_norm = ranks / (n - 1) if n > 1 else jnp.full_like(ranks, 0.5)
    return (density - epsilon) + rank_norm * (2 * epsilon)


def della_mask(key, ranks, density: float, epsilon: float):
    """DELLA's keep mask over ``ranks``' ``[rows, n, cols]``: ``uniform < probs``, the
    uniforms drawn over ``[rows, n * cols]`` (in blocks of rows for large
    tensors, see ``blocked_draw``)."""
    rows, n, cols = ranks.shape
    u = blocked_draw(jax.random.uniform, key, (rows, n * cols)).reshape(ranks.shape)
    return u < della_probs(ranks, density, epsilon)


def della(tau, density: float, epsilon: float, key, *, rescale: bool = True, rescale_mode: str = "l1"):
    """DELLA MagPrune: keep probability grows linearly with the magnitude rank along dim 1.

    Ranks are taken in ``della_view(tau)`` (within each row of a matrix);
    probabilities go from ``density - epsilon`` (smallest) to ``density +
    epsilon`` (largest), see ``della_probs``.
    """
    if density >= 1:
        return tau
    view = replicate(della_view(tau), axes=[1])  # ranks need whole rank axes
    ranks = della_ranks(view)
    mask = della_mask(key, ranks, density, epsilon)
    if rescale and rescale_mode == "inverse":
        kept = jnp.where(mask, view / della_probs(ranks, density, epsilon), 0.0)
    else:
        kept = jnp.where(mask, view, 0.0)
        kept = _l1_rescale(view, kept) if rescale else kept
    return like(kept.reshape(tau.shape), tau)
