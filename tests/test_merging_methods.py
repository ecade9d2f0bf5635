"""Hand-worked examples: every method on tiny tensors, expected numbers written out."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import merging

TAU = [
    np.array([1.0, -2.0, 0.5, 3.0]),
    np.array([2.0, 1.0, -0.5, -1.5]),
    np.array([-4.0, 1.0, 0.25, 1.5]),
]
BASE = {"w": jnp.ones(4)}
FTS = [{"w": BASE["w"] + t} for t in TAU]


def test_ties_trims_elects_sign_and_takes_disjoint_mean():
    # trim (k=2): [0,-2,0,3], [2,0,0,-1.5], [-4,0,0,1.5]
    # votes (sum): -2 -> -, -2 -> -, 0 -> +, 3 -> +
    # disjoint mean: [-4, -2, 0, (3+1.5)/2]
    out = merging.merge("ties", FTS, base=BASE, density=0.5)
    np.testing.assert_allclose(out["w"], 1 + np.array([-4.0, -2.0, 0.0, 2.25]))


def test_ties_lambda_and_weights():
    # weighted deltas w=[1,2,1] after trim: [0,-2,0,3], [4,0,0,-3], [-4,0,0,1.5]
    # votes: 0 -> +, -2 -> -, 0 -> +, 1.5 -> +
    # entry0: +4 agrees (w=2) -> 4/2 = 2 ; entry1: -2/1 ; entry3: (3+1.5)/(1+1)
    out = merging.merge("ties", FTS, base=BASE, density=0.5, weight=[1, 2, 1], lam=0.5)
    np.testing.assert_allclose(out["w"], 1 + 0.5 * np.array([2.0, -2.0, 0.0, 2.25]))


def test_task_arithmetic_is_weighted_sum_of_deltas():
    out = merging.merge("task_arithmetic", FTS, base=BASE, weight=[0.5, 0.25, 1.0])
    np.testing.assert_allclose(out["w"], 1 + np.array([-3.0, 0.25, 0.375, 2.625]))


def test_linear_is_normalised_weighted_average():
    out = merging.merge("linear", [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}], weight=[1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 3.5])


def test_slerp_orthogonal_and_colinear_fallback():
    out = merging.merge("slerp", [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}], t=0.5)
    np.testing.assert_allclose(out["w"], [2**-0.5, 2**-0.5], rtol=1e-6)
    out = merging.merge("slerp", [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([2.0, 0.0])}], t=0.25)
    np.testing.assert_allclose(out["w"], [1.25, 0.0], rtol=1e-6)


def test_slerp_accepts_base_plus_one_model():
    out = merging.merge("slerp", [{"w": jnp.array([0.0, 1.0])}], base={"w": jnp.array([1.0, 0.0])}, t=0.5)
    np.testing.assert_allclose(out["w"], [2**-0.5, 2**-0.5], rtol=1e-6)


def test_model_stock_interpolates_by_mean_cosine():
    base = {"w": jnp.zeros(2)}
    out = merging.merge("model_stock", [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}], base=base)
    c = 2**-0.5
    t = 2 * c / (1 + c)
    np.testing.assert_allclose(out["w"], [t * 1.0, t * 0.5], rtol=1e-6)
    out = merging.merge("model_stock", [{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}], base=base)
    np.testing.assert_allclose(out["w"], [0.0, 0.0], atol=1e-7)
    # opposite updates: cos = -1 = -1/(N-1), where t has no finite value; the base, as mergekit keeps it
    out = merging.merge("model_stock", [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([-1.0, -2.0])}], base=base)
    np.testing.assert_array_equal(out["w"], [0.0, 0.0])


@pytest.mark.parametrize("shape", [(6,), (4, 6), (3, 4, 6)])
def test_model_stock_filter_wise_takes_a_ratio_per_row_of_the_last_axis_as_mergekit(shape):
    """mergekit's ``filter_wise`` reduces ``dim=-1``: a ratio per output row of a matrix, per
    ``x[e, r, :]`` of a 3-D tensor (fused experts), one for a 1-D tensor.  An
    independent NumPy transcription of its formula, in float64."""
    rng = np.random.default_rng(7)
    base = rng.normal(size=shape)
    fts = [base + rng.normal(size=shape) for _ in range(3)]
    w0 = base[None] if base.ndim == 1 else base
    offsets = [(f[None] if f.ndim == 1 else f) - w0 for f in fts]
    cos = [(offsets[i] * offsets[j]).sum(-1) / np.maximum(
        np.linalg.norm(offsets[i], axis=-1) * np.linalg.norm(offsets[j], axis=-1), 1e-6)
           for i in range(3) for j in range(i + 1, 3)]
    c = np.clip(np.mean(cos, axis=0), -1, 1)[..., None]
    t = 3 * c / (1 + 2 * c)
    expect = (t * sum(fts) / 3 + (1 - t) * w0).reshape(shape)
    out = merging.merge("model_stock", [{"w": jnp.asarray(f, jnp.float32)} for f in fts],
                        base={"w": jnp.asarray(base, jnp.float32)}, filter_wise=True)
    np.testing.assert_allclose(out["w"], expect, rtol=1e-5, atol=1e-5)


def test_negate_subtracts_task_vector():
    out = merging.merge("negate", [{"w": jnp.array([3.0])}], base={"w": jnp.array([1.0])}, lam=0.5)
    np.testing.assert_allclose(out["w"], [0.0])


def test_ties_keeps_at_least_the_largest_entry_of_a_small_tensor_as_mergekit():
    # density 0.1 of 4 entries: int(0.4) = 0, but mergekit (0.1.5) keeps one entry of a
    # non-empty tensor: trim -> [0,0,0,3], [2,0,0,0], [-4,0,0,0]; votes: -2 -> -, 0, 0, 3 -> +
    out = merging.merge("ties", FTS, base=BASE, density=0.1)
    np.testing.assert_allclose(out["w"], 1 + np.array([-4.0, 0.0, 0.0, 3.0]))
    # breadcrumbs keeps int(density * n) = 0: nothing (as mergekit)
    out = merging.merge("breadcrumbs_ties", FTS, base=BASE, density=0.1, gamma=0.0)
    np.testing.assert_allclose(out["w"], np.ones(4))
    # the global trim counts the same way over the whole model (8 entries at 0.1: one)
    two = lambda t: {"w": t["w"], "v": t["w"][::-1] * 0.5}  # a second leaf, with smaller entries
    out = merging.merge("ties", [two(f) for f in FTS], base=two(BASE), density=0.1, trim="global")
    np.testing.assert_allclose(out["w"], 1 + np.array([-4.0, 0.0, 0.0, 3.0]))
    np.testing.assert_allclose(out["v"], 0.5 * np.ones(4))


def test_breadcrumbs_drops_top_gamma_and_smallest():
    tau = np.arange(1.0, 11.0)
    out = merging.merge("breadcrumbs", [{"w": jnp.asarray(tau)}], base={"w": jnp.zeros(10)}, density=0.5, gamma=0.1)
    np.testing.assert_allclose(out["w"], [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_breadcrumbs_with_zero_gamma_keeps_the_largest():
    tau = np.arange(1.0, 11.0)
    out = merging.merge("breadcrumbs", [{"w": jnp.asarray(tau)}], base={"w": jnp.zeros(10)}, density=0.3, gamma=0.0)
    np.testing.assert_allclose(out["w"], [0] * 7 + [8, 9, 10])


def test_dare_keeps_density_fraction_and_restores_l1():
    tau = jax.random.normal(jax.random.key(0), (200, 100))
    out = merging.merge("dare_linear", [{"w": tau}], base={"w": jnp.zeros_like(tau)}, density=0.3, key=jax.random.key(1))
    kept = np.asarray(out["w"]) != 0
    assert abs(kept.mean() - 0.3) < 0.02
    np.testing.assert_allclose(np.abs(out["w"]).sum(), np.abs(tau).sum(), rtol=1e-5)


def test_dare_inverse_rescale_divides_by_density():
    tau = jax.random.normal(jax.random.key(0), (50, 40))
    out = merging.merge(
        "dare_linear", [{"w": tau}], base={"w": jnp.zeros_like(tau)}, density=0.25,
        key=jax.random.key(1), rescale_mode="inverse",
    )
    kept = np.asarray(out["w"]) != 0
    np.testing.assert_allclose(np.asarray(out["w"])[kept], np.asarray(tau)[kept] / 0.25, rtol=1e-6)


def test_della_keep_probability_follows_magnitude_rank():
    row = jnp.arange(1.0, 101.0)[None, :]  # one row, ranks 0..99
    keys = jax.random.split(jax.random.key(0), 400)
    from research.merging import sparsify

    kept = jax.vmap(lambda k: sparsify.della(row, 0.5, 0.4, k, rescale=False) != 0)(keys).mean(0)[0]
    # p = 0.1 at the smallest, 0.9 at the largest
    assert abs(float(kept[:10].mean()) - 0.136) < 0.06
    assert abs(float(kept[-10:].mean()) - 0.864) < 0.06
    # inverse rescale is unbiased
    est = jax.vmap(lambda k: sparsify.della(row, 0.5, 0.4, k, rescale=True, rescale_mode="inverse"))(keys).mean(0)
    np.testing.assert_allclose(float(est.mean()), float(row.mean()), rtol=0.05)


@pytest.mark.parametrize("eager", [True, False])
def test_della_ranks_along_dim_1_as_mergekit(eager):
    """mergekit's ``della_magprune`` ranks along dim 1: within each row of a matrix,
    within each ``x[i, :, j]`` of a 3-D tensor.  With the inverse rescale a kept
    entry is ``tau / p``, so every draw shows the keep probability it used.
    density 0.5, epsilon 0.2, 3 entries a rank axis: p = 0.3, 0.5, 0.7 by rank."""
    tau = np.array([[[0.3, 1.0], [-0.1, 5.0], [0.2, -3.0]],
                    [[-2.0, 0.5], [1.0, 0.25], [4.0, -1.0]]], np.float32)  # [2, 3, 2]
    p = np.array([[[0.7, 0.3], [0.3, 0.7], [0.5, 0.5]],  # x[0, :, 0] ranks 2 0 1; x[0, :, 1] 0 2 1
                  [[0.5, 0.5], [0.3, 0.3], [0.7, 0.7]]], np.float32)  # x[1, :, 0] 1 0 2; x[1, :, 1] 1 0 2
    matrix = tau[0].T  # [2, 3]: rows [0.3, -0.1, 0.2] and [1.0, 5.0, -3.0]
    for x, want in [(tau, p), (matrix, p[0].T)]:
        merge = lambda key: merging.merge("della_linear", [{"w": jnp.asarray(x)}], base={"w": jnp.zeros(x.shape)},
                                          density=0.5, epsilon=0.2, rescale_mode="inverse", key=key)["w"]
        merge = merge if eager else jax.jit(merge)
        seen = np.zeros(x.shape, bool)
        for seed in range(12):
            out = np.asarray(merge(jax.random.key(seed)))
            kept = out != 0
            np.testing.assert_allclose(out[kept], (x / want)[kept], rtol=1e-6)
            seen |= kept
        assert seen.all()


def test_consensus_count_vs_sum():
    # entry 0: deltas +1, +1, -5: sum says -, count says +
    fts = [{"w": jnp.array([2.0])}, {"w": jnp.array([2.0])}, {"w": jnp.array([-4.0])}]
    base = {"w": jnp.array([1.0])}
    by_sum = merging.merge("ties", fts, base=base)
    by_count = merging.merge("ties", fts, base=base, consensus="count")
    np.testing.assert_allclose(by_sum["w"], [-4.0])
    np.testing.assert_allclose(by_count["w"], [2.0])


def test_divide_by_count_vs_weight():
    fts = [{"w": jnp.array([2.0])}, {"w": jnp.array([3.0])}]
    base = {"w": jnp.array([0.0])}
    by_w = merging.merge("ties", fts, base=base, weight=[1, 3])  # (2 + 9) / 4
    by_n = merging.merge("ties", fts, base=base, weight=[1, 3], divide_by="count")  # (2 + 9) / 2
    np.testing.assert_allclose(by_w["w"], [11 / 4])
    np.testing.assert_allclose(by_n["w"], [11 / 2])


def _ties_paper_reference(taus, k, lam):
    """The TIES paper's official algorithm on flattened task vectors (numpy)."""
    m = np.stack(taus)
    n = m.shape[1]
    keep = int(n * k)
    kth = np.sort(np.abs(m), axis=1)[:, n - keep][:, None]
    trimmed = m * (np.abs(m) >= kth)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign[None] > 0, trimmed > 0, trimmed < 0)
    sel = trimmed * agree
    cnt = (sel != 0).sum(0)
    return lam * sel.sum(0) / np.maximum(cnt, 1)


def test_ties_paper_settings_reproduce_the_paper_algorithm():
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(30, 20)).astype(np.float32), "b": rng.normal(size=(70,)).astype(np.float32)}
    fts = [jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(np.float32) * rng.uniform(0.1, 1), base) for _ in range(3)]
    taus = [np.concatenate([(f[k] - base[k]).reshape(-1) for k in ("a", "b")]) for f in fts]
    ref = _ties_paper_reference(taus, 0.2, 0.7)
    out = merging.merge("ties", fts, base=base, density=0.2, lam=0.7, trim="global")
    got = np.concatenate([(np.asarray(out[k]) - base[k]).reshape(-1) for k in ("a", "b")])
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_task_vector_and_apply_roundtrip():
    base = {"w": jnp.arange(4.0)}
    ft = {"w": jnp.arange(4.0) * 2}
    tv = merging.task_vector(ft, base)
    chex.assert_trees_all_close(tv, {"w": jnp.arange(4.0)})
    chex.assert_trees_all_close(merging.apply(base, tv, scale=0.5), {"w": jnp.arange(4.0) * 1.5})


def test_analysis_tools():
    a = {"w": jnp.array([1.0, 0.0, -1.0, 2.0])}
    b = {"w": jnp.array([-1.0, 1.0, -1.0, 0.0])}
    cos = merging.cosine_similarity([a, b])
    np.testing.assert_allclose(cos, [[1, 0], [0, 1]], atol=1e-7)
    sc = merging.sign_conflicts([a, b])
    assert sc["overall"] == 0.25 and sc["per_leaf"]["['w']"] == 0.25
    np.testing.assert_allclose(merging.norms(a)["total"], 6**0.5)
    kf = merging.kept_fraction(a, density=0.25)  # keeps 2.0 of |.| mass 4
    np.testing.assert_allclose(kf["l1_mass"], 0.5)
    np.testing.assert_allclose(kf["l2_energy"], 4 / 6)


def test_trim_keeps_the_top_k_by_flat_order_and_compiles_one_program_per_shape_for_any_density():
    from research.merging import analysis

    rng = np.random.default_rng(0)
    tv = {"a": jnp.asarray(np.round(rng.normal(size=(6, 8)) * 4) / 4, jnp.float32),  # ties at every cut
          "b": jnp.asarray(np.round(rng.normal(size=(6, 8)) * 4) / 4, jnp.float32),
          "c": jnp.asarray(rng.normal(size=(10,)), jnp.float32)}
    before = analysis._trim_leaf._cache_size()
    for density in (0.05, 0.2, 0.5, 0.7):
        out = merging.trim(tv, density)
        for name, x in tv.items():
            x = np.asarray(x).ravel()
            k = max(1, int(density * x.size))  # at least one, as TIES's trim (0.05 of 10 entries)
            keep = np.argsort(-np.abs(x), kind="stable")[:k]  # the k largest, ties by flat index
            want = np.zeros_like(x)
            want[keep] = x[keep]
            np.testing.assert_array_equal(np.asarray(out[name]).ravel(), want, err_msg=f"{name} at {density}")
    assert analysis._trim_leaf._cache_size() - before == 2  # shapes (6, 8) and (10,)


def test_kept_sign_conflicts_counts_only_entries_both_keep():
    # density 1: a keeps 4 entries, b keeps 3; both keep indices 0, 1, 3; signs differ at 1
    a = {"w": jnp.array([1.0, 2.0, -3.0, 4.0, 0.0])}
    b = {"w": jnp.array([5.0, -1.0, 0.0, 2.0, 7.0])}
    c = merging.kept_sign_conflicts(a, b)
    assert c["overlap"] == pytest.approx(3 / 5)
    assert c["conflict_rate"] == pytest.approx(1 / 3)
    assert c["chance_overlap"] == pytest.approx((4 / 5) * (4 / 5))
    # p_a = 3/4 positive, p_b = 3/4: chance of opposite signs 2 * 3/4 * 1/4
    assert c["chance_conflict_rate"] == pytest.approx(0.375)


def test_kept_sign_conflicts_of_independent_vectors_is_chance():
    ka, kb = jax.random.split(jax.random.key(0))
    a = {"w": jax.random.normal(ka, (200_000,))}
    b = {"w": jax.random.normal(kb, (200_000,))}
    c = merging.kept_sign_conflicts(a, b, density=0.2)
    assert c["overlap"] == pytest.approx(0.04, abs=0.003)  # what sign_conflicts divides by all entries
    assert c["conflict_rate"] == pytest.approx(0.5, abs=0.02)
    assert c["conflict_rate"] == pytest.approx(c["chance_conflict_rate"], abs=0.02)
    assert merging.sign_conflicts([a, b], density=0.2)["overall"] == pytest.approx(0.02, abs=0.003)


def test_election_discards_by_hand():
    # sums: 1-2+0.5 = -0.5 -> '-', 3+1-1 = 3 -> '+', 0 -> '+' (a zero vote is +)
    a = {"w": jnp.array([1.0, 3.0, 1.0])}
    b = {"w": jnp.array([-2.0, 1.0, -1.0])}
    c = {"w": jnp.array([0.5, -1.0, 0.0])}
    d = merging.election_discards([a, b, c], density=1.0)
    # a: kept 3, loses index 0;  b: kept 3, loses index 2;  c: kept 2, loses both (0.5 vs '-', -1 vs '+')
    assert d == pytest.approx([1 / 3, 1 / 3, 1.0])
