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
    out = _run(["experiments/bench_train_step.py", "--samples", "4", "--seq", "256", "--batch", "2"])
    assert "packed, blockwise attention" in out


def test_quickstart_tiny_writes_the_results_schema(tmp_path):
    out = _run(["experiments/quickstart.py", "--tiny", "--seeds", "2", "--out", str(tmp_path / "qs"),
                "--results", str(tmp_path / "three.json")], env={"TERM": "dumb"})
    assert "gates (val)" in out and "paper:" in out and "NEFTune control" in out
    assert "it/s" not in out  # not a terminal: one line per stage, no progress-bar updates
    res = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert res == json.loads((tmp_path / "three.json").read_text()) and (tmp_path / "three.png").exists()
    names = {"base", "multitask", "linear", "task_arithmetic", "ties", "ties_global", "dare_ties", "dare_linear"}
    assert set(res["models"]) == names | {f"finetuned/{t}" for t in res["tasks"]}
    for r in res["models"].values():
        assert set(r["accuracy"]) == set(r["accuracy_std"]) == set(res["tasks"])
        assert {"avg_normalized_accuracy", "avg_normalized_accuracy_std"} <= set(r)
    assert res["seeds"] == [0, 1]
    assert {"chosen_hyperparameters", "gates", "diagnostics", "stage_seconds", "config", "neftune", "claims"} <= set(res)
    assert "ties > task_arithmetic" in {c["claim"] for c in res["claims"]}
    assert set(res["neftune"]["mean_val_loss_by_alpha"]) == {"0", "1"}
    for t in res["tasks"]:
        assert res["gates"][t]["passed"] and set(res["gates"][t]["per_seed"]) == {"0", "1"}
    d = res["diagnostics"]["0"]
    assert set(d["relative_norm"]) == set(res["tasks"]) and len(d["cosine"]) == len(res["tasks"])
    pair = next(iter(d["kept_sign_conflicts"].values()))
    assert {"conflict_rate", "chance_conflict_rate", "overlap", "chance_overlap"} == set(pair)
    assert set(d["ties_election_discards"]) == set(res["tasks"])
    assert set(d["scale_curve"]) == set(res["tasks"]) and set(d["scale_curve"][res["tasks"][0]]) == {"0.25", "0.5", "0.75", "1"}
    assert set(d["format_retention"]) == {"base", *res["tasks"]}
    assert set(d["merge_size_curve"]["ties"]) == {str(k) for k in range(1, len(res["tasks"]) + 1)}
    search = res["search"]["0"]["ties"]
    assert set(search["grid"]) == {"lam", "density"} and "extensions" in search
    assert res["search"]["0"]["task_arithmetic"]["extensions"]  # a two-point grid has its optimum on an edge
    assert (tmp_path / "qs" / "merge_table.png").stat().st_size > 1000


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


def test_plan_memory_compiles_ahead_of_time_on_fake_devices():
    out = _run(["experiments/plan_memory.py", "--preset", "tiny", "--mesh", "2,2,2", "--seq", "64", "--batch", "8",
                "--remat", "full"])
    assert "remat full; mesh data,fsdp,tensor = 2,2,2" in out and "per device: arguments" in out
    assert "temporaries" in out and "compile" in out
    assert "(2 layers, loop)" in out and "(2 layers, scan)" in out  # both layouts, each compiled
    lora = _run(["experiments/plan_memory.py", "--preset", "tiny", "--mesh", "1,2,1", "--seq", "32", "--batch", "2",
                 "--layouts", "scan", "--param-dtype", "bfloat16", "--lora-rank", "4", "--lora-targets", "q_proj,v_proj"])
    # adapters alone are trained: 2 layers x (q: 32x4 + 4x32, v: 32x4 + 4x16)
    assert "LoRA r=4 on q_proj,v_proj: 896 float32 adapter entries trained" in lora, lora
