"""The loss on packed batches: weighted token cross-entropy, overall and per task."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def packed_loss(logits_btv, batch, n_tasks: int):
    """Mean of ``CE(logits, targets)`` over ``loss_weights``; also per-task sums.

    Returns ``(loss, {"loss_sum", "weight_sum", "task_loss_sum" [n_tasks],
    "task_weight_sum" [n_tasks]})``; padding (task id -1) counts for no task.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_btv.astype(jnp.float32), batch["targets"])
    w = batch["loss_weights"].astype(jnp.float32)
    total = jnp.sum(ce * w)
    count = jnp.sum(w)
    onehot = jax.nn.one_hot(batch["task_ids"], n_tasks, dtype=jnp.float32)  # -1 -> all zeros
    aux = {
        "loss_sum": total,
        "weight_sum": count,
        "task_loss_sum": jnp.einsum("bt,btk->k", ce * w, onehot),
        "task_weight_sum": jnp.einsum("bt,btk->k", w, onehot),
    }
    return total / jnp.maximum(count, 1.0), aux
