"""The embedded suite end to end (what ``make demo`` runs): a general base, one
expert per target task, a multi-task fine-tune, task vectors, merges, and the
TIES paper's table with error bars.

    python experiments/quickstart.py --force              # one seed (make demo)
    python experiments/quickstart.py --seeds 3 --force    # results/quickstart_3seeds.json (the README table)
    python experiments/quickstart.py --tiny --force       # smoke variant for the tests

One seed is one full pipeline (pretrain -> fine-tune -> merge); ``--seeds K``
runs seeds 0..K-1 and reports mean +- std over them.  Stages:

1. **Pretrain** a small byte-level model on generic data (``research.data.suite``:
   English prose and six string-operation format tasks; no target is ever seen).
2. **Experts**: one fine-tune per candidate task, packed, with ``replay`` of
   each batch replaying the format tasks and the tied embedding frozen; the
   ``neftune_control`` tasks are also fine-tuned with NEFTune at
   ``neftune_alpha``.  The alpha with the lower mean validation loss (noise
   off) on them, alpha = 0 against ``neftune_alpha``, is used from here on
   (if NEFTune wins, the other candidates are fine-tuned again with it).
3. **Gates** on the validation split: base <= 20% and expert >= 70% and
   >= base + 50 points.  A candidate that fails any of them, in any seed, is
   not a target: it goes to the appendix rows and is not merged.
4. **Multi-task** fine-tune on all targets with the experts' total budget.
5. **Diagnostics**: ||tau|| / ||theta_0||, pairwise cosines, sign conflicts
   among entries kept by both task vectors (with the chance rate), and the
   share of each model's kept entries that TIES's sign election discards.
6. **Merges**: ``linear``, ``task_arithmetic``, ``ties`` (mergekit's per-tensor
   trim and the paper's global trim), ``dare_ties``, ``dare_linear``.  lambda,
   density and drop rate are chosen on the validation split; a grid whose
   optimum lies on its edge is extended (recorded in ``results.json``).
7. **Test**: exact match on >= 200 test examples per target (disjoint from
   training and validation); normalised accuracy = merged / expert, per task,
   averaged over the targets.

Writes ``<out>/results.json`` and ``<out>/merge_table.png``; with
``--seeds K > 1`` also ``results/quickstart_<K>seeds.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from research import merging
from research.data import pipeline, suite, tokenizers
from research.training import TrainConfig, train
from research.training.evaluate import evaluate

PAPER_CLAIM = ("TIES paper (Yadav et al. 2023, Table 1): ties > task_arithmetic > linear (averaging); every merge "
               "below the experts and the multitask model, and above the base")
# the claim as pairwise comparisons of average normalised accuracy: (better, worse)
CLAIMED = (("ties", "task_arithmetic"), ("ties_global", "task_arithmetic"), ("task_arithmetic", "linear"),
           ("linear", "base"), ("multitask", "ties"))
MERGES = ("linear", "task_arithmetic", "ties", "ties_global", "dare_ties", "dare_linear")


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    candidates: tuple = suite.CANDIDATES
    pretrain_mixture: tuple = suite.PRETRAIN_MIXTURE
    model: str = "small"
    seq_len: int = 128
    pretrain_batch: int = 16
    pretrain_steps: int = 400
    pretrain_lr: float = 3e-3
    finetune_batch: int = 8
    finetune_steps: int = 130
    finetune_lr: float = 1e-3
    replay: float = suite.REPLAY  # share of each fine-tune batch replaying the pretraining format tasks
    finetune_freeze: tuple = suite.FINETUNE_FREEZE
    # NEFTune's noise norm per token is alpha / sqrt(3 L); at our L ~ 15 tokens
    # alpha = 1 gives ~0.15, the paper's ratio at alpha = 5, L ~ 300.
    neftune_alpha: float = 1.0
    # these candidates are also fine-tuned at neftune_alpha (every seed): the control that picks alpha
    neftune_control: tuple = ("sort",)
    val_samples: int = 48
    test_samples: int = 200
    max_new_tokens: int = 16
    gates: suite.Gates = suite.Gates()
    # task_arithmetic / dare_linear scale the *sum* of task vectors; the TIES
    # family (disjoint mean) and dare_ties (normalize: true) scale a mean.
    lambdas_sum: tuple = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
    lambdas_mean: tuple = (0.5, 1.0, 1.5)
    densities: tuple = (0.1, 0.2, 0.4)
    max_extensions: int = 3
    progress: bool = True


TINY = QuickstartConfig(candidates=("reverse", "cipher"), neftune_control=("cipher",), model="tiny", pretrain_steps=30, finetune_steps=10,
                        val_samples=8, test_samples=8, max_new_tokens=8, lambdas_sum=(0.5, 1.0), lambdas_mean=(1.0,),
                        densities=(0.5,), max_extensions=1,
                        gates=suite.Gates(base_max=1.0, expert_min=0.0, margin=-1.0))  # smoke: every candidate passes


class Stage:
    """A progress bar on a terminal; one line per stage otherwise."""

    def __init__(self, name: str, total: int, timings: dict):
        self.name, self.timings, self.t0 = name, timings, time.perf_counter()
        self.bar = tqdm(total=total, desc=name, dynamic_ncols=True) if sys.stdout.isatty() else None
        if self.bar is None:
            print(f"[{name}] {total} step(s)", flush=True)

    def update(self, note: str = ""):
        if self.bar is not None:
            self.bar.set_postfix_str(note)
            self.bar.update(1)

    def close(self, summary: str = ""):
        dt = time.perf_counter() - self.t0
        self.timings[self.name] = self.timings.get(self.name, 0.0) + dt
        if self.bar is not None:
            self.bar.close()
        print(f"[{self.name}] done in {dt:.0f} s{'; ' + summary if summary else ''}", flush=True)


def _train_cfg(q: QuickstartConfig, seed, tasks, steps, lr, batch, alpha, init_from=None, mixing="temperature",
               freeze=()):
    return TrainConfig(
        model=q.model, tasks=tuple(tasks), task_lengths=suite.task_lengths(tasks), mixing=mixing, freeze=tuple(freeze),
        seq_len=q.seq_len, batch_size=batch, chunk_size=64, steps=steps, lr=lr, warmup_steps=max(1, steps // 10),
        neftune_alpha=alpha, seed=seed, save_every=0, keep=1, log_every=max(1, steps // 10), init_from=init_from,
        mesh=(-1, 1, 1), progress=False,
    )


class Evaluator:
    def __init__(self, q: QuickstartConfig, graphdef):
        self.q, self.graphdef, self.tok = q, graphdef, tokenizers.ByteTokenizer()

    def __call__(self, params, tasks, split):
        n = self.q.val_samples if split == "val" else self.q.test_samples
        res = evaluate(self.graphdef, params, pipeline.tasks_of(tasks, suite.task_lengths(tasks)), self.tok, samples=n,
                       max_new_tokens=self.q.max_new_tokens, seq_len=self.q.seq_len, split=split)
        return {t: res[t]["accuracy"] for t in tasks}, {t: res[t]["loss"] for t in tasks}


# --- merges and their validation search ------------------------------------------------


def _merge(name, fts, base, hp, seed):
    n = len(fts)
    if name == "linear":
        return merging.merge("linear", fts)
    if name == "task_arithmetic":
        return merging.merge("task_arithmetic", fts, base=base, weight=1.0, lam=hp["lam"])
    if name in ("ties", "ties_global"):
        return merging.merge("ties", fts, base=base, weight=1.0, lam=hp["lam"], density=hp["density"],
                             trim="global" if name == "ties_global" else "tensor")
    key = jax.random.key(seed)
    if name == "dare_ties":
        return merging.merge("dare_ties", fts, base=base, weight=1.0, normalize=True, lam=hp["lam"],
                             density=hp["density"], key=key)
    if name == "dare_linear":
        return merging.merge("dare_linear", fts, base=base, weight=[1.0] * n, lam=hp["lam"], density=hp["density"],
                             key=key)
    raise ValueError(name)


def _grid(q: QuickstartConfig, name):
    lam = q.lambdas_sum if name in ("task_arithmetic", "dare_linear") else q.lambdas_mean
    if name == "linear":
        return {}
    if name == "task_arithmetic":
        return {"lam": list(lam)}
    return {"lam": list(lam), "density": list(q.densities)}


def _extend(axis, values, at_low):
    """One more value past the edge of a grid axis, or None at a hard bound."""
    if axis == "density":
        if at_low:
            return round(values[0] / 2, 4) if values[0] > 0.01 else None
        return min(1.0, round(values[-1] * 2, 4)) if values[-1] < 1.0 else None
    return round(values[0] / 2, 4) if at_low else round(values[-1] * 1.5, 4)


def search(name, q, fts, base, seed, score, stage):
    """Grid search on validation; extends an axis whose optimum is on its edge.

    lambda is the final scale of every method here (``theta_base + lam * mixed``),
    so one merge at lam = 1 per density serves the whole lambda axis; the
    chosen point is then merged for real.  Returns ``(best_hparams,
    best_params, record)``.
    """
    grid = _grid(q, name)
    tried, extensions, unit = {}, [], {}

    def run_all():
        for values in itertools.product(*grid.values()):
            hp = dict(zip(grid, values))
            k = tuple(sorted(hp.items()))
            if k in tried:
                continue
            if "lam" in hp:
                rest = tuple(sorted((a, v) for a, v in hp.items() if a != "lam"))
                if rest not in unit:
                    unit[rest] = merging.task_vector(_merge(name, fts, base, {**hp, "lam": 1.0}, seed), base)
                m = merging.apply(base, unit[rest], hp["lam"])
            else:
                m = _merge(name, fts, base, hp, seed)
            tried[k] = score(m)
            stage.update(f"{name} {hp}")

    run_all()
    for _ in range(q.max_extensions):
        best = dict(max(tried, key=lambda k: tried[k]))
        grown = False
        for axis, value in best.items():
            values = grid[axis]
            for at_low in [low for low, edge in ((True, values[0]), (False, values[-1])) if value == edge]:
                new = _extend(axis, values, at_low)
                if new is not None and new not in grid[axis]:
                    grid[axis] = sorted(grid[axis] + [new])
                    extensions.append({"axis": axis, "edge": value, "added": new})
                    grown = True
        if not grown:
            break
        run_all()
    best = max(tried, key=lambda k: tried[k])
    hp = dict(best)
    record = {"grid": {a: list(v) for a, v in grid.items()}, "extensions": extensions,
              "optimum_on_edge": {a: v in (grid[a][0], grid[a][-1]) for a, v in hp.items()},
              "val_accuracy": tried[best][0], "val_loss": -tried[best][1]}
    return hp, _merge(name, fts, base, hp, seed), record


# --- one seed ------------------------------------------------------------------------


def run_seed(q: QuickstartConfig, seed: int, out: str, timings: dict) -> dict:
    """Pretrain -> experts -> gates' measurements -> per-seed models.  Merges run later,
    once the targets (candidates passing in every seed) are known."""
    d = f"{out}/seed{seed}"
    st = Stage(f"seed {seed}: pretrain", 1, timings)
    base = train(_train_cfg(q, seed, [t for t, _ in q.pretrain_mixture], q.pretrain_steps, q.pretrain_lr,
                            q.pretrain_batch, 0.0, mixing=dict(q.pretrain_mixture)), f"{d}/base", evaluate_at_end=False)
    st.update()
    st.close(f"final loss {base.history[-1]['loss']:.3f}")
    base_p = jax.device_get(base.params)
    runs = [(0.0, t) for t in q.candidates]  # every candidate without noise; NEFTune on the control tasks
    if q.neftune_alpha > 0:
        runs += [(q.neftune_alpha, t) for t in q.neftune_control]
    st = Stage(f"seed {seed}: experts", len(runs), timings)
    run = {"graphdef": base.graphdef, "base": base_p, "experts": {}, "val_loss": {}, "dir": d}
    for alpha, task in runs:
        train_expert(q, seed, run, alpha, task)
        st.update(f"{task} alpha={alpha:g}")
    st.close()
    return run


def _finetune_cfg(q: QuickstartConfig, seed, targets, steps, alpha, base_dir):
    mix = suite.finetune_mixture(targets, q.replay)
    return _train_cfg(q, seed, list(mix), steps, q.finetune_lr, q.finetune_batch, alpha, init_from=base_dir,
                      mixing=mix, freeze=q.finetune_freeze)


def train_expert(q: QuickstartConfig, seed: int, run: dict, alpha: float, task: str):
    r = train(_finetune_cfg(q, seed, [task], q.finetune_steps, alpha, f"{run['dir']}/base"),
              f"{run['dir']}/ft_{task}_alpha{alpha:g}", evaluate_at_end=False)
    run["experts"][alpha, task] = jax.device_get(r.params)
    run["val_loss"][alpha, task] = Evaluator(q, run["graphdef"])(run["experts"][alpha, task], [task], "val")[1][task]


def finish_seed(q, seed, run, targets, alpha, timings) -> dict:
    """Multitask, diagnostics, merges (validated), and the test table of one seed."""
    ev = Evaluator(q, run["graphdef"])
    base, d = run["base"], run["dir"]
    fts = [run["experts"][alpha, t] for t in targets]
    st = Stage(f"seed {seed}: multitask", 1, timings)
    mt = train(_finetune_cfg(q, seed, targets, q.finetune_steps * len(targets), alpha, f"{d}/base"),
               f"{d}/multitask", evaluate_at_end=False)
    st.update()
    st.close()

    st = Stage(f"seed {seed}: diagnostics", 1, timings)
    diag = diagnostics(q, base, fts, targets)
    diag.update(behaviour(ev, base, fts, targets))
    st.update()
    st.close()

    def score(m):
        acc, loss = ev(m, targets, "val")
        return float(np.mean(list(acc.values()))), -float(np.mean(list(loss.values())))

    n_points = 1 + sum(int(np.prod([len(v) for v in _grid(q, m).values()])) for m in MERGES[1:])
    st = Stage(f"seed {seed}: merge search", n_points, timings)
    models, chosen, search_log = {}, {}, {}
    for name in MERGES:
        hp, params, rec = search(name, q, fts, base, seed, score, st)
        models[name], chosen[name], search_log[name] = params, hp, rec
    st.close(", ".join(f"{k} {v}" for k, v in chosen.items() if v))

    models = {"base": base, **{f"finetuned/{t}": f for t, f in zip(targets, fts)},
              "multitask": jax.device_get(mt.params), **models}
    st = Stage(f"seed {seed}: test", len(models), timings)
    acc = {}
    for name, params in models.items():
        acc[name] = ev(params, targets, "test")[0]
        st.update(name)
    st.close()
    return {"accuracy": acc, "chosen_hyperparameters": chosen, "search": search_log, "diagnostics": diag}


def diagnostics(q, base, fts, targets):
    tvs = [merging.task_vector(f, base) for f in fts]
    base_norm = merging.norms(base)["total"]
    d = 0.2  # the TIES paper's default density
    kept = [merging.trim(tv, d) for tv in tvs]  # trimmed once; density=1 below keeps them as they are
    pairs = {f"{a}/{b}": merging.kept_sign_conflicts(kept[i], kept[j])
             for (i, a), (j, b) in itertools.combinations(enumerate(targets), 2)}
    return {
        "relative_norm": {t: merging.norms(tv)["total"] / base_norm for t, tv in zip(targets, tvs)},
        "cosine": merging.cosine_similarity(tvs).tolist(),
        "density": d,
        "kept_sign_conflicts": pairs,
        "ties_election_discards": dict(zip(targets, merging.election_discards(kept, density=1.0))),
        "ties_global_election_discards": dict(zip(targets, merging.election_discards(tvs, density=d, trim_mode="global"))),
    }


SCALES = (0.25, 0.5, 0.75, 1.0)


def behaviour(ev, base, fts, targets):
    """What the merges inherit, measured on validation:

    * ``scale_curve[task][s]``: exact match of ``theta_0 + s * tau_task`` on its own
      task.  A merge that averages (or scales by lambda < 1) gives each task
      vector a share ``s < 1``; this is what that share alone keeps.
    * ``format_retention``: mean exact match over the pretraining format tasks
      of the base and of each expert (did the expert keep the base's other
      instructions, or does it apply its operation to every prompt?).
    * ``merge_size_curve[method][k]``: mean exact match over the first ``k``
      targets of ``task_arithmetic`` (the sum, lambda = 1) and ``ties``
      (density 0.2, lambda = 1) of their ``k`` experts; ``k = 1`` is the
      expert itself.  Fixed settings, not validated: it shows how the skills
      survive as experts are added.
    """
    tvs = [merging.task_vector(f, base) for f in fts]
    curve = {t: {f"{s:g}": ev(merging.apply(base, tv, s), [t], "val")[0][t] for s in SCALES}
             for t, tv in zip(targets, tvs)}
    fmt = list(suite.FORMAT_TASKS)
    mean_fmt = lambda p: float(np.mean(list(ev(p, fmt, "val")[0].values())))
    retention = {"base": mean_fmt(base), **{t: mean_fmt(f) for t, f in zip(targets, fts)}}
    size_curve = {"task_arithmetic": {}, "ties": {}}
    for k in range(1, len(targets) + 1):
        for name, kw in (("task_arithmetic", {}), ("ties", {"density": 0.2})):
            m = merging.merge(name, fts[:k], base=base, weight=1.0, lam=1.0, **kw)
            size_curve[name][str(k)] = float(np.mean(list(ev(m, targets[:k], "val")[0].values())))
    return {"scale_curve": curve, "format_retention": retention, "merge_size_curve": size_curve}


# --- the whole run -----------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="the smoke-test variant (relaxed gates: not a result)")
    ap.add_argument("--out", default="runs/quickstart")
    seeds = ap.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="run this one seed")
    seeds.add_argument("--seeds", type=int, help="run seeds 0..K-1 (mean +- std over them)")
    ap.add_argument("--results", help="also write the report here (default for --seeds K > 1: "
                                      "results/quickstart_<K>seeds.json)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out directory")
    args = ap.parse_args(argv)
    q = TINY if args.tiny else QuickstartConfig()
    if not set(q.neftune_control) <= set(q.candidates):
        ap.error(f"neftune_control {q.neftune_control} must be candidates ({q.candidates})")
    seed_list = list(range(args.seeds)) if args.seeds else [args.seed or 0]
    if args.seeds is not None and args.seeds < 1:
        ap.error("--seeds must be >= 1")
    results_path = args.results or (f"results/quickstart_{len(seed_list)}seeds.json" if len(seed_list) > 1 else None)
    out = args.out
    if os.path.exists(out):
        if not args.force:
            raise SystemExit(f"{out} exists: pass --force to replace it (make demo does), or --out elsewhere")
        shutil.rmtree(out)
    os.makedirs(out)
    # every fine-tune compiles the same step: keep compiled programs between runs
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("RESEARCH_JAX_CACHE", os.path.expanduser("~/.cache/research/jax")))
    timings, t_start = {}, time.perf_counter()

    runs = {s: run_seed(q, s, out, timings) for s in seed_list}

    # NEFTune: the control decides alpha (validation loss, noise off, mean over the control tasks and seeds)
    alphas = sorted({a for r in runs.values() for a, _ in r["val_loss"]})
    nef = {f"{a:g}": float(np.mean([r["val_loss"][a, t] for r in runs.values() for t in q.neftune_control]))
           for a in alphas}
    alpha = min(alphas, key=lambda a: nef[f"{a:g}"])
    print(f"NEFTune control on {', '.join(q.neftune_control)}: mean validation loss {nef} -> alpha = {alpha:g}")
    missing = [(s, t) for s, r in runs.items() for t in q.candidates if (alpha, t) not in r["experts"]]
    if missing:  # NEFTune won: the other candidates' experts are trained with it too
        st = Stage("experts at the chosen alpha", len(missing), timings)
        for s, t in missing:
            train_expert(q, s, runs[s], alpha, t)
            st.update(f"seed {s} {t}")
        st.close()

    # gates, on validation, for every seed
    gates, targets, appendix = {}, [], {}
    for task in q.candidates:
        per_seed = {}
        for s, r in runs.items():
            ev = Evaluator(q, r["graphdef"])
            b_val = ev(r["base"], [task], "val")[0][task]
            e_val = ev(r["experts"][alpha, task], [task], "val")[0][task]
            per_seed[str(s)] = q.gates.check(b_val, e_val)
        passed = all(g["passed"] for ps in per_seed.values() for g in ps.values())
        gates[task] = {"split": "val", "per_seed": per_seed, "passed": passed}
        if passed:
            targets.append(task)
        else:
            appendix[task] = {str(s): {"base": ps["base_at_most"]["value"], "expert": ps["expert_at_least"]["value"]}
                              for s, ps in per_seed.items()}
    print("gates (val): " + ", ".join(f"{t} {'pass' if g['passed'] else 'FAIL'}" for t, g in gates.items()))
    if len(targets) < 2:
        raise SystemExit(f"only {targets} passed the gates: nothing to merge (see {out})")

    per_seed = {s: finish_seed(q, s, runs[s], targets, alpha, timings) for s in seed_list}
    report = build_report(q, seed_list, targets, per_seed, gates, appendix, alpha, nef, timings)
    report["stage_seconds"]["total"] = time.perf_counter() - t_start
    print_table(report)
    _write_json(report, f"{out}/results.json")
    _plot(report, f"{out}/merge_table.png")
    if results_path:
        _write_json(report, results_path)
        _plot(report, os.path.splitext(results_path)[0] + ".png")
    print(f"wrote {out}/results.json, {out}/merge_table.png" + (f" and {results_path}" if results_path else "")
          + f"; {report['stage_seconds']['total']:.0f} s in all")
    return report


def build_report(q, seeds, targets, per_seed, gates, appendix, alpha, nef, timings):
    names = ["base", *[f"finetuned/{t}" for t in targets], "multitask", *MERGES]
    models = {}
    for name in names:
        acc = np.array([[per_seed[s]["accuracy"][name][t] for t in targets] for s in seeds])  # [seeds, tasks]
        expert = np.array([[per_seed[s]["accuracy"][f"finetuned/{t}"][t] for t in targets] for s in seeds])
        norm = (acc / np.maximum(expert, 1e-9)).mean(axis=1)  # per seed
        models[name] = {
            "accuracy": dict(zip(targets, acc.mean(0).tolist())),
            "accuracy_std": dict(zip(targets, acc.std(0).tolist())),
            "avg_normalized_accuracy": float(norm.mean()),
            "avg_normalized_accuracy_std": float(norm.std()),
            "per_seed_avg_normalized_accuracy": norm.tolist(),
        }
    return {
        "tasks": targets,
        "models": models,
        "claims": claims(models),
        "chosen_hyperparameters": {str(s): per_seed[s]["chosen_hyperparameters"] for s in seeds},
        "search": {str(s): per_seed[s]["search"] for s in seeds},
        "gates": gates,
        "appendix": appendix,
        "neftune": {"candidate_alpha": q.neftune_alpha, "mean_val_loss_by_alpha": nef, "chosen_alpha": alpha,
                    "control_tasks": list(q.neftune_control),
                    "measured_on": "validation loss of the control tasks' experts, noise off, mean over tasks and seeds"},
        "diagnostics": {str(s): per_seed[s]["diagnostics"] for s in seeds},
        "seeds": list(seeds),
        "paper_claim": PAPER_CLAIM,
        "stage_seconds": dict(timings),
        "config": {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
                   for k, v in dataclasses.asdict(q).items()},
    }


def claims(models) -> list:
    """The paper's ordering as per-seed differences of average normalised accuracy."""
    out = []
    for better, worse in CLAIMED:
        diff = (np.array(models[better]["per_seed_avg_normalized_accuracy"])
                - np.array(models[worse]["per_seed_avg_normalized_accuracy"]))
        out.append({"claim": f"{better} > {worse}", "per_seed_difference": diff.tolist(), "mean": float(diff.mean()),
                    "std": float(diff.std()), "holds_in_every_seed": bool((diff > 0).all())})
    return out


def print_table(report):
    tasks = report["tasks"]
    k = len(report["seeds"])
    print(f"\n| model | " + " | ".join(tasks) + " | avg normalised |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, r in report["models"].items():
        cells = [f"{100 * r['accuracy'][t]:.1f} ± {100 * r['accuracy_std'][t]:.1f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells)
              + f" | {r['avg_normalized_accuracy']:.3f} ± {r['avg_normalized_accuracy_std']:.3f} |")
    print(f"(exact match %, mean ± std over {k} seed(s), {report['config']['test_samples']} test examples per task)")
    for task, rows in report["appendix"].items():
        print(f"appendix: {task} failed its gates (val): " + ", ".join(
            f"seed {s}: base {100 * v['base']:.1f}%, expert {100 * v['expert']:.1f}%" for s, v in rows.items()))
    m = report["models"]
    order = sorted(["base", "multitask", *MERGES], key=lambda n: -m[n]["avg_normalized_accuracy"])
    print("ours:  " + " > ".join(order))
    print("paper: " + report["paper_claim"])
    for c in report["claims"]:
        verdict = "holds in every seed" if c["holds_in_every_seed"] else "does NOT hold in every seed"
        print(f"  {c['claim']}: difference {c['mean']:+.3f} ± {c['std']:.3f} ({verdict})")
    for s, d in report["diagnostics"].items():
        print(f"seed {s}: ||tau||/||theta0|| " + ", ".join(f"{t} {v:.3f}" for t, v in d["relative_norm"].items()))
        for pair, c in d["kept_sign_conflicts"].items():
            print(f"  {pair}: kept by both {100 * c['overlap']:.2f}% (chance {100 * c['chance_overlap']:.2f}%), "
                  f"opposite signs among them {100 * c['conflict_rate']:.1f}% (chance {100 * c['chance_conflict_rate']:.1f}%)")
        print("  TIES election discards (share of kept entries): "
              + ", ".join(f"{t} {100 * v:.1f}%" for t, v in d["ties_election_discards"].items()))
        print("  own-task exact match of theta0 + s * tau at s = " + "/".join(f"{x:g}" for x in SCALES) + ": "
              + ", ".join(f"{t} " + "/".join(f"{100 * v:.0f}" for v in c.values()) for t, c in d["scale_curve"].items()))
        for name, c in d["merge_size_curve"].items():
            print(f"  {name} (lambda 1) of the first k experts, mean exact match for k = 1..{len(c)}: "
                  + "/".join(f"{100 * v:.0f}" for v in c.values()))
        print("  format tasks kept (mean exact match): "
              + ", ".join(f"{m} {100 * v:.0f}%" for m, v in d["format_retention"].items()))


def _write_json(report, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(report, f, indent=2)
    os.replace(f"{path}.tmp", path)


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    m = report["models"]
    rows = [("expert (own task)", {t: m[f"finetuned/{t}"]["accuracy"][t] for t in tasks},
             {t: m[f"finetuned/{t}"]["accuracy_std"][t] for t in tasks})]
    rows += [(n, m[n]["accuracy"], m[n]["accuracy_std"]) for n in ["base", "multitask", *MERGES]]
    fig, ax = plt.subplots(figsize=(1.9 * len(tasks) + 3, 4.2))
    width = 0.85 / len(rows)
    xs = np.arange(len(tasks))
    for i, (label, acc, std) in enumerate(rows):
        ax.bar(xs + i * width, [acc[t] for t in tasks], width, yerr=[std[t] for t in tasks], capsize=2, label=label,
               color="black" if i == 0 else None, alpha=0.75 if i == 0 else 1.0)
    ax.set_xticks(xs + width * (len(rows) - 1) / 2, tasks)
    ax.set_ylabel("exact match (test)")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=4)
    ax.set_title(f"Merging experts: mean ± std over {len(report['seeds'])} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
