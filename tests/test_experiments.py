"""Every experiment script and notebook runs, at a tiny scale (the full-scale
figures are in the README, produced by the commands in each script's docstring)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, env=None):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_merge_demo_prints_the_table():
    out = _run(["experiments/merge_demo.py"])
    assert "| ties " in out and "avg normalised" in out


def test_bench_merge_core_smoke():
    out = _run(["experiments/bench_merge_core.py", "--params", "2e6", "--methods", "linear", "ties", "dare_ties"])
    assert "| ties |" in out and "floor" in out


def test_bench_packing_smoke():
    out = _run(["experiments/bench_packing.py", "--n", "5000", "--grain-n", "300"])
    assert "ours `bfd` (plan)" in out and "BestFitPackIterDataset" in out


def test_bench_attention_smoke():
    out = _run(["experiments/bench_attention.py", "--seq", "256", "--block", "32"])
    assert "| blockwise |" in out


def test_bench_train_step_smoke():
    out = _run(["experiments/bench_train_step.py", "--samples", "6", "--seq", "512", "--batch", "3"])
    assert "packed, blockwise attention" in out


def test_quickstart_tiny_writes_results(tmp_path):
    out = _run(["experiments/quickstart.py", "--tiny", "--out", str(tmp_path / "qs")])
    assert "[6/6]" in out
    res = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert set(res["models"]) >= {"base", "linear", "task_arithmetic", "ties", "dare_ties"}
    assert all(f"finetuned/{t}" in res["models"] for t in res["tasks"])
    assert "accuracy" in res["models"]["ties"] and "avg_normalized_accuracy" in res["models"]["ties"]
    assert (tmp_path / "qs" / "merge_table.png").stat().st_size > 1000
    assert set(res["stage_seconds"]) == {"pretrain", "finetune", "task_vectors", "merge", "evaluate"}


def test_notebook_executes(tmp_path):
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    os.environ["NOTEBOOK_STEPS"] = "8"
    os.environ["NOTEBOOK_OUT"] = str(tmp_path / "nb")
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    finally:
        os.environ.pop("NOTEBOOK_STEPS")
        os.environ.pop("NOTEBOOK_OUT")
    assert (tmp_path / "nb" / "landscape.png").exists()


def test_notebook_pair_is_in_sync():
    import jupytext

    py = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    ipynb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]


def test_bench_merge_io_smoke():
    out = _run(["experiments/bench_merge_io.py", "--scale", "0.003", "--methods", "linear", "ties", "della", "slerp", "--rounds", "1"])
    assert "(floor)" in out and "| ties |" in out and "| della |" in out and "| slerp |" in out
