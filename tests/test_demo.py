"""The demo (``experiments/quickstart.py --tiny``) and the loss-landscape notebook run
at a tiny scale (apart from the benches' smoke tests, so that the two longest
script runs can go to different test workers)."""

import json
import os

from test_experiments import ROOT, _run


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
    assert res["base"]["pretraining"]["config"]["model"] == "tiny" and res["base"]["pretraining"]["params_sha256"]
    assert set(res["chance"]) == set(res["tasks"]) and all(0 < c <= 1 for c in res["chance"].values())
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
    assert {"all", "attention", "mlp", "norms", "layer 0", "layer 1"} == set(d["interference"])
    assert all(set(v) == set(res["tasks"]) for v in d["interference"].values())
    assert set(d["merge_size_curve"]["task_arithmetic"]) == {str(k) for k in range(1, len(res["tasks"]) + 1)}
    assert set(d["trimmed_expert"]) == set(res["tasks"])
    search = res["search"]["0"]["ties"]
    assert set(search["grid"]) == {"lam", "density"} and "extensions" in search
    assert res["search"]["0"]["task_arithmetic"]["extensions"]  # a two-point grid has its optimum on an edge
    assert (tmp_path / "qs" / "merge_table.png").stat().st_size > 1000


def test_notebook_executes(tmp_path):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    small = {"NOTEBOOK_STEPS": "8", "NOTEBOOK_GRID": "3", "NOTEBOOK_SAMPLES": "8", "NOTEBOOK_OUT": str(tmp_path / "nb")}
    os.environ.update(small)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k in small:
            os.environ.pop(k)
    assert (tmp_path / "nb" / "landscape.png").exists()


def test_notebook_pair_is_in_sync():
    import jupytext

    py = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    ipynb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]
