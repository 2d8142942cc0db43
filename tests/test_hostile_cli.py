"""A hostile user's command lines: every one ends in exactly one line on stderr, the right exit class
(2: usage error, 1: runtime failure), no traceback, and nothing written or left half-written.

Each case runs in-process through :func:`torchfpi.cli.main` in a fresh working folder, and must
fail before any work (the whole corpus takes seconds). Arguments starting with ``@`` name files of
the ``inputs`` fixture; ``~`` names a path in the case's own working folder. The fixture includes a
crafted ``evil.pt`` whose pickle would run ``os.system`` to create a marker file: every command that
reads a user-given torch file must refuse it unread (the marker never appears).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_arff import ARFF_HEADER, MULAN_XML, arff_rows

from torchfpi.cli import main

USAGE, RUNTIME = 2, 1
WEIGHTS = Path(__file__).resolve().parents[1] / "torchfpi" / "weights"
MARKER = "pwned.marker"


def _arff_text(n: int) -> str:
    return ARFF_HEADER + arff_rows(n)


class _Evil:
    """Pickles to ``os.system("touch <marker>")``: what a crafted weights file does on a plain load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    import torch
    from PIL import Image

    d = tmp_path_factory.mktemp("hostile")
    img = (np.random.RandomState(0).rand(40, 48) * 255).astype(np.uint8)
    Image.fromarray(img).save(d / "a.png")
    Image.fromarray(np.roll(img, 1, axis=1)).save(d / "b.png")
    Image.fromarray(img[:3, :3]).save(d / "tiny.png")
    Image.fromarray(img[:1, :40]).save(d / "row.png")
    Image.fromarray(img[:7, :7]).save(d / "seven.png")
    Image.fromarray(img[:30, :30]).save(d / "small.png")
    (d / "junk.png").write_bytes(b"this is not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "junk.pt").write_bytes(b"not a torch file")
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt").write_text("weights = [1, 2, 3]\n")
    (d / "afile").write_text("a file, not a folder")
    (d / "emptydir").mkdir()
    torch.save(torch.zeros(3), d / "tensor.pt")
    torch.save({"model": {}, "optimizer": {}, "step": 3, "evil": _Evil(d / MARKER)}, d / "evil.pt")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "m1.arff").write_text(_arff_text(30))
    (d / "m1.xml").write_text(MULAN_XML)
    (d / "m2.arff").write_text(_arff_text(10))
    (d / "m2.xml").write_text(MULAN_XML)
    # a tiny Train400 (4 images of 40x48) for train denoise
    t400 = d / "dn" / "denoise" / "Train400"
    t400.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.roll(img, 7 * i, axis=0)).save(t400 / f"t{i}.png")
    # checkpoints of every kind holding the crafted pickle, where each command looks for them
    for sub, name in (("ckdn", "fpi_gd_s25.pt"), ("ckflow", "checkpoint.pt"), ("ckflownn", "checkpoint_nn.pt"),
                      ("ckml", "bibtex-fpi_gd-seed0.pt")):
        (d / sub).mkdir()
        (d / sub / name).write_bytes((d / "evil.pt").read_bytes())
    # a well-formed flow checkpoint where train denoise --resume looks: another app's checkpoint
    (d / "ckother").mkdir()
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "rng": {}, "generator": torch.zeros(1),
                "step": 1, "history": [], "best": {}, "skipped": 0}, d / "ckother" / "fpi_gd_s25.pt")
    from torchfpi.apps._trainer import CHECKPOINT_KEYS

    full = {**dict.fromkeys(CHECKPOINT_KEYS), "model": {"w": torch.zeros(2)}, "optimizer": {}, "scheduler": {},
            "rng": {}, "generators": {}, "step": 1, "elapsed": 0.0, "best": {}, "history": [], "best_state": {},
            "config": {}, "task": {}, "running": {}, "skipped": 0, "rejected": 0}
    (d / "ckappflow").mkdir()  # a flow run's checkpoint where train denoise looks
    torch.save({**full, "app": "flow"}, d / "ckappflow" / "fpi_gd_s25.pt")
    (d / "ckmismatch").mkdir()  # complete keys, but the weights of some other model
    torch.save({**full, "app": "flow"}, d / "ckmismatch" / "checkpoint.pt")
    (d / "bench").mkdir()
    (d / "bench" / "results.json").write_text("{not json")
    return d


def _shipped(name: str) -> str:
    return str(WEIGHTS / name)


DN = ["denoise", "@a.png", "--sigma", "25", "--out", "~o.png"]
TDN = ["train", "denoise", "--data-root", "@dn", "--steps", "1", "--batch-size", "2", "--crop", "16",
       "--val-images", "2", "--quiet", "--checkpoint", "~ck/c.pt"]
TFL = ["train", "flow", "--procedural", "--size", "32", "--batch-size", "1", "--val-pairs", "1", "--steps", "1",
       "--max-iter", "2", "--quiet", "--out", "~runs"]
FL = ["flow", "@a.png", "@b.png", "--out", "~o.flo"]
ML = ["train", "multilabel", "--train-arff", "@m1.arff", "--test-arff", "@m2.arff", "--quiet", "--max-steps", "1",
      "--hidden", "8", "--checkpoint-dir", "~ck"]
DEMO = ["demo", "--max-steps", "1", "--quiet", "--out-dir", "~demo"]
BENCH = ["bench", "--quick", "--quiet", "--no-plots", "--no-torchdeq", "--out", "~bench"]
GC = ["gradcheck"]


def _with(base, *extra):
    return [*base, *extra]


def _numbers(prefix, base, flags, bad, code=USAGE, message=None):
    """Cases ``base + [flag, value]`` for every flag and bad value."""
    out = []
    for flag in flags:
        for value in bad:
            out.append((f"{prefix}{flag}={value}", _with(base, flag, value), code,
                        message or re.escape(flag.split("=")[0]) + "|invalid"))
    return out


NOT_INT = ("0", "-1", "abc", "1.5")
NOT_POSITIVE = ("0", "-1", "nan", "inf", "abc")

CASES = [
    # -- the command line itself
    ("no-command", [], USAGE, r"required: COMMAND"),
    ("unknown-command", ["nope"], USAGE, r"invalid choice: 'nope'"),
    ("train-without-app", ["train"], USAGE, r"required: APP"),
    ("unknown-flag", ["gradcheck", "--bogus"], USAGE, r"unrecognized arguments: --bogus"),
    ("stray-positional", ["gradcheck", "extra"], USAGE, r"unrecognized arguments: extra"),
    # -- torchfpi denoise
    *_numbers("dn", DN, ["--sigma"], ("0", "-5", "nan", "inf", "101", "abc"), message=r"--sigma"),
    *_numbers("dn", DN, ["--tol"], NOT_POSITIVE, message=r"--tol"),
    *_numbers("dn", DN, ["--max-iter"], NOT_INT, message=r"--max-iter"),
    ("dn-out-no-suffix", ["denoise", "@a.png", "--sigma", "25", "--out", "~out"], USAGE,
     r"--out: expected a file name ending in \.png"),
    ("dn-out-txt", ["denoise", "@a.png", "--sigma", "25", "--out", "~o.txt"], USAGE, r"--out: .*o\.txt"),
    ("dn-out-is-dir", ["denoise", "@a.png", "--sigma", "25", "--out", "@emptydir/x.png/"], USAGE, r"--out"),
    ("dn-out-dir-name", ["denoise", "@a.png", "--sigma", "25", "--out", "~"], USAGE, r"--out"),
    ("dn-out-empty", ["denoise", "@a.png", "--sigma", "25", "--out", ""], USAGE, r"--out"),
    ("dn-out-existing-dir", ["denoise", "@a.png", "--sigma", "25", "--out", "@emptydir"], USAGE, r"--out"),
    ("dn-out-under-file", ["denoise", "@a.png", "--sigma", "25", "--out", "@afile/o.png"], USAGE,
     r"--out: '.*afile' is a file"),
    ("dn-out-proc", ["denoise", "@a.png", "--sigma", "25", "--out", "/proc/x/o.png"], USAGE,
     r"--out: cannot write"),
    ("dn-out-is-input", ["denoise", "@a.png", "--sigma", "25", "--out", "@a.png"], USAGE, r"is the input image"),
    ("dn-model", _with(DN, "--model", "bm3d"), USAGE, r"invalid choice: 'bm3d'"),
    ("dn-no-sigma", ["denoise", "@a.png", "--out", "~o.png"], USAGE, r"required: --sigma"),
    ("dn-no-out", ["denoise", "@a.png", "--sigma", "25"], USAGE, r"required: --out"),
    ("dn-no-input", ["denoise", "--sigma", "25", "--out", "~o.png"], USAGE, r"required: IN"),
    ("dn-missing-input", ["denoise", "@none.png", "--sigma", "25", "--out", "~o.png"], RUNTIME, r"does not exist"),
    ("dn-junk-input", ["denoise", "@junk.png", "--sigma", "25", "--out", "~o.png"], RUNTIME, r"not a readable image"),
    ("dn-empty-input", ["denoise", "@empty.png", "--sigma", "25", "--out", "~o.png"], RUNTIME, r"not a readable image"),
    ("dn-dir-input", ["denoise", "@emptydir", "--sigma", "25", "--out", "~o.png"], RUNTIME, r"is a directory"),
    ("dn-3x3", ["denoise", "@tiny.png", "--sigma", "25", "--out", "~o.png"], USAGE, r"is 3x3 pixels.*at least 8x8"),
    ("dn-1x40", ["denoise", "@row.png", "--sigma", "25", "--out", "~o.png"], USAGE, r"is 40x1 pixels"),
    ("dn-7x7", ["denoise", "@seven.png", "--sigma", "25", "--out", "~o.png"], USAGE, r"is 7x7 pixels"),
    ("dn-weights-missing", _with(DN, "--weights", "@none.pt"), RUNTIME, r"No such file or directory"),
    ("dn-weights-junk", _with(DN, "--weights", "@junk.pt"), RUNTIME, r"not written by torch\.save"),
    ("dn-weights-empty", _with(DN, "--weights", "@empty.pt"), RUNTIME, r"the file is empty"),
    ("dn-weights-text", _with(DN, "--weights", "@text.pt"), RUNTIME, r"not written by torch\.save"),
    ("dn-weights-tensor", _with(DN, "--weights", "@tensor.pt"), RUNTIME, r"holds a Tensor, expected a dict"),
    ("dn-weights-list", _with(DN, "--weights", "@list.pt"), RUNTIME, r"holds a list"),
    ("dn-weights-evil", _with(DN, "--weights", "@evil.pt"), RUNTIME, r"refused unread"),
    ("dn-weights-flow", _with(DN, "--weights", _shipped("flow_fpi_gd.pt")), RUNTIME, r"it holds flow weights"),
    ("dn-weights-flow-nn", _with(DN, "--weights", _shipped("flow_fpi_nn.pt")), RUNTIME, r"it holds flow weights"),
    ("dn-weights-checkpoint", _with(DN, "--weights", "@ckother/fpi_gd_s25.pt"), RUNTIME,
     r"it holds a training checkpoint"),
    ("dn-weights-empty-dir", _with(DN, "--weights", "@emptydir"), USAGE, r"no fpi_gd weights for sigma 25"),
    ("dn-weights-unrolled-as-fpi-gd", _with(DN, "--weights", _shipped("denoise_unrolled_s25.pt")), USAGE,
     r"--model: .* holds unrolled weights, not fpi_gd: pass --model unrolled"),
    ("dn-weights-fpi-nn-as-unrolled", _with(DN, "--model", "unrolled", "--weights", _shipped("denoise_fpi_nn_s25.pt")),
     USAGE, r"holds fpi_nn weights, not unrolled"),
    ("dn-no-shipped-sigma", ["denoise", "@a.png", "--sigma", "30", "--out", "~o.png"], USAGE,
     r"no fpi_gd weights for sigma 30 .*available: 15, 25, 50"),
    # -- torchfpi train denoise (a wrong flag is found before the data)
    *_numbers("tdn", TDN, ["--steps", "--batch-size", "--crop", "--val-images", "--val-every", "--threads",
                           "--limit-images"], ("0", "-1", "abc"), message=r"--[a-z-]+"),
    *_numbers("tdn", TDN, ["--lr", "--budget-minutes"], NOT_POSITIVE, message=r"--[a-z-]+"),
    *_numbers("tdn", TDN, ["--tol", "--max-iter"], ("0", "-1", "abc"), message=r"--[a-z-]+"),
    ("tdn-tol-nan", _with(TDN, "--tol", "nan"), USAGE, r"--tol: expected a positive number"),
    ("tdn-tol-inf", _with(TDN, "--tol", "inf"), USAGE, r"--tol: expected a positive number"),
    ("tdn-sigma", _with(TDN, "--sigma", "0"), USAGE, r"--sigma"),
    ("tdn-sigma-nan", _with(TDN, "--sigma", "nan"), USAGE, r"--sigma"),
    ("tdn-seed-negative", _with(TDN, "--seed", "-1"), USAGE, r"--seed: expected an integer in \[0, 2\*\*63\)"),
    ("tdn-seed-huge", _with(TDN, "--seed", str(2**64)), USAGE, r"--seed"),
    ("tdn-threads-huge", _with(TDN, "--threads", "100000"), USAGE, r"--threads: expected at most 1024"),
    ("tdn-unroll-for-fpi-gd", _with(TDN, "--unroll-steps", "3"), USAGE, r"--unroll-steps: only for --model unrolled"),
    ("tdn-unroll-zero", _with(TDN, "--model", "unrolled", "--unroll-steps", "0"), USAGE, r"--unroll-steps"),
    ("tdn-tol-for-unrolled", _with(TDN, "--model", "unrolled", "--tol", "1e-3"), USAGE, r"not for --model unrolled"),
    ("tdn-filters-fpi-nn", _with(TDN, "--model", "fpi_nn", "--filters", "8"), USAGE, r"--filters: only for"),
    ("tdn-filters-zero", _with(TDN, "--filters", "0"), USAGE, r"--filters"),
    ("tdn-filters-too-many", _with(TDN, "--filters", "30"), USAGE, r"at most 24 filters of size 5"),
    ("tdn-kernel-even", _with(TDN, "--kernel-size", "4"), USAGE, r"--kernel-size: expected an odd integer"),
    ("tdn-crop-below-kernel", _with(TDN, "--kernel-size", "21", "--filters", "8"), USAGE,
     r"--crop: 16 is smaller than the 21x21 filters"),
    ("tdn-kernel-one", _with(TDN, "--kernel-size", "1"), USAGE, r"--kernel-size"),
    ("tdn-calibrate-fpi-nn", _with(TDN, "--model", "fpi_nn", "--calibrate-data-weight"), USAGE,
     r"--calibrate-data-weight: only for"),
    ("tdn-dtype", _with(TDN, "--dtype", "float16"), USAGE, r"invalid choice: 'float16'"),
    ("tdn-on-nonfinite", _with(TDN, "--on-nonfinite", "ignore"), USAGE, r"invalid choice: 'ignore'"),
    ("tdn-model", _with(TDN, "--model", "dncnn"), USAGE, r"invalid choice: 'dncnn'"),
    ("tdn-crop-1000", _with(TDN, "--crop", "1000"), USAGE, r"--crop: 1000 is larger than the smallest training "
     r"image \(40x48"),
    ("tdn-val-images-500", _with(TDN, "--val-images", "500"), USAGE, r"--val-images: 500 validation images leave "
     r"none of the 4"),
    ("tdn-val-images-all", _with(TDN, "--val-images", "4"), USAGE, r"--val-images: 4 .*expected at most 3"),
    ("tdn-limit-images-0", _with(TDN, "--limit-images", "0"), USAGE, r"--limit-images: expected a positive"),
    ("tdn-limit-below-val", _with(TDN, "--limit-images", "2"), USAGE, r"--limit-images: 2 images leave none"),
    ("tdn-checkpoint-dir", _with(TDN, "--checkpoint", "@emptydir"), USAGE, r"--checkpoint: .* is a folder"),
    ("tdn-checkpoint-under-file", _with(TDN, "--checkpoint", "@afile/c.pt"), USAGE, r"--checkpoint: .* is a file"),
    ("tdn-checkpoint-proc", _with(TDN, "--checkpoint", "/proc/x/c.pt"), USAGE, r"--checkpoint: cannot write"),
    ("tdn-export-dir", _with(TDN, "--export", "@emptydir"), USAGE, r"--export: .* is a folder"),
    ("tdn-export-is-checkpoint", _with(TDN, "--export", "~ck/c.pt"), USAGE, r"--export: .* is also the checkpoint"),
    ("tdn-export-proc", _with(TDN, "--export", "/proc/x/w.pt"), USAGE, r"--export: cannot write"),
    ("tdn-missing-root", _with(TDN[:2], "--data-root", "@nowhere"), RUNTIME, r"--data-root: directory"),
    ("tdn-no-train400", _with(TDN[:2], "--data-root", "@emptydir", "--checkpoint", "~c.pt"), RUNTIME,
     r"Train400"),
    ("tdn-init-missing", _with(TDN, "--init", "@none.pt"), RUNTIME, r"No such file or directory"),
    ("tdn-init-junk", _with(TDN, "--init", "@junk.pt"), RUNTIME, r"--init: .* not a torchfpi denoiser weights"),
    ("tdn-init-evil", _with(TDN, "--init", "@evil.pt"), RUNTIME, r"--init: .*refused unread"),
    ("tdn-init-tensor", _with(TDN, "--init", "@tensor.pt"), RUNTIME, r"--init: .*holds a Tensor"),
    ("tdn-init-flow", _with(TDN, "--init", _shipped("flow_fpi_gd.pt")), RUNTIME, r"--init: .*it holds flow weights"),
    ("tdn-init-other-kind", _with(TDN, "--init", _shipped("denoise_fpi_nn_s25.pt")), USAGE,
     r"--init: .* holds fpi_nn weights, not fpi_gd"),
    ("tdn-resume-evil", _with(TDN, "--checkpoint", "@ckdn/fpi_gd_s25.pt", "--resume"), RUNTIME,
     r"checkpoint .*refused unread.*delete it or train without --resume"),
    ("tdn-resume-other-app", _with(TDN, "--checkpoint", "@ckother/fpi_gd_s25.pt", "--resume"), RUNTIME,
     r"not a training checkpoint of this command"),
    ("tdn-export-is-shipped-weights", _with(TDN, "--checkpoint", _shipped("denoise_fpi_gd_s25.pt")), USAGE,
     r"--export: .* is also the checkpoint"),
    ("tdn-resume-weights", _with(TDN, "--checkpoint", _shipped("denoise_fpi_gd_s25.pt"), "--export", "~w.pt",
                                 "--resume"), RUNTIME,
     r"holds exported weights, not a checkpoint"),
    ("tdn-resume-flow-run", _with(TDN, "--checkpoint", "@ckappflow/fpi_gd_s25.pt", "--resume"), RUNTIME,
     r"is a checkpoint of 'torchfpi train flow', not of 'torchfpi train denoise'"),
    # -- torchfpi train flow
    *_numbers("tfl", TFL, ["--steps", "--batch-size", "--size", "--val-pairs", "--val-every", "--max-iter",
                           "--threads"], ("0", "-1", "abc"), message=r"--[a-z-]+"),
    *_numbers("tfl", TFL, ["--lr", "--max-motion"], ("0", "-1", "nan", "inf"), message=r"--lr and --max-motion"),
    ("tfl-size-small", _with(TFL, "--size", "16"), USAGE, r"--size: expected at least 32"),
    ("tfl-size-huge", _with(TFL, "--size", "100000"), USAGE, r"--size: expected at most 4096"),
    ("tfl-threads-huge", _with(TFL, "--threads", "5000"), USAGE, r"--threads: expected at most 1024"),
    ("tfl-seed", _with(TFL, "--seed", "-3"), USAGE, r"--seed"),
    ("tfl-checkpoint-every", _with(TFL, "--checkpoint-every", "-1"), USAGE, r"--checkpoint-every"),
    ("tfl-pairs-for-fpi-gd", _with(TFL, "--pairs", "4"), USAGE, r"--pairs: only for --model fpi_nn"),
    ("tfl-nn-pairs-zero", _with(TFL, "--model", "fpi_nn", "--pairs", "0"), USAGE, r"--pairs: expected a positive"),
    ("tfl-out-file", _with(TFL, "--out", "@afile"), USAGE, r"--out: .*afile' is a file"),
    ("tfl-out-under-file", _with(TFL, "--out", "@afile/runs"), USAGE, r"--out: .* is a file"),
    ("tfl-out-proc", _with(TFL, "--out", "/proc/x/runs"), USAGE, r"--out: cannot write"),
    ("tfl-contradiction", _with(TFL, "--data-root", "@emptydir"), USAGE, r"--procedural and --data-root contradict"),
    ("tfl-empty-root", ["train", "flow", "--data-root", "@emptydir", "--out", "~runs"], RUNTIME,
     r"no texture images.*torchfpi data fetch train400.*--procedural"),
    ("tfl-missing-root", ["train", "flow", "--data-root", "@nowhere", "--out", "~runs"], RUNTIME,
     r"--data-root: directory"),
    ("tfl-base-missing", _with(TFL, "--model", "fpi_nn", "--base", "@none.pt"), RUNTIME, r"No such file"),
    ("tfl-base-junk", _with(TFL, "--model", "fpi_nn", "--base", "@junk.pt"), RUNTIME, r"not a torchfpi flow weights"),
    ("tfl-base-evil", _with(TFL, "--model", "fpi_nn", "--base", "@evil.pt"), RUNTIME, r"refused unread"),
    ("tfl-base-nn", _with(TFL, "--model", "fpi_nn", "--base", _shipped("flow_fpi_nn.pt")), RUNTIME,
     r"holds fpi_nn flow weights, not fpi_gd"),
    ("tfl-base-denoise", _with(TFL, "--model", "fpi_nn", "--base", _shipped("denoise_fpi_gd_s25.pt")), RUNTIME,
     r"it holds denoiser weights"),
    ("tfl-resume-evil", _with(TFL, "--out", "@ckflow", "--resume"), RUNTIME, r"checkpoint .*refused unread"),
    ("tfl-nn-resume-evil", _with(TFL, "--model", "fpi_nn", "--pairs", "2", "--out", "@ckflownn", "--resume"),
     RUNTIME, r"checkpoint .*refused unread"),
    ("tfl-resume-other-model", _with(TFL, "--out", "@ckmismatch", "--resume"), RUNTIME,
     r"checkpoint '.*checkpoint\.pt' does not fit this run \(RuntimeError: .*\): delete it"),
    # -- torchfpi flow
    ("fl-missing-frame", ["flow", "@a.png", "@none.png", "--out", "~o.flo"], RUNTIME, r"No such file"),
    ("fl-junk-frame", ["flow", "@a.png", "@junk.png", "--out", "~o.flo"], RUNTIME, r"cannot read it as an image"),
    ("fl-empty-frame", ["flow", "@empty.png", "@a.png", "--out", "~o.flo"], RUNTIME, r"cannot read it as an image"),
    ("fl-tiny", ["flow", "@tiny.png", "@tiny.png", "--out", "~o.flo"], USAGE, r"frames are too small"),
    ("fl-row", ["flow", "@row.png", "@row.png", "--out", "~o.flo"], USAGE, r"frames are too small"),
    ("fl-size-mismatch", ["flow", "@a.png", "@small.png", "--out", "~o.flo"], USAGE, r"frame sizes differ"),
    ("fl-nothing", ["flow", "@a.png", "@b.png"], USAGE, r"nothing to write"),
    ("fl-out-txt", ["flow", "@a.png", "@b.png", "--out", "~o.txt"], USAGE, r"--out: expected a path ending in \.flo"),
    ("fl-out-dir", ["flow", "@a.png", "@b.png", "--out", "@emptydir/d.flo/"], USAGE, r"--out"),
    ("fl-out-under-file", ["flow", "@a.png", "@b.png", "--out", "@afile/o.flo"], USAGE, r"--out: .* is a file"),
    ("fl-out-proc", ["flow", "@a.png", "@b.png", "--out", "/proc/x/o.flo"], USAGE, r"--out: cannot write"),
    ("fl-png-jpg", ["flow", "@a.png", "@b.png", "--png", "~o.jpg"], USAGE, r"--png: expected a path ending in \.png"),
    ("fl-png-proc", ["flow", "@a.png", "@b.png", "--png", "/proc/x/o.png"], USAGE, r"--png: cannot write"),
    ("fl-threads", _with(FL, "--threads", "-1"), USAGE, r"--threads"),
    ("fl-threads-huge", _with(FL, "--threads", "100000"), USAGE, r"--threads: expected at most 1024"),
    ("fl-method", _with(FL, "--method", "raft"), USAGE, r"invalid choice: 'raft'"),
    ("fl-weights-missing", _with(FL, "--weights", "@none.pt"), RUNTIME, r"No such file"),
    ("fl-weights-junk", _with(FL, "--weights", "@junk.pt"), RUNTIME, r"not a torchfpi flow weights file"),
    ("fl-weights-evil", _with(FL, "--weights", "@evil.pt"), RUNTIME, r"refused unread"),
    ("fl-weights-evil-nn", _with(FL, "--method", "fpi_nn", "--weights", "@evil.pt"), RUNTIME, r"refused unread"),
    ("fl-weights-tensor", _with(FL, "--weights", "@tensor.pt"), RUNTIME, r"holds a Tensor"),
    ("fl-weights-nn-as-gd", _with(FL, "--weights", _shipped("flow_fpi_nn.pt")), RUNTIME,
     r"holds fpi_nn flow weights, not fpi_gd: use them with --method fpi_nn"),
    ("fl-weights-gd-as-nn", _with(FL, "--method", "fpi_nn", "--weights", _shipped("flow_fpi_gd.pt")), RUNTIME,
     r"holds fpi_gd flow weights, not fpi_nn"),
    ("fl-weights-denoise", _with(FL, "--weights", _shipped("denoise_fpi_gd_s25.pt")), RUNTIME,
     r"it holds denoiser weights"),
    ("fl-weights-horn-schunck", _with(FL, "--method", "horn_schunck", "--weights", _shipped("flow_fpi_gd.pt")),
     USAGE, r"--weights: not for --method horn_schunck"),
    ("fl-truth-missing", _with(FL, "--truth", "@none.flo"), RUNTIME, r"none\.flo"),
    ("fl-truth-junk", _with(FL, "--truth", "@junk.png"), RUNTIME, r"junk\.png"),
    # -- torchfpi train multilabel (flags before the data; outputs before training)
    *_numbers("ml", ML, ["--epochs", "--patience", "--batch-size", "--max-iter", "--hidden", "--energy-hidden",
                         "--max-steps", "--threads"], ("0", "-2"), message=r"--[a-z-]+"),
    ("ml-unroll-steps", _with(ML, "--model", "spen", "--unroll-steps", "0"), USAGE, r"--unroll-steps"),
    ("ml-pretrain-negative", _with(ML, "--pretrain-epochs", "-1"), USAGE, r"--pretrain-epochs"),
    *_numbers("ml", ML, ["--lr", "--tol", "--step-size"], ("0", "-1", "nan", "inf"), message=r"--[a-z-]+"),
    *_numbers("ml", ML, ["--val-fraction"], ("0", "1", "-0.5", "nan"), message=r"--val-fraction"),
    *_numbers("ml", ML, ["--input-dropout", "--hidden-dropout"], ("1", "-0.1", "nan"), message=r"-dropout"),
    ("ml-f1-weight", _with(ML, "--f1-weight", "-1"), USAGE, r"--f1-weight"),
    ("ml-f1-weight-nan", _with(ML, "--f1-weight", "nan"), USAGE, r"--f1-weight"),
    ("ml-seed", _with(ML, "--seed", "-1"), USAGE, r"--seed"),
    ("ml-threads-huge", _with(ML, "--threads", "100000"), USAGE, r"--threads: expected at most 1024"),
    ("ml-solver-mlp", _with(ML, "--model", "mlp", "--solver", "anderson"), USAGE, r"--solver: only for"),
    ("ml-backward-spen", _with(ML, "--model", "spen", "--backward", "neumann"), USAGE, r"--backward: only for"),
    ("ml-half-arff", ["train", "multilabel", "--train-arff", "@m1.arff"], USAGE, r"go together"),
    ("ml-device", _with(ML, "--device", "banana"), USAGE, r"--device"),
    ("ml-device-cuda", _with(ML, "--device", "cuda:7"), USAGE, r"--device"),
    ("ml-checkpoint-dir-file", _with(ML, "--checkpoint-dir", "@afile"), USAGE, r"--checkpoint-dir: .* is a file"),
    ("ml-checkpoint-dir-proc", _with(ML, "--checkpoint-dir", "/proc/x/ck"), USAGE, r"--checkpoint-dir: cannot"),
    ("ml-out-proc", _with(ML, "--out", "/proc/x/r.json"), USAGE, r"--out: cannot write"),
    ("ml-out-dir", _with(ML, "--out", "@emptydir"), USAGE, r"--out"),
    ("ml-out-txt", _with(ML, "--out", "~r.txt"), USAGE, r"--out: expected a file name ending in \.json"),
    ("ml-out-under-file", _with(ML, "--out", "@afile/r.json"), USAGE, r"--out: .* is a file"),
    ("ml-missing-arff", ["train", "multilabel", "--train-arff", "@none.arff", "--test-arff", "@m2.arff",
                         "--checkpoint-dir", "~ck"], RUNTIME, r"none\.arff"),
    ("ml-delicious-empty-root", ["train", "multilabel", "--dataset", "delicious", "--data-root", "@emptydir",
                                 "--checkpoint-dir", "~ck"], RUNTIME, r"delicious-train\.arff"),
    ("ml-resume-evil", _with(ML, "--checkpoint-dir", "@ckml", "--resume"), RUNTIME, r"checkpoint .*refused unread"),
    # -- torchfpi demo
    ("demo-epochs", _with(DEMO, "--epochs", "0"), USAGE, r"--epochs"),
    ("demo-patience", _with(DEMO, "--patience", "0"), USAGE, r"--patience"),
    ("demo-max-steps", _with(DEMO, "--max-steps", "0"), USAGE, r"--max-steps"),
    ("demo-seed", _with(DEMO, "--seed", "-1"), USAGE, r"--seed"),
    ("demo-device", _with(DEMO, "--device", "tpu"), USAGE, r"--device"),
    ("demo-out-dir-file", _with(DEMO, "--out-dir", "@afile"), USAGE, r"--out-dir: .* is a file"),
    ("demo-out-dir-proc", _with(DEMO, "--out-dir", "/proc/x/demo"), USAGE, r"--out-dir: cannot write"),
    # -- torchfpi bench
    ("bench-repeats", _with(BENCH, "--repeats", "0"), USAGE, r"--repeats"),
    ("bench-warmup", _with(BENCH, "--warmup", "-1"), USAGE, r"--warmup"),
    ("bench-tol-zero", _with(BENCH, "--tol", "0"), USAGE, r"--tol"),
    ("bench-tol-nan", _with(BENCH, "--tol", "nan"), USAGE, r"--tol"),
    ("bench-tol-inf", _with(BENCH, "--tol", "inf"), USAGE, r"--tol"),
    ("bench-max-iter", _with(BENCH, "--max-iter", "0"), USAGE, r"--max-iter"),
    ("bench-threads", _with(BENCH, "--threads", "0"), USAGE, r"--threads"),
    ("bench-threads-huge", _with(BENCH, "--threads", "99999"), USAGE, r"too large"),
    ("bench-seed", _with(BENCH, "--seed", "-1"), USAGE, r"--seed"),
    ("bench-problems", _with(BENCH, "--problems", "mnist"), USAGE, r"--problems: unknown \['mnist'\]"),
    ("bench-problems-empty", _with(BENCH, "--problems", ","), USAGE, r"--problems: expected a comma-separated"),
    ("bench-methods", _with(BENCH, "--methods", "magic"), USAGE, r"--methods: unknown"),
    ("bench-sweep-text", _with(BENCH, "--sweep", "a,b"), USAGE, r"--sweep"),
    ("bench-sweep-zero", _with(BENCH, "--sweep", "0,5"), USAGE, r"--sweep"),
    ("bench-sweep-huge", _with(BENCH, "--sweep", "10000000"), USAGE, r"--sweep"),
    ("bench-out-file", _with(BENCH, "--out", "@afile"), USAGE, r"--out: .* is a file"),
    ("bench-out-proc", _with(BENCH, "--out", "/proc/x/b"), USAGE, r"--out: cannot write"),
    ("bench-resume-corrupt", _with(BENCH, "--out", "@bench", "--resume"), RUNTIME, r"is not a JSON results file"),
    ("bench-clock", _with(BENCH, "--clock", "sundial"), USAGE, r"invalid choice"),
    # -- torchfpi gradcheck
    ("gc-batch", _with(GC, "--batch", "0"), USAGE, r"--batch and --dim"),
    ("gc-dim", _with(GC, "--dim", "-3"), USAGE, r"--batch and --dim"),
    ("gc-dim-huge", _with(GC, "--dim", "100000"), USAGE, r"at most 256"),
    ("gc-batch-huge", _with(GC, "--batch", "10000000"), USAGE, r"at most 256"),
    ("gc-radius-one", _with(GC, "--radius", "1"), USAGE, r"--radius"),
    ("gc-radius-nan", _with(GC, "--radius", "nan"), USAGE, r"--radius"),
    ("gc-tolerance-zero", _with(GC, "--tolerance", "0"), USAGE, r"--tolerance"),
    ("gc-tolerance-nan", _with(GC, "--tolerance", "nan"), USAGE, r"--tolerance"),
    ("gc-seed", _with(GC, "--seed", "-1"), USAGE, r"--seed"),
    ("gc-seed-text", _with(GC, "--seed", "x"), USAGE, r"invalid int value"),
]


def _resolve(argv, inputs: Path, work: Path):
    out = []
    for a in argv:
        slash = "/" if a.endswith("/") else ""  # kept: "dir/name.png/" names a folder
        if a.startswith("@"):
            out.append(str(inputs / a[1:]) + slash)
        elif a.startswith("~"):
            out.append(str(work / a[1:]) + slash)
        else:
            out.append(a)
    return out


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("name, argv, code, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_and_leaves_nothing(name, argv, code, message, inputs, tmp_path, monkeypatch,
                                                      capsys):
    monkeypatch.chdir(tmp_path)  # default outputs (runs/, checkpoints/) would land here
    monkeypatch.delenv("TORCHFPI_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    before = _tree(inputs)
    rc = main(_resolve(argv, inputs, tmp_path))
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == code, f"{name}: exit {rc}, expected {code}; stderr {err!r}"
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, f"{name}: expected one line on stderr, got {err!r}"
    assert err.startswith("torchfpi"), err
    assert re.search(message, err), f"{name}: {message!r} not in {err!r}"
    assert not (inputs / MARKER).exists(), f"{name}: the crafted pickle ran"
    assert _tree(tmp_path) == {}, f"{name}: wrote {sorted(_tree(tmp_path))}"
    assert _tree(inputs) == before, f"{name}: changed the input folder"


def test_the_crafted_file_would_run_code_on_a_plain_load(tmp_path):
    """The corpus's ``evil.pt`` is a real threat: ``weights_only=False`` runs its command."""
    import torch

    marker = tmp_path / "ran.marker"
    torch.save({"x": _Evil(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_corpus_is_large_and_unique():
    assert len(CASES) >= 150
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, code", [
    (["denoise", "@a.png", "--sigma", "25", "--out", "~o.png", "--weights", "@evil.pt"], RUNTIME),
    (["denoise", "@tiny.png", "--sigma", "25", "--out", "~o.png"], USAGE),
    (["train", "multilabel", "--train-arff", "@m1.arff", "--test-arff", "@m2.arff", "--out", "/proc/x/r.json",
      "--checkpoint-dir", "~ck"], USAGE),
])
def test_real_process_prints_one_line(argv, code, inputs, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHFPI_DATA"}
    proc = subprocess.run([sys.executable, "-m", "torchfpi", *_resolve(argv, inputs, tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (inputs / MARKER).exists()
    assert _tree(tmp_path) == {}


@pytest.mark.parametrize("script", ["run_flow.py", "run_denoise.py"])
def test_scripts_without_data_print_one_line(script, tmp_path):
    """The result scripts on a machine without their data set: one line naming what is missing."""
    root = tmp_path / "data"
    root.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "TORCHFPI_DATA"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / script),
                           "--data-root", str(root), "--out", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == RUNTIME, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"{script}: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
