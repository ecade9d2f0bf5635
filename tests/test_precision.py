"""Mixed precision: bf16 parameters with float32 master weights, float32 logits."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from research.training import TrainConfig, config as config_lib, train
from research.training.precision import MasterWeightsState, apply_updates, master_weights


def _sgd_steps(tx, params, n):
    state = tx.init(params)
    for _ in range(n):
        updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        params = apply_updates(params, updates, state)
    return params, state


def test_updates_below_half_a_bf16_ulp_accumulate_in_the_master_copy():
    # bf16 spacing just below 1.0 is 2**-8 = 0.0039; ten SGD steps of 1e-3 each
    w = {"w": jnp.ones((3,), jnp.bfloat16)}
    plain, _ = _sgd_steps(optax.sgd(1e-3), w, 10)
    np.testing.assert_array_equal(plain["w"], np.ones(3))  # each step rounds back to 1.0
    mixed, state = _sgd_steps(master_weights(optax.sgd(1e-3)), w, 10)
    assert isinstance(state, MasterWeightsState) and state.master["w"].dtype == jnp.float32
    np.testing.assert_allclose(state.master["w"], 0.99, rtol=1e-6)  # 1 - 10 * 1e-3
    assert mixed["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(mixed["w"].astype(np.float32), np.full(3, 0.98828125))  # bf16 nearest to 0.99


BASE = TrainConfig(model="tiny", model_overrides=(("param_dtype", "bfloat16"), ("dtype", "bfloat16")),
                   tasks=("copy",), seq_len=32, batch_size=8, chunk_size=16, steps=4, warmup_steps=1, save_every=2,
                   log_every=1, master_weights=True, mesh=(2, 2, 2), progress=False)


def test_bf16_run_with_master_weights_keeps_float32_state_and_resumes_exactly(tmp_path):
    straight = train(BASE, str(tmp_path / "a"), evaluate_at_end=False)
    train(BASE, str(tmp_path / "b"), stop_at=2, evaluate_at_end=False)
    resumed = train(BASE, str(tmp_path / "b"), evaluate_at_end=False)
    assert {x.dtype for x in jax.tree.leaves(straight.params)} == {jnp.dtype(jnp.bfloat16)}
    chex.assert_trees_all_equal(jax.device_get(straight.params), jax.device_get(resumed.params))
    assert all(np.isfinite(h["loss"]) for h in straight.history)
    from research.training.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "a" / "checkpoints"), save_every=0, keep=1, async_save=False)
    saved = ck.manager.item_metadata(4)["state"]["opt_state"]
    ck.close()
    n_params = sum(x.size for x in jax.tree.leaves(straight.params))
    f32 = [m for m in jax.tree.leaves(saved) if len(m.shape)]
    assert {m.dtype for m in f32} == {np.dtype(np.float32)}  # master copy and both moments
    assert sum(int(np.prod(m.shape)) for m in f32) == 3 * n_params
    model = nnx.merge(straight.graphdef, straight.params)
    logits = model({"tokens": jnp.zeros((1, 8), jnp.int32)})
    assert logits.dtype == jnp.float32  # bf16 activations, float32 logits


def test_master_weights_on_float32_parameters_is_a_named_config_error(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"master_weights=True: the parameters are already float32"):
        train(dataclasses.replace(BASE, model_overrides=()), str(tmp_path / "c"), evaluate_at_end=False)
    with pytest.raises(config_lib.ConfigError, match=r"model_overrides: scan_layers='yes': expected True or False"):
        config_lib.validate(dataclasses.replace(BASE, model_overrides=(("scan_layers", "yes"),)))
