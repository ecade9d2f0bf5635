"""The loss-landscape notebook runs at a tiny scale, and its jupytext pair is in sync."""

import os

from test_experiments import ROOT


def test_notebook_executes(tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    small = {"NOTEBOOK_STEPS": "8", "NOTEBOOK_GRID": "3", "NOTEBOOK_SAMPLES": "8", "NOTEBOOK_OUT": str(tmp_path / "nb"),
             # one CPU device, as a user's kernel has, not this process's 8 fake ones
             "XLA_FLAGS": os.environ["TEST_SUBPROCESS_XLA_FLAGS"]}
    for k, v in small.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    assert (tmp_path / "nb" / "landscape.png").exists()


def test_notebook_pair_is_in_sync():
    import jupytext

    py = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    ipynb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]
