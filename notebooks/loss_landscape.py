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
# Start from the embedded suite's general base (`experiments/suite_base`:
# pretrained on English prose and six string-operation format tasks,
# `research.data.suite`), fine-tune one expert on each of two target tasks it
# never saw, with the suite's recipe (format-task replay, tied embedding
# frozen, a tenth of pretraining's learning rate), then walk the plane the
# two task vectors span: $\theta(a, b) = \theta_{base} + a\,\tau_A + b\,\tau_B$.
# Each task's held-out loss and exact match over the plane show where the two
# skills coexist, and where task arithmetic, TIES and averaging land.
# About two minutes on a 2-core CPU.

# %%
import os

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx
from IPython.display import Image

from research import merging
from research.data import pipeline, suite, tokenizers
from research.models import from_hf
from research.training import TrainConfig, train
from research.training.evaluate import evaluate

BASE = "experiments/suite_base"
STEPS = int(os.environ.get("NOTEBOOK_STEPS", "100"))
GRID = int(os.environ.get("NOTEBOOK_GRID", "6"))  # points per axis of the plane
SAMPLES = int(os.environ.get("NOTEBOOK_SAMPLES", "24"))  # held-out examples per task and point
OUT = os.environ.get("NOTEBOOK_OUT", "runs/notebook_landscape")
TARGETS = ("first", "max")
common = dict(model="small", seq_len=128, batch_size=8, chunk_size=64, save_every=0, progress=False, lr=3e-4,
              warmup_steps=max(1, STEPS // 10), task_lengths=suite.task_lengths((*suite.FORMAT_TASKS, *TARGETS)))

# %% [markdown]
# The base, and one expert per target.

# %%
graphdef, theta0 = nnx.split(from_hf(BASE), nnx.Param)
theta0 = jax.device_get(theta0)
mixes = {t: suite.finetune_mixture([t]) for t in TARGETS}
ft = {t: train(TrainConfig(tasks=tuple(mixes[t]), mixing=mixes[t], freeze=suite.FINETUNE_FREEZE, steps=STEPS,
                           init_from=BASE, **common), f"{OUT}/{t}", resume=False, evaluate_at_end=False)
      for t in TARGETS}
experts = [jax.device_get(r.params) for r in ft.values()]
tau = {t: merging.task_vector(p, theta0) for t, p in zip(TARGETS, experts)}
print(f"cosine(tau_{TARGETS[0]}, tau_{TARGETS[1]}) =", merging.cosine_similarity(list(tau.values()))[0, 1])

# %% [markdown]
# Held-out loss and exact match of each task on a grid over the plane.

# %%
tok = tokenizers.ByteTokenizer()
tasks = pipeline.tasks_of(TARGETS, suite.task_lengths(TARGETS))
score = lambda theta: evaluate(graphdef, theta, tasks, tok, samples=SAMPLES, max_new_tokens=2, seq_len=64)
grid = np.linspace(-0.5, 2.0, GRID)
loss, acc = np.zeros((2, len(grid), len(grid))), np.zeros((2, len(grid), len(grid)))
for i, a in enumerate(grid):
    for j, b in enumerate(grid):
        res = score(merging.apply(merging.apply(theta0, tau[TARGETS[0]], a), tau[TARGETS[1]], b))
        loss[:, j, i] = [res[t]["loss"] for t in TARGETS]
        acc[:, j, i] = [res[t]["accuracy"] for t in TARGETS]

# %%
merged = {"task arithmetic (λ=1)": merging.merge("task_arithmetic", experts, base=theta0, lam=1.0),
          "TIES (density 0.2, λ=1)": merging.merge("ties", experts, base=theta0, density=0.2, lam=1.0),
          "average": merging.merge("linear", experts)}
for name, m in merged.items():
    r = score(m)
    print(f"{name:24s}", {t: f"loss {r[t]['loss']:.3f}, exact match {r[t]['accuracy']:.0%}" for t in TARGETS})

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for ax, name, L, A in zip(axes, TARGETS, loss, acc):
    cs = ax.contourf(grid, grid, L, levels=12)
    fig.colorbar(cs, ax=ax, label="held-out loss")
    ax.contour(grid, grid, A, levels=[0.5], colors="w", linestyles="--")
    ax.plot([1], [1], "w*", ms=12, label="task arithmetic (1, 1)")
    ax.plot([0.5], [0.5], "ws", label="average (½, ½)")
    ax.plot([0], [0], "wo", label="base")
    ax.set(title=f"{name}: loss (dashed: 50% exact match)", xlabel=f"a ({TARGETS[0]})", ylabel=f"b ({TARGETS[1]})")
axes[0].legend(fontsize=8, loc="lower left")
fig.tight_layout()
os.makedirs(OUT, exist_ok=True)
fig.savefig(f"{OUT}/landscape.png", dpi=100)
assert np.isfinite(loss).all()
Image(f"{OUT}/landscape.png")
