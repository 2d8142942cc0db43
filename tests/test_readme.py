"""The README's example runs, its two commands come first, and it speaks to users."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = text.split("<!-- example: executed by tests/test_readme.py -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[0] == "True" and out[3] == "tensor(True)"


def test_readme_starts_with_title_line_then_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[0] == "# torchfpi"
    assert lines[1] and not lines[1].startswith(("#", "```"))  # one line on what it is
    fence = lines.index("```bash")
    assert all(not line.startswith("```") for line in lines[:fence])  # no command before them
    first, second, end = lines[fence + 1], lines[fence + 2], lines[fence + 3]
    assert first.startswith("pip ") and "torchfpi demo" in first and "torch==2.13.0" in first
    assert second.startswith("pip ") and "python -m pytest" in second and "torch==2.13.0" in second
    assert "TORCH_SPEC" in first and "TORCH_SPEC" in second
    assert end == "```"
    # CI runs the first line of this shape.
    assert re.search(r"^pip install .*python -m pytest", README.read_text(), re.M)


def test_readme_has_no_workshop_words():
    text = README.read_text()
    workshop = ("/".join(["..", "shared"]), "/".join(["", "work", ""]))  # spelled in pieces
    for word in (*workshop, "ANCHORS", "this kind of machine", "claim 1", "does not hold"):
        assert word not in text, word


def test_results_tables_are_up_to_date():
    spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stale = module.stale()
    assert not stale, f"run python scripts/readme_results.py: {sorted(str(p) for p in stale)}"
