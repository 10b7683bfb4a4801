"""The documentation site (docs/): every public name has a reference entry, and the gallery checks itself.

The site itself is built by ``.ci/run`` (``python -m sphinx -W``), which executes every example: a broken
example, or one whose exactness check fails, fails CI there. These tests need no Sphinx."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import exactgn

DOCS = Path(__file__).resolve().parents[1] / "docs"
DIRECTIVE = re.compile(r"^\.\. (?:autoclass|autofunction|autoexception):: (\w+)\s*$", re.MULTILINE)


def _documented_names() -> list[str]:
    return DIRECTIVE.findall((DOCS / "api.rst").read_text(encoding="utf-8"))


def test_every_public_name_has_exactly_one_reference_entry():
    names = _documented_names()
    assert sorted(set(exactgn.__all__) - set(names)) == [], "add these to docs/api.rst"
    assert sorted(set(names) - set(exactgn.__all__)) == [], "docs/api.rst documents names not in __all__"
    assert len(names) == len(set(names)), "a name is documented twice in docs/api.rst"


def test_every_public_name_has_a_docstring():
    missing = [n for n in exactgn.__all__ if len(inspect.getdoc(getattr(exactgn, n)) or "") < 30]
    assert missing == []


def test_every_public_function_states_a_shape_or_a_return():
    # Functions and models handle tensors: their docstring must say what shape goes in or comes out.
    shape = re.compile(r"``[^`]*(?:[BbdkhnLP]|Bk) × [^`]*``|shaped like|\(scalar\)|0-dim|Returns ")
    no_tensors = {"mlp_width_for"}  # sizes in, an int out
    unstated = [
        n
        for n in set(exactgn.__all__) - no_tensors
        if (inspect.isfunction(getattr(exactgn, n)) or n in {"RevMLP", "MLP", "ResMLP", "GaussNewton"})
        and not shape.search(inspect.getdoc(getattr(exactgn, n)))
    ]
    assert unstated == []


def test_every_example_is_a_gallery_script_that_checks_what_it_shows():
    examples = sorted((DOCS / "examples").glob("plot_*.py"))
    assert len(examples) >= 6
    for path in examples:
        text = path.read_text(encoding="utf-8")
        title = text.split('"""')[1].strip().splitlines()
        assert len(title) >= 2 and set(title[1]) == {"="}, f"{path.name}: needs a title underlined with ="
        assert "assert " in text, f"{path.name}: should assert what it demonstrates, so a regression fails CI"


def test_the_built_site_is_ignored_by_git():
    ignored = (DOCS.parent / ".gitignore").read_text(encoding="utf-8").splitlines()
    for entry in ("docs/_build/", "docs/auto_examples/"):
        assert entry in ignored
