"""The whole seed end to end (what ``make demo`` runs): pretrain, fine-tune per task
with packing and NEFTune, task vectors, merges, the TIES-paper table.

    python experiments/quickstart.py --force            # ~6 min on a 2-core CPU (make demo)
    python experiments/quickstart.py --tiny --force     # smoke variant (~1.5 min)

Stages (each with a progress bar):

1. Pretrain a small base model briefly on a mixture of all tasks (the
   "pre-trained" model whose task vectors we take).
2. Fine-tune one model per task from that base, packed, with NEFTune.
3. Task vectors: pairwise cosines and sign-conflict rates (after trimming to 20%).
4. Merge with ``linear``, ``task_arithmetic``, ``ties`` and ``dare_ties``; lambda
   and density are chosen on a validation slice of each task's held-out split,
   as the TIES paper does.
5. Evaluate base, fine-tuned and merged models on every task (exact match on a
   disjoint test slice): absolute accuracy per task and the average normalised
   accuracy (merged / fine-tuned, over tasks whose fine-tuned accuracy is > 0).
6. Write ``runs/quickstart/results.json`` and ``runs/quickstart/merge_table.png``.

Deterministic for a seed.  The README shows the table it printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from research import merging
from research.data import tokenizers
from research.training import TrainConfig, train
from research.training.evaluate import evaluate


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    tasks: tuple = ("copy", "reverse", "sort", "cipher", "add", "g2p", "p2g")  # the whole embedded suite
    model: str = "small"
    seq_len: int = 128
    batch_size: int = 16
    task_len: tuple = (3, 8)  # characters in generated task strings
    pretrain_steps: int = 900
    finetune_steps: int = 180
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    neftune_alpha: float = 5.0
    val_samples: int = 16
    test_samples: int = 48
    max_new_tokens: int = 40  # a cap; each task stops one token past its longest reference
    lambdas: tuple = (0.6, 1.0, 1.4)
    densities: tuple = (0.2, 0.4)
    seed: int = 0


TINY = QuickstartConfig(tasks=("copy", "reverse", "g2p"), model="tiny", pretrain_steps=40, finetune_steps=15,
                        val_samples=8, test_samples=8, lambdas=(1.0,), densities=(0.2,), max_new_tokens=24)


def _train_cfg(q: QuickstartConfig, tasks, steps, lr, alpha, init_from=None):
    return TrainConfig(
        model=q.model, tasks=tuple(tasks), task_lengths=tuple((t, *q.task_len) for t in tasks),
        seq_len=q.seq_len, batch_size=q.batch_size, chunk_size=64, steps=steps, lr=lr,
        warmup_steps=max(1, steps // 10), neftune_alpha=alpha, seed=q.seed, save_every=0, keep=1,
        log_every=max(1, steps // 10), init_from=init_from, mesh=(-1, 1, 1),
    )


def _evaluate(graphdef, params, q, tok, samples, offset):
    from research.data.tasks import make_task

    tasks = [make_task(t, min_len=q.task_len[0], max_len=q.task_len[1]) for t in q.tasks]
    res = evaluate(graphdef, params, tasks, tok, samples=samples, max_new_tokens=q.max_new_tokens,
                   seq_len=q.seq_len, offset=offset)
    return {t: res[t]["accuracy"] for t in q.tasks}, {t: res[t]["loss"] for t in q.tasks}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the smoke-test variant")
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    args = ap.parse_args(argv)
    q = dataclasses.replace(TINY if args.tiny else QuickstartConfig(), seed=args.seed)
    out = args.out
    if os.path.exists(out):
        if not args.force:
            raise SystemExit(f"{out} exists: pass --force to replace it (make demo does), or --out elsewhere")
        shutil.rmtree(out)  # a fresh, deterministic run every time
    os.makedirs(out)
    tok = tokenizers.ByteTokenizer()
    timings = {}
    VAL, TEST = 10_000, 0  # disjoint slices of each task's held-out split

    t0 = time.perf_counter()
    print(f"[1/6] pretraining the base on {', '.join(q.tasks)}")
    base = train(_train_cfg(q, q.tasks, q.pretrain_steps, q.pretrain_lr, 0.0), f"{out}/base", evaluate_at_end=False)
    graphdef = base.graphdef
    timings["pretrain"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print(f"[2/6] fine-tuning one model per task (packed, NEFTune alpha={q.neftune_alpha})")
    finetuned = {}
    for task in q.tasks:
        r = train(_train_cfg(q, (task,), q.finetune_steps, q.finetune_lr, q.neftune_alpha, init_from=f"{out}/base"),
                  f"{out}/ft_{task}", evaluate_at_end=False)
        finetuned[task] = r.params
    timings["finetune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("[3/6] task vectors")
    base_p = jax.device_get(base.params)
    fts = [jax.device_get(finetuned[t]) for t in q.tasks]
    tvs = [merging.task_vector(f, base_p) for f in fts]
    cos = merging.cosine_similarity(tvs)
    conflicts = {}
    for (i, a), (j, b) in itertools.combinations(enumerate(q.tasks), 2):
        conflicts[f"{a}/{b}"] = merging.sign_conflicts([tvs[i], tvs[j]], density=0.2)["overall"]
    overall_conflict = merging.sign_conflicts(tvs, density=0.2)["overall"]
    w = max(len(t) for t in q.tasks)
    print("pairwise cosine of task vectors:")
    print(" " * (w + 2) + " ".join(f"{t[:7]:>7}" for t in q.tasks))
    for t, row in zip(q.tasks, cos):
        print(f"  {t:<{w}} " + " ".join(f"{c:7.3f}" for c in row))
    print(f"sign-conflict rate after trimming to 20%: all tasks {overall_conflict:.2%}; "
          + ", ".join(f"{k} {v:.2%}" for k, v in conflicts.items()))
    timings["task_vectors"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("[4/6] merging; lambda and density chosen on the validation slice")
    grids = {
        "linear": [{}],
        "task_arithmetic": [{"lam": l} for l in q.lambdas],
        "ties": [{"lam": l, "density": d} for l in q.lambdas for d in q.densities],
        "dare_ties": [{"lam": l, "density": d} for l in q.lambdas for d in q.densities],
    }
    n = len(q.tasks)
    merged, chosen, val_scores = {}, {}, {}
    bar = tqdm(total=sum(len(g) for g in grids.values()), desc="merge grid")
    for method, grid in grids.items():
        best = None
        for params in grid:
            kw = {"key": jax.random.key(q.seed)} if method == "dare_ties" else {}
            if method == "linear":
                m = merging.merge("linear", fts)
            else:
                # weights 1/n: the lambda grid then scales the *mean* task vector
                m = merging.merge(method, fts, base=base_p, weight=[1.0 / n] * n if method == "task_arithmetic" else 1.0,
                                  **params, **kw)
            acc, loss = _evaluate(graphdef, m, q, tok, q.val_samples, VAL)
            score = (np.mean(list(acc.values())), -np.mean(list(loss.values())))
            if best is None or score > best[0]:
                best = (score, params, m)
            bar.update(1)
        val_scores[method], chosen[method], merged[method] = best
    bar.close()
    timings["merge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    print("[5/6] evaluating every model on every task (test slice)")
    models = {"base": base_p, **{f"finetuned/{t}": f for t, f in zip(q.tasks, fts)}, **merged}
    results = {}
    for name, params in tqdm(models.items(), desc="evaluate"):
        acc, loss = _evaluate(graphdef, params, q, tok, q.test_samples, TEST)
        results[name] = {"accuracy": acc, "loss": loss}
    ft_acc = {t: results[f"finetuned/{t}"]["accuracy"][t] for t in q.tasks}
    scored = [t for t in q.tasks if ft_acc[t] > 0]
    for name, r in results.items():
        r["avg_normalized_accuracy"] = float(np.mean([r["accuracy"][t] / ft_acc[t] for t in scored])) if scored else None
    timings["evaluate"] = time.perf_counter() - t0

    print("\n| model | " + " | ".join(q.tasks) + " | avg normalised |")
    print("|---|" + "---:|" * (n + 1))
    for name in ["base", *[f"finetuned/{t}" for t in q.tasks], *grids]:
        r = results[name]
        norm = r["avg_normalized_accuracy"]
        label = name if name not in chosen else f"{name} {chosen[name] or ''}".strip()
        print(f"| {label} | " + " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in q.tasks)
              + f" | {'n/a' if norm is None else f'{norm:.3f}'} |")
    print(f"(accuracy %, exact match on {q.test_samples} held-out examples per task; normalised over {scored})")

    print("[6/6] writing results")
    report = {
        "tasks": list(q.tasks),
        "models": {k: {"accuracy": v["accuracy"], "avg_normalized_accuracy": v["avg_normalized_accuracy"], "loss": v["loss"]}
                   for k, v in results.items()},
        "chosen_hyperparameters": chosen,
        "task_vector_cosines": cos.tolist(),
        "sign_conflict_rate": {"all": overall_conflict, **conflicts},
        "stage_seconds": timings,
        "config": dataclasses.asdict(q),
    }
    with open(f"{out}/results.json.tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(f"{out}/results.json.tmp", f"{out}/results.json")
    _plot(report, f"{out}/merge_table.png")
    print(f"wrote {out}/results.json and {out}/merge_table.png; stage seconds: "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    return report


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    names = ["base", "linear", "task_arithmetic", "ties", "dare_ties"]
    fig, ax = plt.subplots(figsize=(1.6 * len(tasks) + 3, 4))
    width = 0.8 / (len(names) + 1)
    xs = np.arange(len(tasks))
    ft = [report["models"][f"finetuned/{t}"]["accuracy"][t] for t in tasks]
    ax.bar(xs, ft, width, label="fine-tuned (own task)", color="black", alpha=0.7)
    for i, name in enumerate(names):
        ax.bar(xs + (i + 1) * width, [report["models"][name]["accuracy"][t] for t in tasks], width, label=name)
    ax.set_xticks(xs + width * len(names) / 2, tasks)
    ax.set_ylabel("exact-match accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("Merging per-task fine-tunes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
