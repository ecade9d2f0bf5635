"""Multi-process training on loopback: 2 processes x 4 CPU devices against 1 process x 8.

Each worker is ``python -m research.train`` with ``--coordinator 127.0.0.1:PORT``,
its own ``--process-id`` and ``JAX_NUM_CPU_DEVICES=4``; cross-process
collectives go through gloo.  The reference runs in this test process, which
has 8 fake CPU devices (conftest), on the same (2, 2, 2) mesh.
"""

import csv
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from research.training import TrainConfig, train
from research.training.checkpoint import Checkpointer

CFG = TrainConfig(model="tiny", tasks=("copy", "reverse"), seq_len=64, batch_size=8, chunk_size=16, steps=4,
                  warmup_steps=2, save_every=2, keep=3, log_every=1, eval_samples=2, max_new_tokens=4,
                  neftune_alpha=5.0, mesh=(2, 2, 2), progress=False)
FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config_file(tmp_path, cfg: TrainConfig) -> str:
    path = tmp_path / "mh_config.py"
    kwargs = {k: getattr(cfg, k) for k in FIELDS}
    path.write_text(textwrap.dedent(f"""
        from research.training import TrainConfig

        def get_config():
            return TrainConfig(**{kwargs!r})
    """))
    return str(path)


def _launch(tmp_path, workdir, *extra, n=2, devices=4, heartbeat=100, cfg=CFG):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    port, config = _free_port(), _config_file(tmp_path, cfg)
    return [subprocess.Popen(
        [sys.executable, "-m", "research.train", "--config", config, "--workdir", str(workdir), *extra,
         "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(i),
         "--heartbeat-timeout", str(heartbeat)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]


def _finish(procs, timeout=240):
    outs = [p.communicate(timeout=timeout) for p in procs]
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{err[-3000:]}"
    return outs


def _losses(workdir):
    with open(os.path.join(workdir, "logs", "metrics.csv")) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")}


def _params_at(workdir, step, like):
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=0, keep=1, async_save=False)
    try:
        return jax.device_get(ck.restore_params(step, like))
    finally:
        ck.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 4-step run: 1 process, 8 devices, the same mesh."""
    res = train(CFG, str(tmp_path_factory.mktemp("one_process")), evaluate_at_end=False)
    return res, [h["loss"] for h in res.history]


def _assert_params_close(got, want, atol):
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


# Cross-process reductions run in gloo, in-process ones in XLA:CPU; their summation
# orders differ, so the runs agree to float32 rounding, not bitwise.
ATOL = 1e-6


def test_two_processes_train_what_one_process_trains_and_their_checkpoint_resumes_in_one(tmp_path, reference):
    ref, ref_losses = reference
    workdir = tmp_path / "two"
    outs = _finish(_launch(tmp_path, workdir))
    assert '"step": 4' in outs[0][0] and '"step"' not in outs[1][0]  # only process 0 reports
    losses = _losses(workdir)
    np.testing.assert_allclose([losses[s] for s in (1, 2, 3, 4)], ref_losses, rtol=0, atol=ATOL)
    _assert_params_close(_params_at(workdir, 4, ref.params), jax.device_get(ref.params), ATOL)
    assert not os.path.exists(workdir / "logs" / "metrics.csv.tmp")

    # the step-2 checkpoint the two processes wrote, resumed by this process alone (8 devices)
    resumed = tmp_path / "resumed"
    shutil.copytree(workdir, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert Checkpointer(str(resumed / "checkpoints"), save_every=0, keep=1, async_save=False).latest() == 2
    res = train(CFG, str(resumed), evaluate_at_end=False)
    assert res.step == 4
    np.testing.assert_allclose([h["loss"] for h in res.history], ref_losses[2:], rtol=0, atol=ATOL)
    _assert_params_close(jax.device_get(res.params), jax.device_get(ref.params), ATOL)


def test_a_process_that_dies_stops_the_others_naming_it(tmp_path):
    workdir = tmp_path / "dies"
    procs = _launch(tmp_path, workdir, heartbeat=3, cfg=dataclasses.replace(CFG, steps=100_000, save_every=0))
    metrics = workdir / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):  # training is under way
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].kill()
    t0 = time.time()
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0 and time.time() - t0 < 60
    assert "unhealthy" in err and "stopped sending heartbeats" in err, err[-3000:]
    assert "\n1\n" in err.split("stopped sending heartbeats")[-1][:40], err[-3000:]  # names process 1


def test_sigterm_to_one_process_stops_both_at_one_step_after_a_save(tmp_path):
    """A signal that reaches one process (a preempted host, ``kill`` on one of them)
    stops every process at the same step boundary, where they save together."""
    workdir = tmp_path / "term"
    procs = _launch(tmp_path, workdir, cfg=dataclasses.replace(CFG, steps=100_000, save_every=0))
    metrics = workdir / "logs" / "metrics.csv"
    deadline = time.time() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):  # training is under way
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, [err[-3000:] for _, err in outs]
    saved = re.search(r"interrupted \(SIGTERM\): saved step (\d+)", outs[0][0])
    assert saved, outs[0][0][-3000:]
    assert "saved step" not in outs[1][0]  # only process 0 reports
    ck = Checkpointer(str(workdir / "checkpoints"), save_every=0, keep=1, async_save=False)
    assert ck.latest() == int(saved.group(1)) > 0
    ck.close()
