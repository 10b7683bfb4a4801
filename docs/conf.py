"""Sphinx configuration of the exactgn documentation.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html``. Offline by construction: furo
bundles its CSS, JavaScript and fonts; no extension here fetches anything, and the pages use no MathJax
(the mathematics is written in Unicode), so the built site reads without a network.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # document this checkout, not an installed copy
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

import exactgn  # noqa: E402

# The examples run inside this process: one thread by default keeps them fast on a shared 2-core machine.
torch.set_num_threads(int(os.environ.get("EXACTGN_DOCS_THREADS", "1")))

project = "exactgn"
author = "exactgn developers"
copyright = "exactgn developers"
release = exactgn.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "examples",
    "Thumbs.db",
    ".DS_Store",
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
]
myst_heading_anchors = 3
suppress_warnings = ["config.cache"]  # sphinx-gallery's non-picklable settings; harmless, rebuilt each time

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": False, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

sphinx_gallery_conf = {
    "examples_dirs": "examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",  # every example executes
    "ignore_pattern": r"__init__\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "capture_repr": ("_repr_html_",),
    "matplotlib_animations": False,
    "reset_modules": ("matplotlib",),
    "within_subsection_order": "FileNameSortKey",
    "show_signature": False,
    "write_computation_times": False,
}

html_theme = "furo"
html_title = f"exactgn {release}"
html_static_path = ["_static"]
html_css_files = ["exactgn.css"]
html_theme_options = {"navigation_with_keys": True}
html_show_sourcelink = False
