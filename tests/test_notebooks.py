"""Execute the notebooks, as users will run them, and check that their figures are there.

Every notebook must show at least one figure, and every code cell tagged ``figure``
(cell metadata ``"tags": ["figure"]``) must have an ``image/png`` output: a figure that
silently fails to appear (``matplotlib.use("Agg")`` in a cell or in a library call)
fails the test.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def _pngs(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter_client internals
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    tagged = [c for c in code if "figure" in c.metadata.get("tags", [])]
    missing = [c.source.splitlines()[0] for c in tagged if not _pngs(c)]
    assert not missing, f"cells tagged 'figure' without an image/png output: {missing}"
    assert sum(_pngs(c) for c in code) >= max(len(tagged), 1)
    if path.name == "real_data.ipynb" and (REALDATA / "decam-sfft").exists():  # its figures
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs)


REALDATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "realdata"
