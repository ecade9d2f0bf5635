"""Multi-task mixtures: which task each sample of a stream comes from.

Rates (normalised to sum to 1):

* ``"size"``: proportional to each task's size (examples-proportional);
* ``"temperature"``: proportional to ``size ** (1/T)`` (T=1 is by size, large
  T tends to uniform);
* explicit weights: a ``{task: weight}`` dict.

No task can starve: every rate is raised to at least ``min_rate`` (default
``0.1 / n_tasks``) and the rest renormalised.  Generated tasks have no size;
they count as ``default_size``.

The mixture is random-access and stateless: sample ``i`` draws its task and
its example index from a hash of ``(seed, i)``, so any pipeline position can be
recomputed (exact resume) and the realised mix converges to the rates;
``realised(n)`` reports it.
"""

from __future__ import annotations

import numpy as np


def rates(sizes: dict, mixing="size", temperature: float = 2.0, min_rate: float | None = None) -> dict:
    names = list(sizes)
    if isinstance(mixing, dict):
        unknown = set(mixing) - set(names)
        if unknown:
            raise ValueError(f"mixture weights name unknown task(s) {sorted(unknown)}; tasks: {names}")
        w = np.array([float(mixing.get(n, 0.0)) for n in names])
        if (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be >= 0 and not all 0, got {mixing}")
    elif mixing == "size":
        w = np.array([float(sizes[n]) for n in names])
    elif mixing == "temperature":
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        w = np.array([float(sizes[n]) ** (1.0 / temperature) for n in names])
    else:
        raise ValueError(f"mixing must be 'size', 'temperature' or a dict of weights, got {mixing!r}")
    w = w / w.sum()
    floor = 0.1 / len(names) if min_rate is None else min_rate
    if floor * len(names) > 1:
        raise ValueError(f"min_rate={floor} is impossible for {len(names)} tasks")
    for _ in range(len(names)):  # raise starved tasks, take the mass from the others
        low = w < floor
        if not low.any():
            break
        rest = w[~low].sum()
        w = np.where(low, floor, w * (1 - floor * low.sum()) / rest)
    return dict(zip(names, w.tolist()))


class Mixture:
    """Random-access stream of ``(task_index, example_index)`` pairs."""

    def __init__(self, sizes: dict, mixing="size", *, temperature: float = 2.0, min_rate=None, seed: int = 0,
                 default_size: int = 100_000):
        self.names = list(sizes)
        self.sizes = {n: (s if s else default_size) for n, s in sizes.items()}
        self.rates = rates(self.sizes, mixing, temperature, min_rate)
        self._cum = np.cumsum([self.rates[n] for n in self.names])
        self.seed = seed

    def __getitem__(self, i: int) -> tuple[int, int]:
        rng = np.random.default_rng([self.seed, int(i)])
        u, j = rng.random(), int(rng.integers(0, 2**62))
        t = min(int(np.searchsorted(self._cum, u, side="right")), len(self.names) - 1)
        return t, j % self.sizes[self.names[t]]

    def realised(self, n: int) -> dict:
        counts = np.bincount([self[i][0] for i in range(n)], minlength=len(self.names))
        return {name: c / n for name, c in zip(self.names, counts.tolist())}
