"""The torch.utils.data datasets of the applications: reproducible, DataLoader-ready, clear errors."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from torchfpi.data import DenoisingCrops, MiddleburyPairs, MultiLabelDataset, load_embedded_bibtex
from torchfpi.errors import DataError, UsageError


def test_docstring_examples():
    import torchfpi.data.datasets as module

    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_multilabel_rows_through_a_dataloader_equal_the_arrays():
    data = load_embedded_bibtex("train")
    ds = MultiLabelDataset(data, rows=[5, 1, 7])
    x, y = next(iter(DataLoader(ds, batch_size=3)))
    assert torch.equal(x, torch.from_numpy(data.features[[5, 1, 7]]).float())
    assert torch.equal(y, torch.from_numpy(data.labels[[5, 1, 7]]).float())
    with pytest.raises(UsageError, match=r"features \(N, F\) and labels \(N, L\)"):
        MultiLabelDataset((np.zeros((3, 2)), np.zeros((4, 2))))


def test_denoising_crops_do_not_depend_on_order_or_workers():
    images = [np.random.RandomState(k).rand(24, 30) * 255 for k in range(3)]
    ds = DenoisingCrops(images, crop=8, sigma=25, length=12, seed=4)
    ordered = torch.cat([b[1] for b in DataLoader(ds, batch_size=4)])
    shuffled_idx = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.stack([ds[int(i)][1] for i in shuffled_idx]), ordered[shuffled_idx])
    resumed = torch.cat([ds[i][1][None] for i in range(8, 12)])  # a run resumed at sample 8
    assert torch.equal(resumed, ordered[8:])
    clean, noisy = ds[0]
    assert 0.05 < float((noisy - clean).std()) < 0.15  # sigma 25 / 255 ~ 0.098
    assert not torch.equal(DenoisingCrops(images, 8, 25, 12, seed=5)[0][1], noisy)
    with pytest.raises(UsageError, match=r"crop: expected 1 \.\. 24"):
        DenoisingCrops(images, crop=25, sigma=25, length=1)
    with pytest.raises(IndexError):
        ds[12]


def test_middlebury_pairs_missing_names_the_fetch_command(tmp_path):
    with pytest.raises(DataError, match="torchfpi data fetch middlebury"):
        MiddleburyPairs(tmp_path)


@pytest.mark.data("middlebury")
def test_middlebury_pairs(data_root):
    pairs = MiddleburyPairs(data_root)
    f1, f2, flow = next(iter(DataLoader(pairs, batch_size=1)))
    assert f1.shape[:2] == (1, 1) and flow.shape[:2] == (1, 2) and f1.shape[-2:] == flow.shape[-2:]
