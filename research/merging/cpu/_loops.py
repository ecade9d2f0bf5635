"""The numba loops of ``kernels`` (imported on first use: importing numba
costs time that merges which never trim or rank should not pay)."""

import os

# numba's thread pool, unless the user picked one: OpenMP where its runtime is
# installed, else numba's own ("workqueue").  OpenMP's workers spin a moment
# after each kernel, so the next one starts at once, where the workqueue
# pool's workers sleep between kernels and waking them is slow.  The spin is kept
# short (libgomp reads this when numba loads it), so that an XLA program
# running next, as in DARE's merges, keeps its cores.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import platform  # noqa: E402
import types as pytypes  # noqa: E402

import llvmlite.binding as llvm  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

if numba.config.THREADING_LAYER == "default":
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]


def _wide_vector_features() -> str | None:
    """The host's CPU features with LLVM's preference for 256-bit vectors on
    AVX-512 CPUs switched off, or None where that does not apply (another
    architecture, no AVX-512, or the user chose the CPU or its features)."""
    cfg = numba.config
    if cfg.CPU_NAME is not None or cfg.CPU_FEATURES is not None or not cfg.ENABLE_AVX:
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot tell on this host
        return None
    if not features.get("avx512f", False) or not features.get("avx512bw", False):
        return None
    return features.flatten() + ",-prefer-256-bit"


# On AVX-512 CPUs these loops run on 16 lanes rather than the 8 LLVM prefers
# there.  Their results do not depend on the width: numba compiles without
# fast-math, so no float operation is reordered.  The setting is numba's, for
# the whole process, read when numba first compiles or loads code; one the user
# set (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) is left as it is.
if (_features := _wide_vector_features()) is not None:
    numba.config.CPU_FEATURES = _features


# RESEARCH_MERGE_CPU=serial: the row-parallel kernels below run as plain loops
# on the calling thread.  numba's parallel transform is most of a kernel's
# compile time, and no kernel here combines values across the iterations of
# its ``prange`` (each row, or chunk of rows, writes its own outputs): the
# plain loop gives the same bits.
PARALLEL = os.environ.get("RESEARCH_MERGE_CPU", "").strip().lower() != "serial"


class _RowParallel:
    """A kernel whose outer loop is a ``numba.prange``, run as ``PARALLEL`` says at
    each call: row-parallel, or a plain loop, each compiled at its first use.
    The plain loop is compiled from a copy of the function named
    ``<name>_serial``, so that numba caches the two apart (its cache keys do
    not hold the ``parallel`` flag)."""

    def __init__(self, fn):
        self.__wrapped__ = fn
        self._compiled = {}

    def __call__(self, *args):
        parallel = PARALLEL
        kernel = self._compiled.get(parallel)
        if kernel is None:
            fn = self.__wrapped__
            if not parallel:
                name = fn.__name__ + "_serial"
                fn = pytypes.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
                fn.__qualname__ = name
            kernel = self._compiled.setdefault(parallel, numba.njit(parallel=parallel, cache=True, nogil=True)(fn))
        return kernel(*args)


def _decode(x):
    """A tensor element as float32; bf16 arrives as its uint16 bits.  (The
    Python twin of the overload numba compiles.)"""
    if isinstance(x, (np.uint16, int)):
        return np.array(np.uint32(x) << np.uint32(16), np.uint32).view(np.float32)[()]
    return np.float32(x)


@overload(_decode, inline="always")
def _decode_impl(x):
    if isinstance(x, types.Integer):  # bf16 bits: the high half of a float32
        return lambda x: np.uint32(np.uint32(x) << np.uint32(16)).view(np.float32)
    return lambda x: np.float32(x)


@numba.njit(inline="always")
def _flush(v, tiny):
    return np.float32(0.0) if abs(v) < tiny else v  # NaN stays NaN


@numba.njit(inline="always")
def _flushed_abs_delta(f, b, tiny):
    """``|f - b|`` in float32 as XLA:CPU computes it: subnormal inputs and result read as 0."""
    return _flush(abs(_flush(_decode(f), tiny) - _flush(_decode(b), tiny)), tiny)


def _low_bits(x):
    """``x``'s magnitude bits minus 1, wrapping 0 to the top (so that a min over them
    finds the smallest non-zero magnitude).  (The Python twin of the overload.)"""
    if isinstance(x, (np.uint16, int)):
        return np.uint16((int(x) & 0x7FFF) - 1)
    return np.uint32((int(np.float32(x).view(np.uint32)) & 0x7FFFFFFF) - 1)


@overload(_low_bits, inline="always")
def _low_bits_impl(x):
    if isinstance(x, types.Integer):  # bf16 bits
        return lambda x: np.uint16(np.uint16(x & np.uint16(0x7FFF)) - np.uint16(1))
    return lambda x: np.uint32(np.uint32(np.float32(x).view(np.uint32) & np.uint32(0x7FFFFFFF)) - np.uint32(1))


def _low_start(row):
    """The identity of a min over ``_low_bits`` of ``row``'s elements."""
    return np.uint16(0xFFFF) if row.dtype == np.uint16 else np.uint32(0xFFFFFFFF)


@overload(_low_start, inline="always")
def _low_start_impl(row):
    if row.dtype == types.uint16:
        return lambda row: np.uint16(0xFFFF)
    return lambda row: np.uint32(0xFFFFFFFF)


def _tiny_seen(low, row):
    """Whether a min of ``_low_bits`` over ``row`` (``low``) shows a non-zero magnitude
    below 2**-32 (see ``kernels.cut_merge``)."""
    return low < ((95 << 7) - 1 if row.dtype == np.uint16 else (95 << 23) - 1)


@overload(_tiny_seen, inline="always")
def _tiny_seen_impl(low, row):
    if row.dtype == types.uint16:
        return lambda low, row: low < np.uint16((95 << 7) - 1)
    return lambda low, row: low < np.uint32((95 << 23) - 1)


@numba.njit(inline="always")
def _count32(n, hit):
    """``n + hit`` for an int32 count ``n`` and a bool ``hit``, kept in 32 bits.
    numba widens ``int32 + int32`` to 64 bits, which halves a vectorised loop's
    lanes (and adds shuffles to widen them) unless each sum is narrowed again.
    For counts over at most ``2**31 - 1`` entries."""
    return np.int32(n + np.int32(hit))


@numba.njit(nogil=True, cache=True)
def _count_row(ft, b, t_gt, t_ge, tiny):
    """One row (1-D views): ``#[d > t_gt]``, ``#[d > t_ge]``, ``#[d not finite]`` for
    ``d = |ft - b|``, subnormal inputs and differences flushed to 0.  Counted in
    32-bit lanes (``_count32``): rows of at most ``2**31 - 1`` entries."""
    n_gt = np.int32(0)
    n_ge = np.int32(0)
    n_bad = np.int32(0)
    for c in range(len(ft)):
        d = _flushed_abs_delta(ft[c], b[c], tiny)
        n_gt = _count32(n_gt, d > t_gt)
        n_ge = _count32(n_ge, d > t_ge)
        n_bad = _count32(n_bad, not d < np.float32(np.inf))
    return n_gt, n_ge, n_bad


@_RowParallel
def probe_counts_flushed(base, ft, t_gt, t_ge, tiny, gt, ge, bad):
    """Per-row top-k counts of one probe: ``d = |ft - base|`` above ``t_gt`` into
    ``gt``, above ``t_ge`` into ``ge``, and NaN/Inf into ``bad``, flushing
    subnormals as XLA:CPU does.  The flushes make it compute-bound: the
    unrolled pass of ``_unrolled`` skips them, and this one runs only where
    that pass found a hazard.  One probe a call, so that one compiled kernel
    serves any number of models."""
    for r in numba.prange(base.shape[0]):
        gt[r], ge[r], bad[r] = _count_row(ft[r], base[r], t_gt, t_ge, tiny)


@numba.njit(cache=True, nogil=True)
def sample_abs_deltas(base, ft, step, run, tiny, out):
    """``out``: ``|ft - base|`` (flushed like XLA:CPU) at runs of ``run`` consecutive
    entries, one every ``step`` entries of the flat order.  One model a call, so
    that one compiled kernel serves any number of models."""
    for j in range(out.shape[0] // run):
        for c in range(run):
            k = j * step + c
            out[j * run + c] = _flushed_abs_delta(ft[k], base[k], tiny)


RANK_TILE = 8  # columns ranked together by ``axis1_ranks`` (wider tiles gathered more slowly)


@numba.njit
def _radix_ranks(key, idx, key2, idx2, start, out):
    """``out[c]``: the rank of ``key[c]`` (0 = smallest, ties by column), by an LSD
    radix sort of 11 + 11 + 10 bits (stable).  ``idx``, ``key2``, ``idx2``: scratch
    as long as ``key``, which is overwritten; ``start``: 2049 entries of scratch."""
    cols = len(key)
    for c in range(cols):
        idx[c] = c
    for shift in (0, 11, 22):
        start[:] = 0
        for c in range(cols):
            start[((key[c] >> shift) & 2047) + 1] += 1
        for i in range(2048):
            start[i + 1] += start[i]
        for c in range(cols):
            digit = (key[c] >> shift) & 2047
            pos = start[digit]
            start[digit] = pos + 1
            key2[pos] = key[c]
            idx2[pos] = idx[c]
        key, key2 = key2, key
        idx, idx2 = idx2, idx
    for i in range(cols):
        out[idx[i]] = i


@_RowParallel
def row_ranks(ft, base, tiny, out):
    """``out[r, c]``: the rank of ``|ft - base|`` (flushed as XLA:CPU) within row ``r``,
    ties by column (non-negative floats order like their bits; NaN sorts last,
    as in jnp.argsort)."""
    rows, cols = ft.shape
    for r in numba.prange(rows):
        key = np.empty(cols, np.uint32)
        for c in range(cols):
            key[c] = np.float32(_flushed_abs_delta(ft[r, c], base[r, c], tiny)).view(np.uint32)
        _radix_ranks(key, np.empty(cols, np.int32), np.empty(cols, np.uint32), np.empty(cols, np.int32),
                     np.empty(2049, np.int64), out[r])


@_RowParallel
def axis1_ranks(ft, base, tiny, out):
    """``out[r, i, j]``: the rank of ``|ft - base|`` at ``[r, i, j]`` (flushed as XLA:CPU)
    among the ``n`` entries of ``[r, :, j]``, ties by ``i``, as ``row_ranks`` ranks
    rows.  All four arrays are ``[rows, n, cols]``.  The columns go in tiles of
    up to ``RANK_TILE``, gathered and scattered a row ``i`` at a time, so that
    every read and write runs over contiguous entries."""
    rows, n, cols = ft.shape
    tile = min(cols, RANK_TILE)
    tiles = (cols + tile - 1) // tile
    for q in numba.prange(rows * tiles):
        r = q // tiles
        j0 = (q - r * tiles) * tile
        w = min(tile, cols - j0)
        key = np.empty((w, n), np.uint32)
        rank = np.empty((w, n), np.int32)
        idx, key2, idx2 = np.empty(n, np.int32), np.empty(n, np.uint32), np.empty(n, np.int32)
        start = np.empty(2049, np.int64)
        for i in range(n):
            for t in range(w):
                key[t, i] = np.float32(_flushed_abs_delta(ft[r, i, j0 + t], base[r, i, j0 + t], tiny)).view(np.uint32)
        for t in range(w):
            _radix_ranks(key[t], idx, key2, idx2, start, rank[t])
        for i in range(n):
            for t in range(w):
                out[r, i, j0 + t] = rank[t, i]


@numba.njit(nogil=True, cache=True)
def _abs_delta_bits(f, b, tiny, out):
    """``out[c]``: the float32 bits of ``d = |f[c] - b[c]|`` as XLA:CPU computes it
    (subnormal inputs and differences as 0; NaN/Inf give bits ``>= 0x7F800000``).
    The flushes are skipped (a loop of vector lanes) unless an input of the row
    has a non-zero magnitude below 2**-32, the only case where they can matter."""
    low = _low_start(b)
    for c in range(len(b)):
        low = min(low, min(_low_bits(f[c]), _low_bits(b[c])))
        out[c] = np.float32(abs(_decode(f[c]) - _decode(b[c]))).view(np.uint32)
    if _tiny_seen(low, b):
        for c in range(len(b)):
            out[c] = np.float32(_flushed_abs_delta(f[c], b[c], tiny)).view(np.uint32)


@_RowParallel
def magnitude_histograms(base, fts, shift, mask, match, match_shift, tiny, hist, bad):
    """Adds to ``hist[t, i, key]`` the entries of ``d = |fts[i] - base|`` (as
    ``_abs_delta_bits``) whose float bits ``b`` give ``key = (b >> shift) & mask``,
    among those with ``b >> match_shift == match[i]`` (all when ``match[i] < 0``);
    ``bad[t, i]`` counts NaN/Inf.  One pass over ``base`` and every model; rows
    are split over ``hist.shape[0]`` workers ``t``."""
    workers = hist.shape[0]
    rows, cols = base.shape
    for t in numba.prange(workers):
        x = np.empty(cols, np.uint32)
        for r in range(t * rows // workers, (t + 1) * rows // workers):
            for i in range(len(fts)):
                _abs_delta_bits(fts[i][r], base[r], tiny, x)
                n_bad = 0
                for c in range(cols):
                    n_bad += x[c] >= np.uint32(0x7F800000)
                bad[t, i] += n_bad
                h = hist[t, i]
                if match[i] < 0:
                    for c in range(cols):
                        if x[c] < np.uint32(0x7F800000):
                            h[(x[c] >> np.uint32(shift)) & np.uint32(mask)] += 1
                else:
                    m = np.uint32(match[i])
                    for c in range(cols):
                        if x[c] >> np.uint32(match_shift) == m:
                            h[(x[c] >> np.uint32(shift)) & np.uint32(mask)] += 1


@numba.njit(inline="always")
def _rotl(x, d):
    return np.uint32((x << np.uint32(d)) | (x >> np.uint32(32 - d)))


@numba.njit(inline="always")
def _mix(x0, x1, d):
    x0 = np.uint32(x0 + x1)
    return x0, np.uint32(x0 ^ _rotl(x1, d))


# The helpers run inside the kernels' loops, most copied into each call site by
# numba (``inline="always"``) before typing.  This one and ``_radix_ranks`` are
# not: numba copies and types a callee's IR again at every site, and the
# threefry's 20 rounds at each of a generated merge pass's sites (one per
# model) made it the bulk of compiling those passes.  LLVM inlines the compiled
# function into its loop all the same: the kernels give the same bits, as fast.
@numba.njit
def _threefry_bits(k1, k2, count):
    """JAX's 32 random bits at flat position ``count`` of a draw from key ``(k1, k2)``:
    threefry2x32 of the counter ``(0, count)``, the two words xor-ed (``jax_threefry_partitionable``)."""
    k3 = np.uint32(k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0 = k1
    x1 = np.uint32(count + k2)
    for g in range(5):
        if g % 2 == 0:
            x0, x1 = _mix(x0, x1, 13)
            x0, x1 = _mix(x0, x1, 15)
            x0, x1 = _mix(x0, x1, 26)
            x0, x1 = _mix(x0, x1, 6)
        else:
            x0, x1 = _mix(x0, x1, 17)
            x0, x1 = _mix(x0, x1, 29)
            x0, x1 = _mix(x0, x1, 16)
            x0, x1 = _mix(x0, x1, 24)
        # key injection g + 1: the key schedule rotates (k1, k2, k3)
        if g % 3 == 0:
            x0, x1 = np.uint32(x0 + k2), np.uint32(x1 + k3 + np.uint32(g + 1))
        elif g % 3 == 1:
            x0, x1 = np.uint32(x0 + k3), np.uint32(x1 + k1 + np.uint32(g + 1))
        else:
            x0, x1 = np.uint32(x0 + k1), np.uint32(x1 + k2 + np.uint32(g + 1))
    return np.uint32(x0 ^ x1)


@numba.njit(inline="always")
def _uniform01(bits):
    """``jax.random.uniform``'s float32 in [0, 1) from 32 random bits (exact)."""
    return np.uint32((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1.0)


@numba.njit(inline="always")
def _block_row(keys, block_rows, r, cols):
    """Row ``r`` of a draw made in blocks of ``block_rows`` rows of ``cols`` entries
    (``keys[b]``: block ``b``'s key): its block's key and the counter of its first
    entry within the block.  The kernels pass ``r + row0``: their rows are the
    draw's from ``row0`` on."""
    b = r // block_rows
    return np.uint32(keys[b, 0]), np.uint32(keys[b, 1]), (r - b * block_rows) * cols


@_RowParallel
def bernoulli_blocks(keys, block_rows, row0, p, out):
    """``out[r, c] = uniform < p``: ``jax.random.bernoulli`` for row ``row0 + r`` of a draw
    made in blocks of ``block_rows`` rows, block ``b`` from key ``keys[b]`` (see
    ``sparsify.blocked_draw``)."""
    rows, cols = out.shape
    for r in numba.prange(rows):
        k1, k2, start = _block_row(keys, block_rows, r + row0, cols)
        for c in range(cols):
            out[r, c] = _uniform01(_threefry_bits(k1, k2, np.uint32(start + c))) < p


@_RowParallel
def below_table_blocks(keys, block_rows, row0, col0, row_len, ranks, table, out):
    """``out[r, c] = uniform < table[ranks[r, c]]``, uniforms drawn as in ``bernoulli_blocks``
    (DELLA's keep mask, ``table`` holding the keep probability of each rank), for
    columns ``col0:`` of rows ``row_len`` long (``out`` may be a strip of them)."""
    rows, cols = out.shape
    for r in numba.prange(rows):
        k1, k2, start = _block_row(keys, block_rows, r + row0, row_len)
        for c in range(cols):
            out[r, c] = _uniform01(_threefry_bits(k1, k2, np.uint32(start + col0 + c))) < table[ranks[r, c]]


@_RowParallel
def draw_masks(base, ft, keys, block_rows, row0, p, bits, sums):
    """One model's keep mask, drawn as in ``bernoulli_blocks`` (keep probability ``p``),
    row ``r`` bit-packed into ``bits[r]`` (``_pack_row``), and ``_abs_sums`` of
    each row of ``ft - base`` and its mask into ``sums[r]`` where ``sums`` has a
    row for each (else it is ``[0, 2]``).  One model a call: a tuple of models
    would make numba compile the kernel again for each number of models."""
    rows, cols = base.shape
    for r in numba.prange(rows):
        k1, k2, start = _block_row(keys, block_rows, r + row0, cols)
        mk = np.empty(cols, np.bool_)
        for c in range(cols):
            mk[c] = _uniform01(_threefry_bits(k1, k2, np.uint32(start + c))) < p
        if sums.shape[0]:
            sums[r, 0], sums[r, 1] = _abs_sums(ft[r], base[r], mk)
        _pack_row(mk, bits[r])


def _encode(v, out):
    """float32 ``v`` as an element of ``out``: itself, or its bf16 bits (round to
    nearest even, as XLA converts).  (The Python twin of the overload numba compiles.)"""
    if out.dtype == np.uint16:
        u = int(np.float32(v).view(np.uint32))
        if (u & 0x7FFFFFFF) > 0x7F800000:
            return np.uint16((u >> 16) | 0x40)
        return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)
    return np.float32(v)


@overload(_encode, inline="always")
def _encode_impl(v, out):
    if out.dtype == types.uint16:
        def to_bf16(v, out):  # every step narrowed to 32 bits: numba widens uint32 arithmetic to 64
            u = np.float32(v).view(np.uint32)
            nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            high = np.uint32(u >> np.uint32(16))
            rounded = np.uint32(np.uint32(np.uint32(u + np.uint32(0x7FFF)) + (high & np.uint32(1))) >> np.uint32(16))
            return np.uint16(np.uint32(high | np.uint32(0x40)) if nan else rounded)
        return to_bf16
    return lambda v, out: np.float32(v)


@intrinsic
def _fma(typingctx, a, b, c):
    """``a * b + c`` rounded once (float32), as XLA:CPU computes ``base + lam * mixed``."""
    def codegen(context, builder, signature, args):
        return builder.fma(*args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@numba.njit(inline="always")
def _kept(x, b, keep_t):
    """``d = x - b`` where ``|d| > keep_t``, else 0."""
    d = _decode(x) - b
    return d if abs(d) > keep_t else np.float32(0.0)


@numba.njit(inline="always")
def _kept_below(x, b, keep_t, top_t):
    """``d = x - b`` where ``keep_t < |d| <= top_t``, else 0."""
    d = _decode(x) - b
    a = abs(d)
    return d if (a > keep_t) & (a <= top_t) else np.float32(0.0)


@numba.njit(inline="always")
def _sign(x):
    return np.float32(x > 0) - np.float32(x < 0)


@numba.njit(inline="always")
def _abs_sums(x, bt, mk):
    """``sum |x - bt|`` over a row, and over the entries ``mk`` keeps (float64):
    16 interleaved float32 partial sums (column ``c`` into lane ``c % 16``, which
    vectorises), then the columns past the last full 16, added in float64.  A
    function of the row alone (the L1 rescale's sums, ``kernels.random_masks``)."""
    cols = len(x)
    lane = np.zeros(16, np.float32)
    lane_kept = np.zeros(16, np.float32)
    full = cols - cols % 16
    for c0 in range(0, full, 16):
        for j in range(16):
            a = abs(_decode(x[c0 + j]) - _decode(bt[c0 + j]))
            lane[j] += a
            lane_kept[j] += a * np.float32(mk[c0 + j])
    total = 0.0
    kept = 0.0
    for c in range(full, cols):
        a = np.float64(abs(_decode(x[c]) - _decode(bt[c])))
        total += a
        kept += a if mk[c] else 0.0
    for j in range(16):
        total += np.float64(lane[j])
        kept += np.float64(lane_kept[j])
    return total, kept


@numba.njit(inline="always")
def _pack_row(mk, out):
    """``out[:] = np.packbits(mk)``: entry ``c`` as bit ``7 - c % 8`` of byte ``c // 8``
    (the last byte padded with zeros)."""
    cols = len(mk)
    for q in range(cols // 8):
        v = np.uint8(0)
        for j in range(8):
            v |= np.uint8(mk[8 * q + j]) << np.uint8(7 - j)
        out[q] = v
    if cols % 8:
        v = np.uint8(0)
        for c in range(cols - cols % 8, cols):
            v |= np.uint8(mk[c]) << np.uint8(7 - c % 8)
        out[cols // 8] = v


@numba.njit(inline="always")
def _unpack_row(bits, out):
    """``out[:] = np.unpackbits(bits, count=len(out))`` as bools."""
    for c in range(len(out)):
        out[c] = (bits[c >> 3] >> np.uint8(7 - (c & 7))) & np.uint8(1)


@numba.njit(inline="always")
def _rank_by_count(key, c):
    """``c``'s rank in ``key`` (int32, every entry non-negative; ``len(key) < 2**31``):
    how many entries are smaller, or equal at a smaller column.  Counted in
    32-bit lanes (``_count32``), and AVX2 compares signed 32-bit integers in
    one instruction (unsigned ones take three).  Each loop runs over
    a whole range, which vectorises better than splitting the row at ``c``."""
    kc = key[c]
    below = np.int32(0)
    for q in range(len(key)):
        below = _count32(below, key[q] < kc)
    return np.int32(below + _count_equal(key[:c], kc))


@numba.njit(inline="always")
def _count_equal(key, kc):
    """How many entries of ``key`` (int32) equal ``kc``, in 32-bit lanes (``_rank_by_count``)."""
    n = np.int32(0)
    for q in range(len(key)):
        n = _count32(n, key[q] == kc)
    return n


@numba.njit
def _della_scratch(n):
    """Scratch of ``_della_keep`` for vectors of ``n`` entries."""
    nb = 2048
    return (np.empty(n, np.uint16), np.empty(n, np.int32), np.empty(n, np.int32), np.empty(nb, np.int8),
            np.empty(n, np.int32), np.empty(n, np.uint32), np.empty(n, np.uint32), np.empty(n, np.int32),
            np.empty(n, np.int32), np.empty(2049, np.int64), np.empty(nb + 1, np.int32))


@numba.njit(inline="always")
def _della_keep(key, lo_k, hi_k, unif, tab, count_max, scratch, mk):
    """``mk[c] = unif[c] < tab[rank of key[c]]``: DELLA's keep decisions for one vector
    of ``d = |ft - base|`` as its float32 bits ``key`` with their bounds ``lo_k``,
    ``hi_k`` (``_rank_keys``), ranked within the vector, ties by position;
    ``tab`` non-decreasing, as long as the vector, which is shorter than 2**31;
    ``scratch``: ``_della_scratch``.

    Exact ranks are found only where the draw needs them.  A uniform below
    every rank's keep probability keeps its entry, one at or above all of them
    drops it.  For the rest, a histogram of the float bits of ``d`` (2045
    buckets between the smallest and largest finite non-zero bits, one each for
    0, Inf and NaN) bounds the entry's rank by its bucket's, and settles
    ``uniform < table[rank]`` unless the uniform falls between the table's
    values at the bounds.  Those entries are ranked exactly.  In a bucket that
    holds one value only (always 0's; ties, of which bf16 deltas hold many), an
    entry ranks after the bucket's entries at smaller positions, counted as the
    histogram is filled.  The rest are ranked each by a count over the vector
    (``_rank_by_count``), or, past ``count_max`` of them, by ranking the whole
    vector (``_radix_ranks``)."""
    hb, pend, occ, pure, pos, sort_key, key2, sort_idx, idx2, digits, start = scratch
    key_i = key.view(np.int32)
    cols = len(key)
    nb = 2048  # 0: zeros, 1..2045: finite, 2046: Inf, 2047: NaN
    inf = np.uint32(0x7F800000)
    t_first = tab[0]
    t_last = tab[cols - 1]
    shift = np.uint32(0)
    while hi_k >= lo_k and (hi_k >> shift) - (lo_k >> shift) > np.uint32(2044):
        shift += np.uint32(1)
    lo_b = lo_k >> shift
    for c in range(cols):
        k = key[c]
        hb[c] = (np.uint32(0) if k == 0 else np.uint32(2046) if k == inf
                 else np.uint32(2047) if k > inf else (k >> shift) - lo_b + np.uint32(1))
    start[:] = 0
    n_mid = 0
    for c in range(cols):  # the histogram, and the entries whose rank may matter
        seen = start[hb[c] + 1]
        occ[c] = seen  # entries of c's bucket at smaller positions
        start[hb[c] + 1] = seen + 1
        u = unif[c]
        pend[n_mid] = c
        n_mid += (u >= t_first) & (u < t_last)
    acc = np.int32(0)
    for h in range(nb + 1):  # running totals: bucket h's entries rank from start[h]
        acc += start[h]
        start[h] = acc
    for c in range(cols):
        mk[c] = unif[c] < t_first
    n_pend = 0
    pure[:] = 0  # per bucket: 0 not yet known, 1 one value only, 2 several
    pure[0] = pure[nb - 2] = pure[nb - 1] = 1
    for j in range(n_mid):  # by the keep probabilities at their bucket's lowest and highest rank
        c = pend[j]
        h = hb[c]
        keep_lo = unif[c] < tab[start[h]]
        mk[c] = keep_lo
        if keep_lo != (unif[c] < tab[start[h + 1] - 1]):  # undecided: the exact rank decides
            if pure[h] == 0:
                pure[h] = 1 if _count_equal(key_i, key_i[c]) == start[h + 1] - start[h] else 2
            if pure[h] == 1:  # ties (bf16 deltas hold many): ranked by position
                mk[c] = unif[c] < tab[start[h] + occ[c]]
            else:
                pend[n_pend] = c
                n_pend += 1
    if n_pend > count_max:
        sort_key[:] = key
        _radix_ranks(sort_key, sort_idx, key2, idx2, digits, pos)
    for j in range(n_pend):
        c = pend[j]
        rk = pos[c] if n_pend > count_max else _rank_by_count(key_i, c)
        mk[c] = unif[c] < tab[rk]


@numba.njit(inline="always")
def _rank_keys(f, b, tiny, key):
    """``key[c]``: ``d = |f[c] - b[c]|``'s float32 bits as ``_della_keep`` ranks them
    (flushed as XLA:CPU, NaNs tied); returns the smallest and largest bits of
    the finite non-zero ``d`` (the largest uint32 and 0 where there are none).
    A loop that does little, so that it vectorises."""
    lo_k = np.uint32(0xFFFFFFFF)
    hi_k = np.uint32(0)
    for c in range(len(key)):
        kb = np.float32(_flushed_abs_delta(f[c], b[c], tiny)).view(np.uint32)
        kc = np.uint32(0x7FC00000) if kb > np.uint32(0x7F800000) else kb  # NaNs tie (argsort)
        key[c] = kc
        finite = np.uint32(kc - np.uint32(1)) < np.uint32(0x7F7FFFFF)  # and non-zero
        lo_k = min(lo_k, kc if finite else np.uint32(0xFFFFFFFF))
        hi_k = max(hi_k, kc if finite else np.uint32(0))
    return lo_k, hi_k


@_RowParallel
def della_masks(base, ft, keys, block_rows, row0, tab, tiny, count_max, bits, sums):
    """``uniform < tab[rank]``: DELLA's keep mask of one model, row ``r`` bit-packed
    into ``bits[r]`` (``_pack_row``), with ``rank`` the rank of ``d = |ft - base|``
    (flushed as XLA:CPU) within its row, ties by column (``_della_keep``), and
    the uniforms drawn as in ``bernoulli_blocks`` (``keys``: the draw-block
    keys).  ``tab`` must be non-decreasing, and rows shorter than 2**31.
    ``sums[r]``: ``_abs_sums`` of the row and its mask, where ``sums`` has a
    row for each (else it is ``[0, 2]``).  One model a call: a tuple of models
    would make numba compile the kernel again for each number of models."""
    rows, cols = base.shape
    chunks = min(rows, 256)
    for t in numba.prange(chunks):
        key = np.empty(cols, np.uint32)
        unif = np.empty(cols, np.float32)
        mk = np.empty(cols, np.bool_)
        scratch = _della_scratch(cols)
        for r in range(t * rows // chunks, (t + 1) * rows // chunks):
            k1, k2, s0 = _block_row(keys, block_rows, r + row0, cols)
            b = base[r]
            f = ft[r]
            lo_k, hi_k = _rank_keys(f, b, tiny, key)
            for c in range(cols):
                unif[c] = _uniform01(_threefry_bits(k1, k2, np.uint32(s0 + c)))
            _della_keep(key, lo_k, hi_k, unif, tab, count_max, scratch, mk)
            if sums.shape[0]:
                sums[r, 0], sums[r, 1] = _abs_sums(f, b, mk)
            _pack_row(mk, bits[r])


STRIP_TILE = 8  # columns of a strip that ``della_strip_masks`` gathers together: a byte of each packed row


@_RowParallel
def della_strip_masks(base, ft, keys, block_rows, row0, col0, row_len, tab, tiny, count_max, bits, sums):
    """DELLA's keep mask of one model on a strip ``[n, w]`` of a matrix ranked down its
    columns: ``uniform < tab[rank]``, ``rank`` that of ``d = |ft - base|`` among
    the ``n`` entries of its column, ties by row (``_della_keep``), and the
    uniforms those of ``below_table_blocks`` for rows ``row0:`` and columns
    ``col0:`` of a draw of rows ``row_len`` long.  Row ``r``'s mask is
    bit-packed into ``bits[r]`` (``_pack_row``'s layout: ``bits`` is ``[n, ceil(w
    / 8)]``).  ``sums[c]``: ``_abs_sums`` of column ``c`` and its mask, where
    ``sums`` has a row for each (else it is ``[0, 2]``).  The columns go in
    tiles of ``STRIP_TILE``, gathered a row at a time (as ``axis1_ranks``);
    each column is then drawn and decided as ``della_masks`` does a row."""
    n, w = base.shape
    tiles = (w + STRIP_TILE - 1) // STRIP_TILE
    chunks = min(tiles, 256)
    rl = np.uint32(row_len)
    for t in numba.prange(chunks):
        b_t = np.empty((STRIP_TILE, n), base.dtype)  # the tile's columns
        f_t = np.empty((STRIP_TILE, n), ft.dtype)
        key = np.empty(n, np.uint32)
        unif = np.empty(n, np.float32)
        mk = np.empty((STRIP_TILE, n), np.bool_)
        scratch = _della_scratch(n)
        for q in range(t * tiles // chunks, (t + 1) * tiles // chunks):
            j0 = STRIP_TILE * q
            tw = min(STRIP_TILE, w - j0)
            for i in range(n):
                for j in range(tw):
                    b_t[j, i] = base[i, j0 + j]
                    f_t[j, i] = ft[i, j0 + j]
            for j in range(tw):
                b = b_t[j]
                f = f_t[j]
                lo_k, hi_k = _rank_keys(f, b, tiny, key)
                i = 0
                while i < n:  # a run of rows in one draw block: one key, counters row_len apart
                    k1, k2, s0 = _block_row(keys, block_rows, i + row0, row_len)
                    run = min(n - i, block_rows - (i + row0) % block_rows)
                    s1 = np.uint32(s0 + col0 + j0 + j)
                    for m in range(run):
                        unif[i + m] = _uniform01(_threefry_bits(k1, k2, np.uint32(s1 + np.uint32(m) * rl)))
                    i += run
                _della_keep(key, lo_k, hi_k, unif, tab, count_max, scratch, mk[j])
                if sums.shape[0]:
                    sums[j0 + j, 0], sums[j0 + j, 1] = _abs_sums(f, b, mk[j])
            for i in range(n):
                v = np.uint8(0)
                for j in range(tw):
                    v |= np.uint8(mk[j, i]) << np.uint8(7 - j)
                bits[i, q] = v
