"""The resolved config of a run, stored in its directory and checked on resume.

``<workdir>/train_config.json`` holds every field of the ``TrainConfig`` the run
was started with.  Resuming with a config that differs in a field that
changes the computation (``lr``, ``tasks``, the model, the seed, ...) is a
``ResumeMismatch`` naming each such field with both values, unless the
caller overrides it; fields that only change reporting or cadence
(``SAFE_TO_CHANGE``), the mesh (restoring reshards), and a larger ``steps``
may differ.  The file then
records the config the run continues with.

A larger ``steps`` stretches the learning-rate schedule from the resumed
step on (it decays to the new end); that is reported, not refused.
"""

from __future__ import annotations

import dataclasses
import json
import os

from research.training.config import ConfigError, TrainConfig

SAFE_TO_CHANGE = frozenset({"save_every", "keep", "log_every", "eval_every", "eval_samples", "max_new_tokens",
                            "progress",
                            "mesh"})  # restoring reshards onto the new mesh: the same computation, laid out anew
FILE = "train_config.json"  # not config.json: that name marks an HF checkpoint directory


class ResumeMismatch(ConfigError):
    """The workdir's run was started with a config that this one contradicts."""


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def write(cfg: TrainConfig, workdir: str) -> None:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(_plain(cfg), f, indent=2)
    os.replace(f"{path}.tmp", path)


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def read(workdir: str) -> TrainConfig:
    """The ``TrainConfig`` a run stored in ``workdir`` (JSON lists back to tuples)."""
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
        raise ConfigError(f"{workdir}: no {FILE} (not a training run directory)")
    with open(path) as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(stored) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown config key {unknown[0]!r} (written by another version?)")
    return TrainConfig(**{k: _tuples(v) for k, v in stored.items()})


def check_resume(cfg: TrainConfig, workdir: str, step: int, *, override: bool = False, log=print) -> None:
    """Compare ``cfg`` with the stored config of the run being resumed at ``step``."""
    path = os.path.join(workdir, FILE)
    if not os.path.isfile(path):
        log(f"resuming {workdir} at step {step}: it has no {FILE} (an older run), so the config cannot be compared")
        return
    with open(path) as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError:
            raise ResumeMismatch(f"{path} is not valid JSON; move it away to resume without the check") from None
    new = _plain(cfg)
    # a field that the stored run predates had its default there
    stored = {**_plain(TrainConfig()), **stored}
    changed = sorted(k for k in set(stored) | set(new) if stored.get(k) != new.get(k))
    unsafe = [k for k in changed if k not in SAFE_TO_CHANGE and not (k == "steps" and new[k] >= stored.get(k, 0))]
    if unsafe and not override:
        diffs = "; ".join(f"{k}: {stored.get(k)!r} there, {new.get(k)!r} now" for k in unsafe)
        raise ResumeMismatch(
            f"{workdir} holds a run (step {step}) started with another config ({diffs}). Resuming would mix the two: "
            "use another workdir, --no-resume to start afresh (the old checkpoints are moved aside), or "
            "--override-resume to continue this run with the new values"
        )
    if unsafe:
        log(f"resuming {workdir} at step {step} with changed {', '.join(unsafe)} (--override-resume)")
    if "steps" in changed and new["steps"] > stored.get("steps", 0):
        log(f"resuming at step {step} with steps {stored.get('steps')} -> {new['steps']}: the learning-rate "
            "schedule now decays to the new end")
