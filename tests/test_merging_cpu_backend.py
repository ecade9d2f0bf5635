"""The CPU backend of eager merges (``merging.cpu``): its numba kernels and host top-k search, bit for bit
against the plain-JAX algorithms run under ``jit``."""

import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numba
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from research import merging
from research.merging import sparsify
from research.merging.cpu import kernels as cpu_kernels
from research.merging.cpu import leaf as cpu_leaf
from research.merging.cpu import search

TINY = np.finfo(np.float32).tiny


def _reference(ft, base, t):
    """Per-row ``#[|ft - base| > t]`` with XLA:CPU's flush of subnormals to zero."""
    flush = lambda x: np.where(np.abs(x) < TINY, np.float32(0), x)
    d = flush(np.abs(flush(np.asarray(ft, np.float32)) - flush(np.asarray(base, np.float32))))
    d2 = d.reshape(1, -1) if d.ndim < 2 else d.reshape(-1, d.shape[-1])
    return (d2 > flush(np.float32(t))).sum(axis=1)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(7,), (33, 65), (2, 3, 40)])
def test_pair_counts_match_a_reference_count_row_by_row(dtype, shape):
    rng = np.random.default_rng(0)
    base = jnp.asarray(rng.normal(size=shape), dtype)
    ft = jnp.asarray(np.asarray(base, np.float32) + np.round(rng.normal(size=shape) * 4) / 8, dtype)  # many ties
    for t in [0.0, 0.125, 0.25, 1e-39, 3.0]:
        below = np.float32(t) if t == 0 else np.nextafter(np.float32(t), np.float32(0))
        gt, ge, bad = cpu_kernels.pair_counts(ft, base, np.float32(t), below)
        np.testing.assert_array_equal(gt, _reference(ft, base, t))
        np.testing.assert_array_equal(ge, _reference(ft, base, below))
        assert not bad.any()


@pytest.mark.parametrize("shape", [(70,), (5, 40)])
def test_probe_counts_split_rows_longer_than_the_kernels_take(monkeypatch, shape):
    # the kernels count in 32-bit lanes; rows above ROW_MAX entries are counted in parts
    monkeypatch.setattr(cpu_kernels, "ROW_MAX", 16)
    rng = np.random.default_rng(5)
    base = rng.normal(size=shape).astype(np.float32)
    ft = base + np.round(rng.normal(size=shape) * 4).astype(np.float32) / 8
    ft.reshape(-1)[[3, 37]] = 1e-39  # rows the flushing kernel counts again
    ft.reshape(-1)[20] = np.inf
    for t in [0.0, 0.25]:
        gt, ge, bad, tiny = cpu_kernels.probe_counts(jnp.asarray(base), [jnp.asarray(ft)] * 2, [0, 1], [t, 1.0], [t, 1.0])
        for p, tp in enumerate([t, 1.0]):
            np.testing.assert_array_equal(gt[p], _reference(ft, base, tp))
        assert np.flatnonzero(bad[0]).tolist() == [20 // shape[-1]]  # the row of the flat position
        assert np.flatnonzero(tiny).tolist() == sorted({3 // shape[-1], 37 // shape[-1]})


def test_pair_counts_agree_with_the_xla_counting_program():
    rng = np.random.default_rng(1)
    base = jnp.asarray(rng.normal(size=(40, 300)) * 0.02, jnp.bfloat16)
    ft = jnp.asarray(np.asarray(base, np.float32) + rng.normal(size=(40, 300)) * 0.002, jnp.bfloat16)
    t = np.float32(0.002)
    below = np.nextafter(t, np.float32(0))
    packed = np.asarray(search._row_pair_abs_delta(ft, base, t, below)).astype(np.int64)
    gt, ge, _ = cpu_kernels.pair_counts(ft, base, t, below)
    np.testing.assert_array_equal(np.divmod(packed, 301), (gt, ge))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["ft", "base"])
def test_pair_counts_flag_the_rows_holding_nan_or_inf(bad_value, where):
    ft, base = np.zeros((4, 5), np.float32), np.ones((4, 5), np.float32)
    (ft if where == "ft" else base)[2, 3] = bad_value
    _, _, bad = cpu_kernels.pair_counts(jnp.asarray(ft), jnp.asarray(base), np.float32(0.5), np.float32(0.25))
    np.testing.assert_array_equal(bad, [0, 0, 1, 0])


def test_overflowing_difference_is_flagged_like_a_non_finite_input():
    big = np.finfo(np.float32).max
    _, _, bad = cpu_kernels.pair_counts(jnp.asarray([big]), jnp.asarray([-big]), np.float32(0), np.float32(0))
    assert bad.tolist() == [1]


def test_kernel_reads_jax_arrays_in_place():
    x = jnp.ones((8, 16), jnp.bfloat16)
    assert np.shares_memory(cpu_kernels._host_view(x), np.asarray(x))


def test_only_single_device_bf16_and_float32_arrays_take_the_kernel():
    assert cpu_kernels.usable(jnp.ones(4, jnp.bfloat16), jnp.ones(4, jnp.bfloat16))
    assert cpu_kernels.usable(np.ones((2, 3), np.float32))
    assert not cpu_kernels.usable(jnp.ones(4, jnp.float16))
    assert not cpu_kernels.usable(np.ones((4, 4), np.float32)[:, ::2])  # not contiguous
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(np.ones((16, 4), np.float32), NamedSharding(mesh, P("x")))
    assert not cpu_kernels.usable(sharded)


def test_eager_trim_results_do_not_depend_on_the_counting_backend():
    rng = np.random.default_rng(2)
    base = jnp.asarray(rng.normal(size=(64, 96)) * 0.02, jnp.bfloat16)
    ft = jnp.asarray(np.asarray(base, np.float32) + rng.normal(size=(64, 96)) * 0.002, jnp.bfloat16)
    for k in [1, 100, 1229, 6000]:
        assert search.topk_cut_delta_host(ft, base, k, kernel=True) == search.topk_cut_delta_host(ft, base, k, kernel=False)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(9,), (33, 65), (2, 3, 40), (3, 70000)])
def test_row_ranks_equal_a_double_argsort_ties_by_column(dtype, shape):
    rng = np.random.default_rng(3)
    base = jnp.asarray(rng.normal(size=shape), dtype)
    ft = jnp.asarray(np.asarray(base, np.float32) + np.round(rng.normal(size=shape) * 4) / 8, dtype)  # many ties
    ranks = cpu_kernels.row_ranks(ft, base)
    d = np.abs(np.asarray(ft, np.float32) - np.asarray(base, np.float32)).reshape(ranks.shape)
    expected = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1, kind="stable")
    assert ranks.dtype == (np.int32 if shape[-1] > 65536 else np.uint16)
    np.testing.assert_array_equal(ranks, expected)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(9,), (33, 65), (2, 3, 40), (3, 7, 21), (4, 5, 2, 3)])
def test_della_host_ranks_rank_along_dim_1_as_a_double_argsort(dtype, shape):
    """``host_ranks``: each ``|ft - base|`` ranked among those along dim 1 (for 3-D
    and up by ``axis1_ranks``, in tiles of columns and a last partial one), as a
    ``[shape[0], -1]`` table."""
    rng = np.random.default_rng(3)
    base = jnp.asarray(rng.normal(size=shape), dtype)
    ft = jnp.asarray(np.asarray(base, np.float32) + np.round(rng.normal(size=shape) * 4) / 8, dtype)  # many ties
    d = np.abs(np.asarray(ft, np.float32) - np.asarray(base, np.float32))
    d = d.reshape(1, -1, 1) if d.ndim < 2 else d.reshape(d.shape[0], d.shape[1], -1)
    expected = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1, kind="stable")
    np.testing.assert_array_equal(cpu_leaf.host_ranks(ft, base), expected.reshape(d.shape[0], -1))


def test_row_ranks_flush_subnormal_differences_like_xla():
    base = jnp.zeros((1, 6), jnp.float32)
    ft = jnp.asarray([[3e-39, 1e-30, 0.0, 1e-39, -2e-39, 1e-31]], jnp.float32)  # subnormals rank as zeros
    expected = sparsify.della_ranks(sparsify.della_view(ft - base)).reshape(1, -1)
    np.testing.assert_array_equal(cpu_kernels.row_ranks(ft, base), np.asarray(expected))
    assert cpu_kernels.row_ranks(ft, base).tolist() == [[0, 5, 1, 2, 3, 4]]
    ft3, base3 = ft.reshape(1, 3, 2), base.reshape(1, 3, 2)  # along axis 1: [3e-39, 0, -2e-39], [1e-30, 1e-39, 1e-31]
    expected = sparsify.della_ranks(sparsify.della_view(ft3 - base3)).reshape(1, -1)
    np.testing.assert_array_equal(cpu_kernels.row_ranks(ft3, base3, (1, 3, 2)), np.asarray(expected))
    assert cpu_kernels.row_ranks(ft3, base3, (1, 3, 2)).tolist() == [[0, 2, 1, 0, 2, 1]]


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "inverse"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_eager_della_with_kernel_ranks_equals_jitted_della(method, mode, dtype):
    rng = np.random.default_rng(4)
    mk = lambda: {"w": jnp.asarray(rng.normal(size=(16, 48)), dtype), "v": jnp.asarray(rng.normal(size=(2, 3, 8)), dtype),
                  "b": jnp.asarray(rng.normal(size=(30,)), dtype)}
    base, fts = mk(), [mk(), mk()]
    kw = dict(key=jax.random.key(7), density=0.5, epsilon=0.2, rescale_mode=mode)
    eager = merging.merge(method, fts, base=base, **kw)
    jitted = jax.jit(lambda fts, base: merging.merge(method, fts, base=base, **kw))(fts, base)
    chex.assert_trees_all_close(eager, jitted, atol=1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_della_masks_of_3d_leaves_merged_by_the_numba_pass_give_the_xla_merge(dtype):
    """DELLA's masks of 3-D leaves (ranked along axis 1, drawn apart), bit-packed over
    ``[-1, last]`` rows and merged by the numba pass (``masks_merge``, as the
    streamed merge of a fused tensor merges them), give the XLA program's merge
    on the same masks and L1 factors, bit for bit; a model at density 1 has none."""
    rng = np.random.default_rng(5)
    for shape in [(3, 8, 24), (1, 5, 9)]:
        base = jnp.asarray(rng.normal(size=shape), dtype)
        ms = [jnp.asarray(np.asarray(base, np.float32) + rng.normal(size=shape) * 0.1, dtype) for _ in range(3)]
        ms[1] = ms[1].at[0, 2, 3].set(2.0**-40)  # an input below 2**-32: merged again by XLA
        opts = merging.options("della", 3, {"density": [0.5, 0.7, 1.0], "epsilon": 0.2})
        keys = [jax.random.fold_in(jax.random.key(8), i) for i in range(3)]
        states = [cpu_leaf._random_state(m, base, opts, keys[i], i) for i, m in enumerate(ms)]
        assert states[2].mask is None
        bits = [None if s.mask is None else cpu_leaf.row_bits(s.mask, shape[-1]) for s in states]
        factors = [np.float32(1.0 if s.mul is None else s.mul) for s in states]
        got = cpu_leaf.masks_merge(base, ms, opts, bits, factors, dtype)
        assert got is not None
        want = cpu_leaf._mix_jit(base, ms, states, opts=opts, out_dtype=jnp.dtype(dtype))
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=str(shape))


def _block_keys(key, shape):
    blocks, rows = sparsify.draw_blocks(shape)
    if blocks == 1:
        return jax.random.key_data(key)[None], rows
    return jax.random.key_data(jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(blocks))), rows


@pytest.mark.parametrize("shape", [(), (7,), (33, 65), (2, 3, 40), (130, 7), (1000,)])
@pytest.mark.parametrize("seed", [0, 12345])
def test_threefry_draws_are_bit_for_bit_jax_s(monkeypatch, shape, seed):
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 256)  # exercise the blocked draws on small shapes
    key = jax.random.fold_in(jax.random.key(seed), 3)
    keys, rows = _block_keys(key, shape)
    for p in [0.3, 0.9]:
        expected = sparsify.blocked_draw(lambda k, s: jax.random.bernoulli(k, p, s), key, shape)
        np.testing.assert_array_equal(cpu_kernels.bernoulli(keys, rows, p, shape), np.asarray(expected))


@pytest.mark.parametrize("shape", [(1, 9), (33, 65), (130, 7)])
def test_della_masks_from_rank_tables_are_bit_for_bit_jax_s(monkeypatch, shape):
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 256)
    key = jax.random.key(9)
    ranks = np.argsort(np.random.default_rng(0).random(shape), axis=1).astype(np.uint16)
    keys, rows = _block_keys(key, shape)
    for density, epsilon in [(0.4, 0.1), (0.7, 0.29)]:
        table = cpu_leaf._della_probs_table(shape[1], density, epsilon)
        expected = sparsify.della_mask(key, jnp.asarray(ranks)[:, :, None], density, epsilon)[:, :, 0]
        np.testing.assert_array_equal(cpu_kernels.below_table(keys, rows, ranks, table), np.asarray(expected))


def _tie_heavy_deltas(rng, shape):
    """Half zeros and rounded values (buckets of one value, and of several), then three
    values only (large buckets of ties): what DELLA's kernels rank by bucket."""
    return [np.where(rng.random(shape) < 0.5, 0.0, np.round(rng.normal(size=shape) * 64) / 4096),
            rng.choice([0.0, 1 / 256, -1 / 128], size=shape)]


@pytest.mark.parametrize("count_max", [0, 2**30])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_della_strip_masks_are_jax_s_masks_of_a_fused_expert_s_column_strips(monkeypatch, dtype, count_max):
    """``della_strip_masks`` on a strip ``[e, :, c0:c1]`` of a fused ``[experts, n, cols]``
    tensor gives those entries of ``sparsify.della_mask`` over the whole tensor
    (JAX's draw, double-argsort ranks down axis 1), bit-packed along rows; its sums
    are each column's ``sum |d|`` and kept ``|d|``.  Deltas with many ties, and
    none (a fine-tune equal to the base: every rank a tie).  Strips of 16 and 21
    columns: tiles of 8 and a last partial one.  Entries that need exact ranks are
    counted or the whole column ranked (``count_max``)."""
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 2000)  # (4, 60, 37): draws in blocks of experts
    shape = (4, 60, 37)
    e, n, cols = shape
    rng = np.random.default_rng(5)
    base = jnp.asarray(rng.normal(size=shape) * 0.02, dtype)
    key = jax.random.key(8)
    draw_keys, draw_rows = _block_keys(key, (e, n * cols))
    assert len(draw_keys) > 1
    for delta in _tie_heavy_deltas(rng, shape) + [np.zeros(shape)]:  # and a fine-tune equal to the base
        ft = jnp.asarray(np.asarray(base, np.float32) + delta, dtype)
        tau = ft.astype(jnp.float32) - base.astype(jnp.float32)
        for density, epsilon in [(0.5, 0.4), (0.3, 0.05)]:
            expected = np.asarray(sparsify.della_mask(key, sparsify.della_ranks(tau), density, epsilon))
            table = cpu_leaf._della_probs_table(n, density, epsilon)
            for x in range(e):
                for c0, c1 in [(0, 16), (16, cols)]:
                    bits, sums = cpu_kernels.della_strip_masks(
                        base[x, :, c0:c1], ft[x, :, c0:c1], draw_keys, draw_rows * n, table, row0=x * n, col0=c0,
                        row_len=cols, count_max=count_max)
                    want = expected[x, :, c0:c1]
                    np.testing.assert_array_equal(np.unpackbits(bits, axis=1, count=c1 - c0).astype(bool), want,
                                                  err_msg=f"expert {x}, columns {c0}:{c1}")
                    a = np.abs(np.asarray(tau[x, :, c0:c1], np.float64))
                    np.testing.assert_allclose(sums, np.stack([a.sum(0), (a * want).sum(0)], -1), rtol=1e-6)


def test_della_strip_masks_draw_each_row_from_its_own_draw_block():
    """A strip whose rows lie in several draw blocks: each row's uniforms come from its
    block's key at the block's counters (``sparsify.blocked_draw`` of ``jax.random.uniform``
    over the whole matrix), whatever row of a block the strip starts at."""
    rows, cols, block_rows = 50, 24, 7
    key = jax.random.key(2)
    draw_keys = jax.random.key_data(jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(8)))
    u = np.asarray(jnp.concatenate([jax.random.uniform(jax.random.wrap_key_data(k), (block_rows, cols))
                                    for k in draw_keys])[:rows])
    rng = np.random.default_rng(1)
    base = rng.normal(size=(rows, cols)).astype(np.float32)
    ft = base + rng.normal(size=(rows, cols)).astype(np.float32)
    r0, r1, c0, c1 = 3, 45, 8, 21
    d = np.abs(ft[r0:r1, c0:c1] - base[r0:r1, c0:c1])
    ranks = np.argsort(np.argsort(d, axis=0, kind="stable"), axis=0, kind="stable")
    table = cpu_leaf._della_probs_table(r1 - r0, 0.5, 0.3)
    want = u[r0:r1, c0:c1] < table[ranks]
    bits, _ = cpu_kernels.della_strip_masks(base[r0:r1, c0:c1], ft[r0:r1, c0:c1], draw_keys, block_rows, table,
                                            row0=r0, col0=c0, row_len=cols, sums=False)
    np.testing.assert_array_equal(np.unpackbits(bits, axis=1, count=c1 - c0).astype(bool), want)


@pytest.mark.parametrize("count_max", [0, cpu_kernels.DELLA_COUNT_MAX, 2**30])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("shape", [(40, 400), (3, 2, 200), (90,)])
def test_della_masks_equal_jax_s_draw_over_double_argsort_ranks(monkeypatch, dtype, shape, count_max):
    """The fused kernel ranks exactly only where the draw needs it.  Model 0: half
    of each delta 0 (one bucket of equal values, ranked by column), the rest
    rounded (buckets holding a value or several); model 1: three values (large
    buckets of ties); model 2 keeps everything.  At eps 0.4 many draws fall
    between a bucket's bounds, at eps 0.05 few do.  Entries in buckets of
    several values are ranked by a count over the row, or the whole row is
    ranked: always (``count_max`` 0), never (2**30), or past the default."""
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 4000)  # (40, 400): draws in blocks of 10 rows
    rng = np.random.default_rng(11)
    base = jnp.asarray(rng.normal(size=shape) * 0.02, dtype)
    deltas = _tie_heavy_deltas(rng, shape) + [np.zeros(shape)]
    fts = [jnp.asarray(np.asarray(base, np.float32) + d, dtype) for d in deltas]
    keys = [jax.random.fold_in(jax.random.key(2), i) for i in range(3)]
    rows = lambda x: x.reshape(1, -1) if x.ndim < 2 else x.reshape(x.shape[0], -1)  # the kernel ranks within rows
    for density, epsilon in [(0.5, 0.4), (0.3, 0.05)]:
        table = cpu_leaf._della_probs_table(rows(np.zeros(shape)).shape[1], density, epsilon)
        block_keys = [_block_keys(k, shape)[0] for k in keys[:2]] + [None]  # model 2 keeps everything
        packed, sums = cpu_kernels.della_masks(base, fts, block_keys, _block_keys(keys[0], shape)[1], [table] * 3,
                                               count_max=count_max)
        masks = packed.unpacked()
        for i in range(2):
            tau = fts[i].astype(jnp.float32) - base.astype(jnp.float32)
            expected = sparsify.della_mask(keys[i], sparsify.della_ranks(sparsify.della_view(rows(tau))), density, epsilon)
            np.testing.assert_array_equal(masks[i], np.asarray(expected)[:, :, 0], err_msg=f"model {i}")
            a = np.abs(np.asarray(rows(tau), np.float64))
            np.testing.assert_allclose(sums[i], np.stack([a.sum(1), (a * masks[i]).sum(1)], -1), rtol=1e-6)
        assert masks[2].all()


def test_della_masks_refuse_a_1d_leaf_drawn_in_blocks(monkeypatch):
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 64)  # DELLA ranks the whole leaf as one row; its draw is in blocks
    x = jnp.ones((200,), jnp.float32)
    keys, rows = _block_keys(jax.random.key(0), x.shape)
    assert len(keys) > 1
    assert cpu_kernels.della_masks(x, [x], [keys], rows, [np.zeros(200, np.float32)]) is None


def test_threefry_draws_need_a_threefry_key():
    assert cpu_kernels.random_ok(jax.random.key(0))
    assert cpu_kernels.random_ok(jax.random.PRNGKey(0))  # raw uint32 keys use the default implementation
    assert not cpu_kernels.random_ok(jax.random.key(0, impl="rbg"))
    assert cpu_kernels.random_ok()  # a key of the default implementation
    with jax.default_prng_impl("rbg"):
        assert not cpu_kernels.random_ok()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della"])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_eager_random_merges_equal_jitted_ones_whichever_the_key(monkeypatch, method, impl):
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 300)  # blocked draws on the (40, 30) leaf
    rng = np.random.default_rng(5)
    mk = lambda: {"w": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32), "b": jnp.asarray(rng.normal(size=(9,)), jnp.float32)}
    base, fts = mk(), [mk(), mk()]
    kw = dict(key=jax.random.key(1, impl=impl), density=0.4)
    eager = merging.merge(method, fts, base=base, **kw)
    jitted = jax.jit(lambda fts, base: merging.merge(method, fts, base=base, **kw))(fts, base)
    # the L1 rescale's factor: float64 sums here, float32 sums (good to ~1e-6) under jit
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-5)


def test_warm_up_loads_a_kernel_in_the_background_only_where_one_applies():
    thread = cpu_kernels.warm_up("magnitude", "bfloat16")
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert cpu_kernels.warm_up(None) is None  # task_arithmetic: nothing to load
    assert cpu_kernels.warm_up("magnitude", "float16") is None  # the XLA programs count float16


def _llama_like(rng, dtype, shapes=((48, 64), (64,), (2, 5, 24))):
    """A base and three fine-tunes whose bf16 deltas tie a lot (trims then break ties)."""
    mk = lambda: {f"w{i}": rng.normal(size=s).astype(np.float32) * 0.02 for i, s in enumerate(shapes)}
    base = mk()
    fts = [{k: v + np.round(rng.normal(size=v.shape) * 8) / 4096 for k, v in base.items()} for _ in range(3)]
    cast = lambda t: {k: jnp.asarray(v, dtype) for k, v in t.items()}
    return cast(base), [cast(f) for f in fts]


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many leaves the numba merge pass merged (so a test notices a silent fallback)."""
    calls = []
    real = cpu_kernels.cut_merge

    def counting(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(cpu_kernels, "cut_merge", counting)
    return calls


TRIM_SETTINGS = [
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.35, "lam": 0.7, "weight": [0.5, 1.0, 2.0]}),
    ("ties", {"density": 0.5, "consensus": "count", "divide_by": "count"}),
    ("ties", {"density": 0.3, "vote_on": "raw", "weight": [1.0, -0.5, 2.0], "out_dtype": jnp.float32}),
    ("ties", {"density": [1.0, 0.1, 0.6], "normalize": False}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05}),
    ("breadcrumbs_ties", {"density": 0.3, "gamma": 0.02, "lam": 1.5}),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.05, "normalize": True}),  # base + num * (1/n), fused by XLA
]


_BITS = {jnp.dtype(jnp.bfloat16): np.uint16, jnp.dtype(jnp.float32): np.uint32}


def _bits(x):
    return np.asarray(x).view(_BITS[jnp.dtype(x.dtype)])


# Compiling the jitted references is most of this file's time, and each leaf adds
# its own searches: each method's first setting merges every leaf shape (1-D,
# 2-D, 3-D), the settings after it vary the options on one 2-D leaf.
_TRIM_SHAPES = ((48, 64), (64,), (2, 5, 24))
_DARE_SHAPES = ((48, 64), (64,), (2, 5, 24), (75, 32))  # (75, 32): 9 draw blocks of 300


def _first_of_its_method(settings, i) -> bool:
    return all(m != settings[i][0] for m, _ in settings[:i])


def _trim_inputs(setting, dtype):
    shapes = _TRIM_SHAPES if _first_of_its_method(TRIM_SETTINGS, setting) else _TRIM_SHAPES[:1]
    return _llama_like(np.random.default_rng(11), dtype, shapes=shapes)


def _dare_inputs(setting, dtype):
    shapes = _DARE_SHAPES if _first_of_its_method(DARE_SETTINGS, setting) else _DARE_SHAPES[-1:]
    return _llama_like(np.random.default_rng(16), dtype, shapes=shapes)


def _jitted(setting, dtype):
    method, kw = TRIM_SETTINGS[setting]
    base, fts = _trim_inputs(setting, dtype)
    return jax.jit(lambda fts, base: merging.merge(method, fts, base=base, **kw))(fts, base)


# DARE with the inverse rescale (or none): the numba pass draws the masks and merges
# in one go; the L1 rescale's factor sums in float64, so it is compared to a tolerance
DARE_SETTINGS = [
    ("dare_ties", {"density": 0.2, "rescale_mode": "inverse"}),
    ("dare_linear", {"density": 0.3, "rescale_mode": "inverse", "weight": [0.5, 1.0, 2.0], "lam": 0.7}),
    ("dare_ties", {"density": [1.0, 0.1, 0.6], "rescale_mode": "inverse", "consensus": "count", "out_dtype": jnp.float32}),
    ("dare_linear", {"density": 0.5, "rescale": False, "normalize": True}),
    ("dare_ties", {"density": 0.4, "vote_on": "raw", "weight": [1.0, -0.5, 2.0], "lam": 1.5, "rescale": False}),
]
_DARE_KEY = 7


def _jitted_dare(setting, dtype):
    method, kw = DARE_SETTINGS[setting]
    base, fts = _dare_inputs(setting, dtype)
    kw = dict(kw, key=jax.random.key(_DARE_KEY))
    return jax.jit(lambda fts, base: merging.merge(method, fts, base=base, **kw))(fts, base)


def write_jitted_references(path):
    """Every TRIM_SETTINGS and DARE_SETTINGS merge, bf16 and float32, under ``jax.jit``,
    as raw bits, into ``path`` (npz); the DARE draws in blocks of 300 entries."""
    out = {}
    for i in range(len(TRIM_SETTINGS)):
        for dtype in (jnp.bfloat16, jnp.float32):
            out.update({f"{i}/{jnp.dtype(dtype)}/{k}": _bits(v) for k, v in _jitted(i, dtype).items()})
    sparsify._MASK_BLOCK = 300
    for i in range(len(DARE_SETTINGS)):
        for dtype in (jnp.bfloat16, jnp.float32):
            out.update({f"dare{i}/{jnp.dtype(dtype)}/{k}": _bits(v) for k, v in _jitted_dare(i, dtype).items()})
    np.savez(path, **out)


@pytest.fixture(scope="module")
def jitted_references(tmp_path_factory):
    """The jitted merges compiled at XLA's default optimisation, as users compile them.
    The tests' processes compile at level 0 for speed, whose fusions round some
    sums differently (float32 sums; in bf16, ``base + lam * x`` fused or not,
    depending on the program around it)."""
    return _at_default_optimisation("write_jitted_references", tmp_path_factory.mktemp("jitted"))


def _at_default_optimisation(writer: str, tmp) -> dict:
    """What this module's function ``writer(path)`` saves, run in a process that
    compiles at XLA's default optimisation."""
    path = str(tmp / "merges.npz")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"import test_merging_cpu_backend as t; t.{writer}({path!r})")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    return dict(np.load(path))


@pytest.mark.parametrize("setting", range(len(TRIM_SETTINGS)), ids=[f"{m}-kw{i}" for i, (m, _) in enumerate(TRIM_SETTINGS)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_numba_trim_merges_equal_the_jitted_merge_bit_for_bit(kernel_calls, jitted_references, setting, dtype):
    method, kw = TRIM_SETTINGS[setting]
    base, fts = _trim_inputs(setting, dtype)
    eager = merging.merge(method, fts, base=base, **kw)
    assert kernel_calls == [True] * len(base)  # every leaf went through the kernel
    want = {k: jitted_references[f"{setting}/{jnp.dtype(dtype)}/{k}"] for k in base}
    for k in base:
        np.testing.assert_array_equal(_bits(eager[k]), want[k], err_msg=k)


@pytest.mark.parametrize("setting", range(len(DARE_SETTINGS)), ids=[f"{m}-kw{i}" for i, (m, _) in enumerate(DARE_SETTINGS)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_numba_dare_merges_equal_the_jitted_merge_bit_for_bit(monkeypatch, jitted_references, setting, dtype):
    """Masks drawn inside the merge pass, in draw blocks (the (75, 32) leaf has 9),
    equal JAX's blocked bernoulli draws and the XLA merge, bit for bit.  (Rows
    are whole vectors: XLA:CPU fuses ``base + lam * x`` in its vector loops but
    not always in a scalar remainder, so on a narrow last axis its own float32
    rounding varies with the column.)"""
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 300)
    calls = []
    real = cpu_kernels.random_merge
    monkeypatch.setattr(cpu_kernels, "random_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    method, kw = DARE_SETTINGS[setting]
    base, fts = _dare_inputs(setting, dtype)
    eager = merging.merge(method, fts, base=base, key=jax.random.key(_DARE_KEY), **kw)
    assert len(calls) == len(base)  # every leaf went through the kernel
    want = {k: jitted_references[f"dare{setting}/{jnp.dtype(dtype)}/{k}"] for k in base}
    for k in base:
        np.testing.assert_array_equal(_bits(eager[k]), want[k], err_msg=k)


@pytest.mark.parametrize("shape,mask_block", [((3, 4, 10), 40), ((3, 4, 10), 80), ((2, 5, 7), 1000)])
def test_any_rows_of_a_blocked_draw_are_drawn_as_jax_draws_them(monkeypatch, shape, mask_block):
    """DARE's masks over some rows of a tensor's ``[-1, last]`` view, the first of them
    ``row0`` rows into its draw block (a fused-expert tensor merged in blocks within
    an expert): the rows of ``jax.random.bernoulli``'s blocked draw over the
    tensor's own shape, with the whole tensor's per-row L1 sums and merge."""
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", mask_block)  # draw blocks of 1 or 2 experts, or one draw
    key = jax.random.key(4)
    keys, rb = _block_keys(key, shape)
    keys = np.asarray(keys)
    rows, cols = shape[0] * shape[1], shape[2]
    view_rb = rb * shape[1]  # rows of the view per draw block
    expected = np.asarray(sparsify.blocked_draw(lambda k, s: jax.random.bernoulli(k, 0.4, s), key, shape))
    expected = expected.reshape(rows, cols)
    rng = np.random.default_rng(0)
    base = rng.normal(size=shape).astype(np.float32)
    ft = base + rng.normal(size=shape).astype(np.float32) * np.float32(1e-2)
    b2, f2 = base.reshape(rows, cols), ft.reshape(rows, cols)
    mix = dict(scale=[1.0], consensus=None, vote_on="weighted", normalize=False, divide_by="weight", lam=1.0,
               out_dtype="float32")
    whole_masks, whole_sums = cpu_kernels.random_masks(base, [ft], [keys], rb, [0.4])
    np.testing.assert_array_equal(whole_masks.unpacked()[0], expected)
    np.testing.assert_allclose(whole_sums[0][:, 0], np.abs(f2 - b2).sum(1), rtol=1e-6)
    whole, _ = cpu_kernels.random_merge(base, [ft], [1.0], block_keys=[keys], block_rows=rb, density=[0.4], **mix)
    np.testing.assert_array_equal(whole.reshape(rows, cols), b2 + np.where(expected, f2 - b2, np.float32(0)))
    for s, e in [(0, rows), (1, 3), (3, 9), (view_rb - 1, min(rows, view_rb + 2)), (rows - 2, rows)]:
        b0, row0 = s // view_rb, s % view_rb
        part = keys[b0:-(-e // view_rb)]
        np.testing.assert_array_equal(cpu_kernels.bernoulli(part, view_rb, 0.4, (e - s, cols), row0), expected[s:e])
        masks, sums = cpu_kernels.random_masks(b2[s:e], [f2[s:e]], [part], view_rb, [0.4], row0=row0)
        np.testing.assert_array_equal(masks.unpacked()[0], expected[s:e])
        np.testing.assert_array_equal(sums[0], whole_sums[0][s:e])
        leaf, _ = cpu_kernels.random_merge(b2[s:e], [f2[s:e]], [1.0], block_keys=[part], block_rows=view_rb, row0=row0,
                                           density=[0.4], **mix)
        np.testing.assert_array_equal(leaf, whole.reshape(rows, cols)[s:e])


@pytest.mark.parametrize("sparsifier", ["random", "della"])
def test_l1_factor_does_not_depend_on_the_row_blocks(monkeypatch, sparsifier):
    """The L1 rescale's sums are per row, then exactly rounded: a tensor merged in
    row blocks gets the factor it gets whole (DARE's and DELLA's mask kernels,
    which add them up as they draw)."""
    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 800)  # 4 draw blocks of 16 rows
    assert sparsify.draw_blocks((64, 50)) == (4, 16)
    rng = np.random.default_rng(17)
    base = rng.normal(size=(64, 50)).astype(np.float32)
    ft = base + rng.normal(size=base.shape).astype(np.float32) * 1e-3
    keys = np.asarray(cpu_leaf._block_key_data(jax.random.key(2), 4))
    table = cpu_leaf._della_probs_table(50, 0.3, 0.1)
    draw = ((lambda b, f, k, sums=True: cpu_kernels.random_masks(b, f, k, 16, [0.3], sums)) if sparsifier == "random"
            else (lambda b, f, k, sums=True: cpu_kernels.della_masks(b, f, k, 16, [table], sums)))
    packed, sums = draw(base, [ft], [keys])
    masks = packed.unpacked()
    parts = [draw(base[i:i + 16], [ft[i:i + 16]], [keys[i // 16:i // 16 + 1]])[1][0] for i in range(0, 64, 16)]
    np.testing.assert_array_equal(np.concatenate(parts), sums[0])
    assert cpu_leaf.dare_factor(np.concatenate(parts)) == cpu_leaf.dare_factor(sums[0])
    unsummed, none = draw(base, [ft], [keys], sums=False)
    assert none is None
    np.testing.assert_array_equal(unsummed.bits, packed.bits)
    tau = ft.astype(np.float64) - base
    assert cpu_leaf.dare_factor(sums[0]) == pytest.approx(np.abs(tau).sum() / np.abs(tau[masks[0]]).sum(), rel=1e-6)
    if sparsifier == "random":
        jax_s = sparsify.blocked_draw(lambda k, s: jax.random.bernoulli(k, 0.3, s), jax.random.key(2), (64, 50))
        np.testing.assert_array_equal(masks[0], np.asarray(jax_s))


def test_dare_s_merge_pass_flags_the_rows_holding_tiny_inputs(monkeypatch):
    base, fts = _llama_like(np.random.default_rng(18), jnp.float32, shapes=((16, 24),))
    fts[1] = {"w0": fts[1]["w0"].at[3, 4].set(1e-39)}
    kw = dict(density=0.3, rescale_mode="inverse", key=jax.random.key(1))
    flags = []
    real = cpu_kernels.random_merge
    monkeypatch.setattr(cpu_kernels, "random_merge", lambda *a, **k: flags.append((out := real(*a, **k))[1]) or out)
    eager = merging.merge("dare_ties", fts, base=base, **kw)
    assert flags[0][3] == 1 and not flags[0][:3].any() and not flags[0][4:].any()  # row 3 flagged: merged again by XLA
    monkeypatch.setattr(cpu_leaf, "_dare_leaf", lambda *a: None)
    np.testing.assert_array_equal(np.asarray(eager["w0"]), np.asarray(merging.merge("dare_ties", fts, base=base, **kw)["w0"]))


def test_fused_cuts_equal_the_cuts_of_one_search_per_model():
    base, fts = _llama_like(np.random.default_rng(12), jnp.bfloat16)
    b, ms = base["w0"], [f["w0"] for f in fts]
    ks = [[1, 2000], [614], [3071]]
    fused = search.topk_cuts_host(b, ms, ks)
    assert fused.finite and not fused.tiny.any()
    for i, k_list in enumerate(ks):
        assert fused.cuts[i] == [search.topk_cut_delta_host(ms[i], b, k) for k in k_list]


def test_probe_counts_recount_with_flushing_where_subnormals_could_occur():
    rng = np.random.default_rng(13)
    base = rng.normal(size=(6, 40)).astype(np.float32)
    ft = base + rng.normal(size=base.shape).astype(np.float32)
    ft[2, 3], base[4, 5], ft[4, 5], base[1, 1], ft[1, 1] = 1e-39, 2e-38, 1.5e-38, 1e-38, 1.01e-38
    for t in [0.0, 0.5]:
        gt, ge, bad, tiny = cpu_kernels.probe_counts(jnp.asarray(base), [jnp.asarray(ft)], [0], [t], [t])
        assert np.flatnonzero(tiny).tolist() == [1, 2, 4]
        np.testing.assert_array_equal(gt[0], _reference(ft, base, t))
    clean = rng.normal(size=base.shape).astype(np.float32)
    _, _, _, tiny = cpu_kernels.probe_counts(jnp.asarray(clean), [jnp.asarray(clean + 1)], [0], [0.5], [0.5])
    assert not tiny.any()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_magnitude_histograms_count_the_flushed_float_bits_of_every_delta(dtype):
    """Both levels of ``MagnitudeHistograms`` against ``np.bincount`` of the bits of
    ``|ft - base|`` flushed as XLA:CPU: rows with subnormal inputs (flushed), an
    overflowing difference and a NaN (counted apart), over two blocks."""
    rng = np.random.default_rng(21)
    base = rng.normal(size=(9, 70)).astype(np.float32)
    ft = base + np.round(rng.normal(size=base.shape) * 8) / 64  # ties
    ft[2, 3], base[4, 5], ft[4, 5], base[1, 1], ft[1, 1] = 1e-39, 2e-38, 1.5e-38, 1e-38, 1.01e-38
    big = np.finfo(np.float32).max if dtype == jnp.float32 else 3e38
    ft[6, 0], base[6, 0], ft[7, 9] = big, -big, np.nan
    base, ft = (np.asarray(jnp.asarray(x, dtype)) for x in (base, ft))
    flush = lambda x: np.where(np.abs(x) < TINY, np.float32(0), x)
    with np.errstate(over="ignore", invalid="ignore"):
        d = flush(np.abs(flush(base.astype(np.float32)) - flush(ft.astype(np.float32))))
    bits = d.view(np.uint32).ravel()
    finite = bits[bits < 0x7F800000]
    h1 = cpu_kernels.MagnitudeHistograms(1)
    for rows in (slice(0, 4), slice(4, 9)):
        h1.add(jnp.asarray(base[rows]), [jnp.asarray(ft[rows])])
    np.testing.assert_array_equal(h1.counts()[0], np.bincount(finite >> 16, minlength=1 << 15))
    assert h1.bad().tolist() == [2]
    level = int(np.argmax(h1.counts()[0]))
    h2 = cpu_kernels.MagnitudeHistograms(1, within=[level])
    h2.add(jnp.asarray(base), [jnp.asarray(ft)])
    inside = finite[finite >> 16 == level]
    assert len(inside) > 1
    np.testing.assert_array_equal(h2.counts()[0], np.bincount(inside & 0xFFFF, minlength=1 << 16))


def _with_tiny_inputs(base, fts):
    """The 2-D leaf ``w0`` with magnitudes below 2**-32 in rows 2, 3 and 9: a subnormal
    base no model changes (the numba pass writes it out, XLA:CPU flushes it),
    a subnormal difference of two normal floats (model 0, which keeps every
    entry in the settings below), and more in the base and the models, of
    both signs; and 2**-32 itself, which is not below it.  Returns the new
    trees and the flat positions of those entries, found by NumPy."""
    b = np.array(base["w0"], np.float32)
    ms = [np.array(f["w0"], np.float32) for f in fts]
    b[2, 5] = 1e-39
    for m in ms:
        m[2, 5] = b[2, 5]
    b[3, 1], ms[0][3, 1] = 1.5e-38, 1.4e-38
    ms[1][3, 7], ms[2][9, 0], b[9, 11], ms[1][9, 23] = -2.0**-33, 2.0**-40, -3e-20, 2.0**-32
    dtype = base["w0"].dtype
    cast = lambda x: jnp.asarray(x, dtype)
    inputs = np.stack([np.asarray(cast(x), np.float32) for x in (b, *ms)])
    tiny = ((inputs != 0) & (np.abs(inputs) < 2.0**-32)).any(0)
    return {"w0": cast(b)}, [{"w0": cast(m)} for m in ms], np.flatnonzero(tiny).tolist()


TINY_SETTINGS = [
    ("ties", {"density": [1.0, 0.3, 0.3]}),
    ("ties", {"density": [1.0, 0.2, 0.5], "lam": 0.7, "weight": [0.5, 1.0, 2.0], "normalize": False}),
    ("breadcrumbs_ties", {"density": [1.0, 0.4, 0.4], "gamma": 0.05}),
    ("dare_ties", {"density": [1.0, 0.3, 0.3]}),
    ("della", {"density": [1.0, 0.5, 0.5], "epsilon": 0.1}),
    ("dare_linear", {"density": [1.0, 0.3, 0.3], "rescale_mode": "inverse"}),  # masks drawn inside the merge pass
    ("dare_ties", {"density": [1.0, 0.4, 0.4], "rescale": False, "lam": 1.5}),
]
_L1 = {3, 4}  # the settings with the L1 rescale, whose factor is summed apart from XLA's


def _tiny_inputs(dtype):
    return _with_tiny_inputs(*_llama_like(np.random.default_rng(14), dtype, shapes=((16, 64),)))


def write_tiny_results(path):
    """Each TINY_SETTINGS merge of ``_tiny_inputs``, bf16 and float32, as raw bits into
    ``path`` (npz): ``merged`` (the CPU backend), ``patched`` (the entries it
    merged again), ``alone`` (the numba pass without them) and ``reference``:
    the jitted merge, or with the L1 rescale the XLA pass over the whole leaf
    on the same masks and factors."""
    out, real = {}, cpu_leaf.patch_tiny
    for i, (method, kw) in enumerate(TINY_SETTINGS):
        kw = dict(kw, key=jax.random.key(3)) if method in merging.RANDOM_METHODS else kw
        merge = lambda fts, base: merging.merge(method, fts, base=base, **kw)["w0"]
        for dtype in (jnp.bfloat16, jnp.float32):
            base, fts, _ = _tiny_inputs(dtype)
            tag, patched = f"{i}/{jnp.dtype(dtype)}", []
            cpu_leaf.patch_tiny = lambda leaf, b, ms, flat, *a: patched.append(np.asarray(flat)) or real(leaf, b, ms, flat, *a)
            out[f"{tag}/merged"] = _bits(merge(fts, base))
            out[f"{tag}/patched"] = np.stack(patched)
            cpu_leaf.patch_tiny = lambda *a: True
            out[f"{tag}/alone"] = _bits(merge(fts, base))
            cpu_leaf.patch_tiny = real
            if i in _L1:
                cpu_leaf.PATCH_MAX, limit = -1, cpu_leaf.PATCH_MAX
                out[f"{tag}/reference"] = _bits(merge(fts, base))
                cpu_leaf.PATCH_MAX = limit
            else:
                out[f"{tag}/reference"] = _bits(jax.jit(merge)(fts, base))
    np.savez(path, **out)


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    """``write_tiny_results`` at XLA's default optimisation (see ``jitted_references``)."""
    return _at_default_optimisation("write_tiny_results", tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("setting", range(len(TINY_SETTINGS)), ids=[f"{m}-kw{i}" for i, (m, _) in enumerate(TINY_SETTINGS)])
def test_entries_with_tiny_inputs_are_merged_again_by_the_xla_program(tiny_results, setting, dtype):
    """The numba passes flush no subnormal: at the entries with an input below
    2**-32 they can differ from XLA:CPU, which flushes every one, so those
    entries, and only those, are merged again by the XLA program, which then
    gives the reference's bits everywhere."""
    r = {k: tiny_results[f"{setting}/{jnp.dtype(dtype)}/{k}"] for k in ("merged", "patched", "alone", "reference")}
    _, _, expected = _tiny_inputs(dtype)
    assert r["patched"].tolist() == [expected]  # one call, at the entries NumPy finds
    np.testing.assert_array_equal(r["merged"], r["reference"])
    differs = np.flatnonzero(r["alone"].ravel() != r["reference"].ravel()).tolist()
    assert differs and set(differs) <= set(expected)  # the inputs need it, and nowhere else


@pytest.mark.parametrize("case", ["too many tiny inputs", "tiny weight", "nan, unchecked"])
def test_trim_merges_the_kernel_cannot_match_exactly_fall_back_to_xla(kernel_calls, monkeypatch, case):
    base, fts = _llama_like(np.random.default_rng(14), jnp.float32, shapes=((16, 24),))
    kw = {"density": 0.3}
    if case == "too many tiny inputs":
        base, fts, expected = _with_tiny_inputs(base, fts)
        monkeypatch.setattr(cpu_leaf, "PATCH_MAX", len(expected) - 1)
    elif case == "tiny weight":
        kw["weight"] = [1.0, 1e-6, 1.0]
    else:
        fts[0] = {"w0": fts[0]["w0"].at[0, 0].set(jnp.nan)}
        kw["check_finite"] = False
    eager = merging.merge("ties", fts, base=base, **kw)
    assert kernel_calls == ([True] if case == "too many tiny inputs" else [False] if case == "tiny weight" else [])
    if case != "nan, unchecked":  # with NaN the trims themselves differ (eager counts skip NaN)
        jitted = jax.jit(lambda fts, base: merging.merge("ties", fts, base=base, **kw))(fts, base)
        np.testing.assert_array_equal(np.asarray(eager["w0"]), np.asarray(jitted["w0"]))
    else:  # an unchecked NaN counts as no change: trimmed away, as if the entry equalled the base's
        clean = [fts[0] | {"w0": fts[0]["w0"].at[0, 0].set(base["w0"][0, 0])}, *fts[1:]]
        np.testing.assert_array_equal(np.asarray(eager["w0"]), np.asarray(merging.merge("ties", clean, base=base, **kw)["w0"]))


def test_generated_kernels_are_written_where_asked(monkeypatch, tmp_path):
    from research.merging.cpu import _unrolled

    monkeypatch.setenv("RESEARCH_KERNEL_DIR", str(tmp_path))
    source = _unrolled._cut_source(2, _unrolled.merge_mode(1, True, False), parallel=True)
    module = _unrolled._load("test_span_n2", source)
    assert (tmp_path / f"{module.__name__}.py").read_text().endswith(source)
    assert _unrolled._load("test_span_n2", source) is module  # imported once


def test_a_search_sample_is_partitioned_for_its_first_guess_and_sorted_for_more():
    values = np.random.default_rng(15).random(1000).astype(np.float32)
    sample = search._Unsorted(values.copy())
    assert sample[300] == np.sort(values)[300] and not sample.ordered  # one partition, no sort
    assert sample[300] == np.sort(values)[300] and not sample.ordered  # remembered
    assert sample[10] == np.sort(values)[10] and sample.ordered  # a second rank: sorted once
    np.testing.assert_array_equal(np.asarray(sample), np.sort(values))


class _Features(dict):
    """llvmlite's feature map: a dict with ``flatten``."""

    def flatten(self):
        return ",".join(("+" if on else "-") + name for name, on in self.items())


@pytest.mark.parametrize("case", ["avx512", "avx2_only", "arm", "user_features", "user_cpu"])
def test_kernels_ask_for_512_bit_vectors_only_on_avx512_x86_hosts_the_user_left_alone(monkeypatch, case):
    from research.merging.cpu import _loops
    features = _Features(avx2=True, avx512f=case != "avx2_only", avx512bw=case != "avx2_only")
    monkeypatch.setattr(_loops.llvm, "get_host_cpu_features", lambda: features)
    monkeypatch.setattr(_loops.platform, "machine", lambda: "aarch64" if case == "arm" else "x86_64")
    monkeypatch.setattr(_loops.numba.config, "CPU_FEATURES", "+avx2" if case == "user_features" else None)
    monkeypatch.setattr(_loops.numba.config, "CPU_NAME", "skylake" if case == "user_cpu" else None)
    got = _loops._wide_vector_features()
    if case == "avx512":
        assert got == "+avx2,+avx512f,+avx512bw,-prefer-256-bit"
    else:
        assert got is None


def test_bf16_encoding_rounds_to_nearest_even_as_xla_converts():
    # every high half, each with the low halves at and around the rounding boundary
    from research.merging.cpu import _loops

    @numba.njit
    def encode_all(x, out):
        for i in range(len(x)):
            out[i] = _loops._encode(x[i], out)

    high = np.arange(1 << 16, dtype=np.uint32) << 16
    low = np.array([0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234], np.uint32)
    x = (high[:, None] | low[None, :]).reshape(-1).view(np.float32)
    got = np.empty(len(x), np.uint16)
    encode_all(x, got)
    want = np.asarray(jax.jit(lambda v: v.astype(jnp.bfloat16))(x)).view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(got[nan].view(jnp.bfloat16).astype(np.float32)).all()
    np.testing.assert_array_equal(got[nan] >> 15, x[nan].view(np.uint32) >> 31)  # the sign kept


def test_row_parallel_kernels_give_the_bits_of_their_plain_loops(monkeypatch):
    """The suite compiles the kernels as plain loops (``conftest``: ``RESEARCH_MERGE_CPU=serial``);
    merges run them row-parallel.  Every row-parallel kernel, in ``_loops`` and
    generated, gives the same bits both ways, on rows that the threads share."""
    from research.merging.cpu import _loops, _unrolled

    monkeypatch.setattr(sparsify, "_MASK_BLOCK", 4000)  # draws in blocks of 10 rows
    rng = np.random.default_rng(21)
    shape = (37, 400)
    base = jnp.asarray(rng.normal(size=shape) * 0.02, jnp.bfloat16)
    deltas = [np.round(rng.normal(size=shape) * 64) / 4096 for _ in range(3)]
    fts = [jnp.asarray(np.asarray(base, np.float32) + d, jnp.bfloat16) for d in deltas]
    fts[1] = fts[1].at[5, 7].set(1e-39)  # a tiny input: its row is counted again with the flushes
    keys = [_block_keys(jax.random.fold_in(jax.random.key(4), i), shape)[0] for i in range(3)]
    block_rows = _block_keys(jax.random.key(4), shape)[1]
    table = cpu_leaf._della_probs_table(shape[1], 0.4, 0.2)
    strip_table = cpu_leaf._della_probs_table(shape[0] - 3, 0.4, 0.2)
    mix = dict(consensus="sum", vote_on="weighted", normalize=True, divide_by="weight", lam=1.0, out_dtype="bfloat16")

    def run_all():
        hist = cpu_kernels.MagnitudeHistograms(3)
        hist.add(base, fts)
        masks, sums = cpu_kernels.random_masks(base, fts, keys, block_rows, [0.3, 0.5, 0.7])
        della, della_sums = cpu_kernels.della_masks(base, fts, keys, block_rows, [table] * 3)
        ranks = cpu_kernels.row_ranks(fts[0], base)
        ranks_axis1 = cpu_kernels.row_ranks(fts[2], base, (37, 16, 25))
        cuts = [(np.float32(0.01), 3, 17), (np.float32(0.005), 0, 0), (np.float32(0.02), 36, 399)]
        return dict(
            counts=cpu_kernels.probe_counts(base, fts, [0, 1, 2, 1], [0.01, 0.02, 0.0, 0.004], [0.005, 0.01, 0.0, 0.004]),
            hist=(hist.counts(), hist.bad()), masks=masks.bits, sums=sums, della=della.bits, della_sums=della_sums,
            ranks=ranks, ranks_axis1=ranks_axis1, bernoulli=cpu_kernels.bernoulli(keys[0], block_rows, 0.3, shape),
            below=cpu_kernels.below_table(keys[1], block_rows, ranks, table),
            strip=cpu_kernels.della_strip_masks(base[3:, 40:], fts[2][3:, 40:], keys[1], block_rows, strip_table, row0=3,
                                                col0=40, row_len=shape[1]),
            cut=cpu_kernels.cut_merge(base, fts, cuts, [None] * 3, [1.0, 0.5, 2.0], **mix).view(np.uint16),
            drawn=cpu_kernels.random_merge(base, fts, [1.0] * 3, block_keys=keys, block_rows=block_rows,
                                           density=[0.3, 0.5, 0.7], scale=[1.0] * 3, **mix),
            read=cpu_kernels.random_merge(base, fts, [1.0] * 3, masks=masks, scale=[1.5, 2.0, 1.0], **mix))

    monkeypatch.setattr(_loops, "PARALLEL", False)
    plain = run_all()
    monkeypatch.setattr(_loops, "PARALLEL", True)
    loaded = []
    monkeypatch.setattr(_unrolled, "_load", lambda name, body, load=_unrolled._load: loaded.append(name) or load(name, body))
    _unrolled._kernel_module.cache_clear()
    parallel = run_all()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain, parallel)
    kernels = [k for k in vars(_loops).values() if isinstance(k, _loops._RowParallel)]
    assert len(kernels) == 9 and all(True in k._compiled and False in k._compiled for k in kernels)
    assert sorted(name.split("_n")[0] for name in loaded) == ["cut_merge", "probe_counts_0_1_2_1", "random_merge",
                                                              "random_merge"]
    assert not any(name.endswith("_serial") for name in loaded)
