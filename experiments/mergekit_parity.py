"""research-merge against mergekit itself: deterministic methods tensor for tensor, DARE and DELLA in distribution.

    python -m venv /tmp/mk && /tmp/mk/bin/pip install mergekit       # brings PyTorch: not our dependency
    python experiments/mergekit_parity.py --write results/mergekit_parity.md \
        --mergekit '/tmp/mk/bin/mergekit-yaml --quiet --lora-merge-cache /tmp/mk/lora-cache'
    python experiments/mergekit_parity.py --mergekit research-merge --tiny    # the script against itself (a test)

(Tensors of 3 axes, fused experts, are compared function by function in
``mergekit_functions.py``.)

Generates a Llama-shaped base (hidden 64, 4 layers, vocab 320) and three
fine-tunes (base + a delta shared by all + one of each's own), in float32 and in
bf16, plus a copy of the first fine-tune that ties its head to its embeddings,
and a LoRA and an rsLoRA peft adapter for the base. Each case is one mergekit
YAML document, run through both tools; every output tensor is compared entry
by entry: how many entries differ, and the largest difference, in units in the
last place (ulps) of the tensor's largest entry at the output dtype; and the
outputs' ``config.json`` in the keys a merge may change (``CONFIG_KEYS``).
Where a TIES-family trim is in play, each tensor that differs is checked for a
tie at a trim's cut (the k-th largest |delta| equal to the (k+1)-th), where
the two tools may keep different entries among equals.

Expected, against mergekit 0.1.5 with torch 2.14.1 (the committed tables in
results/mergekit_parity.md):

* float32 checkpoints, `dtype: float32`: TIES (also at density 0.01, where a
  norm's 64 entries keep their largest one), breadcrumbs-TIES, DARE-TIES at
  density 1, the slices merges (passthrough, and TIES with per-slice and
  per-source parameters) and the tied-head merge agree bit for bit.  Linear,
  task arithmetic, breadcrumbs, SLERP and Model Stock differ by at most 2
  ulps in 2-40% of the entries: the order of float operations (XLA fuses
  ``a * b + c`` into one rounding where torch rounds twice, and the other
  way round: mergekit's linear accumulates with ``addcmul_``).
* bf16 checkpoints, `dtype: bfloat16`: mergekit's task-vector methods and
  Model Stock compute in bf16, research-merge in float32, rounding once.
  Linear, task arithmetic, SLERP and Model Stock still differ by at most 2
  ulps; the merges with a trim or a sign vote, made there on bf16-rounded
  deltas, differ in 0.5-24% of the entries, by up to about 40 ulps (a
  delta's size; 121 in the slices case).
* bf16 checkpoints, mergekit in float32 (`dtype: float32`, `out_dtype:
  bfloat16`), research-merge under `dtype: bfloat16`: DARE-TIES at density
  1 agrees bit for bit, linear, task arithmetic, SLERP and Model Stock by at
  most 1 ulp in under 1% of the entries; the trims differ in 0.02-0.65% of
  the entries, and in the whole-model cases every tensor where they do has a
  tie at a trim's cut:
  bf16 inputs give many equal magnitudes, which mergekit breaks by torch's
  unstable sort and research-merge by flat index.
* DARE and DELLA: about the same share of entries changed (71-73%, where
  1 - 0.7 * 0.4 = 72% is expected), the mean ``|out - base|`` of a tensor
  within 0.4% on average (single tensors within 10%, the small ones'
  sampling noise; mergekit draws unseeded), and DELLA's keep share rising with the magnitude rank as
  density - epsilon + 2 epsilon rank / (n - 1) says, within 0.012 in every
  decile, in both.
* LoRA and rsLoRA adapters folded into the base (``base+adapter``): within 1
  ulp in up to 3% of the entries (the order of the sums in ``B @ A``), bit for bit
  where mergekit computes in float32.
* ``config.json``: the same, but where one input ties its head to its
  embeddings: mergekit keeps that model's ``tie_word_embeddings: true``
  beside the merged ``lm_head`` it writes (a loader that ties weights then
  replaces the head by the embeddings); research-merge writes ``false``.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file

H, INTER, LAYERS, HEADS, KV, VOCAB = 64, 160, 4, 4, 2, 320
BF16 = ml_dtypes.bfloat16

# name: (YAML with {s} for the checkpoints' suffix and {dt} for the dtype line,
#        the trims in play for the tie check: (model, density, gamma) per model, or None)
CASES = {
    "linear": ("""merge_method: linear
models:
  - {{model: ft0{s}, parameters: {{weight: 0.5}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.3}}}}
  - {{model: ft2{s}, parameters: {{weight: 0.2}}}}
{dt}""", None),
    "task_arithmetic": ("""merge_method: task_arithmetic
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 0.7}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5}}}}
  - {{model: ft2{s}, parameters: {{weight: -0.3}}}}
parameters: {{lambda: 0.9}}
{dt}""", None),
    "task_arithmetic, filter + gradient": ("""merge_method: task_arithmetic
base_model: base{s}
models:
  - model: ft0{s}
    parameters:
      weight: [{{filter: mlp, value: [0.2, 1.0]}}, {{value: 0.5}}]
  - {{model: ft1{s}, parameters: {{weight: 0.5}}}}
{dt}""", None),
    "ties": ("""merge_method: ties
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 0.2}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.8, density: 0.5}}}}
  - {{model: ft2{s}, parameters: {{weight: 0.6, density: 0.7}}}}
parameters: {{normalize: true}}
{dt}""", [("ft0", 0.2, None), ("ft1", 0.5, None), ("ft2", 0.7, None)]),
    "ties, normalize false, int8_mask": ("""merge_method: ties
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 0.2}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.8, density: 0.5}}}}
  - {{model: ft2{s}, parameters: {{weight: 0.6, density: 0.7}}}}
parameters: {{normalize: false, int8_mask: true}}
{dt}""", [("ft0", 0.2, None), ("ft1", 0.5, None), ("ft2", 0.7, None)]),
    "ties, density 0.01 (norms keep 1 entry)": ("""merge_method: ties
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 0.01}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5, density: 0.01}}}}
{dt}""", [("ft0", 0.01, None), ("ft1", 0.01, None)]),
    "breadcrumbs": ("""merge_method: breadcrumbs
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}}}
parameters: {{normalize: true}}
{dt}""", [("ft0", 0.8, 0.05), ("ft1", 0.6, 0.1)]),
    "breadcrumbs_ties": ("""merge_method: breadcrumbs_ties
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 0.8, gamma: 0.05}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5, density: 0.6, gamma: 0.1}}}}
  - {{model: ft2{s}, parameters: {{weight: 0.5, density: 0.9, gamma: 0.01}}}}
{dt}""", [("ft0", 0.8, 0.05), ("ft1", 0.6, 0.1), ("ft2", 0.9, 0.01)]),
    "dare_ties, density 1": ("""merge_method: dare_ties
base_model: base{s}
models:
  - {{model: ft0{s}, parameters: {{weight: 1.0, density: 1.0}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5, density: 1.0}}}}
{dt}""", None),
    "slerp, filter gradients": ("""merge_method: slerp
base_model: ft0{s}
models: [{{model: ft0{s}}}, {{model: ft1{s}}}]
parameters:
  t:
    - {{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}
    - {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}
    - value: 0.5
{dt}""", None),
    "model_stock": ("""merge_method: model_stock
base_model: base{s}
models: [{{model: ft0{s}}}, {{model: ft1{s}}}, {{model: ft2{s}}}]
{dt}""", None),
    "model_stock, filter_wise": ("""merge_method: model_stock
base_model: base{s}
models: [{{model: ft0{s}}}, {{model: ft1{s}}}, {{model: ft2{s}}}]
parameters: {{filter_wise: true}}
{dt}""", None),
    "passthrough slices, filtered scale": ("""merge_method: passthrough
slices:
  - sources: [{{model: ft0{s}, layer_range: [0, 2]}}]
  - sources:
      - model: ft1{s}
        layer_range: [1, 4]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]
{dt}""", None),
    "ties slices, per-slice parameters": ("""merge_method: ties
base_model: base{s}
slices:
  - sources:
      - {{model: base{s}, layer_range: [0, 2]}}
      - {{model: ft0{s}, layer_range: [0, 2], parameters: {{density: 0.3, weight: 0.6}}}}
      - {{model: ft1{s}, layer_range: [2, 4], parameters: {{density: [0.2, 0.8], weight: 0.4}}}}
  - sources:
      - {{model: base{s}, layer_range: [2, 4]}}
      - {{model: ft0{s}, layer_range: [2, 4]}}
      - {{model: ft1{s}, layer_range: [0, 2]}}
    parameters: {{density: 0.5, weight: 0.5}}
parameters: {{normalize: true}}
{dt}""", "varies"),
    "linear, one input's head tied": ("""merge_method: linear
models:
  - {{model: ft0_tied{s}, parameters: {{weight: 0.5}}}}
  - {{model: ft1{s}, parameters: {{weight: 0.5}}}}
{dt}""", None),
    "task_arithmetic, LoRA and rsLoRA adapters on the base": ("""merge_method: task_arithmetic
base_model: base{s}
models:
  - {{model: base{s}+{w}/lora, parameters: {{weight: 1.0}}}}
  - {{model: base{s}+{w}/rslora, parameters: {{weight: 0.5}}}}
{dt}""", None),
}
_TWO = """base_model: base_f32
models:
  - {{model: ft0_f32, parameters: {{weight: 1.0, density: 0.3{eps}}}}}
  - {{model: ft1_f32, parameters: {{weight: 0.5, density: 0.6{eps}}}}}
dtype: float32"""
RANDOM = {  # the methods that draw masks, compared in distribution (``random_rows``)
    "dare_ties": "merge_method: dare_ties\n" + _TWO.format(eps=""),
    "dare_linear": "merge_method: dare_linear\n" + _TWO.format(eps=""),
    "dare_ties, rescale false": "merge_method: dare_ties\nparameters: {rescale: false}\n" + _TWO.format(eps=""),
    "della, epsilon 0.1": "merge_method: della\n" + _TWO.format(eps=", epsilon: 0.1"),
    "della_linear, epsilon 0.1": "merge_method: della_linear\n" + _TWO.format(eps=", epsilon: 0.1"),
    "della, rescale false": "merge_method: della\nparameters: {rescale: false}\n" + _TWO.format(eps=", epsilon: 0.1"),
}
DELLA_RANKS = """merge_method: della_linear
base_model: base_f32
models: [{model: ft0_f32, parameters: {weight: 1.0, density: 0.5, epsilon: 0.3}}]
dtype: float32"""
CONFIG_KEYS = ("num_hidden_layers", "vocab_size", "tie_word_embeddings")  # config.json's, compared
TINY = ("ties", "passthrough slices, filtered scale")
# (label, checkpoints' suffix, our dtype line, mergekit's dtype line)
SETTINGS = [
    ("float32", "_f32", "dtype: float32", "dtype: float32"),
    ("bf16", "", "dtype: bfloat16", "dtype: bfloat16"),
    ("bf16, mergekit in float32", "", "dtype: bfloat16", "dtype: float32\nout_dtype: bfloat16"),
]


def shapes() -> dict:
    s = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,), "lm_head.weight": (VOCAB, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s |= {p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H // HEADS * KV, H),
              p + "self_attn.v_proj.weight": (H // HEADS * KV, H), p + "self_attn.o_proj.weight": (H, H),
              p + "mlp.gate_proj.weight": (INTER, H), p + "mlp.up_proj.weight": (INTER, H),
              p + "mlp.down_proj.weight": (H, INTER), p + "input_layernorm.weight": (H,),
              p + "post_attention_layernorm.weight": (H,)}
    return s


def write_model(path: str, tensors: dict, dtype, tied: bool = False) -> None:
    os.makedirs(path)
    tensors = {k: v.astype(dtype) for k, v in tensors.items() if not (tied and k == "lm_head.weight")}
    names = sorted(tensors)
    index = {"metadata": {}, "weight_map": {}}
    for j, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, os.path.join(path, file), metadata={"format": "pt"})
        index["weight_map"] |= {k: file for k in part}
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "max_position_embeddings": 128, "tie_word_embeddings": tied,
              "torch_dtype": "float32" if dtype == np.float32 else "bfloat16"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def write_adapter(path: str, rng, rank: int, alpha: float, rslora: bool) -> None:
    """A peft LoRA adapter (float32 factors) on ``q_proj``, ``v_proj`` and ``down_proj``."""
    os.makedirs(path)
    sh, factors = shapes(), {}
    for name in sh:
        if name.endswith(("q_proj.weight", "v_proj.weight", "down_proj.weight")):
            out, inp = sh[name]
            stem = "base_model.model." + name[: -len(".weight")]
            factors[stem + ".lora_A.weight"] = (0.1 * rng.standard_normal((rank, inp))).astype(np.float32)
            factors[stem + ".lora_B.weight"] = (0.02 * rng.standard_normal((out, rank))).astype(np.float32)
    save_file(factors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
              "lora_dropout": 0.0, "bias": "none", "target_modules": ["q_proj", "v_proj", "down_proj"]}
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(config, f)


def make_workload(root: str, seed: int = 0) -> None:
    """``base``, ``ft0..2`` and ``ft0_tied`` in bf16, and each again in float32
    (``_f32``); two LoRA adapters for the base, ``lora`` and ``rslora``."""
    rng = np.random.default_rng(seed)
    sh = shapes()
    base = {k: (1 + 0.1 * rng.standard_normal(s) if len(s) == 1 else 0.05 * rng.standard_normal(s)).astype(np.float32)
            for k, s in sh.items()}
    shared = {k: 0.005 * rng.standard_normal(s) for k, s in sh.items()}
    fts = [{k: (base[k] + shared[k] + 0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in sh.items()}
           for _ in range(3)]
    for dtype, suffix in ((BF16, ""), (np.float32, "_f32")):
        write_model(os.path.join(root, "base" + suffix), base, dtype)
        for i, ft in enumerate(fts):
            write_model(os.path.join(root, f"ft{i}{suffix}"), ft, dtype)
        write_model(os.path.join(root, "ft0_tied" + suffix), fts[0], dtype, tied=True)
    write_adapter(os.path.join(root, "lora"), rng, 4, 8.0, False)
    write_adapter(os.path.join(root, "rslora"), rng, 16, 8.0, True)


def load(path: str) -> dict:
    out = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out |= load_file(file)
    return out


def ulps(a: np.ndarray, b: np.ndarray) -> float:
    """The largest ``|a - b|`` in units in the last place of the largest ``|a|`` (the
    tensor's scale, at ``a``'s dtype: 23 fraction bits for float32, 7 for bf16)."""
    fraction_bits = {np.dtype(np.float32): 23, np.dtype(BF16): 7}[a.dtype]
    a, b = a.astype(np.float64), b.astype(np.float64)
    scale = np.max(np.abs(a))
    if scale == 0:
        return np.inf if np.any(b) else 0.0
    ulp = 2.0 ** (np.frexp(scale)[1] - 1 - fraction_bits)
    return float(np.max(np.abs(a - b)) / ulp)


def tied_cut(tau: np.ndarray, density: float, gamma) -> bool:
    """Whether one of the trim's cuts on ``tau`` falls inside a run of equal |tau|."""
    mags = np.sort(np.abs(tau.astype(np.float32)).ravel())[::-1]
    n = mags.size
    if gamma is None:  # mergekit's counts: TIES keeps at least one entry, breadcrumbs may keep none
        cuts = [min(n, max(1, int(density * n)))]
    else:
        keep, top = int(density * n), int(gamma * n)
        top = min(top, n - keep)
        cuts = [top, top + keep]
    return any(0 < k < n and mags[k - 1] == mags[k] for k in cuts)


def compare(ref_dir: str, ours_dir: str, work: str, suffix: str, trims) -> dict:
    ref, ours = load(ref_dir), load(ours_dir)
    if set(ref) != set(ours):
        raise SystemExit(f"tensor names differ: reference only {sorted(set(ref) - set(ours))}, "
                         f"ours only {sorted(set(ours) - set(ref))}")
    configs = []
    for d in (ref_dir, ours_dir):
        with open(os.path.join(d, "config.json")) as f:
            configs.append(json.load(f))
    row = {"entries": 0, "differ": 0, "max_ulps": 0.0, "tensors": 0, "tied": 0,
           "config": {k: (configs[0].get(k), configs[1].get(k)) for k in CONFIG_KEYS
                      if configs[0].get(k) != configs[1].get(k)}}
    base = load(os.path.join(work, "base" + suffix)) if isinstance(trims, list) else None
    fts = {m: load(os.path.join(work, m + suffix)) for m, _, _ in trims} if isinstance(trims, list) else None
    for name in sorted(ref):
        a, b = ref[name], ours[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            raise SystemExit(f"{name}: reference {a.dtype}{a.shape}, ours {b.dtype}{b.shape}")
        differ = int(np.count_nonzero(a.astype(np.float64) != b.astype(np.float64)))
        row["entries"] += a.size
        row["differ"] += differ
        row["max_ulps"] = max(row["max_ulps"], ulps(a, b))
        if differ:
            row["tensors"] += 1
            if fts is not None:
                tau = lambda m: fts[m][name].astype(np.float32) - base[name].astype(np.float32)
                row["tied"] += any(tied_cut(tau(m), dens, g) for m, dens, g in trims)
    return row


def run(cmd: list[str], config: str, out: str) -> None:
    proc = subprocess.run([*cmd, config, out], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{shlex.join(cmd)} {config} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def versions(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    python = exe and os.path.join(os.path.dirname(exe), "python")
    if not python or not os.path.exists(python):
        return os.path.basename(cmd[0])
    code = ("import importlib.metadata as m\nfor p in ('mergekit', 'torch'):\n"
            "    try: print(p, m.version(p))\n    except m.PackageNotFoundError: pass")
    got = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.split("\n")
    return ", ".join(line for line in got if line) or os.path.basename(cmd[0])


def run_pair(work: str, where: str, cmds, texts) -> tuple[str, str]:
    """Each tool's merge of its YAML (models given relative to ``work``): the two output dirs."""
    os.makedirs(where)
    outs = []
    for who, cmd, text in zip(("ref", "ours"), cmds, texts):
        config = os.path.join(where, f"{who}.yaml")
        with open(config, "w") as f:  # models by absolute path: mergekit reads them from its cwd
            f.write(text.replace("model: ", f"model: {work}/") + "\n")
        run(cmd, config, os.path.join(where, who))
        outs.append(os.path.join(where, who))
    return outs[0], outs[1]


def random_rows(work: str, cmds) -> list[str]:
    """The random methods draw from different generators (torch's, JAX's), so they can
    agree only in distribution: per case, the share of entries the merge changes and
    the mean ``|out - base|`` of each 2-D tensor, ours over mergekit's; for DELLA, the
    share of one model's entries kept in each decile of the magnitude rank in its row."""
    base = load(os.path.join(work, "base_f32"))
    lines = ["| case (float32) | entries changed, reference | ours | mean abs(out - base) per tensor, ours / reference: "
             "mean (min-max) |", "|---|---:|---:|---|"]
    for case, text in RANDOM.items():
        outs = [load(d) for d in run_pair(work, os.path.join(work, f"r{len(lines)}"), cmds, [text] * 2)]
        changed = [np.mean([np.mean(o[k] != base[k]) for k in base]) for o in outs]
        ratio = np.array([np.mean(np.abs(outs[1][k] - base[k])) / np.mean(np.abs(outs[0][k] - base[k]))
                          for k in base if base[k].ndim == 2])
        lines.append(f"| {case} | {100 * changed[0]:.2f}% | {100 * changed[1]:.2f}% | "
                     f"{ratio.mean():.4f} ({ratio.min():.3f}-{ratio.max():.3f}) |")
        print(lines[-1], flush=True)
    ft = load(os.path.join(work, "ft0_f32"))
    outs = [load(d) for d in run_pair(work, os.path.join(work, "della-ranks"), cmds, [DELLA_RANKS] * 2)]
    kept = np.zeros((2, 10))
    count = np.zeros(10)
    for k in (k for k in base if base[k].ndim == 2):
        tau = ft[k] - base[k]
        rank = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1) / (tau.shape[1] - 1)
        decile = np.minimum((rank * 10).astype(int), 9)
        count += np.bincount(decile.ravel(), minlength=10)
        for j, o in enumerate(outs):
            kept[j] += np.bincount(decile.ravel(), weights=(o[k] != base[k]).ravel(), minlength=10)
    lines += ["", "DELLA (`della_linear`, one model, density 0.5, epsilon 0.3, float32): the share of entries kept "
              "in each decile of |delta|'s rank in its row", "",
              "| | " + " | ".join(f"{q + 1}" for q in range(10)) + " |", "|---|" + "---:|" * 10]
    for label, row in (("reference", kept[0] / count), ("ours", kept[1] / count),
                       ("expected: 0.5 - 0.3 + 0.6 * rank / (n - 1)", 0.2 + 0.6 * (np.arange(10) + 0.5) / 10)):
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in row) + " |")
    print("\n".join(lines[-3:]), flush=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit", required=True,
                    help="the reference command, CONFIG and OUT appended (e.g. '/tmp/mk/bin/mergekit-yaml --quiet')")
    ap.add_argument("--ours", default=f"{sys.executable} -m research.merging --no-progress")
    ap.add_argument("--tiny", action="store_true", help=f"only {TINY}, float32, and no random method")
    ap.add_argument("--write", default=None, help="also write the tables, with the command, to this Markdown file")
    args = ap.parse_args(argv)
    cmds = shlex.split(args.mergekit), shlex.split(args.ours)
    cases = {k: v for k, v in CASES.items() if not args.tiny or k in TINY}
    settings = SETTINGS[:1] if args.tiny else SETTINGS
    lines = ["| case | checkpoints, dtype | entries that differ | largest difference (ulps at the tensor's scale) "
             "| tensors that differ | of those, with a tie at a trim's cut | config.json: reference / ours |",
             "|---|---|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory(prefix="mergekit-parity-") as work:
        make_workload(work)
        for label, suffix, ours_dt, ref_dt in settings:
            for case, (text, trims) in cases.items():
                texts = [text.format(s=suffix, dt=dt, w=work) for dt in (ref_dt, ours_dt)]
                ref, ours = run_pair(work, os.path.join(work, f"{len(lines)}"), cmds, texts)
                r = compare(ref, ours, work, suffix, trims)
                tied = "-" if not isinstance(trims, list) else f"{r['tied']}"
                config = ", ".join(f"`{k}` {a} / {b}" for k, (a, b) in r["config"].items()) or "same"
                lines.append(f"| {case} | {label} | {r['differ']} of {r['entries']} "
                             f"({100 * r['differ'] / r['entries']:.2f}%) | {r['max_ulps']:.3g} | {r['tensors']} | {tied} "
                             f"| {config} |")
                print(lines[-1], flush=True)
        if not args.tiny:
            lines += ["", *random_rows(work, cmds)]
    table = "\n".join(lines)
    print("\n" + table)
    if args.write:
        command = "python experiments/mergekit_parity.py " + shlex.join(sys.argv[1:] if argv is None else argv)
        head = (f"# research-merge against {versions(cmds[0])}\n\n"
                f"```\n{command}\n```\n\n{datetime.date.today()}. Written by `experiments/mergekit_parity.py`; "
                "its docstring says what each column means and what to expect.\n\n")
        tmp = args.write + ".tmp"
        with open(tmp, "w") as f:
            f.write(head + table + "\n")
        os.replace(tmp, args.write)


if __name__ == "__main__":
    main()
