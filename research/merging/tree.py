"""Pytree plumbing for merging: leaf paths, validation, dtype handling."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


class MergeError(ValueError):
    """Bad input to a merge: the message names the leaf path or parameter."""


def leaf_paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_name(path) -> str:
    """A leaf path joined by dots, whatever the key kinds (dict keys, attributes,
    indices), without NNX's ``value`` attribute: ``a.b.0``."""
    return ".".join(p for p in map(_key_name, path) if p != "value")


def leaf_names(tree: PyTree) -> list[str]:
    """Each leaf's ``path_name``, in leaf order: ``{"a": {"b": x}}`` -> ``"a.b"``; a flat
    ``{tensor name: array}`` dict -> the tensor names."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_compatible(models: Sequence[PyTree], names: Sequence[str]) -> None:
    """Same tree structure, leaf shapes and dtypes across ``models``, or a MergeError."""
    ref = models[0]
    ref_def = jax.tree.structure(ref)
    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    for name, m in zip(names[1:], models[1:]):
        if jax.tree.structure(m) != ref_def:
            a, b = set(leaf_paths(ref)), set(leaf_paths(m))
            diff = sorted(a ^ b)[:5]
            raise MergeError(
                f"{name} has a different tree structure from {names[0]}; "
                f"leaves in only one of them: {diff or '(same paths, different node types)'}"
            )
        for (path, x), y in zip(ref_leaves, jax.tree.leaves(m)):
            if np.shape(x) != np.shape(y):
                raise MergeError(
                    f"leaf {jax.tree_util.keystr(path)}: shape {np.shape(y)} in {name} "
                    f"but {np.shape(x)} in {names[0]}"
                )
            if jnp.result_type(x) != jnp.result_type(y):
                raise MergeError(
                    f"leaf {jax.tree_util.keystr(path)}: dtype {jnp.result_type(y)} in {name} "
                    f"but {jnp.result_type(x)} in {names[0]}"
                )


def check_finite(models: Sequence[PyTree], names: Sequence[str]) -> None:
    """Raise naming the first leaf holding NaN/Inf.  A no-op on traced values (under jit).

    A screen reads every leaf once, all models at a time: NaN/Inf anywhere
    makes the float32 sum of the models' leaves non-finite.  Only when the
    screen trips (or the sum overflowed) are the leaves checked one by one.
    """
    leaves = [jax.tree.leaves(m) for m in models]
    if any(isinstance(x, jax.core.Tracer) for ls in leaves for x in ls):
        return
    flags = [_sum_finite(*group) for group in zip(*leaves)
             if jnp.issubdtype(jnp.result_type(group[0]), jnp.inexact)]
    if all(bool(f) for f in flags):
        return
    for name, m in zip(names, models):
        for path, x in jax.tree_util.tree_flatten_with_path(m)[0]:
            if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
                continue
            if not bool(_all_finite(x)):
                raise MergeError(
                    f"leaf {jax.tree_util.keystr(path)} of {name} holds NaN or Inf "
                    "(pass check_finite=False to merge anyway)"
                )


def all_finite(leaves) -> bool:
    """Whether every floating-point leaf is free of NaN/Inf (one reduction per leaf)."""
    flags = [_all_finite(x) for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return all(bool(f) for f in flags)


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


@jax.jit
def _sum_finite(*xs):
    return jnp.all(jnp.isfinite(sum(x.astype(jnp.float32) for x in xs)))


def per_model(value, n: int, name: str) -> tuple:
    """A scalar or a length-``n`` sequence, as an ``n``-tuple of finite floats."""
    many = isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and np.ndim(value) == 1)
    vals = tuple(_number(v, name, i) for i, v in enumerate(value)) if many else (_number(value, name),) * n
    if len(vals) != n:
        raise MergeError(f"parameter {name!r} has {len(vals)} values for {n} models")
    return vals


def _number(v, name: str, i: int | None = None) -> float:
    where = f"parameter {name!r}" + (f" (model {i})" if i is not None else "")
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.number, np.ndarray, jax.Array)):
        raise MergeError(f"{where} must be a number, got {v!r}")
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise MergeError(f"{where} must be a number, got {v!r}") from None
    if not np.isfinite(x):
        raise MergeError(f"{where} must be finite, got {x}")
    return x


def compute_dtype(dtype) -> jnp.dtype:
    """float32 for low-precision floats, otherwise the dtype itself."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def _spec(x):
    try:
        s = jax.typeof(x).sharding
    except Exception:  # plain numpy or no sharding-in-types
        return None
    if getattr(s, "mesh", None) is None or s.mesh.empty:
        return None
    return s.spec


def replicate(x, axes=None):
    """``x`` with ``axes`` (default: all) unsharded, for ops that need a whole axis
    (sort, cumsum, reshape) under explicit sharding.  A no-op otherwise."""
    spec = _spec(x)
    if spec is None or all(p is None for p in spec):
        return x
    from jax.sharding import PartitionSpec as P

    parts = list(spec) + [None] * (x.ndim - len(spec))
    axes = range(x.ndim) if axes is None else [a % x.ndim for a in axes]
    for a in axes:
        parts[a] = None
    return jax.sharding.reshard(x, jax.typeof(x).sharding.update(spec=P(*parts)))


def like(x, ref):
    """Put ``x`` back on ``ref``'s explicit sharding (no-op without explicit sharding)."""
    spec = _spec(ref)
    if spec is None or _spec(x) == spec:
        return x
    return jax.sharding.reshard(x, jax.typeof(ref).sharding)
