"""Grey-scale PNG images for denoising: reading, writing, the noise protocol and the metrics.

The denoising protocol of the literature (TNRD, DnCNN, BM3D tables): 8-bit grey images,
white Gaussian noise of standard deviation ``sigma`` on the [0, 255] scale added to the clean
image (the noisy image is *not* clipped), and the mean PSNR over BSD68 computed on the [0, 255]
scale against the clean image after clipping the estimate to [0, 255].

Arrays here are float64 numpy arrays on the [0, 255] scale unless a name says otherwise; models
work on [0, 1] tensors (divide by 255).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike

#: The noise levels of the standard protocol (on the [0, 255] scale).
STANDARD_SIGMAS = (15, 25, 50)
#: Noise levels accepted by the tools (the models are trained for the standard ones).
MAX_SIGMA = 100.0


def check_sigma(sigma: Union[int, float], what: str = "--sigma") -> float:
    """Validate a noise level on the [0, 255] scale and return it as a float.

    Raises:
        UsageError: if ``sigma`` is not a finite number in (0, 100].
    """
    try:
        value = float(sigma)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{what}: expected a number in (0, {MAX_SIGMA:g}], got {sigma!r}") from exc
    if not math.isfinite(value) or value <= 0 or value > MAX_SIGMA:
        raise UsageError(
            f"{what}: expected a noise level in (0, {MAX_SIGMA:g}] on the [0, 255] scale, got {sigma!r}"
        )
    return value


def read_grey_png(path: PathLike) -> np.ndarray:
    """Read an image file as a grey-scale float64 array on the [0, 255] scale.

    Colour images are converted with Pillow's ITU-R 601-2 luma transform; 16-bit images are
    rescaled to [0, 255].

    Args:
        path: an image file Pillow can read (PNG, JPEG, ...).

    Returns:
        ``(H, W)`` float64 array with values in [0, 255].

    Raises:
        DataError: if the file is missing, is a directory or is not a readable image.
    """
    from PIL import Image, UnidentifiedImageError

    from torchfpi.data._registry import hint_for_path

    path = Path(path)
    if not path.exists():
        raise DataError(f"image file '{path}' does not exist{hint_for_path(path)}")
    if path.is_dir():
        raise DataError(f"image file '{path}' is a directory, expected a PNG file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max() > 255 else 255.0
                arr = arr * (255.0 / top)
            else:
                arr = np.asarray(im.convert("L"), dtype=np.float64)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"'{path}' is not a readable image file ({exc})") from exc
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise DataError(f"'{path}': expected a 2-D grey image, got shape {arr.shape}")
    return arr


def write_grey_png(path: PathLike, image: np.ndarray) -> None:
    """Write a [0, 255] array as an 8-bit grey PNG (clipped and rounded)."""
    from PIL import Image

    arr = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
    if arr.ndim != 2:
        raise UsageError(f"write_grey_png: expected a 2-D image, got shape {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode="L").save(path)


def list_images(folder: PathLike) -> List[Path]:
    """Sorted list of the PNG files in ``folder``.

    Raises:
        DataError: if the folder does not exist or holds no PNG file; for a data set's folder
            (``denoise/Train400``, ``denoise/BSD68``) the message names the command that fetches it.
    """
    from torchfpi.data._registry import hint_for_path

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist{hint_for_path(folder / 'x.png')}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise DataError(f"image folder '{folder}' holds no .png file{hint_for_path(folder / 'x.png')}")
    return files


def load_folder(folder: PathLike, limit: Optional[int] = None) -> List[np.ndarray]:
    """Read the (first ``limit``) PNG files of ``folder`` as [0, 255] float64 arrays."""
    files = list_images(folder)
    if limit is not None:
        files = files[:limit]
    return [read_grey_png(p) for p in files]


def noise_seed(seed: int, sigma: float, index: int) -> List[int]:
    """Seed sequence of the noise of image ``index`` at ``sigma``: independent of the order of work."""
    return [int(seed), int(round(sigma * 1000)), int(index)]


def add_noise(clean: np.ndarray, sigma: float, seed: Sequence[int]) -> np.ndarray:
    """``clean + sigma * N(0, 1)`` with a fixed seed; the result is not clipped (standard protocol).

    Args:
        clean: ``(H, W)`` array on the [0, 255] scale.
        sigma: noise standard deviation on the [0, 255] scale.
        seed: anything ``numpy.random.default_rng`` accepts, e.g. :func:`noise_seed`'s output.
    """
    rng = np.random.default_rng(list(seed) if not isinstance(seed, int) else seed)
    return np.asarray(clean, dtype=np.float64) + float(sigma) * rng.standard_normal(clean.shape)


def psnr(estimate: np.ndarray, clean: np.ndarray) -> float:
    """PSNR in dB on the [0, 255] scale: ``10 log10(255^2 / mean((clip(estimate, 0, 255) - clean)^2))``.

    The estimate is clipped to [0, 255] (not rounded), as the published BSD68 tables do. Returns
    ``inf`` for a perfect estimate.

    Raises:
        UsageError: if the shapes differ.
    """
    est = np.clip(np.asarray(estimate, dtype=np.float64), 0.0, 255.0)
    ref = np.asarray(clean, dtype=np.float64)
    if est.shape != ref.shape:
        raise UsageError(f"psnr: estimate has shape {est.shape} but clean has shape {ref.shape}")
    mse = float(np.mean((est - ref) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(255.0**2 / mse)


def ssim(estimate: np.ndarray, clean: np.ndarray) -> float:
    """SSIM (scikit-image defaults, 7x7 window, ``data_range=255``) of the clipped estimate."""
    from skimage.metrics import structural_similarity

    est = np.clip(np.asarray(estimate, dtype=np.float64), 0.0, 255.0)
    ref = np.asarray(clean, dtype=np.float64)
    if est.shape != ref.shape:
        raise UsageError(f"ssim: estimate has shape {est.shape} but clean has shape {ref.shape}")
    return float(structural_similarity(est, ref, data_range=255.0))
