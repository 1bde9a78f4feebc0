"""The Colab notebook runs top to bottom (with few denoising steps) on the embedded JeDi-mini."""
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient
import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "jedi_jax_demo.ipynb"


@pytest.mark.slow
def test_notebook_executes(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.setenv("JEDI_NOTEBOOK_STEPS", "3")
    # the converted-checkpoint cell runs too: on the tiny random-weight JeDi folder (same code path as
    # a converted SD 1.5 one, bf16) with photos from tests/data as the references
    monkeypatch.setenv("SD15_JEDI_DIR", str(tiny_model_dir))
    photos = sorted((Path(__file__).parent / "data" / "dreambench").glob("*.jpg"))
    monkeypatch.setenv("SD15_REFERENCES", ",".join(str(p) for p in photos[:3]))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3 + 3 + 1  # references + grids + the converted-checkpoint cell's grid
    assert not any("no folder" in "".join(o.get("text", "")) for o in outputs)  # that cell did not skip
