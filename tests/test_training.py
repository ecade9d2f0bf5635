"""The training loop: sharded == single device, exact resume, failure handling."""

import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

import interruptible
from research.training import TrainConfig, TrainingDiverged, config as config_lib, train
from research.training.checkpoint import CheckpointMismatch, Checkpointer, CheckpointSaveError
from research.training.run_config import ResumeMismatch

BASE = TrainConfig(model="tiny", tasks=("copy", "reverse"), seq_len=64, batch_size=8, chunk_size=16, steps=6,
                   warmup_steps=2, save_every=3, keep=3, log_every=1, eval_samples=2, max_new_tokens=4,
                   neftune_alpha=5.0, mesh=(1, 1, 1), progress=False)  # one device; the mesh tests set theirs


def _run(tmp, name, **kw):
    stop_at = kw.pop("stop_at", None)
    cfg = dataclasses.replace(BASE, **kw)
    return train(cfg, str(tmp / name), stop_at=stop_at, evaluate_at_end=False)


def test_three_steps_on_8_devices_match_one_device(tmp_path):
    one = _run(tmp_path, "one", steps=3, mesh=(1, 1, 1), save_every=0)
    eight = _run(tmp_path, "eight", steps=3, mesh=(2, 2, 2), save_every=0)
    assert jax.device_count() == 8
    np.testing.assert_allclose([h["loss"] for h in eight.history], [h["loss"] for h in one.history], rtol=2e-5)


def test_resume_is_bitwise_exact(tmp_path):
    straight = _run(tmp_path, "straight")
    _run(tmp_path, "resumed", stop_at=3)  # "the process stops" at step 3
    resumed = _run(tmp_path, "resumed")  # a fresh trainer picks up the checkpoint
    assert resumed.step == 6 and len(resumed.history) == 3
    chex.assert_trees_all_equal(jax.device_get(straight.params), jax.device_get(resumed.params))


def test_resume_on_another_mesh_reshards(tmp_path):
    _run(tmp_path, "r", stop_at=3, mesh=(8, 1, 1))
    res = _run(tmp_path, "r", mesh=(2, 2, 2))
    assert res.step == 6
    q = res.params["layers"][0]["attn"]["q_proj"].get_value()
    assert "tensor" in str(q.sharding.spec)


def test_divergence_stops_before_saving_and_the_last_good_checkpoint_is_finite(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step (\d+): loss .*last good checkpoint is step (\d+)") as e:
        _run(tmp_path, "nan", lr=1e30, save_every=1, steps=50, clip_norm=1e30, warmup_steps=1)
    import re

    bad, good = map(int, re.search(r"step (\d+):.*step (\d+) in", str(e.value)).groups())
    assert good < bad
    ck = Checkpointer(str(tmp_path / "nan" / "checkpoints"), save_every=1, keep=3)
    assert ck.latest() == good
    template = _run(tmp_path, "shape_only", steps=1).params
    params = ck.restore_params(good, template)
    ck.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_fresh_start_moves_the_old_runs_checkpoints_aside(tmp_path, capsys):
    first = _run(tmp_path, "fresh", steps=3, save_every=3)
    second = train(dataclasses.replace(BASE, steps=3, save_every=3, lr=1e-2), str(tmp_path / "fresh"), resume=False,
                   evaluate_at_end=False)
    assert "were moved to" in capsys.readouterr().out
    aside = [d for d in os.listdir(tmp_path / "fresh") if d.startswith("checkpoints.replaced-")]
    assert len(aside) == 1
    ck = Checkpointer(str(tmp_path / "fresh" / "checkpoints"), save_every=3, keep=3)
    saved = ck.restore_params(3, second.params)
    ck.close()
    chex.assert_trees_all_equal(saved, second.params)  # the new run's weights, not the old one's
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(first.params, second.params)


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    _run(tmp_path, "shape", steps=3)
    other = dataclasses.replace(BASE, steps=6, model_overrides=(("d_model", 48), ("n_heads", 4)))
    with pytest.raises(ResumeMismatch, match="model_overrides"):  # the stored config says so first
        train(other, str(tmp_path / "shape"), evaluate_at_end=False)
    with pytest.raises(CheckpointMismatch, match="has shape"):  # and the checkpoint, when that is overridden
        train(other, str(tmp_path / "shape"), evaluate_at_end=False, override_resume=True)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_checkpoint_is_named_on_resume_in_a_merge_and_an_export(tmp_path, capsys, damage):
    """orbax and tensorstore raise many kinds of error on a step's damaged files; each
    reads as one line naming the directory and the step, whether a run resumes
    from it, a merge reads it or ``research.export`` converts it."""
    import re

    from research.export import main as export_main
    from research.merging.stream.sources import TensorSource
    from research.safetensors_io import CheckpointError

    _run(tmp_path, "run", steps=3)
    meta = tmp_path / "run" / "checkpoints" / "3" / "state" / "_METADATA"
    if damage == "truncate":
        meta.write_bytes(meta.read_bytes()[:100])
    else:
        meta.unlink()
    where = rf"{tmp_path / 'run' / 'checkpoints'} step 3 cannot be read back \(\w+: [^\n]*\); move"
    with pytest.raises(CheckpointMismatch, match=where):
        _run(tmp_path, "run", steps=6)
    with pytest.raises(CheckpointError, match=where):
        TensorSource(str(tmp_path / "run"))
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(where, err[0]) and not (tmp_path / "hf").exists(), err


def test_export_to_a_disk_without_room_is_one_line_before_writing(tmp_path, capsys, monkeypatch):
    import shutil

    from research import safetensors_io
    from research.export import main as export_main

    _run(tmp_path, "run", steps=2, save_every=2)
    real = shutil.disk_usage
    monkeypatch.setattr(safetensors_io.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'hf'}: needs ") and "GiB free" in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_an_export_stopped_by_sigterm_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from research.export import main as export_main
    from research.safetensors_io import ShardWriter

    _run(tmp_path, "run", steps=2, save_every=2)
    real, written = ShardWriter.add, []

    def add(self, name, arr):  # the signal arrives as the third tensor is to be written
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        written.append(name)
        return real(self, name, arr)

    monkeypatch.setattr(ShardWriter, "add", add)
    assert export_main([str(tmp_path / "run"), str(tmp_path / "hf")]) == 128 + signal.SIGTERM
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert err == ["error: stopped by SIGTERM; no partial output is left"], err
    assert len(written) == 2 and sorted(os.listdir(tmp_path)) == ["run"]  # the handler raised in os.kill


def test_disk_full_while_saving_is_reported_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    _run(tmp_path, "disk", stop_at=3)
    import orbax.checkpoint as ocp

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(CheckpointSaveError, match=r"could not save step 6 to .*disk/checkpoints \(out of disk space; "
                                                   r"the checkpoint needs about .* MiB are free\)\. The last complete "
                                                   r"checkpoint is step 3"):
        _run(tmp_path, "disk")
    monkeypatch.undo()
    ck = Checkpointer(str(tmp_path / "disk" / "checkpoints"), save_every=1, keep=3)
    assert ck.latest() == 3
    ck.close()


def test_too_little_free_space_is_found_before_the_save_starts(tmp_path, monkeypatch, capsys):
    from research.train import main
    from research.training import checkpoint

    monkeypatch.setattr(checkpoint, "free_bytes", lambda d: 1000)
    rc = main(["--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w"), "--set", "steps=4",
               "--set", "save_every=2", "--set", "progress=False", "--set", "mesh=(1,1,1)"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "could not save step 2" in err[0] and "1000" not in err[0]
    assert "0.0 MiB are free" in err[0] and "No checkpoint is complete yet" in err[0]
    assert [d for d in os.listdir(tmp_path / "w" / "checkpoints")] == []


def test_a_save_that_fails_in_the_background_is_named_and_its_temporary_removed(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    real = ocp.CheckpointManager.wait_until_finished

    failed = []

    def fails_after_writing(self):
        real(self)
        if not failed and any(s == 6 for s in (self.all_steps() or [])):
            failed.append(6)
            os.makedirs(os.path.join(str(self.directory), "6.orbax-checkpoint-tmp-1"), exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")  # as orbax's write thread reports it

    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", fails_after_writing)
    with pytest.raises(CheckpointSaveError, match="could not save step 6 .*out of disk space"):
        _run(tmp_path, "bg")
    assert not any("orbax-checkpoint-tmp" in d for d in os.listdir(tmp_path / "bg" / "checkpoints"))


def test_stale_orbax_temporaries_are_removed_on_the_next_start(tmp_path, capsys):
    _run(tmp_path, "stale", stop_at=3)
    leftover = tmp_path / "stale" / "checkpoints" / "6.orbax-checkpoint-tmp-1733"
    os.makedirs(leftover / "state")
    _run(tmp_path, "stale")
    assert not leftover.exists() and f"removed {leftover}" in capsys.readouterr().out


def test_resuming_with_a_config_that_changes_the_computation_is_refused(tmp_path, capsys):
    _run(tmp_path, "cfg", stop_at=3)
    stored = json.load(open(tmp_path / "cfg" / "train_config.json"))
    assert stored["lr"] == BASE.lr and stored["tasks"] == list(BASE.tasks)
    with pytest.raises(ResumeMismatch, match=r"lr: 0.003 there, 0.001 now; neftune_alpha: 5.0 there, 0.0 now"):
        _run(tmp_path, "cfg", lr=1e-3, neftune_alpha=0.0)
    with pytest.raises(ResumeMismatch, match=r"tasks: \['copy', 'reverse'\] there, \['copy'\] now"):
        _run(tmp_path, "cfg", tasks=("copy",))
    # reporting and cadence may change, and so may a larger steps (said so)
    r = _run(tmp_path, "cfg", log_every=2, eval_samples=3, steps=8, stop_at=6)
    assert r.step == 6 and "schedule now decays to the new end" in capsys.readouterr().out
    r = train(dataclasses.replace(BASE, steps=8, lr=1e-3), str(tmp_path / "cfg"), override_resume=True,
              evaluate_at_end=False)
    assert r.step == 8 and "with changed lr (--override-resume)" in capsys.readouterr().out
    assert json.load(open(tmp_path / "cfg" / "train_config.json"))["lr"] == 1e-3  # what the run continues with


def test_cli_resume_with_another_lr_names_the_fields(tmp_path, capsys):
    from research.train import main

    args = ["--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w"), "--set", "steps=2",
            "--set", "mesh=(1,1,1)", "--set", "progress=False", "--set", "eval_samples=1", "--set", "max_new_tokens=2"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--set", "lr=1e-3", "--set", "neftune_alpha=0"]) == 2  # checked before any work
    err = capsys.readouterr().err
    assert "lr: " in err and "neftune_alpha: " in err and "--override-resume" in err
    assert main(args + ["--set", "eval_samples=2"]) == 0  # a reporting field may change
    assert "the run is complete at step 2" in capsys.readouterr().out


def test_unknown_task_and_config_key_are_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match="unknown task .nope."):  # checked before any work
        _run(tmp_path, "t", tasks=("copy", "nope"))
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'learning_rate'"):
        config_lib.override(BASE, ["learning_rate=1e-4"])
    assert config_lib.override(BASE, ["lr=1e-4", "tasks=('add',)", "neftune_alpha=0"]).lr == 1e-4


def test_cli_overrides_and_ctrl_c_saves_a_checkpoint(tmp_path):
    """Ctrl-C stops the run at the next step boundary with a save, and exits 130
    (SIGTERM takes the same path: ``test_multihost``)."""
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"], "PYTHONUNBUFFERED": "1"}
    args = ["--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w"), "--set", "steps=100000",
            "--set", "save_every=0", "--set", "progress=False"]
    bad = subprocess.run([sys.executable, "-m", "research.train", *args, "--set", "lr_typo=1"], capture_output=True,
                         text=True, env=env)
    assert bad.returncode == 2 and "unknown config key 'lr_typo'" in bad.stderr
    proc = subprocess.Popen(interruptible.command("research.train", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    logs = tmp_path / "w" / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while not logs.exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted (SIGINT): saved step" in out
    ck = Checkpointer(str(tmp_path / "w" / "checkpoints"), save_every=1, keep=2)
    assert ck.latest() and ck.latest() > 0
    ck.close()


def test_text_lm_source_trains_next_to_tasks_and_is_scored_by_loss(tmp_path):
    r = train(dataclasses.replace(BASE, tasks=("text", "copy"), mixing={"text": 0.5, "copy": 0.5}, steps=3,
                                  task_lengths=(("copy", 3, 6),), eval_samples=4), str(tmp_path / "lm"))
    assert set(r.history[-1]) >= {"loss/text", "loss/copy"}
    assert r.eval["text"]["accuracy"] is None and np.isfinite(r.eval["text"]["loss"])
    assert 0 <= r.eval["copy"]["accuracy"] <= 1


def test_gates_report_each_threshold_with_its_value():
    from research.data.suite import Gates

    g = Gates().check(base_acc=0.1, expert_acc=0.65)
    assert g["base_at_most"] == {"threshold": 0.2, "value": 0.1, "passed": True}
    assert not g["expert_at_least"]["passed"] and g["margin_at_least"]["value"] == pytest.approx(0.55)
    assert all(v["passed"] for v in Gates().check(0.2, 0.7).values())
    assert not Gates().check(0.25, 0.9)["base_at_most"]["passed"]


@pytest.mark.parametrize("assignment, message", [
    ("seq_len=0", "seq_len=0: must be >= 1"), ("batch_size=0", "batch_size=0"), ("tasks=()", "non-empty"),
    ("model=huge", "model='huge': unknown preset"), ("mesh=(64,1,1)", "needs 64 devices"), ("keep=0", "keep=0"),
    ("lr=-1", "lr=-1.0: must be > 0"), ("steps=-5", "steps=-5"), ("neftune_alpha=-1", "neftune_alpha=-1.0"),
    ("tasks=copx", "unknown task 'copx'"), ("b2=1.5", "b2=1.5"),
    ("mixing={'copx': 1.0}", "mixing: 'copx' is not one of tasks"),
    ("mixing={'copy': -1.0, 'reverse': 'x'}", "weights must be finite numbers >= 0"),
    ("mixing={'copy': 0}", "not all 0"),
])
def test_bad_config_values_are_named_before_any_work(assignment, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.override(BASE, [assignment])


def test_set_parses_paths_and_single_task_names():
    cfg = config_lib.override(BASE, ["init_from=/abs/path", "tasks=copy"])
    assert cfg.init_from == "/abs/path" and cfg.tasks == ("copy",)
    assert config_lib.override(BASE, ["init_from=../x"]).init_from == "../x"
    assert config_lib.override(BASE, ["init_from=./x", "init_from=None"]).init_from is None
    assert config_lib.override(BASE, ["tasks=copy,reverse"]).tasks == ("copy", "reverse")
    assert config_lib.override(BASE, ["tasks=('copy', 'sort')"]).tasks == ("copy", "sort")


def test_frozen_parameters_stay_bitwise_and_hold_no_moments(tmp_path):
    base = _run(tmp_path, "base", steps=2, save_every=0)
    ft = _run(tmp_path, "ft", steps=3, save_every=0, init_from=str(tmp_path / "base"), freeze=("embedding", "*norm*"))
    before, after = jax.device_get(base.params), jax.device_get(ft.params)
    np.testing.assert_array_equal(after["embedding"].get_value(), before["embedding"].get_value())
    np.testing.assert_array_equal(after["final_norm"]["scale"].get_value(), before["final_norm"]["scale"].get_value())
    assert not np.array_equal(after["layers"][0]["attn"]["q_proj"].get_value(),
                              before["layers"][0]["attn"]["q_proj"].get_value())
    from research.training.step import make_optimizer

    cfg = dataclasses.replace(BASE, freeze=("embedding",))
    state = make_optimizer(cfg).init(before)
    n_moments = sum(x.size for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0)
    n_params = sum(x.size for x in jax.tree.leaves(before))
    assert n_moments == 2 * (n_params - before["embedding"].get_value().size)  # mu and nu, trainable leaves only


def test_a_freeze_pattern_that_matches_nothing_or_everything_is_named(tmp_path):
    with pytest.raises(config_lib.ConfigError, match=r"freeze: pattern 'embeddings' matches no parameter"):
        _run(tmp_path, "a", steps=1, save_every=0, freeze=("embeddings",))
    with pytest.raises(config_lib.ConfigError, match="freezes every parameter"):
        _run(tmp_path, "b", steps=1, save_every=0, freeze=("*",))
    assert config_lib.override(BASE, ["freeze=embedding"]).freeze == ("embedding",)
