"""NEFTune: per-sample L, zero on padding and in eval, keyed, jittable, shardable."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from research.neftune import neftune, segment_lengths

D = 64
SEG = jnp.array([[1] * 100 + [2] * 700 + [3] * 200 + [0] * 24, [1] * 1000 + [0] * 24])  # packed, padded


def _noise(alpha=5.0, key=0, seg=SEG, train=True):
    x = jnp.zeros(seg.shape + (D,))
    return neftune(x, seg, jax.random.key(key), alpha, train=train)


def test_segment_lengths_are_per_sample():
    L = np.asarray(segment_lengths(SEG))
    assert (L[0, :100] == 100).all() and (L[0, 100:800] == 700).all() and (L[0, 800:1000] == 200).all()
    assert (L[0, 1000:] == 0).all() and (L[1, :1000] == 1000).all()


def test_bound_uses_each_segments_own_length():
    eps = np.abs(np.asarray(_noise()))
    L = np.asarray(segment_lengths(SEG))
    bound = 5.0 / np.sqrt(np.maximum(L, 1) * D)
    assert (eps <= bound[..., None] + 1e-7).all()
    # and the short sample really gets its large noise (not the row's small one)
    assert eps[0, :100].max() > 5.0 / np.sqrt(1024 * D) * 2


def test_zero_on_padding_and_outside_training():
    eps = np.asarray(_noise())
    assert (eps[np.asarray(SEG) == 0] == 0).all()
    assert (np.asarray(_noise(train=False)) == 0).all()


def test_variance_matches_alpha2_over_3Ld_per_segment():
    eps = np.asarray(_noise(alpha=5.0))
    seg = np.asarray(SEG[0])
    for s, L in ((1, 100), (2, 700), (3, 200)):
        var = eps[0][seg == s].var()
        expect = 25.0 / (3 * L * D)
        # a wrong L (the row's 1024 instead of 100..700) is off by >= 1.46x; the tolerance is 10%
        assert abs(var / expect - 1) < 0.1, (s, var, expect)


def test_same_key_same_noise_other_key_other_noise():
    np.testing.assert_array_equal(_noise(key=1), _noise(key=1))
    assert not np.array_equal(_noise(key=1), _noise(key=2))


def test_works_under_jit_and_on_a_sharded_batch():
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    seg = jnp.tile(SEG, (4, 1))
    x = jax.device_put(jnp.zeros(seg.shape + (D,)), NamedSharding(mesh, P("data", None, "model")))
    s = jax.device_put(seg, NamedSharding(mesh, P("data", None)))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda x, s, k: neftune(x, s, k, 5.0, train=True))(x, s, jax.random.key(0))
    ref = neftune(jnp.zeros(seg.shape + (D,)), seg, jax.random.key(0), 5.0, train=True)
    np.testing.assert_allclose(out, ref, atol=1e-7)
    assert out.sharding.spec == P("data", None, "model")
