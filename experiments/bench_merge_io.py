"""Streaming checkpoint merges vs the I/O floor, on the issue's reference workload.

    python experiments/bench_merge_io.py --scale 1.0     # the README table (~540M params x 4 models, ~10 min)
    python experiments/bench_merge_io.py --scale 0.01    # smoke

Generates a Llama-shaped bf16 model (hidden 2048, 8 layers, intermediate 5632,
vocab 32000 at scale 1; widths scale by sqrt(scale)) as 2 safetensors shards:
a base plus 3 fine-tunes.  Each method runs as ``python -m research.merging``
in its own process (wall time, and that process's peak RSS: its VmHWM at exit).
The floor, measured in the same run, is a process that reads the same four
inputs from the page cache and writes one output of the same size.  Runs are
interleaved over ``--rounds`` rounds, each after an ``os.sync()``; the best
time is reported (single runs vary by +-30% on a shared machine).  The merges
keep compiled programs in a compilation cache that starts empty in each
bench run, so the first round compiles (the "first run" column) and later
rounds load them, as a user's second merge of the same architecture does.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

GOALS = ("linear", "task_arithmetic", "ties")  # the methods with a speed goal (the table)
METHODS = {  # every method of merging.merge, with its parameters
    "linear": "",
    "task_arithmetic": "",
    "ties": "parameters: {density: 0.2}\n",
    "dare_linear": "parameters: {density: 0.2}\n",
    "dare_ties": "parameters: {density: 0.2}\n",
    "breadcrumbs": "parameters: {density: 0.2, gamma: 0.01}\n",
    "breadcrumbs_ties": "parameters: {density: 0.2, gamma: 0.01}\n",
    "della": "parameters: {density: 0.4, epsilon: 0.1}\n",
    "della_linear": "parameters: {density: 0.4, epsilon: 0.1}\n",
    "slerp": "parameters: {t: 0.3}\n",  # two models, no base
    "model_stock": "",
    "negate": "parameters: {lambda: 0.5}\n",
}


def shapes(scale):
    s = math.sqrt(scale)
    h = max(64, int(2048 * s) // 64 * 64)
    inter = max(64, int(5632 * s) // 64 * 64)
    vocab = max(64, int(32000 * s) // 64 * 64)
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(8):
        p = f"model.layers.{i}"
        for n in ("q", "k", "v", "o"):
            out[f"{p}.self_attn.{n}_proj.weight"] = (h, h)
        out[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        out[f"{p}.mlp.up_proj.weight"] = (inter, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, inter)
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
    return out


def write_model(path, shp, rng, base=None):
    os.makedirs(path)
    names = list(shp)
    half = len(names) // 2
    groups = [names[:half], names[half:]]
    wm = {}
    for i, group in enumerate(groups):
        arrs = {}
        for n in group:
            x = rng.standard_normal(shp[n], dtype=np.float32) * (0.02 if base is None else 0.002)
            if base is not None:
                x += base[n].astype(np.float32)
            arrs[n] = x.astype(ml_dtypes.bfloat16)
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(arrs, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({n: fn for n in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"num_hidden_layers": 8, "model_type": "llama"}, f)


# Peak RSS is the child's own VmHWM, read at exit: wait4's ru_maxrss is not
# usable, as a forked child starts from its parent's high-water mark.
_HWM = """
import atexit, os, sys
def _hwm(path=os.environ["BENCH_HWM_FILE"]):
    kb = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    open(path, "w").write(kb)
atexit.register(_hwm)
"""
_MODULE = _HWM + "import runpy; sys.argv = sys.argv[1:]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


def timed_process(args, hwm_file, cache_dir="off"):
    """Wall seconds and peak RSS (bytes) of ``python -c <wrapped>`` args."""
    t0 = time.perf_counter()
    env = {**os.environ, "XLA_FLAGS": "", "BENCH_HWM_FILE": hwm_file, "RESEARCH_MERGE_CACHE": cache_dir}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed: {proc.stderr[-2000:]}")
    with open(hwm_file) as f:
        return secs, int(f.read()) * 1024


COPY = """
import sys, os
import ml_dtypes  # registers bfloat16 with numpy
from safetensors import safe_open
from safetensors.numpy import save_file
paths, out = sys.argv[1:-1], sys.argv[-1]
os.makedirs(out)
files = {}
for p in paths:
    for fn in sorted(os.listdir(p)):
        if fn.endswith('.safetensors'):
            files.setdefault(p, []).append(os.path.join(p, fn))
shard, size, k = {}, 0, 0
for i, p in enumerate(paths):
    for fp in files[p]:
        with safe_open(fp, 'np') as f:
            for n in f.keys():
                a = f.get_tensor(n)
                if i == 0:
                    shard[n] = a
                    size += a.nbytes
                    if size > 5 * 2**30:
                        save_file(shard, f'{out}/part{k}.safetensors'); shard, size, k = {}, 0, k + 1
save_file(shard, f'{out}/part{k}.safetensors')
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help=f"default: all; the goals concern {', '.join(GOALS)}")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best time is reported)")
    ap.add_argument("--dir", default=None, help="where to write the workload (default: a temp dir)")
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="bench_merge_io-")
    shp = shapes(args.scale)
    n_params = sum(math.prod(s) for s in shp.values())
    rng = np.random.default_rng(0)
    print(f"generating 4 models of {n_params / 1e6:.0f}M bf16 parameters in {work}", flush=True)
    write_model(f"{work}/base", shp, rng)
    from safetensors.numpy import load_file

    base = {}
    for fn in os.listdir(f"{work}/base"):
        if fn.endswith(".safetensors"):
            base.update(load_file(f"{work}/base/{fn}"))
    for i in range(3):
        write_model(f"{work}/ft{i}", shp, rng, base)
    del base
    inputs = [f"{work}/{m}" for m in ("base", "ft0", "ft1", "ft2")]
    for p in inputs:  # warm the page cache
        for fn in os.listdir(p):
            with open(os.path.join(p, fn), "rb") as f:
                while f.read(1 << 24):
                    pass
    hwm = f"{work}/hwm"
    runs = {"read 4 inputs + write 1 output (floor)": [sys.executable, "-c", _HWM + COPY, *inputs, f"{work}/out"]}
    for method in args.methods:
        cfg = f"{work}/{method}.yaml"
        with open(cfg, "w") as f:
            if method == "slerp":
                f.write(f"merge_method: {method}\nmodels:\n  - model: ft0\n  - model: ft1\n")
            else:
                f.write(f"merge_method: {method}\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\n  - model: ft2\n")
            f.write(METHODS.get(method, ""))
        runs[method] = [sys.executable, "-c", _MODULE, "research.merging", cfg, f"{work}/out", "--no-progress"]
    cache = f"{work}/compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    best = {name: (math.inf, 0) for name in runs}
    first = {}
    for _ in range(args.rounds):  # interleaved rounds: drift on a shared machine hits every run alike
        for name, cmd in runs.items():
            os.sync()  # start every run with no dirty pages waiting for write-back
            secs, rss = timed_process(cmd, hwm, cache)
            first.setdefault(name, secs)
            best[name] = (min(best[name][0], secs), max(best[name][1], rss))
            shutil.rmtree(f"{work}/out")
    rows = [(name, *best[name]) for name in runs]
    floor = rows[0][1]
    print(f"\n{n_params / 1e6:.0f}M parameters per model, bf16, 2 shards each, 3 fine-tunes + base; "
          f"best wall time of {args.rounds} interleaved rounds, largest peak RSS\n")
    print("| run | wall (s) | ratio to floor | first run (s), compiling | peak RSS (GB) |\n|---|---:|---:|---:|---:|")
    for name, secs, rss in rows:
        print(f"| {name} | {secs:.1f} | {secs / floor:.2f}x | {first[name]:.1f} | {rss / 1e9:.2f} |")
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
