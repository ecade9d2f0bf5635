"""Streaming checkpoint merges vs the I/O floor, on the issue's reference workload.

    python experiments/bench_merge_io.py --dtypes bfloat16 float32 --docs       # 542M x 4 models
    python experiments/bench_merge_io.py --preset llama3_8b_slice --docs        # 8B-width tensors, 1.3B x 4
    python experiments/bench_merge_io.py --delta 0.0002 --methods ties dare_ties della --docs  # small changes
    python experiments/bench_merge_io.py --preset llama4_experts --methods linear ties dare_ties della --docs  # 3-D
    python experiments/bench_merge_io.py --scale 0.01 --rounds 1                # smoke

Generates a Llama-shaped bf16 model (hidden 2048, 8 layers, intermediate 5632,
vocab 32000 at scale 1; widths scale by sqrt(scale)) as 2 safetensors shards:
a base plus 3 fine-tunes.  Each method runs as ``python -m research.merging``
in its own process (wall time, and that process's peak RSS: its VmHWM at exit).
The floor, measured in the same run, is a process that reads every byte of
the four inputs' files from the page cache and writes the first input's bytes
out (``COPY``): the same reads and one output of the same size, without
parsing, in one 64 MB buffer.  Beside it, the same reads and write through the
safetensors library (``ROUND_TRIP``), the reference the speed goals were
first written against.  Runs are interleaved over ``--rounds`` rounds, each
after an ``os.sync()``; the best time is reported (single runs vary by +-30%
on a shared machine).  Before each run the bench touches and frees
``--warm-gb`` of memory (default: twice one model's bytes plus 2 GB): a VM
that hands freed guest memory back to its host (virtio-balloon free page
reporting) charges a run for each page it touches first, its output's page
cache included, unless the page was freed only moments before.  The kernel
hands out the most recently freed pages first, so every run then starts on
memory the host still backs, as on a machine that keeps its memory;
``--warm-gb 0`` measures as the machine comes.  The merges keep compiled
programs in a compilation cache that starts empty in each bench run, so the
first round compiles (the "first run" column) and later rounds load them,
as a user's second merge of the same architecture does.  ``--also VARIANT``
adds, interleaved, each method the numba kernels run (the ones with a
sparsifier) run again as VARIANT says, as two more columns: ``no-map``, with
``--no-map`` (every input tensor ``pread`` into memory rather than mapped
from the page cache); ``256-bit``, with ``NUMBA_CPU_FEATURES`` set to the
host's features, which the kernels then leave as they are, so LLVM keeps its
preferred vector width (256 bits on AVX-512 CPUs, where the kernels
otherwise ask for 512); ``serial``, with ``RESEARCH_MERGE_CPU=serial`` (the
kernels' row loops on the merge's main thread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

GOALS = ("linear", "task_arithmetic", "ties")  # the methods with a speed goal (the table)
# Every method, configured as users write mergekit YAML: a weight and (where the
# method takes them) a density per model, normalize where it applies, and a dtype line.
METHODS = {  # method: (per-model parameters, global parameters)
    "linear": ("weight: 1.0", "normalize: true"),
    "task_arithmetic": ("weight: 1.0", "normalize: true"),
    "ties": ("weight: 1.0, density: 0.2", "normalize: true"),
    "dare_linear": ("weight: 1.0, density: 0.2", "normalize: true"),
    "dare_ties": ("weight: 1.0, density: 0.2", "normalize: true"),
    "breadcrumbs": ("weight: 1.0, density: 0.2, gamma: 0.01", "normalize: true"),
    "breadcrumbs_ties": ("weight: 1.0, density: 0.2, gamma: 0.01", "normalize: true"),
    "della": ("weight: 1.0, density: 0.4, epsilon: 0.1", "normalize: true"),
    "della_linear": ("weight: 1.0, density: 0.4, epsilon: 0.1", "normalize: true"),
    "slerp": ("", "t: 0.3"),  # two models, no base
    "model_stock": ("", ""),
    "negate": ("weight: 1.0", "lambda: 0.5"),
}


def config(method: str, dtype: str | None) -> str:
    per_model, shared = METHODS[method]
    models = ("ft0", "ft1") if method == "slerp" else ("ft0", "ft1", "ft2")
    text = f"merge_method: {method}\n" + ("" if method == "slerp" else "base_model: base\n") + "models:\n"
    for m in models:
        text += f"  - model: {m}\n" + (f"    parameters: {{{per_model}}}\n" if per_model else "")
    text += f"parameters: {{{shared}}}\n" if shared else ""
    return text + (f"dtype: {dtype}\n" if dtype else "")


PRESETS = {  # hidden, layers, intermediate, vocab, kv width
    "llama_542m": (2048, 8, 5632, 32000, 2048),
    "llama3_8b_slice": (4096, 1, 14336, 128256, 1024),  # 8B's embeddings and lm_head, one 8B layer
}
# A 3-D tensor of fused experts, [experts, hidden, 2 x intermediate] as Llama 4 stores its
# ``gate_up_proj``, with 4 of its 16 experts: each expert's slice (a row) holds 84M entries.
FUSED_PRESETS = {"llama4_experts": (4, 5120, 16384)}


def shapes(scale, preset="llama_542m"):
    s = math.sqrt(scale)
    if preset in FUSED_PRESETS:
        experts, hidden, width = FUSED_PRESETS[preset]
        h, w = max(64, int(hidden * s) // 64 * 64), max(64, int(width * s) // 64 * 64)
        return {"model.layers.0.feed_forward.experts.gate_up_proj": (experts, h, w), "model.norm.weight": (h,)}
    hidden, layers, inter, vocab, kv = PRESETS[preset]
    h = max(64, int(hidden * s) // 64 * 64)
    inter = max(64, int(inter * s) // 64 * 64)
    vocab = max(64, int(vocab * s) // 64 * 64)
    kv = max(64, int(kv * s) // 64 * 64)
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for n, rows in (("q", h), ("k", kv), ("v", kv), ("o", h)):
            out[f"{p}.self_attn.{n}_proj.weight"] = (rows, h)
        out[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        out[f"{p}.mlp.up_proj.weight"] = (inter, h)
        out[f"{p}.mlp.down_proj.weight"] = (h, inter)
        out[f"{p}.input_layernorm.weight"] = (h,)
        out[f"{p}.post_attention_layernorm.weight"] = (h,)
    return out


def write_model(path, shp, rng, base=None, delta=0.002):
    """A base (entries ~ N(0, 0.02)), or a fine-tune of ``base``: each entry moved by
    N(0, ``delta``), both rounded to bf16."""
    os.makedirs(path)
    names = list(shp)
    half = len(names) // 2
    groups = [names[:half], names[half:]]
    wm = {}
    for i, group in enumerate(groups):
        arrs = {}
        for n in group:
            x = rng.standard_normal(shp[n], dtype=np.float32) * (0.02 if base is None else delta)
            if base is not None:
                x += base[n].astype(np.float32)
            arrs[n] = x.astype(ml_dtypes.bfloat16)
        fn = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(arrs, os.path.join(path, fn), metadata={"format": "pt"})
        wm.update({n: fn for n in group})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": wm}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"num_hidden_layers": sum(n.endswith("q_proj.weight") for n in shp), "model_type": "llama"}, f)


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


def warm_memory(nbytes: int) -> None:
    """Touch ``nbytes`` of fresh memory, one write a page, and free it (see the module docstring)."""
    if nbytes > 0:
        pages = np.empty(nbytes, np.uint8)
        pages[::4096] = 1
        del pages


def dry_run_estimate(cfg: str) -> int:
    """The peak memory, in bytes, that ``--dry-run`` estimates for ``cfg``'s merge."""
    r = subprocess.run([sys.executable, "-m", "research.merging", cfg, cfg + ".out", "--dry-run"],
                       capture_output=True, text=True, check=True)
    m = re.search(r"estimated peak memory: ([\d.]+) GiB", r.stdout)
    if m is None:
        raise SystemExit(f"{cfg}: no peak estimate in the dry run's output:\n{r.stdout[-2000:]}")
    return round(float(m.group(1)) * 2**30)


def timed_process(args, hwm_file, cache_dir="off", extra_env=None):
    """Wall seconds and peak RSS (bytes) of ``python -c <wrapped>`` args."""
    t0 = time.perf_counter()
    env = {**os.environ, "XLA_FLAGS": "", "BENCH_HWM_FILE": hwm_file, "RESEARCH_MERGE_CACHE": cache_dir,
           **(extra_env or {})}
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{args} failed: {proc.stderr[-2000:]}")
    with open(hwm_file) as f:
        return secs, int(f.read()) * 1024


# The floor: every byte of the four inputs' safetensors files read from the page
# cache in 64 MB chunks, and the first input's bytes written out as they come.
# No parsing and no buffer but one: the least I/O any merge of these inputs does.
COPY = """
import os, sys
paths, out = sys.argv[1:-1], sys.argv[-1]
os.makedirs(out)
chunk = memoryview(bytearray(64 << 20))
for i, p in enumerate(paths):
    for fn in sorted(os.listdir(p)):
        if not fn.endswith('.safetensors'):
            continue
        src = os.open(os.path.join(p, fn), os.O_RDONLY)
        dst = os.open(os.path.join(out, fn), os.O_WRONLY | os.O_CREAT | os.O_EXCL) if i == 0 else None
        while n := os.readv(src, [chunk]):
            done = 0
            while dst is not None and done < n:
                done += os.write(dst, chunk[done:n])
        os.close(src)
        if dst is not None:
            os.close(dst)
"""


# The same reads and write through the safetensors library, as a script without
# a merge would do them: every tensor loaded as an array, the first input's saved
# by ``save_file`` (shards of at most 5 GB held in memory).  Not a floor (it
# parses, copies and holds more than a merge must), the reference the issue's
# speed goals were first written against.
ROUND_TRIP = """
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


def _numba_default_width() -> dict:
    import llvmlite.binding as llvm

    return {"NUMBA_CPU_FEATURES": llvm.get_host_cpu_features().flatten()}


VARIANTS = {  # --also: (column label, extra CLI arguments, extra environment)
    "no-map": ("`--no-map`", ["--no-map"], dict),
    "256-bit": ("256-bit vectors", [], _numba_default_width),
    "serial": ("serial kernels", [], lambda: {"RESEARCH_MERGE_CPU": "serial"}),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="llama_542m", choices=[*PRESETS, *FUSED_PRESETS])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                    help=f"default: all; the speed goals concern {', '.join(GOALS)}")
    ap.add_argument("--dtypes", nargs="*", default=["bfloat16"], choices=["bfloat16", "float32", "none"],
                    help="the configs' dtype line, one table each ('none': no dtype line)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (best time is reported)")
    ap.add_argument("--dir", default=None, help="where to write the workload (default: a temp dir)")
    ap.add_argument("--delta", type=float, default=0.002,
                    help="standard deviation of the fine-tunes' changes to the base's entries (whose is 0.02); "
                         "in bf16, 0.0002 leaves most changes 0 or 1-2 ulps, as small learning rates do")
    ap.add_argument("--also", choices=list(VARIANTS), default=None,
                    help="also run, interleaved, each method the numba kernels run: with --no-map (inputs pread), "
                         "at LLVM's preferred vector width, or with the kernels on one thread")
    ap.add_argument("--warm-gb", type=float, default=None,
                    help="GB of memory touched and freed before each run (default: twice one model's bytes plus "
                         "2 GB; 0: none), see above")
    ap.add_argument("--docs", action="store_true", help="write the tables into docs/performance.md")
    args = ap.parse_args(argv)
    work = args.dir or tempfile.mkdtemp(prefix="bench_merge_io-")
    os.makedirs(work, exist_ok=True)
    shp = shapes(args.scale, args.preset)
    n_params = sum(math.prod(s) for s in shp.values())
    rng = np.random.default_rng(0)
    stamp = f"{work}/workload.json"  # a --dir that already holds this workload is reused
    workload = {"preset": args.preset, "scale": args.scale, "delta": args.delta}
    if not (os.path.isfile(stamp) and json.load(open(stamp)) == workload):
        print(f"generating 4 models of {n_params / 1e6:.0f}M bf16 parameters in {work}", flush=True)
        for m in ("base", "ft0", "ft1", "ft2"):
            shutil.rmtree(f"{work}/{m}", ignore_errors=True)
        write_model(f"{work}/base", shp, rng)
        from safetensors.numpy import load_file

        base = {}
        for fn in os.listdir(f"{work}/base"):
            if fn.endswith(".safetensors"):
                base.update(load_file(f"{work}/base/{fn}"))
        for i in range(3):
            write_model(f"{work}/ft{i}", shp, rng, base, args.delta)
        del base
        json.dump(workload, open(stamp, "w"))
    inputs = [f"{work}/{m}" for m in ("base", "ft0", "ft1", "ft2")]
    for p in inputs:  # warm the page cache
        for fn in os.listdir(p):
            with open(os.path.join(p, fn), "rb") as f:
                while f.read(1 << 24):
                    pass
    hwm = f"{work}/hwm"
    scratch = f"{work}/out"  # every run's output, removed after it
    floor_name = "read 4 inputs + write 1 output (floor)"
    trip_name = "safetensors load 4 + save 1 (round trip)"
    runs = {(floor_name, None): [sys.executable, "-c", _HWM + COPY, *inputs, scratch],
            (trip_name, None): [sys.executable, "-c", _HWM + ROUND_TRIP, *inputs, scratch]}
    envs = {}
    numba_methods = set()
    if args.also:
        from research.merging.stream.engine import MAPPED_METHODS as numba_methods
        label, also_args, env_of = VARIANTS[args.also]
        also_env = env_of()
    for dtype in args.dtypes:
        for method in args.methods:
            cfg = f"{work}/{method}-{dtype}.yaml"
            with open(cfg, "w") as f:
                f.write(config(method, None if dtype == "none" else dtype))
            runs[(method, dtype)] = [sys.executable, "-c", _MODULE, "research.merging", cfg, scratch,
                                     "--no-progress"]
            if method in numba_methods:
                runs[(f"{method} {label}", dtype)] = runs[(method, dtype)] + also_args
                envs[(f"{method} {label}", dtype)] = also_env
    estimate = {(m, d): dry_run_estimate(runs[(m, d)][4]) for d in args.dtypes for m in args.methods}
    model_bytes = 2 * n_params  # bf16
    warm = int(2 * model_bytes + 2 * 2**30 if args.warm_gb is None else args.warm_gb * 2**30)
    cache = f"{work}/compile-cache"
    shutil.rmtree(cache, ignore_errors=True)
    times, peak = {name: [] for name in runs}, dict.fromkeys(runs, 0)  # wall seconds per round, peak RSS
    if os.path.exists(scratch):  # a killed run left it
        print(f"removing {scratch}, left by an earlier run", flush=True)
        shutil.rmtree(scratch)
    try:
        for _ in range(args.rounds):  # interleaved rounds: drift on a shared machine hits every run alike
            for name, cmd in runs.items():
                os.sync()  # start every run with no dirty pages waiting for write-back
                warm_memory(warm)
                secs, rss = timed_process(cmd, hwm, cache, envs.get(name))
                print(f"  {name[0]} ({name[1]}): {secs:.1f} s, {rss / 1e9:.2f} GB", flush=True)
                times[name].append(secs)
                peak[name] = max(peak[name], rss)
                shutil.rmtree(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    def best(name):
        return min(times[name]), peak[name]

    floor, floor_rss = best((floor_name, None))
    trip, trip_rss = best((trip_name, None))
    largest = max(shp.values(), key=math.prod)

    def spread(run):
        return ", ".join(f"{t:.1f}" for t in times[(run, None)])

    out = [f"{n_params / 1e6:.0f}M parameters per model (largest tensor {'x'.join(map(str, largest))}), bf16 on disk, "
           f"2 shards each, 3 fine-tunes + base (base entries ~ N(0, 0.02), each fine-tune's changes ~ N(0, "
           f"{args.delta:g}), `--delta`); best wall time of {args.rounds} interleaved rounds, largest peak "
           f"RSS; each run starts on {warm / 2**30:.1f} GB of memory touched and freed just before it (`--warm-gb`).  "
           f"The floor reads every byte of the 4 inputs and writes one bf16 output (a byte copy of the "
           f"first): {floor:.1f} s (rounds: {spread(floor_name)}), {floor_rss / 1e9:.2f} GB.  The safetensors round "
           f"trip loads the 4 inputs' tensors and saves the first's with the safetensors library: {trip:.1f} s "
           f"(rounds: {spread(trip_name)}), {trip_rss / 1e9:.2f} GB.",
           "", "Configs as users write them: `weight: 1.0` (and the density) per model, `normalize: true` where "
           "the method takes it, and the dtype line of each table.", ""]
    for dtype in args.dtypes:
        line = "no dtype line" if dtype == "none" else f"`dtype: {dtype}`"
        extra = f" {label} wall (s) | {label} peak RSS (GB) |" if args.also else ""
        out += [f"**{line}**", "", "| method | wall (s) | ratio to floor | ratio to round trip | first run (s), compiling "
                "| peak RSS (GB) | `--dry-run` estimate (GB) |" + extra,
                "|---|---:|---:|---:|---:|---:|---:|" + "---:|---:|" * bool(extra)]
        for method in args.methods:
            secs, rss = best((method, dtype))
            row = (f"| {method} | {secs:.1f} | {secs / floor:.2f}x | {secs / trip:.2f}x | "
                   f"{times[(method, dtype)][0]:.1f} | {rss / 1e9:.2f} | {estimate[(method, dtype)] / 1e9:.2f} |")
            if extra:
                also = (f"{method} {label}", dtype)
                row += f" {min(times[also]):.1f} | {peak[also] / 1e9:.2f} |" if also in runs else " | |"
            out.append(row)
        out.append("")
    print("\n" + "\n".join(out))
    if args.docs:
        cmd = "python experiments/bench_merge_io.py " + " ".join(argv if argv is not None else sys.argv[1:])
        import perfdoc
        small = args.delta != ap.get_default("delta")  # its own section: the default workload's stays
        section = f"merge_io_{args.preset}" + (f"_delta_{args.delta:g}" if small else "")
        title = f"Streaming merges, {args.preset}" + (f", fine-tune changes ~ N(0, {args.delta:g})" if small else "")
        print("wrote", perfdoc.update(section, f"{title} (`experiments/bench_merge_io.py`)", cmd.replace(" --docs", ""),
                                      "\n".join(out)))
    if not args.dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
