"""Tasks, tokenizers, user data, mixtures and the grain pipeline."""

import json

import numpy as np
import pytest

from research.data import mixture, pipeline, sources, suite, tasks, tokenizers


# --- tokenizers -------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_specials():
    tok = tokenizers.load()
    ids = tok.encode("héllo\n")
    assert min(ids) >= 3 and tok.decode(ids) == "héllo\n"
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "héllo\n"


def test_sentencepiece_model_from_a_local_file(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=60,
                                   model_type="bpe", eos_id=1, pad_id=0, unk_id=2, bos_id=-1, minloglevel=2)
    tok = tokenizers.load(str(tmp_path / "sp.model"))
    assert tok.eos_id == 1 and tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    model = (tmp_path / "sp.model").read_bytes()
    (tmp_path / "cut.model").write_bytes(model[:len(model) // 2])  # a damaged model is named, not a RuntimeError
    with pytest.raises(ValueError, match=r"cut\.model: sentencepiece cannot read it \("):
        tokenizers.load(str(tmp_path / "cut.model"))


def test_hf_tokenizer_json_from_a_local_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(["hello world"] * 50, trainers.BpeTrainer(vocab_size=40, special_tokens=["<pad>", "</s>", "<unk>"]))
    t.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizers.load(str(tmp_path))
    assert tok.eos_id == 1 and tok.pad_id == 0
    assert tok.decode(tok.encode("hello world")) == "hello world"


def test_missing_tokenizer_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.model"):
        tokenizers.load(str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizers.load(str(tmp_path / "tokenizer.json"))


# --- tasks ------------------------------------------------------------------


@pytest.mark.parametrize("name", tasks.NAMES)
def test_tasks_are_deterministic_and_solvable(name):
    t = tasks.make_task(name)
    p, r = t.example("train", 7)
    assert (p, r) == t.example("train", 7)
    assert (p.endswith("\n") or name == "text") and r
    assert t.example("val", 7) != (p, r) and t.example("test", 7) != t.example("val", 7)


def test_algorithmic_answers_are_right():
    p, r = tasks.make_task("reverse").example("train", 0)
    assert r == p.removeprefix("reverse: ").strip()[::-1]
    p, r = tasks.make_task("add").example("train", 3)
    a, b = p.removeprefix("add: ").strip().split("+")
    assert int(a) + int(b) == int(r)
    p, r = tasks.make_task("sort").example("val", 1)
    assert r == "".join(sorted(p.removeprefix("sort: ").strip()))
    p, r = tasks.make_task("cipher").example("test", 2)
    assert all((ord(y) - ord(x)) % 26 == 3 for x, y in zip(p.removeprefix("rot3: ").strip(), r))
    assert tasks.make_task("swap").render("abcde") == ("swap: abcde\n", "badce")


def test_format_tasks_answers_by_hand():
    render = lambda name: tasks.make_task(name).render("abcz")
    assert render("rot1") == ("rot1: abcz\n", "bcda")
    assert render("rotr") == ("rotr: abcz\n", "zabc")
    assert render("repeat") == ("repeat: abcz\n", "abczabcz")
    assert render("skip") == ("skip: abcz\n", "ac")
    assert render("capfirst") == ("capfirst: abcz\n", "Abcz")


def test_one_letter_answers_by_hand():
    render = lambda name: tasks.make_task(name).render("dcaz")
    assert render("first") == ("first: dcaz\n", "d")
    assert render("second") == ("second: dcaz\n", "c")
    assert render("last") == ("last: dcaz\n", "z")
    assert render("max") == ("max: dcaz\n", "z")
    assert render("min") == ("min: dcaz\n", "a")
    assert render("succ") == ("succ: dcaz\n", "e")
    assert tasks.make_task("succ").render("zab")[1] == "a"  # wraps around
    with pytest.raises(ValueError, match="'second': need 2 <= min_len"):
        tasks.make_task("second", min_len=1, max_len=4)


def test_majority_rate_is_the_most_frequent_answer_share():
    class Fixed:
        def example(self, split, i):
            return "q", "ab"[i % 4 == 0]  # "b" 3 times in 4

    assert suite.majority_rate(Fixed(), n=8) == 0.75
    for name in suite.CANDIDATES:  # always giving one answer stays under the base's gate (20%)
        assert suite.majority_rate(tasks.make_task(name, min_len=3, max_len=6)) < 0.2, name


def test_pretraining_never_shows_a_target_prompt_prefix():
    pretrain = [t for t, _ in suite.PRETRAIN_MIXTURE]
    candidates = (*suite.CANDIDATES, *suite.GENERATION_CANDIDATES)
    assert not set(pretrain) & set(candidates) and set(suite.FORMAT_TASKS) <= set(pretrain)
    prefix = lambda name: tasks.make_task(name).example("train", 0)[0].split(":")[0] + ":"
    seen = {prefix(t) for t in suite.FORMAT_TASKS}
    assert all(prefix(t) not in seen for t in candidates)
    assert sum(w for _, w in suite.PRETRAIN_MIXTURE) == pytest.approx(1.0)


def test_finetune_mixture_gives_the_replay_share_to_the_format_tasks():
    mix = suite.finetune_mixture(["swap", "rotl"], replay=0.5)
    assert mix["swap"] == mix["rotl"] == 0.25 and sum(mix.values()) == pytest.approx(1.0)
    assert sum(mix[t] for t in suite.FORMAT_TASKS) == pytest.approx(0.5)
    assert suite.finetune_mixture(["swap"], replay=0.0) == {"swap": 1.0}
    with pytest.raises(ValueError, match="replay must be in"):
        suite.finetune_mixture(["swap"], replay=1.0)


@pytest.mark.parametrize("name", ["copy", *suite.CANDIDATES, *suite.GENERATION_CANDIDATES, "add"])
def test_no_held_out_prompt_occurs_among_the_first_100k_training_draws(name):
    t = tasks.make_task(name, min_len=3, max_len=6)  # the suite's lengths: the smallest input space
    train = {t.example("train", i)[0] for i in range(100_000)}
    for split in ("val", "test"):
        held = [t.example(split, i)[0] for i in range(300)]
        assert len(set(held)) == 300, f"{split} repeats an input"
        assert not train.intersection(held), f"{name}: {split} prompts among the training draws"
    assert not {t.example("val", i)[0] for i in range(300)} & {t.example("test", i)[0] for i in range(300)}


def test_text_splits_are_disjoint_paragraphs():
    from research.data import text

    c = text.corpus()
    paras = {s: set(c[s].split("\n\n")) for s in c}
    assert not paras["train"] & paras["val"] and not paras["train"] & paras["test"] and not paras["val"] & paras["test"]
    assert len(c["val"]) > 30_000 and len(c["test"]) > 30_000
    t = tasks.make_task("text")
    assert t.example("val", 0) != t.example("val", 1) and t.example("val", 0)[1] in c["val"]
    assert not t.generative and all(32 <= len(t.example("train", i)[1]) <= 96 for i in range(50))


def test_lengths_are_controllable_for_the_100_vs_2000_case():
    tok = tokenizers.ByteTokenizer()
    short = tasks.make_task("reverse", min_len=40, max_len=50)
    long = tasks.make_task("copy", min_len=990, max_len=1000)
    ls = [len(tasks.encode(*short.example("train", i), tok)["tokens"]) for i in range(20)]
    ll = [len(tasks.encode(*long.example("train", i), tok)["tokens"]) for i in range(20)]
    assert 90 <= np.mean(ls) <= 115 and 1980 <= np.mean(ll) <= 2010


def test_cmu_tasks_hold_out_words():
    g2p = tasks.make_task("g2p")
    train = {g2p.example("train", i)[0] for i in range(0, g2p.size["train"], 97)}
    held = {g2p.example(s, i)[0] for s in ("val", "test") for i in range(g2p.size[s])}
    assert not train & held and g2p.size["val"] > 5000 and g2p.size["test"] > 5000
    p, r = tasks.make_task("p2g").example("test", 0)
    assert p.startswith("p2g: ") and r.isalpha()


def test_encode_masks_the_prompt():
    s = tasks.encode("ab", "cd", tokenizers.ByteTokenizer(), task_id=3)
    np.testing.assert_array_equal(s["loss_mask"], [0, 0, 1, 1])
    assert s["task_id"] == 3


def test_unknown_task_is_named():
    with pytest.raises(tasks.UnknownTaskError, match="unknown task 'copi'.*copy"):
        tasks.make_task("copi")


# --- user data ----------------------------------------------------------------


def test_jsonl_source(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n\n" + json.dumps({"text": "t"}) + "\n")
    src = sources.JsonlSource(str(f))
    rows = [src.example(s, i) for s in tasks.SPLITS for i in range(src.size[s])]
    assert src.name == "mine" and sum(src.size.values()) == 2 and sorted(rows) == [("", "t"), ("q", "a")]


def test_jsonl_errors_name_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n{oops\n")
    with pytest.raises(sources.DataError, match=r"bad.jsonl:2: not valid JSON"):
        sources.JsonlSource(str(f))
    f.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(sources.DataError, match=r"bad.jsonl:1: needs 'prompt' and 'response', or 'text'"):
        sources.JsonlSource(str(f))
    f.write_text(json.dumps({"messages": None}) + "\n")
    with pytest.raises(sources.DataError,
                       match=r"bad.jsonl:1: needs .*; got keys \['messages'\] \('messages' is null\)$"):
        sources.JsonlSource(str(f))
    with pytest.raises(sources.DataError, match="no such file"):
        sources.JsonlSource(str(tmp_path / "missing.jsonl"))


def test_tfds_source_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=6):
        src = sources.open_source("tfds:imdb_reviews:train?text=text&eval_split=test")
        assert src.size["train"] == 6 and src.size["val"] == 6 and not src.generative
        # the mock declares no splits: 5% + 5% of train are held out, by a hash of the index
        held = sources.open_source("tfds:imdb_reviews:train?text=text")
        assert sum(held.size.values()) == 6 and held.size["train"] < 6
        prompt, text = src.example("train", 2)
        assert prompt == "" and isinstance(text, str) and text
        cfg = pipeline.PipelineConfig(seq_len=64, batch_size=2, chunk_size=8)
        it = pipeline.make(cfg, [src])
        assert next(it)["tokens"].shape == (2, 64)


# --- mixtures -------------------------------------------------------------------


def test_mixture_rates():
    sizes = {"a": 900, "b": 100}
    np.testing.assert_allclose(list(mixture.rates(sizes, "size", min_rate=0).values()), [0.9, 0.1])
    t = mixture.rates(sizes, "temperature", temperature=2.0, min_rate=0)
    np.testing.assert_allclose(t["a"] / t["b"], 3.0)
    np.testing.assert_allclose(list(mixture.rates(sizes, {"a": 1, "b": 3}).values()), [0.25, 0.75])


def test_mixture_cannot_starve_a_task():
    r = mixture.rates({"big": 10**9, "tiny": 1}, "size")
    assert r["tiny"] >= 0.05 - 1e-12 and abs(sum(r.values()) - 1) < 1e-12
    with pytest.raises(ValueError, match="unknown task"):
        mixture.rates({"a": 1}, {"b": 1.0})


def test_realised_mix_follows_the_rates():
    m = mixture.Mixture({"a": 300, "b": 100}, "size", min_rate=0, seed=1)
    real = m.realised(4000)
    assert abs(real["a"] - 0.75) < 0.03


# --- pipeline ------------------------------------------------------------------

CFG = pipeline.PipelineConfig(tasks=("copy", "reverse", "g2p"), seq_len=128, batch_size=3, chunk_size=32)


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_pipeline_is_deterministic_for_a_seed():
    a = _take(pipeline.make(CFG), 4)
    b = _take(pipeline.make(CFG), 4)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    c = next(pipeline.make(pipeline.PipelineConfig(**{**CFG.__dict__, "seed": 1})))
    assert not np.array_equal(c["tokens"], a[0]["tokens"])


def test_pipeline_resumes_exactly_mid_epoch():
    it = pipeline.make(CFG)
    _take(it, 5)
    state = it.get_state()
    expect = _take(it, 6)
    again = pipeline.make(CFG)
    again.set_state(state)
    for x, y in zip(expect, _take(again, 6)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_global_batch_places_each_row_once_whatever_the_mesh():
    from research import sharding

    b = next(pipeline.make(pipeline.PipelineConfig(**{**CFG.__dict__, "batch_size": 8})))
    rows = {(8, 1, 1): [(i, i + 1) for i in range(8)], (2, 2, 2): [(0, 2), (2, 4), (4, 6), (6, 8)],
            (1, 1, 8): [(0, 8)]}  # the batch is split over data x fsdp; tensor replicas hold the same rows
    for mesh, expect in rows.items():
        sh = sharding.batch_sharding(sharding.make_mesh(*mesh))
        assert sharding.process_rows(sh, 8) == expect
        placed = sharding.global_batch(b, sh)
        for k in b:
            assert placed[k].sharding == sh
            np.testing.assert_array_equal(np.asarray(placed[k]), b[k])


def test_pipeline_batches_follow_the_contract():
    b = next(pipeline.make(CFG))
    assert set(b) == set(pipeline.BATCH_FIELDS) and b["tokens"].dtype == np.int32
    assert b["loss_weights"].dtype == np.float32 and set(np.unique(b["task_ids"])) <= {-1, 0, 1, 2}
