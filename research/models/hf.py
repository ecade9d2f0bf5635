"""Hugging Face Llama-family checkpoints <-> our Transformer (no PyTorch involved).

Supported ``model_type``: llama, mistral, qwen2 (q/k/v biases) and gemma
(GeGLU, ``sqrt(d_model)``-scaled embeddings, ``1 + w`` RMSNorm, tied head;
``research.models.transformer``); any other is refused by name.

    model = from_hf("path/to/llama", dtype=jnp.float32)   # config.json + safetensors
    save_hf(model, "out/dir")                              # the same layout back

Name and layout mapping (HF stores linear weights ``[out, in]``; we store
kernels ``[in, out]``, hence the transposes):

=============================================  ======================================  =========
Hugging Face                                   ours                                    layout
=============================================  ======================================  =========
model.embed_tokens.weight          [V, D]      embedding                      [V, D]   as is
model.layers.i.self_attn.q_proj.weight [N*H, D]  layers[i].attn.q_proj        [D, N*H] transpose
model.layers.i.self_attn.k_proj.weight [K*H, D]  layers[i].attn.k_proj        [D, K*H] transpose
model.layers.i.self_attn.v_proj.weight [K*H, D]  layers[i].attn.v_proj        [D, K*H] transpose
model.layers.i.self_attn.o_proj.weight [D, N*H]  layers[i].attn.o_proj        [N*H, D] transpose
model.layers.i.self_attn.{q,k,v}_proj.bias       layers[i].attn.{q,k,v}_bias           as is (Qwen2)
model.layers.i.mlp.gate_proj.weight    [F, D]  layers[i].mlp.gate_proj        [D, F]   transpose
model.layers.i.mlp.up_proj.weight      [F, D]  layers[i].mlp.up_proj          [D, F]   transpose
model.layers.i.mlp.down_proj.weight    [D, F]  layers[i].mlp.down_proj        [F, D]   transpose
model.layers.i.input_layernorm.weight  [D]     layers[i].input_norm.scale     [D]      as is
model.layers.i.post_attention_layernorm.weight layers[i].post_attn_norm.scale          as is
model.norm.weight                      [D]     final_norm.scale               [D]      as is
lm_head.weight                     [V, D]      lm_head                        [D, V]   transpose
=============================================  ======================================  =========

q/k rows are in the HF "rotate-half" order (HF's conversion script already
permuted Meta's interleaved layout), which is the RoPE our model applies, so
no permutation happens here.  ``lm_head`` is absent when embeddings are tied.

A model with ``scan_layers`` reads and writes the same files: HF layer ``i``
is row ``i`` of the stacked parameter (``layers.attn.q_proj[i]``,
``research.models.scan``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import scan
from research.models.config import ModelConfig
from research.safetensors_io import (CheckpointError, SafetensorsError, ShardWriter, atomic_directory,
                                     checkpoint_files, json_object, no_room)
from research.safetensors_io import open_checked as _open
from research.models.transformer import Transformer


SUPPORTED = ("llama", "mistral", "qwen2", "gemma")
# HF activation names -> ours; Gemma's checkpoints say "gelu" but HF runs them with the tanh approximation
_ACT = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


def _activation(hf: dict, source: str) -> str:
    if hf.get("model_type") == "gemma":
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    else:
        act = hf.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in _ACT:
        raise CheckpointError(f"{source}: hidden activation {act!r} is not supported ({', '.join(_ACT)})")
    return _ACT[act]


_REQUIRED = object()


def _field(hf: dict, key: str, source: str, default=_REQUIRED, *, integer: bool = True):
    """``hf[key]`` (else ``default``): a positive integer, or with ``integer=False`` a
    positive number, as a float."""
    if key not in hf or (hf[key] is None and default is not _REQUIRED):
        if default is _REQUIRED:
            raise CheckpointError(f"{source}: {key} is missing")
        return default
    v = hf[key]
    ok = type(v) is int if integer else isinstance(v, (int, float)) and not isinstance(v, bool)
    if not ok or not v > 0:
        raise CheckpointError(f"{source}: {key}={v!r}: expected a positive {'integer' if integer else 'number'}")
    return v if integer else float(v)


def config_from_hf(hf: dict, *, source: str = "config.json", **overrides) -> ModelConfig:
    """The ``ModelConfig`` of an HF ``config.json``'s contents ``hf``; a field missing
    or out of range is a ``CheckpointError`` naming ``source`` and the key."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    kind = hf.get("model_type", "llama")
    if not isinstance(kind, str) or kind not in SUPPORTED:
        raise CheckpointError(f"{source}: model_type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    gemma = kind == "gemma"
    scaling = hf.get("rope_scaling") or {}
    rope = ()
    if scaling:
        rope_kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if rope_kind != "llama3":
            raise CheckpointError(f"{source}: rope_scaling type {rope_kind!r} is not supported (only 'llama3')")
        rope = tuple((k, _field(scaling, k, f"{source}: rope_scaling", integer=False))
                     for k in sorted(scaling) if k not in ("rope_type", "type"))
    n_heads = _field(hf, "num_attention_heads", source)
    return ModelConfig(
        vocab_size=_field(hf, "vocab_size", source),
        d_model=_field(hf, "hidden_size", source),
        n_layers=_field(hf, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=_field(hf, "num_key_value_heads", source, n_heads),
        head_dim=_field(hf, "head_dim", source, None),
        d_ff=_field(hf, "intermediate_size", source),
        rope_theta=_field(hf, "rope_theta", source, 10_000.0, integer=False),
        rope_scaling=rope,
        norm_eps=_field(hf, "rms_norm_eps", source, 1e-6, integer=False),
        tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),  # GemmaConfig ties by default
        qkv_bias=kind == "qwen2" or bool(hf.get("attention_bias", False)),
        activation=_activation(hf, source),
        embed_scale=gemma,
        norm_offset=1.0 if gemma else 0.0,
        max_position=_field(hf, "max_position_embeddings", source, 8192),
    ).replace(**overrides)


def config_to_hf(cfg: ModelConfig, dtype: str) -> dict:
    gemma = cfg.embed_scale and cfg.norm_offset == 1.0 and cfg.activation == "gelu_tanh" and not cfg.qkv_bias
    if (cfg.embed_scale or cfg.norm_offset) and not gemma:
        raise CheckpointError("save_hf: embed_scale/norm_offset without the rest of Gemma's configuration "
                              "(GeGLU, 1 + w norms, scaled embeddings) has no Hugging Face architecture")
    if not gemma and cfg.activation == "gelu_tanh":
        act = "gelu_pytorch_tanh"
    else:
        act = {"silu": "silu", "gelu": "gelu"}.get(cfg.activation, "gelu_pytorch_tanh")
    kind = "gemma" if gemma else "qwen2" if cfg.qkv_bias else "llama"
    out = {
        "architectures": [{"gemma": "GemmaForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.hd,
        "intermediate_size": cfg.d_ff,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_position,
        "hidden_act": act,
        "torch_dtype": dtype,
    }
    if gemma:
        out["hidden_activation"] = "gelu_pytorch_tanh"
    if cfg.rope_scaling:
        out["rope_scaling"] = {"rope_type": "llama3", **dict(cfg.rope_scaling)}
    return out


def hf_names(cfg: ModelConfig) -> dict:
    """Our flat parameter path (unscanned layout) -> (HF tensor name, transpose?)."""
    names = {"embedding": ("model.embed_tokens.weight", False), "final_norm.scale": ("model.norm.weight", False)}
    if not cfg.tie_embeddings:
        names["lm_head"] = ("lm_head.weight", True)
    for i in range(cfg.n_layers):
        p, h = f"layers.{i}", f"model.layers.{i}"
        for n in ("q", "k", "v", "o"):
            names[f"{p}.attn.{n}_proj"] = (f"{h}.self_attn.{n}_proj.weight", True)
        if cfg.qkv_bias:
            for n in ("q", "k", "v"):
                names[f"{p}.attn.{n}_bias"] = (f"{h}.self_attn.{n}_proj.bias", False)
        for n in ("gate", "up", "down"):
            names[f"{p}.mlp.{n}_proj"] = (f"{h}.mlp.{n}_proj.weight", True)
        names[f"{p}.input_norm.scale"] = (f"{h}.input_layernorm.weight", False)
        names[f"{p}.post_attn_norm.scale"] = (f"{h}.post_attention_layernorm.weight", False)
    return names


def flat_params(model: nnx.Module) -> dict:
    """``{dotted name: nnx.Param}`` of ``model``, in its own layout."""
    state = nnx.state(model, nnx.Param)
    flat = {}
    for path, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        key = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        flat[key] = v
    return flat


def read_config(directory: str, **overrides) -> ModelConfig:
    """``config_from_hf`` of ``directory/config.json``, its errors naming that file."""
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing (needed for the model shape)")
    return config_from_hf(json_object(path), source=path, **overrides)


def from_hf(path: str, dtype=jnp.float32, **overrides) -> Transformer:
    """Load a Llama-family HF directory (config.json + safetensors) into a Transformer."""
    cfg = read_config(path if os.path.isdir(path) else os.path.dirname(path), param_dtype=jnp.dtype(dtype).name,
                      **overrides)
    files = checkpoint_files(path)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    params = flat_params(model)
    if cfg.scan_layers:  # filled layer by layer, then set whole
        stacked = {n: np.empty(v.get_value().shape, jnp.dtype(dtype)) for n, v in params.items() if scan.is_scanned_name(n)}
        params = {u: _Row(stacked[n], i) for n in stacked for i, u in enumerate(scan.layer_names(n, cfg.n_layers))} | {
            n: v for n, v in params.items() if n not in stacked}
    handles = {}
    for ours, (theirs, transpose) in hf_names(cfg).items():
        if theirs not in files:
            raise CheckpointError(f"{path}: tensor {theirs} is missing")
        if files[theirs] not in handles:
            handles[files[theirs]] = _open(files[theirs])
        try:
            arr = handles[files[theirs]].read(theirs)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        arr = arr.T if transpose else arr
        want = params[ours].get_value().shape
        if arr.shape != tuple(want):
            raise CheckpointError(f"{files[theirs]}: tensor {theirs} has shape {arr.shape[::-1] if transpose else arr.shape}, "
                                  f"config.json implies {tuple(want)[::-1] if transpose else tuple(want)}")
        params[ours].set_value(jnp.asarray(arr, dtype=dtype))
    for h in handles.values():
        h.close()
    if cfg.scan_layers:
        for name, var in flat_params(model).items():
            if name in stacked:
                var.set_value(jnp.asarray(stacked.pop(name)))
    return model


class _Row:
    """Row ``i`` of a stacked numpy buffer, standing in for one layer's parameter."""

    def __init__(self, buf, i):
        self.buf, self.i = buf, i

    def get_value(self):
        return self.buf[self.i]

    def set_value(self, value):
        self.buf[self.i] = np.asarray(value)


def save_hf(model: Transformer, path: str, *, dtype=None, shard_size: int = 5 * 2**30, force: bool = False,
            extra_files: dict | None = None, copy_files=()) -> None:
    """Write ``model`` as an HF directory: config.json plus safetensors (sharded
    with an index above ``shard_size`` bytes), ``extra_files`` (``{name: text}``)
    and copies of ``copy_files`` (tokenizer files: paths, or ``(path, name)``).  Written to a temporary
    directory and renamed when complete; an existing ``path`` is refused unless
    ``force``.  A LoRA model is refused: save ``lora.merged(model)``, or its
    adapters with ``lora.save_peft``."""
    if model.cfg.lora is not None:
        raise ValueError("save_hf: the model has LoRA adapters; save research.models.lora.merged(model) "
                         "(or the adapters alone with lora.save_peft)")
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} exists; pass force=True to overwrite")
    cfg = model.cfg
    params = scan.to_flat_layout({n: v.get_value() for n, v in flat_params(model).items()}, scanned=False)
    tensors = {}
    for ours, (theirs, transpose) in hf_names(cfg).items():
        value = params[ours]
        arr = np.asarray(value if dtype is None else value.astype(dtype))
        tensors[theirs] = np.ascontiguousarray(arr.T if transpose else arr)
    out_dtype = str(next(iter(tensors.values())).dtype)
    why = no_room(path, sum(a.nbytes for a in tensors.values()))
    if why:
        raise OSError(errno.ENOSPC, f"{why}; free some space or choose another directory")
    with atomic_directory(path, force=force) as tmp:
        writer = ShardWriter(tmp, shard_size, layout=[(n, a.shape, a.dtype) for n, a in tensors.items()])
        for name, arr in tensors.items():
            writer.add(name, arr)
        writer.finish()
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config_to_hf(cfg, {"bfloat16": "bfloat16", "float16": "float16"}.get(out_dtype, "float32")), f, indent=2)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text)
        for src in copy_files:
            src, name = src if isinstance(src, tuple) else (src, os.path.basename(src))
            shutil.copy2(src, os.path.join(tmp, name))
