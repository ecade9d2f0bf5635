"""The packed transformer: packed == unpacked on every backend, ablation, padding,
sharding, and HF checkpoint round trips."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from research import models, sharding
from research.data import packing
from research.models import attention as attn
from research.models.transformer import apply_rope

CFG = models.preset("tiny", block_size=8)
LENGTHS = [5, 11, 3, 9]  # + EOS each -> 32 tokens; packed into one row of 40


def _samples(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, size=n).astype(np.int32) for n in lengths]


def _packed(seq_len=40, lengths=LENGTHS):
    b = packing.pack(_samples(lengths), seq_len, "concat")
    assert b["tokens"].shape[0] == 1
    return {k: jnp.asarray(b[k]) for k in ("tokens", "segment_ids", "positions", "targets", "loss_weights")}


def _token_losses(model, batch):
    logits = model(batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]) * batch["loss_weights"]


def _unpacked_reference(model, batch):
    """Each sample alone, unpadded (dense attention): logits, losses, summed loss."""
    seg = np.asarray(batch["segment_ids"])[0]
    graphdef, state = nnx.split(model)

    @jax.jit  # one program for all samples (eager, each op of each length compiles on its own)
    def alone(state, batch):
        m = nnx.merge(graphdef, state)
        logits, losses = [], []
        for s in range(1, seg.max() + 1):
            cols = np.flatnonzero(seg == s)
            one = {k: v[:, cols] for k, v in batch.items() if k != "segment_ids" and k != "positions"}
            logits.append(m(one))
            losses.append(_token_losses(m, one))
        return jnp.concatenate(logits, 1), jnp.concatenate(losses, 1)

    return alone(state, batch)


def _grads(model, loss_fn):
    graphdef, params = nnx.split(model, nnx.Param)
    return jax.jit(jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p))))(params)


BACKENDS = ["xla", "blockwise", "pallas_gpu"]


@pytest.fixture(scope="module")
def unpacked():
    """``_packed()``'s samples each alone through the ``xla`` model (the same for every
    backend, so computed once): logits, token losses, gradients of their sum."""
    batch = _packed()
    ref_model = models.Transformer(CFG.replace(attention="xla"), rngs=nnx.Rngs(0))
    logits, losses = _unpacked_reference(ref_model, batch)
    return logits, losses, _grads(ref_model, lambda m: _unpacked_reference(m, batch)[1].sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_unpacked(backend, unpacked):
    batch = _packed()
    real = np.asarray(batch["segment_ids"][0]) > 0
    model = models.Transformer(CFG.replace(attention=backend), rngs=nnx.Rngs(0))
    ref_logits, ref_losses, g_alone = unpacked
    np.testing.assert_allclose(model(batch)[:, real], ref_logits, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(_token_losses(model, batch)[:, real], ref_losses, atol=2e-5)
    g_packed = _grads(model, lambda m: _token_losses(m, batch).sum())
    chex.assert_trees_all_close(g_packed, g_alone, atol=5e-5, rtol=1e-4)


def test_splash_backend_matches_dense_in_interpret_mode():
    lengths = [40, 27, 30]  # + EOS -> 100 of 128
    batch = _packed(128, lengths)
    ref = models.Transformer(CFG.replace(attention="xla"), rngs=nnx.Rngs(0))
    model = models.Transformer(CFG.replace(attention="splash"), rngs=nnx.Rngs(0))
    real = np.asarray(batch["segment_ids"][0]) > 0
    np.testing.assert_allclose(model(batch)[:, real], ref(batch)[:, real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["xla", "blockwise"])
def test_ablation_switch_lets_segments_see_each_other(backend, unpacked):
    batch = _packed()
    real = np.asarray(batch["segment_ids"][0]) > 0
    ref_logits = unpacked[0]
    leaky = models.Transformer(CFG.replace(attention=backend, segment_mask=False), rngs=nnx.Rngs(0))
    out = leaky(batch)[:, real]
    first = np.asarray(batch["segment_ids"][0])[real] == 1
    np.testing.assert_allclose(out[:, first], ref_logits[:, first], atol=2e-5)  # segment 1 sees nothing earlier
    assert float(jnp.abs(out[:, ~first] - ref_logits[:, ~first]).max()) > 1e-3  # later segments do


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_rows_give_no_nan(backend):
    batch = _packed()
    batch = {k: jnp.concatenate([v, jnp.zeros_like(v)], 0) for k, v in batch.items()}  # row 2 is all padding
    model = models.Transformer(CFG.replace(attention=backend), rngs=nnx.Rngs(0))
    assert bool(jnp.isfinite(model(batch)).all())
    grads = _grads(model, lambda m: _token_losses(m, batch).sum() + 1e-3 * m(batch).sum())
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))


def test_cudnn_packed_layout_lists_each_rows_segments_with_minus_one_padding():
    """cuDNN's ragged layout (checked on a GPU by experiments/gpu_check.py): starts and
    lengths per row, -1 past the last segment; padding is in no segment."""
    seg = jnp.asarray([[1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 3, 3], [0, 0, 0, 0, 0, 0]])
    offsets, lens = attn.segments_to_offsets(seg, max_segments=3)
    np.testing.assert_array_equal(offsets, [[0, 3, -1, -1], [0, -1, -1, -1], [-1, -1, -1, -1]])
    np.testing.assert_array_equal(lens, [[3, 2, -1], [6, -1, -1], [-1, -1, -1]])
    offsets, lens = attn.segments_to_offsets(seg)  # default: room for one segment per token
    assert offsets.shape == (3, 7) and lens.shape == (3, 6)
    np.testing.assert_array_equal(lens[0], [3, 2, -1, -1, -1, -1])
    # a packed row of many one-token samples keeps them all
    many = jnp.arange(1, 65)[None]
    offsets, lens = attn.segments_to_offsets(many)
    np.testing.assert_array_equal(offsets[0, :64], np.arange(64))
    assert (lens == 1).all()


def test_blockwise_handles_lengths_not_divisible_by_the_block():
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 37, 4, 8))
    k, v = (jax.random.normal(x, (2, 37, 2, 8)) for x in ks[1:])
    seg = jnp.array([[1] * 20 + [2] * 10 + [0] * 7, [1] * 37])
    ref = attn.attention(q, k, v, seg, implementation="xla")
    out = attn.attention(q, k, v, seg, implementation="blockwise", block_size=16)
    np.testing.assert_allclose(out, ref, atol=1e-5)


def test_tokens_only_batch_means_one_sample_per_row():
    model = models.Transformer(CFG, rngs=nnx.Rngs(0))
    toks = jnp.asarray(np.random.default_rng(0).integers(3, 250, size=(2, 12)), jnp.int32)
    full = {"tokens": toks, "segment_ids": jnp.ones_like(toks), "positions": jnp.broadcast_to(jnp.arange(12), (2, 12))}
    np.testing.assert_allclose(model({"tokens": toks}), model(full), atol=1e-6)
    assert model({"tokens": toks}).shape == (2, 12, CFG.vocab_size)


def test_sharded_forward_matches_single_device_and_params_are_sharded():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    cfg = CFG.replace(attention="blockwise", d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=264)
    model = models.Transformer(cfg, rngs=nnx.Rngs(0))
    batch = _packed()
    batch = {k: jnp.concatenate([v] * 4, 0) for k, v in batch.items()}  # batch 4 over data x fsdp
    expect = model(batch)
    sharded = sharding.shard_model(models.Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
    q = sharded.layers[0].attn.q_proj.get_value()
    assert q.sharding.spec == P("fsdp", "tensor")
    assert sharded.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert q.addressable_shards[0].data.shape == (16, 16)
    graphdef, state = nnx.split(sharded)
    in_b = sharding.batch_sharding(mesh)
    fwd = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b), in_shardings=(sharding.state_shardings(state, mesh), in_b))
    out = fwd(state, jax.device_put(batch, in_b))
    np.testing.assert_allclose(out, expect, atol=2e-5)


# --- HF checkpoints --------------------------------------------------------------------


def _write_hf(path, cfg, dtype=np.float32, seed=0):
    """A random HF-layout checkpoint written with numpy + safetensors only."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for ours, (name, transpose) in models.hf.hf_names(cfg).items():
        model = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
        shape = models.hf.flat_params(model)[ours].get_value().shape
        shape = shape[::-1] if transpose else shape
        tensors[name] = (rng.normal(size=shape) * 0.1).astype(dtype)
    os.makedirs(path, exist_ok=True)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, ns in shards.items():
        save_file({n: tensors[n] for n in ns}, os.path.join(path, fname), metadata={"format": "pt"})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": {n: fn for fn, ns in shards.items() for n in ns}}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(models.hf.config_to_hf(cfg, "float32"), f)
    return tensors


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_hf_round_trip_keeps_names_shapes_and_values(tmp_path, qkv_bias):
    import ml_dtypes
    from safetensors.numpy import load_file

    cfg = CFG.replace(tie_embeddings=False, qkv_bias=qkv_bias)
    src = _write_hf(str(tmp_path / "src"), cfg, dtype=ml_dtypes.bfloat16)
    model = models.from_hf(str(tmp_path / "src"), dtype=jnp.bfloat16)
    models.save_hf(model, str(tmp_path / "out"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(out) == sorted(src)
    for name in src:
        assert out[name].dtype == src[name].dtype and out[name].shape == src[name].shape
        np.testing.assert_array_equal(out[name], src[name])
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["model_type"] == ("qwen2" if qkv_bias else "llama")


def test_hf_forward_quantities_by_hand(tmp_path):
    """An RMSNorm output and a RoPE rotation, computed by hand."""
    cfg = CFG.replace(tie_embeddings=True)
    tensors = _write_hf(str(tmp_path / "m"), cfg)
    model = models.from_hf(str(tmp_path / "m"))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 3, cfg.d_model)), jnp.float32)
    w = tensors["model.layers.0.input_layernorm.weight"]
    by_hand = np.asarray(x) / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * w
    np.testing.assert_allclose(model.layers[0].input_norm(x), by_hand, rtol=1e-5, atol=1e-6)
    # RoPE: position p rotates the pair (i, i + H/2) by p * theta^(-2i/H)
    H = cfg.hd
    v = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1, 1, H)), jnp.float32)
    p, i = 3, 1
    rot = apply_rope(v, jnp.array([[p]]), models.transformer.rope_frequencies(cfg))
    ang = p * cfg.rope_theta ** (-2 * i / H)
    a, b = float(v[0, 0, 0, i]), float(v[0, 0, 0, i + H // 2])
    np.testing.assert_allclose(rot[0, 0, 0, [i, i + H // 2]], [a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], rtol=1e-5)
    # the embedding row of a token is the HF row
    np.testing.assert_array_equal(model.embed(jnp.array([[7]]))[0, 0], tensors["model.embed_tokens.weight"][7])


def test_hf_bad_checkpoints_are_named(tmp_path):
    cfg = CFG.replace(tie_embeddings=False)
    _write_hf(str(tmp_path / "m"), cfg)
    os.remove(tmp_path / "m" / "model-00002-of-00002.safetensors")
    with pytest.raises(models.CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
        models.from_hf(str(tmp_path / "m"))
    os.makedirs(tmp_path / "pt")
    (tmp_path / "pt" / "config.json").write_text("{}")
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(models.CheckpointError, match="unpickle"):
        models.checkpoint_files(str(tmp_path / "pt"))
    _write_hf(str(tmp_path / "wide"), cfg.replace(d_model=48, head_dim=8))
    cfg_json = json.loads((tmp_path / "wide" / "config.json").read_text())
    cfg_json["hidden_size"] = 32
    (tmp_path / "wide" / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(models.CheckpointError, match="has shape"):
        models.from_hf(str(tmp_path / "wide"))
    with pytest.raises(FileExistsError):
        models.save_hf(models.Transformer(CFG, rngs=nnx.Rngs(0)), str(tmp_path / "m"))


def _numpy_gemma(t, hf, tokens):
    """Hugging Face's GemmaForCausalLM forward, written out in numpy (float64)."""
    D, N, K, H = hf["hidden_size"], hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    eps = hf["rms_norm_eps"]
    norm = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)
    gelu_tanh = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    T = len(tokens)
    inv = 1.0 / hf["rope_theta"] ** (np.arange(0, H, 2) / H)
    ang = np.arange(T)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rope = lambda x: x * cos[:, None] + np.concatenate([-x[..., H // 2:], x[..., : H // 2]], -1) * sin[:, None]
    E = t["model.embed_tokens.weight"].astype(np.float64)
    h = E[tokens] * np.sqrt(D)
    for i in range(hf["num_hidden_layers"]):
        w = lambda n: t[f"model.layers.{i}.{n}"].astype(np.float64)
        x = norm(h, w("input_layernorm.weight"))
        q = rope((x @ w("self_attn.q_proj.weight").T).reshape(T, N, H))
        k = rope((x @ w("self_attn.k_proj.weight").T).reshape(T, K, H))
        v = (x @ w("self_attn.v_proj.weight").T).reshape(T, K, H)
        k, v = np.repeat(k, N // K, axis=1), np.repeat(v, N // K, axis=1)
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H) + np.triu(np.full((T, T), -np.inf), 1)
        p = np.exp(s - s.max(-1, keepdims=True))
        o = np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), v).reshape(T, N * H)
        h = h + o @ w("self_attn.o_proj.weight").T
        x = norm(h, w("post_attention_layernorm.weight"))
        h = h + (gelu_tanh(x @ w("mlp.gate_proj.weight").T) * (x @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    return norm(h, t["model.norm.weight"].astype(np.float64)) @ E.T


def test_a_gemma_checkpoint_computes_hf_gemma_s_forward(tmp_path):
    """GeGLU, sqrt(d) embedding scale, (1 + w) norms, head_dim != d / heads, tied head."""
    cfg = models.preset("gemma_7b").replace(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            head_dim=16, d_ff=64, block_size=16)
    tensors = _write_hf(str(tmp_path / "g"), cfg)
    hf = json.loads((tmp_path / "g" / "config.json").read_text())
    assert hf["model_type"] == "gemma" and hf["hidden_activation"] == "gelu_pytorch_tanh"
    del hf["tie_word_embeddings"], hf["hidden_activation"]  # Gemma's defaults: tied, tanh-approximate gelu
    hf["hidden_act"] = "gelu"
    (tmp_path / "g" / "config.json").write_text(json.dumps(hf))
    model = models.from_hf(str(tmp_path / "g"))
    assert (model.cfg.activation, model.cfg.embed_scale, model.cfg.norm_offset, model.cfg.tie_embeddings) == \
        ("gelu_tanh", True, 1.0, True)
    tokens = np.array([5, 17, 200, 3, 99, 42, 7])
    ours = np.asarray(model({"tokens": jnp.asarray(tokens[None])}))[0]
    np.testing.assert_allclose(ours, _numpy_gemma(tensors, {**hf, "head_dim": 16}, tokens), rtol=2e-4, atol=2e-4)
    fresh = models.Transformer(cfg, rngs=nnx.Rngs(0))  # (1 + w) norms start at w = 0
    assert float(jnp.abs(fresh.final_norm.scale.get_value()).max()) == 0.0
    with pytest.raises(models.CheckpointError, match="model_type 'gemma2' is not supported"):
        models.hf.config_from_hf({**hf, "model_type": "gemma2"})


def test_a_qwen2_config_with_llama3_rope_scaling_keeps_its_qkv_bias():
    """The model type decides the bias; reading ``rope_scaling`` must not overwrite it."""
    hf = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 4, "intermediate_size": 64,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    cfg = models.hf.config_from_hf(hf)
    assert cfg.qkv_bias and dict(cfg.rope_scaling)["factor"] == 8.0


@pytest.mark.parametrize("mode", ["full", "dots_saveable"])
def test_remat_recomputes_the_same_loss_and_gradients(mode):
    batch = _packed()

    def loss_grads(cfg):
        graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        fn = lambda p: _token_losses(nnx.merge(graphdef, p), batch).sum()
        return jax.jit(jax.value_and_grad(fn))(params), jax.make_jaxpr(jax.grad(fn))(params)

    (l0, g0), plain = loss_grads(CFG)
    (l1, g1), remat = loss_grads(CFG.replace(remat=mode))
    assert "checkpoint" in str(remat) or "remat" in str(remat)
    assert "checkpoint" not in str(plain) and "remat" not in str(plain)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    chex.assert_trees_all_close(g1, g0, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="remat='some': choose one of none, full, dots_saveable"):
        CFG.replace(remat="some")
