"""KV-cached greedy decoding against the plain reference: recompute the whole
prefix for every new token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research.models import Transformer, preset
from research.models.decoding import greedy


def reference_greedy(model, tokens, lengths, max_new):
    toks = np.array(tokens)
    B, W = toks.shape
    forward = jax.jit(lambda t, seg, pos: model.decode(model.embed(t), seg, pos))
    for i in range(max_new):
        cur = lengths + i
        seg = (np.arange(W)[None] < cur[:, None]).astype(np.int32)
        pos = np.broadcast_to(np.arange(W), (B, W))
        logits = np.asarray(forward(jnp.asarray(toks), jnp.asarray(seg), jnp.asarray(pos)))
        for b in range(B):
            if cur[b] < W:
                toks[b, cur[b]] = int(np.argmax(logits[b, cur[b] - 1]))
    return toks


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_cached_greedy_equals_recomputing_the_prefix(qkv_bias):
    cfg = preset("tiny", qkv_bias=qkv_bias)
    model = Transformer(cfg, rngs=nnx.Rngs(3))
    if qkv_bias:  # non-zero biases, so they matter
        model.layers[0].attn.k_bias.set_value(jnp.full_like(model.layers[0].attn.k_bias.get_value(), 0.3))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    W, max_new = 24, 7
    lengths = np.array([3, 10, 1, 20, 17], np.int32)  # the last two run off the end of the row
    tokens = rng.integers(3, cfg.vocab_size, (len(lengths), W)).astype(np.int32)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
    got = np.asarray(greedy(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), max_new))
    want = reference_greedy(model, tokens, lengths, max_new)
    np.testing.assert_array_equal(got, want)
    for b, n in enumerate(lengths):  # prompts are kept, and something was generated
        np.testing.assert_array_equal(got[b, :n], tokens[b, :n])
    assert (got[:3, 3:] != tokens[:3, 3:]).any()


def test_cache_slots_follow_the_index():
    model = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
    caches = model.init_cache(2, 8, index=jnp.array([0, 5], jnp.int32))
    x = model.embed(jnp.array([[5, 6], [7, 8]]))
    pos = jnp.array([[0, 1], [5, 6]])
    _, new = model.decode(x, jnp.ones((2, 2), jnp.int32), pos, caches)
    k = np.asarray(new[0]["k"])
    assert np.abs(k[0, :2]).sum() > 0 and np.abs(k[0, 2:]).sum() == 0
    assert np.abs(k[1, 5:7]).sum() > 0 and np.abs(k[1, :5]).sum() == 0 and np.abs(k[1, 7:]).sum() == 0
