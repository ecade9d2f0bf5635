"""Greedy decoding with a KV cache, for batched prompts of different lengths.

    out_bw = greedy(graphdef, params, tokens_bw, lengths_b, max_new=8)

``tokens_bw`` holds left-aligned prompts (row ``b``'s prompt is
``tokens_bw[b, :lengths_b[b]]``); ``W`` is also the cache size.  The prompt
is run once through the model (prefill, causal over the row), then each new
token costs one single-token step against the cache.  Token ``i`` of the
continuation is written at ``lengths_b + i`` while it fits in ``W``; the rest
of the row is returned as given.  Its tokens are exactly those of recomputing
the whole prefix for every new token (argmax of the logits at the last
position), up to float rounding of the attention sums.  Jitted once per
``(graphdef, W, max_new)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 4))
def greedy(graphdef, params, tokens_bw, lengths_b, max_new: int):
    model = nnx.merge(graphdef, params)
    B, W = tokens_bw.shape
    rows = jnp.arange(B)
    ones = jnp.ones((B, W), jnp.int32)
    pos_bw = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (B, W))
    logits, caches = model.decode(model.embed(tokens_bw), ones, pos_bw, model.init_cache(B, W))

    def put(toks, cur, logits_bv):  # the argmax goes to position cur (where it fits)
        nxt = jnp.argmax(logits_bv, -1).astype(toks.dtype)
        return toks.at[rows, jnp.minimum(cur, W - 1)].set(jnp.where(cur < W, nxt, toks[rows, jnp.minimum(cur, W - 1)]))

    toks = put(tokens_bw, lengths_b, logits[rows, lengths_b - 1])

    def step(i, carry):
        toks, caches = carry
        cur = jnp.minimum(lengths_b + i, W - 1)  # the token just written
        caches = [{**c, "index": cur} for c in caches]
        x = model.embed(toks[rows, cur][:, None])
        logits, caches = model.decode(x, ones[:, :1], cur[:, None], caches)
        return put(toks, lengths_b + i + 1, logits[:, 0]), caches

    toks, _ = jax.lax.fori_loop(0, max_new - 1, step, (toks, caches))
    return toks
