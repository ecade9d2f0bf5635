# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Loss landscape of task arithmetic
#
# Pretrain a tiny model on the embedded suite's generic data (English prose and
# six string-operation format tasks, `research.data.suite`), fine-tune one expert
# on each of two target tasks it never saw (the suite's recipe: format-task
# replay, tied embedding frozen), then walk the plane the two task vectors span:
# $\theta(a, b) = \theta_{base} + a\,\tau_A + b\,\tau_B$.
# Each task's held-out loss over the plane shows where the two skills coexist,
# and where TIES (trim, elect sign, disjoint mean) lands compared with plain
# task arithmetic.  Runs on a CPU in about a minute.

# %%
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from research import merging
from research.data import pipeline, suite, tokenizers
from research.training import TrainConfig, train
from research.training.evaluate import evaluate

STEPS = int(os.environ.get("NOTEBOOK_STEPS", "40"))
OUT = os.environ.get("NOTEBOOK_OUT", "runs/notebook_landscape")
TARGETS = ("reverse", "cipher")
common = dict(model="tiny", seq_len=96, batch_size=8, chunk_size=32, save_every=0, progress=False, lr=3e-3,
              task_lengths=suite.task_lengths((*suite.FORMAT_TASKS, *TARGETS)))

# %% [markdown]
# A base pretrained on the generic mixture, then one expert per target.

# %%
base = train(TrainConfig(tasks=tuple(t for t, _ in suite.PRETRAIN_MIXTURE), mixing=dict(suite.PRETRAIN_MIXTURE),
                         steps=STEPS, **common), f"{OUT}/base", resume=False, evaluate_at_end=False)
mixes = {t: suite.finetune_mixture([t]) for t in TARGETS}
ft = {t: train(TrainConfig(tasks=tuple(mixes[t]), mixing=mixes[t], freeze=suite.FINETUNE_FREEZE, steps=STEPS // 2,
                           init_from=f"{OUT}/base", **common), f"{OUT}/{t}", resume=False, evaluate_at_end=False)
      for t in TARGETS}
theta0 = jax.device_get(base.params)
tau = {t: merging.task_vector(jax.device_get(r.params), theta0) for t, r in ft.items()}
print(f"cosine(tau_{TARGETS[0]}, tau_{TARGETS[1]}) =", merging.cosine_similarity(list(tau.values()))[0, 1])

# %% [markdown]
# Held-out loss of each task on a grid over the plane.

# %%
tok = tokenizers.ByteTokenizer()
tasks = pipeline.tasks_of(TARGETS, suite.task_lengths(TARGETS))
grid = np.linspace(-0.5, 2.0, 6)
loss = np.zeros((2, len(grid), len(grid)))
for i, a in enumerate(grid):
    for j, b in enumerate(grid):
        theta = merging.apply(merging.apply(theta0, tau[TARGETS[0]], a), tau[TARGETS[1]], b)
        res = evaluate(base.graphdef, theta, tasks, tok, samples=8, max_new_tokens=1, seq_len=96)
        loss[:, j, i] = res[TARGETS[0]]["loss"], res[TARGETS[1]]["loss"]

# %%
ties = merging.merge("ties", [jax.device_get(r.params) for r in ft.values()], base=theta0, density=0.2)
ta = merging.merge("task_arithmetic", [jax.device_get(r.params) for r in ft.values()], base=theta0)
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, name, L in zip(axes, TARGETS, loss):
    cs = ax.contourf(grid, grid, L, levels=12)
    fig.colorbar(cs, ax=ax)
    ax.plot([1], [1], "w*", ms=12, label="task arithmetic (1, 1)")
    ax.plot([0], [0], "wo", label="base")
    ax.set(title=f"{name} held-out loss", xlabel=f"a ({TARGETS[0]})", ylabel=f"b ({TARGETS[1]})")
axes[0].legend(fontsize=8)
fig.tight_layout()
os.makedirs(OUT, exist_ok=True)
fig.savefig(f"{OUT}/landscape.png", dpi=100)
for name, m in (("task_arithmetic", ta), ("ties", ties)):
    r = evaluate(base.graphdef, m, tasks, tok, samples=8, max_new_tokens=1, seq_len=96)
    print(name, {k: round(v["loss"], 3) for k, v in r.items()})
assert np.isfinite(loss).all()
