"""Pretrain the embedded suite's general base (``research.data.suite``) and write it
as an HF directory with its ``pretraining.json``.

    python experiments/pretrain_base.py --force                  # experiments/suite_base (committed)
    python experiments/pretrain_base.py --tiny --out /tmp/base   # smoke variant for the tests

The committed base is this command's output: 2000 steps of 16 x 128 tokens
(about 22 minutes on 2 CPU cores), ~0.8M parameters.  Expected: the base
solves its six format tasks (validation exact match ~100% on each) and has
never seen a target task.  ``experiments/quickstart.py`` fine-tunes it, and
refuses a base whose recorded pretraining config differs from its own.

The training run lives in ``--workdir`` (default ``runs/pretrain_base``), so a
killed run resumes from its last checkpoint when the command is repeated.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quickstart  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=quickstart.DEFAULT_BASE, help="the base's HF directory")
    ap.add_argument("--workdir", default=os.path.join(quickstart.ROOT, "runs", "pretrain_base"),
                    help="the training run (checkpoints; resumed when present)")
    ap.add_argument("--tiny", action="store_true", help="the tiny model and 30 steps (smoke test)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a QuickstartConfig pretraining field, e.g. --set pretrain_steps=3000")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    q = quickstart.override(quickstart.TINY if args.tiny else quickstart.QuickstartConfig(), args.set)
    quickstart.use_compile_cache()
    command = "python experiments/pretrain_base.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = quickstart.pretrain_base(q, args.workdir, args.out, force=args.force, command=command.strip())
    acc = record["format_val_accuracy"]
    print(f"wrote {args.out}: {record['steps']} steps in {record['seconds']:.0f} s; format tasks (val exact match) "
          + ", ".join(f"{t} {100 * v:.0f}%" for t, v in acc.items()) + f"; text loss {record['text_val_loss']:.3f}")


if __name__ == "__main__":
    main()
