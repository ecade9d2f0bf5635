"""A decoder-only transformer in Flax NNX that takes packed batches.

RMSNorm, rotary embeddings fed by per-segment ``positions``, SwiGLU MLP,
grouped-query attention through ``research.models.attention`` (causal AND
same segment), tied or untied embeddings, optional q/k/v biases (Qwen2).
Gemma's differences are three config fields: a GeGLU MLP (``activation``),
embeddings scaled by ``sqrt(d_model)`` (``embed_scale``, applied at the start
of ``decode``, so that a transform between ``embed`` and ``decode`` sees the
table's rows, as Hugging Face's embedding hooks do), and RMSNorm scaled by
``1 + w`` (``norm_offset``; such weights start at 0).

    model = Transformer(preset("tiny"), rngs=nnx.Rngs(0))
    logits_btv = model(batch)                     # batch: the packed format
    x_btd = model.embed(batch["tokens"])          # the embedding step alone ...
    logits_btv = model.decode(x_btd, segment_ids, positions)   # ... then the rest

``cfg.scan_layers`` stacks the decoder layers and runs them with
``jax.lax.scan`` (``research.models.scan``); ``cfg.remat`` rematerialises each
layer in the backward pass.  Logits are float32 in every dtype.  ``cfg.lora``
adds low-rank adapters to the targeted kernels (``research.models.lora``);
``decode(..., key=k)`` switches their dropout on (layer ``i`` uses
``fold_in(k, i)``, in either layout).

Splitting ``embed`` from ``decode`` is what lets a transform (NEFTune) sit
between them without patching anything.  Kernels are stored ``[in, out]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.models import lora, scan
from research.models.attention import attention
from research.models.config import ModelConfig


def _param(rngs, shape, axes, dtype, scale=None, init="normal"):
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros":
        value = jnp.zeros(shape, dtype)
    else:
        std = scale if scale is not None else 1.0 / math.sqrt(shape[0])
        value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
    """``x / rms(x) * (offset + w)`` in float32; ``offset`` is 0 (Llama) or 1 (Gemma)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs, offset: float = 0.0):
        self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="zeros" if offset else "ones")
        self.eps, self.offset = eps, offset

    def __call__(self, x_btd):
        x = x_btd.astype(jnp.float32)
        y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (y * (self.offset + self.scale.get_value().astype(jnp.float32))).astype(x_btd.dtype)


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
                "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies ``theta ** (-2i/H)``, with Llama-3 scaling if configured."""
    hd = cfg.hd
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    sc = dict(cfg.rope_scaling)
    if sc:
        factor, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = jnp.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = jnp.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return inv


def apply_rope(x_btnh, positions_bt, inv_freq):
    """Rotate-half RoPE (the Hugging Face layout): pairs are (i, i + H/2)."""
    angles = positions_bt[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
    cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return (x * cos + rotated * sin).astype(x_btnh.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.hd
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q_proj = _param(rngs, (D, N * H), ("embed", "q_heads"), pd)
        self.k_proj = _param(rngs, (D, K * H), ("embed", "kv_heads"), pd)
        self.v_proj = _param(rngs, (D, K * H), ("embed", "kv_heads"), pd)
        self.o_proj = _param(rngs, (N * H, D), ("q_heads", "embed"), pd)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (N * H,), ("q_heads",), pd, init="zeros")
            self.k_bias = _param(rngs, (K * H,), ("kv_heads",), pd, init="zeros")
            self.v_bias = _param(rngs, (K * H,), ("kv_heads",), pd, init="zeros")
        self.lora = lora.adapters(cfg, {"q_proj": (D, N * H, ("embed", "q_heads")), "k_proj": (D, K * H, ("embed", "kv_heads")),
                                        "v_proj": (D, K * H, ("embed", "kv_heads")), "o_proj": (N * H, D, ("q_heads", "embed"))},
                                  rngs=rngs)

    def __call__(self, x_btd, segment_ids_bt, positions_bt, inv_freq, kv_cache=None, key=None):
        """Attention over the packed row, or, with ``kv_cache``, over a cache.

        ``kv_cache = {"k": [B, S, K, H], "v": [B, S, K, H], "index": [B]}``: this
        call's ``T`` keys and values are written at ``index .. index + T - 1``
        of each row, then every query ``t`` attends to cache slots
        ``<= index + t`` (dense, causal; ``segment_ids_bt`` is not used).
        Returns ``(out, kv_cache)`` with the cache updated.  ``key``: the layer's
        adapter-dropout key (``None``: no dropout).
        """
        cfg = self.cfg
        B, T, _ = x_btd.shape
        dt = x_btd.dtype

        def proj(name):
            y = lora.project(x_btd, getattr(self, name), self.lora, name, key)
            return y + getattr(self, name[0] + "_bias").get_value().astype(dt) if cfg.qkv_bias else y

        q = proj("q_proj").reshape(B, T, cfg.n_heads, cfg.hd)
        k = proj("k_proj").reshape(B, T, cfg.n_kv_heads, cfg.hd)
        v = proj("v_proj").reshape(B, T, cfg.n_kv_heads, cfg.hd)
        out_proj = lambda o: lora.project(o.reshape(B, T, -1), self.o_proj, self.lora, "o_proj", key)
        q, k = apply_rope(q, positions_bt, inv_freq), apply_rope(k, positions_bt, inv_freq)
        if kv_cache is None:
            out = attention(q, k, v, segment_ids_bt, implementation=cfg.attention, segment_mask=cfg.segment_mask,
                            block_size=cfg.block_size)
            return out_proj(out)
        index = kv_cache["index"]
        write = jax.vmap(lambda c, new, i: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), i, axis=0))
        k_cache, v_cache = write(kv_cache["k"], k, index), write(kv_cache["v"], v, index)
        slot_s = jnp.arange(k_cache.shape[1])
        mask_bts = slot_s[None, None, :] <= (index[:, None] + jnp.arange(T)[None, :])[..., None]
        out = jax.nn.dot_product_attention(q, k_cache.astype(dt), v_cache.astype(dt), mask=mask_bts[:, None],
                                           implementation="xla")
        return out_proj(out), {"k": k_cache, "v": v_cache, "index": index}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.activation = cfg.activation
        self.gate_proj = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (D, F), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (F, D), ("mlp", "embed"), pd)
        self.lora = lora.adapters(cfg, {"gate_proj": (D, F, ("embed", "mlp")), "up_proj": (D, F, ("embed", "mlp")),
                                        "down_proj": (F, D, ("mlp", "embed"))}, rngs=rngs)

    def __call__(self, x_btd, key=None):
        proj = lambda x, name: lora.project(x, getattr(self, name), self.lora, name, key)
        h = _ACTIVATIONS[self.activation](proj(x_btd, "gate_proj")) * proj(x_btd, "up_proj")
        return proj(h, "down_proj")


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd, rngs=rngs, offset=cfg.norm_offset)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd, rngs=rngs, offset=cfg.norm_offset)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, segment_ids_bt, positions_bt, inv_freq, kv_cache=None, key=None):
        """The residual block; with ``kv_cache`` (see ``Attention``) returns ``(x, kv_cache)``."""
        h = self.attn(self.input_norm(x_btd), segment_ids_bt, positions_bt, inv_freq, kv_cache, key)
        h, kv_cache = h if kv_cache is not None else (h, None)
        x_btd = x_btd + h
        x_btd = x_btd + self.mlp(self.post_attn_norm(x_btd), key)
        return x_btd if kv_cache is None else (x_btd, kv_cache)


def _call_block(layer, x_btd, segment_ids_bt, positions_bt, inv_freq, key):
    return layer(x_btd, segment_ids_bt, positions_bt, inv_freq, key=key)


def _remat_policy(mode: str):
    return jax.checkpoint_policies.dots_saveable if mode == "dots_saveable" else None


def _remat(mode: str):
    """A block call under ``jax.checkpoint`` with the named policy (``ModelConfig.remat``):
    the backward pass recomputes what the policy does not save."""
    if mode == "none":
        return _call_block
    return nnx.remat(_call_block, policy=_remat_policy(mode))


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embedding = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd, scale=0.02)
        if cfg.scan_layers:  # one Block with [L, ...] parameters (research.models.scan)
            self.layers = scan.stacked_block(lambda: Block(cfg, rngs=rngs), cfg.n_layers)
        else:
            self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd, rngs=rngs, offset=cfg.norm_offset)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)

    def embed(self, tokens_bt):
        """Token embeddings ``[B, T, D]`` in the activation dtype."""
        return self.embedding.get_value()[tokens_bt].astype(jnp.dtype(self.cfg.dtype))

    def decode(self, x_btd, segment_ids_bt, positions_bt, kv_caches=None, *, key=None):
        """Everything after the embedding: blocks, final norm, logits ``[B, T, V]`` (float32).

        With ``kv_caches`` (one per layer, see ``Attention``; ``init_cache``)
        returns ``(logits, kv_caches)``: the incremental decoding of
        ``research.generate``.  ``key`` switches adapter dropout on (training).
        """
        if self.cfg.embed_scale:  # Gemma: the normaliser in the activation dtype, as HF rounds it
            x_btd = x_btd * jnp.asarray(math.sqrt(self.cfg.d_model), x_btd.dtype)
        inv_freq = rope_frequencies(self.cfg)
        L = self.cfg.n_layers
        keys = [None] * L if key is None else [jax.random.fold_in(key, i) for i in range(L)]
        new_caches = []
        if self.cfg.scan_layers:
            call = lambda layer, x, cache, k: layer(x, segment_ids_bt, positions_bt, inv_freq, cache, k)
            out = scan.scan_blocks(self.layers, x_btd, call, kv_caches, None if key is None else jnp.stack(keys),
                                   remat=self.cfg.remat != "none", remat_policy=_remat_policy(self.cfg.remat))
            x_btd, new_caches = out if kv_caches is not None else (out, None)
        elif kv_caches is None:
            block = _remat(self.cfg.remat)
            for layer, k in zip(self.layers, keys):
                x_btd = block(layer, x_btd, segment_ids_bt, positions_bt, inv_freq, k)
        else:
            for layer, cache, k in zip(self.layers, kv_caches, keys):
                x_btd, cache = layer(x_btd, segment_ids_bt, positions_bt, inv_freq, cache, k)
                new_caches.append(cache)
        x_btd = self.final_norm(x_btd)
        head = self.embedding.get_value().T if self.cfg.tie_embeddings else self.lm_head.get_value()
        # float32 logits: the head matmul accumulates and returns float32 whatever the activation dtype
        logits = jnp.matmul(x_btd, head.astype(x_btd.dtype), preferred_element_type=jnp.float32)
        return logits if kv_caches is None else (logits, new_caches)

    def init_cache(self, batch: int, size: int, index=None):
        """Empty per-layer KV caches of ``size`` slots, in the activation dtype."""
        cfg = self.cfg
        shape = (batch, size, cfg.n_kv_heads, cfg.hd)
        index = jnp.zeros((batch,), jnp.int32) if index is None else index
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return [{"k": zeros, "v": zeros, "index": index} for _ in range(cfg.n_layers)]

    def __call__(self, batch):
        tokens = batch["tokens"]
        segment_ids, positions = unpacked_defaults(batch)
        return self.decode(self.embed(tokens), segment_ids, positions)


def unpacked_defaults(batch):
    """``segment_ids`` and ``positions`` of a batch; a dict with only ``tokens``
    means one unpacked sample per row."""
    tokens = batch["tokens"]
    seg = batch.get("segment_ids")
    pos = batch.get("positions")
    if seg is None:
        seg = jnp.ones(tokens.shape, jnp.int32)
    if pos is None:
        pos = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return seg, pos
