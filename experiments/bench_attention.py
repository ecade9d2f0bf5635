"""Attention backends on packed 4096-token rows: forward+backward time and memory.

    python experiments/bench_attention.py            # the README table (CPU: ~2 min)
    python experiments/bench_attention.py --seq 512  # smoke

Rows of L tokens packed with 100-token segments and with 2000-token segments
(one row, 8 query heads, 4 key/value heads, head dim 64).  For each backend
available on this platform: the time of ``jax.grad`` of ``sum(attention)``
(forward + backward, compiled, median of a few runs), XLA's temporary memory
for that program (``memory_analysis``), and the ratio to dense ``xla``.
``pallas_gpu``/``splash``/``cudnn`` are timed only on their own hardware (in
interpret mode on a CPU they are correctness checks, not speed paths).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from research.models import attention as attn


def packed_segments(L: int, seg_len: int) -> np.ndarray:
    ids = np.arange(L) // seg_len + 1
    return ids[None].astype(np.int32)


def random_qkv(L: int, N: int = 8, K: int = 4, H: int = 64, dtype=jnp.float32, seed: int = 0):
    """One row: q ``[1, L, N, H]``, k and v ``[1, L, K, H]``, standard normal."""
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (1, L, N, H), dtype), jax.random.normal(ks[1], (1, L, K, H), dtype),
            jax.random.normal(ks[2], (1, L, K, H), dtype))


def bench(impl, q, k, v, seg, block, repeats=3):
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn.attention(q, k, v, seg, implementation=impl, block_size=block)),
                         argnums=(0, 1, 2)))
    compiled = f.lower(q, k, v).compile()
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
    jax.block_until_ready(compiled(q, k, v))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--docs", action="store_true", help="also write the output into docs/performance.md")
    args = ap.parse_args(argv)
    import perfdoc

    with perfdoc.recorded(args.docs, "attention", "Attention on packed rows (`experiments/bench_attention.py`)", "experiments/bench_attention.py", argv):
        _main(args)


def _main(args):
    platform = jax.devices()[0].platform
    impls = ["xla", "blockwise"] + {"gpu": ["pallas_gpu", "cudnn"], "cuda": ["pallas_gpu", "cudnn"], "tpu": ["splash"]}.get(platform, [])
    L, N, K, H = args.seq, 8, 4, 64
    q, k, v = random_qkv(L, N, K, H)
    print(f"L={L}, heads {N}/{K}, head dim {H}, block {args.block}, platform {platform}\n")
    print("| segments | backend | fwd+bwd (ms) | temp memory (MiB) | speed-up vs xla |")
    print("|---|---|---:|---:|---:|")
    for seg_len in (100, 2000):
        seg = jnp.asarray(packed_segments(L, seg_len))
        ref = None
        for impl in impls:
            t, mem = bench(impl, q, k, v, seg, args.block)
            ref = ref or t
            print(f"| {seg_len}-token | {impl} | {1e3 * t:.1f} | {mem / 2**20:.1f} | {ref / t:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
