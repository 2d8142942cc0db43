"""The MULAN ARFF reader, the embedded Bibtex copy and the validation split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from torchfpi.data import (
    load_embedded_bibtex,
    load_multilabel,
    read_arff,
    read_label_names,
    train_val_split,
)
from torchfpi.errors import DataError, UsageError

HEADER = "@relation t\n@attribute f0 {0,1}\n@attribute f1 numeric\n@attribute y0 {0,1}\n@attribute y1 {0,1}\n@data\n"
XML = '<?xml version="1.0"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">\n<label name="y0"></label>\n<label name="y1"></label>\n</labels>\n'


def _write(tmp_path: Path, text: str, name: str = "t.arff") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_sparse_rows_and_labels(tmp_path):
    p = _write(tmp_path, HEADER + "{0 1,1 0.5,3 1}\n{}\n% a comment\n{2 1}\n")
    data = read_arff(p, num_labels=2)
    np.testing.assert_array_equal(data.features, [[1, 0.5], [0, 0], [0, 0]])
    np.testing.assert_array_equal(data.labels, [[0, 1], [0, 0], [1, 0]])
    assert data.label_names == ["y0", "y1"] and data.feature_names == ["f0", "f1"]
    xml = _write(tmp_path, XML, "t.xml")
    by_name = read_arff(p, label_names=read_label_names(xml))
    np.testing.assert_array_equal(by_name.labels, data.labels)


@pytest.mark.parametrize(
    "body, match",
    [
        ("{0 1,9 1}\n", r"malformed ARFF.*line"),  # index beyond the attributes
        ("{0 1,2 7}\n", r"malformed ARFF.*7"),  # value not in the nominal declaration
        ("{0 1,2 1\n", r"malformed ARFF.*line"),  # missing brace
    ],
)
def test_malformed_rows_raise_clear_errors(tmp_path, body, match):
    p = _write(tmp_path, HEADER + body)
    with pytest.raises(DataError, match=match):
        read_arff(p, num_labels=2)


def test_malformed_header_and_bad_labels(tmp_path):
    with pytest.raises(DataError, match="malformed ARFF"):
        read_arff(_write(tmp_path, "@relation t\n@attribute\n@data\n"), num_labels=1)
    nonbinary = "@relation t\n@attribute f0 numeric\n@attribute y0 numeric\n@data\n{1 3}\n"
    with pytest.raises(DataError, match="label attributes must be 0 or 1"):
        read_arff(_write(tmp_path, nonbinary), num_labels=1)
    with pytest.raises(DataError, match="num_labels must be in"):
        read_arff(_write(tmp_path, HEADER), num_labels=4)
    with pytest.raises(DataError, match="not attributes of the file"):
        read_arff(_write(tmp_path, HEADER), label_names=["y0", "nope"])
    with pytest.raises(DataError, match="does not exist"):
        read_arff(tmp_path / "missing.arff", num_labels=1)
    with pytest.raises(DataError, match="not a valid MULAN label XML"):
        read_label_names(_write(tmp_path, "<labels><label", "bad.xml"))
    with pytest.raises(ValueError, match="exactly one of"):
        read_arff(_write(tmp_path, HEADER), num_labels=2, label_names=["y0"])


def test_embedded_bibtex_shapes():
    train, test = load_embedded_bibtex("train"), load_embedded_bibtex("test")
    assert train.features.shape == (4880, 1836) and train.labels.shape == (4880, 159)
    assert test.features.shape == (2515, 1836) and test.labels.shape == (2515, 159)
    assert set(np.unique(train.features)) <= {0.0, 1.0}
    assert train.labels.sum(1).min() >= 1


@pytest.mark.data("bibtex")
def test_embedded_bibtex_matches_arff(data_root):
    arff_test = load_multilabel("bibtex", "test", root=data_root)
    emb = load_embedded_bibtex("test")
    np.testing.assert_array_equal(arff_test.features, emb.features)
    np.testing.assert_array_equal(arff_test.labels, emb.labels)
    assert arff_test.label_names == emb.label_names


def test_load_errors(tmp_path):
    with pytest.raises(UsageError, match="--dataset"):
        load_multilabel("nope", "train")
    with pytest.raises(UsageError, match="split"):
        load_multilabel("bibtex", "validation")
    with pytest.raises(DataError, match="bookmarks.*does not exist"):
        load_multilabel("bookmarks", "train", root=tmp_path)


def test_user_path_loads_same_format(tmp_path):
    # Bookmarks is not shipped: any MULAN file given by path is read with its XML header.
    p = _write(tmp_path, HEADER + "{0 1,3 1}\n", "bookmarks.arff")
    _write(tmp_path, XML, "bookmarks.xml")
    data = load_multilabel("bookmarks", "train", path=p)
    assert data.labels.tolist() == [[0.0, 1.0]]


def test_train_val_split_fixed_and_disjoint():
    tr, va = train_val_split(100, 0.1, seed=0)
    tr2, va2 = train_val_split(100, 0.1, seed=0)
    np.testing.assert_array_equal(va, va2)
    assert len(va) == 10 and len(tr) == 90 and not set(tr) & set(va)
    with pytest.raises(UsageError, match="--val-fraction"):
        train_val_split(100, 1.5)
    with pytest.raises(UsageError, match=r"fold: expected 0 \.\. 9 \(100 rows in blocks of 10\), got 10"):
        train_val_split(100, 0.1, fold=10)
