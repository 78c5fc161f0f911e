"""Sphinx configuration of the apdask documentation (``make docs``).

Markdown pages go through myst-parser, notebooks through myst-nb (not executed by
default: set ``APDASK_DOCS_EXECUTE=1`` to run them at build time), the API reference
is ``api.rst`` (autosummary + numpydoc) and the CLI and configuration references are
generated from the argparse parser and ``apdask/apdask.yaml`` by ``_ext/apdask_docs.py``.
"""

import os
import pathlib
import sys

DOCS = pathlib.Path(__file__).parent
sys.path.insert(0, str(DOCS.parent))  # the checkout's apdask, installed or not
sys.path.insert(0, str(DOCS / "_ext"))

import apdask  # noqa: E402

project = "apdask"
author = "the apdask developers"
copyright = "the apdask developers, BSD-3-Clause"  # noqa: A001
version = release = getattr(apdask, "__version__", "0.1.0")

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
    "numpydoc",
    "myst_nb",  # also registers myst_parser for .md
    "apdask_docs",
]

root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# --- API reference
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
numpydoc_show_class_members = False  # autodoc lists the members once
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# --- Markdown and notebooks
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "cache" if os.environ.get("APDASK_DOCS_EXECUTE") == "1" else "off"
nb_execution_timeout = 600
nb_execution_raise_on_error = True

# --- Cross-references to the libraries apdask hands objects of (off-line builds: no fetch)
intersphinx_mapping = {}
if os.environ.get("APDASK_DOCS_INTERSPHINX") == "1":
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "astropy": ("https://docs.astropy.org/en/stable", None),
        "dask": ("https://docs.dask.org/en/stable", None),
        "matplotlib": ("https://matplotlib.org/stable", None),
    }

# --- HTML
html_theme = "pydata_sphinx_theme"
html_title = "apdask"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path = []
