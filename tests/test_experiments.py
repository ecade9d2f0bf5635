"""Every experiment script runs, at a tiny scale (the full-scale
figures are in the README, produced by the commands in each script's docstring)."""

import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, env=None):
    env = {**os.environ, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"], "PYTHONUNBUFFERED": "1", **(env or {})}
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
    out = _run(["experiments/bench_train_step.py", "--samples", "2", "--seq", "256", "--batch", "2"])
    assert "packed, blockwise attention" in out


def test_bench_generate_smoke():
    out = _run(["experiments/bench_generate.py", "--preset", "tiny", "--batch", "2", "--prompt", "8", "--new", "8",
                "--rounds", "1"])
    assert "| ours: `research.generate` (KV cache) |" in out and "agree on" in out


def test_bench_merge_io_smoke(tmp_path):
    work = tmp_path / "w"
    os.makedirs(work / "out")  # as a killed run leaves it: removed, not a failed first run
    out = _run(["experiments/bench_merge_io.py", "--scale", "0.003", "--methods", "ties", "della", "slerp", "--rounds", "1",
                "--also", "no-map", "--warm-gb", "0.05", "--delta", "0.0002", "--dir", str(work)])
    assert f"removing {work}/out, left by an earlier run" in out and not os.path.exists(work / "out")
    assert "each fine-tune's changes ~ N(0, 0.0002)" in out
    assert "(floor)" in out and "(round trip)" in out and "| ties |" in out and "| della |" in out and "| slerp |" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in out.splitlines() if line.startswith("| ")}
    assert "ties `--no-map` (bfloat16)" in out and rows["ties"][-2].strip() and not rows["slerp"][-2].strip()
    assert "`--dry-run` estimate (GB)" in out and all(float(rows[m][5]) > 0.05 for m in ("ties", "della", "slerp"))


def test_the_merge_io_floor_reads_every_input_and_writes_a_byte_copy_of_the_first(tmp_path):
    """The floor the merges are compared to copies bytes, over its 64 MB buffer's edge."""
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import bench_merge_io

    first = os.urandom(1 << 20) * 65 + b"tail"  # 65 MB and 4 bytes: two reads, the second short
    for d, data in (("a", first), ("b", b"other")):
        os.makedirs(tmp_path / d)
        (tmp_path / d / "model-00001-of-00001.safetensors").write_bytes(data)
        (tmp_path / d / "config.json").write_text("{}")
    subprocess.run([sys.executable, "-c", bench_merge_io.COPY, str(tmp_path / "a"), str(tmp_path / "b"),
                    str(tmp_path / "out")], check=True, timeout=120)
    assert os.listdir(tmp_path / "out") == ["model-00001-of-00001.safetensors"]
    assert (tmp_path / "out" / "model-00001-of-00001.safetensors").read_bytes() == first


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


def test_mergekit_parity_runs_against_itself_with_no_difference(tmp_path):
    """The parity script, with research-merge standing in for mergekit (which needs
    PyTorch, not installed here): every entry of both cases agrees, and the table is written."""
    table = tmp_path / "parity.md"
    out = _run(["experiments/mergekit_parity.py", "--tiny", "--write", str(table),
                "--mergekit", f"{sys.executable} -m research.merging --no-progress"])
    assert "| ties | float32 | 0 of 213568 (0.00%) | 0 | 0 | 0 | same |" in out
    assert "| passthrough slices, filtered scale | float32 | 0 of 256704 (0.00%) | 0 | 0 | - | same |" in out
    assert table.read_text().startswith("# research-merge against ") and "--tiny" in table.read_text()


def test_mergekit_functions_script_our_side_keeps_della_entries_by_their_axis_1_rank(tmp_path):
    """The 3-D function check without mergekit (not installed here): its table is written,
    and our DELLA's keep share per decile of the magnitude rank along axis 1 follows
    ``density - epsilon + 2 epsilon rank / (n - 1)`` (it would stay flat at the density
    were the ranks taken along another axis)."""
    table = tmp_path / "functions.md"
    out = _run(["experiments/mergekit_functions.py", "--mergekit-python", "none", "--draws", "40",
                "--write", str(table)])
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and line.count("|") == 5
            and line.split("|")[3].strip() == "nan"]
    expect, ours = [float(r[2]) for r in rows], [float(r[4]) for r in rows]
    assert len(rows) == 10 and expect[9] - expect[0] > 0.25, out
    assert max(abs(a - b) for a, b in zip(expect, ours)) < 0.03, out  # about 10 standard deviations
    assert "| ties_trim_0 | (no mergekit) | |" in out and table.read_text().startswith("# research-merge's leaf")


def test_mergekit_parity_counts_differences_in_ulps_and_finds_ties_at_a_cut(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    import mergekit_parity as mp

    # ulps at the tensor's scale: 1.0's float32 ulp is 2**-23, its bf16 ulp 2**-7
    assert mp.ulps(np.float32([0.25, 1.0]), np.float32([0.25, 1.0 + 2**-22])) == 2
    assert mp.ulps(np.float32([0.5, -0.75]), np.float32([0.5, -0.75 + 2**-24])) == 1  # 0.75's ulp: 2**-24
    bf = lambda x: np.asarray(x, np.float32).astype(ml_dtypes.bfloat16)
    assert mp.ulps(bf([1.0, 3.0]), bf([1.0, 3.0 + 2**-6])) == 1
    assert mp.ulps(np.zeros(2, np.float32), np.zeros(2, np.float32)) == 0
    assert mp.ulps(np.zeros(2, np.float32), np.float32([0, 1e-30])) == np.inf
    # a cut inside a run of equal magnitudes: k = 2 of [3, 2, -2, 1]; none at [3, 2, 1, 1]
    assert mp.tied_cut(np.float32([3, 2, -2, 1]), 0.5, None) and not mp.tied_cut(np.float32([3, 2, 1, 1]), 0.5, None)
    assert mp.tied_cut(np.float32([1, 1, 2, 3]), 0.01, None) is False  # keeps one: 3 > 2
    # breadcrumbs' cuts: drop the top int(0.25 * 4) = 1, keep 2: cuts at 1 and 3
    assert mp.tied_cut(np.float32([4, 4, 2, 1]), 0.5, 0.25) and not mp.tied_cut(np.float32([4, 3, 3, 1]), 0.5, 0.25)
    # compare: one entry changed in one of two tensors; the trim's cut on its delta is tied
    for who in ("base", "ft0"):
        os.makedirs(tmp_path / who)
        delta = np.float32([[1, 1, 0.5, 0.25]]) if who == "ft0" else np.zeros((1, 4), np.float32)
        save_file({"w": delta, "v": np.float32([1, 2])}, str(tmp_path / who / "model.safetensors"))
    for who, w in (("ref", [[1, 2, 3, 4]]), ("ours", [[1, 2, 3, 4 + 2**-20]])):
        os.makedirs(tmp_path / who)
        save_file({"w": np.float32(w), "v": np.float32([1, 2])}, str(tmp_path / who / "model.safetensors"))
        (tmp_path / who / "config.json").write_text('{"num_hidden_layers": 2, "tie_word_embeddings": %s}'
                                                    % ("true" if who == "ref" else "false"))
    row = mp.compare(str(tmp_path / "ref"), str(tmp_path / "ours"), str(tmp_path), "", [("ft0", 0.25, None)])
    assert row == {"entries": 6, "differ": 1, "max_ulps": 2.0, "tensors": 1, "tied": 1,  # 4's ulp: 2**-21
                   "config": {"tie_word_embeddings": (True, False)}}
