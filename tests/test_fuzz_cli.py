"""Standing fuzz tests: random mergekit YAML documents through ``research-merge``
(dry run and real merge), random ``--set`` overrides through the trainer's
config, and merges of damaged checkpoints.  Each either succeeds or fails with
exit code 2 and one line; never a traceback, never a partial output directory.

The examples are fixed (derandomised); ``FUZZ_EXAMPLES=1500 pytest
tests/test_fuzz_cli.py`` runs a campaign of 1500 fresh ones per test."""

import os

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings, strategies as st

from research.merging import METHODS
from research.merging.__main__ import main as merge_main
from research.training import TrainConfig, config as config_lib
from test_merge_stream import make_ckpt

# FUZZ_EXAMPLES=N: a campaign of N fresh random examples per test instead of the fixed ones
_CAMPAIGN = int(os.environ.get("FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=_CAMPAIGN or 40, deadline=None, derandomize=not _CAMPAIGN,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    base = make_ckpt(root / "base", 0, layers=2, d=8, vocab=16, shards=1)
    for i in range(2):
        make_ckpt(root / f"ft{i}", i + 1, layers=2, d=8, vocab=16, base=base, shards=1)
    make_ckpt(root / "other", 9, layers=1, d=8, vocab=16, shards=1)  # a different architecture
    return root


numbers = st.one_of(st.floats(-2, 3, allow_nan=False), st.integers(-2, 3), st.sampled_from([0, 1, 0.5, 1e-9, 1e9]))
values = st.one_of(
    numbers, st.booleans(), st.none(), st.sampled_from(["abc", "", "tensor", "global", "sum", "count"]),
    st.lists(numbers, max_size=4),
    st.lists(st.fixed_dictionaries({"value": numbers}, optional={"filter": st.sampled_from(["mlp", "attn", "x"])}),
             max_size=3),
    st.dictionaries(st.sampled_from(["a", "value"]), numbers, max_size=2),
)
param_names = st.sampled_from(["weight", "density", "lambda", "lam", "epsilon", "gamma", "t", "normalize", "rescale",
                               "trim", "consensus", "filter_wise", "densty", "int8_mask", "k"])
params = st.dictionaries(param_names, values, max_size=4)
model_entry = st.one_of(
    st.fixed_dictionaries({"model": st.sampled_from(["ft0", "ft1", "base", "other", "missing"])},
                          optional={"parameters": st.one_of(params, st.just("x"), st.none())}),
    st.just("ft0"), st.just({"parameters": {}}), st.just({"model": "ft0", "extra": 1}),
)
slice_source = st.one_of(
    st.fixed_dictionaries({"model": st.sampled_from(["ft0", "ft1", "base", "other", "missing"]),
                           "layer_range": st.one_of(st.lists(st.integers(-1, 3), min_size=2, max_size=2),
                                                    st.just([0]), st.just("x"))},
                          optional={"parameters": st.one_of(params, st.just("x"))}),
    st.just({"model": "ft0"}), st.just("ft0"),
)
slice_entry = st.one_of(
    st.fixed_dictionaries({"sources": st.one_of(st.lists(slice_source, max_size=3), st.just("x"))},
                          optional={"parameters": params, "residual_weight": numbers}),
    st.just({"parameters": {}}),
)
random_documents = st.fixed_dictionaries(
    {"merge_method": st.sampled_from([*METHODS, "tie", ""])},
    optional={
        "base_model": st.sampled_from(["base", "ft0", "missing", ""]),
        "models": st.one_of(st.lists(model_entry, max_size=3), st.just("ft0"), st.none()),
        "parameters": st.one_of(params, st.just([1, 2])),
        "dtype": st.sampled_from(["float32", "bfloat16", "float16", "float8", "int4"]),
        "out_dtype": st.sampled_from(["float32", "bfloat16", "x"]),
        "tokenizer_source": st.sampled_from(["base", "union", "ft1", "missing"]),
        "tokenizer": st.one_of(st.just({"source": "base"}), st.just({"tokens": {}}), st.just("x")),
        "chat_template": st.sampled_from(["auto", "chatml", "llama3", "{{ x", "{{ 'x' }}", "x" * 30]),
        "slices": st.one_of(st.lists(slice_entry, max_size=2), st.just("x"), st.none()),
        "merge_methd": st.just("ties"),
    },
)


_VALID = {"weight": st.floats(0.1, 1.0), "density": st.floats(0.3, 1.0), "lambda": st.floats(0.5, 1.5),
          "t": st.floats(0, 1), "normalize": st.booleans(), "epsilon": st.just(0.05)}


@st.composite
def plausible_documents(draw):
    """Mostly valid configs, then one field of them replaced by anything."""
    from research.merging import PARAMS

    method = draw(st.sampled_from(METHODS))
    names = ["ft0"] if method in ("slerp", "passthrough") else ["ft0", "ft1"]
    allowed = [k for k in _VALID if (k if k != "lambda" else "lam") in PARAMS[method]]
    per_model = [k for k in allowed if k in ("weight", "density", "epsilon")]
    keys = [k for k in per_model if draw(st.booleans())]
    doc = {"merge_method": method, "base_model": "base",
           "models": [{"model": n, "parameters": {k: draw(_VALID[k]) for k in keys}} for n in names],
           "parameters": {k: draw(_VALID[k]) for k in allowed if k not in per_model and draw(st.booleans())},
           "dtype": draw(st.sampled_from(["float32", "bfloat16"]))}
    if method == "della" or method == "della_linear":
        for m in doc["models"]:
            m["parameters"]["density"] = 0.5
    if draw(st.booleans()):  # the same merge over two slices of one layer each, the base listed in each
        models = doc.pop("models")
        doc["slices"] = [{"sources": [{"model": "base", "layer_range": r}] + [{**m, "layer_range": r} for m in models]}
                         for r in ([0, 1], [1, 2])]
    if draw(st.booleans()):  # mutate one field
        key = draw(st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype", "out_dtype",
                                    "tokenizer_source", "chat_template", "slices"]))
        doc[key] = draw(random_documents).get(key, draw(values))
    return doc


documents = st.one_of(plausible_documents(), random_documents)


def _check(rc, err, out_dir):
    assert rc in (0, 2), (rc, err)
    parent, name = os.path.split(out_dir)
    leftovers = [d for d in os.listdir(parent) if d.startswith(name + ".")]
    assert leftovers == [], leftovers
    if rc == 2:
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert not os.path.exists(out_dir)


@FUZZ
@given(doc=documents)
def test_random_merge_configs_succeed_or_fail_in_one_line(zoo, capsys, doc):
    cfg = zoo / "fuzz.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    out = str(zoo / "out")
    for extra in (["--dry-run"], []):
        capsys.readouterr()
        rc = merge_main([str(cfg), out, "--no-progress", *extra])
        event(f"{extra[0] if extra else 'merge'}: rc {rc}")
        _check(rc, capsys.readouterr().err, out)
        if rc == 0 and not extra:
            assert os.path.isfile(os.path.join(out, "merge_config.yaml"))
            os.rename(out, str(zoo / "done"))
            import shutil

            shutil.rmtree(str(zoo / "done"))


keys = st.sampled_from([f.name for f in TrainConfig.__dataclass_fields__.values()] + ["lr_typo", "", "model.d"])
raw = st.one_of(st.sampled_from(["0", "-1", "1e-3", "abc", "", "None", "()", "(1,2,3)", "(-1,1,1)", "[]", "{}",
                                 "copy", "copy,nope", "/abs/path", "./x", "1e400", "nan", "inf", "True", "2**40",
                                 "(('d_model', 48),)", "{'copy': 1.0}", "tiny", "huge"]),
                st.text(max_size=8))


# plausible values, so that a share of the configs is accepted and goes on to build its data
_PLAUSIBLE = {
    "tasks": ["copy", "copy,reverse", "sort,add", "g2p,p2g,cipher"],
    "mixing": ["size", "temperature", "{'copy': 1.0}", "{'copy': 2, 'reverse': 0.5}", "{'copy': 0.0, 'reverse': 1}",
               "{'sort': 1.0}", "{'copy': -1}"],
    "task_lengths": ["(('copy', 2, 5),)", "(('copy', 5, 2),)", "(('reverse', 1, 1),)"],
    "seq_len": ["32", "64", "17"], "chunk_size": ["16", "32", "7"], "batch_size": ["8", "16"],
    "neftune_alpha": ["0", "5", "0.5"], "seed": ["0", "3"], "prompt_template": ["'Q: {prompt}'", "'{prompt}\\n'"],
    "data": ["copy", "copy,reverse", "(('copy', 2.0),)", "(('copy', 1.0), ('reverse', 0.0))"],
}
plausible = st.sampled_from(sorted(_PLAUSIBLE)).flatmap(
    lambda k: st.sampled_from(_PLAUSIBLE[k]).map(lambda v: f"{k}={v}"))


@FUZZ
@example(assignments=["seq_len=\n"])  # the values, echoed raw, once broke the error's single line
@example(assignments=["mixing=\n"])
@example(assignments=["lr_typo\n=1"])
@given(assignments=st.lists(st.one_of(st.builds(lambda k, v, eq: f"{k}{'=' if eq else ''}{v}", keys, raw, st.booleans()),
                                      plausible, plausible), max_size=3))
def test_random_set_overrides_give_a_config_or_a_named_error(assignments):
    """Random and plausible ``--set`` assignments: a named one-line error, or a valid
    config whose tokenizer, sources and mixture build and give a batch."""
    base = TrainConfig(model="tiny", tasks=("copy",), batch_size=8, mesh=(1, 1, 1))
    try:
        cfg = config_lib.override(base, assignments)
    except config_lib.ConfigError as e:
        assert str(e) and "\n" not in str(e)
        event("refused")
        return
    assert config_lib.validate(cfg) == cfg  # what is accepted is valid
    event("accepted")
    if cfg.model == "tiny" and not cfg.init_from:  # and gives batches: its tokenizer, sources and mixture build
        from research.data import pipeline
        from research.training import data as data_lib

        try:  # files a config names (tokenizer, data) are checked as they are opened
            tok = data_lib.tokenizer_for(cfg)
            sources, mixing = data_lib.sources_for(cfg, tok)
        except config_lib.ConfigError as e:
            assert str(e) and "\n" not in str(e)
            event("refused when opened")
            return
        pcfg = pipeline.PipelineConfig(tasks=tuple(s.name for s in sources), seq_len=cfg.seq_len,
                                       batch_size=cfg.batch_size, mixing=mixing, seed=cfg.seed,
                                       chunk_size=cfg.chunk_size)
        batch = next(iter(pipeline.make(pcfg, sources, tokenizer=tok)))
        assert batch["tokens"].shape == (cfg.batch_size, cfg.seq_len)


# --- damaged checkpoints through the merge ---------------------------------------------


@pytest.fixture(scope="module")
def damage_zoo(tmp_path_factory):
    """A base (two shards, with config.json), a fine-tune and a peft LoRA adapter on the
    base, and a config that merges all three."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    from research.models import lora
    from research.models.config import LoRAConfig

    root = tmp_path_factory.mktemp("damage")
    base = make_ckpt(root / "base", 0, layers=2, d=8, vocab=16, shards=2)
    make_ckpt(root / "ft0", 1, layers=2, d=8, vocab=16, base=base, shards=2)
    rng = np.random.default_rng(3)
    (root / "ad").mkdir()
    save_file({f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight":
               rng.standard_normal(shape).astype(np.float32)
               for i in range(2) for ab, shape in (("A", (2, 8)), ("B", (8, 2)))},
              str(root / "ad" / "adapter_model.safetensors"))
    (root / "ad" / "adapter_config.json").write_text(json.dumps(
        lora.peft_config(LoRAConfig(rank=2, alpha=4.0, targets=("q_proj",)), str(root / "base"))))
    (root / "merge.yaml").write_text(f"merge_method: task_arithmetic\nbase_model: {root / 'base'}\nmodels:\n"
                                     f"  - model: {root / 'ft0'}\n    parameters: {{weight: 0.5}}\n"
                                     f"  - model: {root / 'base'}+{root / 'ad'}\n    parameters: {{weight: 0.5}}\n")
    return root


_DAMAGEABLE = ["ft0/model-00001-of-00002.safetensors", "ad/adapter_model.safetensors",
               "ft0/model.safetensors.index.json", "base/config.json", "ad/adapter_config.json"]


def _strings(doc):
    if isinstance(doc, str):
        yield doc
    elif isinstance(doc, (dict, list)):
        for k, v in (doc.items() if isinstance(doc, dict) else enumerate(doc)):
            yield from _strings(k)
            yield from _strings(v)


@st.composite
def damaged_json(draw, blob: bytes) -> bytes:
    """``blob`` (a JSON file) cut short, replaced by any JSON, or with one entry, at any
    depth, removed or set to any JSON value or to another string of the document."""
    import json

    from test_safetensors_io import _json

    kind = draw(st.sampled_from(["set", "set", "set", "drop", "cut", "replace"]))
    if kind == "cut":
        return blob[:draw(st.integers(0, len(blob) - 1))]
    if kind == "replace":
        return json.dumps(draw(_json)).encode()
    doc = json.loads(blob)
    node = doc
    while isinstance(node, (dict, list)) and node:
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        if isinstance(node[key], (dict, list)) and node[key] and draw(st.booleans()):
            node = node[key]
            continue
        if kind == "drop":
            del node[key]
        else:
            node[key] = draw(st.one_of(_json, st.sampled_from(sorted(set(_strings(doc))) or [""])))
        break
    return json.dumps(doc).encode()


@st.composite
def _damage(draw, pristine: dict):
    """One input file of ``damage_zoo`` and new bytes for it (``damaged`` safetensors,
    ``damaged_json`` for the rest)."""
    from test_safetensors_io import damaged

    name = draw(st.sampled_from(_DAMAGEABLE))
    blob = pristine[name]
    return name, draw(damaged(blob) if name.endswith(".safetensors") else damaged_json(blob))


@settings(FUZZ, max_examples=_CAMPAIGN or 60)
@given(data=st.data())
def test_damaged_inputs_merge_or_fail_in_one_line_naming_the_damaged_file(damage_zoo, capsys, data):
    """A merge whose input has a damaged shard, index, config or adapter either succeeds
    or fails with one line that names that file or its model's directory."""
    pristine = {n: (damage_zoo / n).read_bytes() for n in _DAMAGEABLE}
    name, blob = data.draw(_damage(pristine))
    event(name)
    (damage_zoo / name).write_bytes(blob)
    out = str(damage_zoo / "out")
    try:
        for extra in (["--dry-run"], []):
            capsys.readouterr()
            rc = merge_main([str(damage_zoo / "merge.yaml"), out, "--no-progress", *extra])
            err = capsys.readouterr().err
            _check(rc, err, out)
            event(f"{extra[0] if extra else 'merge'}: rc {rc}")
            if rc == 2:
                assert str(damage_zoo / os.path.dirname(name)) in err, err
    finally:
        (damage_zoo / name).write_bytes(pristine[name])
        if os.path.isdir(out):
            import shutil

            shutil.rmtree(out)


@pytest.fixture(scope="module")
def init_zoo(tmp_path_factory):
    """A tiny Llama-style HF directory (config, safetensors, tokenizer files) and a JSONL file."""
    from tinyhf import write_jsonl, write_tiny_llama

    root = tmp_path_factory.mktemp("init")
    write_tiny_llama(str(root / "llama"))
    write_jsonl(str(root / "d.jsonl"), "copy", n=40)
    return root


_INIT_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]


@settings(FUZZ, max_examples=_CAMPAIGN or 30)
@given(data=st.data())
def test_a_damaged_init_from_directory_trains_or_fails_in_one_line_naming_it(init_zoo, capsys, data):
    """Fine-tuning from an HF directory with one damaged file (its config, tokenizer,
    tokenizer config or weights) trains, or refuses it with exit code 2 and one
    line naming the directory's file, or (valid but absurd values) starts and
    stops with exit code 1 and one line saying why."""
    import shutil

    from research.train import main as train_main
    from test_safetensors_io import damaged

    llama = init_zoo / "llama"
    name = data.draw(st.sampled_from(_INIT_FILES))
    pristine = (llama / name).read_bytes()
    blob = data.draw(damaged(pristine) if name.endswith(".safetensors") else damaged_json(pristine))
    event(name)
    (llama / name).write_bytes(blob)
    try:
        capsys.readouterr()
        rc = train_main(["--config", "experiments/configs/finetune_hf.py", "--workdir", str(init_zoo / "run"),
                         "--no-resume", *[a for kv in (f"init_from={llama}", f"data=jsonl:{init_zoo / 'd.jsonl'}",
                                                       "steps=1", "save_every=0", "eval_samples=1", "max_new_tokens=1",
                                                       "batch_size=2", "seq_len=32", "chunk_size=16", "mesh=(1,1,1)")
                                          for a in ("--set", kv)]])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        event(f"rc {rc}")
        assert rc in (0, 1, 2), err
        if rc:  # 1: a run that started and stopped (a valid but absurd config diverges: rope_theta=1e-290)
            assert len(err) == 1 and err[0].startswith("error: "), err
        if rc == 2:
            assert str(llama) in err[0], err
    finally:
        (llama / name).write_bytes(pristine)
        shutil.rmtree(init_zoo / "run", ignore_errors=True)
