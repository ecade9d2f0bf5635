"""``python -m research.merging CONFIG.yaml OUT_DIR`` (also ``research-merge``): merge
real checkpoints from a mergekit-style YAML file, streaming tensor by tensor."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="research-merge", description=__doc__)
    ap.add_argument("config", help="mergekit-style YAML")
    ap.add_argument("out_dir")
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu", "tpu"])
    ap.add_argument("--shard-size", default="5GB")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    ap.add_argument("--seed", type=int, default=0, help="for DARE/DELLA")
    ap.add_argument("--dry-run", action="store_true", help="check inputs and print the plan; reads no tensor data")
    ap.add_argument("--allow-vocab-mismatch", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from research.merging import MergeError
    from research.merging.stream import ConfigError, MergeFailed, load, parse_size, run
    from research.safetensors_io import CheckpointError

    try:
        mc = load(args.config)
        out = run(mc, args.out_dir, device=args.device, shard_size=parse_size(args.shard_size), force=args.force,
                  seed=args.seed, dry_run=args.dry_run, allow_vocab_mismatch=args.allow_vocab_mismatch,
                  progress=not args.no_progress)
    except (ConfigError, MergeFailed, CheckpointError, MergeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if out:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
