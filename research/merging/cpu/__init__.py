"""The CPU backend of eager merges: one seam, ``merge_leaf``.

The algorithms (``task_vectors``, ``sparsify``, ``topk``) are plain JAX.  On
XLA:CPU a few of their steps are slow, and this package does them another
way with the same result, bit for bit:

* TIES and breadcrumbs: the top-k cut searched from the host (``search``),
  the counting passes and the merge pass in numba (``kernels``);
* DARE: the keep masks drawn by a numba threefry that gives JAX's bits,
  inside the merge pass (inverse rescale, or none) or first with the L1
  rescale's sums (per row of the ``[-1, last]`` view, exactly rounded over
  the rows, in float64: the one step that is not XLA's bit for bit, but
  agrees to float32 summation order, and does not depend on how a tensor is
  split into row blocks);
* DELLA: the masks drawn so, fused with the ranks they need: a draw below
  every rank's keep probability, or above all of them, needs no rank; the
  others' ranks are bounded by a histogram of their row, and found exactly
  only where the draw falls between the bounds' keep probabilities
  (``kernels.della_masks``);
  then DARE's merge pass on those masks, and the same L1 factor.  With the
  inverse rescale (a divisor per entry), or on a tensor of 3-D and up (whose
  ranks run along dim 1, across rows), every rank, by a radix sort
  (``leaf.host_ranks``), and the XLA merge program.

``merge()`` calls ``merge_leaf`` on every leaf of an eager merge; ``None``
means the backend does not apply (another method, an accelerator, traced
values, or switched off) and the XLA program runs instead.  Switch it off
with ``RESEARCH_MERGE_CPU=0`` in the environment or ``cpu.ENABLED = False``.
``RESEARCH_MERGE_CPU=serial`` keeps it, with the kernels' row loops on the
calling thread (``_loops.PARALLEL``): the same bits, compiled in less time.
"""

from __future__ import annotations

import os

from research.merging.cpu import leaf as _leaf
from research.merging.cpu.kernels import warm_up
from research.merging.cpu.search import NonFiniteInput

ENABLED = os.environ.get("RESEARCH_MERGE_CPU", "1").strip().lower() not in ("0", "false", "no", "off")


def applies(opts, ref_leaf) -> bool:
    """Whether eager merges with ``opts`` of leaves like ``ref_leaf`` go through this backend."""
    return ENABLED and _leaf.applies(opts, ref_leaf)


def screens_inputs(opts, ref_leaf) -> bool:
    """Whether ``merge_leaf(..., screen=True)`` checks its inputs for NaN/Inf itself
    (the trims' first counting pass and DARE's merge pass do, at no extra pass)."""
    return applies(opts, ref_leaf) and _leaf.screens_inputs(opts)


def merge_leaf(base, models, opts, keys, out_dtype, screen: bool = False):
    """One leaf of an eager merge, or ``None`` where this backend does not apply.

    ``base``/``models``: the leaf of the base and of every model; ``keys``: one
    PRNG key per model (random methods, else None); ``out_dtype``: the output
    dtype (None: the models'); ``screen``: raise ``NonFiniteInput`` on NaN/Inf
    in the inputs (where ``screens_inputs``).  The result equals the XLA
    program's bit for bit, but for DARE's and DELLA's L1 factor (see above).
    """
    if not applies(opts, base):
        return None
    return _leaf.merge_leaf(base, models, opts, keys, out_dtype, screen)


__all__ = ["ENABLED", "NonFiniteInput", "applies", "merge_leaf", "screens_inputs", "warm_up"]
