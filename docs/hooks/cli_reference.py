"""MkDocs hook: the command-line reference page (``cli.md``), generated at build time.

Every page section is read from the parser the ``torchfpi`` command itself uses
(``torchfpi.cli.build_parser()``), walking its sub-commands, so the reference cannot drift
from the program. ``render(parser)`` is also used by ``tests/test_docs_site.py``.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterator, List, Tuple

PAGE = "cli.md"

_INTRO = """# Command line

`torchfpi COMMAND ...` (also `python -m torchfpi COMMAND ...`). Every command prints a one-line
error and exits with **0** on success, **1** on a runtime failure (bad data, non-convergence,
NaN) and **2** on a usage error.

This page is generated from the command's own argument parser when the documentation is built.
"""


def _subcommands(parser: argparse.ArgumentParser) -> List[Tuple[str, str, argparse.ArgumentParser]]:
    """``(name, one-line help, parser)`` of each sub-command of ``parser``, in definition order."""
    out = []
    for action in parser._actions:  # argparse keeps no public list of its actions
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def _walk(parser: argparse.ArgumentParser) -> Iterator[Tuple[str, argparse.ArgumentParser, bool]]:
    """``(help, parser, is_leaf)`` for every parser below ``parser``, depth first."""
    for _, helptext, sub in _subcommands(parser):
        children = _subcommands(sub)
        yield helptext, sub, not children
        yield from _walk(sub)


def _cell(text: str) -> str:
    """Help text as one Markdown line: no table breaks, no tags (``<root>``), no emphasis."""
    text = " ".join(text.split())
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("*", "\\*")):
        text = text.replace(char, escaped)
    return text


def _option_rows(parser: argparse.ArgumentParser) -> List[str]:
    formatter = parser._get_formatter()  # argparse's own rendering of metavars and %(...)s help
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            names = ", ".join(f"`{s}`" for s in action.option_strings)
            if action.nargs != 0:
                names += f" `{formatter._format_args(action, action.dest.upper())}`"
        else:
            names = f"`{formatter._format_args(action, action.dest)}`"
        helptext = formatter._expand_help(action) if action.help else ""
        if action.required and action.option_strings:
            helptext = "**required.** " + helptext
        default = action.default
        shown = "" if default in (None, False, argparse.SUPPRESS) or action.nargs == 0 else f"`{default}`"
        rows.append(f"| {names} | {shown} | {_cell(helptext)} |")
    return rows


def _anchor(parser: argparse.ArgumentParser) -> str:
    return parser.prog.replace(" ", "-")


def render(parser: argparse.ArgumentParser) -> str:
    """The whole reference page, as Markdown, for the ``torchfpi`` parser."""
    # argparse wraps usage lines to $COLUMNS: pin it so the page fits its column and is stable.
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "80"
    try:
        return _render(parser)
    finally:
        if saved is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = saved


def _render(parser: argparse.ArgumentParser) -> str:
    parts = [_INTRO]
    commands = list(_walk(parser))
    parts.append(
        "| command | what it does |\n|---|---|\n"
        + "\n".join(f"| [`{p.prog}`](#{_anchor(p)}) | {_cell(h)} |" for h, p, leaf in commands if leaf)
    )
    for helptext, sub, leaf in commands:
        parts.append(f"## {sub.prog} {{#{_anchor(sub)}}}")
        description = sub.description or helptext
        if description:
            parts.append(_cell(description))
        parts.append(f"```text\n{sub.format_usage().strip()}\n```")
        if leaf:
            rows = _option_rows(sub)
            if rows:
                parts.append("| argument | default | meaning |\n|---|---|---|\n" + "\n".join(rows))
        else:
            names = ", ".join(f"[`{p.prog}`](#{_anchor(p)})" for _, _, p in _subcommands(sub))
            parts.append(f"Sub-commands: {names}.")
    return "\n\n".join(parts) + "\n"


def on_files(files, config):  # noqa: ANN001 - MkDocs hook signature
    from mkdocs.structure.files import File

    from torchfpi.cli import build_parser

    files.append(File.generated(config, PAGE, content=render(build_parser())))
    return files
