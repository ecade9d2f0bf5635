"""Scanned decoder layers: one stacked ``Block`` run by ``jax.lax.scan``.

With ``ModelConfig.scan_layers`` the model holds a single ``Block`` whose
parameters carry a leading ``[L]`` axis (logical axis ``"layers"``,
replicated), and the forward pass is one ``jax.lax.scan`` over it, so the
compiled program holds one layer body whatever the depth.  The two layouts
hold the same numbers under different names:

    unscanned  layers.3.attn.q_proj   [D, N*H]
    scanned    layers.attn.q_proj     [L, D, N*H]   (row 3 is layer 3)

``stacked_block`` builds the ``L`` layers exactly as the unscanned model does
(same ``rngs`` draws, in the same order) before stacking them, so a model
and its scanned twin start from identical parameters.  ``to_flat_layout``
converts a flat ``{name: array}`` between the layouts (checkpoints, HF
import and export, merging); ``to_layout`` converts a model.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LAYER_AXIS = "layers"
_UNSCANNED = re.compile(r"^layers\.(\d+)\.(.+)$")
_SCANNED = re.compile(r"^layers\.(?!\d+\.)(.+)$")

_is_var = lambda x: isinstance(x, nnx.Variable)


def stacked_block(make_block, n_layers: int) -> nnx.Module:
    """``n_layers`` blocks from ``make_block()``, stacked into one block whose every
    parameter has a leading ``[n_layers]`` axis."""
    blocks = [make_block() for _ in range(n_layers)]
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]

    def stack(*vs):
        axes = vs[0].get_metadata().get("logical_axes") or (None,) * vs[0].get_value().ndim
        return vs[0].replace(jnp.stack([v.get_value() for v in vs]), logical_axes=(LAYER_AXIS, *axes))

    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=_is_var))


def scan_blocks(layers: nnx.Module, x_btd, call, kv_caches=None, keys=None, remat_policy=None, remat: bool = False):
    """Run the stacked ``layers`` over ``x_btd`` with ``jax.lax.scan``.

    ``call(layer, x_btd, kv_cache, key)`` applies one (unstacked) block and
    returns ``x_btd``, or ``(x_btd, kv_cache)`` when ``kv_cache`` is given.
    ``kv_caches`` is the per-layer list of ``Attention`` caches; it is stacked
    for the scan and returned as a list again.  ``keys`` (``[L]`` random keys
    or ``None``) gives layer ``i`` its key.  With ``remat`` the layer body is
    under ``jax.checkpoint(policy=remat_policy)``.
    """
    graphdef, state = nnx.split(layers)
    if kv_caches is None:
        def body(x, xs):
            layer_state, key = xs
            return call(nnx.merge(graphdef, layer_state), x, None, key)
        if remat:
            body = jax.checkpoint(body, policy=remat_policy, prevent_cse=False)
        x_btd, _ = jax.lax.scan(lambda x, xs: (body(x, xs), None), x_btd, (state, keys))
        return x_btd

    stacked = jax.tree.map(lambda *cs: jnp.stack(cs), *kv_caches)

    def body(x, xs):
        layer_state, cache, key = xs
        return call(nnx.merge(graphdef, layer_state), x, cache, key)

    x_btd, new = jax.lax.scan(body, x_btd, (state, stacked, keys))
    return x_btd, [jax.tree.map(lambda a: a[i], new) for i in range(len(kv_caches))]


def is_scanned_name(name: str) -> bool:
    return bool(_SCANNED.match(name))


def layer_names(name: str, n_layers: int) -> list[str]:
    """The unscanned names a (possibly stacked) parameter name stands for."""
    m = _SCANNED.match(name)
    return [f"layers.{i}.{m.group(1)}" for i in range(n_layers)] if m else [name]


def to_flat_layout(flat: dict, scanned: bool, n_layers: int | None = None) -> dict:
    """``{name: array}`` in the scanned (``scanned=True``) or unscanned layout,
    whichever layout ``flat`` is in.  Stacking needs every layer ``0..L-1`` of each
    name; a gap is a ``ValueError`` naming the tensor.  Arrays are numpy or jax;
    the result keeps their kind."""
    out, groups = {}, {}
    for name, value in flat.items():
        m_un, m_sc = _UNSCANNED.match(name), _SCANNED.match(name)
        if scanned and m_un:
            groups.setdefault(m_un.group(2), {})[int(m_un.group(1))] = value
        elif not scanned and m_sc:
            for i in range(value.shape[0]):
                out[f"layers.{i}.{m_sc.group(1)}"] = value[i]
        else:
            out[name] = value
    for rest, by_layer in groups.items():
        L = n_layers if n_layers is not None else max(by_layer) + 1
        missing = [i for i in range(L) if i not in by_layer]
        if missing or len(by_layer) != L:
            raise ValueError(f"layers.{{i}}.{rest}: cannot stack, layers {missing or sorted(set(by_layer) - set(range(L)))} "
                             f"are missing or extra for {L} layers")
        vals = [by_layer[i] for i in range(L)]
        out[f"layers.{rest}"] = np.stack(vals) if isinstance(vals[0], np.ndarray) else jnp.stack(vals)
    return out


def to_layout(model: nnx.Module, scan_layers: bool) -> nnx.Module:
    """``model`` (a ``Transformer``) with its decoder stack in the given layout; the
    same model when it already is.  Parameters keep their values (a copy)."""
    from research.models.hf import flat_params  # noqa: PLC0415 (hf imports the model)
    from research.models.transformer import Transformer  # noqa: PLC0415

    if model.cfg.scan_layers == scan_layers:
        return model
    cfg = model.cfg.replace(scan_layers=scan_layers)
    flat = to_flat_layout({k: v.get_value() for k, v in flat_params(model).items()}, scan_layers, cfg.n_layers)
    out = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    for name, var in flat_params(out).items():
        var.set_value(flat[name])
    return out
