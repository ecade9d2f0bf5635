"""The method registry (``merging.registry``): one table read by ``merge()``, the YAML
checks and ``--dry-run``; and the CPU backend's seam (``merging.cpu``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import merging
from research.merging import cpu, registry

A = {"w": jnp.arange(12.0).reshape(3, 4) / 10, "b": jnp.ones(5)}
BASE = jax.tree.map(jnp.zeros_like, A)
B = jax.tree.map(lambda x: -0.5 * x + 0.1, A)


@pytest.mark.parametrize("method,param,value", [
    ("ties", "gamma", 0.1), ("ties", "epsilon", 0.1), ("task_arithmetic", "consensus", "sum"),
    ("task_arithmetic", "density", 0.5), ("dare_linear", "trim", "global"), ("linear", "lam", 0.5),
    ("breadcrumbs", "rescale_mode", "l1"), ("slerp", "weight", 1.0),
])
def test_an_inapplicable_parameter_names_the_method_and_the_parameter(method, param, value):
    models = [A, B]
    base = None if method in ("linear", "slerp") else BASE
    with pytest.raises(merging.MergeError, match=rf"parameter '{param}' applies to .*not to '{method}'"):
        merging.merge(method, models, base=base, key=jax.random.key(0), **{param: value})


def test_an_unknown_parameter_is_named():
    with pytest.raises(merging.MergeError, match=r"unknown parameter 'densty'.*'ties' takes"):
        merging.merge("ties", [A, B], base=BASE, densty=0.5)


@pytest.mark.parametrize("method", list(registry.METHODS_DEF))
def test_every_method_runs_with_its_declared_defaults(method):
    spec = registry.get(method)
    models = [A, B][:spec.max_models]
    out = merging.merge(method, models, base=BASE if spec.needs_base else None,
                        key=jax.random.key(0) if spec.random else None)
    assert jax.tree.structure(out) == jax.tree.structure(A)
    assert spec.paper and all(p in registry.PARAMS_DEF for p in spec.params)


def test_registry_defaults_are_the_ones_merge_applies():
    # ties normalizes by default, task_arithmetic does not: (0.2 + 0.6) / 2 against 0.2 + 0.6
    fts = [{"w": jnp.array([0.2])}, {"w": jnp.array([0.6])}]
    z = {"w": jnp.zeros(1)}
    assert float(merging.merge("ties", fts, base=z)["w"][0]) == pytest.approx(0.4)
    assert float(merging.merge("task_arithmetic", fts, base=z)["w"][0]) == pytest.approx(0.8)
    assert registry.get("ties").default("normalize") and not registry.get("task_arithmetic").default("normalize")


@pytest.mark.parametrize("value,ok", [(0.0, False), (1e-9, True), (1.0, True), (1.0001, False)])
def test_density_interval_is_open_at_zero_and_closed_at_one(value, ok):
    if ok:
        registry.options("ties", 2, {"density": value})
    else:
        with pytest.raises(merging.MergeError, match=r"'density' must be in \(0, 1\]"):
            registry.options("ties", 2, {"density": value})


def test_booleans_must_be_booleans():
    with pytest.raises(merging.MergeError, match="'normalize' must be true or false"):
        registry.options("ties", 2, {"normalize": "yes"})


def test_leaf_keys_come_from_names_not_positions():
    """Adding a leaf before another does not change the other's DARE mask."""
    rng = np.random.default_rng(0)
    x = {"z": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    z = jax.tree.map(jnp.zeros_like, x)
    alone = merging.merge("dare_linear", [x], base=z, key=jax.random.key(1), density=0.5)
    more = {"a": jnp.ones(3), **x}
    with_a = merging.merge("dare_linear", [more], base=jax.tree.map(jnp.zeros_like, more), key=jax.random.key(1),
                           density=0.5)
    np.testing.assert_array_equal(np.asarray(alone["z"]), np.asarray(with_a["z"]))
    assert merging.tree.leaf_names({"model": {"layers": [{"w": 1}]}}) == ["model.layers.0.w"]


@pytest.mark.parametrize("method,kw", [
    ("ties", {"density": 0.3}), ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.05}),
    ("dare_ties", {"density": 0.4}), ("della", {"density": 0.4, "epsilon": 0.1}),
])
def test_switching_the_cpu_backend_off_gives_the_same_tensors(monkeypatch, method, kw):
    rng = np.random.default_rng(3)
    mk = lambda s: {"w": jnp.asarray(rng.normal(size=(32, 48)) * s, jnp.bfloat16), "v": jnp.asarray(rng.normal(size=40) * s, jnp.bfloat16)}
    base = mk(0.02)
    fts = [jax.tree.map(lambda b, d: (b.astype(jnp.float32) + d).astype(jnp.bfloat16), base, mk(0.003)) for _ in range(3)]
    key = jax.random.key(2)
    calls = []
    real = cpu._leaf.merge_leaf
    monkeypatch.setattr(cpu._leaf, "merge_leaf", lambda *a, **k: calls.append(1) or real(*a, **k))
    on = merging.merge(method, fts, base=base, key=key, **kw)
    assert len(calls) == 2  # the backend took both leaves
    monkeypatch.setattr(cpu, "ENABLED", False)
    off = merging.merge(method, fts, base=base, key=key, **kw)
    assert len(calls) == 2  # and none with it off
    for k in base:
        np.testing.assert_array_equal(np.asarray(on[k]), np.asarray(off[k]), err_msg=k)


def test_the_environment_switch_is_read(monkeypatch):
    import importlib
    try:
        for value, enabled in [("0", False), ("off", False), ("serial", True), ("1", True)]:
            monkeypatch.setenv("RESEARCH_MERGE_CPU", value)
            assert importlib.reload(cpu).ENABLED is enabled, value
    finally:
        monkeypatch.undo()
        importlib.reload(cpu)
