"""Image denoising with FPI layers on the BSD68 protocol.

- :class:`FoEEnergy`: a Fields-of-Experts energy ``E(z, y)`` with an exact analytic gradient.
- :class:`FPIGDDenoiser` (FPI_GD, implicit gradient), :class:`UnrolledDenoiser` (TNRD-style
  baseline), :class:`FPINNDenoiser` (FPI_NN deep-equilibrium denoiser).
- :func:`train_denoiser` on Train400 crops; :func:`load_denoiser` / :func:`denoise_array` to apply them.
- Baselines: :func:`bm3d_denoise`, :func:`tv_denoise`, :func:`choose_tv_weight`.
"""

from torchfpi.apps.denoise.api import (
    MIN_IMAGE_SIDE,
    available_sigmas,
    denoise_array,
    load_denoiser,
    save_weights,
    weights_path,
)
from torchfpi.apps.denoise.baselines import bm3d_denoise, choose_tv_weight, tv_denoise
from torchfpi.apps.denoise.energy import FoEEnergy, add_coarse_banks, dct_filters, grow_energy_state
from torchfpi.apps.denoise.memory import measure_training_memory
from torchfpi.apps.denoise.models import (
    MODELS,
    ConvUpdate,
    FPIGDDenoiser,
    FPINNDenoiser,
    UnrolledDenoiser,
    build_model,
)
from torchfpi.apps.denoise.train import (
    DEFAULT_CONFIGS,
    TrainConfig,
    batch_psnr,
    check_training_data,
    to_tensor,
    train_denoiser,
    validation_set,
)

__all__ = [
    "DEFAULT_CONFIGS", "MIN_IMAGE_SIDE", "MODELS", "check_training_data", "ConvUpdate", "FPIGDDenoiser", "FPINNDenoiser", "FoEEnergy", "add_coarse_banks", "grow_energy_state",
    "TrainConfig", "UnrolledDenoiser", "available_sigmas", "bm3d_denoise", "build_model",
    "choose_tv_weight", "dct_filters", "denoise_array", "load_denoiser", "save_weights", "train_denoiser",
    "tv_denoise", "weights_path", "batch_psnr", "measure_training_memory", "to_tensor",
    "validation_set",
]
