"""Bad input everywhere: every case ends in one line on stderr naming the problem, with exit code
2 (usage error) or 1 (runtime failure: missing, truncated or malformed data), and no traceback.

Arguments starting with ``@`` name files of the ``bad`` fixture folder. Cases that an application
owner still has to fix are ``xfail(strict=True)`` (listed in the lead's pending notes): once fixed
they pass, the strict xfail fails, and the mark must go.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
from tiny_arff import ARFF_HEADER, MULAN_XML, arff_rows

import torchfpi
from torchfpi.cli import main

USAGE, RUNTIME = 2, 1
_SHIPPED_FLOW = Path(__file__).resolve().parents[1] / "torchfpi" / "weights" / "flow_fpi_gd.pt"



@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    """A folder of good and bad input files."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bad")
    img = (np.random.RandomState(0).rand(40, 48) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(np.roll(img, 1, axis=1)).save(d / "b.png")
    Image.fromarray(img[:30, :30]).save(d / "small.png")
    (d / "junk.png").write_bytes(b"this is not an image")
    (d / "junk.pt").write_bytes(b"not a checkpoint")
    (d / "afile").write_text("a file, not a folder")
    (d / "empty").mkdir()
    # ARFF: good train/test pair, then broken variants (all with a MULAN label XML)
    good = ARFF_HEADER + arff_rows(30)
    variants = {
        "m1": good,
        "m2": good,
        "wrongcount": ARFF_HEADER + "0.5,0.1,0.2,1\n" + arff_rows(5),  # dense row: 4 values for 5 attributes
        "badindex": ARFF_HEADER + "{0 1,9 1}\n" + arff_rows(5),  # attribute 9 of 5
        "nonbinary": ARFF_HEADER + "{0 1,3 7}\n" + arff_rows(5),  # label value 7
        "truncated": good[:60],
        "fewer": good.replace("@attribute f2 numeric\n", ""),  # rows reference 5 attributes of 4
    }
    for name, text in variants.items():
        (d / f"{name}.arff").write_text(text)
        (d / f"{name}.xml").write_text(MULAN_XML)
    (d / "binary.arff").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    (d / "badxml.arff").write_text(good)
    (d / "badxml.xml").write_text("<labels><label")
    # .flo: wrong magic, short data, and a well-formed one of the wrong size
    h, w = 40, 48
    (d / "badmagic.flo").write_bytes(struct.pack("<fii", 1.0, w, h) + bytes(8 * w * h))
    (d / "short.flo").write_bytes(struct.pack("<fii", 202021.25, w, h) + bytes(8 * w * h - 8))
    (d / "header.flo").write_bytes(struct.pack("<f", 202021.25))
    (d / "wrongsize.flo").write_bytes(struct.pack("<fii", 202021.25, 4, 3) + bytes(8 * 4 * 3))
    unknown = np.full((h, w, 2), 1e10, dtype="<f4")
    (d / "unknown.flo").write_bytes(struct.pack("<fii", 202021.25, w, h) + unknown.tobytes())
    # checkpoints that cannot be resumed from
    (d / "ckflow").mkdir()
    (d / "ckflow" / "checkpoint.pt").write_bytes(b"truncated checkpoint")
    (d / "ckflownn").mkdir()
    (d / "ckflownn" / "checkpoint_nn.pt").write_bytes(b"truncated checkpoint")
    _fpi_nn_checkpoints(d)
    (d / "ckml").mkdir()
    (d / "ckml" / "bibtex-fpi_gd-seed0.pt").write_bytes(b"truncated checkpoint")
    (d / "ckdn").mkdir()
    (d / "ckdn" / "fpi_gd_s25.pt").write_bytes(b"truncated checkpoint")
    (d / "dn" / "denoise" / "Train400").mkdir(parents=True)  # a tiny Train400 for train denoise
    for i in range(4):
        Image.fromarray(np.roll(img, 7 * i, axis=0)).save(d / "dn" / "denoise" / "Train400" / f"t{i}.png")
    return d


def _fpi_nn_checkpoints(d) -> None:
    """Two well-formed ``train flow --model fpi_nn`` checkpoints that this run must not continue:
    one written with ``--size 64``, one trained on another ``--base`` (the initial fpi_gd values)."""
    import torch

    from torchfpi.apps.flow.api import load_weights
    from torchfpi.apps.flow.models import VariationalFlow

    settings = {"pairs": 2, "val_pairs": 1, "size": 32, "steps": 1, "batch_size": 1, "lr": 1e-3,
                "jac_weight": 0.1, "seed": 0, "max_motion": 6.0, "dtype": "float32"}
    shipped = load_weights(_SHIPPED_FLOW).state_dict()
    from torchfpi.apps._trainer import CHECKPOINT_KEYS

    state = {**dict.fromkeys(CHECKPOINT_KEYS), "app": "flow --model fpi_nn", "step": 1}
    for name, size, base in (("nnsize", 64, shipped), ("nnbase", 32, VariationalFlow().state_dict())):
        (d / name).mkdir()
        torch.save({**state, "config": {**settings, "size": size}, "task": {"base": base}},
                   d / name / "checkpoint_nn.pt")


def _pending(app: str):
    return pytest.mark.xfail(strict=True, reason=f"waiting for {app} owner")


TINY_FLOW = ["--procedural", "--size", "32", "--batch-size", "1", "--val-pairs", "1", "--steps", "1",
             "--max-iter", "2", "--quiet"]
TINY_NN = ["--procedural", "--size", "32", "--pairs", "2", "--batch-size", "1", "--val-pairs", "1", "--steps", "1",
           "--lr", "1e-3", "--quiet"]
_SHIPPED_FPI_GD_25 = str(Path(torchfpi.__file__).parent / "weights" / "denoise_fpi_gd_s25.pt")
ML = ["--train-arff", "@m1.arff", "--test-arff", "@m2.arff", "--quiet", "--checkpoint-dir", "@ck"]

CASES = [
    # -- command line in general
    ("unknown-command", ["nope"], USAGE, r"invalid choice: 'nope'"),
    ("unknown-app", ["train", "nope"], USAGE, r"argument APP: invalid choice: 'nope'"),
    # -- torchfpi flow
    ("flow-missing-frame", ["flow", "@a.png", "@missing.png", "--out", "@o.flo"], RUNTIME,
     r"No such file or directory: '.*missing\.png'"),
    ("flow-non-image", ["flow", "@a.png", "@junk.png", "--out", "@o.flo"], RUNTIME,
     r"junk\.png': cannot read it as an image"),
    ("flow-frame-is-folder", ["flow", "@a.png", "@empty", "--out", "@o.flo"], RUNTIME,
     r"empty': cannot read it as an image"),
    ("flow-size-mismatch", ["flow", "@a.png", "@small.png", "--out", "@o.flo"], USAGE,
     r"frame sizes differ: frame1 is \(40, 48\)"),
    ("flow-nothing-to-write", ["flow", "@a.png", "@b.png"], USAGE, r"nothing to write: give --out"),
    ("flow-out-not-flo", ["flow", "@a.png", "@b.png", "--out", "@o.txt"], USAGE,
     r"--out: expected a path ending in \.flo"),
    ("flow-bad-threads", ["flow", "@a.png", "@b.png", "--png", "@o.png", "--threads", "-1"], USAGE,
     r"--threads: expected 0 \(default\) or a positive integer, got -1"),
    ("flow-unknown-method", ["flow", "@a.png", "@b.png", "--out", "@o.flo", "--method", "raft"], USAGE,
     r"argument --method: invalid choice: 'raft'"),
    ("flow-corrupt-weights", ["flow", "@a.png", "@b.png", "--out", "@o.flo", "--weights", "@junk.pt"],
     RUNTIME, r"junk\.pt' is not a torchfpi flow weights file: not written by torch\.save"),
    ("flow-missing-weights", ["flow", "@a.png", "@b.png", "--out", "@o.flo", "--weights", "@no.pt"],
     RUNTIME, r"No such file or directory: '.*no\.pt'"),
    ("flo-wrong-magic", ["flow", "@a.png", "@b.png", "--method", "horn_schunck", "--truth", "@badmagic.flo"],
     RUNTIME, r"badmagic\.flo': not a \.flo file \(magic number 1\.0, expected 202021\.25\)"),
    ("flo-truncated-data", ["flow", "@a.png", "@b.png", "--method", "horn_schunck", "--truth", "@short.flo"],
     RUNTIME, r"short\.flo': size 15364 bytes does not match the header \(48x40 needs 15372 bytes\)"),
    ("flo-truncated-header", ["flow", "@a.png", "@b.png", "--method", "horn_schunck", "--truth", "@header.flo"],
     RUNTIME, r"truncated \.flo header \(4 bytes"),
    ("flo-wrong-size", ["flow", "@a.png", "@b.png", "--method", "horn_schunck", "--truth", "@wrongsize.flo"],
     RUNTIME, r"--truth: '.*wrongsize\.flo' is 3x4 \(H x W\) but the frames are 40x48"),
    ("flo-all-unknown", ["flow", "@a.png", "@b.png", "--method", "horn_schunck", "--truth", "@unknown.flo"],
     RUNTIME, r"--truth: .*truth has no known pixel"),
    # -- torchfpi train flow
    ("train-flow-steps", ["train", "flow", "--steps", "0"], USAGE, r"--steps: expected a positive integer, got 0"),
    ("train-flow-size", ["train", "flow", "--size", "16"], USAGE, r"--size: expected at least 32, got 16"),
    ("train-flow-lr", ["train", "flow", "--lr", "-1"], USAGE, r"--lr and --max-motion must be positive"),
    ("train-flow-nan-motion", ["train", "flow", "--max-motion", "nan"], USAGE, r"must be positive, got 0\.03 and nan"),
    ("train-flow-int", ["train", "flow", "--batch-size", "abc"], USAGE, r"argument --batch-size: invalid int value: 'abc'"),
    ("train-flow-unknown-model", ["train", "flow", "--model", "raft"], USAGE, r"argument --model: invalid choice: 'raft'"),
    ("train-flow-missing-root", ["train", "flow", "--data-root", "@nowhere"], RUNTIME,
     r"--data-root: directory '.*nowhere' does not exist"),
    ("train-flow-contradiction", ["train", "flow", "--procedural", "--data-root", "@empty"], USAGE,
     r"--procedural and --data-root contradict each other"),
    ("train-flow-out-is-file", ["train", "flow", *TINY_FLOW, "--out", "@afile"], USAGE,
     r"--out: '.*afile' is a file, expected a folder"),
    ("train-flow-checkpoint-every", ["train", "flow", "--checkpoint-every", "-2"], USAGE,
     r"--checkpoint-every: expected 0 \(at each validation\) or a positive integer, got -2"),
    ("train-flow-corrupt-checkpoint", ["train", "flow", *TINY_FLOW, "--out", "@ckflow", "--resume"], RUNTIME,
     r"checkpoint '.*checkpoint\.pt' is not a training checkpoint file: .*: delete it or train without --resume"),
    ("train-flow-missing-base", ["train", "flow", "--model", "fpi_nn", "--procedural", "--base", "@no.pt"],
     RUNTIME, r"No such file or directory: '.*no\.pt'"),
    ("train-flow-corrupt-base", ["train", "flow", "--model", "fpi_nn", "--procedural", "--base", "@junk.pt"],
     RUNTIME, r"junk\.pt' is not a torchfpi flow weights file: not written by torch\.save"),
    ("train-flow-nn-corrupt-resume", ["train", "flow", "--model", "fpi_nn", *TINY_NN, "--out", "@ckflownn",
                                      "--resume"], RUNTIME,
     r"checkpoint '.*checkpoint_nn\.pt' is not a training checkpoint file: not written by torch\.save: delete it or "
     r"train without --resume"),
    ("train-flow-nn-resume-other-settings", ["train", "flow", "--model", "fpi_nn", *TINY_NN, "--out", "@nnsize",
                                             "--resume"], USAGE,
     r"--resume: '.*checkpoint_nn\.pt' was written with --size 64, this run has --size 32: resume with the same"),
    ("train-flow-nn-resume-other-base", ["train", "flow", "--model", "fpi_nn", *TINY_NN, "--out", "@nnbase",
                                         "--resume"], USAGE,
     r"--resume: '.*checkpoint_nn\.pt' was trained on another --base model"),
    ("train-flow-nn-pairs", ["train", "flow", "--model", "fpi_nn", "--pairs", "0"], USAGE,
     r"--pairs: expected a positive integer, got 0"),
    ("train-flow-pairs-for-fpi-gd", ["train", "flow", "--pairs", "8"], USAGE,
     r"--pairs: only for --model fpi_nn .*: drop --pairs"),
    # -- torchfpi train multilabel
    ("ml-unknown-dataset", ["train", "multilabel", "--dataset", "mnist"], USAGE,
     r"argument --dataset: invalid choice: 'mnist'"),
    ("ml-unknown-model", ["train", "multilabel", "--model", "crf"], USAGE, r"argument --model: invalid choice: 'crf'"),
    ("ml-half-arff-pair", ["train", "multilabel", "--train-arff", "@m1.arff"], USAGE,
     r"--train-arff and --test-arff go together"),
    ("ml-missing-arff", ["train", "multilabel", "--train-arff", "@no.arff", "--test-arff", "@m2.arff"], RUNTIME,
     r"ARFF file '.*no\.arff' does not exist"),
    ("arff-wrong-count", ["train", "multilabel", "--train-arff", "@wrongcount.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"wrongcount\.arff: malformed ARFF: .*line 8"),
    ("arff-bad-index", ["train", "multilabel", "--train-arff", "@badindex.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"badindex\.arff: malformed ARFF: Bad @DATA instance format in line 8"),
    ("arff-fewer-attributes", ["train", "multilabel", "--train-arff", "@fewer.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"fewer\.arff: malformed ARFF"),
    ("arff-non-binary-label", ["train", "multilabel", "--train-arff", "@nonbinary.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"nonbinary\.arff: malformed ARFF: Data value 7 not found"),
    ("arff-truncated", ["train", "multilabel", "--train-arff", "@truncated.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"truncated\.arff: malformed ARFF"),
    ("arff-binary-file", ["train", "multilabel", "--train-arff", "@binary.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"binary\.arff: not a UTF-8 text ARFF file"),
    ("arff-bad-label-xml", ["train", "multilabel", "--train-arff", "@badxml.arff", "--test-arff", "@m2.arff"],
     RUNTIME, r"badxml\.xml: not a valid MULAN label XML file"),
    ("ml-missing-root", ["train", "multilabel", "--dataset", "delicious", "--data-root", "@nowhere"], RUNTIME,
     r"--data-root: directory '.*nowhere' does not exist"),
    ("ml-empty-root", ["train", "multilabel", "--dataset", "delicious", "--data-root", "@empty"], RUNTIME,
     r"delicious train split: '.*delicious-train\.arff' does not exist"),
    ("ml-val-fraction", ["train", "multilabel", *ML, "--val-fraction", "1.5"], USAGE,
     r"--val-fraction: expected a number in \(0, 1\), got 1\.5"),
    ("ml-epochs", ["train", "multilabel", *ML, "--epochs", "0"], USAGE, r"--epochs: expected >= 1, got 0"),
    ("ml-batch-size", ["train", "multilabel", *ML, "--batch-size", "0"], USAGE, r"--batch-size: expected >= 1, got 0"),
    ("ml-threads", ["train", "multilabel", "--threads", "0"], USAGE, r"--threads: expected >= 1, got 0"),
    ("ml-device-unknown", ["train", "multilabel", "--device", "banana"], USAGE,
     r"--device: expected 'auto', 'cpu' or 'cuda\[:N\]', got 'banana'"),
    ("ml-max-steps", ["train", "multilabel", "--max-steps", "0"], USAGE, r"--max-steps: expected >= 1, got 0"),
    pytest.param("ml-tol", ["train", "multilabel", *ML, "--tol", "-1"], USAGE, r"--tol: .*-1"),
    pytest.param("ml-max-iter", ["train", "multilabel", *ML, "--max-iter", "0"], USAGE, r"--max-iter: .*0"),
    pytest.param("ml-hidden", ["train", "multilabel", *ML, "--hidden", "0", "--max-steps", "1"], USAGE,
                 r"--hidden: .*0"),
    ("ml-energy-hidden", ["train", "multilabel", *ML, "--energy-hidden", "0"], USAGE,
     r"--energy-hidden: expected a positive integer, got 0"),
    ("ml-unroll-steps", ["train", "multilabel", *ML, "--model", "spen", "--unroll-steps", "0"], USAGE,
     r"--unroll-steps: expected a positive integer, got 0"),
    ("ml-step-size", ["train", "multilabel", *ML, "--step-size", "-0.5"], USAGE,
     r"--step-size: expected a positive number, got -0\.5"),
    ("ml-dropout", ["train", "multilabel", *ML, "--hidden-dropout", "1"], USAGE,
     r"--hidden-dropout: expected a number in \[0, 1\), got 1\.0"),
    ("ml-solver-for-mlp", ["train", "multilabel", *ML, "--model", "mlp", "--solver", "anderson"], USAGE,
     r"--solver: only for --model fpi_gd or fpi_nn \(got --model mlp\)"),
    pytest.param("ml-bookmarks-hint", ["train", "multilabel", "--dataset", "bookmarks", "--data-root", "@empty"],
                 RUNTIME, r"--train-arff"),
    pytest.param("ml-corrupt-checkpoint", ["train", "multilabel", *ML, "--checkpoint-dir", "@ckml", "--resume",
                                           "--max-steps", "1", "--hidden", "8"], RUNTIME,
                 r"checkpoint .*bibtex-fpi_gd-seed0\.pt"),
    # -- torchfpi denoise / train denoise
    ("dn-missing-image", ["denoise", "@missing.png", "--sigma", "25", "--out", "@o.png"], RUNTIME,
     r"image file '.*missing\.png' does not exist"),
    ("dn-non-image", ["denoise", "@junk.png", "--sigma", "25", "--out", "@o.png"], RUNTIME,
     r"junk\.png' is not a readable image file"),
    ("dn-sigma-zero", ["denoise", "@a.png", "--sigma", "0", "--out", "@o.png"], USAGE,
     r"--sigma: expected a noise level in \(0, 100\]"),
    ("dn-sigma-large", ["denoise", "@a.png", "--sigma", "500", "--out", "@o.png"], USAGE,
     r"--sigma: expected a noise level in \(0, 100\] on the \[0, 255\] scale, got 500"),
    ("dn-no-out", ["denoise", "@a.png", "--sigma", "25"], USAGE, r"the following arguments are required: --out"),
    ("dn-corrupt-weights", ["denoise", "@a.png", "--sigma", "25", "--out", "@o.png", "--weights", "@junk.pt"],
     RUNTIME, r"junk\.pt' is not a torchfpi denoiser weights file"),
    ("dn-missing-weights", ["denoise", "@a.png", "--sigma", "25", "--out", "@o.png", "--weights", "@no.pt"],
     RUNTIME, r"No such file or directory: '.*no\.pt'"),
    ("dn-tol", ["denoise", "@a.png", "--sigma", "25", "--out", "@o.png", "--tol", "-1"], USAGE,
     r"--tol: expected a positive number, got -1"),
    ("dn-max-iter", ["denoise", "@a.png", "--sigma", "25", "--out", "@o.png", "--max-iter", "0"],
     USAGE, r"--max-iter: .*0"),
    ("train-dn-missing-root", ["train", "denoise", "--data-root", "@nowhere"], RUNTIME,
     r"--data-root: directory '.*nowhere' does not exist"),
    ("train-dn-no-train400", ["train", "denoise", "--data-root", "@empty", "--steps", "1"], RUNTIME,
     r"image folder '.*Train400' does not exist"),
    ("train-dn-unroll-contradiction", ["train", "denoise", "--unroll-steps", "3"], USAGE,
     r"--unroll-steps: only for --model unrolled"),
    ("train-dn-tol-contradiction", ["train", "denoise", "--model", "unrolled", "--tol", "1e-3"], USAGE,
     r"--tol: not for --model unrolled \(use --unroll-steps\)"),
    ("train-dn-steps", ["train", "denoise", "--steps", "0"], USAGE, r"--steps: expected a positive integer, got 0"),
    ("train-dn-sigma-type", ["train", "denoise", "--sigma", "abc"], USAGE, r"argument --sigma: invalid float value"),
    ("train-dn-missing-init", ["train", "denoise", "--data-root", "@empty", "--init", "@no.pt"], RUNTIME,
     r"No such file or directory: '.*no\.pt'"),
    ("train-dn-corrupt-init", ["train", "denoise", "--data-root", "@empty", "--init", "@junk.pt"],
     RUNTIME, r"--init: '.*junk\.pt' is not a torchfpi denoiser weights file"),
    ("train-dn-corrupt-resume", ["train", "denoise", "--data-root", "@dn", "--steps", "1", "--batch-size", "2",
                                 "--crop", "24", "--val-images", "2", "--checkpoint", "@ckdn/fpi_gd_s25.pt",
                                 "--resume", "--quiet"], RUNTIME,
     r"checkpoint '.*fpi_gd_s25\.pt' is not a training checkpoint file: not written by torch\.save: delete it or "
     r"train without --resume"),
    ("train-dn-max-iter", ["train", "denoise", "--max-iter", "0"], USAGE, r"--max-iter: expected a positive number, got 0"),
    ("train-dn-batch-size", ["train", "denoise", "--batch-size", "0"], USAGE,
     r"--batch-size: expected a positive integer, got 0"),
    ("train-dn-val-images", ["train", "denoise", "--val-images", "0"], USAGE,
     r"--val-images: expected a positive integer, got 0"),
    ("train-dn-unroll-steps", ["train", "denoise", "--model", "unrolled", "--unroll-steps", "0"], USAGE,
     r"--unroll-steps: expected a positive integer, got 0"),
    ("train-dn-crop", ["train", "denoise", "--crop", "-4"], USAGE, r"--crop: expected a positive integer, got -4"),
    ("train-dn-lr", ["train", "denoise", "--lr", "0"], USAGE, r"--lr: expected a positive number, got 0"),
    ("train-dn-budget", ["train", "denoise", "--budget-minutes", "-1"], USAGE,
     r"--budget-minutes: expected a positive number, got -1"),
    ("train-dn-filters-fpi-nn", ["train", "denoise", "--model", "fpi_nn", "--filters", "8"], USAGE,
     r"--filters: only for --model fpi_gd or unrolled"),
    ("train-dn-filters", ["train", "denoise", "--filters", "0"], USAGE, r"--filters: expected a positive integer, got 0"),
    ("train-dn-kernel-even", ["train", "denoise", "--kernel-size", "4"], USAGE,
     r"--kernel-size: expected an odd integer >= 3, got 4"),
    ("train-dn-too-many-filters", ["train", "denoise", "--filters", "30"], USAGE,
     r"--filters: at most 24 filters of size 5, got 30"),
    ("train-dn-too-many-grown", ["train", "denoise", "--data-root", "@empty", "--init", _SHIPPED_FPI_GD_25,
                                 "--kernel-size", "9", "--filters", "90"], USAGE,
     r"--filters: at most 80 filters of size 9, got 90"),
    ("train-dn-shrink-init", ["train", "denoise", "--data-root", "@empty", "--init", _SHIPPED_FPI_GD_25, "--filters", "8"],
     USAGE, r"--filters/--kernel-size: the --init energy has \d+ filters of size (\d+); a bank can grow, not "
     r"shrink \(got 8 of size \1\)"),
]


def _case_id(case) -> str:
    return case.values[0] if hasattr(case, "values") else case[0]


@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input_is_one_line_with_exit_code(name, argv, code, message, bad, capsys, monkeypatch):
    monkeypatch.chdir(bad)  # default output folders (runs/, checkpoints/) land in the scratch folder
    argv = [str(bad / a[1:]) if a.startswith("@") else a for a in argv]
    rc = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, f"{name}: exit code {rc}, expected {code}; stderr: {err!r}"
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1, f"{name}: expected one line on stderr, got {err!r}"
    assert err.startswith("torchfpi"), err
    assert re.search(message, err), f"{name}: {message!r} not in {err!r}"


def test_catalogue_is_large_enough():
    assert len(CASES) >= 25
    assert len({_case_id(c) for c in CASES}) == len(CASES)
