"""research-merge's leaf functions against mergekit's own on 3-D (fused-expert) tensors.

    python -m venv /tmp/mk/venv && /tmp/mk/venv/bin/pip install mergekit   # brings PyTorch: not our dependency
    python experiments/mergekit_functions.py --mergekit-python /tmp/mk/venv/bin/python \\
        --write results/mergekit_functions_3d.md
    python experiments/mergekit_functions.py --mergekit-python none        # our side alone (a smoke run)

``mergekit_parity.py`` compares whole merges of Llama-shaped checkpoints,
whose tensors have one or two axes.  A fused-expert tensor (``[experts, out,
in]``) is where a method's axis conventions show: which axis DELLA ranks
along, which rows Model Stock's ``filter_wise`` takes a ratio for, whether a
trim ranks the tensor flat.  This script gives the same float32 base and
three fine-tunes of such a tensor to mergekit's functions, called in
mergekit's own Python (``--mergekit-python``), and to research-merge's, and
reports how far the outputs are apart:

* TIES's trim (``sparsify.magnitude``), breadcrumbs' (``magnitude_outliers``)
  of each task vector, and Model Stock with and without ``filter_wise``:
  the largest ``|difference|`` and how many entries differ.  Expected: the
  trims equal (the entries are distinct), Model Stock within a few float32
  ulps (the order of the sums).
* DELLA (``della_magprune``), random in both tools: over ``--draws`` draws,
  the share of entries kept in each decile of their magnitude rank along
  axis 1 (``x[e, :, j]``), against ``density - epsilon + 2 epsilon rank /
  (n - 1)``.  Expected: both within sampling noise of that line, which they
  follow only if both rank along the same axis.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

import numpy as np

SHAPE = (4, 32, 48)  # [experts, out, in]
DENSITY, GAMMA, EPSILON = 0.4, 0.05, 0.15

# run by --mergekit-python: mergekit's functions on the inputs in IN, outputs to OUT
MERGEKIT_SIDE = r"""
import sys, types
import numpy as np, torch
from mergekit import sparsify
import mergekit.merge_methods.model_stock as ms
x = np.load(sys.argv[1]); base, fts = x["base"], [x[f"ft{i}"] for i in range(3)]
t = lambda a: torch.tensor(a)
out = {}
for i, f in enumerate(fts):
    out[f"ties_trim_{i}"] = sparsify.magnitude(t(f - base), density=%(d)r).numpy()
    out[f"breadcrumbs_trim_{i}"] = sparsify.magnitude_outliers(t(f - base), density=%(d)r, gamma=%(g)r).numpy()
entry = lambda a: types.SimpleNamespace(tensor=t(a))
group = types.SimpleNamespace(base=entry(base), non_base=[entry(f) for f in fts])
for fw in (False, True):
    out[f"model_stock_{fw}"] = ms.model_stock_merge_method.implementation(group, filter_wise=fw).numpy()
torch.manual_seed(0)
out["della_kept"] = np.stack([sparsify.della_magprune(t(fts[0] - base), density=%(d)r, epsilon=%(e)r).numpy() != 0
                              for _ in range(int(sys.argv[3]))])
np.savez(sys.argv[2], **out)
""" % {"d": DENSITY, "g": GAMMA, "e": EPSILON}


def inputs(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=SHAPE).astype(np.float32)
    return {"base": base, **{f"ft{i}": (base + rng.normal(size=SHAPE) * 0.1).astype(np.float32) for i in range(3)}}


def ours(x: dict, draws: int) -> dict:
    import jax
    import jax.numpy as jnp

    from research import merging
    from research.merging import sparsify

    base, fts = x["base"], [x[f"ft{i}"] for i in range(3)]
    out = {}
    for i, f in enumerate(fts):
        out[f"ties_trim_{i}"] = np.asarray(sparsify.magnitude(jnp.asarray(f - base), DENSITY))
        out[f"breadcrumbs_trim_{i}"] = np.asarray(sparsify.magnitude_outliers(jnp.asarray(f - base), DENSITY, GAMMA))
    for fw in (False, True):
        out[f"model_stock_{fw}"] = np.asarray(merging.merge("model_stock", [{"w": jnp.asarray(f)} for f in fts],
                                                            base={"w": jnp.asarray(base)}, filter_wise=fw)["w"])
    tau = jnp.asarray(fts[0] - base)
    out["della_kept"] = np.stack([np.asarray(sparsify.della(tau, DENSITY, EPSILON, jax.random.key(d), rescale=False))
                                  != 0 for d in range(draws)])
    return out


def rank_deciles(tau: np.ndarray, kept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per decile of each entry's magnitude rank along axis 1: the expected keep share and
    the share ``kept`` (``[draws, *tau.shape]``) holds."""
    n = tau.shape[1]
    rank = np.argsort(np.argsort(np.abs(tau), axis=1, kind="stable"), axis=1, kind="stable")
    decile = np.minimum(rank * 10 // n, 9)
    expect = DENSITY - EPSILON + 2 * EPSILON * rank / (n - 1)
    share = kept.mean(0)
    return (np.array([expect[decile == d].mean() for d in range(10)]),
            np.array([share[decile == d].mean() for d in range(10)]))


def table(x: dict, ref: dict | None, mine: dict) -> str:
    lines = ["| case | entries that differ | largest difference |", "|---|---:|---:|"]
    for key in sorted(k for k in mine if k != "della_kept"):
        if ref is None:
            lines.append(f"| {key} | (no mergekit) | |")
            continue
        a, b = ref[key].astype(np.float64), mine[key].astype(np.float64)
        lines.append(f"| {key} | {int((a != b).sum())} of {a.size} | {np.abs(a - b).max():.3g} |")
    tau = x["ft0"] - x["base"]
    expect, share = rank_deciles(tau, mine["della_kept"])
    ref_share = rank_deciles(tau, ref["della_kept"])[1] if ref is not None else [float("nan")] * 10
    lines += ["", "DELLA's keep share by decile of the magnitude rank along axis 1 (model 0):", "",
              "| rank decile | expected | mergekit | research-merge |", "|---:|---:|---:|---:|"]
    lines += [f"| {d} | {expect[d]:.3f} | {ref_share[d]:.3f} | {share[d]:.3f} |" for d in range(10)]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mergekit-python", required=True, help="a Python with mergekit installed, or 'none'")
    ap.add_argument("--draws", type=int, default=200, help="DELLA draws per tool")
    ap.add_argument("--write", default=None, help="also write the tables, with the command, to this Markdown file")
    args = ap.parse_args(argv)
    x = inputs()
    ref, version = None, "none"
    if args.mergekit_python != "none":
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
            np.savez(src, **x)
            subprocess.run([args.mergekit_python, "-c", MERGEKIT_SIDE, src, dst, str(args.draws)], check=True)
            ref = dict(np.load(dst))
        version = subprocess.run([args.mergekit_python, "-c", "import importlib.metadata as m; "
                                  "print('mergekit', m.version('mergekit') + ',', 'torch', m.version('torch'))"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    text = (f"shape {SHAPE} float32, density {DENSITY}, gamma {GAMMA}, epsilon {EPSILON}, "
            f"{args.draws} DELLA draws; against {version}\n\n" + table(x, ref, ours(x, args.draws)))
    print(text)
    if args.write:
        cmd = "python experiments/mergekit_functions.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.write + ".tmp", "w") as f:
            f.write(f"# research-merge's leaf functions against mergekit's, on a 3-D tensor\n\n```\n{cmd}\n```\n\n"
                    f"{datetime.date.today()}. Written by `experiments/mergekit_functions.py`; its docstring says "
                    f"what to expect.\n\n{text}\n")
        os.replace(args.write + ".tmp", args.write)


if __name__ == "__main__":
    main()
