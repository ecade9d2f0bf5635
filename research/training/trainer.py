"""The fine-tuning loop: packed batches, NEFTune, sharded jit step, orbax
checkpoints with exact resume, per-task evaluation, CSV + TensorBoard metrics.

    result = train(config, "runs/my_run")

Resume is exact: the data iterator state is saved with the weights and the
NEFTune key is ``fold_in(key, step)``, so stopping at step N and resuming to
2N gives bitwise the parameters of an uninterrupted 2N-step run (on the CPU).
A NaN/Inf loss stops training naming the step (the last good checkpoint
stays); Ctrl-C, SIGTERM and SIGHUP are deferred to the next step boundary (the
step being computed has donated its inputs), which saves a consistent
checkpoint and raises ``stop_signals.Stopped``; a second signal raises it at
once, without saving.

Multi-process runs (``research.distributed``) run this same loop in every
process.  The global batch is the same whatever the process count (see
``research.data.pipeline``); each process places its rows.  Checkpoints are
written collectively by orbax (each process its shards, process 0 the
metadata and the data state).  Process 0 alone writes the run's config,
metrics and progress bar.  Evaluation is SPMD: every process runs the same
jitted generation over the sharded parameters and gets the gathered
results; process 0 records them.  A stop signal seen by any process stops
all of them at the same step boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from research import distributed, sharding, stop_signals
from research.data import pipeline
from research.models import Transformer, from_hf, lora, preset, scan
from research.models.hf import read_config
from research.models.config import LoRAConfig
from research.training import data as data_lib, run_config
from research.training.checkpoint import Checkpointer, CheckpointSaveError
from research.training.config import ConfigError, TrainConfig, validate
from research.training.evaluate import evaluate
from research.training.metrics import MetricWriter, NullWriter
from research.training.step import make_optimizer, split_trainable, train_step_for


class TrainingDiverged(RuntimeError):
    pass


@dataclasses.dataclass
class TrainResult:
    graphdef: object
    params: object
    step: int
    history: list
    eval: dict
    tokens_per_sec: float


class _StopAtBoundary(stop_signals.Stopped):
    """A stop seen between steps: the state is consistent and gets saved."""


class _DeferredInterrupt:
    """Turns the first Ctrl-C, SIGTERM or SIGHUP into a flag checked between steps
    (``signum``: the first signal's number, or None)."""

    def __init__(self):
        self.signum = None

    def _handler(self, signum, frame):
        if self.signum is not None:  # a second signal: give up on the clean stop
            raise stop_signals.Stopped(signum)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        with stop_signals.handled(self._handler, (signal.SIGINT, *stop_signals.CAUGHT)):
            yield self


def model_config(cfg: TrainConfig):
    """The base model's config (without adapters; see ``lora_config``)."""
    return preset(cfg.model, **dict(cfg.model_overrides))


def lora_config(cfg: TrainConfig) -> LoRAConfig | None:
    if not cfg.lora_rank:
        return None
    return LoRAConfig(rank=cfg.lora_rank, alpha=float(cfg.lora_alpha), targets=tuple(cfg.lora_targets),
                      dropout=float(cfg.lora_dropout))


# model_overrides that shape the computation, not the weights: they apply to an HF init too
_RUNTIME_FIELDS = ("attention", "segment_mask", "block_size", "dtype", "remat", "scan_layers")


def build_model(cfg: TrainConfig, mesh):
    """The model of ``cfg`` on ``mesh``: the base (initialised in place, or read from
    ``init_from``), with fresh adapters drawn from ``cfg.seed`` for a LoRA run."""
    model = _build_base(cfg, mesh)
    if not cfg.lora_rank:
        return model
    return lora.with_lora(model, lora_config(cfg), seed=cfg.seed,
                          shardings=lambda abstract: sharding.state_shardings(abstract, mesh))


def check_hf_overrides(cfg: TrainConfig) -> None:
    """``model_overrides`` may set how an HF model computes (``_RUNTIME_FIELDS``) and
    its parameter dtype; a shape field must agree with its ``config.json``."""
    hf = read_config(cfg.init_from)
    for k, v in cfg.model_overrides:
        if k not in (*_RUNTIME_FIELDS, "param_dtype") and getattr(hf, k) != v:
            raise ConfigError(f"model_overrides: {k}={v!r} contradicts {os.path.join(cfg.init_from, 'config.json')}, "
                              f"which gives {k}={getattr(hf, k)!r}; drop the override (the checkpoint fixes the shape)")


def vocab_rows(cfg: TrainConfig) -> int:
    """The embedding rows of the model ``cfg`` trains (from ``config.json`` for an HF init)."""
    hf = data_lib.hf_init_dir(cfg)
    return read_config(hf).vocab_size if hf else model_config(cfg).vocab_size


def _build_base(cfg: TrainConfig, mesh):
    """Initialised in place, or read from ``init_from`` (an HF directory, or a run
    directory's latest parameters in either layer layout)."""
    mcfg = model_config(cfg)
    make = lambda c=mcfg: Transformer(c, rngs=nnx.Rngs(cfg.seed))
    if data_lib.hf_init_dir(cfg):
        check_hf_overrides(cfg)
        runtime = {k: v for k, v in cfg.model_overrides if k in _RUNTIME_FIELDS}
        model = from_hf(cfg.init_from, dtype=jnp.dtype(mcfg.param_dtype), **runtime)
        return sharding.shard_model(model, mesh)
    if cfg.init_from:
        ck = Checkpointer(os.path.join(cfg.init_from, "checkpoints"), save_every=0, keep=1, async_save=False)
        try:
            if ck.latest() is None:
                raise FileNotFoundError(f"init_from={cfg.init_from}: no checkpoint there")
            saved = ck.param_shapes(ck.latest())
            if any("/lora/" in n for n in saved):
                raise ConfigError(f"init_from={cfg.init_from}: a LoRA run (its checkpoints hold adapters only). "
                                  f"Start from its merged model instead: research.models.lora.merged, or "
                                  f"research-merge with its adapter directory {os.path.join(cfg.init_from, 'adapter')}")
            saved_scanned = any(scan.is_scanned_name(n.replace("/", ".")) for n in saved)
            graphdef, params = nnx.split(nnx.eval_shape(lambda: make(mcfg.replace(scan_layers=saved_scanned))), nnx.Param)
            target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                  params, sharding.state_shardings(params, mesh))
            params = ck.restore_params(ck.latest(), target)  # read straight into its shards
        finally:
            ck.close()
        if saved_scanned == mcfg.scan_layers:
            return nnx.merge(graphdef, params)
        # the other layer layout: stacked or unstacked on the mesh, in one compiled program
        out_graphdef, out_abstract = nnx.split(nnx.eval_shape(make), nnx.Param)
        convert = jax.jit(lambda p: nnx.state(scan.to_layout(nnx.merge(graphdef, p), mcfg.scan_layers), nnx.Param),
                          out_shardings=sharding.state_shardings(out_abstract, mesh))
        return nnx.merge(out_graphdef, convert(params))
    # initialised in place: one compiled program, each device computing only its shards
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1], out_shardings=sharding.state_shardings(abstract, mesh))()
    return nnx.merge(graphdef, state)


def _move_aside_old_run(workdir: str) -> None:
    """A fresh start never leaves an older run's checkpoints where a resume would find them."""
    old = os.path.join(workdir, "checkpoints")
    if os.path.isdir(old) and os.listdir(old):
        aside = f"{old}.replaced-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.getpid()}"
        os.replace(old, aside)
        print(f"fresh start: the previous run's checkpoints in {old} were moved to {aside}")


def _eval_row(results: dict) -> dict:
    """``evaluate``'s results as metric columns; a text task has no accuracy."""
    return {f"eval/{t}/{k}": v for t, r in results.items() for k, v in r.items() if v is not None}


def _stop_requested(interrupt) -> int:
    """The signal that asked any process to stop (the largest number, where several
    did), else 0: all of them stop (and save) at the same step."""
    if jax.process_count() == 1:
        return interrupt.signum or 0
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(interrupt.signum or 0))))


def train(cfg: TrainConfig, workdir: str, *, stop_at: int | None = None, resume: bool = True,
          evaluate_at_end: bool = True, override_resume: bool = False) -> TrainResult:
    """Train ``cfg`` in ``workdir`` (checkpoints, metrics); resumes from its latest checkpoint.

    The resolved config is stored in ``workdir/train_config.json``; resuming with a
    config that changes the computation is a ``run_config.ResumeMismatch``
    unless ``override_resume`` (see ``research.training.run_config``).
    """
    cfg = validate(cfg)  # every field, before any work
    lead = distributed.is_lead()
    if not resume and lead:
        _move_aside_old_run(workdir)
    distributed.barrier("research.train: workdir ready")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=cfg.save_every, keep=cfg.keep,
                        clean_stale=True)
    start = ckpt.latest() if resume else None
    try:
        if start is not None:
            run_config.check_resume(cfg, workdir, start, override=override_resume)
            if start >= cfg.steps and lead:
                print(f"{workdir}: the run is complete at step {start} (steps={cfg.steps}); nothing to train. "
                      "Raise steps to continue it")
        if lead:
            run_config.write(cfg, workdir)
        return _train(cfg, workdir, ckpt, start or 0, stop_at, evaluate_at_end)
    except BaseException:
        with contextlib.suppress(Exception):  # the error in flight is the one to report
            ckpt.close()
        raise
    finally:
        ckpt.close()  # waits for a save in flight; never leaves orbax's threads running at exit


def _train(cfg: TrainConfig, workdir: str, ckpt: Checkpointer, start: int, stop_at, evaluate_at_end) -> TrainResult:
    tok = data_lib.tokenizer_for(cfg, vocab_rows(cfg))
    sources, mixing = data_lib.sources_for(cfg, tok)  # every bad input named before the model is built
    names = [s.name for s in sources]
    mesh = sharding.make_mesh(*cfg.mesh)
    model = build_model(cfg, mesh)
    graphdef, params, frozen = split_trainable(model)  # a LoRA run trains the adapters alone
    tx = make_optimizer(cfg)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    opt_state = jax.jit(tx.init)(params)
    # moments follow their parameters; scalars (step counts) are replicated on the mesh
    on_mesh = lambda x: x if isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh else jax.device_put(x, NamedSharding(mesh, P()))
    opt_state = jax.tree.map(on_mesh, opt_state)
    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    batch_sh = sharding.batch_sharding(mesh)
    n_tasks = len(sources)
    step_fn = train_step_for(graphdef, cfg, n_tasks, param_sh, opt_sh, batch_sh, jax.tree.map(lambda x: x.sharding, frozen))

    pcfg = pipeline.PipelineConfig(tasks=tuple(names), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                   mixing=mixing, seed=cfg.seed, chunk_size=cfg.chunk_size)
    data = pipeline.make(pcfg, sources, tokenizer=tok)  # the global batches; each process places its rows
    if start:
        params, opt_state, data_state = ckpt.restore(start, params, opt_state)
        data.set_state(data_state)
    lead = distributed.is_lead()
    writer = MetricWriter(os.path.join(workdir, "logs")) if lead else NullWriter()
    key = jax.random.key(cfg.seed)
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    history, real_tokens, t0 = [], 0, time.perf_counter()
    bar = tqdm(total=end, initial=start, desc="train", disable=not (cfg.progress and lead),
                dynamic_ncols=True)
    step = start
    interrupt = _DeferredInterrupt()
    try:
        with interrupt.installed():
            while step < end:
                if signum := _stop_requested(interrupt):
                    raise _StopAtBoundary(signum)
                batch = next(data)
                real_tokens += int((batch["segment_ids"] > 0).sum())
                params, opt_state, m = step_fn(params, opt_state, frozen, sharding.global_batch(batch, batch_sh), key,
                                               jnp.int32(step))
                loss, gnorm, unorm = float(m["loss"]), float(m["grad_norm"]), float(m["update_norm"])
                step += 1
                if not all(map(math.isfinite, (loss, gnorm, unorm))):
                    # finite loss, gradient and update keep the (finite) parameters finite;
                    # anything else is never saved, so every checkpoint on disk is good
                    raise TrainingDiverged(
                        f"step {step}: loss {loss}, gradient norm {gnorm}, update norm {unorm}; stopping before "
                        f"saving it. The last good checkpoint is step {ckpt.latest()} in {ckpt.directory}"
                    )
                row = {"loss": loss, "grad_norm": gnorm}
                tw = np.asarray(distributed.to_host(m["task_weight_sum"]))
                tl = np.asarray(distributed.to_host(m["task_loss_sum"]))
                row.update({f"loss/{t}": tl[i] / tw[i] for i, t in enumerate(names) if tw[i] > 0})
                history.append(row)
                tps = real_tokens / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}")
                bar.update(1)
                if step % cfg.log_every == 0 or step == end:
                    writer.write(step, {**row, "tokens_per_sec": tps})
                ckpt.save(step, params, opt_state, data.get_state())
                if cfg.eval_every and step % cfg.eval_every == 0 and step < end:
                    res = evaluate(graphdef, nnx.merge_state(params, frozen), sources, tok, samples=cfg.eval_samples,
                                   max_new_tokens=cfg.max_new_tokens, seq_len=cfg.seq_len)
                    writer.write(step, _eval_row(res))
    except KeyboardInterrupt as stop:
        bar.close()
        if isinstance(stop, _StopAtBoundary):
            ckpt.save(step, params, opt_state, data.get_state(), force=True)
            if lead:
                print(f"\ninterrupted ({stop_signals.name(stop)}): saved step {step} to {ckpt.directory}")
        else:  # a second signal, mid-step: the in-flight state may be donated
            print(f"\ninterrupted twice: not saving; the last checkpoint is step {ckpt.latest()}")
        ckpt.close()
        writer.close()
        raise stop_signals.Stopped(stop_signals.signum(stop)) from None
    except BaseException as e:  # divergence, a failed save, ...: the caller closes the checkpointer
        bar.close()
        with contextlib.suppress(Exception):
            writer.close()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and not isinstance(e, CheckpointSaveError):
            raise CheckpointSaveError(errno.ENOSPC, f"out of disk space writing the run's logs in {workdir}; the last "
                                                    f"complete checkpoint is step {ckpt.latest()}") from None
        raise
    bar.close()
    ckpt.save(step, params, opt_state, data.get_state(), force=True)
    ckpt.close()
    params = nnx.merge_state(params, frozen)  # the whole model from here on
    if cfg.lora_rank:
        _save_adapter(cfg, workdir, graphdef, params)
    results = {}
    if evaluate_at_end and step == cfg.steps:
        results = evaluate(graphdef, params, sources, tok, samples=cfg.eval_samples,
                           max_new_tokens=cfg.max_new_tokens, seq_len=cfg.seq_len)
        writer.write(step, _eval_row(results))
    writer.close()
    return TrainResult(graphdef, params, step, history, results, real_tokens / max(time.perf_counter() - t0, 1e-9))


def _save_adapter(cfg: TrainConfig, workdir: str, graphdef, params) -> None:
    """``workdir/adapter``: the trained adapters in peft's format (gathered by every
    process, written by process 0)."""
    model = nnx.merge(graphdef, params)
    arrays = {n: distributed.to_host(a) for n, a in lora.adapter_arrays(model).items()}
    if distributed.is_lead():
        hf_base = cfg.init_from and os.path.isfile(os.path.join(cfg.init_from, "config.json"))
        lora.write_peft(lora.peft_tensors(model.cfg, arrays), model.cfg.lora, os.path.join(workdir, "adapter"),
                        base_model_name_or_path=os.path.abspath(cfg.init_from) if hf_base else None, force=True)
