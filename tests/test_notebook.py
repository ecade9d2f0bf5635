"""The loss-landscape notebook runs at a tiny scale, and its jupytext pair is in sync."""

import os

from test_experiments import ROOT


def test_notebook_executes(tmp_path):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    small = {"NOTEBOOK_STEPS": "8", "NOTEBOOK_GRID": "3", "NOTEBOOK_SAMPLES": "8", "NOTEBOOK_OUT": str(tmp_path / "nb")}
    os.environ.update(small)
    try:
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    finally:
        for k in small:
            os.environ.pop(k)
    assert (tmp_path / "nb" / "landscape.png").exists()


def test_notebook_pair_is_in_sync():
    import jupytext

    py = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.py"))
    ipynb = jupytext.read(os.path.join(ROOT, "notebooks", "loss_landscape.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]
