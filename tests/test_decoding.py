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



def test_one_compiled_program_serves_every_max_new():
    from research.models import decoding

    model = Transformer(preset("tiny"), rngs=nnx.Rngs(5))
    graphdef, params = nnx.split(model, nnx.Param)
    lengths = np.array([2, 5], np.int32)
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :2], tokens[1, :5] = [7, 8], [9, 10, 11, 12, 13]
    outs = {}
    for max_new in (1, 4, 6):
        outs[max_new] = np.asarray(greedy(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths), max_new))
        if max_new == 1:
            compiled = decoding.sample._cache_size()
    assert decoding.sample._cache_size() == compiled
    for max_new, got in outs.items():  # a shorter budget is a prefix of a longer one
        np.testing.assert_array_equal(got, reference_greedy(model, tokens, lengths, max_new))

def test_cache_slots_follow_the_index():
    model = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
    caches = model.init_cache(2, 8, index=jnp.array([0, 5], jnp.int32))
    x = model.embed(jnp.array([[5, 6], [7, 8]]))
    pos = jnp.array([[0, 1], [5, 6]])
    _, new = model.decode(x, jnp.ones((2, 2), jnp.int32), pos, caches)
    k = np.asarray(new[0]["k"])
    assert np.abs(k[0, :2]).sum() > 0 and np.abs(k[0, 2:]).sum() == 0
    assert np.abs(k[1, 5:7]).sum() > 0 and np.abs(k[1, :5]).sum() == 0 and np.abs(k[1, 7:]).sum() == 0


# --- research.generate ---------------------------------------------------------


def test_the_nucleus_keeps_the_fewest_most_probable_tokens_reaching_top_p():
    from research.models.decoding import nucleus

    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    kept = lambda p: np.isfinite(np.asarray(nucleus(logits, p)))[0].tolist()
    assert kept(0.4) == [False, True, False, False]  # 0.5 alone reaches 0.4
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3
    assert kept(0.9) == [True, True, False, True]  # 0.5 + 0.3 + 0.15
    assert kept(1.0) == [True, True, True, True]


def _tiny():
    return Transformer(preset("tiny"), rngs=nnx.Rngs(5))


def test_batched_prompts_of_different_lengths_generate_what_each_generates_alone():
    from research import generate

    model = _tiny()
    prompts = ["copy: abc\n", "reverse: a much longer prompt\n", "x"]
    batched = generate(model, prompts, max_new_tokens=12)
    assert batched == [generate(model, [p], max_new_tokens=12)[0] for p in prompts]
    ids = generate(model, [[10, 11, 12]], max_new_tokens=5)
    assert len(ids[0]) == 5 and ids == generate(model, [[10, 11, 12]], max_new_tokens=5, cache_size=64)


def test_sampling_is_fixed_by_its_key_and_a_tiny_nucleus_is_greedy():
    from research import generate

    model, p = _tiny(), ["copy: abc\n", "sort: zyx\n"]
    a = generate(model, p, 10, temperature=1.0, key=jax.random.key(1))
    assert a == generate(model, p, 10, temperature=1.0, key=jax.random.key(1))
    assert a != generate(model, p, 10, temperature=1.0, key=jax.random.key(2))
    assert generate(model, p, 10, temperature=1.0, top_p=1e-6, key=jax.random.key(3)) == generate(model, p, 10)
    with pytest.raises(ValueError, match="needs an explicit key"):
        generate(model, p, 10, temperature=0.7)


def test_rows_stop_at_eos_stop_ids_and_stop_strings():
    from research import generate
    from research.data.tokenizers import ByteTokenizer

    model = _tiny()
    free = generate(model, [[20, 21]], max_new_tokens=12)[0]
    cut = free[4]
    stopped = generate(model, [[20, 21]], max_new_tokens=12, stop=[cut])[0]
    assert stopped == free[: free.index(cut)]  # the stop token itself is not returned
    text = generate(model, ["copy: abc\n"], max_new_tokens=12)[0]
    two = text[3:5]  # a two-character stop string: cut in the decoded text
    assert generate(model, ["copy: abc\n"], max_new_tokens=12, stop=[two])[0] == text[: text.find(two)]
    eos_at_cut = type("Tok", (ByteTokenizer,), {"eos_id": cut})()  # a tokenizer whose EOS is that token
    assert generate(model, [[20, 21]], max_new_tokens=12, tokenizer=eos_at_cut)[0] == stopped
