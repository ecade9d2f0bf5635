"""The task-vector family as one composition: sparsify -> sign consensus -> weighted,
normalised sum -> lambda.

    theta = theta_base + lam * disjoint_sum(sparsify(theta_i - theta_base))

Every named method is a setting of the four stages (the same table as
mergekit's ``generalized_task_arithmetic``):

===================  ======================  =========  =========  =======
method               sparsify                consensus  normalize  rescale
===================  ======================  =========  =========  =======
task_arithmetic      --                      --         no         no
ties                 magnitude               sum        yes        no
dare_linear          random                  --         no         yes
dare_ties            random                  sum        no         yes
breadcrumbs          magnitude_outliers      --         no         no
breadcrumbs_ties     magnitude_outliers      sum        no         no
della                della                   sum        yes        yes
della_linear         della                   --         no         yes
===================  ======================  =========  =========  =======

Published variants, each an option of ``merging.merge`` (defaults = mergekit):

=================  ============================  ===================================
option             default (mergekit)            alternative (who uses it)
=================  ============================  ===================================
``trim``           ``"tensor"``: k per tensor    ``"global"``: one threshold over the
                                                 whole task vector (TIES paper,
                                                 FusionBench)
``consensus``      ``"sum"``: sign of the mass   ``"count"``: sign of the vote count
``vote_on``        ``"weighted"``: w_i * tau_i   ``"raw"``: tau_i, weights applied
                                                 after the vote (peft)
``divide_by``      ``"weight"``: sum of w_i      ``"count"``: number of agreeing
                   over agreeing models          models (peft; the TIES paper's
                                                 mean when weights differ)
``rescale_mode``   ``"l1"``: restore L1 norm     ``"inverse"``: 1/density (DARE
                                                 paper), 1/p_i (DELLA paper)
=================  ============================  ===================================

The TIES paper's algorithm exactly is ``merge("ties", models, base=base,
density=k, weight=1.0, lam=lam, trim="global")``: trim each task vector to its
top-k% magnitudes over the whole model, elect the sign with the larger total
mass, take the mean over the agreeing entries, scale by lambda.  (When the
summed mass is exactly 0 the paper's code takes the sign of the whole model's
mass; we take ``+``, as mergekit does.)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp

from research.merging import consensus as cons
from research.merging import sparsify, topk


@dataclasses.dataclass(frozen=True)
class Recipe:
    sparsify: str | None
    consensus: str | None
    normalize: bool
    rescale: bool


RECIPES = {
    "task_arithmetic": Recipe(None, None, False, False),
    "ties": Recipe("magnitude", "sum", True, False),
    "dare_linear": Recipe("random", None, False, True),
    "dare_ties": Recipe("random", "sum", False, True),
    "breadcrumbs": Recipe("magnitude_outliers", None, False, False),
    "breadcrumbs_ties": Recipe("magnitude_outliers", "sum", False, False),
    "della": Recipe("della", "sum", True, True),
    "della_linear": Recipe("della", None, False, True),
}


@dataclasses.dataclass(frozen=True)
class Options:
    """Resolved, hashable settings of one task-vector merge (static under jit)."""

    sparsify: str | None
    consensus: str | None
    normalize: bool
    rescale: bool
    weight: tuple[float, ...]
    density: tuple[float, ...]
    gamma: tuple[float, ...]
    epsilon: tuple[float, ...]
    lam: float = 1.0
    trim: str = "tensor"
    vote_on: str = "weighted"
    divide_by: str = "weight"
    rescale_mode: str = "l1"


def sparsify_leaf(tau, i: int, opts: Options, key=None, global_trim=None):
    """Stage 1 for model ``i`` on one float32 delta tensor.  ``global_trim``: the
    model's ``(topk.Threshold, tie_offset)`` when trimming over the whole model."""
    d = opts.density[i]
    if opts.sparsify is None:
        return tau
    if opts.sparsify == "magnitude":
        if global_trim is not None:
            return sparsify.magnitude_global(tau, *global_trim, rescale=opts.rescale)
        return sparsify.magnitude(tau, d, rescale=opts.rescale)
    if opts.sparsify == "random":
        return sparsify.random(tau, d, key, rescale=opts.rescale, rescale_mode=opts.rescale_mode)
    if opts.sparsify == "magnitude_outliers":
        return sparsify.magnitude_outliers(tau, d, opts.gamma[i], rescale=opts.rescale)
    if opts.sparsify == "della":
        return sparsify.della(tau, d, opts.epsilon[i], key, rescale=opts.rescale, rescale_mode=opts.rescale_mode)
    raise ValueError(f"unknown sparsification {opts.sparsify!r}")


def mix(base, kept: Sequence, opts: Options):
    """Stages 2-4 on the sparsified deltas of one tensor: consensus, the (disjoint)
    weighted sum, lambda."""
    mixed = cons.disjoint_sum(
        kept,
        opts.weight,
        consensus=opts.consensus,
        vote_on=opts.vote_on,
        normalize=opts.normalize,
        divide_by=opts.divide_by,
    )
    return base + opts.lam * mixed if opts.lam != 1 else base + mixed


def merge_leaf(base, finetuned: Sequence, opts: Options, keys=None, global_trim=None):
    """All four stages on one tensor; returns the merged tensor in float32.

    ``keys``: one PRNG key per model (random sparsifiers); ``global_trim``: per
    model, ``(threshold, tie_offset)`` of ``global_thresholds`` (``trim="global"``).
    """
    base = base.astype(jnp.float32)
    kept = []
    for i, ft in enumerate(finetuned):
        tau = ft.astype(jnp.float32) - base
        kept.append(sparsify_leaf(tau, i, opts, None if keys is None else keys[i],
                                  None if global_trim is None else global_trim[i]))
    return mix(base, kept, opts)


def trim_ks(opts: Options, i: int, n: int) -> list[int]:
    """Model ``i``'s top-k sizes on a tensor of ``n`` entries: TIES one, breadcrumbs
    ``(keep, top)``, none when breadcrumbs trims nothing."""
    density = opts.density[i]
    if opts.sparsify == "magnitude":
        return [sparsify.keep_count(density, n)]
    if density >= 1:
        return []
    n_top, n_keep = sparsify.outlier_counts(n, density, opts.gamma[i])
    return [n_keep, n_top]


def uses_global_trim(opts) -> bool:
    return (isinstance(opts, Options) and opts.trim == "global" and opts.sparsify == "magnitude"
            and any(d < 1 for d in opts.density))


def global_keep_counts(base_leaves, opts: Options) -> tuple:
    """Per model: how many entries of the whole model the global trim keeps."""
    total = sum(b.size for b in base_leaves)
    return tuple(sparsify.keep_count(d, total) for d in opts.density)


def global_thresholds(base_leaves, model_leaves, ks):
    """Per model: one top-k threshold over every leaf (``ks[i]`` kept; may be traced),
    and each leaf's tie offset: ``(thresholds, offsets)``, ``offsets[i][j]`` for leaf ``j``."""
    ths, offsets = [], []
    for leaves, k in zip(model_leaves, ks):
        mags = [jnp.abs(x.astype(jnp.float32) - b.astype(jnp.float32)) for x, b in zip(leaves, base_leaves)]
        th = topk.kth_largest(mags, jnp.maximum(k, 1))
        none = jnp.asarray(k) <= 0  # keep nothing
        th = topk.Threshold(jnp.where(none, jnp.float32(jnp.inf), th.value), jnp.where(none, 0, th.ties))
        ths.append(th)
        offsets.append(topk.ties_before(mags, th))
    return ths, offsets
