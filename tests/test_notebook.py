"""The Colab notebook runs top to bottom (with few denoising steps) on the embedded JeDi-mini."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "jedi_jax_demo.ipynb"


def test_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("JEDI_NOTEBOOK_STEPS", "3")
    monkeypatch.setenv("SD15_JEDI_DIR", str(tmp_path / "absent"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3 + 3  # references + grids
