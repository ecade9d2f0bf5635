"""Exact per-row threshold counts of ``|ft - base|`` on the CPU, compiled with numba.

The host-driven top-k search in ``select`` needs, per counting pass and per
row of a tensor's ``[rows, last]`` view, how many ``|ft - base|`` exceed a
threshold ``t`` and how many exceed the next float below it (``>= t``).  XLA:CPU
runs that reduction compute-bound, at about a seventh of memory speed (3.3 ms
for one 5632x2048 bf16 pair, against 1.5 ms to read *four* such tensors and
write one); this kernel makes one pass at close to memory speed, both counts at
once, and the NaN/Inf screen in the same pass.

It reads the arrays in place: a JAX array on one CPU device is viewed as NumPy
without a copy, bf16 as its uint16 bits (decoded by a shift).  Only bf16 and
float32 tensors on one CPU device take this path (``usable``); everything else
keeps the XLA counting programs.

The counts agree exactly with the XLA programs that consume them.  XLA:CPU
runs with subnormals flushed to zero (inputs and results), so this kernel
flushes them too: a subnormal input is read as 0, and a difference below the
smallest normal float32 counts as 0.
"""

from __future__ import annotations

import threading

import numpy as np

try:  # numba is a dependency; the XLA programs remain the fallback where it cannot load
    import numba
    from numba import types
    from numba.extending import overload
except ImportError:  # pragma: no cover - exercised only on platforms without numba wheels
    numba = None
else:
    # OpenMP workers spin for a while after each kernel, taking a core from the
    # XLA program that runs next (TIES on 2 cores: 17 ms a leaf instead of 13).
    # numba's own pool sleeps; it is used unless the user picked a layer.
    if numba.config.THREADING_LAYER == "default":
        numba.config.THREADING_LAYER = "workqueue"

_DTYPES = ("bfloat16", "float32")
# numba's fallback thread pool ("workqueue", used when no OpenMP/TBB runtime is
# installed) must not be entered from two threads at once.
_LOCK = threading.Lock()
_TINY = np.float32(np.finfo(np.float32).tiny)


def usable(*arrays) -> bool:
    """Whether these (same-dtype) arrays can be counted here: numba loaded, bf16 or
    float32, C-contiguous in memory on the host (NumPy, or JAX on one CPU device)."""
    if numba is None:
        return False
    for x in arrays:
        if str(x.dtype) not in _DTYPES or x.size == 0:
            return False
        if isinstance(x, np.ndarray):
            if not x.flags.c_contiguous:
                return False
            continue
        sharding = getattr(x, "sharding", None)
        if sharding is None or len(sharding.device_set) != 1:
            return False
        if next(iter(sharding.device_set)).platform != "cpu":
            return False
    return True


def _host_view(x) -> np.ndarray:
    """``x`` as a 2-D NumPy ``[rows, last]`` view without copying (bf16 as uint16 bits)."""
    a = np.asarray(x)
    a = a.reshape(1, -1) if a.ndim < 2 else a.reshape(-1, a.shape[-1])
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


if numba is not None:

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

    @numba.njit(parallel=True, cache=True, nogil=True)
    def _pair_counts(ft, base, t_gt, t_ge, tiny, gt, ge, bad):
        rows, cols = ft.shape
        for r in numba.prange(rows):
            n_gt = 0
            n_ge = 0
            n_bad = 0
            for c in range(cols):
                d = abs(_flush(_decode(ft[r, c]), tiny) - _flush(_decode(base[r, c]), tiny))
                d = _flush(d, tiny)
                n_gt += d > t_gt
                n_ge += d > t_ge
                n_bad += not d < np.float32(np.inf)  # NaN/Inf input, or an overflow
            gt[r] = n_gt
            ge[r] = n_ge
            bad[r] = n_bad


def pair_counts(ft, base, t_gt, t_ge):
    """Per-row ``#[d > t_gt]``, ``#[d > t_ge]`` and ``#[d not finite]`` for
    ``d = |ft - base|`` in float32, as three int64 arrays (one pass).

    Thresholds are float32 scalars; a subnormal threshold acts as 0, as in XLA:CPU.
    """
    f, b = _host_view(ft), _host_view(base)
    rows = f.shape[0]
    gt, ge, bad = (np.empty(rows, np.int64) for _ in range(3))
    t_gt, t_ge = (np.float32(0.0) if abs(t) < _TINY else np.float32(t) for t in (t_gt, t_ge))
    with _LOCK:
        _pair_counts(f, b, t_gt, t_ge, _TINY, gt, ge, bad)
    return gt, ge, bad
