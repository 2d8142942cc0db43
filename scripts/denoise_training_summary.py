#!/usr/bin/env python3
"""What a denoiser's training did, read from its weights file: a markdown table.

    python scripts/denoise_training_summary.py torchfpi/weights/denoise_fpi_gd_s*.pt

One row per file: the energy, the steps and seconds of the run that wrote the file, the best
validation PSNR (the 40 held-out Train400 crops) and its step, the mean forward and backward
(adjoint) iterations per training step, and the share of updates rejected because a forward or
backward solve did not converge (the trainer skips those instead of applying a wrong gradient).
The weights file keeps the run's validation history and commands, so nothing here is typed in.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List


def _energy(kind: str, config: Dict[str, Any]) -> str:
    from torchfpi.apps.denoise import DEFAULT_CONFIGS

    base = DEFAULT_CONFIGS.get(kind, {}).get("energy") or {}
    if not base and not config.get("energy"):
        return "-"  # no energy (fpi_nn)
    e = {**base, **config.get("energy", {})}
    text = f"{e['n_filters']} x {e['kernel_size']}x{e['kernel_size']}"
    for factor, n, k in e.get("coarse", []):
        text += f" + {n} x {k}x{k} at 1/{factor}"
    if e.get("adaptive_channels"):
        text += f" + adaptive data weight ({e['adaptive_channels']} ch.)"
    return text


def _mean(history: List[Dict[str, Any]], key: str) -> str:
    vals = [h[key] for h in history if isinstance(h.get(key), (int, float))]
    return f"{sum(vals) / len(vals):.1f}" if vals else "-"


def summary_row(path: Path) -> str:
    """The table row of one weights file (see the module docstring)."""
    from torchfpi.apps import read_weights

    blob = read_weights(path, "denoise", "torchfpi denoiser weights")
    train = blob.get("train", {})
    history = train.get("history", [])
    steps = int(train.get("steps", 0))
    best = train.get("best", {})
    share = "-"  # files written before the trainer counted rejected updates
    if steps and "rejected" in train:
        rejected = int(train["rejected"]) + int(train.get("skipped", 0))
        share = f"{100.0 * rejected / steps:.1f} % ({rejected})"
    return (f"| {path.name} | {blob['meta'].get('sigma', blob.get('sigma'))} | {_energy(blob['meta'].get('kind', ''), blob.get('config', {}))} | "
            f"{steps} | {train.get('seconds', 0):.0f} | {best.get('psnr', float('nan')):.3f} (step {best.get('step', '-')}) | "
            f"{_mean(history, 'train_iterations')} | {_mean(history, 'train_backward_iterations')} | {share} |")


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="denoiser weights files")
    args = parser.parse_args(argv)
    print("| weights | sigma | energy | steps | seconds | best validation PSNR | forward it. | "
          "backward it. | updates rejected |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in args.weights:
        print(summary_row(Path(p)))
    return 0


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="denoise_training_summary.py"))
