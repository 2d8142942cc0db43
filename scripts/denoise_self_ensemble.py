"""Validation check: does averaging FPI_GD over the 8 rotations / flips of the input help?

    git show e04c951:torchfpi/weights/denoise_fpi_gd_s25.pt > runs/denoise/denoise_fpi_gd_s25_k24x5.pt
    python scripts/denoise_self_ensemble.py --weights runs/denoise/denoise_fpi_gd_s25_k24x5.pt

Prints the validation PSNR (the 40 held-out Train400 crops of training, sigma 25) of the model
and of the mean of its 8 dihedral outputs. Train400 only: BSD68 is not touched.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

from torchfpi.apps.denoise import batch_psnr, load_denoiser, to_tensor, validation_set
from torchfpi.data.images import load_folder
from torchfpi.io import data_root


def _dihedral(x: torch.Tensor, k: int, flip: bool, inverse: bool = False) -> torch.Tensor:
    if inverse:
        return torch.rot90(x.flip(3) if flip else x, -k, (2, 3))
    x = torch.rot90(x, k, (2, 3))
    return x.flip(3) if flip else x


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="FPI_GD weights file (default: shipped)")
    p.add_argument("--sigma", type=float, default=25.0)
    p.add_argument("--val-images", type=int, default=40)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model, _ = load_denoiser("fpi_gd", args.sigma, args.weights)
    images = to_tensor(load_folder(data_root(args.data_root) / "denoise" / "Train400"))
    clean, noisy = validation_set(images[-args.val_images:], args.crop, args.sigma)
    with torch.no_grad():
        outs = [_dihedral(model(_dihedral(noisy, k, f), tol=1e-4, max_iter=300), k, f, inverse=True)
                for k in range(4) for f in (False, True)]
    print(f"validation PSNR: model {batch_psnr(outs[0], clean):.3f} dB, "
          f"8-fold dihedral mean {batch_psnr(torch.stack(outs).mean(0), clean):.3f} dB")
    return 0


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    # a missing data set or a bad file is one line and exit 1, not a traceback
    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="denoise_self_ensemble.py"))
