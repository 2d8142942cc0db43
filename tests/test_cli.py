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


def _commands(parser, name="torchfpi"):
    """Every (sub)command parser below ``parser`` with its full name."""
    import argparse

    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _commands(child, f"{name} {sub}")


def test_every_command_and_option_explains_itself():
    """Issue 17: a description and an example per command, help and a shown default per option."""
    import argparse

    from torchfpi.cli import build_parser

    seen = []
    for name, parser in _commands(build_parser()):
        seen.append(name)
        assert parser.description, f"{name}: no description"
        assert parser.epilog and "torchfpi" in parser.epilog, f"{name}: no example in its help"
        text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, (argparse._SubParsersAction, argparse._HelpAction, argparse._VersionAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings and action.default is not argparse.SUPPRESS:
                shown = parser._get_formatter()._get_help_string(action)  # what --help prints
                assert "default" in shown.lower(), f"{name} {action.option_strings}: default not shown"
        assert "%(" not in text
    assert {"torchfpi train denoise", "torchfpi train flow", "torchfpi train multilabel", "torchfpi denoise",
            "torchfpi flow"} <= set(seen)


def test_device_wherever_a_model_runs():
    from torchfpi.cli import build_parser

    parsers = dict(_commands(build_parser()))
    for name in ("torchfpi denoise", "torchfpi flow", "torchfpi train multilabel"):
        assert any("--device" in a.option_strings for a in parsers[name]._actions), name


def test_denoise_clean_reference_prints_psnr_and_ssim(tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from skimage.metrics import peak_signal_noise_ratio

    from torchfpi.cli import main

    rng = np.random.RandomState(0)
    clean = np.tile(np.linspace(40, 200, 48), (40, 1)).astype(np.uint8)
    noisy = np.clip(clean + 25 * rng.randn(40, 48), 0, 255).astype(np.uint8)
    Image.fromarray(clean).save(tmp_path / "c.png")
    Image.fromarray(noisy).save(tmp_path / "n.png")
    argv = ["denoise", str(tmp_path / "n.png"), "--sigma", "25", "--out", str(tmp_path / "o.png"),
            "--clean", str(tmp_path / "c.png"), "--device", "cpu", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    est = np.asarray(Image.open(tmp_path / "o.png"))
    assert f"PSNR {peak_signal_noise_ratio(clean, est, data_range=255):.2f} dB, SSIM " in out
    Image.fromarray(clean[:32]).save(tmp_path / "small.png")
    assert main([*argv[:-4], "--clean", str(tmp_path / "small.png")]) == 2
    assert "--clean:" in capsys.readouterr().err
