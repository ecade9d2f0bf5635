"""DELLA's keep masks of a fused-expert tensor, made an expert at a time from strips
of its columns, so that the tensor merges in blocks of a few rows.

DELLA ranks each entry among those along axis 1 (``sparsify.della_shape``), as
mergekit ranks along dim 1: in an ``[experts, n, cols]`` tensor, entry ``[e, r,
c]`` among the ``n`` entries of ``[e, :, c]``.  In the tensor's ``[experts * n,
cols]`` view, where the other methods take blocks of rows, a rank runs down a
whole expert's rows, so a block of rows does not determine its own ranks.  Its
columns do: a strip ``[e, :, c0:c1]`` holds every entry its ranks compare.

So, where the numba kernels rank and draw (``chunked.strips_on_host``), an
expert's masks, every model's, one bit an entry, are made strip by strip:

* read the strip of the base and of a model apart from the rest of their rows
  (``Tensor.columns``; ``SafetensorsFile.columns`` reads only its bytes);
* keep each entry whose uniform, drawn at its own counter in the expert's
  rows, is below its rank's keep probability, ranking down the strip's
  columns only the entries whose draw needs it (``kernels.della_strip_masks``):
  the bits ``sparsify.della_mask`` draws, packed into the expert's mask rows
  (``leaf.row_bits``' layout), with the L1 rescale's sums of each column.

A block of rows then takes its rows of the masks of the one or two experts it
lies in.  The masks are the whole-tensor merge's, bit for bit, and the L1
factor is to summation order; memory is a strip of two inputs and two
experts' masks, not an expert of every input.

DELLA's inverse rescale divides each kept entry by its own keep probability,
which a bit mask does not carry: there each expert is merged strip by strip
instead (``strip_kept``: a strip's ranks, mask and divisors), into its output
rows, which are written at once (``chunked._merge_expert_strips_inverse``).
"""

from __future__ import annotations

import math
import os

import numpy as np

from research.merging import sparsify
from research.merging.cpu import kernels
from research.merging.cpu.leaf import Kept, _della_probs_jit, _della_probs_table


def strip_width(n: int, cols: int, itemsize: int, strip_bytes: int) -> int:
    """Columns of a strip of ``n`` rows: about ``strip_bytes`` of entries, a multiple of 8
    (so each strip packs into whole bytes of a mask row), at most ``cols``."""
    return min(cols, max(8, strip_bytes // max(1, n * itemsize) // 8 * 8))


class ExpertMasks:
    """Every model's DELLA keep mask of a 3-D tensor ``t`` (a ``chunked.Tensor`` read in
    rows of its ``[experts * n, cols]`` view, with ``columns`` readers), for any
    block of those rows (``rows``), and the L1 rescale's sums (``l1_sums``).
    ``keys[i]``: model ``i``'s draw-block keys (raw data,
    ``leaf._block_key_data``), None where it keeps every entry.  ``keep``: hold
    every expert's masks once made (else those of the experts a block lies in)."""

    def __init__(self, opts, t, keys, strip_bytes: int, keep: bool = False):
        if opts.rescale and opts.rescale_mode == "inverse":
            raise ValueError("DELLA's inverse rescale divides by each entry's keep probability; its masks alone "
                             "do not carry it (merge such a tensor by strips: strip_kept)")
        if t.columns is None or len(t.own) != 3:
            raise ValueError(f"tensor {t.name}: expert masks need a 3-D tensor read by columns")
        self.t, self.keys, self.keep = t, keys, keep
        self.experts, self.n, self.cols = t.own
        self.width = strip_width(self.n, self.cols, t.itemsize, strip_bytes)
        self.tables = [None if k is None else _della_probs_table(self.n, d, e)
                       for k, d, e in zip(keys, opts.density, opts.epsilon)]
        self._made = {}  # expert -> every model's packed mask rows

    def l1_sums(self) -> list:
        """Per model, the L1 rescale's sums of its masks (``[k, 2]``, as
        ``cpu.leaf.dare_factor`` takes them: each column of each strip), None where it
        keeps every entry: every expert's masks made, in one pass over their strips."""
        rows = [[] for _ in self.keys]
        for e in range(self.experts):
            masks, sums = self._make(e, sums=True)
            if self.keep:
                self._made[e] = masks
            for i, s in enumerate(sums):
                rows[i].extend(s)
        return [None if k is None else np.concatenate(r) for k, r in zip(self.keys, rows)]

    def rows(self, i: int, sp) -> np.ndarray:
        """Model ``i``'s mask of rows ``sp = (start, stop)`` of the ``[-1, cols]`` view,
        bit-packed along each row (``leaf.row_bits``).  Blocks are asked for in row
        order, pass after pass: unless ``keep``, the masks of other experts than
        this block's are let go."""
        (a, b), n = sp, self.n
        first, last = a // n, (b - 1) // n
        if not self.keep:
            for e in [e for e in self._made if not first <= e <= last]:
                del self._made[e]
        parts = [self._expert(e)[i][max(a, e * n) - e * n:min(b, (e + 1) * n) - e * n] for e in range(first, last + 1)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _expert(self, e: int) -> list:
        if e not in self._made:
            self._made[e] = self._make(e)[0]
        return self._made[e]

    def _make(self, e: int, sums: bool = False) -> tuple[list, list]:
        """Expert ``e``'s masks of every model, ``[n, ceil(cols / 8)]`` packed rows (None
        where a model keeps every entry), and with ``sums`` each strip's sums
        (``kernels.della_strip_masks``)."""
        t, n, cols = self.t, self.n, self.cols
        rows = (e * n, (e + 1) * n)
        read_base, read_models = t.columns
        out = [None if k is None else np.empty((n, -(-cols // 8)), np.uint8) for k in self.keys]
        row_sums = [[] for _ in self.keys]
        for c0 in range(0, cols, self.width):
            c1 = min(c0 + self.width, cols)
            base = read_base(*rows, c0, c1)
            for i, read in enumerate(read_models):
                if out[i] is None:
                    continue
                bits, s = kernels.della_strip_masks(base, read(*rows, c0, c1), self.keys[i], t.draw_rows,
                                                    self.tables[i], row0=e * n, col0=c0, row_len=cols, sums=sums)
                out[i][:, c0 // 8:-(-c1 // 8)] = bits
                if sums:
                    row_sums[i].append(s)
        return out, row_sums

    @staticmethod
    def held_bytes(own_shape, n_models: int, itemsize: int, strip_bytes: int) -> int:
        """Bytes an ``ExpertMasks`` holds at once, at most, for a tensor of ``own_shape``,
        besides kept masks: a strip of two inputs and its packed mask, each kernel
        thread's tile of 8 columns and scratch (``della_strip_masks``), and two
        experts' masks of every model."""
        _, n, cols = own_shape
        strip = n * strip_width(n, cols, itemsize, strip_bytes)
        tiles = (os.cpu_count() or 1) * n * (8 * (2 * itemsize + 1) + 38)  # 8 columns, a column's keys, scratch
        return strip * 2 * itemsize + strip // 8 + tiles + 2 * n_models * n * math.ceil(cols / 8)


def strip_kept(opts, i: int, ft, base, block_keys, block_rows: int, row0: int, col0: int, row_len: int) -> Kept:
    """Model ``i``'s DELLA mask of a strip ``[n, w]`` of an expert (rows ``row0:`` and columns
    ``col0:`` of the ``[-1, row_len]`` view) with the inverse rescale's divisors, each
    entry's keep probability: every entry ranked down its column
    (``kernels.row_ranks`` of the ``[1, n, w]`` view), the draw as ``ExpertMasks``'."""
    n, w = np.shape(ft)
    d, eps = opts.density[i], opts.epsilon[i]
    ranks = kernels.row_ranks(ft, base, (1, n, w))  # [1, n * w]
    mask = kernels.below_table(block_keys, block_rows, ranks.reshape(n, w), _della_probs_table(n, d, eps), row0,
                               col0=col0, row_len=row_len)
    return Kept(mask=mask, div=_della_probs_jit(ranks, n, d, eps).reshape(n, w))


def inverse_held_bytes(own_shape, n_inputs: int, itemsize: int, out_itemsize: int, strip_bytes: int) -> int:
    """Bytes held at once, at most, while DELLA with the inverse rescale merges a 3-D tensor
    of ``own_shape`` by column strips (``chunked._merge_expert_strips_inverse``): an
    expert's output rows and the previous expert's, waiting for the disk; a strip of
    every input, each model's ranks, mask and divisors; the merge program's float32
    copies of the strip (its inputs and result)."""
    _, n, cols = own_shape
    strip = n * strip_width(n, cols, itemsize, strip_bytes)
    per_model = (2 if n <= 1 << 16 else 4) + 1 + 4
    return 2 * n * cols * out_itemsize + strip * (n_inputs * itemsize + (n_inputs - 1) * per_model + (n_inputs + 1) * 4)


def applies(shape, own_shape, sparsify_name: str) -> bool:
    """Whether a tensor of ``own_shape`` read in blocks of ``shape`` takes its DELLA masks
    from an ``ExpertMasks``: a 3-D tensor read in rows of its ``[-1, cols]`` view."""
    return sparsify_name == "della" and len(own_shape) == 3 and tuple(shape) == (
        math.prod(own_shape[:2]), own_shape[2]) and sparsify.della_shape(own_shape)[2] > 1
