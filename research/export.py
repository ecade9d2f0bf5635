"""Export a training run as a Hugging Face directory that transformers and
``research-merge`` both load.

    python -m research.export runs/my_run out/my_model [--step N] [--dtype bfloat16] [--force]

The run's parameters at its latest (or ``--step``) checkpoint become
safetensors (sharded with an index above ``--shard-size``) with
``config.json`` and ``generation_config.json``; a LoRA run is exported merged
(``W + (α/r)·A B``; its peft adapter is ``RUN/adapter``).  The run's
tokenizer files (its ``tokenizer``, or an HF ``init_from``'s) are copied
alongside, the tokenizer itself as ``tokenizer.json`` / ``tokenizer.model``;
a byte-tokenizer run has none.  The directory is written under a
temporary name and renamed when complete (Ctrl-C, SIGTERM or SIGHUP remove
it: ``stop_signals``); an existing ``OUT`` is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                        "added_tokens.json", "chat_template.jinja")


def tokenizer_files(cfg) -> list:
    """``[(path, name in the export)]``: the run's tokenizer and the files beside it."""
    from research.data.tokenizers import hf_tokenizer_file
    from research.training.data import tokenizer_spec

    spec = tokenizer_spec(cfg)
    if spec == "byte":
        return []
    main = hf_tokenizer_file(spec) if os.path.isdir(spec) else spec
    directory = os.path.dirname(main)
    out = [(main, "tokenizer.model" if main.endswith(".model") else "tokenizer.json")]
    return out + [(os.path.join(directory, f), f) for f in TOKENIZER_SIDE_FILES
                  if os.path.isfile(os.path.join(directory, f))]


def load_run(run_dir: str, step: int | None = None):
    """The model of a training run at ``step`` (default its latest checkpoint), on
    this process's devices: a plain ``Transformer`` (a LoRA run's adapters merged)."""
    import jax
    from flax import nnx

    from research import sharding
    from research.models import lora
    from research.training import run_config
    from research.training.checkpoint import Checkpointer
    from research.training.step import split_trainable
    from research.training.trainer import build_model

    cfg = run_config.read(run_dir)
    mesh = sharding.make_mesh(1, 1, 1)
    model = build_model(dataclasses.replace(cfg, mesh=(1, 1, 1)), mesh)
    graphdef, trained, frozen = split_trainable(model)
    ck = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=0, keep=1, async_save=False)
    try:
        step = ck.latest() if step is None else step
        if step is None or step not in ck.manager.all_steps():
            raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step} (steps: {list(ck.manager.all_steps())})")
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), trained)
        trained = ck.restore_params(step, target)
    finally:
        ck.close()
    model = nnx.merge(graphdef, trained, frozen)
    return (lora.merged(model) if cfg.lora_rank else model), cfg, step


def export(run_dir: str, out_dir: str, *, step: int | None = None, dtype=None, shard_size: int = 5 * 2**30,
           force: bool = False) -> int:
    """Write ``run_dir``'s model to ``out_dir`` (see the module docstring); returns the step exported."""
    from research.models import save_hf

    if os.path.exists(out_dir) and not force:
        raise FileExistsError(f"{out_dir} exists; pass --force to replace it")
    model, cfg, step = load_run(run_dir, step)
    extra = {"generation_config.json": json.dumps({"_from_model_config": True, "do_sample": False}, indent=2)}
    hf_init = cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "config.json"))
    if hf_init and os.path.isfile(os.path.join(cfg.init_from, "generation_config.json")):
        extra["generation_config.json"] = open(os.path.join(cfg.init_from, "generation_config.json")).read()
    save_hf(model, out_dir, dtype=dtype, shard_size=shard_size, force=force, extra_files=extra,
            copy_files=tokenizer_files(cfg))
    return step


def _size(s: str) -> int:
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30}
    for u, m in units.items():
        if s.upper().endswith(u):
            return int(float(s[:-2]) * m)
    return int(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--step", type=int, default=None, help="the checkpoint to export (default: the latest)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                    help="tensor dtype (default: the run's parameter dtype)")
    ap.add_argument("--shard-size", type=_size, default=5 * 2**30, help="largest shard, e.g. 5GB")
    ap.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    args = ap.parse_args(argv)
    from research import stop_signals
    from research.safetensors_io import CheckpointError
    from research.training.checkpoint import CheckpointMismatch
    from research.training.config import ConfigError

    try:
        import jax.numpy as jnp

        with stop_signals.raising():
            step = export(args.run_dir, args.out_dir, step=args.step,
                          dtype=None if args.dtype is None else jnp.dtype(args.dtype), shard_size=args.shard_size,
                          force=args.force)
    except KeyboardInterrupt as stop:  # Ctrl-C, SIGTERM, SIGHUP: the temporary directory was removed
        return stop_signals.report(stop)
    except (ConfigError, CheckpointError, CheckpointMismatch, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # no room for the output (found before writing), or a disk that fills while writing
        print(f"error: {e.filename + ': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir} step {step} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
