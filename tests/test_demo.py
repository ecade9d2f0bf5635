"""The demo (``experiments/quickstart.py --tiny``) runs at a tiny scale and writes the
``results.json`` schema (in a file of its own: the longest test goes to a test
worker of its own)."""

import json

from test_experiments import _run


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
