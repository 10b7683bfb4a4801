"""The README's Python examples run as printed, and do what their comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_its_python_examples():
    assert len(BLOCKS) >= 2 and any("nn.Sequential" in b for b in BLOCKS)
    assert all(len(b.strip().splitlines()) <= 13 for b in BLOCKS)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_example_runs_and_its_loss_falls(index):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {})  # noqa: S102
    losses = [float(v) for v in re.findall(r"loss before step: (\S+)", out.getvalue())]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], out.getvalue()
