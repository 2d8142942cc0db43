"""Image denoising with FPI layers (BSD68 protocol): learned energies, baselines, training."""

from torchfpi.apps.denoise._baselines import bm3d_denoise, choose_tv_weight, tv_denoise

__all__ = ["bm3d_denoise", "choose_tv_weight", "tv_denoise"]
