"""The method registry: every merge method, its parameters and its leaf function.

``merge()``, the YAML checks of ``research-merge`` and its ``--dry-run`` all
read this table, so a parameter a method does not use is an error that names
both, wherever it is given.  Adding a method is one ``Method`` entry plus its
leaf function ``(base, models, opts, keys) -> merged`` on float32 tensors.

Names are mergekit's (``lambda`` is spelled ``lam``).  Per-model parameters
take a scalar or one value per model.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from research.merging import methods, task_vectors
from research.merging.task_vectors import RECIPES
from research.merging.tree import MergeError, per_model


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: ``interval`` like ``"(0, 1]"`` for numbers, ``choices`` for words."""

    name: str
    default: Any
    doc: str
    per_model: bool = False
    interval: str = ""
    choices: tuple = ()

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)

    def check(self, value, method: str, model: int | None = None) -> None:
        which = f" for model {model}" if model is not None else ""
        if self.choices and value not in self.choices:
            raise MergeError(f"parameter {self.name!r} of {method!r} must be one of {self.choices}, got {value!r}")
        if self.interval and not _inside(value, self.interval):
            raise MergeError(f"parameter {self.name!r} must be in {self.interval}, got {value}{which} ({method!r})")


def _inside(x: float, interval: str) -> bool:
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    return (lo < x if interval[0] == "(" else lo <= x) and (x < hi if interval[-1] == ")" else x <= hi)


PARAMS_DEF = {p.name: p for p in [
    Param("weight", 1.0, "the model's weight w_i", per_model=True),
    Param("density", 1.0, "fraction of each task vector's entries kept", per_model=True, interval="(0, 1]"),
    Param("gamma", 0.01, "fraction of the largest magnitudes dropped", per_model=True, interval="[0, 1)"),
    Param("epsilon", 0.15, "half-width of DELLA's keep probabilities around density", per_model=True,
          interval="[0, 1)"),
    Param("lam", 1.0, "lambda: scale of the merged task vector"),
    Param("normalize", False, "divide the sum by the (agreeing) weights"),
    Param("rescale", False, "restore the trimmed task vector's size (rescale_mode)"),
    Param("trim", "tensor", "top-k per tensor (mergekit) or over the whole model (the TIES paper)",
          choices=("tensor", "global")),
    Param("consensus", "sum", "elect the sign of the summed mass or of the vote count", choices=("sum", "count")),
    Param("vote_on", "weighted", "vote on w_i * tau_i (mergekit) or on tau_i (peft)", choices=("weighted", "raw")),
    Param("divide_by", "weight", "normalize by the agreeing weights or by their count (peft)",
          choices=("weight", "count")),
    Param("rescale_mode", "l1", "restore the L1 norm (mergekit) or divide by the keep probability (the papers)",
          choices=("l1", "inverse")),
    Param("t", 0.5, "interpolation position from the first model (0) to the second (1)", interval="[0, 1]"),
    Param("filter_wise", False, "one ratio per row of the last axis (a matrix's output row) instead of per tensor"),
    Param("scale", 1.0, "factor on the model's tensor", per_model=True),
]}
COMMON = ("out_dtype", "check_finite")  # accepted by every method


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved, hashable settings of a method outside the task-vector family."""

    values: tuple  # ((name, value), ...)

    def __getitem__(self, name):
        return dict(self.values)[name]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    params: tuple[str, ...]
    leaf: Callable  # (base, models, opts, keys) -> merged float32 tensor
    paper: str
    needs_base: bool = True
    uses_base: bool = True  # False: a base_model given in a config is not an input
    random: bool = False
    min_models: int = 1
    max_models: int | None = None
    defaults: tuple = ()  # ((param, default), ...) overriding PARAMS_DEF's

    def default(self, name: str):
        return dict(self.defaults).get(name, PARAMS_DEF[name].default)


def _tv_method(name: str, paper: str) -> Method:
    """A setting of the task-vector composition (``task_vectors.RECIPES``)."""
    r = RECIPES[name]
    params = ["weight", "lam", "normalize", "divide_by"]
    if r.sparsify:
        params += ["density", "rescale"]
    if r.sparsify == "magnitude":
        params.append("trim")
    if r.sparsify == "magnitude_outliers":
        params.append("gamma")
    if r.sparsify == "della":
        params.append("epsilon")
    if r.sparsify in ("random", "della"):
        params.append("rescale_mode")
    if r.consensus:
        params += ["consensus", "vote_on"]
    return Method(name, tuple(params), task_vectors.merge_leaf, paper, random=r.sparsify in ("random", "della"),
                  defaults=(("normalize", r.normalize), ("rescale", r.rescale)))


METHODS_DEF = {m.name: m for m in [
    Method("linear", ("weight", "normalize"), lambda b, ms, o, k: methods.linear(ms, o["weight"], o["normalize"]),
           "Wortsman et al. 2022, Model soups", needs_base=False, uses_base=False, defaults=(("normalize", True),)),
    _tv_method("task_arithmetic", "Ilharco et al. 2023, Editing Models with Task Arithmetic"),
    _tv_method("ties", "Yadav et al. 2023, TIES-Merging"),
    _tv_method("dare_linear", "Yu et al. 2024, Language Models are Super Mario (DARE)"),
    _tv_method("dare_ties", "Yu et al. 2024 (DARE), with TIES's sign consensus"),
    _tv_method("breadcrumbs", "Davari & Belilovsky 2024, Model Breadcrumbs"),
    _tv_method("breadcrumbs_ties", "Davari & Belilovsky 2024 (Model Breadcrumbs), with TIES's sign consensus"),
    _tv_method("della", "Deep et al. 2024, DELLA-Merging (MagPrune)"),
    _tv_method("della_linear", "Deep et al. 2024, DELLA-Merging (MagPrune), without sign consensus"),
    Method("slerp", ("t",), lambda b, ms, o, k: methods.slerp(o["t"], ms[0], ms[1]),
           "Shoemake 1985; mergekit's per-tensor SLERP", needs_base=False, min_models=2, max_models=2),
    Method("model_stock", ("filter_wise",), lambda b, ms, o, k: methods.model_stock(b, ms, o["filter_wise"]),
           "Jang et al. 2024, Model Stock", min_models=2),
    Method("negate", ("weight", "lam"), lambda b, ms, o, k: methods.negate(b, ms, o["weight"], o["lam"]),
           "Ilharco et al. 2023, Editing Models with Task Arithmetic (negation)"),
    Method("passthrough", ("scale",), lambda b, ms, o, k: o["scale"][0] * ms[0],
           "mergekit's passthrough: one model's tensors as they are (times scale), for slices", needs_base=False,
           uses_base=False, max_models=1),
]}


def get(method: str) -> Method:
    if method not in METHODS_DEF:
        raise MergeError(f"unknown merge method {method!r}; choose from {', '.join(METHODS_DEF)}")
    return METHODS_DEF[method]


def accepted(method: str) -> set[str]:
    """Every parameter name ``method`` takes, ``COMMON`` included."""
    return set(get(method).params) | set(COMMON)


def check_names(method: str, names, spell=lambda p: p) -> None:
    """A ``MergeError`` naming each of ``names`` that ``method`` does not take: unknown
    anywhere, or which methods it applies to.  ``spell``: how to print a name."""
    extra = sorted(set(names) - accepted(method))
    if not extra:
        return
    why = []
    for p in extra:
        takers = [m for m, d in METHODS_DEF.items() if p in d.params]
        why.append(f"parameter {spell(p)!r} applies to {', '.join(takers)}, not to {method!r}" if takers
                   else f"unknown parameter {spell(p)!r}")
    raise MergeError(f"{'; '.join(why)}; {method!r} takes {', '.join(sorted(map(spell, accepted(method))))}")


def _resolve(spec: Method, name: str, params: dict, n: int):
    p = PARAMS_DEF[name]
    value = params.get(name, spec.default(name))
    if p.is_bool:
        if not isinstance(value, bool) and value not in (0, 1):
            raise MergeError(f"method {spec.name!r}: parameter {name!r} must be true or false, got {value!r}")
        return bool(value)
    if p.choices:
        p.check(value, spec.name)
        return value
    if p.per_model:
        values = per_model(value, n, name)
        for i, v in enumerate(values):
            p.check(v, spec.name, i)
        return values
    (value,) = per_model(value, 1, name)
    p.check(value, spec.name)
    return value


def resolve(method: str, n: int, params: dict) -> dict:
    """Every parameter ``method`` takes, as ``merge`` uses it over ``n`` models: the
    value given in ``params`` or the method's default, checked (per-model ones as
    tuples of ``n``).  Makes every check ``merge`` makes of its parameters,
    without any tensor (``--dry-run`` prints the result)."""
    spec = get(method)
    check_names(method, params)
    if params.get("out_dtype") is not None:
        try:
            jnp.dtype(params["out_dtype"])
        except TypeError:
            raise MergeError(f"parameter 'out_dtype': not a dtype: {params['out_dtype']!r}") from None
    values = {name: _resolve(spec, name, params, n) for name in spec.params}
    if values.get("normalize") and abs(sum(values["weight"])) < 1e-8:
        raise MergeError(f"method {method!r}: the weights {list(values['weight'])} sum to 0, so normalize: true has "
                         "nothing to divide by; give non-zero weights or normalize: false")
    if method in RECIPES and RECIPES[method].sparsify == "della":
        for i, (d, e) in enumerate(zip(values["density"], values["epsilon"])):
            if d < 1 and not (0 < d - e and d + e < 1):
                raise MergeError(f"method {method!r}: density +/- epsilon must lie in (0, 1), got density={d}, "
                                 f"epsilon={e} for model {i}")
    return values


def options(method: str, n: int, params: dict):
    """The validated options of ``method`` over ``n`` models (``resolve``'s values).

    Returns a hashable value, static under ``jit``: ``task_vectors.Options``
    for the task-vector family, ``Settings`` for the other methods.
    """
    values = resolve(method, n, params)
    if method not in RECIPES:
        return Settings(tuple(values.items()))
    recipe = RECIPES[method]
    return task_vectors.Options(
        sparsify=recipe.sparsify,
        consensus=values.get("consensus") if recipe.consensus else None,
        normalize=values["normalize"],
        rescale=values.get("rescale", recipe.rescale),
        weight=values["weight"],
        density=values.get("density", (1.0,) * n),
        gamma=values.get("gamma", (PARAMS_DEF["gamma"].default,) * n),
        epsilon=values.get("epsilon", (PARAMS_DEF["epsilon"].default,) * n),
        lam=values["lam"],
        trim=values.get("trim", "tensor"),
        vote_on=values.get("vote_on", "weighted"),
        divide_by=values["divide_by"],
        rescale_mode=values.get("rescale_mode", "l1"),
    )


def table() -> str:
    """The registry as a Markdown table (for the docs)."""
    rows = ["| method | parameters | base | random | paper |", "|---|---|---|---|---|"]
    for m in METHODS_DEF.values():
        ps = ", ".join(f"{p}{'[i]' if PARAMS_DEF[p].per_model else ''}={m.default(p)!r}" for p in m.params)
        rows.append(f"| `{m.name}` | {ps} | {'yes' if m.needs_base else 'no'} | {'yes' if m.random else 'no'} | "
                    f"{m.paper} |")
    return "\n".join(rows)
