"""numba kernels for eager merges on the CPU: exact top-k counts and per-row ranks.

Two steps of the task-vector merges are slow in XLA:CPU and simple loops in
numba, both over ``d = |ft - base|`` (float32) of one tensor:

* ``pair_counts``: per row of the ``[rows, last]`` view, how many ``d`` exceed
  a threshold ``t`` and how many exceed the next float below it (``>= t``),
  plus how many are not finite.  The host-driven top-k search in ``select``
  (TIES, breadcrumbs) makes one such pass per step.  XLA:CPU runs the
  reduction compute-bound, 3.3 ms for one 5632x2048 bf16 pair against 1.5 ms
  to read *four* such tensors and write one; the kernel takes ~1.3 ms for
  both counts and the NaN/Inf screen.
* ``row_ranks``: the rank of each ``d`` within its row of the
  ``[shape[0], -1]`` view (stable: ties by column), which DELLA's keep
  probabilities need.  XLA sorts twice (``argsort(argsort(d))``, 5 s for that
  tensor); the kernel radix-sorts the float bits, 33 ms.

They read the arrays in place: a JAX array on one CPU device is viewed as
NumPy without a copy, bf16 as its uint16 bits (decoded by a shift).  Only bf16
and float32 tensors on one CPU device take these paths (``usable``);
everything else keeps the XLA programs, which give the same results.

The results agree exactly with the XLA programs.  XLA:CPU runs with
subnormals flushed to zero (inputs and results), so these kernels flush them
too: a subnormal input is read as 0, and so is a difference below the
smallest normal float32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import threading

import jax
import jax.numpy as jnp
import numpy as np

from research.safetensors_io import aligned_empty

# Outputs are 64-byte aligned, so that passing them to JAX on the CPU aliases
# them instead of copying (a merge holds one mask per model).
_DTYPES = ("bfloat16", "float32")
# numba's fallback thread pool ("workqueue", used when no OpenMP/TBB runtime is
# installed) must not be entered from two threads at once.
_LOCK = threading.Lock()
_TINY = np.float32(np.finfo(np.float32).tiny)


@functools.cache
def _has_numba() -> bool:
    # numba is a dependency; the XLA programs remain the fallback where it cannot load
    return importlib.util.find_spec("numba") is not None


@functools.cache
def _loops():
    return importlib.import_module("research.merging._cpu_loops")


def usable(*arrays) -> bool:
    """Whether these (same-dtype) arrays can go through these kernels: numba
    installed, bf16 or float32, C-contiguous in memory on the host (NumPy, or
    JAX on one CPU device)."""
    if not _has_numba():
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


def _host_view(x, rows_first: bool = False) -> np.ndarray:
    """``x`` as a 2-D NumPy view without copying (bf16 as uint16 bits): ``[rows, last]``,
    or ``[shape[0], -1]`` with ``rows_first``."""
    a = np.asarray(x)
    if a.ndim < 2:
        a = a.reshape(1, -1)
    else:
        a = a.reshape(a.shape[0], -1) if rows_first else a.reshape(-1, a.shape[-1])
    return a.view(np.uint16) if a.dtype.name == "bfloat16" else a


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
        _loops().pair_counts(f, b, t_gt, t_ge, _TINY, gt, ge, bad)
    return gt, ge, bad


def row_ranks(ft, base) -> np.ndarray:
    """Rank (0 = smallest) of each ``|ft - base|`` within its row of the
    ``[shape[0], -1]`` view, ties by column: ``argsort(argsort(d, axis=1), axis=1)``.
    uint16 when rows are shorter than 2**16 (half the memory), else int32."""
    f, b = _host_view(ft, rows_first=True), _host_view(base, rows_first=True)
    out = aligned_empty(f.shape, np.uint16 if f.shape[1] <= (1 << 16) else np.int32)
    with _LOCK:
        _loops().row_ranks(f, b, _TINY, out)
    return out


def random_ok(key) -> bool:
    """Whether draws from ``key`` can be made here bit for bit as JAX makes them:
    a threefry2x32 key, with ``jax_threefry_partitionable`` on (JAX's default)."""
    if not _has_numba() or not jax.config.jax_threefry_partitionable:
        return False
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return str(jax.random.key_impl(key)) == "threefry2x32"
    return jax.config.jax_default_prng_impl == "threefry2x32" and key.shape == (2,)


def _draw(kernel, block_keys, block_rows: int, shape, out_dtype, *args):
    rows = shape[0] if shape else 1
    out = aligned_empty((rows, math.prod(shape[1:]) if shape else 1), out_dtype)
    keys = np.asarray(block_keys, np.uint32).reshape(-1, 2)
    with _LOCK:
        kernel(keys, block_rows, *args, out)
    return out.reshape(shape)


def bernoulli(block_keys, block_rows: int, p: float, shape) -> np.ndarray:
    """``sparsify.blocked_draw(bernoulli(p), key, shape)``, bit for bit, given the raw
    data of each block's key (``[blocks, 2]`` uint32) and the rows per block."""
    return _draw(_loops().bernoulli_blocks, block_keys, block_rows, shape, np.bool_, np.float32(p))


def below_table(block_keys, block_rows: int, ranks: np.ndarray, table) -> np.ndarray:
    """``uniform < table[ranks]`` over ``ranks``' 2-D shape, uniforms drawn as in ``bernoulli``:
    DELLA's keep mask from each rank's keep probability, without materialising either."""
    table = np.asarray(table, np.float32)
    return _draw(_loops().below_table_blocks, block_keys, block_rows, ranks.shape, np.bool_, ranks, table)


_WARM = {  # sparsifier -> a tiny call that loads its kernel
    "magnitude": lambda x: pair_counts(x, x, np.float32(0), np.float32(0)),
    "magnitude_outliers": lambda x: pair_counts(x, x, np.float32(0), np.float32(0)),
    "random": lambda x: bernoulli(np.zeros((1, 2), np.uint32), 1, 0.5, (1, 1)),
    "della": lambda x: below_table(np.zeros((1, 2), np.uint32), 1, row_ranks(x, x), np.zeros(8, np.float32)),
}


def warm_up(sparsify: str | None, dtype="bfloat16") -> threading.Thread | None:
    """Load numba and the kernel ``sparsify`` needs in a background thread.

    numba's first call in a process costs ~0.3 s (its type registries, then
    the cached machine code); a streaming merge spends it while reading its
    first tensors.  Returns the thread, or None when nothing is to be loaded.
    """
    if sparsify not in _WARM or str(jnp.dtype(dtype)) not in _DTYPES or not _has_numba():
        return None
    x = jnp.zeros((1, 8), dtype)  # the array types real calls pass
    thread = threading.Thread(target=_WARM[sparsify], args=(x,), name="numba-warm-up", daemon=True)
    thread.start()
    return thread
