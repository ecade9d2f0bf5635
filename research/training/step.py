"""The pure train step: embed -> NEFTune -> decode -> loss -> AdamW, under jax.jit
with explicit shardings."""

from __future__ import annotations

import fnmatch

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from research import sharding
from research.merging.tree import leaf_names
from research.models import lora, scan
from research.neftune import neftune
from research.training import precision
from research.training.config import ConfigError, TrainConfig
from research.training.loss import packed_loss


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup, cosine decay to ``end_lr_fraction``, global-norm clipping.

    Parameters named by ``cfg.freeze`` are routed to ``optax.set_to_zero``: their
    update is exactly zero, and they hold no moments and take no part in the
    clipping norm.  With ``cfg.master_weights`` it runs on a float32 master copy
    of the parameters (``research.training.precision``).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1), cfg.lr * cfg.end_lr_fraction
    )
    adamw = optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay),
    )
    tx = adamw if not cfg.freeze else optax.multi_transform(
        {"train": adamw, "frozen": optax.set_to_zero()}, lambda params: trainable_labels(params, cfg.freeze))
    return precision.master_weights(tx) if cfg.master_weights else tx


def trainable_labels(params, freeze: tuple):
    """``"frozen"`` for each leaf whose dotted name matches a glob of ``freeze``, else
    ``"train"``.  A pattern that matches nothing, or freezing every leaf, is a ``ConfigError``.

    Patterns read the same in both layer layouts: a stacked leaf of a
    ``scan_layers`` model (``layers.mlp.up_proj``) stands for its per-layer names
    (``layers.0.mlp.up_proj``, ...) and is frozen when the pattern selects all
    of them, or names it directly; selecting only some of its layers is a
    ``ConfigError`` (one leaf has one optimizer label).
    """
    names = leaf_names(params)
    layer_counts = [np.shape(x)[0] if scan.is_scanned_name(n) else 0
                    for n, x in zip(names, jax.tree.leaves(params))]
    expanded = [scan.layer_names(n, L) if L else [n] for n, L in zip(names, layer_counts)]
    selects = lambda pattern, i: [fnmatch.fnmatchcase(u, pattern) for u in expanded[i]]
    for pattern in freeze:
        if not any(fnmatch.fnmatchcase(n, pattern) or any(selects(pattern, i)) for i, n in enumerate(names)):
            raise ConfigError(f"freeze: pattern {pattern!r} matches no parameter; names look like "
                              f"{', '.join(names[:4])}, ...")
    labels = []
    for i, n in enumerate(names):
        direct = any(fnmatch.fnmatchcase(n, p) for p in freeze)
        hit = [any(h) for h in zip(*(selects(p, i) for p in freeze))] if freeze else [False]
        if not direct and any(hit) and not all(hit):
            chosen = [j for j, h in enumerate(hit) if h]
            raise ConfigError(f"freeze={freeze!r} selects layers {chosen} of the stacked parameter {n} "
                              f"({len(hit)} layers, scan_layers=True): freeze all of its layers, or set "
                              "model_overrides scan_layers=False to freeze single layers")
        labels.append("frozen" if direct or all(hit) else "train")
    if "train" not in labels:
        raise ConfigError(f"freeze={freeze!r} freezes every parameter: nothing to train")
    return jax.tree.unflatten(jax.tree.structure(params), labels)


def split_trainable(model):
    """``(graphdef, trained, frozen)``: a LoRA model's adapters and its base
    (``research.models.lora``); otherwise every parameter, and an empty state."""
    if model.cfg.lora is not None:
        return lora.split(model)
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, nnx.State({})


def loss_and_aux(graphdef, params, batch, key, step, *, alpha: float, n_tasks: int, train: bool, frozen=None,
                 mesh=None):
    """The packed loss of ``nnx.merge(graphdef, params, frozen)``.  NEFTune's noise
    uses ``fold_in(key, step)``; adapter dropout ``fold_in(fold_in(key, step), 1)``.
    On a ``mesh``, the embeddings and logits are pinned to the batch sharding
    (``sharding.constrain``)."""
    model = nnx.merge(graphdef, params) if frozen is None else nnx.merge(graphdef, params, frozen)
    pin = (lambda x, axes: x) if mesh is None else (lambda x, axes: sharding.constrain(x, axes, mesh))
    step_key = jax.random.fold_in(key, step)
    x_btd = pin(model.embed(batch["tokens"]), ("batch", "length", "embed"))
    if alpha > 0:
        x_btd = neftune(x_btd, batch["segment_ids"], step_key, alpha, train=train)
    dropout = train and model.cfg.lora is not None and model.cfg.lora.dropout > 0
    logits_btv = model.decode(x_btd, batch["segment_ids"], batch["positions"],
                              key=jax.random.fold_in(step_key, 1) if dropout else None)
    return packed_loss(pin(logits_btv, ("batch", "length", "vocab")), batch, n_tasks)


def make_train_step(graphdef, tx, cfg: TrainConfig, n_tasks: int, param_sh, opt_sh, batch_sh, frozen_sh=None):
    """``(params, opt_state, frozen, batch, key, step) -> (params, opt_state, metrics)``, jitted.

    ``params`` are the trained parameters (the adapters of a LoRA run) and
    ``frozen`` the rest (an empty state in full fine-tuning): no gradient, no
    optimizer state, not donated.
    """

    def step_fn(params, opt_state, frozen, batch, key, step):
        fn = lambda p: loss_and_aux(graphdef, p, batch, key, step, alpha=cfg.neftune_alpha, n_tasks=n_tasks,
                                    train=True, frozen=frozen, mesh=batch_sh.mesh)
        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = precision.apply_updates(params, updates, opt_state)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates), **aux}
        return params, opt_state, metrics

    frozen_sh = nnx.State({}) if frozen_sh is None else frozen_sh
    return jax.jit(
        step_fn,
        in_shardings=(param_sh, opt_sh, frozen_sh, batch_sh, None, None),
        out_shardings=(param_sh, opt_sh, NamedSharding(batch_sh.mesh, P())),  # metrics: on every process
        donate_argnums=(0, 1),
    )


# the fields of TrainConfig that the compiled step depends on (optimizer, schedule, NEFTune)
STEP_FIELDS = ("lr", "warmup_steps", "steps", "end_lr_fraction", "weight_decay", "b1", "b2", "clip_norm",
               "neftune_alpha", "freeze", "master_weights", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout")
_STEPS: dict = {}  # a few recent steps, by what they compile from


def train_step_for(graphdef, cfg: TrainConfig, n_tasks: int, param_sh, opt_sh, batch_sh, frozen_sh=None):
    """``make_train_step`` for ``cfg``, shared by every run whose step compiles to the same program.

    Runs in one process that differ only in data, seed or workdir (the experts
    of a sweep) reuse one jitted function, so they trace and compile once.
    """
    frozen_sh = nnx.State({}) if frozen_sh is None else frozen_sh
    trees = (param_sh, opt_sh, batch_sh, frozen_sh)
    key = (graphdef, n_tasks, tuple(getattr(cfg, f) for f in STEP_FIELDS),
           *(jax.tree.structure(t) for t in trees), *(tuple(jax.tree.leaves(t)) for t in trees))
    if key not in _STEPS:
        _STEPS[key] = make_train_step(graphdef, make_optimizer(cfg), cfg, n_tasks, param_sh, opt_sh, batch_sh,
                                      frozen_sh)
        while len(_STEPS) > 8:
            _STEPS.pop(next(iter(_STEPS)))
    return _STEPS[key]


def make_eval_loss(graphdef, n_tasks: int):
    return jax.jit(
        lambda params, batch: loss_and_aux(graphdef, params, batch, jax.random.key(0), 0, alpha=0.0, n_tasks=n_tasks, train=False)
    )


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def zeros_like_tree(tree):
    return jax.tree.map(jnp.zeros_like, tree)
