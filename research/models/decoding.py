"""Decoding with a fixed-size KV cache, for batched prompts of different lengths.

    out_bw, n_new_b = sample(graphdef, params, tokens_bw, lengths_b, key, max_new=8,
                             temperature=0.7, top_p=0.9, stop_ids=(eos,))
    out_bw = greedy(graphdef, params, tokens_bw, lengths_b, max_new=8)

``tokens_bw`` holds left-aligned prompts (row ``b``'s prompt is
``tokens_bw[b, :lengths_b[b]]``); ``W`` is also the cache size.  The prompt
is run once through the model (prefill, causal over the row), then each new
token costs one single-token step against the cache.  Token ``i`` of the
continuation is written at ``lengths_b + i`` while it fits in ``W``; the rest
of the row is returned as given.

* **Greedy** (``temperature == 0``): the argmax of the last position's
  logits.  Its tokens are exactly those of recomputing the whole prefix for
  every new token, up to float rounding of the attention sums.
* **Sampling** (``temperature > 0``): from ``softmax(logits / temperature)``
  restricted to the nucleus, the smallest set of most probable tokens whose
  probability reaches ``top_p`` (Holtzman et al. 2020; tokens tied with the
  last one kept are kept too).  New token ``i`` of every row is drawn with
  ``fold_in(key, i)``, so a key fixes the whole output.
* **Stopping**: a row stops after emitting one of ``stop_ids`` (that token is
  written and counted); the loop ends when every row has stopped, run off
  its row, or made ``max_new`` tokens.  ``n_new_b`` counts each row's tokens.

Jitted once per ``(graphdef, B, W, temperature, top_p, stop_ids)``; ``max_new`` is a traced
bound (any value runs the same program).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def nucleus(logits_bv, top_p: float):
    """``logits_bv`` with every token outside the ``top_p`` nucleus set to ``-inf``."""
    if top_p >= 1.0:
        return logits_bv
    sorted_bv = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv  # mass of the strictly more probable tokens
    cut_b = jnp.min(jnp.where(before_bv < top_p, sorted_bv, jnp.inf), axis=-1)
    return jnp.where(logits_bv >= cut_b[:, None], logits_bv, -jnp.inf)


def _choose(logits_bv, key, i, temperature: float, top_p: float):
    if temperature == 0:
        return jnp.argmax(logits_bv, -1)
    scaled_bv = nucleus(logits_bv / temperature, top_p)
    return jax.random.categorical(jax.random.fold_in(key, i), scaled_bv, axis=-1)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("temperature", "top_p", "stop_ids"))
def sample(graphdef, params, tokens_bw, lengths_b, key, *, max_new: int, temperature: float = 0.0,
           top_p: float = 1.0, stop_ids: tuple = ()):
    model = nnx.merge(graphdef, params)
    B, W = tokens_bw.shape
    rows = jnp.arange(B)
    ones = jnp.ones((B, W), jnp.int32)
    pos_bw = jnp.broadcast_to(jnp.arange(W, dtype=jnp.int32), (B, W))
    stops = jnp.asarray(stop_ids if stop_ids else (-1,), jnp.int32)
    logits, caches = model.decode(model.embed(tokens_bw), ones, pos_bw, model.init_cache(B, W))

    def put(toks, done_b, n_b, cur_b, logits_bv, i):  # the choice goes to position cur (where it fits)
        live_b = ~done_b & (cur_b < W)
        nxt_b = _choose(logits_bv, key, i, temperature, top_p).astype(toks.dtype)
        at_b = jnp.minimum(cur_b, W - 1)
        toks = toks.at[rows, at_b].set(jnp.where(live_b, nxt_b, toks[rows, at_b]))
        stopped_b = live_b & jnp.isin(nxt_b, stops)
        return toks, done_b | stopped_b | (cur_b + 1 >= W), n_b + live_b.astype(jnp.int32)

    done_b = jnp.zeros((B,), bool)
    toks, done_b, n_b = put(tokens_bw, done_b, jnp.zeros((B,), jnp.int32), lengths_b, logits[rows, lengths_b - 1], 0)

    def cond(carry):
        i, _, done_b, _, _ = carry
        return (i < max_new) & ~jnp.all(done_b)

    def step(carry):
        i, toks, done_b, n_b, caches = carry
        cur_b = jnp.minimum(lengths_b + i - 1, W - 1)  # the token just written
        caches = [{**c, "index": cur_b} for c in caches]
        logits, caches = model.decode(model.embed(toks[rows, cur_b][:, None]), ones[:, :1], cur_b[:, None], caches)
        toks, done_b, n_b = put(toks, done_b, n_b, lengths_b + i, logits[:, 0], i)
        return i + 1, toks, done_b, n_b, caches

    _, toks, _, n_b, _ = jax.lax.while_loop(cond, step, (jnp.int32(1), toks, done_b, n_b, caches))
    return toks, n_b


def greedy(graphdef, params, tokens_bw, lengths_b, max_new: int, stop_ids: tuple = ()):
    """Greedy continuation: ``sample`` at temperature 0 (no key needed); returns the tokens."""
    return sample(graphdef, params, tokens_bw, lengths_b, jax.random.key(0), max_new=max_new,
                  stop_ids=tuple(stop_ids))[0]
