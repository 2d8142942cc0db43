"""Classical denoisers measured side by side: the noisy input, BM3D and total variation.

All functions take and return ``(H, W)`` float64 arrays on the [0, 255] scale.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from torchfpi.data.images import add_noise, noise_seed, psnr
from torchfpi.runtime import require

#: TV weights tried on Train400 images (on the [0, 1] scale) when choosing the TV weight.
TV_WEIGHT_GRID = (0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.10, 0.12, 0.15, 0.2, 0.25, 0.3)


def bm3d_denoise(noisy: np.ndarray, sigma: float) -> np.ndarray:
    """BM3D (PyPI ``bm3d``, both stages, default profile) with the true noise level."""
    bm3d = require("bm3d")
    out = bm3d.bm3d(np.asarray(noisy, dtype=np.float64) / 255.0, sigma_psd=float(sigma) / 255.0)
    return np.asarray(out, dtype=np.float64).reshape(noisy.shape) * 255.0


def tv_denoise(noisy: np.ndarray, weight: float) -> np.ndarray:
    """Total-variation denoising (scikit-image Chambolle) with ``weight`` on the [0, 1] scale."""
    restoration = require("skimage.restoration")
    out = restoration.denoise_tv_chambolle(np.asarray(noisy, dtype=np.float64) / 255.0, weight=weight)
    return np.asarray(out, dtype=np.float64) * 255.0


def choose_tv_weight(
    train_images: Sequence[np.ndarray],
    sigma: float,
    seed: int = 1000,
    grid: Sequence[float] = TV_WEIGHT_GRID,
) -> Dict[str, object]:
    """Pick the TV weight that maximises the mean PSNR on (validation) training images.

    The noise uses seeds ``noise_seed(seed, sigma, i)``, distinct from the test seeds.

    Returns:
        ``{"weight": best, "grid": [...], "psnr": [...]}`` (mean PSNR per weight).
    """
    noisy = [add_noise(img, sigma, noise_seed(seed, sigma, i)) for i, img in enumerate(train_images)]
    scores: List[float] = []
    for w in grid:
        scores.append(float(np.mean([psnr(tv_denoise(n, w), c) for n, c in zip(noisy, train_images)])))
    best = int(np.argmax(scores))
    return {"weight": float(grid[best]), "grid": [float(g) for g in grid], "psnr": scores}
