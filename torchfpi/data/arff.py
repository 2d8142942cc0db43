"""Reader for MULAN multi-label datasets stored as (sparse) ARFF.

A MULAN dataset is an ARFF file whose attributes are the features followed (or interleaved) by
binary label attributes, plus an XML header naming the labels. Sparse rows look like
``{3 1,17 1,1840 1}``: 0-based attribute indices, omitted entries are 0.

Parsing is done by ``liac-arff`` (part of the ``apps`` extra), which reads sparse ARFF as
coordinate lists; every parse failure is re-raised as
:class:`torchfpi.errors.DataError` naming the file and the line.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np

from torchfpi.errors import DataError
from torchfpi.runtime import require

PathLike = Union[str, Path]


@dataclass(frozen=True)
class MultiLabelData:
    """Features and labels of one split of a multi-label dataset.

    Attributes:
        features: ``(N, D)`` float32 array.
        labels: ``(N, L)`` float32 array of 0/1.
        feature_names: ``D`` attribute names.
        label_names: ``L`` label names.
    """

    features: np.ndarray
    labels: np.ndarray
    feature_names: List[str]
    label_names: List[str]

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_labels(self) -> int:
        return int(self.labels.shape[1])


def read_label_names(xml_path: PathLike) -> List[str]:
    """Read the label names of a MULAN XML header (``<labels><label name="..."/>...``).

    Raises:
        DataError: if the file is not well-formed XML or names no label.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"{xml_path}: not a valid MULAN label XML file ({exc})") from exc
    names = [el.attrib["name"] for el in root.iter() if el.tag.endswith("label") and "name" in el.attrib]
    if not names:
        raise DataError(f"{xml_path}: no <label name=...> element found")
    return names


def read_arff(
    path: PathLike,
    *,
    label_names: Optional[Sequence[str]] = None,
    num_labels: Optional[int] = None,
) -> MultiLabelData:
    """Read a (sparse or dense) MULAN ARFF file into feature and label arrays.

    The label attributes are those named in ``label_names`` (as a MULAN XML header lists them);
    without names, the last ``num_labels`` attributes are the labels.

    Args:
        path: the ``.arff`` file.
        label_names: names of the label attributes (see :func:`read_label_names`).
        num_labels: number of trailing label attributes, used when ``label_names`` is None.

    Returns:
        A :class:`MultiLabelData` with ``(N, D)`` features and ``(N, L)`` labels.

    Raises:
        DataError: on a missing file, a malformed ARFF line (the message names the line), a
            non-numeric value, a label name missing from the file or non-binary label values.
        ValueError: if neither or both of ``label_names`` and ``num_labels`` are given.

    Example:
        >>> import tempfile, pathlib
        >>> text = "@relation t\\n@attribute f0 numeric\\n@attribute y0 {0,1}\\n@data\\n{0 2.5,1 1}\\n{}\\n"
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = pathlib.Path(d) / "t.arff"; _ = p.write_text(text)
        ...     data = read_arff(p, num_labels=1)
        >>> data.features.tolist(), data.labels.tolist()
        ([[2.5], [0.0]], [[1.0], [0.0]])
    """
    if (label_names is None) == (num_labels is None):
        raise ValueError("read_arff: give exactly one of label_names and num_labels")
    arff = require("arff")
    path = Path(path)
    if not path.is_file():
        from torchfpi.data._registry import hint_for_path

        raise DataError(f"ARFF file '{path}' does not exist{hint_for_path(path)}")
    try:
        with open(path, encoding="utf-8") as fh:
            parsed = arff.load(fh, return_type=arff.COO)
    except arff.ArffException as exc:
        raise DataError(f"{path}: malformed ARFF: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text ARFF file ({exc})") from exc
    except (ValueError, IndexError, KeyError) as exc:
        # liac-arff lets a few malformed header lines escape as bare Python errors.
        raise DataError(f"{path}: malformed ARFF header or data ({type(exc).__name__}: {exc})") from exc

    attributes = [name for name, _ in parsed["attributes"]]
    num_attr = len(attributes)
    if num_attr == 0:
        raise DataError(f"{path}: no @attribute declared")
    values, rows, cols = parsed["data"]
    num_rows = (max(rows) + 1) if len(rows) else 0
    # Rows that are entirely empty ("{}") produce no coordinate; count @data lines instead.
    num_rows = max(num_rows, _count_data_rows(path))
    try:
        vals = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: non-numeric attribute value ({exc})") from exc
    dense = np.zeros((num_rows, num_attr), dtype=np.float32)
    if len(vals):
        dense[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = vals

    if label_names is not None:
        index = {name: i for i, name in enumerate(attributes)}
        missing = [name for name in label_names if name not in index]
        if missing:
            raise DataError(
                f"{path}: {len(missing)} label(s) of the XML header are not attributes of the "
                f"file, e.g. {missing[:3]}"
            )
        label_idx = [index[name] for name in label_names]
    else:
        if num_labels is None:  # excluded at the top; a clear error rather than an assert
            raise ValueError("read_arff: give exactly one of label_names and num_labels")
        if not 0 < num_labels < num_attr:
            raise DataError(
                f"{path}: num_labels must be in [1, {num_attr - 1}] for a file with "
                f"{num_attr} attributes, got {num_labels}"
            )
        label_idx = list(range(num_attr - num_labels, num_attr))
    label_set = set(label_idx)
    feature_idx = [i for i in range(num_attr) if i not in label_set]
    labels = dense[:, label_idx]
    if not np.isin(labels, (0.0, 1.0)).all():
        bad = labels[~np.isin(labels, (0.0, 1.0))][:3].tolist()
        raise DataError(f"{path}: label attributes must be 0 or 1, found values like {bad}")
    return MultiLabelData(
        features=np.ascontiguousarray(dense[:, feature_idx]),
        labels=np.ascontiguousarray(labels),
        feature_names=[attributes[i] for i in feature_idx],
        label_names=[attributes[i] for i in label_idx],
    )


def _count_data_rows(path: Path) -> int:
    """Number of data lines after ``@data`` (comments and blank lines excluded)."""
    count = 0
    in_data = False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            s = line.strip()
            if not in_data:
                in_data = s.lower().startswith("@data")
                continue
            if s and not s.startswith("%"):
                count += 1
    return count
