"""Command line: ``python -m research.train --config experiments/configs/X.py --set lr=1e-4``.

Several processes (hosts) train one run when each is started with the same
command plus its own id, e.g. on two GPU hosts::

    python -m research.train --config C --workdir W --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0
    python -m research.train --config C --workdir W --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 1

or with ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``
set instead.  On a TPU VM pod slice (and under Slurm or Open MPI) JAX finds
the processes itself: no flags.  ``W`` must be one directory that every
process sees (a shared file system).
"""

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
    ap.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                    help="stop at this step of the schedule and save; a later call continues the same run")
    ap.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="process 0's address for a multi-process run (or JAX_COORDINATOR_ADDRESS)")
    ap.add_argument("--num-processes", type=int, default=None, help="processes in the run (or JAX_NUM_PROCESSES)")
    ap.add_argument("--process-id", type=int, default=None, help="this process, 0-based (or JAX_PROCESS_ID)")
    ap.add_argument("--heartbeat-timeout", type=int, default=100, metavar="SECONDS",
                    help="a process silent this long stops the whole run, naming it (default 100)")
    args = ap.parse_args(argv)

    import os

    from research import distributed

    try:  # before anything touches a device
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_s=args.heartbeat_timeout)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from research.data.tasks import UnknownTaskError
    from research.training import config as config_lib
    from research.training.checkpoint import CheckpointMismatch, CheckpointSaveError
    from research.training.trainer import TrainingDiverged, train
    from research.safetensors_io import CheckpointError

    try:
        cfg = config_lib.load(args.config, args.set)
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    try:
        result = train(cfg, workdir, stop_at=args.stop_at, resume=not args.no_resume,
                       override_resume=args.override_resume)
    except (config_lib.ConfigError, CheckpointError) as e:  # the workdir's run contradicts the config; a bad init_from
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (UnknownTaskError, CheckpointMismatch, CheckpointSaveError, TrainingDiverged, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM or SIGHUP; the trainer saved at the step it stopped at
        from research import stop_signals

        return stop_signals.exit_code(stop)
    if not distributed.is_lead():
        return 0
    print(json.dumps({"step": result.step, "final_loss": result.history[-1]["loss"] if result.history else None,
                      "eval": result.eval}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
