"""User data in the trainer: HF tokenizers and their special tokens, JSONL/chat
sources with disjoint held-out splits, templates, mixtures, and the errors that
name a bad input."""

import dataclasses
import json

import numpy as np
import pytest

from research.data import pipeline, sources, tasks, templates, tokenizers
from research.training import TrainConfig
from research.training import data as data_lib
from research.training.config import ConfigError, validate
from tinyhf import CHAT_TEMPLATE, write_jsonl, write_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "llama"
    write_tiny_llama(str(d))
    return str(d)


def _lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_an_hf_directory_s_tokenizer_takes_its_special_tokens_from_tokenizer_config(llama):
    tok = tokenizers.load(llama)
    vocab = json.load(open(f"{llama}/tokenizer.json"))["model"]["vocab"]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (vocab["<pad>"], vocab["<s>"], vocab["</s>"]) == (0, 1, 2)
    assert tok.add_bos and tok.chat_template == CHAT_TEMPLATE and tok.vocab_size == 320
    ids = tokenizers.encode_sequence(tok, "copy: abc\n")
    assert ids[0] == tok.bos_id and tok.decode(ids) == "copy: abc\n"
    assert tokenizers.encode_sequence(tok, "<s>hi")[:2] != [tok.bos_id, tok.bos_id]  # a template's BOS is not doubled
    sample = tasks.encode("copy: ab\n", "ab", tok)
    assert sample["tokens"][0] == tok.bos_id and sample["loss_mask"][0] == 0  # BOS opens the prompt, untrained
    cfg = TrainConfig(init_from=llama, data=("copy",))
    assert data_lib.tokenizer_spec(cfg) == llama  # the default: init_from's tokenizer
    assert data_lib.tokenizer_spec(dataclasses.replace(cfg, tokenizer="byte")) == "byte"


def test_chat_template_jinja_overrides_tokenizer_config_s_template(tmp_path):
    """transformers (since 2025) saves a tokenizer's template to ``chat_template.jinja``
    and reads that file over ``tokenizer_config.json``'s field: so do we."""
    d = tmp_path / "llama"
    write_tiny_llama(str(d))
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (d / "chat_template.jinja").write_text(jinja)
    assert tokenizers.load(str(d)).chat_template == jinja
    cfg = json.load(open(d / "tokenizer_config.json"))
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": CHAT_TEMPLATE}]
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    (d / "chat_template.jinja").unlink()
    assert tokenizers.load(str(d)).chat_template == CHAT_TEMPLATE


def test_a_jsonl_file_is_split_by_record_content_disjointly_and_without_repeats_across_splits(tmp_path):
    recs = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(2000)]
    recs += recs[:300]  # repeated records
    src = sources.JsonlSource(_lines(tmp_path / "d.jsonl", recs))
    rows = {s: set(src._rows[s]) for s in tasks.SPLITS}
    assert sum(src.size.values()) == 2300 and src.generative
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert 0.035 < src.size["val"] / 2300 < 0.065 and 0.035 < src.size["test"] / 2300 < 0.065
    # the split is a function of the record alone: the same record in another file lands in the same split
    other = sources.JsonlSource(_lines(tmp_path / "e.jsonl", recs[:50][::-1]))
    assert set(other._rows["val"]) <= rows["val"] and set(other._rows["train"]) <= rows["train"]


def test_a_separate_val_file_loses_the_records_that_training_has(tmp_path):
    train = _lines(tmp_path / "t.jsonl", [{"text": f"line {i}"} for i in range(20)])
    val = _lines(tmp_path / "v.jsonl", [{"text": "line 3"}, {"text": "held out"}])
    src = sources.open_source(f"jsonl:{train}?val={val}&name=mine")
    assert src.name == "mine" and src.size == {"train": 20, "val": 1, "test": 0} and not src.generative
    assert src.example("val", 0) == ("", "held out")
    with pytest.raises(sources.DataError, match="no 'test' examples"):
        src.example("test", 0)


def test_field_options_reach_nested_records_and_the_prompt_template_formats_prompts(tmp_path):
    f = _lines(tmp_path / "qa.jsonl", [{"question": "2+2?", "answers": {"text": ["4", "four"]}}] * 3)
    src = sources.open_source(f"jsonl:{f}?prompt=question&response=answers/text", prompt_template="Q: {prompt}\nA: ")
    split = next(s for s in tasks.SPLITS if src.size[s])
    assert src.example(split, 0) == ("Q: 2+2?\nA: ", "4")


def test_a_conversation_trains_on_its_last_assistant_message_under_either_template(tmp_path, llama):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "Ada."}]
    default = templates.ChatTemplate()
    assert default.split(conv) == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!\n<|user|>\nName?\n"
                                   "<|assistant|>\n", "Ada.")
    tok = tokenizers.load(llama)
    hf = templates.ChatTemplate(tok.chat_template, bos_token=tok.bos_token, eos_token=tok.eos_token)
    prompt, response = hf.split(conv)
    assert prompt == "<s>[INST] Hi [/INST] Hello!</s>[INST] Name? [/INST]" and response == " Ada."  # EOS: the packer's
    sample = tasks.encode(prompt, response, tok)
    trained = sample["tokens"][sample["loss_mask"] > 0]
    assert tok.decode(trained) == " Ada." and list(sample["tokens"]).count(tok.bos_id) == 1
    f = _lines(tmp_path / "chat.jsonl", [{"messages": conv}] * 2)
    cfg = TrainConfig(init_from=llama, data=(f"jsonl:{f}",))
    src = data_lib.sources_for(cfg, tok)[0][0]
    split = next(s for s in tasks.SPLITS if src.size[s])
    assert src.example(split, 0) == (prompt, response)
    with pytest.raises(templates.TemplateError, match="end with an assistant message"):
        default.split(conv[:-1])


def test_weighted_data_entries_are_the_mixture(tmp_path):
    f = _lines(tmp_path / "mine.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(40)])
    cfg = validate(TrainConfig(data=((f"jsonl:{f}", 3.0), "copy")))
    srcs, mixing = data_lib.sources_for(cfg, tokenizers.ByteTokenizer())
    assert [s.name for s in srcs] == ["mine", "copy"] and mixing == {"mine": 3.0, "copy": 1.0}
    it = pipeline.make(pipeline.PipelineConfig(tasks=("mine", "copy"), seq_len=64, batch_size=64, chunk_size=64,
                                               mixing=mixing), srcs)
    b = next(it)
    n = [len(np.unique(b["segment_ids"][b["task_ids"] == t] + 1000 * np.nonzero(b["task_ids"] == t)[0])) for t in (0, 1)]
    assert n[0] > 2 * n[1]  # about 3 : 1 samples (mine's are shorter)


@pytest.mark.parametrize("change, match", [
    (dict(data=("jsonl:x.jsonl", "copi")), "'copi' is not an embedded task"),
    (dict(data=("csv:x.csv",)), "unknown kind 'csv'"),
    (dict(data=("jsonl:x.jsonl?prompt",)), "option 'prompt' is not key=value"),
    (dict(data=("jsonl:x.jsonl?colour=red",)), r"unknown option\(s\) \['colour'\]"),
    (dict(data=(("copy", -1.0),)), "weight must be >= 0"),
    (dict(data=("copy",), tasks=("reverse",)), "set one of them"),
    (dict(prompt_template="Q: {question}"), "prompt_template"),
    (dict(prompt_template="no field"), r"has no \{prompt\} field"),
])
def test_bad_data_config_is_refused_naming_the_key(change, match):
    with pytest.raises(ConfigError, match=match):
        validate(TrainConfig(**change))


def test_bad_inputs_name_the_file_line_tokenizer_or_override(tmp_path, llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: needs 'prompt' and 'response', or 'text', or 'messages'"):
        data_lib.sources_for(TrainConfig(data=(f"jsonl:{bad}",)), tokenizers.ByteTokenizer())
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: a conversation must end with an assistant message"):
        data_lib.sources_for(TrainConfig(data=(f"jsonl:{bad}",)), tokenizers.ByteTokenizer())
    two = [str(tmp_path / d / "x.jsonl") for d in ("a", "b")]
    for p in two:
        write_jsonl(p, "copy", n=20)
    with pytest.raises(ConfigError, match="two sources are named 'x'"):
        data_lib.sources_for(TrainConfig(data=tuple(f"jsonl:{p}" for p in two)), tokenizers.ByteTokenizer())
    with pytest.raises(ConfigError, match=r"has 320 ids but the model has 259 embedding rows"):
        data_lib.tokenizer_for(TrainConfig(tokenizer=llama), 259)
    from research.training.trainer import check_hf_overrides

    cfg = TrainConfig(init_from=llama, data=("copy",), model_overrides=(("d_model", 64), ("remat", "full")))
    with pytest.raises(ConfigError, match=r"d_model=64 contradicts .*config.json, which gives d_model=32"):
        check_hf_overrides(cfg)
    check_hf_overrides(dataclasses.replace(cfg, model_overrides=(("d_model", 32), ("remat", "full"))))  # agrees


def test_special_tokens_known_only_by_id_come_from_config_json(tmp_path, llama):
    import shutil

    d = tmp_path / "ids_only"
    d.mkdir()
    shutil.copy(f"{llama}/tokenizer.json", d / "tokenizer.json")
    # unusual ids on purpose: the names alone would give bos <s> = 1, eos </s> = 2
    (d / "config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, 2], "pad_token_id": None}))
    (d / "generation_config.json").write_text(json.dumps({"pad_token_id": 0}))
    tok = tokenizers.load(str(d))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.eos_token) == (2, 1, 0, "<s>") and not tok.add_bos


def _hole(d):
    """Drops a tensor's header entry: its bytes then belong to no tensor."""
    import struct

    path = d / "model.safetensors"
    blob = path.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header.pop(sorted(k for k in header if k != "__metadata__")[0])
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def _config(d, edit):
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _config(d, lambda c: c.pop("num_attention_heads")), r"config\.json: num_attention_heads is missing"),
    (lambda d: _config(d, lambda c: c.update(vocab_size=-3)),
     r"config\.json: vocab_size=-3: expected a positive integer"),
    (lambda d: _config(d, lambda c: c.update(rope_theta="x")), r"config\.json: rope_theta='x': expected a positive number"),
    (lambda d: _config(d, lambda c: c.update(hidden_act=["silu"])), r"config\.json: hidden activation \['silu'\]"),
    (lambda d: (d / "config.json").write_text("[]"), r"config\.json: not a JSON object"),
    (_hole, r"model\.safetensors: corrupt .*leave \d+ bytes unused before them"),
])
def test_a_damaged_init_from_checkpoint_stops_training_in_one_line_naming_file_and_key(tmp_path, capsys, damage,
                                                                                      message):
    import re

    from research.train import main

    write_tiny_llama(str(tmp_path / "llama"))
    write_jsonl(str(tmp_path / "d.jsonl"), "copy", n=40)
    damage(tmp_path / "llama")
    rc = main(["--config", "experiments/configs/finetune_hf.py", "--workdir", str(tmp_path / "run"),
               "--set", f"init_from={tmp_path / 'llama'}", "--set", f"data=jsonl:{tmp_path / 'd.jsonl'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'llama'}/"), err
    assert re.search(message, err[0]), err
