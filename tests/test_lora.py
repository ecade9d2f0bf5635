"""LoRA (``research.models.lora``): the adapted map of the paper, adapters as the
only trained parameters, task vectors on the base's leaves, and peft's files."""

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from research import models
from research.models import lora
from research.models.config import LoRAConfig
from research.models.hf import flat_params
from research.merging.stream.sources import open_source
from research.safetensors_io import CheckpointError
from research.training import TrainConfig, config as config_lib, train
from research.training.checkpoint import Checkpointer

CFG = models.preset("tiny", n_layers=2)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 259, (2, 16)).astype(np.int32)
    return {"tokens": tokens}


def _randomised(model, seed=1):
    """``model`` with every adapter factor drawn at random (B is zero when fresh)."""
    g, adapters, base = lora.split(model)
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [0.1 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return nnx.merge(g, jax.tree.unflatten(tree, new), base)


def _values(state_or_model):
    return {n: np.asarray(v.get_value()) for n, v in flat_params(state_or_model).items()}


def test_adapted_projection_is_the_base_plus_the_scaled_low_rank_product_by_hand():
    # W = I, A = [[1], [2]], B = [[3, 4]], alpha = 2, r = 1: s = 2
    # x = [1, 1]: x W = [1, 1]; x A = 3; (x A) B = [9, 12]; times s = [18, 24]
    cfg = LoRAConfig(rank=1, alpha=2.0, targets=("q_proj",))
    ad = lora.LoRA(2, 2, ("embed", "q_heads"), cfg, rngs=nnx.Rngs(0))
    ad.a.set_value(jnp.asarray([[1.0], [2.0]]))
    ad.b.set_value(jnp.asarray([[3.0, 4.0]]))
    w = nnx.Param(jnp.eye(2))
    y = lora.project(jnp.asarray([[1.0, 1.0]]), w, nnx.Dict({"q_proj": ad}), "q_proj")
    np.testing.assert_allclose(y, [[19.0, 25.0]])
    assert lora.project(jnp.asarray([[1.0, 1.0]]), w, nnx.Dict({"q_proj": ad}), "k_proj").tolist() == [[1.0, 1.0]]
    assert LoRAConfig(rank=4, alpha=8.0).scale == 2.0 and LoRAConfig(rank=4, alpha=8.0, rslora=True).scale == 4.0


def test_fresh_adapters_start_as_the_base_and_keep_its_parameters():
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    before = _values(base)
    model = lora.with_lora(base, LoRAConfig(rank=4, targets=ALL))
    np.testing.assert_array_equal(model(_batch()), base(_batch()))  # B = 0
    after = _values(lora.split(model)[2])
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    names = _values(nnx.state(model, lora.LoRAParam))
    assert names["layers.1.attn.lora.q_proj.a"].shape == (32, 4) and names["layers.1.mlp.lora.down_proj.b"].shape == (4, 32)
    bound = 1 / np.sqrt(32)  # A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0
    assert np.abs(names["layers.0.attn.lora.q_proj.a"]).max() <= bound and not names["layers.0.attn.lora.q_proj.b"].any()
    assert all(v.dtype == np.float32 for v in names.values())


def test_task_vector_is_scaled_BA_on_the_base_leaves_and_merged_model_matches():
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    model = _randomised(lora.with_lora(base, LoRAConfig(rank=3, alpha=6.0, targets=("q_proj", "up_proj"))))
    ad = _values(nnx.state(model, lora.LoRAParam))
    tau = _values(lora.task_vector(model))
    assert tau.keys() == _values(base).keys()
    for i in range(2):
        for mod, t in (("attn", "q_proj"), ("mlp", "up_proj")):
            want = 2.0 * ad[f"layers.{i}.{mod}.lora.{t}.a"] @ ad[f"layers.{i}.{mod}.lora.{t}.b"]
            np.testing.assert_allclose(tau[f"layers.{i}.{mod}.{t}"], want, rtol=1e-6)
        assert not tau[f"layers.{i}.attn.k_proj"].any() and not tau[f"layers.{i}.mlp.down_proj"].any()
    assert not tau["embedding"].any()
    plain = lora.merged(model)
    assert plain.cfg.lora is None
    w = _values(plain)
    np.testing.assert_allclose(w["layers.0.attn.q_proj"], _values(base)["layers.0.attn.q_proj"] + tau["layers.0.attn.q_proj"],
                               rtol=1e-6)
    np.testing.assert_allclose(plain(_batch()), model(_batch()), atol=2e-5)


def test_scanned_layers_take_the_same_adapters_and_dropout():
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    loop = _randomised(lora.with_lora(base, LoRAConfig(rank=2, targets=ALL, dropout=0.3)))
    scanned = models.scan.to_layout(loop, True)
    assert _values(nnx.state(scanned, lora.LoRAParam))["layers.attn.lora.v_proj.a"].shape == (2, 32, 2)
    batch = _batch()
    x = loop.embed(batch["tokens"])
    seg, pos = models.transformer.unpacked_defaults(batch)
    key = jax.random.key(3)
    a, b = loop.decode(x, seg, pos, key=key), scanned.decode(x, seg, pos, key=key)
    np.testing.assert_allclose(a, b, atol=2e-5)
    assert float(jnp.abs(a - loop.decode(x, seg, pos)).max()) > 1e-3  # the key switches dropout on
    np.testing.assert_array_equal(loop.decode(x, seg, pos), loop(batch))


def test_peft_files_carry_peft_names_shapes_and_config(tmp_path):
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    model = _randomised(lora.with_lora(base, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))))
    lora.save_peft(model, str(tmp_path / "ad"), base_model_name_or_path="/models/tiny")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    assert conf["peft_type"] == "LORA" and conf["r"] == 4 and conf["lora_alpha"] == 8.0
    assert conf["target_modules"] == ["down_proj", "q_proj", "v_proj"] and conf["base_model_name_or_path"] == "/models/tiny"
    t = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert len(t) == 2 * 3 * 2
    D, NH, KH, F = 32, 4 * 8, 2 * 8, 64  # torch layout: lora_A [r, in], lora_B [out, r]
    assert t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (4, D)
    assert t["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"].shape == (NH, 4)
    assert t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (KH, 4)
    assert t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, F)
    ours = _values(nnx.state(model, lora.LoRAParam))
    np.testing.assert_array_equal(t["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"],
                                  ours["layers.0.mlp.lora.down_proj.a"].T)
    back = lora.load_peft(str(tmp_path / "ad"), base)
    np.testing.assert_array_equal(back(_batch()), model(_batch()))
    scanned = lora.load_peft(str(tmp_path / "ad"), models.scan.to_layout(base, True))
    np.testing.assert_allclose(scanned(_batch()), model(_batch()), atol=2e-5)
    with pytest.raises(FileExistsError):
        lora.save_peft(model, str(tmp_path / "ad"))
    # peft's in-memory names (".lora_A.default.weight") load too
    save_file({k.replace(".weight", ".default.weight"): v for k, v in t.items()},
              str(tmp_path / "ad" / "adapter_model.safetensors"))
    np.testing.assert_array_equal(lora.load_peft(str(tmp_path / "ad"), base)(_batch()), model(_batch()))


def _broken(tmp_path, name, edit_tensors=None, edit_config=None):
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    d = tmp_path / name
    lora.save_peft(lora.with_lora(base, LoRAConfig(rank=2)), str(d))
    t = load_file(str(d / "adapter_model.safetensors"))
    if edit_tensors:
        edit_tensors(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    if edit_config:
        conf = json.load(open(d / "adapter_config.json"))
        edit_config(conf)
        json.dump(conf, open(d / "adapter_config.json", "w"))
    return str(d), base


@pytest.mark.parametrize("name, edit_tensors, edit_config, message", [
    ("missing", lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"), None,
     r"tensor base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B\.weight is missing"),
    ("extra", lambda t: t.update({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32)}),
     None, r"layers\.7\.self_attn\.q_proj\.lora_A\.weight matches no adapter"),
    ("shape", lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((3, 32), np.float32)}),
     None, r"q_proj\.lora_A\.weight has shape \(3, 32\), the base model and r=2 imply \(2, 32\)"),
    ("dora", None, lambda c: c.update(use_dora=True), r"use_dora=True is not supported"),
    ("target", None, lambda c: c.update(target_modules=["q_proj", "lm_head"]), r"target_modules names 'lm_head'"),
    ("type", None, lambda c: c.update(peft_type="IA3"), r"peft_type 'IA3'"),
])
def test_bad_peft_adapters_are_named(tmp_path, name, edit_tensors, edit_config, message):
    path, base = _broken(tmp_path, name, edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=message):
        lora.load_peft(path, base)


BASE = TrainConfig(model="tiny", tasks=("copy", "reverse"), seq_len=64, batch_size=8, chunk_size=16, steps=4,
                   warmup_steps=1, save_every=2, keep=3, log_every=1, eval_samples=2, max_new_tokens=4, lr=1e-2,
                   progress=False, lora_rank=4, lora_targets=("q_proj", "v_proj", "up_proj"), lora_dropout=0.1)


def test_a_lora_run_trains_only_the_adapters_resumes_exactly_and_exports(tmp_path):
    full = train(dataclasses.replace(BASE, lora_rank=0, steps=1, save_every=0), str(tmp_path / "base"),
                 evaluate_at_end=False)
    cfg = dataclasses.replace(BASE, init_from=str(tmp_path / "base"))
    straight = train(cfg, str(tmp_path / "straight"), evaluate_at_end=False)
    train(cfg, str(tmp_path / "resumed"), stop_at=2, evaluate_at_end=False)
    resumed = train(cfg, str(tmp_path / "resumed"), evaluate_at_end=False)
    chex.assert_trees_all_equal(jax.device_get(straight.params), jax.device_get(resumed.params))
    model = nnx.merge(straight.graphdef, straight.params)
    before, after = _values(nnx.state(nnx.merge(full.graphdef, full.params), nnx.Param)), _values(lora.split(model)[2])
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)  # frozen base
    assert np.abs(_values(nnx.state(model, lora.LoRAParam))["layers.0.mlp.lora.up_proj.b"]).max() > 0  # B moved
    # checkpoints hold the adapters (and their moments) only
    ck = Checkpointer(str(tmp_path / "straight" / "checkpoints"), save_every=0, keep=1, async_save=False)
    try:
        names = ck.param_shapes(ck.latest())
    finally:
        ck.close()
    assert names and all("/lora/" in n for n in names)
    # the run's peft adapter reloads onto the base into the trained model
    again = lora.load_peft(str(tmp_path / "straight" / "adapter"), nnx.merge(full.graphdef, full.params))
    np.testing.assert_allclose(again(_batch()), model(_batch()), atol=1e-6)
    conf = json.load(open(tmp_path / "straight" / "adapter" / "adapter_config.json"))
    assert conf["r"] == 4 and conf["lora_dropout"] == 0.1
    # exported as HF directories (the LoRA run merged), they reload with the trained logits
    from research.export import main as export

    assert export([str(tmp_path / "straight"), str(tmp_path / "hf_lora")]) == 0
    assert export([str(tmp_path / "base"), str(tmp_path / "hf_full")]) == 0
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "hf_lora"))
    np.testing.assert_allclose(models.from_hf(str(tmp_path / "hf_lora"))(_batch()), model(_batch()), atol=2e-5)
    np.testing.assert_array_equal(models.from_hf(str(tmp_path / "hf_full"))(_batch()),
                                  nnx.merge(full.graphdef, full.params)(_batch()))
    assert export([str(tmp_path / "base"), str(tmp_path / "hf_full")]) == 2  # exists: refused
    assert export([str(tmp_path / "base"), str(tmp_path / "hf_full"), "--step", "7", "--force"]) == 2
    assert export([str(tmp_path / "base"), str(tmp_path / "hf_full"), "--force", "--dtype", "bfloat16"]) == 0
    assert export([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2


def test_only_the_adapters_hold_optimizer_moments():
    from research.training.step import make_optimizer

    model = lora.with_lora(models.Transformer(CFG, rngs=nnx.Rngs(0)), LoRAConfig(rank=4, targets=("q_proj",)))
    _, adapters, _ = lora.split(model)
    state = make_optimizer(BASE).init(adapters)
    n_moments = sum(x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0)
    assert n_moments == 2 * 2 * (32 * 4 + 4 * 32)  # mu and nu; 2 layers of q_proj's A and B


@pytest.mark.parametrize("assignment, message", [
    ("lora_rank=-1", r"lora_rank=-1: must be >= 0"),
    ("lora_targets=q_proj,lm_head", r"lora_targets: 'lm_head' is not a target; choose from q_proj"),
    ("lora_dropout=1.0", r"lora_dropout=1.0: must be >= 0 and < 1"),
    ("lora_alpha=0", r"lora_alpha=0.0: must be > 0"),
    ("freeze=embedding", r"freeze=\('embedding',\) with lora_rank=4"),
])
def test_bad_lora_settings_are_named(assignment, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.override(BASE, [assignment])


def test_merge_cli_reads_adapters_on_their_base(tmp_path, capsys):
    """``model: BASE+ADAPTER`` and an adapter directory naming its base both read as
    ``W + s * B @ A``; task arithmetic of two adapters adds both products."""
    from research.merging.__main__ import main

    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    models.save_hf(base, str(tmp_path / "base"))
    ads = []
    for i, targets in enumerate([("q_proj", "v_proj"), ("v_proj", "down_proj")]):
        m = _randomised(lora.with_lora(base, LoRAConfig(rank=2, alpha=4.0, targets=targets)), seed=i + 5)
        lora.save_peft(m, str(tmp_path / f"ad{i}"), base_model_name_or_path=str(tmp_path / "base"))
        ads.append(load_file(str(tmp_path / f"ad{i}" / "adapter_model.safetensors")))
    (tmp_path / "m.yaml").write_text(
        "merge_method: task_arithmetic\nbase_model: base\nparameters: {lambda: 1.0}\nmodels:\n"
        "  - model: base+ad0\n    parameters: {weight: 1.0}\n  - model: ad1\n    parameters: {weight: 1.0}\n")
    assert main([str(tmp_path / "m.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = {k: v.copy() for k, v in load_file(str(tmp_path / "base" / "model.safetensors")).items()}
    for t in ads:  # an independent fold: W [out, in] += (alpha / r) * B [out, r] @ A [r, in]
        for name in t:
            if ".lora_A." in name:
                w = name.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
                want[w] += 2.0 * t[name.replace("lora_A", "lora_B")] @ t[name]
    assert out.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(out[k], want[k], atol=1e-5, err_msg=k)
    assert not np.array_equal(out["model.layers.0.self_attn.v_proj.weight"],
                              load_file(str(tmp_path / "base" / "model.safetensors"))["model.layers.0.self_attn.v_proj.weight"])
    src = open_source(f"{tmp_path / 'base'}+{tmp_path / 'ad0'}")  # a strip of columns of rows reads as its slice
    for name in ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.down_proj.weight"):  # adapted, not
        np.testing.assert_allclose(src.columns(name, (1, 5), (3, 11)), src.read(name)[1:5, 3:11], rtol=1e-6, atol=1e-7)
    (tmp_path / "bad.yaml").write_text("merge_method: linear\nmodels:\n  - model: base+base\n")
    assert main([str(tmp_path / "bad.yaml"), str(tmp_path / "out2"), "--no-progress"]) != 0
    assert "base is not a peft adapter directory (no adapter_config.json)" in capsys.readouterr().err


def _two_adapters(ranks=(2, 3)):
    base = models.Transformer(CFG, rngs=nnx.Rngs(0))
    a = _randomised(lora.with_lora(base, LoRAConfig(rank=ranks[0], alpha=4.0, targets=("q_proj", "v_proj"))), 11)
    b = _randomised(lora.with_lora(base, LoRAConfig(rank=ranks[1], alpha=3.0, targets=("v_proj", "up_proj"))), 12)
    return base, a, b


def _dw(model, name):
    return np.asarray(lora.deltas(model)[name]) if name in lora.deltas(model) else 0.0


def test_cat_combination_is_the_exact_weighted_sum_of_the_adapters_updates():
    base, a, b = _two_adapters()
    mix = lora.combine([a, b], [0.7, 0.4], "cat")
    assert mix.cfg.lora.rank == 5 and mix.cfg.lora.scale == 1.0
    assert mix.cfg.lora.targets == ("q_proj", "v_proj", "up_proj")
    for name in ("layers.0.attn.q_proj", "layers.1.attn.v_proj", "layers.0.mlp.up_proj"):
        np.testing.assert_allclose(_dw(mix, name), 0.7 * _dw(a, name) + 0.4 * _dw(b, name), atol=1e-6)
    np.testing.assert_array_equal(_values(lora.split(mix)[2])["embedding"], _values(base)["embedding"])


def test_svd_combination_is_the_truncated_svd_of_the_weighted_sum():
    _, a, b = _two_adapters()
    full = lora.combine([a, b], [1.0, 0.5], "svd", rank=5)  # >= the sum's rank: exact
    want = _dw(a, "layers.1.attn.v_proj") + 0.5 * _dw(b, "layers.1.attn.v_proj")
    np.testing.assert_allclose(_dw(full, "layers.1.attn.v_proj"), want, atol=1e-5)
    low = lora.combine([a, b], [1.0, 0.5], "svd")  # rank max(2, 3) = 3: the best rank-3 approximation
    u, s, vh = np.linalg.svd(want.T.astype(np.float64))
    best = (u[:, :3] * s[:3]) @ vh[:3]
    np.testing.assert_allclose(_dw(low, "layers.1.attn.v_proj"), best.T, atol=1e-5)
    assert low.cfg.lora.rank == 3
    clamped = lora.combine([a, b], [1.0, 0.5], "svd", clamp=0.5)
    f = _values(nnx.state(clamped, lora.LoRAParam))
    assert np.abs(f["layers.1.attn.lora.v_proj.b"]).max() < np.abs(_values(nnx.state(low, lora.LoRAParam))["layers.1.attn.lora.v_proj.b"]).max()


def test_linear_combination_follows_peft_sqrt_weights_by_hand():
    _, a, _ = _two_adapters()
    _, c, _ = _two_adapters()
    c = _randomised(c, 99)
    mix = lora.combine([a, c], [0.25, 1.0], "linear")
    fa, fc = _values(nnx.state(a, lora.LoRAParam)), _values(nnx.state(c, lora.LoRAParam))
    k = "layers.0.attn.lora.q_proj"
    s = 4.0 / 2  # alpha / r of both
    A = np.sqrt(0.25 * s) * fa[k + ".a"] + np.sqrt(1.0 * s) * fc[k + ".a"]
    B = np.sqrt(0.25 * s) * fa[k + ".b"] + np.sqrt(1.0 * s) * fc[k + ".b"]
    np.testing.assert_allclose(_dw(mix, "layers.0.attn.q_proj"), A @ B, atol=1e-6)
    with pytest.raises(ValueError, match=r"ranks differ \(\[2, 3\]\)"):
        lora.combine(list(_two_adapters()[1:]), [1.0, 1.0], "linear")
