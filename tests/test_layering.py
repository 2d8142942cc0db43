"""Packages meet only through public modules (parsed imports of every file, no import run).

``torchfpi/data``, ``apps``, ``bench``, ``cli`` and ``scripts/`` may import the public modules of
torchfpi (no path component starting with ``_``) and the private modules of their own
sub-package only; the core (``torchfpi/_*.py``) never imports an application.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["torchfpi/data", "torchfpi/apps", "torchfpi/bench", "torchfpi/cli", "scripts"]


def _files(folder: str) -> list:
    return sorted((ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list:
    """``(line, absolute module)`` for every import of a torchfpi module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module))
            # ``from torchfpi import _x`` names a private module too
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names if a.name.startswith("_")
                    and not a.name.startswith("__")]
    return [(line, m) for line, m in out if m == "torchfpi" or m.startswith("torchfpi.")]


def _owner(path: Path) -> str:
    """The sub-package whose private modules ``path`` may use (``torchfpi.apps.denoise``, ...)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[0] == "scripts":
        return "scripts"  # scripts are users: public modules only
    return ".".join(parts[:-1]) if path.name != "__init__.py" else ".".join(parts[:-1])


def violations(path: Path) -> list:
    owner = _owner(path)
    bad = []
    for line, module in _imports(path):
        parts = module.split(".")
        private = [i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")]
        if not private:
            continue
        # Allowed: a private module inside the importer's own sub-package.
        parent = ".".join(parts[: private[0]])
        if owner == parent or owner.startswith(parent + ".") and parent != "torchfpi":
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: imports {module}")
    return bad


@pytest.mark.parametrize("folder", PACKAGES)
def test_packages_import_only_public_modules(folder):
    bad = [v for f in _files(folder) for v in violations(f)]
    assert not bad, "private modules used across packages:\n" + "\n".join(bad)


def test_core_does_not_import_applications():
    bad = []
    for f in sorted((ROOT / "torchfpi").glob("_[a-z]*.py")):
        for line, module in _imports(f):
            if module.split(".")[1:2] and module.split(".")[1] in ("apps", "bench", "cli", "data"):
                bad.append(f"{f.name}:{line}: imports {module}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_violation(tmp_path, monkeypatch):
    # The rule itself can fail: a cli file importing a core private module is caught.
    fake_root = tmp_path
    (fake_root / "torchfpi" / "cli").mkdir(parents=True)
    bad = fake_root / "torchfpi" / "cli" / "_x.py"
    bad.write_text("from torchfpi._partial import energy_grad\nfrom torchfpi.apps.denoise import _train\n")
    ok = fake_root / "torchfpi" / "cli" / "_y.py"
    ok.write_text("from torchfpi.cli import _x\nfrom . import _x\nimport torchfpi.io\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    assert [v.split(": ")[1] for v in violations(bad)] == [
        "imports torchfpi._partial",
        "imports torchfpi.apps.denoise._train",
    ]
    assert violations(ok) == []
