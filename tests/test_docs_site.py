"""The docs site: every public name has an API entry, the examples run, the CLI page is generated.

The strict MkDocs build itself runs in ``.ci/docs.sh`` (it needs the ``docs`` extra); these
checks need only the package.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from pathlib import Path

import pytest

import torchfpi

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARK = "<!-- example: executed by tests/test_docs_site.py -->"
# Words of the developers' own setup that a user's page must not contain (the folder names are
# spelled in pieces so that this file does not contain them either).
WORKSHOP = ("/".join(["..", "shared"]), "/".join(["", "work", ""]))
FORBIDDEN = (*WORKSHOP, "ANCHORS", "this kind of machine", "session 3", "session 4", "issue 7", "issue 8")


def _api_entries() -> set:
    entries = set()
    for page in (DOCS / "api").glob("*.md"):
        entries.update(re.findall(r"^::: (torchfpi(?:\.\w+)+)\s*$", page.read_text(), re.M))
    return entries


def test_every_public_name_has_an_api_entry():
    entries = _api_entries()
    missing = [name for name in torchfpi.__all__ if f"torchfpi.{name}" not in entries]
    assert not missing, f"add '::: torchfpi.NAME' to a page of docs/api/ for: {missing}"


def test_public_modules_have_api_entries():
    entries = _api_entries()
    for module in ("torchfpi.energies", "torchfpi.errors", "torchfpi.io", "torchfpi.runtime"):
        assert module in entries, module


def test_api_entries_name_real_objects():
    for entry in _api_entries():
        obj = torchfpi
        for part in entry.split(".")[1:]:
            obj = getattr(obj, part)


def test_nav_lists_every_page():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in sorted(DOCS.rglob("*.md")):
        rel = page.relative_to(DOCS).as_posix()
        assert f": {rel}" in nav, f"{rel} is not in the nav of mkdocs.yml"
    assert ": data.md" in nav and ": cli.md" in nav
    generated = {"cli.md"}  # written at build time by docs/hooks/cli_reference.py
    for rel in re.findall(r":\s+(\S+\.md)\s*$", nav, re.M):
        # data.md is written with the `torchfpi data` command, in its own change.
        assert rel in generated or (DOCS / rel).exists() or rel == "data.md", f"nav: no docs/{rel}"


def test_pages_speak_to_users():
    for page in [ROOT / "README.md", *DOCS.rglob("*.md")]:
        text = page.read_text()
        for word in FORBIDDEN:
            assert word not in text, f"{page.relative_to(ROOT)}: {word!r}"


def _examples():
    for page in sorted(DOCS.rglob("*.md")):
        for i, block in enumerate(page.read_text().split(MARK)[1:]):
            code = re.match(r"\s*```python\n(.*?)```", block, re.S)
            assert code, f"{page}: {MARK} must precede a python block"
            yield pytest.param(page, code.group(1), id=f"{page.relative_to(DOCS).as_posix()}-{i}")


@pytest.mark.parametrize("page, code", list(_examples()))
def test_docs_example_runs(page, code, capsys):
    assert max(map(len, code.splitlines())) <= 80  # fits the page's code column
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(code, str(page), "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    assert out.strip()  # every example prints what it shows
    found = re.search(r"training accuracy ([0-9.]+)", out)
    if found:  # the getting-started classifier learns its task
        assert float(found.group(1)) >= 0.95, out


def test_getting_started_classifier_is_short():
    page = DOCS / "getting-started.md"
    code = re.search(r"```python\n(.*?)```", page.read_text().split(MARK)[1], re.S).group(1)
    assert "training accuracy" in code
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) <= 22, len(lines)  # "a DEQ classifier in 20 lines"


def _cli_hook():
    spec = importlib.util.spec_from_file_location("cli_reference", DOCS / "hooks" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_covers_every_command_and_option():
    from torchfpi.cli import build_parser

    hook = _cli_hook()
    parser = build_parser()
    page = hook.render(parser)
    for _, sub, leaf in hook._walk(parser):
        assert f"## {sub.prog} " in page
        if leaf:
            for action in sub._actions:
                for flag in action.option_strings:
                    if flag not in ("-h", "--help"):
                        assert f"`{flag}`" in page, f"{sub.prog} {flag}"
    assert "## torchfpi demo " in page and "## torchfpi train flow " in page
