"""The core CLI: dispatch, help, gradcheck, usage errors."""

from __future__ import annotations

import pytest

from torchfpi.cli import main


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "gradcheck" in capsys.readouterr().out


def test_unknown_command_is_usage_error(capsys):
    assert main(["frobnicate"]) == 2
    assert "invalid choice" in capsys.readouterr().err


def test_no_command_is_usage_error(capsys):
    assert main([]) == 2


def test_gradcheck_passes(capsys):
    assert main(["gradcheck", "--batch", "2", "--dim", "4"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "onestep" in out


@pytest.mark.parametrize(
    "argv, match",
    [
        (["gradcheck", "--radius", "1.5"], "--radius"),
        (["gradcheck", "--batch", "0"], "--batch"),
        (["gradcheck", "--tolerance", "-1"], "--tolerance"),
        (["gradcheck", "--dim", "abc"], "invalid int value"),
    ],
)
def test_gradcheck_usage_errors(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
