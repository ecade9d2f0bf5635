"""Multi-task sample packing: several samples per fixed-length row, none seeing another.

The packed format
=================

``pack`` returns a dict of ``[rows, L]`` numpy arrays.  Worked example with
``L = 12``, EOS = 1, two samples from task 0 (``A1 = [5 6 7]``, ``A2 = [8 9]``)
and one from task 1 whose prompt is ``[3]`` and response ``[4 4]``
(``B1 = [3 4 4]``, loss on the response only), packed into one row::

    tokens        5  6  7  1 | 3  4  4  1 | 8  9  1 | 0
    segment_ids   1  1  1  1 | 2  2  2  2 | 3  3  3 | 0     (0 = padding)
    positions     0  1  2  3 | 0  1  2  3 | 0  1  2 | 0     (restart per segment)
    targets       6  7  1  0 | 4  4  1  0 | 9  1  0 | 0     (next token, same segment)
    loss_weights  1  1  1  0 | 1  1  1  0 | 1  1  0 | 0
    task_ids      0  0  0  0 | 1  1  1  1 | 0  0  0 |-1
    sample_ids    0  0  0  0 | 2  2  2  2 | 1  1  1 |-1     (index in the input)
    piece_ids     0  0  0  0 | 0  0  0  0 | 0  0  0 |-1     (part of a split sample)

* Each sample gets EOS appended (``add_eos=True``), so a segment reads
  ``[sample] <EOS>``.
* ``targets[i]`` is ``tokens[i+1]`` inside a segment and 0 at its last
  position; a segment never predicts the next segment's first token.
* ``loss_weights[i]`` weights the prediction of ``targets[i]``: it is 0 on
  padding, at each segment's last position, and where the target token is
  masked by the sample's ``loss_mask`` (e.g. the prompt: for ``B1`` above the
  mask is ``[0 1 1]``, so the position predicting ``4`` from ``3`` is
  weighted 1 and nothing predicts ``3``).  The appended EOS is always learned.
* Attention is allowed from token i to j when ``segment_ids`` match, are not
  0, and ``j <= i`` (block-diagonal and causal); ``positions`` feed RoPE.

``unpack(batch)`` returns the original samples (in input order) exactly:
``tokens`` and ``task_id``, and ``loss_mask`` except at the first token of each
segment (of a sample, or of a piece of a split sample), which no position
predicts and so comes back as 0; unless the over-long policy truncated or
dropped them.

Strategies (``pack(..., strategy=)``):

* ``concat``: greedy in arrival order (next fit).
* ``ffd`` / ``bfd``: first-fit / best-fit decreasing, offline over the whole
  dataset.  Both run over *groups of equal length* with numpy, so 10^6
  samples take seconds, not minutes; the result equals item-by-item FFD/BFD.
* ``stream``: online best fit over an iterator with a bounded look-ahead
  buffer (``buffer_size`` samples); see ``stream_pack`` for rows as they fill.

Over-long samples (longer than ``L`` with their EOS) follow ``overlong``:
``"split"`` into pieces of ``L`` (each a new segment; ``piece_ids`` number
them), ``"truncate"`` to ``L``, or ``"drop"`` (an error if
``strict_drop=True``).  ``stats(batch)`` reports what was done; nothing is
discarded silently.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

STRATEGIES = ("concat", "ffd", "bfd", "stream")
OVERLONG = ("split", "truncate", "drop")
FIELDS = ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids", "sample_ids", "piece_ids")


class PackingError(ValueError):
    """Bad input to the packer; the message names the sample."""


@dataclasses.dataclass
class Item:
    """One segment to place: a whole sample or a piece of a split one."""

    tokens: np.ndarray
    loss_mask: np.ndarray
    task_id: int
    sample_id: int
    piece_id: int = 0


@dataclasses.dataclass
class Report:
    samples: int = 0
    split: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens_dropped: int = 0


# --- input normalisation ----------------------------------------------------


def _as_item(sample, index: int) -> tuple[np.ndarray, np.ndarray, int]:
    if isinstance(sample, dict):
        if "tokens" not in sample:
            raise PackingError(f"sample {index} is a dict without 'tokens'")
        tokens = np.asarray(sample["tokens"])
        task_id = int(sample.get("task_id", 0))
        mask = sample.get("loss_mask")
        mask = np.ones(len(tokens), np.float32) if mask is None else np.asarray(mask, np.float32)
        if mask.shape != tokens.shape:
            raise PackingError(f"sample {index}: loss_mask has shape {mask.shape}, tokens {tokens.shape}")
    else:
        tokens = np.asarray(sample)
        task_id, mask = 0, np.ones(len(tokens), np.float32)
    if tokens.size == 0:
        raise PackingError(f"sample {index} is empty")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise PackingError(f"sample {index}: tokens must be a 1-D integer array, got {tokens.dtype}{tokens.shape}")
    if tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max:
        bad = int(tokens.min()) if tokens.min() < 0 else int(tokens.max())
        raise PackingError(f"sample {index}: token id {bad} is outside [0, 2**31 - 1] (ids are stored as int32)")
    return tokens.astype(np.int32), mask, task_id


def to_items(samples: Iterable, seq_len: int, *, eos_id: int = 1, add_eos: bool = True,
             overlong: str = "split", report: Report | None = None) -> Iterator[Item]:
    """Samples -> items of length <= ``seq_len``, applying the over-long policy."""
    if overlong not in OVERLONG:
        raise PackingError(f"overlong must be one of {OVERLONG}, got {overlong!r}")
    report = report if report is not None else Report()
    for i, s in enumerate(samples):
        tokens, mask, task = _as_item(s, i)
        if add_eos:
            tokens = np.append(tokens, np.int32(eos_id))
            mask = np.append(mask, np.float32(1))
        report.samples += 1
        n = len(tokens)
        if n <= seq_len:
            yield Item(tokens, mask, task, i)
        elif overlong == "split":
            report.split += 1
            for p, start in enumerate(range(0, n, seq_len)):
                yield Item(tokens[start : start + seq_len], mask[start : start + seq_len], task, i, p)
        elif overlong == "truncate":
            report.truncated += 1
            report.tokens_dropped += n - seq_len
            yield Item(tokens[:seq_len], mask[:seq_len], task, i)
        else:
            report.dropped += 1
            report.tokens_dropped += n


# --- bin-packing plans over lengths ----------------------------------------


def plan_concat(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Next fit in arrival order: bin index per item."""
    bins = np.empty(len(lengths), np.int64)
    b, used = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if used + n > seq_len:
            b, used = b + 1, 0
        bins[i] = b
        used += n
    return bins


def _groups_desc(lengths: np.ndarray):
    """Items grouped by length, longest first, stable by index within a length."""
    order = np.lexsort((np.arange(len(lengths)), -lengths))
    sorted_len = lengths[order]
    cuts = np.flatnonzero(np.diff(sorted_len)) + 1
    return order, np.split(order, cuts), sorted_len


def plan_ffd(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """First-fit decreasing.  Same-length items are placed together: under first
    fit, bin j (in index order among bins with room) takes ``cap_j // s`` of them."""
    bins = np.empty(len(lengths), np.int64)
    caps = np.empty(0, np.int64)
    _, groups, _ = _groups_desc(lengths)
    for idx in groups:
        s = int(lengths[idx[0]])
        m = len(idx)
        fit = np.flatnonzero(caps >= s)
        take = caps[fit] // s
        cum = np.cumsum(take)
        k = int(np.searchsorted(cum, m, side="left"))  # bins fit[:k+1] are used
        k = min(k, len(fit) - 1)
        if len(fit) and cum[-1] >= m:
            use = take[: k + 1].copy()
            use[-1] -= cum[k] - m
        else:
            use = take
        target = np.repeat(fit[: len(use)], use)
        caps[fit[: len(use)]] -= use * s
        rest = m - len(target)
        if rest:
            per = seq_len // s
            n_new = -(-rest // per)
            new_ids = len(caps) + np.arange(n_new)
            fill = np.full(n_new, per)
            fill[-1] = rest - per * (n_new - 1)
            target = np.concatenate([target, np.repeat(new_ids, fill)])
            caps = np.concatenate([caps, seq_len - fill * s])
        bins[idx] = target
    return bins


def plan_bfd(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Best-fit decreasing.  Bins with equal remaining capacity are
    interchangeable, so the state is a stack of bin ids per capacity and
    same-length items move whole groups of bins at once."""
    bins = np.empty(len(lengths), np.int64)
    stacks: list[list[np.ndarray]] = [[] for _ in range(seq_len + 1)]
    count = np.zeros(seq_len + 1, np.int64)
    n_bins = 0
    _, groups, _ = _groups_desc(lengths)
    for idx in groups:
        s = int(lengths[idx[0]])
        pos = 0
        while pos < len(idx):
            m = len(idx) - pos
            nz = np.flatnonzero(count[s:])
            if len(nz):
                # Best fit: the fullest bin with room.  It stays the best fit
                # until it has no room for another item of this size, so each
                # bin at capacity c takes c // s items; then the next bin at c.
                c = s + int(nz[0])
                q = c // s
                ids = _pop(stacks[c], min(int(count[c]), -(-m // q)))
                count[c] -= len(ids)
            else:  # no bin has room: open new ones, each taking seq_len // s items
                c = seq_len
                q = seq_len // s
                n_new = -(-m // q)
                ids = n_bins + np.arange(n_new)
                n_bins += n_new
            fill = np.full(len(ids), q)
            fill[-1] = min(q, m - q * (len(ids) - 1))
            bins[idx[pos : pos + int(fill.sum())]] = np.repeat(ids, fill)
            pos += int(fill.sum())
            for f in np.unique(fill).tolist():
                sel = ids[fill == f]
                stacks[c - f * s].append(sel)
                count[c - f * s] += len(sel)
    return bins


def _pop(stack: list[np.ndarray], k: int) -> np.ndarray:
    out = []
    while k > 0:
        top = stack[-1]
        if len(top) <= k:
            out.append(stack.pop())
            k -= len(top)
        else:
            out.append(top[-k:])
            stack[-1] = top[:-k]
            k = 0
    return np.concatenate(out) if out else np.empty(0, np.int64)


def plan(lengths: Sequence[int], seq_len: int, strategy: str = "bfd") -> np.ndarray:
    """Bin (row) index per item, rows numbered 0..R-1 in order of first use."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and (lengths.min() <= 0 or lengths.max() > seq_len):
        raise PackingError(f"item lengths must be in [1, {seq_len}], got [{lengths.min()}, {lengths.max()}]")
    if strategy == "concat":
        return plan_concat(lengths, seq_len)
    if strategy == "ffd":
        return plan_ffd(lengths, seq_len)
    if strategy == "bfd":
        return plan_bfd(lengths, seq_len)
    raise PackingError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")


# --- materialising rows -----------------------------------------------------


def rows_from_plan(items: Sequence[Item], bins: np.ndarray, seq_len: int, pad_id: int = 0) -> dict:
    """Write items into ``[rows, seq_len]`` arrays following the packed format."""
    n_rows = int(bins.max()) + 1 if len(bins) else 0
    out = {
        "tokens": np.full((n_rows, seq_len), pad_id, np.int32),
        "segment_ids": np.zeros((n_rows, seq_len), np.int32),
        "positions": np.zeros((n_rows, seq_len), np.int32),
        "targets": np.zeros((n_rows, seq_len), np.int32),
        "loss_weights": np.zeros((n_rows, seq_len), np.float32),
        "task_ids": np.full((n_rows, seq_len), -1, np.int32),
        "sample_ids": np.full((n_rows, seq_len), -1, np.int32),
        "piece_ids": np.full((n_rows, seq_len), -1, np.int32),
    }
    order = np.lexsort((np.arange(len(bins)), bins))  # items by row, arrival order inside
    used = np.zeros(n_rows, np.int64)
    seg = np.zeros(n_rows, np.int32)
    for i in order.tolist():
        it, r = items[i], int(bins[i])
        n, a = len(it.tokens), int(used[r])
        seg[r] += 1
        sl = slice(a, a + n)
        out["tokens"][r, sl] = it.tokens
        out["segment_ids"][r, sl] = seg[r]
        out["positions"][r, sl] = np.arange(n)
        out["targets"][r, a : a + n - 1] = it.tokens[1:]
        out["loss_weights"][r, a : a + n - 1] = it.loss_mask[1:]
        out["task_ids"][r, sl] = it.task_id
        out["sample_ids"][r, sl] = it.sample_id
        out["piece_ids"][r, sl] = it.piece_id
        used[r] += n
    return out


def pack(samples, seq_len: int, strategy: str = "bfd", *, eos_id: int = 1, add_eos: bool = True,
         overlong: str = "split", strict_drop: bool = False, buffer_size: int = 10_000, pad_id: int = 0) -> dict:
    """Pack ``samples`` (int arrays, or dicts with ``tokens`` and optional
    ``task_id``, ``loss_mask``) into rows of ``seq_len``; see the module docstring."""
    if strategy not in STRATEGIES:
        raise PackingError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, (int, np.integer)) or seq_len < 1 + add_eos:
        raise PackingError(f"seq_len must be an integer >= {1 + add_eos}, got {seq_len!r}")
    seq_len = int(seq_len)
    if overlong == "drop" and strict_drop:
        samples = list(samples)
        for i, s in enumerate(samples):
            n = len(s["tokens"] if isinstance(s, dict) else s) + add_eos
            if n > seq_len:
                raise PackingError(f"sample {i} has {n} tokens (with EOS), more than seq_len={seq_len}, and overlong='drop'")
    report = Report()
    items = list(to_items(samples, seq_len, eos_id=eos_id, add_eos=add_eos, overlong=overlong, report=report))
    if report.dropped:
        warnings.warn(f"overlong='drop' dropped {report.dropped} sample(s) longer than seq_len={seq_len} "
                      f"({report.tokens_dropped} tokens); see stats(batch)", stacklevel=2)
    if not items:  # no samples, or every one dropped: an empty batch
        bins = np.zeros(0, np.int64)
    elif strategy == "stream":
        bins = plan_stream(np.array([len(i.tokens) for i in items], np.int64), seq_len, buffer_size)
    else:
        bins = plan([len(i.tokens) for i in items], seq_len, strategy)
    batch = rows_from_plan(items, bins, seq_len, pad_id)
    batch["report"] = dataclasses.asdict(report)
    return batch


# --- streaming best fit -----------------------------------------------------


def _stream_bins(lengths: Iterable[int], seq_len: int, buffer_size: int, keep_open: int | None = None):
    """Online best fit: yields ``(item_indices, row_index)`` for each closed row.

    Items are read ``buffer_size`` at a time and best-fit-decreasing packed
    together with the rows still open; rows that are nearly full (or all but
    the ``keep_open`` emptiest) are closed and emitted, the rest stay open for
    the next buffer.  Memory is bounded by the buffer and the open rows.
    """
    keep_open = keep_open if keep_open is not None else max(8, buffer_size // 100)
    open_rows: list[tuple[int, list[int]]] = []  # (used, item ids)
    next_row = 0
    buf_ids, buf_len = [], []

    def flush(final: bool):
        nonlocal open_rows, next_row
        lens = np.array([u for u, _ in open_rows] + buf_len, np.int64)
        # Open rows enter as pseudo-items of their used length: BFD puts the
        # fullest first, and new items fill around them.
        b = plan_bfd(lens, seq_len)
        n_open = len(open_rows)
        rows: dict[int, list[int]] = {}
        used: dict[int, int] = {}
        for j, r in enumerate(b.tolist()):
            ids = open_rows[j][1] if j < n_open else [buf_ids[j - n_open]]
            rows.setdefault(r, []).extend(ids)
            used[r] = used.get(r, 0) + int(lens[j])
        # Keep the emptiest rows open (unless final); emit the others.
        by_room = sorted(rows, key=lambda r: used[r])
        still_open = [] if final else [r for r in by_room[:keep_open] if used[r] < seq_len]
        emitted = []
        for r in sorted(set(rows) - set(still_open)):
            emitted.append((sorted(rows[r]), next_row))
            next_row += 1
        open_rows = [(used[r], rows[r]) for r in still_open]
        buf_ids.clear()
        buf_len.clear()
        return emitted

    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_len:
            raise PackingError(f"item {i} has length {n}, outside [1, {seq_len}]")
        buf_ids.append(i)
        buf_len.append(int(n))
        if len(buf_ids) >= buffer_size:
            yield from flush(False)
    if buf_ids or open_rows:
        yield from flush(True)


def plan_stream(lengths: np.ndarray, seq_len: int, buffer_size: int = 10_000) -> np.ndarray:
    """Row index per item from the streaming best-fit packer."""
    bins = np.empty(len(lengths), np.int64)
    for ids, row in _stream_bins(lengths.tolist(), seq_len, buffer_size):
        bins[ids] = row
    return bins


def stream_pack(samples: Iterable, seq_len: int, *, buffer_size: int = 10_000, eos_id: int = 1,
                add_eos: bool = True, overlong: str = "split", pad_id: int = 0) -> Iterator[dict]:
    """Online packing over an iterator: yields one packed row (``[1, L]`` arrays)
    at a time, holding at most ``buffer_size`` samples plus the open rows."""
    items: dict[int, Item] = {}

    def lengths():
        for k, it in enumerate(to_items(samples, seq_len, eos_id=eos_id, add_eos=add_eos, overlong=overlong)):
            items[k] = it
            yield len(it.tokens)

    for ids, _ in _stream_bins(lengths(), seq_len, buffer_size):
        row_items = [items.pop(i) for i in ids]
        yield rows_from_plan(row_items, np.zeros(len(row_items), np.int64), seq_len, pad_id)


# --- unpacking and statistics -----------------------------------------------


def unpack(batch: dict) -> list[dict]:
    """The samples in ``batch``, in input order, as dicts of ``tokens`` (without
    the appended EOS), ``task_id`` and ``loss_mask``.  Split pieces are joined."""
    sid, seg = batch["sample_ids"], batch["segment_ids"]
    pieces: dict[int, list] = {}
    for r in range(seg.shape[0]):
        row_seg = seg[r]
        for s in np.unique(row_seg[row_seg > 0]).tolist():
            cols = np.flatnonzero(row_seg == s)
            toks = batch["tokens"][r, cols]
            lw = batch["loss_weights"][r, cols]
            mask = np.concatenate([[0.0], lw[:-1]]).astype(np.float32)
            pieces.setdefault(int(sid[r, cols[0]]), []).append(
                (int(batch["piece_ids"][r, cols[0]]), toks, mask, int(batch["task_ids"][r, cols[0]]))
            )
    out = []
    for k in sorted(pieces):
        ps = sorted(pieces[k], key=lambda p: p[0])
        toks = np.concatenate([p[1] for p in ps])
        mask = np.concatenate([p[2] for p in ps])
        out.append({"tokens": toks[:-1], "task_id": ps[0][3], "loss_mask": mask[:-1], "sample_id": k})
    return out


def stats(batch: dict) -> dict:
    """Figures of a packed batch: efficiency, rows vs the lower bound, segments per
    row, padding saved versus padding every sample to the longest, and the
    over-long report."""
    seg = batch["segment_ids"]
    rows, seq_len = seg.shape
    real = int((seg > 0).sum())
    lower = -(-real // seq_len) if real else 0
    segs_per_row = (seg.max(axis=1) if rows else np.zeros(0))
    # naive batching: one sample per row, padded to the longest sample
    lengths = []
    for r in range(rows):
        row = seg[r]
        counts = np.bincount(row[row > 0])
        lengths.extend(counts[counts > 0].tolist())
    longest = max(lengths) if lengths else 0
    naive_capacity = len(lengths) * longest
    out = {
        "rows": rows,
        "lower_bound_rows": lower,
        "real_tokens": real,
        "capacity": rows * seq_len,
        "efficiency": real / max(rows * seq_len, 1),
        "segments_per_row": float(np.mean(segs_per_row)) if rows else 0.0,
        "naive_rows": len(lengths),
        "naive_padding_fraction": 1 - real / max(naive_capacity, 1),
        "padding_saved_tokens": naive_capacity - rows * seq_len,
    }
    if "report" in batch:
        out.update({f"overlong_{k}" if k != "samples" else k: v for k, v in batch["report"].items()})
    return out
