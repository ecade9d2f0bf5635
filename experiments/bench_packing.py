"""Packing speed and efficiency on the seed's 100/2000-token mixture.

    python experiments/bench_packing.py                  # the README table (~3 min)
    python experiments/bench_packing.py --n 20000 --grain-n 2000   # smoke

Lengths: 70% lognormal around 100 tokens, 30% around 2000, clipped to
[1, 4096]; L = 4096.  Our packers plan all ``--n`` samples (the bin-packing
decision; materialising 10^6 packed rows would need ~20 GB).  grain's
``FirstFitPackIterDataset`` / ``BestFitPackIterDataset`` (64 bins) pack a
``--grain-n`` slice end to end; our ``pack()`` runs end to end on the same
slice for a like-for-like time.  TRL's pyarrow BFD figures are quoted from
the issue, not measured here (TRL needs PyTorch).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from research.data import packing

L = 4096


def seed_mixture(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    short = rng.lognormal(np.log(100), 0.5, size=n)
    long = rng.lognormal(np.log(2000), 0.3, size=n)
    return np.clip(np.where(rng.random(n) < 0.7, short, long), 1, L).astype(np.int64)


def row(name, n, secs, rows, total):
    lower = -(-int(total) // L)
    return f"| {name} | {n:,} | {secs:.2f} | {total / (rows * L):.2%} | {rows:,} | {lower:,} | {rows / lower - 1:+.2%} |"


def grain_pack(lengths, cls, bins=64):
    import grain
    from grain import experimental as ge

    ds = grain.MapDataset.source([{"tokens": np.ones(int(n), np.int32)} for n in lengths]).to_iter_dataset()
    packed = getattr(ge, cls)(ds, length_struct={"tokens": L}, num_packing_bins=bins, shuffle_bins=False)
    t0 = time.perf_counter()
    rows, real = 0, 0
    for ex in packed:
        rows += 1
        real += int((ex["tokens_segment_ids"] > 0).sum())
    return time.perf_counter() - t0, rows, real


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--grain-n", type=int, default=100_000)
    ap.add_argument("--buffer", type=int, default=10_000)
    ap.add_argument("--docs", action="store_true", help="also write the output into docs/performance.md")
    args = ap.parse_args(argv)
    import perfdoc

    with perfdoc.recorded(args.docs, "packing", "Packing (`experiments/bench_packing.py`)", "experiments/bench_packing.py", argv):
        _main(args)


def _main(args):

    lengths = seed_mixture(args.n)
    total = int(lengths.sum())
    print(f"{args.n:,} samples, {total:,} tokens, L={L}, lower bound {-(-total // L):,} rows\n")
    print("| packer | samples | time (s) | efficiency | rows | lower bound | rows over bound |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for strategy in ("concat", "ffd", "bfd"):
        t0 = time.perf_counter()
        bins = packing.plan(lengths, L, strategy)
        print(row(f"ours `{strategy}` (plan)", args.n, time.perf_counter() - t0, int(bins.max()) + 1, total))
    t0 = time.perf_counter()
    bins = packing.plan_stream(lengths, L, buffer_size=args.buffer)
    print(row(f"ours `stream` buffer {args.buffer:,} (plan)", args.n, time.perf_counter() - t0, int(bins.max()) + 1, total))
    if args.n == 1_000_000:
        print("| TRL pyarrow BFD (quoted from the issue, same workload) | 1,000,000 | 30.5 | 99.60% | 172,928 | 172,245 | +0.40% |")

    sl = lengths[: args.grain_n]
    st = int(sl.sum())
    samples = [np.full(int(n) - 1, 7, np.int32) for n in sl]  # +EOS -> n tokens
    t0 = time.perf_counter()
    b = packing.pack(samples, L, "bfd")
    print(row("ours `bfd` end to end (`pack`)", args.grain_n, time.perf_counter() - t0, b["tokens"].shape[0], st))
    del b
    for cls in ("FirstFitPackIterDataset", "BestFitPackIterDataset"):
        secs, rows, real = grain_pack(sl, cls)
        assert real == st, (real, st)
        print(row(f"grain `{cls}` (64 bins)", args.grain_n, secs, rows, st))


if __name__ == "__main__":
    main()
