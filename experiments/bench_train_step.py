"""Real (non-padding) tokens per second of a full training step on the seed's
100/2000-token mixture: padded batching vs packing with dense vs blockwise attention.

    python experiments/bench_train_step.py              # the README table (~4 min on CPU)
    python experiments/bench_train_step.py --samples 16 --seq 1024 --steps 1   # smoke

The same samples (70% ~100 tokens, 30% ~2000, lognormal) go through:

* padded: batches of ``--batch`` samples, each padded to the longest in its batch;
* packed (BFD into rows of ``--seq``), dense ``xla`` attention;
* packed, ``blockwise`` attention.

Each step is forward + backward + AdamW on a small model.  The ideal speed-up of
packing is padded capacity / real tokens; the goal is that packed+blockwise
reaches 0.8 of it.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from research.data import packing
from research.models import Transformer, preset
from research.training.loss import packed_loss


def mixture(n, seed=0, max_len=4096):
    rng = np.random.default_rng(seed)
    short = rng.lognormal(np.log(100), 0.5, size=n)
    long = rng.lognormal(np.log(2000), 0.3, size=n)
    lens = np.clip(np.where(rng.random(n) < 0.7, short, long), 2, max_len - 1).astype(int)
    return [rng.integers(3, 250, size=int(l)).astype(np.int32) for l in lens]


def padded_batches(samples, batch):
    out = []
    for i in range(0, len(samples), batch):
        group = samples[i : i + batch]
        width = max(len(s) + 1 for s in group)
        rows = [packing.pack([s], width, "concat") for s in group]
        out.append({k: np.concatenate([r[k] for r in rows]) for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")})
    return out


def packed_batches(samples, seq, rows_per_batch):
    b = packing.pack(samples, seq, "bfd")
    keys = ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")
    n = b["tokens"].shape[0]
    extra = -n % rows_per_batch
    arr = {k: np.pad(b[k], ((0, extra), (0, 0)), constant_values=-1 if k == "task_ids" else 0) for k in keys}
    return [{k: arr[k][i : i + rows_per_batch] for k in keys} for i in range(0, n + extra, rows_per_batch)]


def run(batches, attention, steps_per_batch=1):
    cfg = preset("small", attention=attention, block_size=128, d_model=256, d_ff=704)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adamw(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        def loss_fn(p):
            m = nnx.merge(graphdef, p)
            return packed_loss(m.decode(m.embed(batch["tokens"]), batch["segment_ids"], batch["positions"]), batch, 1)[0]

        loss, g = jax.value_and_grad(loss_fn)(params)
        u, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, u), opt, loss

    for b in batches:  # compile every shape first
        jax.block_until_ready(step(params, opt, {k: jnp.asarray(v) for k, v in b.items()}))
    real, t0 = 0, time.perf_counter()
    for b in batches:
        for _ in range(steps_per_batch):
            params, opt, loss = step(params, opt, {k: jnp.asarray(v) for k, v in b.items()})
            real += int((b["segment_ids"] > 0).sum())
    jax.block_until_ready(loss)
    return real / (time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4, help="samples per padded batch")
    ap.add_argument("--steps", type=int, default=1, help="steps per batch")
    ap.add_argument("--docs", action="store_true", help="also write the output into docs/performance.md")
    args = ap.parse_args(argv)
    import perfdoc

    with perfdoc.recorded(args.docs, "train_step", "A full training step (`experiments/bench_train_step.py`)", "experiments/bench_train_step.py", argv):
        _main(args)


def _main(args):
    samples = mixture(args.samples, max_len=args.seq)
    padded = padded_batches(samples, args.batch)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in padded)
    capacity = sum(b["tokens"].size for b in padded)
    packed = packed_batches(samples, args.seq, 1)
    ideal = capacity / real
    print(f"{len(samples)} samples, {real:,} real tokens; padded capacity {capacity:,} (ideal speed-up {ideal:.2f}x); "
          f"packed into {len(packed)} rows of {args.seq}\n")
    tps_pad = run(padded, "xla", args.steps)
    rows = [("padded batching (xla attention)", tps_pad)]
    rows.append(("packed, dense xla attention", run(packed, "xla", args.steps)))
    rows.append(("packed, blockwise attention", run(packed, "blockwise", args.steps)))
    print("| batching | real tokens/s | speed-up | share of ideal |")
    print("|---|---:|---:|---:|")
    for name, tps in rows:
        print(f"| {name} | {tps:,.0f} | {tps / tps_pad:.2f}x | {tps / tps_pad / ideal:.2f} |")


if __name__ == "__main__":
    main()
