#!/usr/bin/env python3
"""Validation check: how much does the reflection padding alone change a trained energy's score?

    git show ad6156f:torchfpi/weights/denoise_fpi_gd_s25.pt > runs/foe/denoise_fpi_gd_s25.pt
    python scripts/denoise_padding_check.py --weights runs/foe/denoise_fpi_gd_s25.pt

Scores the single-scale FoE energy on the 40 held-out Train400 validation crops (64 x 64, sigma
25, the training's validation set) as it is (padded by kernel_size // 2 = 3 pixels) and with a
coarse bank of negligible weight added, which only raises the padding to 8 pixels: the
multi-scale energy's padding. Train400 only: BSD68 is not touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import torch

from torchfpi.apps.denoise import (
    FoEEnergy,
    FPIGDDenoiser,
    add_coarse_banks,
    load_denoiser,
    to_tensor,
    validation_set,
)
from torchfpi.apps.denoise.train import evaluate
from torchfpi.data.images import load_folder
from torchfpi.io import data_root


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="single-scale FoE weights (sigma 25)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--val-images", type=int, default=40)
    parser.add_argument("--crop", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    images = load_folder(Path(data_root(args.data_root)) / "denoise" / "Train400")
    clean, noisy = validation_set(to_tensor(images[-args.val_images:]), args.crop, 25.0)
    model, _ = load_denoiser("fpi_gd", 25, args.weights)
    base = evaluate(model, clean, noisy)
    e = model.energy
    wide = FoEEnergy(e.n_filters, e.kernel_size, e.n_mixture, coarse=[(4, 1, 5)])
    wide.load_state_dict(add_coarse_banks(e.state_dict(), [(4, 1, 5)], new_weight=1e-12, prefix=""))
    padded = evaluate(FPIGDDenoiser(wide, tol=model.tol, max_iter=model.max_iter), clean, noisy)
    print(f"validation PSNR: padding {e.pad} px {base['psnr']:.3f} dB, padding {wide.pad} px {padded['psnr']:.3f} dB")
    return 0


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="denoise_padding_check.py"))
