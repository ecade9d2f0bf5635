"""Interference analysis of task vectors: cosines, sign conflicts, norms, trimmed mass.

All functions work leaf by leaf (no flattened copy of the model) and return
plain Python/numpy numbers for tables.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.merging import sparsify, topk


def _f32(x):
    return jnp.asarray(x, jnp.float32)


@jax.jit
def _trim_leaf(x, k):
    """``x`` with its ``k`` largest magnitudes kept, ``0 < k < x.size``; ``k`` is traced,
    so one program serves every leaf of a shape, whatever the density."""
    mag = jnp.abs(_f32(x))
    return jnp.where(topk.keep_mask(mag, topk.kth_largest([mag], k)), x, 0)


@jax.jit
def _conflicts(xs):
    pos = sum((_f32(x) > 0).astype(jnp.int32) for x in xs)
    neg = sum((_f32(x) < 0).astype(jnp.int32) for x in xs)
    return jnp.sum((pos > 0) & (neg > 0))


@jax.jit
def _gram(xs):
    flat = jnp.stack([_f32(x).reshape(-1) for x in xs])
    return flat @ flat.T


@jax.jit
def _trim_global(leaves, k):
    mags = [jnp.abs(_f32(x)) for x in leaves]
    th = topk.kth_largest(mags, k)
    offs = topk.ties_before(mags, th)
    return [jnp.where(topk.keep_mask(m, th, o), x, 0) for m, o, x in zip(mags, offs, leaves)]


def norms(tv) -> dict:
    """L2 norm per leaf path and ``"total"``."""
    out = {}
    total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(tv)[0]:
        sq = float(jnp.sum(_f32(x) ** 2))
        out[jax.tree_util.keystr(path)] = sq**0.5
        total += sq
    out["total"] = total**0.5
    return out


def cosine_similarity(tvs: Sequence) -> np.ndarray:
    """``[N, N]`` pairwise cosine similarity of task vectors (over all leaves)."""
    leaves = [jax.tree.leaves(t) for t in tvs]
    n = len(tvs)
    gram = np.zeros((n, n))
    for j in range(len(leaves[0])):  # one leaf of every model at a time
        gram += np.asarray(_gram([ls[j] for ls in leaves]), np.float64)
    d = np.sqrt(np.maximum(np.diag(gram), 1e-30))
    return gram / d[:, None] / d[None, :]


def trim(tv, density: float, trim: str = "tensor"):
    """The task vector with only its top-``density`` magnitudes kept (per tensor or global)."""
    if density >= 1:
        return tv
    leaves, treedef = jax.tree.flatten(tv)
    if trim == "global":
        kept = _trim_global(leaves, sparsify.keep_count(density, sum(x.size for x in leaves)))
    else:
        kept = [_trim(x, sparsify.keep_count(density, x.size)) for x in leaves]
    return jax.tree.unflatten(treedef, kept)


def _trim(x, k: int):
    if k <= 0:
        return jnp.zeros_like(x)
    return x if k >= x.size else _trim_leaf(x, k)


def sign_conflicts(tvs: Sequence, density: float = 1.0, trim_mode: str = "tensor") -> dict:
    """Fraction of entries where the non-zero (trimmed) deltas disagree in sign.

    Returns ``{"per_leaf": {path: rate}, "overall": rate}``; an entry conflicts
    when at least one model pushes it up and another pushes it down.
    """
    tvs = [trim(t, density, trim_mode) for t in tvs]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tvs[0])[0]]
    leaves = [jax.tree.leaves(t) for t in tvs]
    per_leaf, conflicts, total = {}, 0, 0
    for j, path in enumerate(paths):
        xs = [ls[j] for ls in leaves]
        c = int(_conflicts(xs))
        per_leaf[path] = c / max(xs[0].size, 1)
        conflicts += c
        total += xs[0].size
    return {"per_leaf": per_leaf, "overall": conflicts / max(total, 1)}


def kept_fraction(tv, density: float, trim_mode: str = "tensor") -> dict:
    """What trimming to ``density`` keeps of a task vector: its L1 mass and L2 energy."""
    kept = trim(tv, density, trim_mode)
    l1 = sum(float(jnp.sum(jnp.abs(_f32(x)))) for x in jax.tree.leaves(tv))
    l1k = sum(float(jnp.sum(jnp.abs(_f32(x)))) for x in jax.tree.leaves(kept))
    l2 = sum(float(jnp.sum(_f32(x) ** 2)) for x in jax.tree.leaves(tv))
    l2k = sum(float(jnp.sum(_f32(x) ** 2)) for x in jax.tree.leaves(kept))
    return {"l1_mass": l1k / max(l1, 1e-30), "l2_energy": l2k / max(l2, 1e-30)}


@jax.jit
def _pair_signs(a, b):
    a, b = _f32(a), _f32(b)
    both = (a != 0) & (b != 0)
    return (jnp.sum(both), jnp.sum(both & ((a > 0) != (b > 0))), jnp.sum(a > 0), jnp.sum(a != 0),
            jnp.sum(b > 0), jnp.sum(b != 0))


def kept_sign_conflicts(tv_a, tv_b, density: float = 1.0, trim_mode: str = "tensor") -> dict:
    """Sign disagreement of two task vectors *among the entries both keep* after trimming.

    Returns ``{"overlap", "conflict_rate", "chance_overlap", "chance_conflict_rate"}``:

    * ``overlap``: entries kept by both / all entries;
    * ``conflict_rate``: entries of opposite sign / entries kept by both;
    * the two ``chance_`` figures are what independent vectors with the same
      kept fractions ``k_a, k_b`` and positive fractions ``p_a, p_b`` would
      give: ``k_a k_b`` and ``p_a (1 - p_b) + (1 - p_a) p_b`` (~0.5).

    ``sign_conflicts`` divides by *all* entries instead, where two independent
    vectors trimmed to 20% already score ``0.2 * 0.2 * 0.5 = 2%``.
    """
    a, b = trim(tv_a, density, trim_mode), trim(tv_b, density, trim_mode)
    sums = np.zeros(6)
    total = 0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        sums += np.asarray([float(s) for s in _pair_signs(x, y)])
        total += x.size
    both, conflicts, pos_a, kept_a, pos_b, kept_b = sums
    p_a, p_b = pos_a / max(kept_a, 1), pos_b / max(kept_b, 1)
    return {
        "overlap": both / max(total, 1),
        "conflict_rate": conflicts / max(both, 1),
        "chance_overlap": (kept_a / max(total, 1)) * (kept_b / max(total, 1)),
        "chance_conflict_rate": p_a * (1 - p_b) + (1 - p_a) * p_b,
    }


@jax.jit
def _discards(xs):
    xs = [_f32(x) for x in xs]
    elected = jnp.where(sum(xs) >= 0, 1.0, -1.0)  # consensus.elect_sign("sum"): a zero vote is +
    return jnp.stack([jnp.sum((x != 0) & (jnp.sign(x) != elected)) for x in xs]), jnp.stack([jnp.sum(x != 0) for x in xs])


def election_discards(tvs: Sequence, density: float, trim_mode: str = "tensor") -> list[float]:
    """TIES: per model, the fraction of its kept (trimmed) entries that the sign
    election discards, i.e. whose sign differs from the sign of the summed mass
    (equal weights, mergekit's and the paper's ``sum`` consensus)."""
    trimmed = [jax.tree.leaves(trim(t, density, trim_mode)) for t in tvs]
    dropped, kept = np.zeros(len(tvs)), np.zeros(len(tvs))
    for j in range(len(trimmed[0])):
        d, k = _discards([ls[j] for ls in trimmed])
        dropped += np.asarray(d, np.float64)
        kept += np.asarray(k, np.float64)
    return (dropped / np.maximum(kept, 1)).tolist()
