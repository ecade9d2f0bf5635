"""LoRA (Hu et al., 2021, arXiv:2106.09685): low-rank adapters on the decoder's linear maps.

For a target kernel ``W [in, out]`` (ours are stored ``[in, out]``) the adapted map is

    y = x @ W + s * dropout(x) @ A @ B        A [in, r], B [r, out]
    s = alpha / r      (alpha / sqrt(r) with rsLoRA, Kalajdzievski 2023)

``A`` starts uniform in ``±1/sqrt(in)`` (peft's Kaiming-uniform with a=√5), ``B``
at zero, so an adapted model starts exactly as its base.  ``A`` and ``B`` are
``LoRAParam``s (a subclass of ``nnx.Param``) in float32, whatever the base's
dtype; the trainer optimises them alone and keeps the base frozen.

    model = with_lora(base, LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")))
    tau = task_vector(model)       # s * A @ B on each adapted base leaf, zeros elsewhere
    plain = merged(model)          # the base with s * A @ B added: no adapters left
    mix = combine([m1, m2], [0.5, 0.5], "cat")   # still an adapter (peft's add_weighted_adapter)
    save_peft(model, "out/adapter")            # adapter_config.json + adapter_model.safetensors
    model = load_peft("out/adapter", base)     # peft's files onto a base model

Build adapted models with ``with_lora`` or ``load_peft``, which keep the given
base: a ``Transformer`` constructed with ``cfg.lora`` set draws its adapters
between the base's parameters, so its base differs from the adapter-free model
of the same seed.

Names.  Ours: ``layers.3.attn.lora.q_proj.a`` ``[in, r]`` and ``.b`` ``[r, out]``
(scanned layout: ``layers.attn.lora.q_proj.a [L, in, r]``).  peft's, for a Llama
causal LM: ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``
``[r, in]`` and ``lora_B.weight`` ``[out, r]`` (torch's ``[out, in]`` layout,
hence transposes).
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from research.merging.tree import path_name
from research.models import scan
from research.models.config import LORA_TARGETS, LoRAConfig
from research.safetensors_io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CheckpointError, atomic_directory, json_object

_MODULE = {t: ("attn", "self_attn") if t in ("q_proj", "k_proj", "v_proj", "o_proj") else ("mlp", "mlp")
           for t in LORA_TARGETS}


class LoRAParam(nnx.Param):
    """A low-rank adapter factor (``A`` or ``B``): the trained part of a LoRA model."""


class LoRA(nnx.Module):
    """The update ``s * dropout(x) @ A @ B`` of one ``[d_in, d_out]`` kernel.

    ``axes`` are the kernel's logical axes; ``A`` shards its input axis as the
    kernel does, ``B`` its output axis, and the rank axis is replicated.
    """

    def __init__(self, d_in: int, d_out: int, axes: tuple, cfg: LoRAConfig, *, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(rngs.params(), (d_in, cfg.rank), jnp.float32, -bound, bound)
        self.a = LoRAParam(a, logical_axes=(axes[0], None))
        self.b = LoRAParam(jnp.zeros((cfg.rank, d_out), jnp.float32), logical_axes=(None, axes[1]))
        self.scale = cfg.scale
        self.dropout = cfg.dropout

    def __call__(self, x_btd, key=None):
        """``x [..., d_in] -> [..., d_out]`` in ``x``'s dtype; dropout only when given a ``key``."""
        dt = x_btd.dtype
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, x_btd.shape)
            x_btd = jnp.where(keep, x_btd / (1.0 - self.dropout), 0).astype(dt)
        return (x_btd @ self.a.get_value().astype(dt)) @ self.b.get_value().astype(dt) * jnp.asarray(self.scale, dt)


def adapters(cfg, kernels: dict, *, rngs: nnx.Rngs):
    """An ``nnx.Dict`` of ``LoRA`` for the kernels of ``kernels`` (``{name: (d_in,
    d_out, axes)}``) that ``cfg.lora`` targets; ``None`` without LoRA."""
    if cfg.lora is None:
        return None
    return nnx.Dict({n: LoRA(*kernels[n], cfg.lora, rngs=rngs) for n in cfg.lora.targets if n in kernels})


def project(x_btd, kernel: nnx.Param, lora, name: str, key=None):
    """``x @ W`` plus the adapter of ``name`` if ``lora`` holds one; ``key`` (the
    layer's dropout key) is folded with the target's index."""
    y = x_btd @ kernel.get_value().astype(x_btd.dtype)
    if lora is not None and name in lora:
        k = None if key is None else jax.random.fold_in(key, LORA_TARGETS.index(name))
        y = y + lora[name](x_btd, k)
    return y


# --- whole models -------------------------------------------------------------------------

def _flat(state) -> dict:
    """``{dotted name: Variable}`` of an ``nnx.State`` (the Variables themselves)."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {path_name(path): v for path, v in leaves}


def split(model):
    """``(graphdef, adapters, base)``: the ``LoRAParam`` state and the rest of the parameters."""
    return nnx.split(model, LoRAParam, nnx.Param)


def with_lora(model, lora: LoRAConfig, *, seed: int = 0, shardings=None):
    """``model`` (a ``Transformer`` without adapters) with fresh adapters: the base
    parameters are ``model``'s own (not copied), ``A`` is drawn from ``seed``.
    ``shardings(abstract_state)`` gives the adapters' shardings (a mesh run);
    without it they are placed by default."""
    from research.models.transformer import Transformer  # noqa: PLC0415

    if model.cfg.lora is not None:
        raise ValueError("with_lora: the model already has adapters; use merged(model) first")
    cfg = model.cfg.replace(lora=lora)
    make = lambda: Transformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, abstract, _ = split(nnx.eval_shape(make))
    # only the adapters are outputs: the base's random initialisation is dead code
    init = jax.jit(lambda: split(make())[1], out_shardings=None if shardings is None else shardings(abstract))
    return nnx.merge(graphdef, init(), nnx.state(model, nnx.Param))


def deltas(model) -> dict:
    """``{base kernel name: s * A @ B}`` of ``model``'s adapters, in its own layout
    (a stacked ``[L, in, out]`` delta in the scanned layout), float32."""
    flat = _flat(nnx.state(model, LoRAParam))
    out = {}
    for name in flat:
        if name.endswith(".a"):
            kernel = name[: -len(".a")].replace(".lora.", ".")
            a, b = flat[name].get_value(), flat[name[:-2] + ".b"].get_value()
            out[kernel] = jnp.matmul(a, b) * model.cfg.lora.scale
    return out


def _with_values(state, fn):
    """``state`` with each Variable's value replaced by ``fn(dotted name, value)``."""
    return jax.tree_util.tree_map_with_path(lambda path, v: v.replace(fn(path_name(path), v.get_value())), state,
                                            is_leaf=lambda x: isinstance(x, nnx.Variable))


def task_vector(model):
    """The task vector of a LoRA model on its base's leaves: an ``nnx.State`` shaped
    like the base parameters, ``s * A @ B`` on adapted kernels and zeros elsewhere
    (in the base's dtypes), so every merge method applies to it unchanged."""
    d = deltas(model)
    return _with_values(split(model)[2], lambda n, w: d[n].astype(w.dtype) if n in d else jnp.zeros_like(w))


def merged(model):
    """A plain ``Transformer`` (``cfg.lora=None``) whose kernels are ``W + s * A @ B``,
    rounded once to the base's dtype."""
    from research.models.transformer import Transformer  # noqa: PLC0415

    d = deltas(model)
    params = _with_values(split(model)[2],
                          lambda n, w: (w.astype(jnp.float32) + d[n]).astype(w.dtype) if n in d else w)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model.cfg.replace(lora=None), rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, params)


def base_of(model):
    """The base ``Transformer`` of a LoRA model (its own parameters, no adapters)."""
    from research.models.transformer import Transformer  # noqa: PLC0415

    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model.cfg.replace(lora=None), rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, split(model)[2])


COMBINATIONS = ("linear", "cat", "svd")


def combine(models, weights, how: str = "svd", *, rank: int | None = None, clamp: float | None = None):
    """Adapters of several LoRA models (one base) combined into one adapter that stays
    low-rank: peft's ``add_weighted_adapter`` with ``combination_type`` = ``how``.

    With ``w_i`` the weights and ``s_i`` each adapter's scale, per kernel:

    - ``linear``: ``A = sum sqrt(w_i s_i) A_i``, ``B = sum sqrt(w_i s_i) B_i`` (equal
      ranks; ``B A`` then holds cross terms ``A_i B_j``, as in peft);
    - ``cat``: ``A = [w_1 s_1 A_1 | w_2 s_2 A_2 | ...]``, ``B`` stacked to match: rank
      ``sum r_i``, and ``A B = sum w_i s_i A_i B_i`` exactly;
    - ``svd``: the rank-``rank`` (default ``max r_i``) truncated SVD of
      ``sum w_i s_i A_i B_i``: ``B = U S``, ``A = V^T`` in peft's ``[out, in]``
      layout; with ``clamp``, both clipped to ``±q``, ``q`` the ``clamp`` quantile of
      their entries (peft's ``svd_clamp``).

    The result has ``alpha = rank`` (scale 1) and the union of the targets; a
    kernel an adapter does not target gets nothing from it.  Returns a model on
    ``models[0]``'s base.
    """
    if how not in COMBINATIONS:
        raise ValueError(f"combine: how={how!r}; choose from {', '.join(COMBINATIONS)}")
    if len(models) != len(weights) or not models:
        raise ValueError(f"combine: {len(models)} models and {len(weights)} weights")
    cfgs = [m.cfg.lora for m in models]
    if any(c is None for c in cfgs):
        raise ValueError("combine: every model needs adapters")
    ranks = [c.rank for c in cfgs]
    if how == "linear" and len(set(ranks)) > 1:
        raise ValueError(f"combine 'linear': the adapters' ranks differ ({ranks}); use 'cat' or 'svd'")
    if how == "linear" and any(w < 0 for w in weights):
        raise ValueError(f"combine 'linear': weights {list(weights)} must be >= 0 (it takes sqrt(w * s))")
    new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": rank or max(ranks)}[how]
    targets = tuple(t for t in LORA_TARGETS if any(t in c.targets for c in cfgs))
    out = with_lora(base_of(models[0]), LoRAConfig(rank=new_rank, alpha=float(new_rank), targets=targets))
    arrays = [adapter_arrays(m) for m in models]
    new = {}
    for name, var in _flat(nnx.state(out, LoRAParam)).items():
        if not name.endswith(".a"):
            continue
        kernel = name[:-2]
        parts = [(float(w) * c.scale, a[kernel + ".a"], a[kernel + ".b"])
                 for w, c, a in zip(weights, cfgs, arrays) if kernel + ".a" in a]
        if how == "linear":
            A = sum(math.sqrt(ws) * pa for ws, pa, _ in parts)
            B = sum(math.sqrt(ws) * pb for ws, _, pb in parts)
        elif how == "cat":
            A = jnp.concatenate([ws * pa for ws, pa, _ in parts], -1)
            B = jnp.concatenate([pb for _, _, pb in parts], -2)
            pad = new_rank - A.shape[-1]  # kernels some adapters leave out
            A = jnp.pad(A, [(0, 0)] * (A.ndim - 1) + [(0, pad)])
            B = jnp.pad(B, [(0, 0)] * (B.ndim - 2) + [(0, pad), (0, 0)])
        else:
            A, B = _svd_factors(sum(ws * (pa @ pb) for ws, pa, pb in parts), new_rank, clamp, kernel)
        new[name], new[kernel + ".b"] = A, B
    for name, var in _flat(nnx.state(out, LoRAParam)).items():
        var.set_value(jnp.asarray(new[name], jnp.float32))
    return out


def _svd_factors(delta, rank: int, clamp, name: str):
    """``(A [.., in, r], B [.., r, out])`` from the truncated SVD of peft's ``delta^T``."""
    d_out_in = jnp.swapaxes(delta, -1, -2)
    if rank > min(d_out_in.shape[-2:]):
        raise ValueError(f"combine 'svd': rank {rank} exceeds the size {d_out_in.shape[-2:]} of {name}")
    u, sv, vh = jnp.linalg.svd(d_out_in, full_matrices=False)
    u = u[..., :rank] * sv[..., None, :rank]  # B = U S  [out, r]
    vh = vh[..., :rank, :]  # A = V^T [r, in]
    if clamp is not None:  # per kernel (per layer of a stacked one)
        lead = u.shape[:-2]
        dist = jnp.concatenate([u.reshape(*lead, -1), vh.reshape(*lead, -1)], -1)
        hi = jnp.quantile(dist, clamp, axis=-1)[..., None, None]
        u, vh = jnp.clip(u, -hi, hi), jnp.clip(vh, -hi, hi)
    return jnp.swapaxes(vh, -1, -2), jnp.swapaxes(u, -1, -2)


# --- peft's files ---------------------------------------------------------------------------

def peft_names(cfg) -> dict:
    """Our adapter factor name (unscanned layout) -> peft's tensor name (both transposed)."""
    names = {}
    for i in range(cfg.n_layers):
        for t in cfg.lora.targets:
            ours, theirs = _MODULE[t]
            for f, F in (("a", "A"), ("b", "B")):
                names[f"layers.{i}.{ours}.lora.{t}.{f}"] = f"base_model.model.model.layers.{i}.{theirs}.{t}.lora_{F}.weight"
    return names


def peft_config(lora: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": sorted(lora.targets), "use_rslora": lora.rslora,
        "use_dora": False, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
    }


def adapter_arrays(model) -> dict:
    """``{our factor name: array}`` of ``model``'s adapters, in its own layout."""
    return {n: v.get_value() for n, v in _flat(nnx.state(model, LoRAParam)).items()}


def peft_tensors(cfg, arrays: dict) -> dict:
    """peft's ``{tensor name: [out, in]-layout numpy array}`` from ``adapter_arrays``
    (host arrays, either layout) of a model with config ``cfg``."""
    flat = scan.to_flat_layout({n: np.asarray(a) for n, a in arrays.items()}, scanned=False)
    return {theirs: np.ascontiguousarray(flat[ours].T) for ours, theirs in peft_names(cfg).items()}


def save_peft(model, path: str, *, base_model_name_or_path: str | None = None, force: bool = False) -> None:
    """Write ``model``'s adapters as a peft LoRA directory (float32 tensors)."""
    if model.cfg.lora is None:
        raise ValueError("save_peft: the model has no adapters")
    write_peft(peft_tensors(model.cfg, adapter_arrays(model)), model.cfg.lora, path,
               base_model_name_or_path=base_model_name_or_path, force=force)


def write_peft(tensors: dict, lora: LoRAConfig, path: str, *, base_model_name_or_path: str | None = None,
               force: bool = False) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` in ``path``, written to a
    temporary directory renamed when complete; an existing ``path`` is refused
    unless ``force``."""
    with atomic_directory(path, force=force) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(peft_config(lora, base_model_name_or_path), f, indent=2)


def read_peft_config(path: str) -> tuple[LoRAConfig, dict]:
    """The ``LoRAConfig`` of a peft adapter directory and its raw config; anything
    this model cannot represent is a ``CheckpointError`` naming the key."""
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{cfg_path}: missing (not a peft adapter directory)")
    raw = json_object(cfg_path)
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {raw.get('peft_type')!r}; only 'LORA' adapters are supported")
    unsupported = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                   "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}}
    for key, plain in unsupported.items():
        if raw.get(key, plain) not in (plain, None, [], {}, False, "none"):
            raise CheckpointError(f"{cfg_path}: {key}={raw[key]!r} is not supported (only {plain!r})")
    targets = raw.get("target_modules")
    if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise CheckpointError(f"{cfg_path}: target_modules={targets!r}: expected a list of module names "
                              f"among {', '.join(LORA_TARGETS)}")
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise CheckpointError(f"{cfg_path}: target_modules names {bad[0]!r}; this model adapts only "
                              f"{', '.join(LORA_TARGETS)}")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    if not (type(raw.get("r")) is int and raw["r"] > 0):
        raise CheckpointError(f"{cfg_path}: r={raw.get('r')!r}: expected a positive integer")
    if not (number(raw.get("lora_alpha")) and raw["lora_alpha"] > 0):
        raise CheckpointError(f"{cfg_path}: lora_alpha={raw.get('lora_alpha')!r}: expected a positive number")
    dropout, rslora = raw.get("lora_dropout") or 0.0, raw.get("use_rslora") or False
    if not (number(dropout) and 0 <= dropout < 1):
        raise CheckpointError(f"{cfg_path}: lora_dropout={dropout!r}: expected a number in [0, 1)")
    if not isinstance(rslora, bool):
        raise CheckpointError(f"{cfg_path}: use_rslora={rslora!r}: expected true or false")
    lora = LoRAConfig(rank=raw["r"], alpha=float(raw["lora_alpha"]), targets=tuple(sorted(targets)),
                      dropout=float(dropout), rslora=rslora)
    return lora, raw


_PEFT_KEY = re.compile(r"\.(lora_[AB])(\.[^.]+)?\.weight$")


def load_peft(path: str, model):
    """``model`` (a base ``Transformer`` without adapters) with the adapters of the
    peft directory ``path``.  Missing, unexpected or misshapen tensors are
    ``CheckpointError``s naming the tensor and the file."""
    lora, _ = read_peft_config(path)
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    out = with_lora(model, lora)
    wanted = peft_names(out.cfg)
    try:
        stored = load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    # peft drops the adapter name on save; accept ".lora_A.default.weight" too
    found = {_PEFT_KEY.sub(r".\1.weight", n): n for n in stored}
    extra = sorted(set(found) - set(wanted.values()))
    if extra:
        raise CheckpointError(f"{file}: tensor {found[extra[0]]} matches no adapter of this model ({len(extra)} "
                              f"unexpected; targets {', '.join(lora.targets)}, {out.cfg.n_layers} layers)")
    params = _flat(nnx.state(out, LoRAParam))
    shapes = {u: v.get_value().shape[1:] if out.cfg.scan_layers else v.get_value().shape
              for n, v in params.items() for u in scan.layer_names(n, out.cfg.n_layers)}
    flat = {}
    for ours, theirs in wanted.items():
        if theirs not in found:
            raise CheckpointError(f"{file}: tensor {theirs} is missing")
        flat[ours] = stored[found[theirs]].T
        if flat[ours].shape != shapes[ours]:
            raise CheckpointError(f"{file}: tensor {theirs} has shape {flat[ours].T.shape}, the base model and "
                                  f"r={lora.rank} imply {shapes[ours][::-1]}")
    flat = scan.to_flat_layout(flat, scanned=out.cfg.scan_layers, n_layers=out.cfg.n_layers)
    for name, var in params.items():
        var.set_value(jnp.asarray(flat[name], jnp.float32))
    return out
