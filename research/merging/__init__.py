"""Task arithmetic and model merging as pure, jittable functions over pytrees.

    from research import merging
    tv = merging.task_vector(finetuned, base)
    model = merging.apply(base, tv, scale=0.5)
    merged = merging.merge("ties", [ft_a, ft_b, ft_c], base=base, density=0.2, weight=[1.0, 1.0, 1.0])

Inputs are any pytrees of arrays with one structure: an NNX ``State``, a Linen
params dict, or a flat ``{name: array}`` dict read from a checkpoint.
"""

from research.merging.analysis import (cosine_similarity, election_discards, kept_fraction, kept_sign_conflicts, norms,
                                      sign_conflicts, trim)
from research.merging.merge import METHODS, NEEDS_BASE, PARAMS, RANDOM_METHODS, apply, merge, model_keys, task_vector
from research.merging.registry import options
from research.merging.tree import MergeError

__all__ = [
    "METHODS", "NEEDS_BASE", "PARAMS", "RANDOM_METHODS", "MergeError", "apply", "cosine_similarity", "election_discards",
    "kept_fraction", "kept_sign_conflicts", "merge", "model_keys", "norms", "options", "sign_conflicts", "task_vector", "trim",
]
