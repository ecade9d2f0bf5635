"""mergekit's config syntax in ``research-merge``: ``slices:``, where each tensor's
parameters are looked up (model, slice, top level, default) as mergekit plans
them, and mergekit's other spellings (Hub ids, ``torch.`` dtypes)."""

import json
import os

import jax
import numpy as np
import pytest

from research import merging
from research.merging import stream
from research.merging.stream import engine
from test_merge_stream import cli, make_ckpt, read_out, write_cfg


@pytest.fixture
def four_layers(tmp_path):
    base = make_ckpt(tmp_path / "base", 0, layers=4)
    a = make_ckpt(tmp_path / "a", 1, layers=4, base=base)
    b = make_ckpt(tmp_path / "b", 2, layers=4, base=base)
    return tmp_path, base, a, b


def layer(i, rest="mlp.up_proj.weight"):
    return f"model.layers.{i}.{rest}"


SUFFIXES = ("self_attn.q_proj.weight", "mlp.up_proj.weight")


def expected(method, inputs, base=None, **params):
    """``merging.merge`` of the named tensors: ``inputs`` = [(arrays, name), ...] per model."""
    out = merging.merge(method, [{"x": arrs[n]} for arrs, n in inputs],
                        base=None if base is None else {"x": base[0][base[1]]}, **params)
    return np.asarray(out["x"])


def test_slices_merge_each_output_layer_from_its_sources_layer_range(four_layers):
    """Two slices, [0, 2) then [1, 4) of both models: 5 output layers, input layer 1
    used twice; a gradient runs over each slice's own layers, and a slice's
    parameters fill in for its sources'.  Embeddings come from the first slice,
    the final norm and head from the last."""
    tmp, _, a, b = four_layers
    text = """merge_method: linear
slices:
  - sources:
      - {model: a, layer_range: [0, 2]}
      - model: b
        layer_range: [0, 2]
        parameters: {weight: [0.0, 1.0]}
  - sources:
      - {model: a, layer_range: [1, 4]}
      - {model: b, layer_range: [1, 4], parameters: {weight: 3.0}}
    parameters: {weight: 0.5}
"""
    out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False)
    got = read_out(out)
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 5
    # output layer -> (input layer, weight of a, weight of b)
    plan = {0: (0, 1.0, 0.0), 1: (1, 1.0, 1.0), 2: (1, 0.5, 3.0), 3: (2, 0.5, 3.0), 4: (3, 0.5, 3.0)}
    assert sorted(got) == sorted([layer(o, s) for o in plan for s in SUFFIXES]
                                 + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    for o, (i, wa, wb) in plan.items():
        for s in SUFFIXES:
            want = expected("linear", [(a, layer(i, s)), (b, layer(i, s))], weight=[wa, wb])
            np.testing.assert_array_equal(got[layer(o, s)], want, err_msg=layer(o, s))
    # embeddings: the first slice at t = 0 (b's weight 0); the rest: the last slice's weights
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    for n in ("model.norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(got[n], expected("linear", [(a, n), (b, n)], weight=[0.5, 3.0]), err_msg=n)
    # the merge_config.yaml written beside the output reruns it from anywhere
    again = read_out(stream.run(stream.load(os.path.join(out, "merge_config.yaml")), str(tmp / "again"),
                                progress=False))
    assert all(np.array_equal(again[n], got[n]) for n in got) and sorted(again) == sorted(got)


def test_a_passthrough_frankenmerge_stacks_layers_of_different_models(four_layers):
    tmp, _, a, b = four_layers
    text = """merge_method: passthrough
slices:
  - sources: [{model: a, layer_range: [0, 3]}]
  - sources:
      - model: b
        layer_range: [2, 4]
        parameters:
          scale: [{filter: mlp, value: 0.5}, {filter: "*", value: 1.0}]
"""
    out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False)
    got = read_out(out)
    assert json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"] == 5
    for o, (src, i) in enumerate([(a, 0), (a, 1), (a, 2), (b, 2), (b, 3)]):
        np.testing.assert_array_equal(got[layer(o, "self_attn.q_proj.weight")], src[layer(i, "self_attn.q_proj.weight")])
        scale = 0.5 if src is b else 1.0
        want = (src[layer(i)].astype(np.float32) * scale).astype(src[layer(i)].dtype)
        np.testing.assert_array_equal(got[layer(o)], want)
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], b["lm_head.weight"])


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_a_task_vector_merge_over_slices_reads_the_bases_layers_from_its_layer_range(four_layers, method):
    """The base is listed in every slice, as in mergekit; a random method's keys come
    from the output tensor's name."""
    tmp, base, a, b = four_layers
    text = f"""merge_method: {method}
base_model: base
parameters: {{density: 0.5}}
slices:
  - sources:
      - {{model: base, layer_range: [0, 2]}}
      - {{model: a, layer_range: [0, 2]}}
      - {{model: b, layer_range: [2, 4], parameters: {{weight: 0.7}}}}
"""
    got = read_out(stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False, seed=3))
    assert sorted(got) == sorted([layer(o, s) for o in range(2) for s in SUFFIXES]
                                 + ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"])
    key = jax.random.key(3) if method == "dare_ties" else None
    for o in range(2):
        for s in SUFFIXES:
            out_name = layer(o, s)
            tree = lambda arrs, n: {out_name: arrs[n]}
            want = merging.merge(method, [tree(a, layer(o, s)), tree(b, layer(o + 2, s))],
                                 base=tree(base, layer(o, s)), key=key, density=0.5, weight=[1.0, 0.7])
            np.testing.assert_array_equal(got[out_name], np.asarray(want[out_name]), err_msg=out_name)


@pytest.mark.parametrize("body, message", [
    ("  - sources:\n      - {model: a, layer_range: [0, 2]}\n      - {model: b, layer_range: [0, 3]}\n",
     r"cfg.yaml:3: the sources of slices\[0\] must span the same number of layers"),
    ("  - sources:\n      - {model: a, layer_range: [2, 6]}\n      - {model: b, layer_range: [0, 4]}\n",
     r"slices\[0\].sources\[0\] asks for layer_range \[2, 6\], but .*/a has 4 layers \(no layer 4\)"),
    ("  - sources:\n      - {model: a, layer_range: [0, 2]}\n    residual_weight: 0.5\n",
     r"cfg.yaml:5: unknown key 'residual_weight' in slices\[0\]"),
    ("  - sources:\n      - {model: a, layer_range: [0, 2]}\n    parameters: {wieght: 0.5}\n",
     r"cfg.yaml: slices\[0\].parameters: unknown parameter 'wieght'"),
    ("  - sources:\n      - {model: a, layer_range: [0]}\n",
     r"slices\[0\].sources\[0\] needs layer_range: \[start, end\]"),
    ("  - sources:\n      - {model: a, layer_range: [0, 2]}\n  - sources:\n      - {model: a, layer_range: [2, 4]}\n"
     "      - {model: b, layer_range: [2, 4]}\n",
     r"the same number of models besides the base .*got \[1, 2\]"),
])
def test_bad_slices_are_errors_naming_the_slice(four_layers, body, message):
    tmp, *_ = four_layers
    with pytest.raises((stream.ConfigError, stream.MergeFailed), match=message):
        stream.run(stream.load(write_cfg(tmp, "merge_method: linear\nslices:\n" + body)), str(tmp / "out"),
                   progress=False)
    assert not os.path.exists(tmp / "out")


def test_a_slice_without_the_base_is_an_error_and_models_with_slices_too(four_layers):
    tmp, *_ = four_layers
    text = ("merge_method: ties\nbase_model: base\nslices:\n  - sources:\n      - {model: base, layer_range: [0, 2]}\n"
            "      - {model: a, layer_range: [0, 2]}\n  - sources:\n      - {model: a, layer_range: [2, 4]}\n")
    with pytest.raises(stream.MergeFailed, match=r"cfg.yaml:7: slices\[1\] does not list base_model .*/base"):
        stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False)
    with pytest.raises(stream.ConfigError, match="either 'models' .* or 'slices' .*not both"):
        stream.load(write_cfg(tmp, text + "models:\n  - model: a\n"))


def params_of(tmp, text, name):
    mc = stream.load(write_cfg(tmp, text))
    return engine.check_tensor_params(engine.make_plan(mc), name, mc.source)


def test_parameters_pass_from_model_to_top_level_to_default_as_in_mergekit(four_layers):
    """A filter list with no matching entry passes the lookup on (to the top level's
    value, else the method's default); ``filter: "*"`` matches every tensor."""
    tmp, *_ = four_layers
    text = """merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      density: [{filter: mlp, value: 0.5}]
      weight: [{filter: q_proj, value: 2.0}]
  - model: b
    parameters:
      density: [{filter: q_proj, value: 0.9}, {filter: "*", value: 0.6}]
parameters:
  density: 0.3
"""
    mlp = params_of(tmp, text, layer(1))
    assert mlp["density"] == (0.5, 0.6) and mlp["weight"] == (1.0, 1.0)  # a's weight: ties's default
    q = params_of(tmp, text, layer(1, "self_attn.q_proj.weight"))
    assert q["density"] == (0.3, 0.9) and q["weight"] == (2.0, 1.0)


def test_a_gradient_is_read_at_0_outside_the_layer_stack_and_at_1_for_a_single_layer(tmp_path):
    """mergekit (since 0.1.2) plans the embeddings, final norm and head at t = 0, and
    the one layer of a one-layer slice at t = 1."""
    base = make_ckpt(tmp_path / "base", 0, layers=3)
    make_ckpt(tmp_path / "a", 1, layers=3, base=base)
    grad = "merge_method: ties\nbase_model: base\nparameters: {density: [0.2, 0.8]}\n"
    text = grad + "models:\n  - model: a\n"
    assert [params_of(tmp_path, text, n)["density"] for n in
            ("model.embed_tokens.weight", layer(0), layer(1), layer(2), "model.norm.weight", "lm_head.weight")] == \
        [(0.2,), (0.2,), (0.5,), (0.8,), (0.2,), (0.2,)]
    one = grad + ("slices:\n  - sources:\n      - {model: base, layer_range: [0, 1]}\n"
                  "      - {model: a, layer_range: [0, 1]}\n")
    assert params_of(tmp_path, one, layer(0))["density"] == (0.8,)


def test_the_dry_run_of_slices_lists_the_output_layers(four_layers):
    tmp, *_ = four_layers
    text = ("merge_method: linear\nslices:\n  - sources:\n      - {model: a, layer_range: [3, 4]}\n"
            "      - {model: b, layer_range: [0, 1]}\n")
    r = cli(write_cfg(tmp, text), str(tmp / "dry"), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "1 layers:" in r.stdout and layer(0) in r.stdout and layer(3) not in r.stdout
    assert f"slices[0]: 0..0 <- {tmp / 'a'} [3, 4], {tmp / 'b'} [0, 1]" in r.stdout
    assert f"model 0: {tmp / 'a'}" in r.stdout and f"model 1: {tmp / 'b'}" in r.stdout
    assert not os.path.exists(tmp / "dry")


def test_a_frankenmerge_of_an_hf_llama_loads_with_its_new_depth(tmp_path):
    """Layers 0-1 then 1 again of a 2-layer Llama: a 3-layer model that
    ``models.from_hf`` loads, whose layer 2 is the input's layer 1 and whose
    forward pass runs."""
    import jax.numpy as jnp

    from research import models
    from tinyhf import write_tiny_llama

    write_tiny_llama(str(tmp_path / "llama"), n_layers=2)
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: llama, layer_range: [0, 2]}]\n"
            "  - sources: [{model: llama, layer_range: [1, 2]}]\nchat_template: chatml\n")
    out = stream.run(stream.load(write_cfg(tmp_path, text)), str(tmp_path / "deeper"), progress=False)
    src, got = models.from_hf(str(tmp_path / "llama")), models.from_hf(out)
    assert got.cfg.n_layers == 3
    a, b = models.hf.flat_params(src), models.hf.flat_params(got)
    layer1 = [n for n in a if "layers.1." in n]
    assert layer1
    for n in layer1:
        np.testing.assert_array_equal(np.asarray(b[n.replace("layers.1.", "layers.2.")].get_value()),
                                      np.asarray(a[n].get_value()), err_msg=n)
    tokens = jnp.ones((1, 8), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": tokens, "positions": jnp.arange(8)[None]}
    assert np.isfinite(np.asarray(got(batch))).all()


def test_a_hub_id_that_is_no_local_path_is_an_error_saying_how_to_get_it(four_layers):
    tmp, *_ = four_layers
    text = "merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n  - model: mistralai/Mistral-7B-v0.1@main\n"
    with pytest.raises(stream.ConfigError, match=r"cfg.yaml:5: .*/mistralai/Mistral-7B-v0.1@main does not exist. If "
                       r".* is a Hugging Face Hub id: .*huggingface-cli download mistralai/Mistral-7B-v0.1 --local-dir"):
        stream.load(write_cfg(tmp, text))
    with pytest.raises(stream.ConfigError, match=r"cfg.yaml:2: .*/org/base does not exist"):
        stream.load(write_cfg(tmp, text.replace("base_model: base", "base_model: org/base").replace("@main", "")
                              .replace("mistralai/Mistral-7B-v0.1", "b")))


def test_slices_whose_embeddings_and_head_have_different_vocabularies_are_an_error(tmp_path):
    make_ckpt(tmp_path / "a", 1, layers=2, vocab=32)
    make_ckpt(tmp_path / "b", 2, layers=2, vocab=40)
    text = ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n"
            "  - sources: [{model: b, layer_range: [0, 2]}]\n")
    with pytest.raises(stream.MergeFailed, match=r"token rows would disagree: model.embed_tokens.weight from .*/a has "
                       r"32, .*lm_head.weight from .*/b has 40"):
        stream.run(stream.load(write_cfg(tmp_path, text)), str(tmp_path / "out"), progress=False)


def test_dtypes_may_be_spelled_as_torch_names_as_mergekit_takes_them(four_layers):
    tmp, *_ = four_layers
    mc = stream.load(write_cfg(tmp, "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"
                                    "dtype: torch.float32\nout_dtype: torch.bfloat16\n"))
    assert (mc.dtype, mc.out_dtype) == ("float32", "bfloat16")


def test_the_readme_s_merge_configs_plan_as_they_say(tmp_path):
    """Every ```yaml block of the README, on two generated 32-layer models: the slices
    example gives t rising 0 -> 0.5 over layers 0-15, then 0.7."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    assert blocks
    a = make_ckpt(tmp_path / "a", 0, layers=32, d=8, vocab=16, shards=1)
    make_ckpt(tmp_path / "b", 1, layers=32, d=8, vocab=16, base=a, shards=1)
    for i, text in enumerate(blocks):
        mc = stream.load(write_cfg(tmp_path, text, f"readme{i}.yaml"))
        plan = engine.make_plan(mc)
        t = {n: engine.check_tensor_params(plan, n, mc.source).get("t") for n in plan.names}
        if mc.slices:
            assert [t[layer(o)] for o in (0, 15, 16, 31)] == [0.0, 0.5, 0.7, 0.7] and t["lm_head.weight"] == 0.7


def _tie(path, arrs):
    """Rewrite checkpoint ``path`` as a tied model: no lm_head, tie_word_embeddings."""
    import shutil

    from safetensors.numpy import save_file
    shutil.rmtree(path)
    os.makedirs(path)
    save_file({n: a for n, a in arrs.items() if n != "lm_head.weight"}, str(path / "model.safetensors"))
    json.dump({"num_hidden_layers": 4, "tie_word_embeddings": True}, open(path / "config.json", "w"))


def test_inputs_with_tied_heads_merge_with_untied_ones_through_their_embeddings(four_layers):
    """Where some inputs store ``lm_head.weight`` and others tie it to their
    embeddings, the tied ones' head is their ``embed_tokens``, and the output has a
    head of its own (``tie_word_embeddings: false``)."""
    tmp, base, a, b = four_layers
    _tie(tmp / "base", base)
    _tie(tmp / "b", b)
    text = "merge_method: ties\nbase_model: base\nparameters: {density: 0.5}\nmodels:\n  - model: a\n  - model: b\n"
    out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "out"), progress=False)
    got = read_out(out)
    head = merging.merge("ties", [{"h": a["lm_head.weight"]}, {"h": b["model.embed_tokens.weight"]}],
                         base={"h": base["model.embed_tokens.weight"]}, density=0.5)["h"]
    np.testing.assert_array_equal(got["lm_head.weight"], np.asarray(head))
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is False
    # all tied: the output is tied too, with no head
    _tie(tmp / "a", a)
    out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "tied"), progress=False)
    assert "lm_head.weight" not in read_out(out)
    assert json.load(open(os.path.join(out, "config.json")))["tie_word_embeddings"] is True
