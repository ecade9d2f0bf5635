"""Throughput of every merge method, jitted on the CPU, against the bandwidth floor.

    python experiments/bench_merge_core.py --params 500e6        # the README table
    python experiments/bench_merge_core.py --params 2e6 --methods ties linear   # smoke

Builds a Llama-shaped pytree (hidden 2048, intermediate 5632, vocab 32000;
the layer count sets the size) in bf16: a base and 3 fine-tuned models.
For each method it calls ``merging.merge`` eagerly (one compiled call per
leaf, as users run it) once to compile, then times the best of 5 further calls and
prints elements/s and the ratio to a plain jitted ``a + b - c`` over the same
leaves, also leaf by leaf (the memory-bandwidth floor of reading three models
and writing one).  The floor is timed between the timed calls of every
method and its best time is used: timed alone, once, it varies by +-50% with
the state of the memory allocator (whether its 1 GB of outputs land on pages
already mapped), and a slow floor flatters every ratio.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from research import merging

DEFAULT_PARAMS = {"density": 0.2}
PER_METHOD = {
    "linear": {},
    "task_arithmetic": {},
    "ties": DEFAULT_PARAMS,
    "dare_linear": DEFAULT_PARAMS,
    "dare_ties": DEFAULT_PARAMS,
    "breadcrumbs": DEFAULT_PARAMS,
    "breadcrumbs_ties": DEFAULT_PARAMS,
    "della": {"density": 0.4, "epsilon": 0.1},
    "della_linear": {"density": 0.4, "epsilon": 0.1},
    "slerp": {"t": 0.3},
    "model_stock": {},
    "negate": {},
}


def llama_shapes(params: float, hidden=2048, inter=5632, vocab=32000):
    embed = [("embed", (vocab, hidden)), ("lm_head", (vocab, hidden))]
    layer = [
        ("q", (hidden, hidden)), ("k", (hidden, hidden)), ("v", (hidden, hidden)), ("o", (hidden, hidden)),
        ("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)), ("norm", (hidden,)),
    ]
    per_layer = sum(math.prod(s) for _, s in layer)
    per_embed = 2 * vocab * hidden
    if params < per_embed:  # small smoke scale: shrink everything
        scale = max(8, int((params / per_embed) ** 0.5 * hidden) // 8 * 8)
        return llama_shapes(params, hidden=scale, inter=int(scale * 2.75) // 8 * 8, vocab=int(vocab * scale / hidden))
    n_layers = max(1, round((params - per_embed) / per_layer))
    tree = {n: s for n, s in embed}
    for i in range(n_layers):
        tree[f"layers.{i}"] = {n: s for n, s in layer}
    return tree


def make_models(shapes, n_models=3, seed=0):
    """A bf16 base (std 0.02) and ``n_models`` fine-tunes (base + N(0, 0.002)), via numpy."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    is_shape = lambda s: isinstance(s, tuple)
    normal = lambda s, std: (rng.standard_normal(s, dtype=np.float32) * std).astype(ml_dtypes.bfloat16)
    base_np = jax.tree.map(lambda s: normal(s, 0.02), shapes, is_leaf=is_shape)
    models = [jax.tree.map(lambda b: jnp.asarray((b.astype(np.float32) + normal(b.shape, 0.002).astype(np.float32))
                                                 .astype(ml_dtypes.bfloat16)), base_np) for _ in range(n_models)]
    return jax.tree.map(jnp.asarray, base_np), models


def timed_once(fn, *args) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def timed(fn, *args, slow: float = 60.0, repeats: int = 5, between=None):
    """Best of ``repeats`` calls after a warm-up call (which compiles); calls over
    5 s run once more only, and a first call slower than ``slow`` seconds is
    reported as is, compilation included.  ``between()`` runs before each timed call."""
    first = timed_once(fn, *args)
    if first > slow:
        return first, True
    best = math.inf
    for _ in range(repeats):
        if between is not None:
            between()
        best = min(best, timed_once(fn, *args))
        if best > 5.0:
            break
    return best, False


# The floor: read three bf16 leaves, write one; computed in float32 (XLA:CPU's
# bf16 arithmetic is slower than upcasting, and every method upcasts too).
_floor_leaf = jax.jit(lambda a, b, c: (a.astype(jnp.float32) + b.astype(jnp.float32) - c.astype(jnp.float32)).astype(a.dtype))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=500e6)
    ap.add_argument("--methods", nargs="*", default=list(PER_METHOD))
    ap.add_argument("--docs", action="store_true", help="also write the output into docs/performance.md")
    args = ap.parse_args(argv)
    import perfdoc

    with perfdoc.recorded(args.docs, "merge_core", "Merging core, eager `merging.merge` (`experiments/bench_merge_core.py`)", "experiments/bench_merge_core.py", argv):
        _main(args)


def _main(args):

    shapes = llama_shapes(args.params)
    base, models = make_models(shapes)
    n = sum(x.size for x in jax.tree.leaves(base))
    print(f"{n / 1e6:.0f}M parameters per model, bf16, 3 models + base, {jax.device_count()} CPU device(s)")

    floor_fn = lambda: jax.tree.map(_floor_leaf, models[0], models[1], base)
    for _ in range(3):  # compile, and bring the allocator to its steady state
        timed_once(floor_fn)
    rows, floors = [], []
    for method in args.methods:
        params = dict(PER_METHOD[method])
        ms = models[:2] if method == "slerp" else models
        b = None if method in ("linear", "slerp") else base
        key = jax.random.key(0) if method in merging.RANDOM_METHODS else None
        fn = lambda ms, b, key, m=method, p=params: merging.merge(m, ms, base=b, key=key, check_finite=False, **p)
        t, with_compile = timed(fn, ms, b, key, between=lambda: floors.append(timed_once(floor_fn)))
        rows.append((method, t, with_compile))
        print(f"{method}: {t:.2f} s", file=sys.stderr, flush=True)  # progress; the table below is the record
    # The floor is timed between the calls of every method and its best time is
    # used throughout: alone, its time moves by +-50% with the state of the
    # memory allocator (whether its 1 GB of outputs land on pages already mapped).
    floor = min(floors) if floors else timed(floor_fn)[0]
    print(f"\nfloor (a + b - c, best of {max(len(floors), 1)} calls between the methods'): {floor:.3f} s")
    print("\n| method | time (s) | elements/s | ratio to floor |\n|---|---:|---:|---:|")
    print(f"| a + b - c (floor) | {floor:.2f} | {n / floor / 1e6:.0f}M | 1.00x |")
    for name, t, with_compile in rows:
        note = " (incl. compile)" if with_compile else ""
        print(f"| {name} | {t:.2f}{note} | {n / t / 1e6:.0f}M | {t / floor:.2f}x |", flush=True)

if __name__ == "__main__":
    main()
