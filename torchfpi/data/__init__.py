"""Datasets of the applications: readers, the embedded Bibtex copy, and fetching from the sources.

``load_multilabel(name, split)`` is the one entry point of the multi-label ARFF sets (Bibtex,
Delicious, Bookmarks). Bibtex is also embedded in the package (``_embedded/bibtex.npz``, binary
features and labels as compressed sparse rows, about 1 MB), so ``torchfpi demo`` and the tests need
no data root; the embedded copy is checked to be identical to the ARFF files (tests/test_arff.py).

The data sets ``bibtex``, ``delicious``, ``train400``, ``bsd68`` and ``middlebury`` are described in
:data:`DATASETS`; :func:`fetch_dataset` downloads one from its public source into the data root
(verified against the sha256 manifest shipped in the package) and :func:`dataset_status` checks
one (``torchfpi data fetch|check`` on the command line). The layout below the data root:

- ``multilabel/<name>/<name>-{train,test}.arff`` and ``<name>.xml``;
- ``denoise/Train400/*.png``, ``denoise/BSD68/*.png``;
- ``flow/middlebury/other-data/<Seq>/frame1{0,1}.png``, ``flow/middlebury/other-gt-flow/<Seq>/flow10.flo``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from torchfpi.data._fetch import PARTIAL_DIR, FetchResult, fetch_dataset, source_urls
from torchfpi.data._registry import (
    DATASETS,
    DOCS_PAGE,
    MIRROR_ENV,
    DatasetInfo,
    DatasetStatus,
    dataset_names,
    dataset_status,
    fetch_hint,
    get_dataset,
    resolve_root,
)
from torchfpi.data.arff import MultiLabelData, read_arff, read_label_names
from torchfpi.errors import DataError, UsageError
from torchfpi.io import data_root

PathLike = Union[str, Path]

EMBEDDED_DIR = Path(__file__).resolve().parent / "_embedded"
EMBEDDED_BIBTEX = EMBEDDED_DIR / "bibtex.npz"

#: name -> (sub-folder of ``<data root>/multilabel``, file stem, number of labels, sizes)
MULTILABEL_DATASETS: Dict[str, Dict[str, Any]] = {
    "bibtex": {"folder": "bibtex", "stem": "bibtex", "num_labels": 159, "num_features": 1836},
    "delicious": {"folder": "delicious", "stem": "delicious", "num_labels": 983, "num_features": 500},
    "bookmarks": {"folder": "bookmarks", "stem": "bookmarks", "num_labels": 208, "num_features": 2150},
}

SPLITS = ("train", "test")

__all__ = [
    "DATASETS",
    "DOCS_PAGE",
    "MIRROR_ENV",
    "PARTIAL_DIR",
    "DatasetInfo",
    "DatasetStatus",
    "FetchResult",
    "MULTILABEL_DATASETS",
    "MultiLabelData",
    "dataset_names",
    "dataset_status",
    "fetch_dataset",
    "fetch_hint",
    "get_dataset",
    "load_embedded_bibtex",
    "load_multilabel",
    "read_arff",
    "read_label_names",
    "resolve_root",
    "source_urls",
    "train_val_split",
    "write_embedded_bibtex",
]


def _arff_paths(name: str, root: Path) -> Tuple[Path, Path, Path]:
    info = MULTILABEL_DATASETS[name]
    stem = str(info["stem"])
    documented = root / "multilabel" / str(info["folder"])
    # Also accept a root that is <root>/multilabel or the data set's folder itself; a missing file
    # is reported at its documented place.
    folder = next(
        (f for f in (documented, root / str(info["folder"]), root) if (f / f"{stem}-train.arff").is_file()),
        documented,
    )
    return folder / f"{stem}-train.arff", folder / f"{stem}-test.arff", folder / f"{stem}.xml"


def load_multilabel(
    name: str,
    split: str,
    *,
    root: Optional[PathLike] = None,
    path: Optional[PathLike] = None,
) -> MultiLabelData:
    """Load one split of a multi-label dataset.

    Resolution order: an explicit ``path`` to an ARFF file; else the ARFF files under the data
    root (``root``, else ``$TORCHFPI_DATA``, else the per-user cache; see
    :func:`torchfpi.io.data_root`) in ``multilabel/<name>/``; else, for Bibtex only, the embedded
    copy. ``torchfpi data fetch bibtex|delicious`` lays the files out. Bookmarks is not shipped:
    pass ``path`` (CLI: ``--train-arff``/``--test-arff``; its MULAN file ``bookmarks.arff`` holds
    all rows; split it yourself) or place ``bookmarks-{train,test}.arff`` under the data root.

    Args:
        name: ``"bibtex"``, ``"delicious"`` or ``"bookmarks"``.
        split: ``"train"`` or ``"test"`` (ignored when ``path`` is given).
        root: data root (see :func:`torchfpi.io.data_root`).
        path: an ARFF file to read instead of the standard layout.

    Raises:
        UsageError: unknown ``name`` or ``split``.
        DataError: no file found, or a malformed file.
    """
    if name not in MULTILABEL_DATASETS:
        raise UsageError(f"--dataset: expected one of {sorted(MULTILABEL_DATASETS)}, got '{name}'")
    if split not in SPLITS:
        raise UsageError(f"split: expected one of {SPLITS}, got '{split}'")
    num_labels = int(MULTILABEL_DATASETS[name]["num_labels"])
    if path is not None:
        path = Path(path)
        xml = path.with_suffix(".xml")
        if xml.is_file():
            return read_arff(path, label_names=read_label_names(xml))
        return read_arff(path, num_labels=num_labels)
    try:
        base = data_root(root)
    except DataError:
        if root is None and name == "bibtex":
            return load_embedded_bibtex(split)
        raise
    train_path, test_path, xml = _arff_paths(name, base)
    arff_path = train_path if split == "train" else test_path
    if not arff_path.is_file():
        if root is None and name == "bibtex":
            return load_embedded_bibtex(split)
        if name in DATASETS:
            hint = fetch_hint(name)
        else:
            hint = (
                f"{name.capitalize()} is not shipped: pass its ARFF files with --train-arff PATH "
                f"--test-arff PATH, or put {name}-train.arff and {name}-test.arff under "
                f"<data root>/multilabel/{name} (see {DOCS_PAGE})"
            )
        raise DataError(f"{name} {split} split: '{arff_path}' does not exist; {hint}")
    if xml.is_file():
        return read_arff(arff_path, label_names=read_label_names(xml))
    return read_arff(arff_path, num_labels=num_labels)


def load_embedded_bibtex(split: str) -> MultiLabelData:
    """The Bibtex split embedded in the package (identical to the MULAN ARFF files)."""
    if split not in SPLITS:
        raise UsageError(f"split: expected one of {SPLITS}, got '{split}'")
    if not EMBEDDED_BIBTEX.is_file():
        raise DataError(f"the embedded Bibtex file '{EMBEDDED_BIBTEX}' is missing from the package")
    with np.load(EMBEDDED_BIBTEX, allow_pickle=False) as z:
        features = _csr_to_dense(z[f"{split}_x_indptr"], z[f"{split}_x_indices"], int(z["num_features"]))
        labels = _csr_to_dense(z[f"{split}_y_indptr"], z[f"{split}_y_indices"], int(z["num_labels"]))
        feature_names = [str(s) for s in z["feature_names"]]
        label_names = [str(s) for s in z["label_names"]]
    return MultiLabelData(features, labels, feature_names, label_names)


def _csr_to_dense(indptr: np.ndarray, indices: np.ndarray, width: int) -> np.ndarray:
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    out = np.zeros((len(indptr) - 1, width), dtype=np.float32)
    out[rows, indices.astype(np.int64)] = 1.0
    return out


def _dense_to_csr(a: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    if not np.isin(a, (0.0, 1.0)).all():
        raise DataError("only binary matrices can be embedded")
    rows, cols = np.nonzero(a)
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=a.shape[0]))]).astype(np.int32)
    return indptr, cols.astype(np.int16)


def write_embedded_bibtex(root: Optional[PathLike] = None, out: PathLike = EMBEDDED_BIBTEX) -> Path:
    """Rebuild ``_embedded/bibtex.npz`` from the ARFF files under the data root."""
    arrays: Dict[str, Any] = {}
    names = None
    for split in SPLITS:
        data = load_multilabel("bibtex", split, root=root if root is not None else data_root(None))
        arrays[f"{split}_x_indptr"], arrays[f"{split}_x_indices"] = _dense_to_csr(data.features)
        arrays[f"{split}_y_indptr"], arrays[f"{split}_y_indices"] = _dense_to_csr(data.labels)
        names = data
    if names is None:
        raise DataError(f"no Bibtex split found under the data root (expected {SPLITS})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrays.update(
        num_features=np.int64(names.num_features),
        num_labels=np.int64(names.num_labels),
        feature_names=np.asarray(names.feature_names),
        label_names=np.asarray(names.label_names),
    )
    np.savez_compressed(out, **arrays)
    return out


def train_val_split(
    num: int, val_fraction: float = 0.1, seed: int = 0, fold: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """A fixed-seed random split of ``range(num)`` into (train, validation) index arrays.

    The seed is the split's own (default 0), independent of the training seed, so that every model
    and every training seed sees the same validation rows. ``fold`` k holds out the k-th block of
    ``round(num * val_fraction)`` rows of the same permutation (cross-validation folds; fold 0 is
    the default split).

    Raises:
        UsageError: if ``val_fraction`` is not in (0, 1) or leaves an empty part, or ``fold`` is
            out of range.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UsageError(f"--val-fraction: expected a number in (0, 1), got {val_fraction}")
    num_val = int(round(num * val_fraction))
    if num_val < 1 or num_val >= num:
        raise UsageError(f"--val-fraction {val_fraction} leaves an empty split of {num} rows")
    folds = num // num_val
    if not 0 <= fold < folds:
        raise UsageError(f"fold: expected 0 .. {folds - 1} ({num} rows in blocks of {num_val}), got {fold}")
    perm = np.random.default_rng(seed).permutation(num)
    val = perm[fold * num_val:(fold + 1) * num_val]
    return np.sort(np.concatenate([perm[:fold * num_val], perm[(fold + 1) * num_val:]])), np.sort(val)


# torch.utils.data datasets of the three applications (issue 17)
from torchfpi.data.datasets import DenoisingCrops, MiddleburyPairs, MultiLabelDataset  # noqa: E402

__all__ += ["DenoisingCrops", "MiddleburyPairs", "MultiLabelDataset"]
