"""The README's example runs, and its two commands stay the first lines."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    text = README.read_text()
    block = text.split("<!-- example: executed by tests/test_readme.py -->", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    assert len(code.strip().splitlines()) <= 16
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.split()
    assert out[0] == "True" and out[3] == "tensor(True)"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[2] == "```bash"
    assert "torchfpi demo" in lines[3] and "torch==2.13.0" in lines[3]
    assert "python -m pytest" in lines[4] and "torch==2.13.0" in lines[4]
    assert lines[5] == "```"
