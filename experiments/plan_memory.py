"""Ahead-of-time memory plan of one training step: per-device bytes of a model
preset on a mesh of fake CPU devices, with no weight allocated.

    python experiments/plan_memory.py --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8
    python experiments/plan_memory.py --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8 --remat full
    python experiments/plan_memory.py --preset tiny --mesh 2,2,2 --seq 64 --batch 8    # smoke (the tests)
    python experiments/plan_memory.py --preset tiny --n-layers 2,8,32 --mesh 1,1,1 --seq 64 --batch 8
                                                      # compile time against depth, loop vs scan

Each configuration is compiled twice, with the decoder layers as a Python loop
(``scan_layers=False``) and scanned (``scan_layers=True``; ``--layouts`` picks
one), and both compile times are printed.

The train step (``research.training.step``: forward, backward, AdamW) is
lowered from abstract inputs (``nnx.eval_shape``, ``jax.eval_shape``: shapes,
dtypes and shardings, no data) and compiled for the mesh with
``jax.jit(...).lower(...).compile()``.  ``memory_analysis()`` of the compiled
program gives, per device: the arguments (parameters, optimizer state,
batch), the outputs (the same, donated: they alias the arguments) and the
temporaries (activations kept for the backward pass, gradients, workspace).

These are XLA:CPU estimates: XLA:TPU and XLA:GPU schedule, fuse and lay out
memory differently, and the CPU picks the blockwise attention backend, not a
fused kernel.  Treat them as the size of the problem, not as a promise that a
chip of that size suffices.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time


def _parse_mesh(s: str) -> tuple:
    parts = tuple(int(x) for x in s.split(","))
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--mesh {s!r}: expected data,fsdp,tensor (three positive integers)")
    return parts


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama3_8b")
    ap.add_argument("--mesh", type=_parse_mesh, default=(1, 8, 1), help="data,fsdp,tensor")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8, help="global batch (rows of --seq tokens)")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots_saveable"))
    ap.add_argument("--dtype", default="bfloat16", help="activations")
    ap.add_argument("--param-dtype", default="float32", help="parameters and AdamW moments")
    ap.add_argument("--layouts", default="both", choices=("both", "loop", "scan"),
                    help="decoder layers as a Python loop, scanned, or both (each compiled and timed)")
    ap.add_argument("--n-layers", type=lambda s: tuple(int(x) for x in s.split(",")), default=(),
                    help="depths to plan (comma-separated); default the preset's")
    args = ap.parse_args(argv)
    n_dev = math.prod(args.mesh)
    if args.batch % (args.mesh[0] * args.mesh[1]):
        ap.error(f"--batch {args.batch} must divide by data x fsdp = {args.mesh[0] * args.mesh[1]}")
    # fake devices: must be set before JAX initialises its backends
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax

    from research.models import PRESETS, preset

    if jax.device_count() < n_dev:
        sys.exit(f"--mesh {args.mesh} needs {n_dev} devices; JAX has {jax.device_count()} (was it imported before?)")
    if args.preset not in PRESETS:
        ap.error(f"--preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    depths = args.n_layers or (PRESETS[args.preset].n_layers,)
    rows = []
    for n_layers in depths:
        for scanned in {"both": (False, True), "loop": (False,), "scan": (True,)}[args.layouts]:
            mcfg = preset(args.preset, remat=args.remat, dtype=args.dtype, param_dtype=args.param_dtype,
                          n_layers=n_layers, scan_layers=scanned)
            rows.append(_plan(args, mcfg))
    return rows


def _plan(args, mcfg):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding

    from research import sharding
    from research.models import Transformer
    from research.training import TrainConfig
    from research.training.step import make_optimizer, make_train_step

    mesh = sharding.make_mesh(*args.mesh)
    graphdef, abs_params = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    param_sh = sharding.state_shardings(abs_params, mesh)
    placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # abstract, on the mesh
    abs_params = jax.tree.map(placed, abs_params, param_sh)
    cfg = TrainConfig(model=args.preset, seq_len=args.seq, batch_size=args.batch)
    tx = make_optimizer(cfg)
    # the moments follow their parameters' shardings; step counts are replicated (as in the trainer)
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    abs_opt = jax.eval_shape(tx.init, abs_params)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated)
    abs_opt = jax.tree.map(placed, abs_opt, opt_sh)
    batch_sh = sharding.batch_sharding(mesh)
    shape = (args.batch, args.seq)
    abs_batch = {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "loss_weights" else jnp.int32, sharding=batch_sh)
                 for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights", "task_ids")}
    step = make_train_step(graphdef, tx, cfg, 1, param_sh, opt_sh, batch_sh)
    t0 = time.perf_counter()
    lowered = step.lower(abs_params, abs_opt, abs_batch, jax.random.key(0), jnp.int32(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()

    n_params = sum(math.prod(a.shape) for a in jax.tree.leaves(abs_params))
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    args_b, out_b, temp_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    peak = args_b + out_b - alias_b + temp_b
    layout = "scan" if mcfg.scan_layers else "loop"
    print(f"{args.preset} ({mcfg.n_layers} layers, {layout}): {n_params / 1e6:,.2f}M parameters ({args.param_dtype}), "
          f"activations {args.dtype}, remat {args.remat}; mesh data,fsdp,tensor = {','.join(map(str, args.mesh))}; "
          f"batch {args.batch} x {args.seq}")
    print(f"  per device: arguments {gib(args_b)}, outputs {gib(out_b)} (aliased {gib(alias_b)}), "
          f"temporaries {gib(temp_b)}; total {gib(peak)}")
    print(f"  lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s (XLA:CPU estimates)", flush=True)
    return {"layout": layout, "n_layers": mcfg.n_layers, "arguments": args_b, "outputs": out_b, "aliased": alias_b,
            "temporaries": temp_b, "total": peak, "lower_s": t1 - t0, "compile_s": t2 - t1, "params": n_params}


if __name__ == "__main__":
    main()
