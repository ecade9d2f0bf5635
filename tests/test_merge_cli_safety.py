"""The merge CLI never loses, mixes or poisons an output: locks, stale temporaries,
inputs inside OUT, rerunnable configs, and bad values named before any work."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import interruptible
from research.merging import stream
from research.merging.__main__ import main as merge_main
from test_merge_stream import TIES, cli, make_ckpt, read_out, write_cfg


@pytest.fixture
def models(tmp_path):
    base = make_ckpt(tmp_path / "base", 0)
    fts = [make_ckpt(tmp_path / f"ft{i}", i + 1, base=base) for i in range(3)]
    return tmp_path, base, fts


@pytest.fixture
def main(capsys):
    """``research-merge ARGS`` in this process: ``(exit code, stderr)``; a traceback fails the test."""

    def run(*args):
        capsys.readouterr()
        rc = merge_main([*args, "--no-progress"])
        return rc, capsys.readouterr().err

    return run


def _fails(result, match):
    rc, err = result
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    assert match in lines[0], lines[0]


def test_a_second_merge_to_a_locked_output_fails_naming_the_holder(models, main):
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    with open(tmp / "out.lock", "w") as f:  # a merge in progress holds the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{os.getpid()}\n")
        f.flush()
        _fails(main(cfg, str(tmp / "out")), f"another merge (pid {os.getpid()}) is writing it")
    assert not (tmp / "out").exists()
    # the holder is gone (the kernel released its lock): the next merge runs, and removes the lock file
    assert main(cfg, str(tmp / "out"))[0] == 0
    assert not (tmp / "out.lock").exists()


def test_two_concurrent_merges_to_one_output_give_one_success(models):
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    procs = [subprocess.Popen([sys.executable, "-m", "research.merging", cfg, str(tmp / "out"), "--no-progress"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "another merge" in loser or "exists" in loser
    read_out(str(tmp / "out"))  # the winner's output is complete


def _start_slow_merge(tmp_path, layers=24, d=256):
    """A merge of many small shards in a subprocess, returned once it has written two
    (``layers`` of width ``d``: 24 of 256 merge in about a second)."""
    base = make_ckpt(tmp_path / "base", 0, layers=layers, d=d, vocab=512)
    for i in range(2):
        make_ckpt(tmp_path / f"ft{i}", i + 1, layers=layers, d=d, vocab=512, base=base)
    cfg = write_cfg(tmp_path, "merge_method: ties\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\n"
                              "parameters: {density: 0.2}\n")
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    cmd = interruptible.command("research.merging", cfg, tmp_path / "out", "--shard-size", "100KB", "--no-progress")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        tmps = [d for d in os.listdir(tmp_path) if d.startswith("out.tmp-")]
        if tmps and len(os.listdir(tmp_path / tmps[0])) >= 2:
            break
        time.sleep(0.05)
    return cfg, proc


def test_a_killed_merge_leaves_only_a_temporary_that_the_next_run_removes(tmp_path):
    cfg, proc = _start_slow_merge(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not (tmp_path / "out").exists()  # nothing that looks finished
    stale = [d for d in os.listdir(tmp_path) if d.startswith("out.tmp-")]
    assert stale and stale[0].startswith(f"out.tmp-{proc.pid}-")  # the dead run's pid is in the name
    assert "model.safetensors.index.json" not in os.listdir(tmp_path / stale[0])
    r = cli(cfg, str(tmp_path / "out"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert f"removed {tmp_path / stale[0]}" in r.stderr and f"pid {proc.pid}" in r.stderr
    assert [d for d in os.listdir(tmp_path) if d.startswith("out.")] == []
    read_out(str(tmp_path / "out"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_stops_a_merge_in_one_line_leaving_nothing(tmp_path, sig):
    """``kill`` (or a batch system's time limit) and Ctrl-C unwind the merge: its
    temporary output and lock are removed, it says so in one line, and exits
    128 + the signal's number, as a shell reports a process the signal ended."""
    _, proc = _start_slow_merge(tmp_path, layers=600, d=64)  # 1200 tensors: seconds of work left to stop
    assert proc.poll() is None, "the merge ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert lines[-1] == f"error: stopped by {signal.Signals(sig).name}; no partial output is left", err
    assert "Traceback" not in err
    assert [d for d in os.listdir(tmp_path) if d.startswith("out")] == []


def test_a_dead_run_s_leftover_counts_as_room_and_is_removed(models, main, monkeypatch):
    """The space a killed run's temporary holds is freed before the merge writes: a
    disk that is full only of it is not refused."""
    from research import safetensors_io
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    stale = tmp / "out.tmp-999999-deadbeef"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(os.urandom(1 << 20))
    real = shutil.disk_usage
    monkeypatch.setattr(safetensors_io.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    rc, err = main(cfg, str(tmp / "out"))
    assert rc == 0, err
    assert f"removed {stale}: the leftover of an interrupted merge (pid 999999" in err
    assert not stale.exists()
    read_out(str(tmp / "out"))


def test_too_little_free_space_is_found_before_the_merge_starts(models, main, monkeypatch):
    """The output's size is known from the headers: a disk without room for it is an
    error before any tensor is read, naming the sizes, with nothing left behind."""
    from research import safetensors_io
    from research.merging.stream import engine
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    real = shutil.disk_usage
    monkeypatch.setattr(safetensors_io.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    reads = []
    monkeypatch.setattr(engine, "_merge_into", lambda *a: reads.append(a))
    _fails(main(cfg, str(tmp / "new" / "out")), f"{tmp / 'new' / 'out'}: needs 0.00 GiB, but {tmp} has 0.00 GiB free; "
                                                "free some space")
    assert not reads and not (tmp / "new").exists()


def test_a_disk_that_fills_during_the_merge_is_named_and_leaves_nothing(models, main, monkeypatch):
    import errno

    from research.safetensors_io import ShardWriter
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    real, written = ShardWriter.add, []

    def add(self, name, arr):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        return real(self, name, arr)

    monkeypatch.setattr(ShardWriter, "add", add)
    _fails(main(cfg, str(tmp / "out")), f"{tmp / 'out'}: No space left on device; the partial output was removed")
    assert len(written) == 3 and sorted(os.listdir(tmp)) == ["base", "cfg.yaml", "ft0", "ft1", "ft2"]


def test_force_never_replaces_an_input(models, main):
    tmp, base, _ = models
    cfg = write_cfg(tmp, TIES)
    before = read_out(str(tmp / "base"))
    _fails(main(cfg, str(tmp / "base"), "--force"), "is, or contains, the input")
    _fails(main(cfg, str(tmp), "--force"), "is, or contains, the input")
    after = read_out(str(tmp / "base"))
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_force_replaces_an_existing_output_whole(models, main):
    tmp, *_ = models
    cfg = write_cfg(tmp, TIES)
    os.makedirs(tmp / "out")
    (tmp / "out" / "stale.txt").write_text("old")
    assert main(cfg, str(tmp / "out"), "--force")[0] == 0
    assert not (tmp / "out" / "stale.txt").exists()
    assert [d for d in os.listdir(tmp) if d.startswith("out.")] == []


def test_the_written_merge_config_reruns_from_anywhere(models, tmp_path_factory):
    tmp, *_ = models
    text = TIES.replace("merge_method: ties", "merge_method: dare_ties")
    first = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "first"), seed=3, progress=False)
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copy(os.path.join(first, "merge_config.yaml"), elsewhere / "again.yaml")
    assert "--seed 3" in (elsewhere / "again.yaml").read_text()
    r = cli(str(elsewhere / "again.yaml"), str(elsewhere / "second"), "--seed", "3", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = read_out(first), read_out(str(elsewhere / "second"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("edit, match", [
    (("density: 0.3}\n  - model: ft2", "density: 1.5}\n  - model: ft2"), "'density' must be in (0, 1], got 1.5"),
    (("merge_method: ties", "merge_method: della"), "density +/- epsilon must lie in (0, 1)"),
    (("weight: 0.5", "weight: abc"), "must be a number, got 'abc'"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\ndtype: float8"), "dtype 'float8' is not supported"),
    (("weight: 0.5, density: 0.3", "weight: 0.5, densty: 0.3"), "unknown parameter 'densty'"),
    (("weight: 0.5, density: 0.3", "weight: 0.5, density: 0.3, trim: global"), "one value for the whole merge"),
    (("weight: 0.5, density: 0.3", "weight: 0.5, density: 0.3, gamma: 0.1"), "parameter 'gamma' applies to breadcrumbs"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\ntokenizer_source: union"), "union"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\nchat_template: llama3"),
     "chat_template 'llama3' is not a template shipped here (chatml) or 'auto'"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\nchat_template: '{% for m in messages %}'"),
     "cfg.yaml:12: chat template: Unexpected end of template"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\nchat_template: chatml"),
     "chat_template: the output gets no tokenizer files"),
    (("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\ntokenizer: {source: base, tokens: {x: 1}}"),
     "tokenizer.tokens (tokens added to or embedding rows padded in the output) is not supported"),
])
def test_dry_run_refuses_what_the_merge_would_refuse(models, main, edit, match):
    tmp, *_ = models
    text = TIES.replace(*edit)
    if "della" in text:
        text = text.replace("density: 0.3", "density: 0.9").replace("{lambda: 0.8}", "{lambda: 0.8, epsilon: 0.2}")
    assert text != TIES
    cfg = write_cfg(tmp, text)
    for extra in (["--dry-run"], []):
        _fails(main(cfg, str(tmp / "out"), *extra), match)
        assert [d for d in os.listdir(tmp) if d.startswith("out")] == []


def test_linear_with_weights_summing_to_zero_and_normalize_is_an_error(models, main):
    tmp, *_ = models
    text = "merge_method: linear\nmodels:\n  - model: ft0\n    parameters: {weight: 0}\n  - model: ft1\n" \
           "    parameters: {weight: 0}\nparameters: {normalize: true}\n"
    _fails(main(write_cfg(tmp, text), str(tmp / "out"), "--dry-run"), "sum to 0")
    _fails(main(write_cfg(tmp, text), str(tmp / "out")), "sum to 0")


def test_a_chat_template_replaces_the_tokenizer_files_own(models):
    """Named (chatml), written as Jinja, or ``auto``: the template most inputs have,
    read from ``chat_template.jinja`` over ``tokenizer_config.json`` as transformers
    reads it.  It goes where the copied tokenizer keeps its template."""
    from research.data import tokenizers
    from research.merging.stream.config import CHAT_TEMPLATES
    tmp, *_ = models
    for d in ("base", "ft0", "ft1", "ft2"):
        (tmp / d / "tokenizer.json").write_text("{}")
        (tmp / d / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'old' }}", "eos_token": "e"}))
    (tmp / "ft0" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'ft' }}"}))
    (tmp / "ft1" / "chat_template.jinja").write_text("{{ 'ft' }}")
    (tmp / "ft2" / "chat_template.jinja").write_text("{{ 'ft' }}\n")
    out = stream.run(stream.load(write_cfg(tmp, TIES + "chat_template: auto\n")), str(tmp / "auto"), progress=False)
    tc = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tc == {"chat_template": "{{ 'ft' }}", "eos_token": "e"}  # 3 of the 4 inputs' (stripped), not the base's
    assert not os.path.exists(os.path.join(out, "chat_template.jinja")) and tokenizers.chat_template(out) == "{{ 'ft' }}"
    # the base (the first input, whose files the output gets) keeps its template in chat_template.jinja
    (tmp / "base" / "chat_template.jinja").write_text("{{ 'base' }}")
    out = stream.run(stream.load(write_cfg(tmp, TIES + "chat_template: chatml\n")), str(tmp / "named"), progress=False)
    assert open(os.path.join(out, "chat_template.jinja")).read() == CHAT_TEMPLATES["chatml"]
    assert tokenizers.chat_template(out) == CHAT_TEMPLATES["chatml"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = stream.run(stream.load(write_cfg(tmp, TIES + f"chat_template: \"{jinja}\"\ntokenizer: {{source: ft0}}\n")),
                     str(tmp / "text"), progress=False)
    assert tokenizers.chat_template(out) == jinja and not os.path.exists(os.path.join(out, "chat_template.jinja"))
    r = cli(write_cfg(tmp, TIES + "chat_template: auto\n"), str(tmp / "dry"), "--dry-run")
    assert "chat_template: auto: the one most inputs have" in r.stdout, r.stderr


def test_output_metadata_dtype_tokenizer_and_permissions(models):
    tmp, *_ = models
    for d in ("base", "ft0"):
        (tmp / d / "tokenizer.json").write_text(json.dumps({"from": d}))
        (tmp / d / "tokenizer_config.json").write_text("{}")
    text = TIES.replace("parameters: {lambda: 0.8}", "parameters: {lambda: 0.8}\nout_dtype: bfloat16\ndtype: float32")
    (tmp / "base" / "config.json").write_text(json.dumps({"num_hidden_layers": 3, "torch_dtype": "float32",
                                                          "vocab_size": 32}))
    old = os.umask(0o022)
    try:
        out = stream.run(stream.load(write_cfg(tmp, text)), str(tmp / "o1"), progress=False)
    finally:
        os.umask(old)
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    assert json.load(open(os.path.join(out, "tokenizer.json"))) == {"from": "base"}  # the base's by default
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    assert os.stat(out).st_mode & 0o777 == 0o755
    out = stream.run(stream.load(write_cfg(tmp, text + "tokenizer_source: ft0\n")), str(tmp / "o2"), progress=False)
    assert json.load(open(os.path.join(out, "tokenizer.json"))) == {"from": "ft0"}
    os.remove(tmp / "ft1" / "config.json")
    with pytest.raises(stream.MergeFailed, match="no tokenizer files"):
        stream.run(stream.load(write_cfg(tmp, text + "tokenizer_source: ft1\n")), str(tmp / "o3"), progress=False)


def test_a_signal_started_ignored_stays_ignored_as_nohup_asks():
    """``nohup research-merge ...`` (or ``research.train``) ignores SIGHUP so that the run
    outlives its terminal: the stop handlers leave an ignored signal ignored."""
    from research import stop_signals

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with stop_signals.raising():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
