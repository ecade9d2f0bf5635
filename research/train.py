"""Command line: ``python -m research.train --config experiments/configs/X.py --set lr=1e-4``."""

from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.train", description=__doc__)
    ap.add_argument("--config", required=True, help="a Python file defining get_config()")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    ap.add_argument("--workdir", default=None, help="default: runs/<config name>")
    ap.add_argument("--no-resume", action="store_true",
                    help="start fresh even if the workdir has checkpoints (they are moved aside, not deleted)")
    ap.add_argument("--override-resume", action="store_true",
                    help="resume even though the config differs from the one the run was started with")
    args = ap.parse_args(argv)

    import os

    from research.data.tasks import UnknownTaskError
    from research.training import config as config_lib
    from research.training.checkpoint import CheckpointMismatch, CheckpointSaveError
    from research.training.trainer import TrainingDiverged, train

    try:
        cfg = config_lib.load(args.config, args.set)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    try:
        result = train(cfg, workdir, resume=not args.no_resume, override_resume=args.override_resume)
    except config_lib.ConfigError as e:  # the workdir's run contradicts this config
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UnknownTaskError, CheckpointMismatch, CheckpointSaveError, TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps({"step": result.step, "final_loss": result.history[-1]["loss"] if result.history else None,
                      "eval": result.eval}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
