"""NEFTune (Jain et al. 2023) as a jitted embedding transform.

    x_btd = model.embed(tokens)
    x_btd = neftune(x_btd, segment_ids_bt, jax.random.fold_in(key, step), alpha=5.0, train=True)
    logits = model.decode(x_btd, segment_ids_bt, positions_bt)

adds ``eps ~ U(-1, 1) * alpha / sqrt(L * d)`` to every embedding, where ``d``
is the embedding width and ``L`` is the length of *the sample the token
belongs to*: its segment in a packed row, its unpadded length in a padded row
(pass ``segment_ids = (tokens != pad)`` there).  Padding gets no noise, and
outside training (``train=False``, the default) the input comes back as is.

Hugging Face / TRL scale by the padded or packed row length instead, which
shrinks the noise of a short sample by ``sqrt(L_sample / L_row)`` (a
100-token sample packed into a 4096-row gets 6.4x too little); we don't.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def segment_lengths(segment_ids_bt):
    """Per token, the length of the segment it belongs to (0 on padding).

    Segments are contiguous runs within a row, as the packer writes them; the
    run bounds come from a cumulative max/min along the row, so the batch axis
    can stay sharded (no scatter, no gather).
    """
    seg = segment_ids_bt
    T = seg.shape[1]
    t = jnp.broadcast_to(jnp.arange(T), seg.shape)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    ends = jnp.concatenate([seg[:, 1:] != seg[:, :-1], jnp.ones_like(seg[:, :1], bool)], axis=1)
    first = jax.lax.cummax(jnp.where(starts, t, 0), axis=1)
    last = jax.lax.cummin(jnp.where(ends, t, T), axis=1, reverse=True)
    return jnp.where(seg > 0, last - first + 1, 0)


@functools.partial(jax.jit, static_argnames=("train",))
def neftune(embeds_btd, segment_ids_bt, key, alpha, train: bool = False):
    if not train:
        return embeds_btd
    d = embeds_btd.shape[-1]
    lengths = segment_lengths(segment_ids_bt).astype(jnp.float32)
    scale = alpha / jnp.sqrt(jnp.maximum(lengths, 1.0) * d)
    scale = jnp.where(segment_ids_bt > 0, scale, 0.0)[..., None]
    noise = jax.random.uniform(key, embeds_btd.shape, jnp.float32, -1.0, 1.0)
    return (embeds_btd.astype(jnp.float32) + noise * scale).astype(embeds_btd.dtype)
