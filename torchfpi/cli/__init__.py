"""The ``torchfpi`` command line: ``torchfpi <command> ...``.

One module per command family; each exposes ``register(commands, train)`` that adds its
argparse sub-parsers (``commands`` for top-level commands, ``train`` for ``torchfpi train <app>``)
and binds a ``run(args) -> int`` function. Only this package parses ``argv``; everything it calls
takes typed arguments. Heavy and optional imports happen inside the run functions, so that
``torchfpi --help`` works without the ``apps`` extra.

Exit codes: 0 success, 1 runtime failure (bad data, non-convergence, NaN), 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import sys
import warnings
from typing import Callable, List, NoReturn, Optional, Sequence, TextIO

_COMMAND_MODULES = ("_demo", "_gradcheck", "_multilabel", "_denoise", "_flow", "_bench", "_data")


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line usage error (exit 2) instead of the full usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


_STATES_DEFAULT = re.compile(r"\(default|default:|default \S+ for|defaults? to|default \$", re.IGNORECASE)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the examples' line breaks and shows every option's default.

    The default is appended as ``(default: X)`` unless the help already says what it is.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _STATES_DEFAULT.search(text) or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


#: One example per command, shown at the end of its ``--help``.
EXAMPLES = {
    "torchfpi": "example:\n  torchfpi demo --epochs 3\n  torchfpi train flow --help",
    "torchfpi train": "example:\n  torchfpi train multilabel --dataset bibtex --model fpi_gd",
    "torchfpi train multilabel": "examples:\n  torchfpi train multilabel --dataset bibtex --model fpi_gd --out runs/ml.json\n"
    "  torchfpi train multilabel --resume --checkpoint-every 50   # continue a killed run\n"
    "  torchrun --nproc_per_node 2 -m torchfpi train multilabel --dtype float64",
    "torchfpi train denoise": "examples:\n  torchfpi train denoise --model fpi_gd --sigma 25 --steps 800\n"
    "  torchfpi train denoise --resume --checkpoint-every 10   # continue a killed run",
    "torchfpi train flow": "examples:\n  torchfpi train flow --out runs/flow --steps 150\n"
    "  torchfpi train flow --model fpi_nn --base runs/flow/best.pt --out runs/flow\n"
    "  torchfpi train flow --procedural --out runs/flow --resume",
    "torchfpi demo": "example:\n  torchfpi demo --epochs 3",
    "torchfpi gradcheck": "example:\n  torchfpi gradcheck --seed 1",
    "torchfpi denoise": "examples:\n  torchfpi denoise noisy.png --sigma 25 --out clean.png\n"
    "  torchfpi denoise noisy.png --sigma 25 --out est.png --clean reference.png   # prints PSNR / SSIM",
    "torchfpi flow": "examples:\n  torchfpi flow frame10.png frame11.png --out flow.flo --png flow.png\n"
    "  torchfpi flow frame10.png frame11.png --truth flow10.flo   # prints the end-point error",
    "torchfpi bench": "example:\n  torchfpi bench --out bench-results",
    "torchfpi data": "examples:\n  torchfpi data list\n  torchfpi data fetch bibtex middlebury",
    "torchfpi data list": "example:\n  torchfpi data list --root ~/data/torchfpi",
    "torchfpi data fetch": "example:\n  torchfpi data fetch train400 bsd68",
    "torchfpi data check": "example:\n  torchfpi data check middlebury",
}


def _explain(parser: argparse.ArgumentParser, helps: dict) -> None:
    """Give every (sub)command the defaults formatter, a description (its help line when it has
    none) and its example; recursively."""
    parser.formatter_class = _Formatter
    if not parser.description and parser.prog in helps:
        parser.description = helps[parser.prog][0].upper() + helps[parser.prog][1:] + "."
    if not parser.epilog and parser.prog in EXAMPLES:
        parser.epilog = EXAMPLES[parser.prog]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub_helps = {f"{parser.prog} {c.dest}": c.help for c in action._choices_actions if c.help}
            for child in action.choices.values():
                _explain(child, sub_helps)


def build_parser() -> argparse.ArgumentParser:
    """Build the full argument parser of the ``torchfpi`` command (every option with its help and
    default, every command with a description and an example)."""
    from torchfpi import __version__

    parser = _Parser(
        prog="torchfpi",
        description="Differentiable forward and backward fixed-point iteration layers.",
    )
    parser.add_argument("--version", action="version", version=f"torchfpi {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    train_parser = commands.add_parser("train", help="train a model on one of the applications")
    train = train_parser.add_subparsers(dest="app", metavar="APP", parser_class=_Parser)
    train.required = True
    for name in _COMMAND_MODULES:
        module = importlib.import_module(f"torchfpi.cli.{name}")
        module.register(commands, train)
    _explain(parser, {})
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``) and return its exit code."""
    parser = build_parser()
    args: List[str] = list(sys.argv[1:] if argv is None else argv)
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    ns.command_line = "torchfpi " + shlex.join(args)  # recorded in results (the argv given, not sys.argv)
    return run_guarded(lambda: int(ns.func(ns) or 0))


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message: every failure is reported in one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def run_guarded(call: Callable[[], int], prog: str = "torchfpi") -> int:
    """Run ``call()`` and turn every failure into one line on stderr and an exit code.

    :class:`~torchfpi.errors.UsageError` gives 2; data, solver, NaN, file-system and any other
    errors give 1 (an unexpected one says so, and ``$TORCHFPI_TRACEBACK=1`` shows its traceback);
    Ctrl-C gives 130. Warnings are printed as one line each (``PROG: warning: ...``); the warning
    filters stay the caller's. The command line and the scripts in ``scripts/`` run through it.

    Example:
        >>> run_guarded(lambda: 0)
        0
    """
    from torchfpi.errors import DataError, FixedPointError, MissingExtraError, UsageError

    def show(message: Warning | str, category: type, filename: str, lineno: int,
             file: Optional[TextIO] = None, line: Optional[str] = None) -> None:
        print(f"{prog}: warning: {' '.join(str(message).split())}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        try:
            return call()
        except UsageError as exc:
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        except (DataError, MissingExtraError, FixedPointError, FloatingPointError) as exc:
            print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
            return 1
        except OSError as exc:  # missing file, permission, disk full, ...
            where = f": '{exc.filename}'" if exc.filename else ""
            print(f"{prog}: error: {exc.strerror or _one_line(exc)}{where}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Warning as exc:  # python -W error (or a test's filters) turned a warning into an error
            print(f"{prog}: error: {_one_line(exc)} ({type(exc).__name__} raised as an error by the warning "
                  "filters)", file=sys.stderr)
            return 1
        except Exception as exc:  # anything else: still one line, and how to see the traceback
            if os.environ.get(_TRACEBACK_ENV):
                raise
            print(f"{prog}: error: unexpected {type(exc).__name__}: {_one_line(exc)} (a bug: please "
                  f"report it; set {_TRACEBACK_ENV}=1 for the traceback)", file=sys.stderr)
            return 1


#: Set to see the traceback of an unexpected error instead of its one-line summary.
_TRACEBACK_ENV = "TORCHFPI_TRACEBACK"


def entry() -> None:
    """Console-script entry point."""
    sys.exit(main())
