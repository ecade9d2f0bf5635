"""Every Python snippet and shell block of the README runs as written.

The snippets are executed in order, in one namespace, from a directory that
holds what they name (``path/to/llama``, a small HF checkpoint with its own
BPE tokenizer; ``data/*.jsonl``).  The names a snippet takes from its reader
(``finetuned``, ``base``, ``samples``, ...) are given small real values
here; nothing else is added.  Shell blocks run with bash, ``-e``, with the
project's ``python`` and ``research-merge`` first on ``PATH``.
"""

import os
import re
import subprocess
import sys

from tinyhf import write_jsonl, write_tiny_llama

import jax
import jax.numpy as jnp
import numpy as np

from research.models import preset
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
    write_tiny_llama(str(tmp_path / "path" / "to" / "llama"))
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
    assert namespace["logits"].shape[-1] == namespace["model"].cfg.vocab_size > preset("tiny").vocab_size
    assert os.path.isfile(tmp_path / "out" / "dir" / "config.json")


def shell_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_every_readme_shell_block_runs_as_written(tmp_path, monkeypatch):
    blocks = shell_blocks(open(README).read())
    assert blocks, "the README's recipe is a bash block"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    write_tiny_llama(str(tmp_path / "path" / "to" / "llama"))
    write_jsonl(str(tmp_path / "data" / "a.jsonl"), "reverse", seed=1)
    write_jsonl(str(tmp_path / "data" / "b.jsonl"), "copy", seed=2)
    os.symlink(os.path.join(root, "experiments"), tmp_path / "experiments")
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": root, "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    for i, block in enumerate(blocks):
        proc = subprocess.run(["bash", "-e", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, f"README shell block {i + 1}:\n{block}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    out = proc.stdout
    assert "| a | " in out and "| b | " in out and "perplexity" in out  # the evaluation table, one row per file
    for d in ("out/a", "out/b", "out/merged"):
        assert os.path.isfile(tmp_path / d / "config.json") and os.path.isfile(tmp_path / d / "tokenizer.json"), d
    assert os.path.isfile(tmp_path / "runs" / "b" / "adapter" / "adapter_model.safetensors")
    monkeypatch.chdir(tmp_path)  # the runs name their base relative to where the recipe ran
    _exports_reload_with_the_trained_logits(tmp_path)


def _exports_reload_with_the_trained_logits(tmp_path):
    """``from_hf(out/x)`` computes the logits of the trained run (the LoRA one merged)."""
    from research.export import load_run
    from research.models import from_hf

    batch = {"tokens": jnp.asarray(np.random.default_rng(0).integers(3, 300, (2, 16)), jnp.int32)}
    for run in ("a", "b"):
        trained, _, _ = load_run(str(tmp_path / "runs" / run))
        reloaded = from_hf(str(tmp_path / "out" / run))
        np.testing.assert_allclose(np.asarray(reloaded(batch)), np.asarray(trained(batch)), atol=1e-5, rtol=1e-5)
    base = from_hf(str(tmp_path / "path" / "to" / "llama"))
    assert not np.allclose(np.asarray(base(batch)), np.asarray(from_hf(str(tmp_path / "out" / "b"))(batch)))
