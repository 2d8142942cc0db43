"""``torch.utils.data.Dataset`` classes of the three applications' data, for any training loop.

- :class:`MultiLabelDataset`: rows ``(features, labels)`` of an ARFF multi-label set.
- :class:`DenoisingCrops`: random augmented crops of an image folder with Gaussian noise made on
  the fly; sample ``i`` is a pure function of ``(seed, i)``, so any sampler order, any number of
  workers and any resume point give the same samples.
- :class:`MiddleburyPairs`: the Middlebury "other" pairs with ground-truth flow.

Each works with :class:`torch.utils.data.DataLoader` and its default collation.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from torchfpi.errors import DataError, UsageError
from torchfpi.io import PathLike

#: The Middlebury "other" sequences that come with ground-truth flow.
MIDDLEBURY_GT_SEQUENCES = (
    "Dimetrodon", "Grove2", "Grove3", "Hydrangea", "RubberWhale", "Urban2", "Urban3", "Venus",
)  # fmt: skip


class MultiLabelDataset(Dataset):
    """Rows of a multi-label data set: ``(x, y)`` with ``x`` ``(F,)`` features and ``y`` ``(L,)`` in {0, 1}.

    Args:
        data: a :class:`~torchfpi.data.MultiLabelData` (e.g. from
            :func:`~torchfpi.data.load_multilabel`), or a pair of arrays ``(features, labels)``.
        rows: the rows to keep (e.g. the train part of :func:`~torchfpi.data.train_val_split`);
            default all.
        dtype: the tensors' floating type.

    Example:
        >>> ds = MultiLabelDataset((np.eye(3, 4), np.eye(3, 2)), rows=[0, 2])
        >>> len(ds), ds[1][0].tolist(), ds[1][1].tolist()
        (2, [0.0, 0.0, 1.0, 0.0], [0.0, 0.0])
        >>> x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
        >>> tuple(x.shape), tuple(y.shape)
        ((2, 4), (2, 2))
    """

    def __init__(self, data: Any, rows: Optional[Sequence[int]] = None, dtype: torch.dtype = torch.float32) -> None:
        if isinstance(data, tuple):
            features, labels = data
        else:
            features, labels = data.features, data.labels
        x = torch.as_tensor(np.asarray(features), dtype=dtype)
        y = torch.as_tensor(np.asarray(labels), dtype=dtype)
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise UsageError(f"MultiLabelDataset: expected features (N, F) and labels (N, L), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if rows is not None:
            idx = torch.as_tensor(np.asarray(rows), dtype=torch.long)
            x, y = x[idx], y[idx]
        self.features, self.labels = x, y

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.features[i], self.labels[i]


class DenoisingCrops(Dataset):
    """Random crops of grey images with fresh Gaussian noise: ``(clean, noisy)``, each ``(1, crop, crop)``.

    Sample ``i`` draws its image, position, rotation by a multiple of 90 degrees, flip and noise
    from a generator seeded by ``(seed, i)``: reproducible in any order and across resumes, and
    ``length`` samples long (one "epoch"; choose it as steps times batch size).

    Args:
        images: grey images ``(H, W)`` on the [0, 255] scale (e.g.
            :func:`~torchfpi.data.images.load_folder`), or a folder of PNG files.
        crop: side of the crops (at most the smallest image side).
        sigma: noise level on the [0, 255] scale.
        length: number of samples.
        seed: seed of the draws.
        augment: random rotations and flips.
        dtype: the tensors' floating type (images scaled to [0, 1]).

    Raises:
        UsageError: a crop larger than an image, a negative sigma or a non-positive length.

    Example:
        >>> ds = DenoisingCrops([np.full((20, 30), 128.0)], crop=8, sigma=25, length=4, seed=0)
        >>> clean, noisy = ds[3]
        >>> tuple(clean.shape), float(clean.mean()), torch.equal(noisy, ds[3][1])
        ((1, 8, 8), 0.5019607843137255, True)
    """

    def __init__(self, images: Union[Sequence[np.ndarray], PathLike], crop: int, sigma: float, length: int,
                 seed: int = 0, augment: bool = True, dtype: torch.dtype = torch.float64) -> None:
        arrays: Sequence[np.ndarray]
        if isinstance(images, (str, os.PathLike)):
            from torchfpi.data.images import load_folder

            arrays = load_folder(images)
        else:
            arrays = images
        self.images = [torch.as_tensor(np.asarray(im, dtype=np.float64) / 255.0, dtype=dtype) for im in arrays]
        if not self.images:
            raise UsageError("DenoisingCrops: no images")
        smallest = min(min(im.shape) for im in self.images)
        if crop < 1 or crop > smallest:
            raise UsageError(f"crop: expected 1 .. {smallest} (the smallest image side), got {crop}")
        if not sigma >= 0:
            raise UsageError(f"sigma: expected >= 0, got {sigma}")
        if length < 1:
            raise UsageError(f"length: expected a positive integer, got {length}")
        self.crop, self.sigma, self.length, self.seed, self.augment = crop, float(sigma), length, seed, augment

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"DenoisingCrops: index {i} out of range 0 .. {self.length - 1}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        im = self.images[int(torch.randint(len(self.images), (1,), generator=gen))]
        h, w = im.shape
        r = int(torch.randint(h - self.crop + 1, (1,), generator=gen))
        c = int(torch.randint(w - self.crop + 1, (1,), generator=gen))
        x = im[r:r + self.crop, c:c + self.crop]
        if self.augment:
            x = torch.rot90(x, int(torch.randint(4, (1,), generator=gen)))
            if bool(torch.randint(2, (1,), generator=gen)):
                x = x.flip(1)
        clean = x.unsqueeze(0).contiguous()
        noisy = clean + (self.sigma / 255.0) * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
        return clean, noisy


class MiddleburyPairs(Dataset):
    """The Middlebury "other" pairs with ground truth: ``(frame1, frame2, flow)``.

    Frames are grey ``(1, H, W)`` float32 on the [0, 255] scale, the flow ``(2, H, W)`` (``u``,
    ``v``; values above ``1e9`` are unknown, see :func:`~torchfpi.data.flo.valid_mask`). The sizes
    differ between sequences: load with ``batch_size=1`` (or ``batch_size=None``).

    Args:
        root: the data root holding ``flow/middlebury`` (``torchfpi data fetch middlebury``).
        sequences: which sequences (default all eight with ground truth).

    Raises:
        DataError: a file is missing (the message names it and the command that fetches it).

    Example:
        >>> pairs = MiddleburyPairs(data_root())  # doctest: +SKIP
        >>> frame1, frame2, flow = pairs[pairs.sequences.index("RubberWhale")]  # doctest: +SKIP
    """

    def __init__(self, root: PathLike, sequences: Sequence[str] = MIDDLEBURY_GT_SEQUENCES) -> None:
        base = Path(root) / "flow" / "middlebury"
        for seq in sequences:
            for part in self._files(base, seq):
                if not part.is_file():
                    raise DataError(f"Middlebury {seq}: '{part}' does not exist; fetch the data set with "
                                    "'torchfpi data fetch middlebury' (or point --data-root / $TORCHFPI_DATA at it)")
        self.base, self.sequences = base, list(sequences)

    @staticmethod
    def _files(base: Path, seq: str) -> Tuple[Path, Path, Path]:
        return (base / "other-data" / seq / "frame10.png", base / "other-data" / seq / "frame11.png",
                base / "other-gt-flow" / seq / "flow10.flo")

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor, Tensor]:
        from torchfpi.data.flo import read_flo

        f1, f2, gt = self._files(self.base, self.sequences[i])
        return _grey(f1), _grey(f2), torch.from_numpy(read_flo(gt)).permute(2, 0, 1).contiguous()


def _grey(path: Path) -> Tensor:
    """An image file as grey ``(1, H, W)`` float32 in [0, 255] (ITU-R 601 luma of RGB, unrounded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"'{path}': cannot read it as an image ({exc})") from exc
    if arr.ndim == 3:
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr))[None]


__all__ = ["MIDDLEBURY_GT_SEQUENCES", "MultiLabelDataset", "DenoisingCrops", "MiddleburyPairs"]
