"""Every notebook runs top to bottom in a fresh kernel, in fast mode, and shows its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
FIGURE_TAG = "figure"
"""Cell tag of the cells that must display a figure (and only they may)."""


def _shows_image(cell) -> bool:
    return any(o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})
               for o in cell.get("outputs", []))


def test_fig3_notebook_exists():
    assert any("fig3" in nb.name for nb in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") for c in code), f"{path.name}: strip its outputs before committing"
    assert any(FIGURE_TAG in c.metadata.get("tags", []) for c in code), f"{path.name} tags no figure cell"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_shows_its_figures(path, monkeypatch):
    monkeypatch.setenv("ANOMALY_FAST", "1")
    # The kernel must pick its own (inline) backend, as in Jupyter: a notebook that only
    # works under Agg shows no figure to its reader.
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            tagged = FIGURE_TAG in cell.metadata.get("tags", [])
            assert _shows_image(cell) == tagged, (
                f"{path.name} cell {i} ({cell.source.splitlines()[0]!r}): "
                + ("tagged 'figure' but displays no image" if tagged else "displays an image but is not tagged 'figure'")
            )
