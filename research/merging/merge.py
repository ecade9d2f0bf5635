"""``merge``, the single entry point: the method's leaf function over every leaf.

Methods and their parameters are declared in ``registry.py``.  An eager merge
runs one compiled call per leaf (cached per shape and options), so peak memory
is one leaf's working set; on the CPU, ``cpu.merge_leaf`` takes the leaves it
applies to.  Under ``jit`` the whole tree is one program.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.merging import cpu, registry, task_vectors
from research.merging.registry import options
from research.merging.tree import (MergeError, all_finite, check_compatible, check_finite, compute_dtype,
                                   leaf_names)

PyTree = Any

METHODS = tuple(registry.METHODS_DEF)
NEEDS_BASE = tuple(m.name for m in registry.METHODS_DEF.values() if m.needs_base)
RANDOM_METHODS = tuple(m.name for m in registry.METHODS_DEF.values() if m.random)
PARAMS = {m.name: set(m.params) for m in registry.METHODS_DEF.values()}

# Methods whose output holds NaN/Inf wherever an input does (every input
# entry reaches its output entry through +, -, * and /; 0 * Inf is NaN):
# for these the NaN/Inf check reads the output, one tensor instead of all of
# them, and looks at the inputs only when the output is not finite.
_PROPAGATES_NONFINITE = ("linear", "task_arithmetic", "negate", "passthrough")
_COUNT = {1: "one", 2: "two"}


def task_vector(finetuned: PyTree, base: PyTree, dtype=None) -> PyTree:
    """``theta_ft - theta_base`` leaf by leaf, in float32 for low-precision inputs
    (or ``dtype``)."""
    check_compatible([base, finetuned], ["base", "finetuned"])
    return jax.tree.map(
        lambda f, b: (f.astype(compute_dtype(f.dtype)) - b.astype(compute_dtype(b.dtype))).astype(
            dtype or compute_dtype(f.dtype)
        ),
        finetuned,
        base,
    )


def apply(base: PyTree, tv: PyTree, scale: float = 1.0) -> PyTree:
    """``theta_base + scale * tau``, returned in the base's dtypes."""
    check_compatible([base, jax.tree.map(lambda t, b: t.astype(b.dtype), tv, base)], ["base", "task vector"])
    return jax.tree.map(
        lambda b, t: (b.astype(compute_dtype(b.dtype)) + scale * t.astype(compute_dtype(b.dtype))).astype(b.dtype),
        base,
        tv,
    )


def model_keys(key, name: str, n: int) -> list:
    """The PRNG keys of the ``n`` models for the leaf named ``name``: derived from the
    name (``tree.leaf_names``: a checkpoint's tensor name for a flat dict), not from
    the leaf's position, so the API and ``research-merge`` draw the same masks.
    Model ``i``'s key is ``fold_in(fold_in(key, crc32(name)), i)``."""
    return list(_fold_keys(key, np.uint32(zlib.crc32(name.encode())), n))


@functools.partial(jax.jit, static_argnames="n")  # one call a leaf, where eager fold_ins would make n + 1
def _fold_keys(key, name_hash, n: int) -> tuple:
    leaf_key = jax.random.fold_in(key, name_hash)
    return tuple(jax.random.fold_in(leaf_key, i) for i in range(n))


def _merge_one_leaf(b, ms, keys, global_trim, *, method, opts, out_dtype):
    dtype, cd = ms[0].dtype, compute_dtype(ms[0].dtype)
    leaf = registry.METHODS_DEF[method].leaf
    b = None if b is None else b.astype(cd)
    ms = [m.astype(cd) for m in ms]
    res = leaf(b, ms, opts, keys) if global_trim is None else task_vectors.merge_leaf(b, ms, opts, keys, global_trim)
    return res.astype(out_dtype or dtype)


# One compiled program per (leaf shape, dtype, method, options): merging a model
# leaf by leaf keeps only one leaf's intermediates alive at a time.
_merge_leaf_jit = jax.jit(_merge_one_leaf, static_argnames=("method", "opts", "out_dtype"))
_global_jit = jax.jit(task_vectors.global_thresholds)  # the keep counts are traced: one program for every density


def _global_trims(base_leaves, model_leaves, opts, eager: bool):
    """Per leaf, each model's ``(threshold, tie_offset)`` of the whole-model trim, and the
    options to merge with (the thresholds carry the density, so one compiled leaf
    program serves every density)."""
    ks = task_vectors.global_keep_counts(base_leaves, opts)
    fn = _global_jit if eager else task_vectors.global_thresholds
    ths, offsets = fn(base_leaves, model_leaves, jnp.asarray(ks, jnp.int32) if eager else ks)
    per_leaf = [[(th, off[j]) for th, off in zip(ths, offsets)] for j in range(len(base_leaves))]
    return per_leaf, dataclasses.replace(opts, density=(1.0,) * len(opts.density))


def _run(models, base, key, *, method, opts, out_dtype, eager: bool, screen: bool = False):
    ref = base if base is not None else models[0]
    ref_leaves, treedef = jax.tree.flatten(ref)
    names = leaf_names(ref)
    base_leaves = jax.tree.leaves(base) if base is not None else [None] * len(ref_leaves)
    model_leaves = [jax.tree.leaves(m) for m in models]
    trims = [None] * len(ref_leaves)
    if task_vectors.uses_global_trim(opts):
        trims, opts = _global_trims(base_leaves, model_leaves, opts, eager)
    fn = functools.partial(_merge_leaf_jit if eager else _merge_one_leaf, method=method, opts=opts, out_dtype=out_dtype)
    out = []
    for j, name in enumerate(names):
        b, ms = base_leaves[j], [ml[j] for ml in model_leaves]
        keys = None if key is None else model_keys(key, name, len(ms))
        leaf = cpu.merge_leaf(b, ms, opts, keys, out_dtype, screen) if eager and trims[j] is None else None
        if leaf is None:
            if screen and not all_finite([b, *ms]):
                raise cpu.NonFiniteInput(f"NaN or Inf in leaf {name}")
            leaf = fn(b, ms, keys, trims[j])
        out.append(leaf)
    return jax.tree.unflatten(treedef, out)


def merge(method: str, models: Sequence[PyTree], base: PyTree | None = None, *, key=None, **params) -> PyTree:
    """Merge ``models`` (pytrees of identical structure) with ``method``.

    >>> merged = merge("ties", [ft_a, ft_b, ft_c], base=base, density=0.2, weight=[1.0, 1.0, 1.0])

    Methods and their parameters: ``registry.METHODS_DEF`` (``registry.table()``);
    the task-vector family and its options: ``task_vectors.py``.  A parameter
    the method does not take is a ``MergeError``.

    Randomised methods (DARE, DELLA) need ``key``; each leaf's keys derive from
    its name (``model_keys``).  Low-precision floats are merged in float32 and
    returned in the input dtype unless ``out_dtype``.  ``check_finite``
    (default on) rejects NaN/Inf inputs, naming the leaf; it is skipped on
    traced values, i.e. when ``merge`` is called under ``jit``.  Jittable;
    leaves keep their sharding.  Called eagerly, each leaf is merged by its
    own compiled call, or by the CPU backend (``cpu.merge_leaf``), whose
    results equal the XLA program's bit for bit (DARE's L1 rescale factor
    aside: its sums are float64 there, so it agrees to float32 summation
    order).
    """
    spec = registry.get(method)
    models = list(models)
    if method == "slerp" and base is not None and len(models) == 1:
        models, base = [base, models[0]], None
    if not models:
        raise MergeError("no models to merge")
    if spec.max_models is not None and not spec.min_models <= len(models) <= spec.max_models:
        raise MergeError(f"{method} merges exactly {_COUNT.get(spec.max_models, spec.max_models)} "
                         f"model{'s' * (spec.max_models > 1)}, got {len(models)}")
    if len(models) < spec.min_models:
        raise MergeError(f"{method} needs at least {_COUNT.get(spec.min_models, spec.min_models)} fine-tuned models, got {len(models)}")
    if spec.needs_base and base is None:
        raise MergeError(f"method {method!r} needs a base model (base=...)")
    if spec.random and key is None:
        raise MergeError(f"method {method!r} is randomised: pass key=jax.random.key(seed)")
    names = ["base"] * (base is not None) + [f"model {i}" for i in range(len(models))]
    trees = ([base] if base is not None else []) + models
    check_compatible(trees, names)
    if not spec.random:
        key = None
    out_dtype = params.get("out_dtype")
    out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)

    opts = options(method, len(models), params)

    # NaN/Inf screening costs a pass over every input, unless it rides along:
    # on the output (methods that propagate NaN/Inf), or in the CPU backend's
    # passes (the trims' first counting pass, DARE's and DELLA's merge pass).
    screen = params.get("check_finite", True)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves([models, base, key]))
    screen_output = screen and not traced and method in _PROPAGATES_NONFINITE
    ref_leaves = jax.tree.leaves(trees[0])
    screen_counts = screen and not traced and bool(ref_leaves) and cpu.screens_inputs(opts, ref_leaves[0])
    if screen and not (screen_output or screen_counts):
        check_finite(trees, names)
    run = functools.partial(_run, models, base, key, method=method, opts=opts, out_dtype=out_dtype, eager=not traced)
    try:
        out = run(screen=screen_counts)
    except cpu.NonFiniteInput:
        check_finite(trees, names)  # names the input at fault
        out = run()  # no input was: a finite ft - base overflowed
    if screen_output and not all_finite(jax.tree.leaves(out)):
        check_finite(trees, names)  # names the input at fault; a finite overflow passes
    return out
