"""The embedded suite end to end (what ``make demo`` runs): a general base, one
expert per target task, a multi-task fine-tune, task vectors, merges, and the
TIES paper's table with error bars.

    python experiments/quickstart.py --force              # one seed (make demo): about 9 min on 2 CPU cores
    python experiments/quickstart.py --seeds 3 --force    # results/quickstart_3seeds.json (the README table)
    python experiments/quickstart.py --tiny --force       # smoke variant for the tests (a tiny base, relaxed gates)
    python experiments/quickstart.py --seeds 3 --set candidates=reverse,sort,cipher,swap,upper,rotl,double \
        --set neftune_control=sort --results results/ablations/generation_targets.json --out runs/qs_gen --force

Expected (3 seeds, README): five of the six candidates pass their gates in
every seed (``second`` misses in one, an appendix row); the experts score
92-100% on their own task and 0-13% on the others; task arithmetic keeps
about half of the experts' skills (normalised 0.56 +- 0.03), far above
averaging (``linear``, 0.07) and the base, and the TIES and DARE variants
sit within the seed noise of task arithmetic.

The base is pretrained once (``experiments/pretrain_base.py``) and committed
as ``experiments/suite_base``; ``--base DIR`` fine-tunes another one, whose
recorded pretraining config must match this run's.  A seed is one
fine-tune -> merge pipeline over that base (fine-tuning data order, DARE's
masks); ``--seeds K`` runs seeds 0..K-1 and reports mean +- std over them.
Stages:

1. **Base**: ``research.data.suite``'s general base (English prose and six
   string-operation format tasks; no target is ever seen), loaded and checked
   against its ``pretraining.json``.
2. **Experts**: one fine-tune per candidate task, packed, with ``replay`` of
   each batch replaying the format tasks and the tied embedding frozen.
   First the NEFTune control: the ``neftune_control`` tasks are fine-tuned
   at alpha = 0 and at ``neftune_alpha``, and the alpha with the lower mean
   validation loss (noise off) over them and the seeds is used for every
   expert.
3. **Gates** on the validation split: base <= 20% and expert >= 70% and
   >= base + 50 points.  A candidate that fails any of them, in any seed, is
   not a target: it goes to the appendix rows and is not merged.
4. **Multi-task** fine-tune on all targets with the experts' total budget.
5. **Diagnostics**: ||tau|| / ||theta_0||, pairwise cosines, sign conflicts
   among entries kept by both task vectors (with the chance rate), the share
   of each model's kept entries that TIES's sign election discards, and what
   the merges inherit (``behaviour``).
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
import ast
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from research import merging
from research.data import pipeline, suite, tokenizers
from research.merging.tree import leaf_names
from research.models import from_hf, save_hf
from research.training import TrainConfig, train
from research.training.evaluate import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BASE = os.path.join(ROOT, "experiments", "suite_base")

PAPER_CLAIM = ("TIES paper (Yadav et al. 2023, Table 1): ties > task_arithmetic > linear (averaging); every merge "
               "below the experts and the multitask model, and above the base")
# the claim as pairwise comparisons of average normalised accuracy: (better, worse)
CLAIMED = (("ties", "task_arithmetic"), ("ties_global", "task_arithmetic"), ("task_arithmetic", "linear"),
           ("linear", "base"), ("multitask", "ties"))
MERGES = ("linear", "task_arithmetic", "ties", "ties_global", "dare_ties", "dare_linear")


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    candidates: tuple = suite.CANDIDATES
    # the base: pretrained once with these (experiments/pretrain_base.py), checked against its pretraining.json
    model: str = "small"
    seq_len: int = 128
    pretrain_mixture: tuple = suite.PRETRAIN_MIXTURE
    pretrain_batch: int = 16
    pretrain_steps: int = 2000
    pretrain_lr: float = 3e-3
    pretrain_seed: int = 0
    finetune_batch: int = 8
    finetune_steps: int = 100
    finetune_lr: float = 3e-4  # a tenth of pretraining's peak
    replay: float = suite.REPLAY  # share of each fine-tune batch replaying the pretraining format tasks
    finetune_freeze: tuple = suite.FINETUNE_FREEZE
    # NEFTune's noise norm per token is alpha / sqrt(3 L); at our L ~ 12 tokens
    # alpha = 1 gives ~0.17, the paper's ratio at alpha = 5, L ~ 300.
    neftune_alpha: float = 1.0
    # these candidates are also fine-tuned at neftune_alpha (every seed): the control that picks alpha
    neftune_control: tuple = ("succ",)
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


PRETRAIN_FIELDS = ("model", "seq_len", "pretrain_mixture", "pretrain_batch", "pretrain_steps", "pretrain_lr",
                   "pretrain_seed")
TINY = QuickstartConfig(candidates=("first", "succ"), neftune_control=("succ",), model="tiny", pretrain_steps=30,
                        finetune_steps=10, finetune_lr=1e-3, val_samples=8, test_samples=8, max_new_tokens=8,
                        lambdas_sum=(0.5, 1.0), lambdas_mean=(1.0,), densities=(0.5,), max_extensions=1,
                        gates=suite.Gates(base_max=1.0, expert_min=0.0, margin=-1.0))  # smoke: every candidate passes


def override(q: QuickstartConfig, items) -> QuickstartConfig:
    """``q`` with ``field=value`` items applied (``--set``): numbers, Python literals,
    or comma-separated names for tuple fields (``candidates=first,last``)."""
    fields = {f.name: getattr(q, f.name) for f in dataclasses.fields(q) if f.name not in ("gates", "progress")}
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        default = fields[key]
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        if isinstance(default, tuple):
            if isinstance(value, (int, float)):
                value = (value,)
            value = tuple(value) if isinstance(value, (tuple, list)) else tuple(v for v in text.split(",") if v)
        elif isinstance(default, str):
            value = text
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(default, int) and not isinstance(value, int)):
            raise SystemExit(f"--set {item!r}: {key} takes {'an integer' if isinstance(default, int) else 'a number'}")
        else:
            value = type(default)(value)
        changes[key] = value
    return dataclasses.replace(q, **changes)


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


def use_compile_cache() -> None:
    """Keep compiled programs between runs (every fine-tune compiles the same step):
    ``$RESEARCH_JAX_CACHE``, or ``~/.cache/research/jax``."""
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("RESEARCH_JAX_CACHE", os.path.expanduser("~/.cache/research/jax")))


def _mean(d: dict) -> float:
    return float(np.mean(list(d.values())))


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


# --- the base -------------------------------------------------------------------------


def pretrain_config(q: QuickstartConfig) -> TrainConfig:
    tasks = [t for t, _ in q.pretrain_mixture]
    return _train_cfg(q, q.pretrain_seed, tasks, q.pretrain_steps, q.pretrain_lr, q.pretrain_batch, 0.0,
                      mixing=dict(q.pretrain_mixture))


def _jsonable(x):
    return json.loads(json.dumps(x))


def pretraining_spec(q: QuickstartConfig) -> dict:
    """The fields of ``q`` that make the base (its ``pretraining.json`` records them)."""
    return _jsonable({f: getattr(q, f) for f in PRETRAIN_FIELDS})


def params_digest(params) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes, in leaf order."""
    h = hashlib.sha256()
    for name, x in zip(leaf_names(params), jax.tree.leaves(params)):
        x = np.ascontiguousarray(np.asarray(x))
        h.update(f"{name}|{x.dtype}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def pretrain_base(q: QuickstartConfig, workdir: str, out: str, *, force: bool = False, command: str = "") -> dict:
    """Pretrain the suite's base in ``workdir`` (resuming a run found there) and write it
    to ``out`` as an HF directory (``config.json``, ``model.safetensors``) with a
    ``pretraining.json``: the pretraining fields of ``q``, the base's validation
    exact match on each format task, its text loss, and ``params_sha256``.
    An existing ``out`` is refused unless ``force``."""
    if os.path.exists(out) and not force:
        raise SystemExit(f"{out} exists: pass --force to replace it")
    t0 = time.perf_counter()
    r = train(pretrain_config(q), workdir, evaluate_at_end=False)
    params = jax.device_get(r.params)
    acc, loss = Evaluator(q, r.graphdef)(params, [*suite.FORMAT_TASKS, "text"], "val")
    record = {
        "config": pretraining_spec(q),
        "format_val_accuracy": {t: acc[t] for t in suite.FORMAT_TASKS},
        "val_samples": q.val_samples,
        "text_val_loss": loss["text"],
        "final_train_loss": r.history[-1]["loss"] if r.history else None,
        "steps": r.step,
        "seconds": round(time.perf_counter() - t0, 1),
        "params_sha256": params_digest(params),
        "command": command,
    }
    save_hf(nnx.merge(r.graphdef, params), out, force=force,
            extra_files={"pretraining.json": json.dumps(record, indent=2) + "\n"})
    return record


def load_base(q: QuickstartConfig, path: str) -> dict:
    """The base at ``path`` (an HF directory with ``pretraining.json``) as
    ``{"graphdef", "params", "dir", "pretraining"}``, after checking that it was
    pretrained with ``q``'s pretraining fields and that its weights are the ones
    recorded."""
    meta = os.path.join(path, "pretraining.json")
    if not os.path.isfile(meta):
        raise SystemExit(f"{path}: not a suite base (no pretraining.json); write one with "
                         f"python experiments/pretrain_base.py --out {path}")
    with open(meta) as f:
        info = json.load(f)
    want = pretraining_spec(q)
    diff = [k for k in PRETRAIN_FIELDS if info["config"].get(k) != want[k]]
    if diff:
        raise SystemExit(f"{path} was pretrained with " + ", ".join(f"{k}={info['config'].get(k)!r}" for k in diff)
                         + "; this run has " + ", ".join(f"{k}={want[k]!r}" for k in diff)
                         + ". Pretrain a matching base (python experiments/pretrain_base.py --out DIR with the same "
                           "--set) and pass --base DIR")
    graphdef, params = nnx.split(from_hf(path), nnx.Param)
    params = jax.device_get(params)
    if params_digest(params) != info["params_sha256"]:
        raise SystemExit(f"{path}: the weights do not match params_sha256 in {meta} (changed or damaged); "
                         f"rewrite it with python experiments/pretrain_base.py --out {path} --force")
    return {"graphdef": graphdef, "params": params, "dir": path, "pretraining": info}


# --- one seed ------------------------------------------------------------------------


def new_run(base: dict, out: str, seed: int) -> dict:
    """One seed's state: the base, and the experts as they are trained (by ``(alpha, task)``)."""
    return {"graphdef": base["graphdef"], "base": base["params"], "base_dir": base["dir"], "experts": {},
            "val_loss": {}, "dir": f"{out}/seed{seed}"}


def choose_alpha(q: QuickstartConfig, runs: dict, timings: dict) -> tuple[float, dict, dict]:
    """The NEFTune control: the ``neftune_control`` tasks fine-tuned at alpha = 0 and at
    ``neftune_alpha`` in every seed; the alpha with the lower mean validation loss
    (noise off) over those tasks and seeds.  Returns ``(alpha, {alpha: mean loss},
    {seed: {alpha: mean loss}})``."""
    alphas = (0.0, q.neftune_alpha) if q.neftune_alpha > 0 else (0.0,)
    for s, run in runs.items():
        st = Stage(f"seed {s}: NEFTune control", len(alphas) * len(q.neftune_control), timings)
        for alpha in alphas:
            for task in q.neftune_control:
                train_expert(q, s, run, alpha, task)
                st.update(f"{task} alpha={alpha:g}")
        st.close()
    per_seed = {str(s): {f"{a:g}": float(np.mean([r["val_loss"][a, t] for t in q.neftune_control])) for a in alphas}
                for s, r in runs.items()}
    nef = {f"{a:g}": float(np.mean([v[f"{a:g}"] for v in per_seed.values()])) for a in alphas}
    return min(alphas, key=lambda a: nef[f"{a:g}"]), nef, per_seed


def train_experts(q: QuickstartConfig, runs: dict, alpha: float, timings: dict) -> None:
    """One expert per candidate and seed, at the chosen alpha (the control's are reused)."""
    for s, run in runs.items():
        todo = [t for t in q.candidates if (alpha, t) not in run["experts"]]
        st = Stage(f"seed {s}: experts", len(todo), timings)
        for task in todo:
            train_expert(q, s, run, alpha, task)
            st.update(task)
        st.close()


def _finetune_cfg(q: QuickstartConfig, seed, targets, steps, alpha, base_dir):
    mix = suite.finetune_mixture(targets, q.replay)
    return _train_cfg(q, seed, list(mix), steps, q.finetune_lr, q.finetune_batch, alpha, init_from=base_dir,
                      mixing=mix, freeze=q.finetune_freeze)


def train_expert(q: QuickstartConfig, seed: int, run: dict, alpha: float, task: str):
    r = train(_finetune_cfg(q, seed, [task], q.finetune_steps, alpha, run["base_dir"]),
              f"{run['dir']}/ft_{task}_alpha{alpha:g}", evaluate_at_end=False)
    run["experts"][alpha, task] = jax.device_get(r.params)
    run["val_loss"][alpha, task] = Evaluator(q, run["graphdef"])(run["experts"][alpha, task], [task], "val")[1][task]


def finish_seed(q, seed, run, targets, alpha, timings) -> dict:
    """Multitask, diagnostics, merges (validated), and the test table of one seed."""
    ev = Evaluator(q, run["graphdef"])
    base, d = run["base"], run["dir"]
    fts = [run["experts"][alpha, t] for t in targets]
    st = Stage(f"seed {seed}: multitask", 1, timings)
    mt = train(_finetune_cfg(q, seed, targets, q.finetune_steps * len(targets), alpha, run["base_dir"]),
               f"{d}/multitask", evaluate_at_end=False)
    st.update()
    st.close()

    st = Stage(f"seed {seed}: diagnostics", 1, timings)
    diag, kept = diagnostics(q, base, fts, targets)
    diag.update(behaviour(ev, base, fts, targets, kept))
    st.update()
    st.close()

    def score(m):
        acc, loss = ev(m, targets, "val")
        return _mean(acc), -_mean(loss)

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
    """Task-vector statistics, and the task vectors trimmed to the TIES paper's density."""
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
    }, kept


SCALES = (0.25, 0.5, 0.75, 1.0)


def behaviour(ev, base, fts, targets, kept):
    """What the merges inherit, measured on validation:

    * ``scale_curve[task][s]``: exact match of ``theta_0 + s * tau_task`` on its own
      task.  A merge that averages (or scales by lambda < 1) gives each task
      vector a share ``s < 1``; this is what that share alone keeps.
    * ``format_retention``: mean exact match over the pretraining format tasks
      of the base and of each expert (did the expert keep the base's other
      instructions, or does it apply its operation to every prompt?).
    * ``trimmed_expert[task]``: exact match of ``theta_0 + trim(tau_task)`` on its
      own task, ``tau`` trimmed per tensor to the TIES paper's density (0.2,
      ``kept``): what TIES's trim step alone keeps of one expert.
    * ``merge_size_curve["task_arithmetic"][k]``: mean exact match over the
      first ``k`` targets of the sum of their ``k`` task vectors (lambda = 1);
      ``k = 1`` is the expert itself.  Fixed settings, not validated: it shows
      how the skills survive as experts are added.
    * ``interference[group][task]``: exact match on its own task of
      ``theta_0 + tau_task + sum of the other task vectors restricted to one
      parameter group`` (``attention``, ``mlp``, ``norms``, ``layer i``; ``all``
      is task arithmetic at lambda = 1): where the other experts' updates
      break this one's skill.
    """
    tvs = [merging.task_vector(f, base) for f in fts]
    curve = {t: {f"{s:g}": ev(merging.apply(base, tv, s), [t], "val")[0][t] for s in SCALES}
             for t, tv in zip(targets, tvs)}
    fmt = list(suite.FORMAT_TASKS)
    mean_fmt = lambda p: _mean(ev(p, fmt, "val")[0])
    retention = {"base": mean_fmt(base), **{t: mean_fmt(f) for t, f in zip(targets, fts)}}
    trimmed = {t: ev(merging.apply(base, k, 1.0), [t], "val")[0][t] for t, k in zip(targets, kept)}
    size_curve = {"task_arithmetic": {}}
    for k in range(1, len(targets) + 1):
        m = merging.merge("task_arithmetic", fts[:k], base=base, weight=1.0, lam=1.0)
        size_curve["task_arithmetic"][str(k)] = _mean(ev(m, targets[:k], "val")[0])
    return {"scale_curve": curve, "format_retention": retention, "trimmed_expert": trimmed, "merge_size_curve": size_curve,
            "interference": interference(ev, base, tvs, targets)}


def interference(ev, base, tvs, targets):
    names = leaf_names(base)
    groups = {"all": lambda n: True, "attention": lambda n: ".attn." in n, "mlp": lambda n: ".mlp." in n,
              "norms": lambda n: "norm" in n}
    groups.update({f"layer {i}": (lambda n, p=f"layers.{i}.": n.startswith(p))
                   for i in sorted({int(n.split(".")[1]) for n in names if n.startswith("layers.")})})
    out = {g: {} for g in groups}
    for i, t in enumerate(targets):
        own = merging.apply(base, tvs[i], 1.0)
        others = jax.tree.leaves(jax.tree.map(lambda *xs: sum(xs), *[tv for j, tv in enumerate(tvs) if j != i]))
        for g, pick in groups.items():
            kept = [x if pick(n) else np.zeros_like(x) for n, x in zip(names, others)]
            theta = merging.apply(own, jax.tree.unflatten(jax.tree.structure(base), kept), 1.0)
            out[g][t] = ev(theta, [t], "val")[0][t]
    return out


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
    ap.add_argument("--base", help="the base to fine-tune: an HF directory with pretraining.json (default: the "
                                   "committed experiments/suite_base; with --tiny, a tiny base pretrained in --out)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a QuickstartConfig field (repeatable), e.g. --set finetune_lr=1e-3")
    args = ap.parse_args(argv)
    q = override(TINY if args.tiny else QuickstartConfig(), args.set)
    if not set(q.neftune_control) <= set(q.candidates):
        ap.error(f"neftune_control {q.neftune_control} must be candidates ({q.candidates})")
    seed_list = list(range(args.seeds)) if args.seeds else [args.seed or 0]
    if args.seeds is not None and args.seeds < 1:
        ap.error("--seeds must be >= 1")
    results_path = args.results or (f"results/quickstart_{len(seed_list)}seeds.json" if len(seed_list) > 1 else None)
    out = args.out
    if os.path.exists(out) and not args.force:
        raise SystemExit(f"{out} exists: pass --force to replace it (make demo does), or --out elsewhere")
    use_compile_cache()
    timings, t_start = {}, time.perf_counter()

    st = Stage("base", 1, timings)
    pretrain_here = args.tiny and not args.base  # the smoke test pretrains its own tiny base
    base = None if pretrain_here else load_base(q, args.base or DEFAULT_BASE)  # checked before --out is replaced
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    if pretrain_here:
        pretrain_base(q, f"{out}/base_run", f"{out}/base", command="quickstart.py --tiny")
        base = load_base(q, f"{out}/base")
    st.update()
    st.close(f"{base['dir']}: format tasks {_mean(base['pretraining']['format_val_accuracy']):.1%} (val)")
    runs = {s: new_run(base, out, s) for s in seed_list}
    alpha, nef, nef_seeds = choose_alpha(q, runs, timings)
    print(f"NEFTune control on {', '.join(q.neftune_control)}: mean validation loss {nef} -> alpha = {alpha:g}")
    train_experts(q, runs, alpha, timings)

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
    report = build_report(q, seed_list, targets, per_seed, gates, appendix, alpha, nef, nef_seeds, timings, base)
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


def build_report(q, seeds, targets, per_seed, gates, appendix, alpha, nef, nef_seeds, timings, base):
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
        "neftune": {"candidate_alpha": q.neftune_alpha, "mean_val_loss_by_alpha": nef,
                    "per_seed_val_loss_by_alpha": nef_seeds, "chosen_alpha": alpha,
                    "control_tasks": list(q.neftune_control),
                    "measured_on": "validation loss of the control tasks' experts, noise off, mean over tasks and seeds"},
        "diagnostics": {str(s): per_seed[s]["diagnostics"] for s in seeds},
        "seeds": list(seeds),
        "protocol": "one base (pretrained once); a seed is one fine-tune -> merge pipeline over it",
        "base": {"dir": os.path.relpath(base["dir"], ROOT) if base["dir"].startswith(ROOT) else base["dir"],
                 "pretraining": base["pretraining"]},
        "chance": {t: suite.majority_rate(pipeline.tasks_of([t], suite.task_lengths([t]))[0], "test", q.test_samples)
                   for t in [*targets, *appendix]},
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
    print("\n| model | " + " | ".join(tasks) + " | avg normalised |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, r in report["models"].items():
        cells = [f"{100 * r['accuracy'][t]:.1f} ± {100 * r['accuracy_std'][t]:.1f}" for t in tasks]
        print(f"| {name} | " + " | ".join(cells)
              + f" | {r['avg_normalized_accuracy']:.3f} ± {r['avg_normalized_accuracy_std']:.3f} |")
    print(f"(exact match %, mean ± std over {k} seed(s), {report['config']['test_samples']} test examples per task)")
    print("chance (the most frequent test answer, always given): "
          + ", ".join(f"{t} {100 * v:.1f}%" for t, v in report["chance"].items()))
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
        print(f"  own-task exact match of theta0 + tau trimmed to density {d['density']:g}: "
              + ", ".join(f"{t} {100 * v:.0f}%" for t, v in d["trimmed_expert"].items()))
        for name, c in d["merge_size_curve"].items():
            print(f"  {name} (lambda 1) of the first k experts, mean exact match for k = 1..{len(c)}: "
                  + "/".join(f"{100 * v:.0f}" for v in c.values()))
        print("  own task with the other task vectors on one parameter group (mean exact match): "
              + ", ".join(f"{g} {100 * _mean(v):.0f}%" for g, v in d["interference"].items()))
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
