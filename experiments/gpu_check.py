"""The accelerator paths, checked on a GPU: attention backends, training step, merges.

    python experiments/gpu_check.py                 # on a machine with an NVIDIA GPU (~5 min)
    python experiments/gpu_check.py --quick         # smaller shapes, fewer repeats

CI has no GPU, so this script is how the GPU-only paths get verified.  It prints
Markdown tables (and writes them to ``--out`` when given):

1. every attention backend (``xla``, ``blockwise``, ``pallas_gpu``, ``cudnn``) on
   packed rows with random segment lengths and a padding tail, bf16 in: forward
   output and ``dq``/``dk``/``dv`` against the dense reference computed in float32
   (largest error relative to the reference's largest magnitude, real tokens
   only), then forward+backward time on 4096-token rows of 100- and 2000-token
   segments;
2. a training step (forward, backward, AdamW) on the seed's 100/2000-token
   mixture, padded vs packed, with each attention backend;
3. ``merging.merge`` on the GPU against the ``a + b - c`` floor;
4. ``python -m research.merging --device gpu`` against ``--device cpu`` on the
   same checkpoints (fraction of output entries that differ).

Each section runs in its own process (a kernel that faults poisons its CUDA
context for good), and ``cudnn`` runs apart from the other backends.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from research.models import attention as attn  # noqa: E402

IMPLS = ["xla", "blockwise", "pallas_gpu", "cudnn"]
_LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    _LINES.append(line)


def _timed(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_segments(rng, batch: int, length: int, mean: int) -> np.ndarray:
    """Rows of contiguous segments with lognormal lengths and a padding tail (id 0)."""
    out = np.zeros((batch, length), np.int32)
    for b in range(batch):
        pos, sid = 0, 1
        stop = int(length * 0.9)
        while pos < stop:
            n = int(np.clip(rng.lognormal(np.log(mean), 0.6), 1, stop - pos))
            out[b, pos:pos + n] = sid
            pos, sid = pos + n, sid + 1
    return out


def attention_correctness(B, T, N, K, H, seed=0):
    rng = np.random.default_rng(seed)
    seg = jnp.asarray(random_segments(rng, B, T, 120))
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(ks[1], (B, T, K, H), jnp.bfloat16)
    v = jax.random.normal(ks[2], (B, T, K, H), jnp.bfloat16)
    ct = jax.random.normal(ks[3], (B, T, N, H), jnp.float32)
    real = (seg > 0)[:, :, None, None]

    def loss(impl, q, k, v):
        out = attn.attention(q, k, v, seg, implementation=impl).astype(jnp.float32)
        return jnp.sum(jnp.where(real, out * ct, 0.0)), out

    def run(impl, q, k, v):
        (_, out), grads = jax.jit(jax.value_and_grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return out, grads

    f32 = lambda x: x.astype(jnp.float32)
    ref_out, ref_grads = run("xla", f32(q), f32(k), f32(v))
    say(f"### Attention correctness: B={B}, T={T}, heads {N}/{K}, head dim {H}, bf16 in, "
        f"{int((seg.max(axis=1)).sum())} segments, reference = xla in float32\n")
    say("| backend | out | dq | dk | dv |")
    say("|---|---:|---:|---:|---:|")
    rel = lambda a, r, m: float(jnp.max(jnp.where(m, jnp.abs(f32(a) - r), 0.0)) / jnp.max(jnp.abs(r)))
    for impl in IMPLS:
        try:
            out, grads = run(impl, q, k, v)
            errs = [rel(out, ref_out, real)] + [rel(g, r, True) for g, r in zip(grads, ref_grads)]
            say(f"| {impl} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")
        except Exception as e:  # noqa: BLE001 - report and go on
            say(f"| {impl} | failed: {type(e).__name__}: {str(e).splitlines()[0][:150]} | | | |")
    say()


def attention_speed(T, repeats):
    from bench_attention import packed_segments, random_qkv

    N, K, H = 8, 4, 64
    q, k, v = random_qkv(T, N, K, H, jnp.bfloat16, seed=1)
    say(f"### Attention forward+backward, one {T}-token row, heads {N}/{K}, head dim {H}, bf16\n")
    say("| segments | backend | ms | speed-up vs xla |")
    say("|---|---|---:|---:|")
    for seg_len in (100, 2000):
        seg = jnp.asarray(packed_segments(T, seg_len))
        ref = None
        for impl in IMPLS:
            try:
                f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attn.attention(q, k, v, seg, implementation=impl)
                                                             .astype(jnp.float32)), argnums=(0, 1, 2)))
                t = _timed(f, q, k, v, repeats=repeats)
                ref = ref or t
                say(f"| {seg_len}-token | {impl} | {1e3 * t:.2f} | {ref / t:.1f}x |")
            except Exception as e:  # noqa: BLE001
                say(f"| {seg_len}-token | {impl} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | |")
    say()


def train_step(samples: int, seq: int, steps: int):
    import bench_train_step as bts

    data = bts.mixture(samples, max_len=seq)
    padded = bts.padded_batches(data, 4)
    packed = bts.packed_batches(data, seq, 1)
    real = sum(int((b["segment_ids"] > 0).sum()) for b in padded)
    ideal = sum(b["tokens"].size for b in padded) / real
    say(f"### Training step on the GPU: {samples} samples, {real:,} real tokens, rows of {seq} "
        f"(ideal packing speed-up {ideal:.2f}x), {steps} steps per batch\n")
    say("| batching | attention | real tokens/s | speed-up | share of ideal |")
    say("|---|---|---:|---:|---:|")
    base = None
    for name, batches, impl in [("padded", padded, "xla")] + [("packed", packed, i) for i in IMPLS]:
        try:
            tps = bts.run(batches, impl, steps)
            base = base or tps
            say(f"| {name} | {impl} | {tps:,.0f} | {tps / base:.2f}x | {tps / base / ideal:.2f} |")
        except Exception as e:  # noqa: BLE001
            say(f"| {name} | {impl} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
    say()


def merge_core(params: float, methods):
    import bench_merge_core as bmc

    from research import merging

    base, models = bmc.make_models(bmc.llama_shapes(params))
    n = sum(x.size for x in jax.tree.leaves(base))
    say(f"### merging.merge on {jax.devices()[0].device_kind}: {n / 1e6:.0f}M bf16 parameters, 3 models + base\n")
    floor, _ = bmc.timed(lambda ms, b: jax.tree.map(bmc._floor_leaf, ms[0], ms[1], b), models, base)
    say("| method | ms | elements/s | ratio to floor |")
    say("|---|---:|---:|---:|")
    say(f"| a + b - c (floor) | {1e3 * floor:.1f} | {n / floor / 1e9:.1f}G | 1.00x |")
    for method in methods:
        try:
            p = dict(bmc.PER_METHOD[method])
            ms = models[:2] if method == "slerp" else models
            b = None if method in ("linear", "slerp") else base
            key = jax.random.key(0) if method in merging.RANDOM_METHODS else None
            t, _ = bmc.timed(lambda ms, b, key, m=method, p=p: merging.merge(m, ms, base=b, key=key, check_finite=False, **p),
                             ms, b, key)
            say(f"| {method} | {1e3 * t:.1f} | {n / t / 1e9:.1f}G | {t / floor:.2f}x |")
        except Exception as e:  # noqa: BLE001
            say(f"| {method} | failed: {type(e).__name__}: {str(e).splitlines()[0][:120]} | | |")
    say()


def stream_gpu_vs_cpu(scale: float):
    import bench_merge_io as bio
    from safetensors.numpy import load_file

    work = tempfile.mkdtemp(prefix="gpu_check-")
    shp = bio.shapes(scale)
    rng = np.random.default_rng(0)
    bio.write_model(f"{work}/base", shp, rng)
    base = {}
    for fn in os.listdir(f"{work}/base"):
        if fn.endswith(".safetensors"):
            base.update(load_file(f"{work}/base/{fn}"))
    for i in range(3):
        bio.write_model(f"{work}/ft{i}", shp, rng, base)
    n = sum(int(np.prod(s)) for s in shp.values())
    say(f"### Streaming merge, --device gpu vs --device cpu ({n / 1e6:.0f}M bf16 parameters, 3 fine-tunes + base)\n")
    say("| method | cpu (s) | gpu (s) | entries that differ | largest difference |")
    say("|---|---:|---:|---:|---:|")
    env = {**os.environ, "RESEARCH_MERGE_CACHE": "off"}
    for method, extra in [("linear", ""), ("task_arithmetic", ""), ("ties", "parameters: {density: 0.2}\n"),
                          ("dare_ties", "parameters: {density: 0.2}\n")]:
        cfg = f"{work}/{method}.yaml"
        with open(cfg, "w") as f:
            f.write(f"merge_method: {method}\nbase_model: base\nmodels:\n  - model: ft0\n  - model: ft1\n  - model: ft2\n{extra}")
        outs, secs = {}, {}
        try:
            for dev in ("cpu", "gpu"):
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "research.merging", cfg, f"{work}/out-{method}-{dev}",
                                    "--device", dev, "--no-progress", "--seed", "3"], capture_output=True, text=True, env=env)
                secs[dev] = time.perf_counter() - t0
                if r.returncode:
                    raise RuntimeError(f"{dev}: {r.stderr.strip().splitlines()[-1][:200]}")
                outs[dev] = {}
                d = f"{work}/out-{method}-{dev}"
                for fn in os.listdir(d):
                    if fn.endswith(".safetensors"):
                        outs[dev].update(load_file(os.path.join(d, fn)))
            diff = total = 0
            worst = 0.0
            for name, a in outs["cpu"].items():
                a32, b32 = a.astype(np.float32), outs["gpu"][name].astype(np.float32)
                diff += int((a32 != b32).sum())
                total += a.size
                worst = max(worst, float(np.abs(a32 - b32).max()))
            say(f"| {method} | {secs['cpu']:.1f} | {secs['gpu']:.1f} | {diff / total:.2e} | {worst:.2e} |")
        except Exception as e:  # noqa: BLE001
            say(f"| {method} | failed: {type(e).__name__}: {str(e)[:160]} | | | |")
    say()


SECTIONS = {  # name -> (function of quick, attention backends)
    "attention": (lambda q: (attention_correctness(2, 512 if q else 2048, 8, 4, 64),
                             attention_speed(1024 if q else 4096, 3 if q else 10)), ["xla", "blockwise", "pallas_gpu"]),
    "cudnn": (lambda q: (attention_correctness(2, 512 if q else 2048, 8, 4, 64),
                         attention_speed(1024 if q else 4096, 3 if q else 10)), ["xla", "cudnn"]),
    "stream": (lambda q: stream_gpu_vs_cpu(0.01 if q else 0.05), []),
    "merge": (lambda q: merge_core(20e6 if q else 150e6, ["linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs",
                                                        "della", "slerp", "model_stock"]), []),
    "train": (lambda q: train_step(16 if q else 48, 1024 if q else 4096, 1 if q else 3), ["xla", "blockwise", "pallas_gpu"]),
    "train-cudnn": (lambda q: train_step(16 if q else 48, 1024 if q else 4096, 1 if q else 3), ["cudnn"]),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    ap.add_argument("--sections", nargs="*", default=list(SECTIONS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:  # one section, in this process
        fn, impls = SECTIONS[args.child]
        IMPLS[:] = impls
        fn(args.quick)
        return 0
    devs = jax.devices()
    say(f"jax {jax.__version__}, devices: {[d.device_kind for d in devs]}\n")
    if devs[0].platform not in ("gpu", "cuda"):
        say("no GPU here: nothing to check")
        return 1
    for name in args.sections:
        t0 = time.perf_counter()
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + ["--quick"] * args.quick
        r = subprocess.run(cmd, capture_output=True, text=True)
        for line in r.stdout.splitlines():
            say(line)
        if r.returncode:
            say(f"section {name} failed (exit {r.returncode}):\n```\n{r.stderr[-1500:]}\n```")
        say(f"({name}: {time.perf_counter() - t0:.0f} s)\n")
        if args.out:
            with open(args.out, "w") as f:
                f.write("\n".join(_LINES) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
