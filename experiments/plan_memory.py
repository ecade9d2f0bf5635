"""Ahead-of-time memory plan of one training step: per-device bytes of a model
preset on a mesh of fake CPU devices, with no weight allocated.

    python experiments/plan_memory.py --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8
    python experiments/plan_memory.py --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8 --remat full
    python experiments/plan_memory.py --preset llama3_8b --mesh 1,8,1 --seq 4096 --batch 8 --remat full \
        --param-dtype bfloat16 --lora-rank 16                   # LoRA on a bf16 base
    python experiments/plan_memory.py ... --param-dtype bfloat16 --master-weights   # bf16 + f32 masters
    python experiments/plan_memory.py --preset tiny --mesh 2,2,2 --seq 64 --batch 8    # smoke (the tests)
    python experiments/plan_memory.py --preset tiny --n-layers 2,8,32 --mesh 1,1,1 --seq 64 --batch 8
                                                      # compile time against depth, loop vs scan

Each configuration is compiled twice, with the decoder layers as a Python loop
(``scan_layers=False``) and scanned (``scan_layers=True``; ``--layouts`` picks
one), and both compile times are printed.

With ``--lora-rank`` the base is frozen in ``--param-dtype`` and only float32
adapters on ``--lora-targets`` (and their AdamW moments) are trained, as in a
``lora_rank`` run of the trainer.

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
    ap.add_argument("--param-dtype", default="float32", help="parameters (the frozen base with --lora-rank)")
    ap.add_argument("--master-weights", action="store_true",
                    help="float32 master weights and moments for low-precision parameters")
    ap.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank only (0: full)")
    ap.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    help="kernels that get adapters (comma-separated)")
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
    from research.training import TrainConfig, config as config_lib

    jax.config.update("jax_enable_compilation_cache", False)  # compile times are measured: always compile

    if jax.device_count() < n_dev:
        sys.exit(f"--mesh {args.mesh} needs {n_dev} devices; JAX has {jax.device_count()} (was it imported before?)")
    if args.preset not in PRESETS:
        ap.error(f"--preset {args.preset!r}: choose from {', '.join(PRESETS)}")
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    cfg = TrainConfig(model=args.preset, seq_len=args.seq, batch_size=args.batch, master_weights=args.master_weights,
                      lora_rank=args.lora_rank, lora_targets=targets,
                      model_overrides=(("param_dtype", args.param_dtype),), mesh=args.mesh)
    try:
        config_lib.validate(cfg)  # the trainer's own checks (master weights on float32, LoRA settings, ...)
    except config_lib.ConfigError as e:
        ap.error(str(e))
    depths = args.n_layers or (PRESETS[args.preset].n_layers,)
    rows = []
    for n_layers in depths:
        for scanned in {"both": (False, True), "loop": (False,), "scan": (True,)}[args.layouts]:
            mcfg = preset(args.preset, remat=args.remat, dtype=args.dtype, param_dtype=args.param_dtype,
                          n_layers=n_layers, scan_layers=scanned)
            rows.append(_plan(args, cfg, mcfg))
    return rows


def _plan(args, cfg, mcfg):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding

    from research import sharding
    from research.models import Transformer
    from research.training.step import make_optimizer, make_train_step, split_trainable
    from research.training.trainer import lora_config

    mesh = sharding.make_mesh(*args.mesh)
    mcfg = mcfg.replace(lora=lora_config(cfg))
    # trained parameters (all, or the adapters) and the frozen rest (none, or the base)
    graphdef, abs_params, abs_frozen = split_trainable(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))))
    param_sh, frozen_sh = sharding.state_shardings(abs_params, mesh), sharding.state_shardings(abs_frozen, mesh)
    placed = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # abstract, on the mesh
    abs_params, abs_frozen = jax.tree.map(placed, abs_params, param_sh), jax.tree.map(placed, abs_frozen, frozen_sh)
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
    step = make_train_step(graphdef, tx, cfg, 1, param_sh, opt_sh, batch_sh, frozen_sh)
    t0 = time.perf_counter()
    lowered = step.lower(abs_params, abs_opt, abs_frozen, abs_batch, jax.random.key(0), jnp.int32(0))
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()

    n_trained = sum(math.prod(a.shape) for a in jax.tree.leaves(abs_params))
    n_params = n_trained + sum(math.prod(a.shape) for a in jax.tree.leaves(abs_frozen))
    gib = lambda b: f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
    args_b, out_b, temp_b = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
    alias_b = getattr(mem, "alias_size_in_bytes", 0)
    peak = args_b + out_b - alias_b + temp_b
    layout = "scan" if mcfg.scan_layers else "loop"
    count = lambda n: f"{n / 1e6:,.2f}M" if n >= 1e5 else f"{n:,}"
    mode = (f"LoRA r={cfg.lora_rank} on {','.join(cfg.lora_targets)}: {count(n_trained)} float32 adapter entries "
            f"trained" if cfg.lora_rank else "full fine-tune" + (", float32 master weights" if cfg.master_weights else ""))
    print(f"{args.preset} ({mcfg.n_layers} layers, {layout}): {count(n_params)} parameters ({args.param_dtype}), "
          f"{mode}; activations {args.dtype}, remat {args.remat}; mesh data,fsdp,tensor = "
          f"{','.join(map(str, args.mesh))}; batch {args.batch} x {args.seq}")
    print(f"  per device: arguments {gib(args_b)}, outputs {gib(out_b)} (aliased {gib(alias_b)}), "
          f"temporaries {gib(temp_b)}; total {gib(peak)}")
    print(f"  lower {t1 - t0:.1f} s, compile {t2 - t1:.1f} s (XLA:CPU estimates)", flush=True)
    return {"layout": layout, "n_layers": mcfg.n_layers, "arguments": args_b, "outputs": out_b, "aliased": alias_b,
            "temporaries": temp_b, "total": peak, "lower_s": t1 - t0, "compile_s": t2 - t1, "params": n_params,
            "trained": n_trained, "lora_rank": cfg.lora_rank, "master_weights": cfg.master_weights}


if __name__ == "__main__":
    main()
