"""Execute the notebooks, as users will run them, and check that their figures are there.

Every notebook must show at least one figure, and every code cell tagged ``figure``
(cell metadata ``"tags": ["figure"]``) must have an ``image/png`` output: a figure that
silently fails to appear (``matplotlib.use("Agg")`` in a cell or in a library call)
fails the test.  ``FIGURES`` names the figures each notebook must draw, by a call that
draws it in a ``figure`` cell; a notebook missing from it fails, so a new notebook
comes with its list.
"""

import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
REALDATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "realdata"

#: notebook -> calls that must each be in a ``figure`` cell with an image/png output
FIGURES = {
    "quickstart.ipynb": [
        "plot.image_triplet(science, template, diff",  # a whole CCD with its detections
        "plot.image_triplet(*cutouts",  # the brightest alert's cutouts with the sources
        "plot.alert_cutouts(",
        "plot.focal_plane(",
        "plot.stage_timings(",
    ],
    "inspect_visit.ipynb": [
        "plot.focal_plane(",  # QA on the focal plane, the bad CCD grey
        "plot.light_curve(hist",  # from object_history
        "plot.task_stream(",
        "plot.stage_timings(",
    ],
    "alerts.ipynb": [
        "plot.alert_cutouts(brightest)",  # from the files
        "plot.alert_cutouts(a)",  # from Kafka
        "plot.light_curve(",  # the light curve an alert carries
    ],
    "benchmarks.ipynb": [
        "budget_used(c)",  # every figure against its target
        "write_summary(report",  # apdask bench's picture: targets, peers, floors
        'sub["peers_published_s"]',  # subtraction vs the FFT floor and peers
        'sub["subtract_steps_s"]',
        "rates = {",  # alert packaging vs lsst.alert.packet
    ],
    "real_data.ipynb": [],  # its figures need shared/realdata (checked below)
}


def _pngs(cell):
    return sum("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _stdout(cells):
    return "".join(
        o.get("text", "") for c in cells for o in c.get("outputs", []) if o.get("name") == "stdout"
    )


def test_every_notebook_has_its_list_of_figures():
    assert sorted(FIGURES) == [p.name for p in NOTEBOOKS]


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
    for call in FIGURES.get(path.name, []):
        drawn = [c for c in tagged if call in c.source and _pngs(c)]
        assert drawn, f"{path.name}: no figure cell drawing {call!r} has an image/png"
    if path.name in ("quickstart.ipynb", "inspect_visit.ipynb"):  # a Client was started
        assert re.search(r"dashboard: http://[\w.\-]+:\d+/status", _stdout(code))
    if path.name == "real_data.ipynb" and (REALDATA / "decam-sfft").exists():  # its figures
        outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
        assert any("image/png" in o.get("data", {}) for o in outputs)
