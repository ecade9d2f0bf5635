"""Mixed precision: low-precision parameters with float32 master weights.

With ``TrainConfig.master_weights`` and a bfloat16 (or float16)
``param_dtype``, the model's parameters are bf16 (the forward and backward
passes read them and produce bf16 gradients), while the optimizer keeps a
float32 copy of every parameter and float32 moments:

    grads_f32  = grads.astype(float32)
    master    <- master + AdamW(grads_f32)          (float32 throughout)
    params     = master.astype(param_dtype)         (round to nearest)

Small updates accumulate in the master copy instead of being rounded away
in bf16 (an update below half a bf16 ulp of its weight is lost without it).
The master copy lives in the optimizer state, so checkpoints hold it and a
resume is exact.  The logits and the loss are float32 in either mode
(``Transformer.decode``, ``research.training.loss``).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


class MasterWeightsState(NamedTuple):
    master: optax.Params  # float32 copy of the parameters
    inner: optax.OptState  # the wrapped optimizer's state, over the master copy


def master_weights(tx: optax.GradientTransformation, dtype=jnp.float32) -> optax.GradientTransformation:
    """``tx`` run on a ``dtype`` master copy of the parameters.

    Its updates are the change of the master copy; apply them with
    ``apply_updates`` below, which sets the parameters to the rounded master
    copy (not ``params + updates``, which would round twice).
    """

    def init(params):
        master = jax.tree.map(lambda p: p.astype(dtype), params)
        return MasterWeightsState(master, tx.init(master))

    def update(grads, state, params=None):
        del params
        grads = jax.tree.map(lambda g: g.astype(dtype), grads)
        updates, inner = tx.update(grads, state.inner, state.master)
        return updates, MasterWeightsState(optax.apply_updates(state.master, updates), inner)

    return optax.GradientTransformation(init, update)


def apply_updates(params, updates, opt_state):
    """The parameters after a step: the rounded master copy under ``master_weights``,
    else ``optax.apply_updates``."""
    if isinstance(opt_state, MasterWeightsState):
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
    return optax.apply_updates(params, updates)
