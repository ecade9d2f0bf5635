"""The embedded suite's committed base (``experiments/suite_base``): it is what its
``pretraining.json`` says, it is general on its format tasks and weak on every
target, and ``quickstart.py`` refuses a base that does not match its config."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"))
import quickstart  # noqa: E402
from research.data import suite  # noqa: E402

BASE = quickstart.DEFAULT_BASE


@pytest.fixture(scope="module")
def base():
    return quickstart.load_base(quickstart.QuickstartConfig(), BASE)


def test_committed_base_matches_the_demo_config_and_its_recorded_weights(base):
    info = base["pretraining"]
    assert info["config"] == quickstart.pretraining_spec(quickstart.QuickstartConfig())
    assert info["steps"] == quickstart.QuickstartConfig().pretrain_steps
    assert info["command"].startswith("python experiments/pretrain_base.py")


def test_committed_base_solves_its_format_tasks_and_no_target(base):
    q = quickstart.QuickstartConfig(val_samples=16)
    acc, _ = quickstart.Evaluator(q, base["graphdef"])(base["params"], [*suite.FORMAT_TASKS, *q.candidates], "val")
    for t in suite.FORMAT_TASKS:
        assert acc[t] >= 0.9, (t, acc[t])
    for t in q.candidates:
        assert acc[t] <= q.gates.base_max, (t, acc[t])


def test_a_base_pretrained_otherwise_is_refused_naming_the_field(tmp_path, base):
    other = tmp_path / "base"
    shutil.copytree(BASE, other)
    info = json.loads((other / "pretraining.json").read_text())
    info["config"]["pretrain_steps"] = 400
    (other / "pretraining.json").write_text(json.dumps(info))
    with pytest.raises(SystemExit, match="pretrain_steps=400; this run has pretrain_steps=2000"):
        quickstart.load_base(quickstart.QuickstartConfig(), str(other))
    q400 = quickstart.override(quickstart.QuickstartConfig(), ["pretrain_steps=400"])
    quickstart.load_base(q400, str(other))  # the matching config takes it


def test_changed_weights_are_refused(tmp_path, base):
    other = tmp_path / "base"
    shutil.copytree(BASE, other)
    (f,) = [p for p in os.listdir(other) if p.endswith(".safetensors")]
    tensors = load_file(str(other / f))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] += 1e-3
    save_file(tensors, str(other / f), metadata={"format": "pt"})
    with pytest.raises(SystemExit, match="do not match params_sha256"):
        quickstart.load_base(quickstart.QuickstartConfig(), str(other))


def test_a_directory_without_pretraining_json_is_not_a_base(tmp_path):
    with pytest.raises(SystemExit, match="not a suite base .* python experiments/pretrain_base.py --out"):
        quickstart.load_base(quickstart.QuickstartConfig(), str(tmp_path))


def test_set_overrides_parse_by_field_type():
    q = quickstart.override(quickstart.QuickstartConfig(), ["candidates=first,last", "finetune_lr=1e-3",
                                                            "finetune_steps=50", "densities=0.5", "model=tiny"])
    assert q.candidates == ("first", "last") and q.finetune_lr == 1e-3 and q.finetune_steps == 50
    assert q.densities == (0.5,) and q.model == "tiny"
    for bad, msg in (("nope=1", "FIELD one of"), ("finetune_steps=1.5", "takes an integer"),
                     ("finetune_lr=fast", "takes a number"), ("finetune_steps", "FIELD=VALUE")):
        with pytest.raises(SystemExit, match=msg):
            quickstart.override(quickstart.QuickstartConfig(), [bad])


def test_pretrain_script_refuses_to_replace_a_base(tmp_path):
    out = tmp_path / "base"
    out.mkdir()
    proc = subprocess.run([sys.executable, "experiments/pretrain_base.py", "--tiny", "--out", str(out),
                           "--workdir", str(tmp_path / "run")], cwd=quickstart.ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and f"{out} exists: pass --force" in proc.stderr
    assert not (tmp_path / "run").exists()
