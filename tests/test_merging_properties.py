"""Invariants (hypothesis), jit, sharding, keys, dtypes and bad input of ``merging.merge``."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from research import merging
from research.merging import topk
from research.merging.cpu import search

SHAPES = [(5,), (3, 4), (2, 3, 4)]
SPARSE = {"ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


def _tree(seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return {"a": (rng.normal(size=(3, 4)) * scale).astype(np.float32), "b": {"c": (rng.normal(size=(5,)) * scale).astype(np.float32)}}


def _kwargs(method, n):
    kw = {}
    if method in merging.RANDOM_METHODS:
        kw["key"] = jax.random.key(0)
    if method in merging.NEEDS_BASE and method not in ("model_stock", "negate"):
        kw["weight"] = [1.0 / n] * n
    return kw


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 4))
@pytest.mark.parametrize("method", [m for m in merging.METHODS if m != "negate"])
def test_merging_copies_of_one_model_returns_it(method, seed, n):
    model, base = _tree(seed), _tree(seed + 1)
    n = {"slerp": 2, "passthrough": 1}.get(method, n)
    out = merging.merge(method, [model] * n, base=None if method in ("linear", "slerp") else base, **_kwargs(method, n))
    chex.assert_trees_all_close(out, model, rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_task_arithmetic_single_model_lambda_one_is_the_finetuned_model(seed):
    ft, base = _tree(seed), _tree(seed + 1)
    chex.assert_trees_all_close(merging.merge("task_arithmetic", [ft], base=base, lam=1.0), ft, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), w=st.lists(st.floats(0.1, 3.0), min_size=3, max_size=3))
def test_ties_density_one_agreeing_signs_is_weighted_mean_of_deltas(seed, w):
    base = _tree(seed)
    mag = [_tree(seed + i + 1) for i in range(3)]
    fts = [jax.tree.map(lambda b, m: b + np.abs(m) + 0.01, base, mi) for mi in mag]  # all deltas > 0
    out = merging.merge("ties", fts, base=base, weight=w, density=1.0)
    expect = jax.tree.map(lambda b, *f: b + sum(wi * (fi - b) for wi, fi in zip(w, f)) / sum(w), base, *fts)
    chex.assert_trees_all_close(out, expect, rtol=1e-5, atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), perm=st.permutations([0, 1, 2]))
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "model_stock", "negate"])
def test_deterministic_methods_ignore_model_order(method, seed, perm):
    base = _tree(seed)
    fts = [_tree(seed + i + 1) for i in range(3)]
    w = [0.5, 1.0, 2.0]
    kw = dict(weight=w) if method != "model_stock" else {}
    if method in ("ties", "breadcrumbs_ties"):
        kw["density"] = 0.5
    a = merging.merge(method, fts, base=base, **kw)
    if "weight" in kw:
        kw["weight"] = [w[i] for i in perm]
    b = merging.merge(method, [fts[i] for i in perm], base=base, **kw)
    chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(
    shape=st.sampled_from(SHAPES + [(64, 33), (1000,)]),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    discrete=st.booleans(),
)
def test_trimming_keeps_exactly_k_entries(shape, density, seed, discrete):
    x = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    if discrete:  # many ties
        x = np.round(x * 2) / 2
    k = int(density * x.size)
    mask = np.asarray(topk.topk_mask(jnp.asarray(x), k))
    assert mask.sum() == k
    if 0 < k < x.size:  # every kept magnitude >= every dropped one
        assert np.abs(x)[mask].min() >= np.abs(x)[~mask].max()


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(SHAPES + [(64, 33), (1000,), (3, 5, 7), (3, 5000), (2, 4099)]),  # wide rows: split / unsplittable
    density=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(["normal", "discrete", "mostly_zero", "subnormal"]),
    kernel=st.booleans(),
    bf16=st.booleans(),
)
def test_host_driven_cut_keeps_exactly_the_k_largest_deltas(shape, density, seed, kind, kernel, bf16):
    """The eager per-tensor trim (searched from the host, ties broken by flat index),
    counted by the numba kernel or by XLA programs."""
    rng = np.random.default_rng(seed)
    scale = 1e-38 if kind == "subnormal" else 1.0  # many |delta| below float32's smallest normal
    base = (rng.normal(size=shape) * scale).astype(np.float32)
    d = (rng.normal(size=shape) * scale).astype(np.float32)
    if kind == "discrete":
        d = np.round(d * 2) / 2
    if kind == "mostly_zero":  # the k-th magnitude is 0: the tie plateau sits at zero
        d = np.where(rng.random(shape) < 0.9, 0.0, d).astype(np.float32)
    ft = base + d
    if bf16:
        ft, base = (x.astype(jnp.bfloat16) for x in (ft, base))
    k = int(density * base.size)
    if k < 1:
        return
    cut = search.topk_cut_delta_host(jnp.asarray(ft), jnp.asarray(base), k, kernel=kernel)
    # the magnitudes as XLA:CPU sees them: subnormals flushed to zero
    flush = lambda x: np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)
    mag = flush(np.abs(flush(ft.astype(np.float32)) - flush(base.astype(np.float32))))
    mask = np.asarray(search.keep_mask_cut(jnp.asarray(mag), cut))
    assert mask.sum() == k
    if k < base.size:
        assert mag[mask].min() >= mag[~mask].max()
        tied = mag == mag[mask].min()  # among ties, the first ones in flat order are kept
        kept_ties = np.flatnonzero((mask & tied).ravel())
        assert np.array_equal(kept_ties, np.flatnonzero(tied.ravel())[: len(kept_ties)])


def test_global_trim_keeps_exactly_k_over_the_model():
    tv = {"a": jnp.round(jax.random.normal(jax.random.key(0), (40, 30)) * 2) / 2, "b": jnp.ones(17)}
    kept = merging.trim(tv, 0.3, "global")
    assert sum(int((np.asarray(x) != 0).sum()) for x in jax.tree.leaves(kept)) == int(0.3 * (1200 + 17))



@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.floats(0.0, 1.0))
def test_kth_largest_over_several_arrays_keeps_the_top_k_flat_or_leaf_by_leaf(seed, frac):
    """A population of several arrays is searched as one flat array when small and
    leaf by leaf when not: both keep exactly the k largest, ties by flat index."""
    rng = np.random.default_rng(seed)
    xs = [np.abs(np.round(rng.normal(size=s) * 4) / 8).astype(np.float32) for s in ((9, 7), (13,), (3, 4, 5))]
    flat = np.concatenate([x.reshape(-1) for x in xs])
    k = max(1, int(frac * flat.size))
    want = np.zeros(flat.size, bool)
    want[np.argsort(-flat, kind="stable")[:k]] = True  # the reference: k largest, earlier ties first
    for flat_max in (topk._FLAT_MAX, 0):
        old, topk._FLAT_MAX = topk._FLAT_MAX, flat_max
        try:
            th = topk.kth_largest([jnp.asarray(x) for x in xs], k)
        finally:
            topk._FLAT_MAX = old
        offsets = topk.ties_before([jnp.asarray(x) for x in xs], th)
        got = np.concatenate([np.asarray(topk.keep_mask(jnp.asarray(x), th, o)).reshape(-1) for x, o in zip(xs, offsets)])
        np.testing.assert_array_equal(got, want)

@pytest.mark.parametrize("method", merging.METHODS)
def test_every_method_runs_under_jit(method):
    base = _tree(0)
    fts = [_tree(i + 1) for i in range(2)][:merging.registry.get(method).max_models]
    kw = {"key": jax.random.key(0)} if method in merging.RANDOM_METHODS else {}
    if method in SPARSE:
        kw["density"] = 0.5
    use_base = method not in ("linear", "slerp")

    @jax.jit
    def run(fts, base):
        return merging.merge(method, fts, base=base if use_base else None, **kw)

    chex.assert_trees_all_close(run(fts, base), merging.merge(method, fts, base=base if use_base else None, **kw), atol=1e-6)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "linear", "model_stock", "della"])
def test_sharded_leaves_keep_their_sharding(method):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("x", "y"))
    sharding = NamedSharding(mesh, P("x", "y"))
    rng = np.random.default_rng(0)
    mk = lambda: {"w": jax.device_put(rng.normal(size=(64, 32)).astype(np.float32), sharding)}
    base, fts = mk(), [mk(), mk()]
    kw = {"key": jax.random.key(0)} if method in merging.RANDOM_METHODS else {}
    if method in SPARSE:
        kw["density"] = 0.3
    out = merging.merge(method, fts, base=None if method == "linear" else base, **kw)
    assert out["w"].sharding == sharding
    for shard in out["w"].addressable_shards:  # each device holds only its block
        assert shard.data.shape == (16, 16)
    local = jax.tree.map(np.asarray, [base, *fts])
    ref = merging.merge(method, local[1:], base=None if method == "linear" else local[0], **kw)
    chex.assert_trees_all_close(out, ref, atol=1e-5)
    jitted = jax.jit(lambda f, b: merging.merge(method, f, base=b if method != "linear" else None, **kw))(fts, base)
    assert jitted["w"].sharding.is_equivalent_to(sharding, 2)


@pytest.mark.parametrize("spec, shape", [(P("x", "y", "z"), (8, 6, 10)), (P("x", None, "y"), (8, 6, 10)),
                                         (P(None, None, "x"), (8, 6, 10)), (P("x", None, None, "y"), (4, 6, 3, 4))])
def test_della_on_sharded_leaves_of_3d_and_up_merges_as_their_local_copy(spec, shape):
    """DELLA ranks along dim 1 (``sparsify.della_view``), across the shards of the
    other axes: eagerly and under jit (the L1 rescale), the merge equals the
    local copy's and keeps the leaf's sharding."""
    mesh = jax.make_mesh((2, 2, 2), ("x", "y", "z"))
    sharding = NamedSharding(mesh, spec)
    method = "della"
    rng = np.random.default_rng(1)
    mk = lambda: {"w": jax.device_put(rng.normal(size=shape).astype(np.float32), sharding)}
    base, fts = mk(), [mk(), mk()]
    kw = dict(key=jax.random.key(3), density=0.5, epsilon=0.2)
    local = jax.tree.map(np.asarray, [base, *fts])
    ref = merging.merge(method, local[1:], base=local[0], **kw)
    eager = merging.merge(method, fts, base=base, **kw)
    jitted = jax.jit(lambda f, b: merging.merge(method, f, base=b, **kw))(fts, base)
    for out in (eager, jitted):
        assert out["w"].sharding.is_equivalent_to(sharding, len(shape))
        chex.assert_trees_all_close(out, ref, atol=1e-5)


@pytest.mark.parametrize("method", sorted(merging.RANDOM_METHODS))
def test_random_methods_are_keyed(method):
    base = _tree(0)
    fts = [_tree(1), _tree(2)]
    run = lambda k: merging.merge(method, fts, base=base, density=0.5, key=jax.random.key(k))
    chex.assert_trees_all_equal(run(3), run(3))
    assert not np.allclose(run(3)["a"], run(4)["a"])


def test_bf16_is_computed_in_float32_and_returned_in_bf16():
    base = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(0))
    fts = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), _tree(i)) for i in (1, 2)]
    out = merging.merge("ties", fts, base=base, density=0.5)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    f32 = merging.merge("ties", fts, base=base, density=0.5, out_dtype=jnp.float32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(f32))
    up = merging.merge("ties", [jax.tree.map(lambda x: x.astype(jnp.float32), f) for f in fts],
                       base=jax.tree.map(lambda x: x.astype(jnp.float32), base), density=0.5)
    chex.assert_trees_all_close(f32, up, atol=1e-6)


def test_works_on_nnx_state():
    from flax import nnx

    lin = lambda s: nnx.Linear(3, 2, rngs=nnx.Rngs(s))
    base, a, b = (nnx.state(lin(s), nnx.Param) for s in (0, 1, 2))
    out = merging.merge("ties", [a, b], base=base, density=0.5)
    assert jax.tree.structure(out) == jax.tree.structure(base)


# --- bad input -------------------------------------------------------------


def _err(match, *args, **kw):
    with pytest.raises(merging.MergeError, match=match):
        merging.merge(*args, **kw)


def test_bad_input_names_the_culprit():
    base, a = _tree(0), _tree(1)
    other_shape = {"a": np.zeros((4, 3), np.float32), "b": {"c": np.zeros(5, np.float32)}}
    _err(r"leaf \['a'\]: shape \(4, 3\)", "ties", [a, other_shape], base=base)
    _err(r"dtype", "ties", [a, jax.tree.map(lambda x: x.astype(np.float16), a)], base=base)
    _err("different tree structure", "ties", [a, {"a": a["a"]}], base=base)
    _err("needs a base", "ties", [a, a])
    _err("density", "ties", [a, a], base=base, density=0.0)
    _err("density", "ties", [a, a], base=base, density=1.5)
    _err("'weight' has 3 values for 2 models", "ties", [a, a], base=base, weight=[1, 2, 3])
    _err("exactly two", "slerp", [a, a, a])
    _err("unknown parameter", "ties", [a, a], base=base, densty=0.5)
    _err("unknown merge method", "tie", [a, a], base=base)
    _err("key=", "dare_ties", [a, a], base=base, density=0.5)
    bad = jax.tree.map(lambda x: x.copy(), a)
    bad["b"]["c"][2] = np.nan
    _err(r"leaf \['b'\]\['c'\] of model 1 holds NaN", "ties", [a, bad], base=base)
    merging.merge("ties", [a, bad], base=base, check_finite=False)  # opt-out works


@pytest.mark.parametrize("method,params", [
    ("linear", {}), ("task_arithmetic", {}), ("negate", {}), ("slerp", {}), ("model_stock", {}),
    ("dare_ties", {"density": 0.5}), ("dare_linear", {"density": 0.3, "rescale_mode": "inverse"}),
    ("della", {"density": 0.5}), ("della", {"density": 0.5, "rescale_mode": "inverse"}), ("ties", {"density": 0.5}), ("ties", {"density": 1.0}), ("ties", {"density": 0.05}),
    ("breadcrumbs", {"density": 0.5}), ("breadcrumbs_ties", {"density": 1.0}),
])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_in_any_input_is_refused_even_with_zero_weight(method, params, value):
    """linear/task_arithmetic/negate screen their output first (NaN/Inf propagates
    through +, -, *, / and 0 * Inf); eager trims screen in their first counting pass
    (density 1 has none; density 0.05 keeps 1 of the 5-entry leaf), DARE
    and DELLA in their merge pass (masks drawn first for the L1 rescale, or inside
    it), or a screen of their own where that pass does not apply; the error must still name the input leaf."""
    base, a = _tree(0), _tree(1)
    bad = jax.tree.map(lambda x: x.copy(), a)
    bad["a"][1, 2] = value
    kw = {**_kwargs(method, 2), **params}
    if method in ("linear", "task_arithmetic", "negate"):
        kw["weight"] = [1.0, 0.0]  # the bad model's weight is zero: its entries still poison the output
    b = None if method in ("linear", "slerp") else base
    _err(r"leaf \['a'\] of model 1 holds NaN or Inf", method, [a, bad], base=b, **kw)
    if b is not None:
        _err(r"leaf \['a'\] of base holds NaN or Inf", method, [a, a], base=bad, **kw)


def test_finite_inputs_whose_merge_overflows_are_not_refused():
    a = {"x": np.full((4,), 6e4, np.float32)}
    out = merging.merge("linear", [a, a], weight=[1.0, 1.0], normalize=False, out_dtype=jnp.float16)
    assert np.isinf(np.asarray(out["x"])).all()
    # ft - base overflows float32 in the trim's counting pass: finite inputs, so no error
    base = {"x": np.full((8, 4), -3e38, np.float32)}
    ft = {"x": np.where(np.arange(32).reshape(8, 4) % 3 == 0, 3e38, -2.9e38).astype(np.float32)}
    for method in ("ties", "dare_ties", "della"):  # the trim's counting pass, DARE's and DELLA's merge pass
        kw = dict(density=0.5, **_kwargs(method, 2))
        got = merging.merge(method, [ft, ft], base=base, **kw)
        want = merging.merge(method, [ft, ft], base=base, check_finite=False, **kw)
        chex.assert_trees_all_equal(got, want)


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.3}),
    ("breadcrumbs", {"density": 0.3, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": [0.3, 0.5, 1.0], "gamma": 0.1}),
])
def test_eager_host_trim_equals_the_jitted_merge_on_tied_bf16_deltas(method, params):
    """Eager merges search trim thresholds from the host; bf16 deltas tie a lot."""
    rng = np.random.default_rng(0)
    base = {"w": jnp.asarray(rng.normal(size=(64, 48)), jnp.bfloat16), "v": jnp.asarray(rng.normal(size=(300,)), jnp.bfloat16)}
    fts = [jax.tree.map(lambda b: (b.astype(jnp.float32) + 0.01 * jnp.asarray(rng.normal(size=b.shape), jnp.float32)).astype(jnp.bfloat16), base)
           for _ in range(3)]
    eager = merging.merge(method, fts, base=base, **params)
    jitted = jax.jit(lambda f, b: merging.merge(method, f, base=b, **params))(fts, base)
    chex.assert_trees_all_equal(eager, jitted)


def test_dare_mask_on_large_tensors_is_drawn_in_independent_blocks():
    """Tensors over 4M entries draw the mask a row block at a time (bounded scratch)."""
    from research.merging import sparsify

    key = jax.random.key(7)
    shape = (2100, 2048)  # 4.3M entries: two blocks of 2048 rows
    mask = np.asarray(jax.jit(sparsify.dare_mask, static_argnums=(1, 2))(key, 0.3, shape))
    assert mask.shape == shape and abs(mask.mean() - 0.3) < 2e-3
    first = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.3, (2048, 2048)))
    np.testing.assert_array_equal(mask[:2048], first)
    second = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.3, (2048, 2048)))
    np.testing.assert_array_equal(mask[2048:], second[:52])
    base = {"w": jnp.zeros(shape, jnp.bfloat16)}
    fts = [{"w": jnp.full(shape, v, jnp.bfloat16)} for v in (0.5, -0.25)]
    eager = merging.merge("dare_linear", fts, base=base, key=key, density=0.3)
    jitted = jax.jit(lambda f, b, k: merging.merge("dare_linear", f, base=b, key=k, density=0.3))(fts, base, key)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(st.integers(0, 2**31 - 1), st.integers(1, 7), st.sampled_from([0.0, 0.01, 0.3, 0.97, 1.0]))
def test_streamed_thresholds_keep_exactly_the_top_k_of_every_block_together(seed, rows_per_block, density):
    """``stream.chunked.thresholds`` (a sample's guess checked by one count, else two
    histogram passes) with tie offsets carried over blocks keeps the same entries
    as ``topk.topk_mask`` on the whole tensor, ties (bf16 deltas, zeros) included."""
    from research.merging.stream import chunked

    rng = np.random.default_rng(seed)
    base = rng.normal(size=(13, 24)).astype(np.float32)
    delta = np.round(rng.normal(size=base.shape) * 4) / 64  # few distinct values: many ties
    delta[rng.random(base.shape) < 0.2] = 0.0
    ft = (base + delta).astype(jnp.bfloat16)
    base = base.astype(jnp.bfloat16)
    n, k = base.size, int(density * base.size)
    spans = chunked.spans(13, rows_per_block)
    blocks = lambda: ((base[a:b], [ft[a:b]]) for a, b in spans)
    tau = ft.astype(np.float32) - base.astype(np.float32)
    sample = np.abs(tau).reshape(1, -1)[:, ::3]
    for guess in (sample, None):
        (th,), = chunked.thresholds(blocks, n, [[k]], guess)
        masks, offset = [], 0
        for a, b in spans:
            mag = jnp.abs(jnp.asarray(tau[a:b]))
            masks.append(np.asarray(topk.keep_mask(mag, th, offset)))
            offset += int(np.sum(np.asarray(mag) == th.value))
        np.testing.assert_array_equal(np.concatenate(masks), np.asarray(topk.topk_mask(jnp.asarray(tau), k)))
