"""Files in and out: no code runs from a file, weights say what they are for, outputs are atomic,
get the user's umask and leave no temporary file behind, and ``--resume`` says what it did."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from torchfpi.cli import main
from torchfpi.errors import DataError, UsageError
from torchfpi.io import atomic_write_bytes, atomic_write_json, remove_stale_temp_files, safe_load

WEIGHTS = Path(__file__).resolve().parents[1] / "torchfpi" / "weights"
TINY_FLOW = ["train", "flow", "--procedural", "--size", "32", "--batch-size", "1", "--val-pairs", "1",
             "--steps", "1", "--max-iter", "2"]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture
def evil(tmp_path):
    """A torch file whose pickle runs a command on a plain load; returns (file, marker)."""
    marker = tmp_path / "ran.marker"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "optimizer": {}, "step": 1, "state_dict": {}, "kind": "fpi_gd", "config": {},
                "x": _Evil(marker)}, path)
    return path, marker


# ------------------------------------------------------------ every loader refuses a crafted pickle
def test_every_library_loader_refuses_a_crafted_pickle(evil):
    from torchfpi.apps._training import load_checkpoint
    from torchfpi.apps.denoise import load_denoiser
    from torchfpi.apps.flow.api import load_refined, load_weights

    path, marker = evil
    loaders = [lambda: safe_load(path), lambda: load_checkpoint(path), lambda: load_denoiser("fpi_gd", 25, path),
               lambda: load_weights(path), lambda: load_refined(path)]
    for load in loaders:
        with pytest.raises(DataError, match="refused unread, since loading them could run code"):
            load()
    assert not marker.exists()


def test_memory_measurement_refuses_a_crafted_pickle(evil):
    from torchfpi.apps.denoise.memory import _child

    path, marker = evil
    with pytest.raises(DataError, match="refused unread"):
        _child({"kind": "fpi_gd", "iterations": 1, "batch_size": 1, "crop": 8, "weights": str(path)})
    assert not marker.exists()


def test_multilabel_resume_refuses_a_crafted_checkpoint(tmp_path, monkeypatch):
    from torchfpi.apps.multilabel import TrainConfig, make_splits, train_multilabel
    from torchfpi.apps.multilabel.recipes import model_config
    from torchfpi.data import load_embedded_bibtex

    splits = make_splits(load_embedded_bibtex("train"), load_embedded_bibtex("test"))
    cut = lambda t: t[:64]  # noqa: E731
    splits.x_train, splits.y_train = cut(splits.x_train), cut(splits.y_train)
    cfg = TrainConfig(model="mlp", epochs=2, batch_size=32, model_cfg=model_config("mlp", hidden=8))
    ck = tmp_path / "ck.pt"
    train_multilabel(cfg, splits, checkpoint=ck, log=lambda m: None, max_steps=2)  # epoch 0 only
    marker = tmp_path / "ran.marker"
    # the best weights live in the checkpoint (one file, one format): a crafted one is refused unread
    torch.save({**torch.load(ck, weights_only=True), "best_state": {"w": _Evil(marker)}}, ck)
    with pytest.raises(DataError, match="checkpoint .*refused unread.*delete it or train without --resume"):
        train_multilabel(cfg, splits, checkpoint=ck, resume=True, log=lambda m: None)
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    """A checkpoint (RNG states included) loads with weights_only=True and restores numpy's state."""
    from torchfpi.runtime import rng_state, set_rng_state

    np.random.seed(5)
    np.random.rand(3)
    state = rng_state()
    atomic_write_bytes(tmp_path / "s.pt", b"")  # the folder exists
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = np.random.rand(4)
    set_rng_state(safe_load(tmp_path / "s.pt")["rng"])
    assert np.array_equal(np.random.rand(4), expected)


@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"), (b"hello", "not written by torch.save"),
    (None, "cannot read it"),  # a zip of torch.save, cut short
])
def test_safe_load_names_what_is_wrong(tmp_path, content, message):
    path = tmp_path / "f.pt"
    if content is None:
        torch.save({"a": torch.ones(100)}, path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        safe_load(path, "checkpoint")
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "none.pt")
    with pytest.raises(DataError, match="is a directory"):
        safe_load(tmp_path)


# ------------------------------------------------------------ weights carry what they are for
@pytest.mark.parametrize("name, app, kind, sigma", [
    ("denoise_fpi_gd_s15.pt", "denoise", "fpi_gd", 15.0), ("denoise_fpi_gd_s25.pt", "denoise", "fpi_gd", 25.0),
    ("denoise_fpi_gd_s50.pt", "denoise", "fpi_gd", 50.0), ("denoise_unrolled_s25.pt", "denoise", "unrolled", 25.0),
    ("denoise_fpi_nn_s25.pt", "denoise", "fpi_nn", 25.0), ("flow_fpi_gd.pt", "flow", "fpi_gd", None),
    ("flow_fpi_nn.pt", "flow", "fpi_nn", None),
])
def test_shipped_weights_carry_their_metadata(name, app, kind, sigma):
    blob = safe_load(WEIGHTS / name)
    meta = blob["meta"]
    assert meta["format"] == "torchfpi-weights" and meta["format_version"] == 1
    assert (meta["app"], meta["kind"], meta.get("sigma")) == (app, kind, sigma)
    assert meta["architecture"] and meta["data"]
    if app == "denoise":
        assert meta["architecture"] == blob["config"]
    assert (WEIGHTS / name).stat().st_size < 60_000


def test_trained_weights_carry_their_metadata(tmp_path):
    from torchfpi.apps.denoise import DEFAULT_CONFIGS, build_model, save_weights
    from torchfpi.apps.flow.api import load_weights
    from torchfpi.apps.flow.api import save_weights as save_flow
    from torchfpi.apps.flow.models import VariationalFlow

    cfg = DEFAULT_CONFIGS["unrolled"]
    model = build_model("unrolled", cfg)
    save_weights({"kind": "unrolled", "sigma": 15.0, "config": cfg, "state_dict": model.state_dict(),
                  "train": {}}, tmp_path / "w.pt")
    meta = safe_load(tmp_path / "w.pt")["meta"]
    assert (meta["app"], meta["kind"], meta["sigma"]) == ("denoise", "unrolled", 15.0)
    assert meta["architecture"]["energy"]["n_filters"] == cfg["energy"]["n_filters"]
    save_flow(VariationalFlow(), tmp_path / "f.pt", procedural=True)
    meta = safe_load(tmp_path / "f.pt")["meta"]
    assert (meta["app"], meta["kind"]) == ("flow", "fpi_gd") and "procedural" in meta["data"]
    load_weights(tmp_path / "f.pt")


def _noisy_png(path: Path) -> None:
    from PIL import Image

    img = (np.random.RandomState(0).rand(24, 24) * 255).astype(np.uint8)
    Image.fromarray(img).save(path)


def test_denoise_refuses_weights_of_another_model(tmp_path, capsys):
    _noisy_png(tmp_path / "in.png")
    rc = main(["denoise", str(tmp_path / "in.png"), "--sigma", "25", "--out", str(tmp_path / "o.png"),
               "--model", "fpi_gd", "--weights", str(WEIGHTS / "denoise_unrolled_s25.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "holds unrolled weights, not fpi_gd: pass --model unrolled" in err
    assert not (tmp_path / "o.png").exists()


@pytest.mark.filterwarnings("default::UserWarning")
def test_denoise_warns_in_one_line_when_sigma_differs_from_the_weights(tmp_path, capsys):
    _noisy_png(tmp_path / "in.png")
    rc = main(["denoise", str(tmp_path / "in.png"), "--sigma", "25", "--out", str(tmp_path / "o.png"),
               "--weights", str(WEIGHTS / "denoise_fpi_gd_s15.pt"), "--max-iter", "3", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 0
    assert err.startswith("torchfpi: warning: --sigma 25: the weights") and "trained for sigma 15" in err
    assert len(err.splitlines()) == 1


def test_load_denoiser_warning_points_at_the_caller(tmp_path):
    from torchfpi.apps.denoise import load_denoiser

    with pytest.warns(UserWarning, match="trained for sigma 15") as rec:
        load_denoiser("fpi_gd", 25, WEIGHTS / "denoise_fpi_gd_s15.pt")
    assert rec[0].filename == __file__


# ------------------------------------------------------------ outputs: atomic, umask, no leftovers
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_writes_get_the_users_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_json({"a": 1}, tmp_path / "r.json")
        plain = tmp_path / "plain"
        plain.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask == plain.stat().st_mode & 0o777
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "r.json"]


def test_stale_temp_files_are_removed_and_live_ones_kept(tmp_path):
    dead = tmp_path / ".checkpoint.pt.999999999.abc123de.tmp"  # no such process
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.abc123de.tmp"
    old = tmp_path / ".best.pt.k2j4h5g6.tmp"  # torchfpi 0.1's name, an hour old
    young = tmp_path / ".best.pt.a1b2c3d4.tmp"
    other = tmp_path / "notes.tmp"
    for p in (dead, live, old, young, other):
        p.write_bytes(b"x")
    os.utime(old, (os.path.getmtime(old) - 3600,) * 2)
    assert sorted(remove_stale_temp_files(tmp_path)) == sorted([dead, old])
    assert live.exists() and young.exists() and other.exists()
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_training_cleans_its_folder_and_says_it_starts_fresh(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.999999999.zz11yy22.tmp"
    stale.write_bytes(b"x" * 1000)
    assert main([*TINY_FLOW, "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert not stale.exists()
    assert f"--resume: no checkpoint at '{out / 'checkpoint.pt'}': starting a fresh run" in text
    assert "textures: procedural noise (no data set)" in text and "(procedural noise textures)" in text
    summary = json.loads((out / "train.json").read_text())
    assert summary["procedural"] is True and summary["textures"] == "procedural"
    assert safe_load(out / "best.pt")["meta"]["data"].startswith("synthetic pairs on procedural")
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("train.json", "best.pt", "checkpoint.pt"):  # the user's umask, not mkstemp's 0600
        assert (out / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    assert main([*TINY_FLOW, "--steps", "2", "--out", str(out), "--resume"]) == 0
    assert f"--resume: resumed from '{out / 'checkpoint.pt'}' at step 1 of 2" in capsys.readouterr().out
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_denoise_output_is_atomic_and_complete(tmp_path, capsys):
    from PIL import Image

    _noisy_png(tmp_path / "in.png")
    old = os.umask(0o027)
    try:
        rc = main(["denoise", str(tmp_path / "in.png"), "--sigma", "25", "--out", str(tmp_path / "sub" / "o.png"),
                   "--quiet", "--max-iter", "3"])
    finally:
        os.umask(old)
    assert rc == 0
    out = tmp_path / "sub" / "o.png"
    assert out.stat().st_mode & 0o777 == 0o640
    with Image.open(out) as im:
        assert im.size == (24, 24) and im.mode == "L"
    assert [p.name for p in out.parent.iterdir()] == ["o.png"]


def test_train_denoise_checks_filters_before_looking_for_data(tmp_path, monkeypatch, capsys):
    """A fresh machine without data: a bad --filters is still a usage error (issue 13)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHFPI_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["train", "denoise", "--filters", "30"]) == 2
    assert "--filters: at most 24 filters of size 5, got 30" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_usage_error_type_is_a_value_error():
    assert issubclass(UsageError, ValueError)


def test_a_warning_made_an_error_is_one_line(tmp_path, capsys):
    """Under the test suite's filters (warnings are errors) the sigma warning stops the command."""
    _noisy_png(tmp_path / "in.png")
    rc = main(["denoise", str(tmp_path / "in.png"), "--sigma", "25", "--out", str(tmp_path / "o.png"),
               "--weights", str(WEIGHTS / "denoise_fpi_gd_s15.pt")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "trained for sigma 15" in err and "raised as an error by the warning filters" in err
    assert not (tmp_path / "o.png").exists()


def test_a_checkpoint_with_numpy_rng_state_of_version_0_1_still_resumes(tmp_path):
    """torchfpi 0.1 stored numpy's random state as an array: plain numeric arrays are accepted in a
    checkpoint (object arrays, or any other class, still are not)."""
    from torchfpi.apps._training import load_checkpoint
    from torchfpi.runtime import set_rng_state

    np.random.seed(11)
    state = {"model": {}, "optimizer": {}, "step": 2,
             "rng": {"python": __import__("random").getstate(), "torch": torch.get_rng_state(),
                     "numpy": np.random.get_state()}}
    torch.save(state, tmp_path / "old.pt")
    expected = np.random.rand(3)
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"])
    assert np.array_equal(np.random.rand(3), expected)
    torch.save({**state, "extra": np.array([{"a": 1}], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(DataError, match="refused unread"):
        load_checkpoint(tmp_path / "objects.pt")
