"""Training configuration: a frozen dataclass, loaded from a Python config file.

A config file defines ``get_config() -> TrainConfig`` and says in its
docstring how to run it and what it should produce (``experiments/configs``).
``--set key=value`` overrides fields by name; values are parsed to the field's
type, and unknown keys are errors.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import math
import os
import typing


class ConfigError(ValueError):
    """A bad config file or override; the message names the key."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    model: str = "tiny"  # a preset name
    model_overrides: tuple = ()  # ((field, value), ...) on top of the preset
    init_from: str | None = None  # a run directory (its latest params) or an HF checkpoint
    # data
    tasks: tuple = ("copy", "reverse", "sort", "add", "cipher", "g2p", "p2g")
    task_lengths: tuple = ()  # ((task, min_len, max_len), ...)
    mixing: typing.Any = "temperature"
    seq_len: int = 256
    batch_size: int = 8
    chunk_size: int = 128
    # user data (research.training.data): source specs ("jsonl:PATH", "tfds:NAME[:SPLIT]", a task
    # name, "text"), each optionally (spec, weight); () trains on `tasks`
    data: tuple = ()
    tokenizer: str | None = None  # "byte", a .model, a tokenizer.json or its directory; None: init_from's, else byte
    prompt_template: str = "{prompt}"  # str.format string over the prompt of prompt/response records
    chat_template: str | None = None  # Jinja source or a .jinja path; None: the tokenizer's, else our default
    # optimisation
    steps: int = 100
    lr: float = 3e-3
    warmup_steps: int = 10
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0
    neftune_alpha: float = 0.0  # 0 = off
    # parameters left as they are: globs over dotted leaf names ("embedding", "layers.*.mlp.*");
    # they get no update, no weight decay, no optimizer moments, and no share of the clipping norm
    freeze: tuple = ()
    # float32 master weights and AdamW moments for bf16/fp16 parameters (research.training.precision)
    master_weights: bool = False
    # LoRA (research.models.lora): rank 0 = full fine-tuning; else only the adapters on
    # lora_targets train (float32, with their own optimizer state) and the base stays frozen
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    seed: int = 0
    # parallelism: (data, fsdp, tensor); -1 = the remaining devices
    mesh: tuple = (-1, 1, 1)
    # checkpoints and reporting
    save_every: int = 50
    keep: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_samples: int = 32
    max_new_tokens: int = 32
    progress: bool = True


_EXPECTED = {int: "an integer", "int": "an integer", float: "a number", "float": "a number",
             bool: "true or false", "bool": "true or false", tuple: "a tuple or comma-separated names",
             "tuple": "a tuple or comma-separated names"}


def _parse(value: str, typ):
    origin = typing.get_origin(typ)
    if typ in ("str | None", typing.Optional[str]):  # a path or a name; None to unset
        return None if value in ("None", "none", "") else value
    if typ in (tuple, "tuple"):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        if isinstance(parsed, str):  # tasks=copy or tasks=copy,reverse: names, not characters
            return tuple(p.strip() for p in parsed.split(",") if p.strip())
        if not isinstance(parsed, (tuple, list)):
            raise ValueError(value)
        return tuple(parsed)
    if typ is bool or typ == "bool":
        if value.lower() in ("1", "true", "yes"):
            return True
        if value.lower() in ("0", "false", "no"):
            return False
        raise ValueError(value)
    if typ in (int, "int"):
        return int(value)
    if typ in (float, "float"):
        return float(value)
    if typ in (str, "str"):
        return value
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        if origin is None and value and value[0].isalpha():
            return value  # a bare string
        raise


def override(cfg: TrainConfig, assignments: typing.Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` strings; unknown keys and unparsable values are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for a in assignments:
        if "=" not in a:
            raise ConfigError(f"--set {a!r}: expected key=value")
        key, value = a.split("=", 1)
        if key not in fields:
            raise ConfigError(f"--set {a!r}: unknown config key {key!r}; known keys: {', '.join(sorted(fields))}")
        try:
            changes[key] = _parse(value, fields[key].type)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--set {a!r}: expected {_EXPECTED.get(fields[key].type, 'a Python literal or a name')}"
                              ) from None
        if isinstance(changes[key], list):
            changes[key] = tuple(changes[key])
    return validate(dataclasses.replace(cfg, **changes))


_RANGES = {  # field: (lowest allowed, highest allowed, is the lowest excluded)
    "seq_len": (1, None, False), "batch_size": (1, None, False), "chunk_size": (1, None, False),
    "steps": (1, None, False), "lr": (0.0, None, True), "warmup_steps": (0, None, False),
    "end_lr_fraction": (0.0, 1.0, False), "weight_decay": (0.0, None, False), "b1": (0.0, 0.999999, False),
    "b2": (0.0, 0.999999, False), "clip_norm": (0.0, None, True), "neftune_alpha": (0.0, None, False),
    "save_every": (0, None, False), "keep": (1, None, False), "log_every": (1, None, False),
    "eval_every": (0, None, False), "eval_samples": (1, None, False), "max_new_tokens": (1, None, False),
    "lora_rank": (0, None, False), "lora_alpha": (0.0, None, True),
}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field before any work; a bad one is a ``ConfigError`` naming the
    key, the value and what is allowed."""
    for key, (lo, hi, open_lo) in _RANGES.items():
        v = getattr(cfg, key)
        want = int if isinstance(lo, int) else (int, float)
        if isinstance(v, bool) or not isinstance(v, want):
            raise ConfigError(f"{key}={v!r}: expected {'an integer' if want is int else 'a number'}")
        if not math.isfinite(v):
            raise ConfigError(f"{key}={v!r}: must be finite")
        if (v <= lo if open_lo else v < lo) or (hi is not None and v > hi):
            rng = f"{'>' if open_lo else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key}={v!r}: must be {rng}")
    if not isinstance(cfg.freeze, tuple) or not all(isinstance(f, str) and f for f in cfg.freeze):
        raise ConfigError(f"freeze={cfg.freeze!r}: expected a tuple of glob patterns over parameter names")
    if not isinstance(cfg.master_weights, bool):
        raise ConfigError(f"master_weights={cfg.master_weights!r}: expected True or False")
    _check_lora(cfg)
    if not isinstance(cfg.tasks, tuple) or not cfg.tasks or not all(isinstance(t, str) for t in cfg.tasks):
        raise ConfigError(f"tasks={cfg.tasks!r}: expected a non-empty tuple of task names")
    from research.data.tasks import NAMES

    unknown = [t for t in cfg.tasks if t not in NAMES]
    if unknown:
        raise ConfigError(f"tasks: unknown task {unknown[0]!r}; available: {', '.join(NAMES)}")
    from research.models.config import PRESETS

    if cfg.model not in PRESETS:
        raise ConfigError(f"model={cfg.model!r}: unknown preset; choose from {', '.join(PRESETS)}")
    _check_model_overrides(cfg)
    _check_data(cfg, NAMES)
    if (not isinstance(cfg.mesh, tuple) or len(cfg.mesh) != 3 or not all(isinstance(a, int) for a in cfg.mesh)
            or any(a == 0 or a < -1 for a in cfg.mesh) or cfg.mesh.count(-1) > 1):
        raise ConfigError(f"mesh={cfg.mesh!r}: expected (data, fsdp, tensor), positive integers or one -1")
    import jax

    fixed = 1
    for a in cfg.mesh:
        fixed *= a if a > 0 else 1
    if fixed > jax.device_count():
        raise ConfigError(f"mesh={cfg.mesh!r}: needs {fixed} devices, this process has {jax.device_count()}")
    sizes = [a if a > 0 else jax.device_count() // fixed for a in cfg.mesh]
    rows = sizes[0] * sizes[1]  # the batch is split over (data, fsdp)
    if cfg.batch_size % rows:
        raise ConfigError(f"batch_size={cfg.batch_size}: must be a multiple of {rows}, the data x fsdp size of "
                          f"mesh={cfg.mesh!r} on {jax.device_count()} devices (or set mesh=(1, 1, 1))")
    return cfg


def _check_lora(cfg: TrainConfig) -> None:
    from research.models.config import LORA_TARGETS

    d = cfg.lora_dropout
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d < 1:
        raise ConfigError(f"lora_dropout={d!r}: must be >= 0 and < 1")
    t = cfg.lora_targets
    if not isinstance(t, tuple) or not t or not all(isinstance(x, str) for x in t):
        raise ConfigError(f"lora_targets={t!r}: expected a tuple of kernel names among {', '.join(LORA_TARGETS)}")
    bad = [x for x in t if x not in LORA_TARGETS]
    if bad:
        raise ConfigError(f"lora_targets: {bad[0]!r} is not a target; choose from {', '.join(LORA_TARGETS)}")
    if cfg.lora_rank and cfg.freeze:
        raise ConfigError(f"freeze={cfg.freeze!r} with lora_rank={cfg.lora_rank}: a LoRA run already freezes the "
                          "whole base and trains only the adapters; drop freeze (or set lora_rank=0)")
    if cfg.lora_rank and cfg.master_weights:
        raise ConfigError(f"master_weights=True with lora_rank={cfg.lora_rank}: the trained adapters are float32 "
                          "already (the frozen base keeps param_dtype); drop master_weights")


def _check_model_overrides(cfg: TrainConfig) -> None:
    from research.models.config import PRESETS

    ov = cfg.model_overrides
    if not isinstance(ov, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in ov):
        raise ConfigError(f"model_overrides={ov!r}: expected ((field, value), ...)")
    fields = {f.name: f for f in dataclasses.fields(PRESETS[cfg.model])}
    for name, value in ov:
        if name not in fields:
            raise ConfigError(f"model_overrides: unknown model field {name!r}; known: {', '.join(sorted(fields))}")
        if name == "lora":
            raise ConfigError("model_overrides: set LoRA with the lora_rank, lora_alpha, lora_targets and "
                              "lora_dropout keys, not the model field 'lora'")
        want = type(getattr(PRESETS[cfg.model], name))
        if want is bool and not isinstance(value, bool):
            raise ConfigError(f"model_overrides: {name}={value!r}: expected True or False")
        if want in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float)) or
                                     (want is int and not isinstance(value, int)) or value <= 0):
            raise ConfigError(f"model_overrides: {name}={value!r}: expected a positive {want.__name__}")
    m = PRESETS[cfg.model].replace(**dict(ov))
    import jax.numpy as jnp

    from research.models.attention import IMPLEMENTATIONS

    for name in ("dtype", "param_dtype"):
        try:
            jnp.dtype(getattr(m, name))
        except TypeError:
            raise ConfigError(f"model_overrides: {name}={getattr(m, name)!r} is not a dtype") from None
    if cfg.master_weights and jnp.dtype(m.param_dtype).itemsize >= 4:
        raise ConfigError(f"master_weights=True: the parameters are already {m.param_dtype}; set model_overrides "
                          "param_dtype='bfloat16' (or 'float16') to keep low-precision parameters with float32 masters")
    if m.attention is not None and m.attention not in IMPLEMENTATIONS:
        raise ConfigError(f"model_overrides: attention={m.attention!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    if m.d_model % m.n_heads or m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model_overrides: d_model={m.d_model}, n_heads={m.n_heads}, n_kv_heads={m.n_kv_heads}: "
                          "d_model must be a multiple of n_heads, and n_heads of n_kv_heads")


def _check_data(cfg: TrainConfig, names) -> None:
    from research.data import sources
    from research.data.templates import TemplateError, check_prompt_template

    if not isinstance(cfg.data, tuple):
        raise ConfigError(f"data={cfg.data!r}: expected a tuple of source specs or (spec, weight) pairs")
    try:
        entries = sources.parse_data(cfg.data)
    except sources.DataError as e:
        raise ConfigError(f"data: {e}") from None
    unknown = [spec for spec, _ in entries if sources.parse_spec(spec)[0] == "task" and spec not in names]
    if unknown:
        raise ConfigError(f"data: {unknown[0]!r} is not an embedded task ({', '.join(names)}); a file is "
                          f"jsonl:PATH, a TFDS dataset tfds:NAME[:SPLIT]")
    if entries and cfg.tasks != TrainConfig.tasks:
        raise ConfigError(f"tasks={cfg.tasks!r} and data={cfg.data!r}: set one of them (embedded tasks are data "
                          "entries too: data=('copy', 'jsonl:mine.jsonl'))")
    if entries and any(w is not None for _, w in entries) and cfg.mixing != TrainConfig.mixing:
        raise ConfigError(f"mixing={cfg.mixing!r} with weighted data entries: give the weights in one place")
    for key in ("tokenizer", "chat_template"):
        v = getattr(cfg, key)
        if v is not None and (not isinstance(v, str) or not v):
            raise ConfigError(f"{key}={v!r}: expected a non-empty string or None")
    if not isinstance(cfg.prompt_template, str):
        raise ConfigError(f"prompt_template={cfg.prompt_template!r}: expected a str.format string with {{prompt}}")
    try:
        check_prompt_template(cfg.prompt_template)
    except TemplateError as e:
        raise ConfigError(str(e)) from None
    mixing = cfg.mixing
    if isinstance(mixing, dict):
        bad = [k for k in mixing if k not in cfg.tasks] if not entries else []  # data sources: named once opened
        if bad:
            raise ConfigError(f"mixing: {bad[0]!r} is not one of tasks={cfg.tasks!r}")
        weights = list(mixing.values())
        if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                   for w in weights) or not any(weights):
            raise ConfigError(f"mixing={mixing!r}: weights must be finite numbers >= 0, not all 0")
    elif mixing not in ("size", "temperature"):
        raise ConfigError(f"mixing={mixing!r}: expected 'size', 'temperature' or {{task: weight}}")
    tl = cfg.task_lengths
    if not isinstance(tl, tuple) or not all(
            isinstance(e, tuple) and len(e) == 3 and e[0] in names and all(isinstance(x, int) and not isinstance(x, bool)
                                                                           for x in e[1:]) and 1 <= e[1] <= e[2]
            for e in tl):
        raise ConfigError(f"task_lengths={tl!r}: expected ((task, min_len, max_len), ...) with 1 <= min_len <= max_len")
    if cfg.init_from is not None and not isinstance(cfg.init_from, str):
        raise ConfigError(f"init_from={cfg.init_from!r}: expected a path")


def load(path: str, assignments: typing.Sequence[str] = ()) -> TrainConfig:
    """``get_config()`` from a Python file, with ``key=value`` overrides."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location("_train_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = mod.get_config()
    if not isinstance(cfg, TrainConfig):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not TrainConfig")
    return override(cfg, assignments)  # validated
