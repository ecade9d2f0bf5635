"""A small merging demo on generated weights (seconds; `make demo` runs quickstart.py).

    python experiments/merge_demo.py            # ~20 s on a 2-core CPU

Three "tasks" share one linear model ``y = x W`` (512 inputs, 128 outputs).
Each task uses its own block of input features plus a block shared by all,
and its true task vector changes 10% of the weights in its rows; the shared
rows get conflicting updates.  A "fine-tuned" model is base + true task vector
+ dense small drift (what optimisation noise looks like).  Each merge is
scored per task by how much of the fine-tuned improvement it keeps:

    normalised score = (loss_base - loss_merged) / (loss_base - loss_finetuned)

The result to expect (seed 0): ``ties`` keeps ~98% of the fine-tuned gain
(trimming drops the drift, the sign vote and disjoint mean keep the shared
rows from being counted three times); ``linear`` ~77% (every task vector
diluted to a third); ``task_arithmetic`` at lambda=1 triples the shared update
and ends worse than the base.  The random sparsifiers (DARE, DELLA) pay for
their dropped entries with rescaling noise on this small model.  The table is
deterministic for a seed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from research import merging

D_IN, D_OUT, BLOCK, TASKS = 512, 128, 96, ("task A", "task B", "task C")  # synthetic: no model is trained


def make_problem(seed: int):
    rng = np.random.default_rng(seed)
    base = {"w": rng.normal(0, 0.05, (D_IN, D_OUT)).astype(np.float32)}
    shared = slice(len(TASKS) * BLOCK, len(TASKS) * BLOCK + BLOCK)
    common = rng.normal(0, 0.5, (BLOCK, D_OUT)) * (rng.random((BLOCK, D_OUT)) < 0.3)
    targets, finetuned, inputs = [], [], []
    for t in range(len(TASKS)):
        rows = np.r_[t * BLOCK : (t + 1) * BLOCK, shared]
        delta = np.zeros((D_IN, D_OUT), np.float32)
        own = slice(t * BLOCK, (t + 1) * BLOCK)
        delta[own] = rng.normal(0, 0.5, (BLOCK, D_OUT)) * (rng.random((BLOCK, D_OUT)) < 0.3)
        # the shared rows: one common update, each task nudging it a little
        delta[shared] = common + rng.normal(0, 0.05, (BLOCK, D_OUT)) * (common != 0)
        target = base["w"] + delta
        drift = rng.normal(0, 0.02, (D_IN, D_OUT)).astype(np.float32)
        x = np.zeros((256, D_IN), np.float32)
        x[:, rows] = rng.normal(size=(256, len(rows)))
        targets.append(target)
        finetuned.append({"w": (target + drift).astype(np.float32)})
        inputs.append(x)
    return base, finetuned, targets, inputs


def task_losses(model, targets, inputs):
    return [float(jnp.mean((x @ model["w"] - x @ t) ** 2)) for t, x in zip(targets, inputs)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    base, fts, targets, inputs = make_problem(args.seed)
    key = jax.random.key(args.seed)
    recipes = {
        "linear": dict(),
        "task_arithmetic": dict(lam=1.0),
        "task_arithmetic (lam=0.5)": dict(lam=0.5),
        "ties": dict(density=0.2, lam=1.0),
        "ties (paper: global trim)": dict(density=0.2, lam=1.0, trim="global"),
        "dare_ties (w=1/3)": dict(density=0.5, weight=1 / 3),
        "breadcrumbs_ties (w=1/3)": dict(density=0.2, gamma=0.01, weight=1 / 3),
        "della": dict(density=0.5, epsilon=0.1, lam=1.0),
        "model_stock": dict(),
    }
    loss_base = task_losses(base, targets, inputs)
    loss_ft = [task_losses(f, [t], [x])[0] for f, t, x in zip(fts, targets, inputs)]
    tvs = [merging.task_vector(f, base) for f in fts]
    cos = merging.cosine_similarity(tvs)
    conflicts = merging.sign_conflicts(tvs, density=0.2)["overall"]
    print("task-vector cosines:\n" + "\n".join("  " + " ".join(f"{c:+.3f}" for c in row) for row in cos))
    print(f"sign-conflict rate after trimming to 20%: {conflicts:.3%}\n")

    header = f"| {'model':<27} | " + " | ".join(f"{t:>9}" for t in TASKS) + " | avg normalised |"
    print(header + "\n|" + "---|" * (len(TASKS) + 2))
    print(f"| {'base':<27} | " + " | ".join(f"{v:9.4f}" for v in loss_base) + f" | {0.0:14.3f} |")
    print(f"| {'fine-tuned (own task)':<27} | " + " | ".join(f"{v:9.4f}" for v in loss_ft) + f" | {1.0:14.3f} |")
    results = {}
    for name, params in recipes.items():
        method = name.split(" ")[0]
        kw = {"key": key} if method in merging.RANDOM_METHODS else {}
        merged = merging.merge(method, fts, base=None if method == "linear" else base, **params, **kw)
        losses = task_losses(merged, targets, inputs)
        norm = np.mean([(b - m) / (b - f) for b, m, f in zip(loss_base, losses, loss_ft)])
        results[name] = norm
        print(f"| {name:<27} | " + " | ".join(f"{v:9.4f}" for v in losses) + f" | {norm:14.3f} |")
    print("\n(per-task loss, lower is better; normalised = share of the fine-tuned gain kept)")
    return results


if __name__ == "__main__":
    main()
