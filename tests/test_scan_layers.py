"""Scanned decoder layers (``ModelConfig.scan_layers``): the same model as the
layer loop, one layer body in the compiled program, and checkpoints, HF files,
merges and freeze patterns that work in both layouts."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from research import models, sharding
from research.models import decoding, scan
from research.models.hf import flat_params
from research.training import TrainConfig, config as config_lib, train
from research.training.step import trainable_labels
from research.training.trainer import build_model

CFG = models.preset("tiny", n_layers=3)
SCANNED = CFG.replace(scan_layers=True)


def _values(model):
    return {n: np.asarray(v.get_value()) for n, v in flat_params(model).items()}


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, (2, 24)).astype(np.int32)
    seg = np.repeat([[1] * 10 + [2] * 9 + [0] * 5], 2, 0).astype(np.int32)
    pos = np.concatenate([np.arange(10), np.arange(9), np.zeros(5, int)])[None].repeat(2, 0).astype(np.int32)
    return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def test_stacked_names_and_values_are_the_layer_loops_rows():
    loop, scanned = models.Transformer(CFG, rngs=nnx.Rngs(0)), models.Transformer(SCANNED, rngs=nnx.Rngs(0))
    a, b = _values(loop), _values(scanned)
    assert "layers.attn.q_proj" in b and b["layers.attn.q_proj"].shape == (3, 32, 32)
    assert "layers.2.attn.q_proj" in a
    for i in range(3):  # row i of every stacked parameter is layer i, bit for bit
        for rest in ("attn.q_proj", "mlp.down_proj", "input_norm.scale"):
            np.testing.assert_array_equal(b[f"layers.{rest}"][i], a[f"layers.{i}.{rest}"])
    back = scan.to_flat_layout(scan.to_flat_layout(a, scanned=True), scanned=False)
    assert back.keys() == a.keys() and all(np.array_equal(back[k], a[k]) for k in a)
    with pytest.raises(ValueError, match=r"layers\.\{i\}\.attn\.q_proj: cannot stack, layers \[1\]"):
        scan.to_flat_layout({k: v for k, v in a.items() if k != "layers.1.attn.q_proj"}, scanned=True)
    sh = sharding.state_shardings(nnx.state(scanned, nnx.Param), sharding.make_mesh(1, 2, 2))
    assert sh["layers"]["attn"]["q_proj"].get_value().spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_forward_and_gradients_equal_the_layer_loop(remat):
    batch = _batch()

    def loss_and_grads(cfg):
        graphdef, params = nnx.split(models.Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        fn = lambda p: jnp.mean(nnx.merge(graphdef, p)(batch) ** 2)
        loss, grads = jax.jit(jax.value_and_grad(fn))(params)
        return loss, {n: np.asarray(g) for n, g in zip(
            [".".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(grads)[0]],
            jax.tree.leaves(grads))}

    l0, g0 = loss_and_grads(CFG.replace(remat=remat))
    l1, g1 = loss_and_grads(SCANNED.replace(remat=remat))
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    g0 = scan.to_flat_layout(g0, scanned=True)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_scanned_program_holds_one_layer_body_whatever_the_depth():
    def hlo_size(cfg):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        fn = lambda p, t: nnx.merge(graphdef, p)({"tokens": t}).sum()
        return len(jax.jit(jax.grad(fn)).lower(params, jax.ShapeDtypeStruct((2, 16), jnp.int32)).as_text())

    loop2, loop8 = hlo_size(CFG.replace(n_layers=2)), hlo_size(CFG.replace(n_layers=8))
    scan2, scan8 = hlo_size(SCANNED.replace(n_layers=2)), hlo_size(SCANNED.replace(n_layers=8))
    assert loop8 > 2.5 * loop2  # the loop unrolls every layer
    assert abs(scan8 - scan2) < 0.02 * scan2  # the scan compiles one


def test_scanned_greedy_decoding_with_kv_cache_equals_the_layer_loop():
    loop, scanned = models.Transformer(CFG, rngs=nnx.Rngs(0)), models.Transformer(SCANNED, rngs=nnx.Rngs(0))
    tokens = np.zeros((2, 16), np.int32)
    tokens[0, :5], tokens[1, :3] = [5, 9, 2, 7, 1], [3, 3, 8]
    lengths = jnp.asarray([5, 3])
    out = [decoding.greedy(*nnx.split(m, nnx.Param), jnp.asarray(tokens), lengths, 8) for m in (loop, scanned)]
    np.testing.assert_array_equal(out[1], out[0])


def test_hf_files_are_the_same_in_both_layouts(tmp_path):
    loop, scanned = models.Transformer(CFG, rngs=nnx.Rngs(1)), models.Transformer(SCANNED, rngs=nnx.Rngs(1))
    models.save_hf(loop, str(tmp_path / "loop"))
    models.save_hf(scanned, str(tmp_path / "scanned"))
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "loop/model.safetensors")), load_file(str(tmp_path / "scanned/model.safetensors"))
    assert a.keys() == b.keys() and "model.layers.2.self_attn.q_proj.weight" in a
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "loop/config.json").read_text()) == json.loads((tmp_path / "scanned/config.json").read_text())
    back = models.from_hf(str(tmp_path / "loop"), scan_layers=True)  # unscanned files into a scanned model
    assert back.cfg.scan_layers
    ref = _values(scanned)
    got = _values(back)
    assert got.keys() == ref.keys() and all(np.array_equal(got[k], ref[k]) for k in ref)


BASE = TrainConfig(model="tiny", model_overrides=(("n_layers", 3),), tasks=("copy",), seq_len=32, batch_size=4,
                   chunk_size=16, steps=2, warmup_steps=1, save_every=2, log_every=1, mesh=(2, 2, 2), progress=False)


def test_a_scanned_run_initialises_a_layer_loop_and_merges_per_layer(tmp_path):
    trained_scanned = True  # the other direction runs the same conversion (to_layout) the other way
    overrides = lambda s: BASE.model_overrides + (("scan_layers", s),)
    run = train(dataclasses.replace(BASE, model_overrides=overrides(trained_scanned)), str(tmp_path / "run"),
                evaluate_at_end=False)
    trained = _values(nnx.merge(run.graphdef, run.params))
    other = dataclasses.replace(BASE, model_overrides=overrides(not trained_scanned), init_from=str(tmp_path / "run"))
    model = build_model(other, sharding.make_mesh(2, 2, 2))
    assert model.cfg.scan_layers == (not trained_scanned)
    got = _values(model)
    want = scan.to_flat_layout(trained, scanned=not trained_scanned)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    q = flat_params(model)["layers.attn.q_proj" if not trained_scanned else "layers.0.attn.q_proj"].get_value()
    assert "tensor" in str(q.sharding.spec)  # converted on the mesh, sharded by the rules

    from research.merging.stream.sources import TensorSource  # a merge reads per-layer tensors either way

    src = TensorSource(str(tmp_path / "run"))
    per_layer = scan.to_flat_layout(trained, scanned=False)
    assert sorted(src.names) == sorted(per_layer)
    np.testing.assert_array_equal(src.read("layers.2.mlp.up_proj"), per_layer["layers.2.mlp.up_proj"])


def test_freeze_patterns_read_per_layer_names_in_the_scanned_layout():
    params = nnx.state(models.Transformer(SCANNED, rngs=nnx.Rngs(0)), nnx.Param)
    labels = trainable_labels(params, ("layers.*.mlp.*", "embedding"))
    assert labels["layers"]["mlp"]["up_proj"] == "frozen" and labels["embedding"] == "frozen"
    assert labels["layers"]["attn"]["q_proj"] == "train"
    assert trainable_labels(params, ("layers.attn.*",))["layers"]["attn"]["v_proj"] == "frozen"  # the stacked name
    with pytest.raises(config_lib.ConfigError, match=r"selects layers \[0\] of the stacked parameter layers\.mlp\.down_proj"):
        trainable_labels(params, ("layers.0.mlp.*",))
