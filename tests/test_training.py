"""The training loop: sharded == single device, exact resume, failure handling."""

import dataclasses
import errno
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from research.data.tasks import UnknownTaskError
from research.training import TrainConfig, TrainingDiverged, config as config_lib, train
from research.training.checkpoint import CheckpointMismatch, Checkpointer

BASE = TrainConfig(model="tiny", tasks=("copy", "reverse"), seq_len=64, batch_size=8, chunk_size=16, steps=6,
                   warmup_steps=2, save_every=3, keep=3, log_every=1, eval_samples=2, max_new_tokens=4,
                   neftune_alpha=5.0, progress=False)


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


def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"at step \d+.*last good checkpoint is step \d+"):
        _run(tmp_path, "nan", lr=1e30, save_every=1, steps=50, clip_norm=1e30, warmup_steps=1)
    ck = Checkpointer(str(tmp_path / "nan" / "checkpoints"), save_every=1, keep=3)
    assert ck.latest() is not None
    ck.close()


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
    _run(tmp_path, "shape", steps=3)
    with pytest.raises(CheckpointMismatch, match="has shape"):
        _run(tmp_path, "shape", steps=6, model_overrides=(("d_model", 48), ("n_heads", 4)))


def test_disk_full_while_saving_is_reported_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    _run(tmp_path, "disk", stop_at=3)
    import orbax.checkpoint as ocp

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", full)
    with pytest.raises(OSError, match="out of disk space while saving step 6.*step 3.*intact"):
        _run(tmp_path, "disk")
    monkeypatch.undo()
    ck = Checkpointer(str(tmp_path / "disk" / "checkpoints"), save_every=1, keep=3)
    assert ck.latest() == 3
    ck.close()


def test_unknown_task_and_config_key_are_named(tmp_path):
    with pytest.raises(UnknownTaskError, match="unknown task 'nope'"):
        _run(tmp_path, "t", tasks=("copy", "nope"))
    with pytest.raises(config_lib.ConfigError, match="unknown config key 'learning_rate'"):
        config_lib.override(BASE, ["learning_rate=1e-4"])
    assert config_lib.override(BASE, ["lr=1e-4", "tasks=('add',)", "neftune_alpha=0"]).lr == 1e-4


def test_cli_overrides_and_ctrl_c_saves_a_checkpoint(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "research.train", "--config", "experiments/configs/tiny.py", "--workdir", str(tmp_path / "w"),
           "--set", "steps=100000", "--set", "save_every=0", "--set", "progress=False"]
    bad = subprocess.run(cmd + ["--set", "lr_typo=1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown config key 'lr_typo'" in bad.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    logs = tmp_path / "w" / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while not logs.exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted: saved step" in out
    ck = Checkpointer(str(tmp_path / "w" / "checkpoints"), save_every=1, keep=2)
    assert ck.latest() and ck.latest() > 0
    ck.close()
