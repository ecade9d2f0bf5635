"""Sign consensus and the (disjoint) weighted sum: stages 2 and 3 of the composition.

Given sparsified deltas ``tau_i`` and weights ``w_i`` of one tensor:

* **elect**: the majority sign per entry.  ``"sum"`` (mergekit, TIES paper):
  the sign of the summed mass, ``sign(sum_i w_i tau_i)``; ``"count"``: the
  sign of ``sum_i sign(w_i tau_i)``.  A zero vote counts as ``+``.  mergekit
  votes on the *weighted* deltas; peft votes on the raw ones
  (``vote_on="raw"``).
* **mask**: ``sign(w_i tau_i) == majority``; zeros never agree.
* **disjoint sum**: ``sum_i w_i tau_i m_i``; with ``normalize`` divided by
  ``sum_i w_i m_i`` (mergekit, ``divide_by="weight"``) or by ``sum_i m_i``
  (peft, the TIES paper's "mean over agreeing entries", ``divide_by="count"``).
  Where nothing agrees the divisor is 1.

Without consensus the sum runs over all models and ``normalize`` divides by
``sum_i w_i``.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp


def elect_sign(votes: Sequence, method: str = "sum"):
    """+1/-1 per entry: the majority sign of ``votes`` (a list of same-shape arrays)."""
    if method == "sum":
        total = sum(votes)
    elif method == "count":
        total = sum(jnp.sign(v) for v in votes)
    else:
        raise ValueError(f"consensus must be 'sum' or 'count', got {method!r}")
    return jnp.where(total >= 0, 1.0, -1.0)


def disjoint_sum(taus, weights, *, consensus=None, vote_on="weighted", normalize=False, divide_by="weight"):
    """Weighted (and sign-filtered) sum of ``taus``; see the module docstring."""
    weighted = [w * t for w, t in zip(weights, taus)]
    if consensus is None:
        mixed = sum(weighted)
        if normalize:
            div = sum(weights) if divide_by == "weight" else float(len(taus))
            mixed = mixed / (div if abs(div) >= 1e-8 else 1.0)
        return mixed
    majority = elect_sign(weighted if vote_on == "weighted" else list(taus), consensus)
    masks = [jnp.sign(wt) == majority for wt in weighted]
    mixed = sum(jnp.where(m, wt, 0.0) for m, wt in zip(masks, weighted))
    if normalize:
        if divide_by == "weight":
            div = sum(jnp.where(m, w, 0.0) for m, w in zip(masks, weights))
        else:
            div = sum(m.astype(jnp.float32) for m in masks)
        mixed = mixed / jnp.where(div == 0, 1.0, div)
    return mixed
