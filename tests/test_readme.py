"""Every Python snippet of the README runs as written.

The snippets are executed in order, in one namespace, from a directory that
holds what they name (``path/to/llama``, a small HF checkpoint).  The names a
snippet takes from its reader (``finetuned``, ``base``, ``samples``, ...) are
given small real values here; nothing else is added.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.models import Transformer, preset, save_hf
from research.neftune import neftune

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def _reader_names(tmp_path):
    rng = np.random.default_rng(0)
    tree = lambda: {"w": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32), "b": jnp.zeros(4)}
    base = tree()
    ft_a, ft_b, ft_c = (jax.tree.map(lambda x: x + 0.1 * jnp.asarray(rng.standard_normal(x.shape), x.dtype), base)
                        for _ in range(3))
    os.makedirs(tmp_path / "path" / "to")
    save_hf(Transformer(preset("tiny"), rngs=nnx.Rngs(0)), str(tmp_path / "path" / "to" / "llama"))
    samples = [{"tokens": rng.integers(3, 250, size=int(n)).astype(np.int32), "task_id": i % 2}
               for i, n in enumerate(rng.integers(5, 300, size=40))]
    tv = lambda ft: jax.tree.map(lambda f, b: f - b, ft, base)
    return {"finetuned": ft_a, "base": base, "ft_a": ft_a, "ft_b": ft_b, "ft_c": ft_c, "tv_a": tv(ft_a),
            "tv_b": tv(ft_b), "samples": samples, "jnp": jnp, "neftune": neftune, "key": jax.random.key(0)}


def test_the_readme_has_python_snippets():
    assert len(python_snippets(open(README).read())) >= 3


def test_every_readme_python_snippet_runs_as_written(tmp_path, monkeypatch):
    snippets = python_snippets(open(README).read())
    namespace = _reader_names(tmp_path)
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(snippets):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python snippet {i + 1} fails:\n{code}\n{type(e).__name__}: {e}") from e
    assert namespace["logits"].shape[-1] == preset("tiny").vocab_size
    assert os.path.isfile(tmp_path / "out" / "dir" / "config.json")
