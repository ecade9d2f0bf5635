"""``merge``, the single entry point, and the method registry.

Method and parameter names are mergekit's (``lambda`` is spelled ``lam``).
Parameters that mergekit sets per model (``weight``, ``density``, ``gamma``,
``epsilon``) take a scalar or one value per model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from research.merging import cpu_kernels, generalized, methods, select, sparsify
from research.merging.tree import MergeError, all_finite, check_compatible, check_finite, compute_dtype, per_model

PyTree = Any

TASK_VECTOR_METHODS = tuple(generalized.RECIPES)
METHODS = ("linear", *TASK_VECTOR_METHODS, "slerp", "model_stock", "negate")
NEEDS_BASE = (*TASK_VECTOR_METHODS, "model_stock", "negate")
RANDOM_METHODS = ("dare_linear", "dare_ties", "della", "della_linear")

_COMMON = {"out_dtype", "check_finite"}
# Methods whose output holds NaN/Inf wherever an input does (every input
# entry reaches its output entry through +, -, * and /; 0 * Inf is NaN):
# for these the NaN/Inf check reads the output, one tensor instead of all of
# them, and looks at the inputs only when the output is not finite.
_PROPAGATES_NONFINITE = ("linear", "task_arithmetic", "negate")
_TV_PARAMS = {
    "weight", "density", "gamma", "epsilon", "lam", "normalize", "rescale",
    "trim", "consensus", "vote_on", "divide_by", "rescale_mode",
}
PARAMS = {
    "linear": {"weight", "normalize"},
    "slerp": {"t"},
    "model_stock": {"filter_wise"},
    "negate": {"weight", "lam"},
    **{m: _TV_PARAMS for m in TASK_VECTOR_METHODS},
}
_CHOICES = {
    "trim": ("tensor", "global"),
    "consensus": ("sum", "count"),
    "vote_on": ("weighted", "raw"),
    "divide_by": ("weight", "count"),
    "rescale_mode": ("l1", "inverse"),
}


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


def _tv_options(method: str, n: int, params: dict) -> generalized.Options:
    recipe = generalized.RECIPES[method]
    for name, allowed in _CHOICES.items():
        if name in params and params[name] not in allowed:
            raise MergeError(f"parameter {name!r} must be one of {allowed}, got {params[name]!r}")
    density = per_model(params.get("density", 1.0), n, "density")
    for i, d in enumerate(density):
        if not 0 < d <= 1:
            raise MergeError(f"parameter 'density' must be in (0, 1], got {d} for model {i}")
    epsilon = per_model(params.get("epsilon", 0.15), n, "epsilon")
    if recipe.sparsify == "della":
        for i, (d, e) in enumerate(zip(density, epsilon)):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise MergeError(
                    f"parameters 'density'={d} and 'epsilon'={e} for model {i}: "
                    "density +/- epsilon must lie in (0, 1)"
                )
    gamma = per_model(params.get("gamma", 0.01), n, "gamma")
    for i, g in enumerate(gamma):
        if not 0 <= g < 1:
            raise MergeError(f"parameter 'gamma' must be in [0, 1), got {g} for model {i}")
    trim = params.get("trim", "tensor")
    if trim == "global" and recipe.sparsify != "magnitude":
        raise MergeError(f"parameter 'trim'='global' applies to magnitude trimming (ties), not {method!r}")
    return generalized.Options(
        sparsify=recipe.sparsify,
        consensus=params.get("consensus", recipe.consensus) if recipe.consensus else None,
        normalize=bool(params.get("normalize", recipe.normalize)),
        rescale=bool(params.get("rescale", recipe.rescale)),
        weight=per_model(params.get("weight", 1.0), n, "weight"),
        density=density,
        gamma=gamma,
        epsilon=epsilon,
        lam=per_model(params.get("lam", 1.0), 1, "lam")[0],
        trim=trim,
        vote_on=params.get("vote_on", "weighted"),
        divide_by=params.get("divide_by", "weight"),
        rescale_mode=params.get("rescale_mode", "l1"),
    )


def options(method: str, n: int, params: dict):
    """The validated options of ``method`` over ``n`` models: every check that
    ``merge`` makes of its parameters, without any tensor (``--dry-run`` uses it)."""
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    unknown = set(params) - PARAMS[method] - _COMMON
    if unknown:
        raise MergeError(
            f"unknown parameter(s) {sorted(unknown)} for method {method!r}; "
            f"accepted: {sorted(PARAMS[method] | _COMMON)}"
        )
    if params.get("out_dtype") is not None:
        try:
            jnp.dtype(params["out_dtype"])
        except TypeError:
            raise MergeError(f"parameter 'out_dtype': not a dtype: {params['out_dtype']!r}") from None
    scalar = lambda name, default: per_model(params.get(name, default), 1, name)[0]
    if method in TASK_VECTOR_METHODS:
        opts = _tv_options(method, n, params)
        weights, normalize = opts.weight, opts.normalize
    elif method == "linear":
        weights, normalize = per_model(params.get("weight", 1.0), n, "weight"), bool(params.get("normalize", True))
        opts = (("weight", weights), ("normalize", normalize))
    elif method == "slerp":
        t = scalar("t", 0.5)
        if not 0 <= t <= 1:
            raise MergeError(f"parameter 't' must be in [0, 1], got {t}")
        return (("t", t),)
    elif method == "model_stock":
        return (("filter_wise", bool(params.get("filter_wise", False))),)
    else:  # negate
        return (("weight", per_model(params.get("weight", 1.0), n, "weight")), ("lam", scalar("lam", 1.0)))
    if normalize and abs(sum(weights)) < 1e-8:
        raise MergeError(f"method {method!r}: the weights {list(weights)} sum to 0, so normalize: true has nothing "
                         "to divide by; give non-zero weights or normalize: false")
    return opts


def _leaf_fn(method: str, opts):
    """The float32 leaf function ``(base_leaf, [model leaves], keys, thresholds, offsets) -> leaf``."""
    if method in TASK_VECTOR_METHODS:
        return lambda b, ms, keys, ths, offs: generalized.merge_leaf(b, ms, opts, keys, ths, offs)
    p = dict(opts)
    if method == "linear":
        return lambda b, ms, *_: methods.linear(ms, p["weight"], p["normalize"])
    if method == "slerp":
        return lambda b, ms, *_: methods.slerp(p["t"], ms[0], ms[1])
    if method == "model_stock":
        return lambda b, ms, *_: methods.model_stock(b, ms, p["filter_wise"])
    if method == "negate":
        return lambda b, ms, *_: b - p["lam"] * sum(w * (m - b) for w, m in zip(p["weight"], ms))
    raise MergeError(f"unknown merge method {method!r}")


def _merge_one_leaf(j, b, ms, key, ths, offs, *, method, opts, out_dtype):
    cd = compute_dtype(ms[0].dtype)
    keys = None
    if key is not None:
        leaf_key = jax.random.fold_in(key, j)
        keys = [jax.random.fold_in(leaf_key, i) for i in range(len(ms))]
    res = _leaf_fn(method, opts)(None if b is None else b.astype(cd), [m.astype(cd) for m in ms], keys, ths, offs)
    return res.astype(out_dtype or ms[0].dtype)


# One compiled program per (leaf shape, dtype, method, options): merging a model
# leaf by leaf keeps only one leaf's intermediates alive at a time.
_merge_leaf_jit = jax.jit(_merge_one_leaf, static_argnames=("method", "opts", "out_dtype"))
_global_jit = jax.jit(generalized.global_thresholds)  # the keep counts are traced: one program for every density


@functools.partial(jax.jit, static_argnames=("density", "shape"))
def _dare_mask_jit(key, j, i, density: float, shape):
    """The mask ``_merge_one_leaf`` would draw for model ``i`` of leaf ``j``."""
    return sparsify.dare_mask(jax.random.fold_in(jax.random.fold_in(key, j), i), density, shape)


@jax.jit
def _l1_factor_jit(ft, base, mask):
    """The L1 rescale factor of a DARE or DELLA keep mask (shaped as its sparsifier's view)."""
    tau = (ft.astype(jnp.float32) - base.astype(jnp.float32)).reshape(mask.shape)
    return sparsify.l1_factor(tau, jnp.where(mask, tau, 0.0))


@jax.jit
def _della_ranks_jit(ft, base):
    return sparsify.della_ranks(sparsify.della_rows(ft.astype(jnp.float32) - base.astype(jnp.float32)))


@functools.partial(jax.jit, static_argnames=("density", "epsilon"))
def _della_mask_jit(key, j, i, ranks, density, epsilon):
    """The mask ``_merge_one_leaf`` would draw for model ``i`` of leaf ``j`` (DELLA)."""
    return sparsify.della_mask(jax.random.fold_in(jax.random.fold_in(key, j), i), ranks, density, epsilon)


@functools.partial(jax.jit, static_argnames=("cols", "density", "epsilon"))
def _della_probs_table(cols, density, epsilon):
    """DELLA's keep probability of each rank, as the merge program computes it."""
    return sparsify.della_probs(jnp.arange(cols, dtype=jnp.int32)[None], density, epsilon)[0]


@functools.partial(jax.jit, static_argnames="blocks")
def _block_key_data(key, j, i, blocks):
    """Raw data of the keys ``sparsify.blocked_draw`` uses for model ``i`` of leaf ``j``."""
    k = jax.random.fold_in(jax.random.fold_in(key, j), i)
    if blocks == 1:
        return jax.random.key_data(k)[None]
    return jax.random.key_data(jax.vmap(lambda b: jax.random.fold_in(k, b))(jnp.arange(blocks)))


def _mask_on_host(key, j, i, shape, density: float, ranks=None, epsilon: float = 0.0):
    """Model ``i``'s keep mask for leaf ``j``, drawn by the numba threefry (bit for
    bit JAX's): DARE's ``bernoulli(density)`` over ``shape``, or DELLA's from ``ranks``."""
    shape = shape if ranks is None else ranks.shape
    blocks, rows = sparsify.draw_blocks(shape)
    keys = np.asarray(_block_key_data(key, j, i, blocks))
    if ranks is None:
        return cpu_kernels.bernoulli(keys, rows, density, shape)
    return cpu_kernels.below_table(keys, rows, ranks, _della_probs_table(ranks.shape[1], density, epsilon))


def _uses_global_trim(opts) -> bool:
    return (
        isinstance(opts, generalized.Options)
        and opts.trim == "global"
        and opts.sparsify == "magnitude"
        and any(d < 1 for d in opts.density)
    )


def _screen_leaf(ft, base) -> None:
    if not all_finite([ft, base]):
        raise select.NonFiniteInput("NaN or Inf in a leaf")


def _host_cut(ft, base, k: int, screen: bool = False) -> select.Cut:
    """Keep exactly the ``k`` largest ``|ft - base|`` (0 <= k <= size); ``screen``
    also checks ``ft`` and ``base`` for NaN/Inf (in the counting pass when there is one)."""
    if 0 < k < ft.size:
        return select.topk_cut_delta_host(ft, base, k, screen)
    if screen:
        _screen_leaf(ft, base)
    return select.trivial_cut(ft.size, k)


_HOST_PREPARED = ("magnitude", "magnitude_outliers", "random", "della")
_COUNT_SCREENED = ("magnitude", "magnitude_outliers")  # their counting passes screen for NaN/Inf


def _host_leaf_state(ft, base, opts, key, j: int, i: int, screen: bool = False):
    """What model ``i``'s sparsifier needs for leaf ``j``, worked out before the
    merge call (eager merges): a trim ``Cut`` (magnitude), a ``(keep, top)``
    pair of them (breadcrumbs), or a DARE or DELLA mask, with its L1 factor
    when rescaling (DELLA's ranks instead, for ``rescale_mode="inverse"``).
    Trim cuts are searched from the host (faster on XLA:CPU) and DELLA's ranks
    come from a numba radix sort where ``cpu_kernels.usable``; each mask is
    drawn by its own call, so the random bits of all models are never alive
    together (XLA materialises threefry's output).  ``screen``
    (trims only): raise ``select.NonFiniteInput`` on NaN/Inf in ``ft`` or ``base``."""
    density = opts.density[i]
    if opts.sparsify == "magnitude":
        return _host_cut(ft, base, _cut_ks(opts, i, ft.size)[0], screen)
    if density >= 1:
        if screen:
            _screen_leaf(ft, base)
        return None
    if opts.sparsify == "magnitude_outliers":
        n_keep, n_top = _cut_ks(opts, i, ft.size)
        return _host_cut(ft, base, n_keep, screen), _host_cut(ft, base, n_top)
    on_host = cpu_kernels.usable(ft, base)
    draw_on_host = on_host and cpu_kernels.random_ok(key)
    if opts.sparsify == "della":
        ranks = cpu_kernels.row_ranks(ft, base) if on_host else _della_ranks_jit(ft, base)
        if draw_on_host:
            mask = _mask_on_host(key, j, i, None, density, ranks, opts.epsilon[i])
        else:
            mask = _della_mask_jit(key, j, i, ranks, density, opts.epsilon[i])
        if opts.rescale and opts.rescale_mode == "inverse":
            return mask, ranks
    elif draw_on_host:
        mask = _mask_on_host(key, j, i, ft.shape, density)
    else:
        mask = _dare_mask_jit(key, j, i, density, ft.shape)
    if opts.rescale and opts.rescale_mode == "l1":
        return mask, _l1_factor_jit(ft, base, mask)
    return mask


_CUT_SPARSIFIERS = ("magnitude", "magnitude_outliers")


def _cut_ks(opts, i: int, n: int) -> list[int]:
    """The top-k sizes of model ``i``'s cuts: TIES one, breadcrumbs ``(keep, top)``."""
    density = opts.density[i]
    if opts.sparsify == "magnitude":
        return [n if density >= 1 else int(density * n)]
    if density >= 1:
        return []
    n_top, n_keep = sparsify.outlier_counts(n, density, opts.gamma[i])
    return [n_keep, n_top]


def _merge_cuts_on_host(base, ms, opts, out_dtype, screen: bool):
    """An eager TIES/breadcrumbs leaf by the numba kernels, where they apply:
    every model's cuts from one fused counting pass, then one merge pass.
    Returns ``(leaf, states)``: the leaf is None where the merge pass must be
    XLA's (NaN/Inf or tiny inputs, extreme weights, a rescale), the states
    are the cuts either way."""
    n = base.size
    fused = select.topk_cuts_host(base, ms, [_cut_ks(opts, i, n) for i in range(len(ms))], screen)
    if opts.sparsify == "magnitude":
        states = [cuts[0] for cuts in fused.cuts]
        keep, top = states, [None] * len(ms)
    else:
        states = [tuple(cuts) if cuts else None for cuts in fused.cuts]
        keep = [s[0] if s else select.trivial_cut(n, n) for s in states]  # None: keep everything
        top = [s[1] if s else None for s in states]
    out = str(jnp.dtype(out_dtype or ms[0].dtype))
    if not fused.finite or fused.hazard or opts.rescale or out not in ("bfloat16", "float32"):
        return None, states
    leaf = cpu_kernels.cut_merge(base, ms, keep, top, opts.weight, consensus=opts.consensus, vote_on=opts.vote_on,
                                 normalize=opts.normalize, divide_by=opts.divide_by, lam=opts.lam, out_dtype=out)
    return (None if leaf is None else jax.device_put(leaf)), states


def _on_cpu(x) -> bool:
    """Host-prepared sparsifier state pays off on XLA:CPU only (see ``select``); on an
    accelerator a host round trip per counting pass costs more than the in-graph search."""
    devices = x.devices() if isinstance(x, jax.Array) else jax.devices()
    return next(iter(devices)).platform == "cpu"


def _host_prepared(opts, ref_leaf) -> bool:
    """Whether an eager merge (of leaves like ``ref_leaf``) works out sparsifier state
    leaf by leaf before merging."""
    return (isinstance(opts, generalized.Options) and opts.sparsify in _HOST_PREPARED
            and not _uses_global_trim(opts) and _on_cpu(ref_leaf))


def _run(models, base, key, *, method, opts, out_dtype, leafwise: bool, host_prepared: bool, screen: bool = False):
    ref_leaves, treedef = jax.tree.flatten(base if base is not None else models[0])
    base_leaves = jax.tree.leaves(base) if base is not None else [None] * len(ref_leaves)
    model_leaves = [jax.tree.leaves(m) for m in models]
    ths = offsets = None
    if _uses_global_trim(opts):  # one threshold per model over the whole tree
        ks = generalized.global_keep_counts(base_leaves, opts)
        ths, offsets = (_global_jit if leafwise else generalized.global_thresholds)(
            base_leaves, model_leaves, jnp.asarray(ks, jnp.int32) if leafwise else ks)
        # the thresholds carry the density: leaf programs compiled for one density serve every other
        opts = dataclasses.replace(opts, density=(1.0,) * len(opts.density))
    fn = functools.partial(_merge_leaf_jit if leafwise else _merge_one_leaf, method=method, opts=opts, out_dtype=out_dtype)
    out = []
    for j in range(len(ref_leaves)):
        ms = [ml[j] for ml in model_leaves]
        if host_prepared:
            if opts.sparsify in _CUT_SPARSIFIERS and cpu_kernels.usable(base_leaves[j], *ms):
                leaf, states = _merge_cuts_on_host(base_leaves[j], ms, opts, out_dtype, screen)
                if leaf is not None:
                    out.append(leaf)
                    continue
            else:
                states = [_host_leaf_state(m, base_leaves[j], opts, key, j, i, screen) for i, m in enumerate(ms)]
            out.append(fn(j, base_leaves[j], ms, key, states, [0] * len(ms)))
            continue
        offs = None if offsets is None else [o[j] for o in offsets]
        out.append(fn(j, base_leaves[j], ms, key, ths, offs))
    return jax.tree.unflatten(treedef, out)


def merge(method: str, models: Sequence[PyTree], base: PyTree | None = None, *, key=None, **params) -> PyTree:
    """Merge ``models`` (pytrees of identical structure) with ``method``.

    >>> merged = merge("ties", [ft_a, ft_b, ft_c], base=base, density=0.2, weight=[1.0, 1.0, 1.0])

    Methods: ``linear``, ``task_arithmetic``, ``ties``, ``dare_linear``,
    ``dare_ties``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``,
    ``della_linear``, ``slerp`` (``t``), ``model_stock``, ``negate``
    (``theta_base - lam * sum_i w_i tau_i``).  See ``generalized.py`` for the
    task-vector family and its options (``trim``, ``consensus``, ``vote_on``,
    ``divide_by``, ``rescale_mode``).

    Randomised methods (DARE, DELLA) need ``key``.  Low-precision floats are
    merged in float32 and returned in the input dtype unless ``out_dtype``.
    ``check_finite`` (default on) rejects NaN/Inf inputs, naming the leaf; it
    is skipped on traced values, i.e. when ``merge`` is called under ``jit``.
    Jittable; leaves keep their sharding.  Called eagerly, each leaf is
    merged by its own compiled call (cached per shape), so peak memory is one
    leaf's working set, not the model's; under ``jit`` the whole tree is one
    program.  Eager merges of bf16/float32 leaves on one CPU device run their
    slow steps in numba (``cpu_kernels``: TIES and breadcrumbs entirely,
    DARE's and DELLA's draws and ranks), with XLA's results bit for bit.
    """
    if method not in METHODS:
        raise MergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS)}")
    models = list(models)
    if method == "slerp" and base is not None and len(models) == 1:
        models, base = [base, models[0]], None
    if method == "slerp" and len(models) != 2:
        raise MergeError(f"slerp merges exactly two models, got {len(models)}")
    if not models:
        raise MergeError("no models to merge")
    if method in NEEDS_BASE and base is None:
        raise MergeError(f"method {method!r} needs a base model (base=...)")
    if method == "model_stock" and len(models) < 2:
        raise MergeError(f"model_stock needs at least two fine-tuned models, got {len(models)}")
    if method in RANDOM_METHODS and key is None:
        raise MergeError(f"method {method!r} is randomised: pass key=jax.random.key(seed)")
    names = ["base"] * (base is not None) + [f"model {i}" for i in range(len(models))]
    trees = ([base] if base is not None else []) + models
    check_compatible(trees, names)
    if method not in RANDOM_METHODS:
        key = None
    out_dtype = params.get("out_dtype")
    out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)

    opts = options(method, len(models), params)

    # NaN/Inf screening costs a pass over every input, unless it rides along:
    # on the output (methods that propagate NaN/Inf), or on the first counting
    # pass of each trim (eager magnitude trims on the CPU).
    screen = params.get("check_finite", True)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves([models, base, key]))
    screen_output = screen and not traced and method in _PROPAGATES_NONFINITE
    ref_leaves = jax.tree.leaves(trees[0])
    host_prepared = not traced and bool(ref_leaves) and _host_prepared(opts, ref_leaves[0])
    screen_counts = screen and host_prepared and opts.sparsify in _COUNT_SCREENED
    if screen and not (screen_output or screen_counts):
        check_finite(trees, names)
    run = functools.partial(_run, models, base, key, method=method, opts=opts, out_dtype=out_dtype,
                            leafwise=not traced, host_prepared=host_prepared)
    try:
        out = run(screen=screen_counts)
    except select.NonFiniteInput:
        check_finite(trees, names)  # names the input at fault
        out = run()  # no input was: a finite ft - base overflowed
    if screen_output and not all_finite(jax.tree.leaves(out)):
        check_finite(trees, names)  # names the input at fault; a finite overflow passes
    return out
