"""Training under faults: SIGKILL then --resume, NaN/Inf guard, and a 2-process torchrun run of a
real ``torchfpi train`` command matching one process.

The runs are tiny (32x32 synthetic flow pairs, 3 sweeps per solve) and deterministic on CPU.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from torchfpi.apps._distributed import DistContext
from torchfpi.apps._trainer import CHECKPOINT_KEYS
from torchfpi.apps._training import (
    NonFiniteError,
    NonFiniteGuard,
    first_nonfinite,
    load_checkpoint,
    save_checkpoint,
)
from torchfpi.cli import main

TINY = ["train", "flow", "--procedural", "--size", "32", "--val-pairs", "2", "--max-iter", "3", "--quiet"]


@pytest.fixture(autouse=True)
def _restore_threads():
    """``train flow --threads 1`` sets torch's thread count of this process: put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def _timeless(history: list) -> list:
    """History records without their wall-clock entries (which differ between two equal runs)."""
    return [{k: v for k, v in h.items() if k not in ("elapsed", "seconds", "cpu_seconds")} for h in history]


def _history(run: Path) -> list:
    return _timeless(json.loads((run / "train.json").read_text())["history"])


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert a["scheduler"] == b["scheduler"]
    assert a["best"] == b["best"]


# ---------------------------------------------------------------- SIGKILL and --resume
def _run_until_checkpoint_then_sigkill(tmp_path, argv, checkpoint, poll=0.01):
    """Run ``python -m torchfpi *argv`` and SIGKILL it as soon as ``checkpoint`` exists."""
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torchfpi", *argv],
                                stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.time() + 60
        while not checkpoint.exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            assert time.time() < deadline, "no checkpoint within 60 s"
            time.sleep(poll)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path):
    args = [*TINY, "--batch-size", "1", "--steps", "10", "--val-every", "4", "--checkpoint-every", "1",
            "--seed", "3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0

    _run_until_checkpoint_then_sigkill(tmp_path, [*args, "--out", str(run)], run / "checkpoint.pt", 0.02)
    killed_at = _state(run)["step"]
    assert 1 <= killed_at < 10 and not (run / "train.json").exists()

    assert main([*args, "--out", str(run), "--resume"]) == 0
    assert _history(run) == _history(ref)
    _assert_same_state(_state(run), _state(ref))
    best_run = torch.load(run / "best.pt", weights_only=True)
    best_ref = torch.load(ref / "best.pt", weights_only=True)
    assert best_run["step"] == best_ref["step"]
    assert all(torch.equal(best_run["model"][k], best_ref["model"][k]) for k in best_ref["model"])


def test_resume_restores_every_rng_and_the_step(tmp_path):
    args = [*TINY, "--batch-size", "1", "--val-every", "2", "--seed", "1"]
    assert main([*args, "--steps", "2", "--out", str(tmp_path)]) == 0
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state) >= set(CHECKPOINT_KEYS)
    assert set(state["generators"]) == {"data"}
    assert set(state["rng"]) >= {"python", "torch", "numpy"}
    assert state["step"] == 2


# ---------------------------------------------------------------- NaN / Inf guard
def test_guard_skips_then_stops_after_consecutive_non_finite_steps():
    w = torch.nn.Parameter(torch.ones(3))
    logged = []
    guard = NonFiniteGuard("skip", max_consecutive=2, log=logged.append)
    (w * 2).sum().backward()
    assert guard.check((w * 2).sum(), [w], step=1) and w.grad is not None
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not guard.check(torch.tensor(1.0), [w], step=2)
    assert w.grad is None and guard.skipped == 1
    assert "step 2: a gradient holds NaN/Inf: step skipped" in logged[0]
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the loss is nan \(2 non-finite steps in a row\)"):
        guard.check(torch.tensor(float("nan")), [w], step=3)


def test_guard_stop_policy_and_bad_policy():
    with pytest.raises(NonFiniteError, match="step 7: the loss is inf; the last good checkpoint is kept"):
        NonFiniteGuard("stop").check(torch.tensor(float("inf")), [], step=7)
    from torchfpi.errors import UsageError

    with pytest.raises(UsageError, match="--on-nonfinite: expected one of"):
        NonFiniteGuard("ignore")


def test_checkpoint_with_nan_weights_never_replaces_a_good_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good = {"model": {"w": torch.ones(2)}, "optimizer": {}, "step": 1, "metrics": {"loss": 0.5}}
    assert save_checkpoint(good, path)
    before = path.read_bytes()
    bad = {"model": {"w": torch.tensor([1.0, float("nan")])}, "optimizer": {}, "step": 2}
    with pytest.raises(NonFiniteError, match="not writing checkpoint .*: model.w is NaN or Inf; the previous checkpoint is kept"):
        save_checkpoint(bad, path)
    with pytest.raises(NonFiniteError, match="metrics.loss"):
        save_checkpoint({**good, "metrics": {"loss": float("inf")}}, path)
    assert path.read_bytes() == before
    assert load_checkpoint(path)["step"] == 1
    assert not save_checkpoint(good, tmp_path / "other.pt", DistContext(rank=1, world_size=2))
    assert not (tmp_path / "other.pt").exists()
    assert first_nonfinite({"a": [1.0, torch.zeros(1, dtype=torch.int64)]}) is None


def _poison_epe(monkeypatch, module, at_call: int) -> None:
    """Make the ``at_call``-th training EPE of ``module.batch_epe`` NaN (validation untouched)."""
    real, calls = module.batch_epe, []

    def poisoned(flow, truth):
        out = real(flow, truth)
        if out.requires_grad:
            calls.append(1)
            if len(calls) == at_call:
                return out * float("nan")
        return out

    monkeypatch.setattr(module, "batch_epe", poisoned)


def _poison_training_loss(monkeypatch, at_call: int) -> None:
    """Make the ``at_call``-th training loss of the flow trainer NaN."""
    import torchfpi.apps.flow.train as flow_train

    _poison_epe(monkeypatch, flow_train, at_call)


def test_nan_loss_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch, capsys):
    _poison_training_loss(monkeypatch, at_call=2)
    argv = [*TINY, "--batch-size", "1", "--steps", "3", "--val-every", "3", "--checkpoint-every", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["skipped_steps"] == 1
    assert first_nonfinite(_state(tmp_path)["model"]) is None


def test_nan_loss_with_stop_policy_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_training_loss(monkeypatch, at_call=3)
    argv = [*TINY, "--batch-size", "1", "--steps", "5", "--val-every", "5", "--checkpoint-every", "1"]
    assert main([*argv, "--on-nonfinite", "stop", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("torchfpi: error: training stopped at step 3: the loss is nan; the last good checkpoint is "
                   "kept: lower --lr, or resume from it with --resume")
    state = _state(tmp_path)
    assert state["step"] == 2 and first_nonfinite(state["model"]) is None


# ---------------------------------------------------------------- torchrun, 2 gloo processes
def _torchrun(tmp_path: Path, nproc: int, argv: list) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "torchfpi", *argv]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_match_one_process(tmp_path):
    argv = [*TINY, "--batch-size", "2", "--steps", "3", "--val-every", "3", "--dtype", "float64"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = _torchrun(tmp_path, 2, [*argv, "--out", str(two)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*argv, "--out", str(one)]) == 0
    a, b = _state(two), _state(one)
    assert a["step"] == b["step"] == 3
    from torchfpi.apps.flow.models import VariationalFlow

    start = VariationalFlow().double().state_dict()
    for k in b["model"]:
        assert a["model"][k].dtype == torch.float64
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert max(float((b["model"][k] - start[k]).abs()) for k in start) > 1e-3  # it trained
    ha, hb = _history(two), _history(one)
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for x, y in zip(ha, hb):
        assert x["val_epe"] == pytest.approx(y["val_epe"], abs=1e-9)
    summary = json.loads((two / "train.json").read_text())
    assert summary["world_size"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_batch_not_divisible_is_a_usage_error(tmp_path):
    done = _torchrun(tmp_path, 2, [*TINY, "--batch-size", "3", "--steps", "1", "--out", str(tmp_path / "x")])
    assert done.returncode != 0
    assert "--batch-size 3 is not divisible by the 2 processes" in done.stderr
    # torchrun reports the failed children with its own traceback; none comes from torchfpi
    assert "torchfpi/" not in done.stderr


def _torchrun_killed_then_resumed(tmp_path, argv, checkpoint, state, steps):
    """Start 2 processes, SIGKILL them all once ``checkpoint`` exists, resume with 2 processes,
    then run 1 process uninterrupted; return both final states (``state(out_dir)``)."""
    two, one = tmp_path / "two", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "torchfpi", *argv, "--out", str(two)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 90
    while not (two / checkpoint).exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
    proc.wait(timeout=30)
    assert state(two)["step"] < steps
    done = _torchrun(tmp_path, 2, [*argv, "--out", str(two), "--resume"])
    assert done.returncode == 0, done.stderr
    assert main([*argv, "--out", str(one)]) == 0
    a, b = state(two), state(one)
    assert a["step"] == b["step"] == steps
    for k in b["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    return a, b


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_killed_then_resumed_ends_like_one_uninterrupted_process(tmp_path):
    argv = [*TINY, "--batch-size", "2", "--steps", "8", "--val-every", "4", "--checkpoint-every", "1",
            "--dtype", "float64"]
    _torchrun_killed_then_resumed(tmp_path, argv, "checkpoint.pt", _state, 8)


# ---------------------------------------------------------------- train multilabel
def _write_arff(path: Path, rows: int, seed: int, features: int = 6, labels: int = 3) -> None:
    """A sparse ARFF file whose labels depend on the features (so that training moves)."""
    import numpy as np

    rng = np.random.RandomState(seed)
    x = rng.rand(rows, features)
    y = (x[:, :labels] + 0.3 * rng.rand(rows, labels) > 0.65).astype(int)
    head = ["@relation t"] + [f"@attribute f{j} numeric" for j in range(features)]
    head += [f"@attribute y{k} {{0,1}}" for k in range(labels)] + ["@data"]
    body = ["{" + ",".join([f"{j} {v:.4f}" for j, v in enumerate(xr)]
                           + [f"{features + k} 1" for k, v in enumerate(yr) if v]) + "}" for xr, yr in zip(x, y)]
    path.write_text("\n".join(head + body) + "\n")
    xml = "".join(f'<label name="y{k}"></label>' for k in range(labels))
    path.with_suffix(".xml").write_text(f'<labels xmlns="http://mulan.sourceforge.net/labels">{xml}</labels>\n')


def _ml_args(tmp_path: Path, rows: int) -> list:
    train, test = tmp_path / "train.arff", tmp_path / "test.arff"
    if not train.exists():
        _write_arff(train, rows, 0)
        _write_arff(test, 40, 1)
    # fixed iteration counts (tol never reached) and no dropout: the same arithmetic whatever the
    # number of processes, so 1 and 2 processes agree to rounding
    return ["train", "multilabel", "--model", "fpi_gd", "--train-arff", str(train), "--test-arff", str(test),
            "--hidden", "8", "--energy-hidden", "4", "--max-iter", "3", "--tol", "1e-12",
            "--input-dropout", "0", "--hidden-dropout", "0", "--dtype", "float64", "--quiet"]


def _ml_state(ck: Path) -> dict:
    return torch.load(ck / "bibtex-fpi_gd-seed0.pt", weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_match_one_process_multilabel(tmp_path):
    # 54 training rows after the validation split: batches of 8 end with a short batch of 6
    argv = [*_ml_args(tmp_path, 60), "--batch-size", "8", "--epochs", "2", "--patience", "5", "--lr", "0.01"]
    done = _torchrun(tmp_path, 2, [*argv, "--checkpoint-dir", str(tmp_path / "two"), "--out",
                                   str(tmp_path / "two.json")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "one"), "--out", str(tmp_path / "one.json")]) == 0
    a, b = _ml_state(tmp_path / "two"), _ml_state(tmp_path / "one")
    assert a["step"] == b["step"] == 14 and a["epoch"] == b["epoch"] == 1
    for k in b["model"]:
        if b["model"][k].is_floating_point():
            assert a["model"][k].dtype == torch.float64
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    ra, rb = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert ra["world_size"] == 2 and rb["world_size"] == 1
    for x, y in zip(ra["history"], rb["history"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-9)
        assert x["val_f1"] == pytest.approx(y["val_f1"], abs=1e-9)
    assert ra["test_f1"] == pytest.approx(rb["test_f1"], abs=1e-9)
    assert rb["history"][1]["loss"] < rb["history"][0]["loss"]  # it trained


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_match_one_process_multilabel_with_pretraining(tmp_path):
    # epoch 0 trains the unary MLP alone (through its own DDP wrapper), epoch 1 the whole model
    argv = [*_ml_args(tmp_path, 60), "--batch-size", "8", "--epochs", "2", "--patience", "5", "--lr", "0.01",
            "--pretrain-epochs", "1"]
    done = _torchrun(tmp_path, 2, [*argv, "--checkpoint-dir", str(tmp_path / "two"), "--out",
                                   str(tmp_path / "two.json")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*argv, "--checkpoint-dir", str(tmp_path / "one"), "--out", str(tmp_path / "one.json")]) == 0
    a, b = _ml_state(tmp_path / "two"), _ml_state(tmp_path / "one")
    assert a["step"] == b["step"] == 14 and a["epoch"] == b["epoch"] == 1
    for k in b["model"]:
        if b["model"][k].is_floating_point():
            torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    ra, rb = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert [h["pretraining"] for h in ra["history"]] == [h["pretraining"] for h in rb["history"]] == [True, False]
    for x, y in zip(ra["history"], rb["history"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-9)
        assert x["val_f1"] == pytest.approx(y["val_f1"], abs=1e-9)
    assert ra["test_f1"] == pytest.approx(rb["test_f1"], abs=1e-9)
    assert rb["history"][1]["loss"] < rb["history"][0]["loss"]  # it trained


def test_multilabel_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    # --checkpoint-every 7: the kill usually lands inside an epoch (its shuffled order is checkpointed)
    argv = [*_ml_args(tmp_path, 1200), "--batch-size", "4", "--epochs", "3", "--patience", "10",
            "--threads", "1", "--checkpoint-every", "7"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run_until_checkpoint_then_sigkill(tmp_path, [*argv, "--checkpoint-dir", str(run)],
                                       run / "bibtex-fpi_gd-seed0.pt", 0.01)
    assert _ml_state(run)["epoch"] < 2  # killed mid-run
    assert main([*argv, "--checkpoint-dir", str(ref), "--out", str(tmp_path / "ref.json")]) == 0
    assert main([*argv, "--checkpoint-dir", str(run), "--resume", "--out", str(tmp_path / "run.json")]) == 0
    a, b = _ml_state(run), _ml_state(ref)
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    ra, rb = json.loads((tmp_path / "run.json").read_text()), json.loads((tmp_path / "ref.json").read_text())
    assert _timeless(ra["history"]) == _timeless(rb["history"])
    assert ra["test_f1"] == rb["test_f1"] and ra["best_epoch"] == rb["best_epoch"]


def test_multilabel_nan_loss_is_skipped_and_never_checkpointed(tmp_path, monkeypatch):
    import torchfpi.apps.multilabel.train as ml_train

    real, calls = ml_train.multilabel_loss, []

    def poisoned(z, y, f1_weight=0.0):
        calls.append(1)
        out = real(z, y, f1_weight)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(ml_train, "multilabel_loss", poisoned)
    argv = [*_ml_args(tmp_path, 60), "--batch-size", "16", "--epochs", "1", "--checkpoint-dir", str(tmp_path)]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["skipped_steps"] == 1
    assert first_nonfinite(_ml_state(tmp_path)["model"]) is None
    calls.clear()
    assert main([*argv, "--on-nonfinite", "stop", "--checkpoint-dir", str(tmp_path / "stop")]) == 1
    assert not (tmp_path / "stop" / "bibtex-fpi_gd-seed0.pt").exists()


def test_training_helpers_doctests():
    import doctest

    import torchfpi.apps._training as module

    assert doctest.testmod(module).failed == 0


# ---------------------------------------------------------------- train denoise
def _dn_args(tmp_path: Path, model: str = "unrolled") -> list:
    """``train denoise`` on a tiny Train400 (6 smooth 40x40 images, 2 for validation), 24x24 crops."""
    import numpy as np

    from torchfpi.data.images import write_grey_png

    d = tmp_path / "data" / "denoise" / "Train400"
    if not d.exists():
        d.mkdir(parents=True)
        yy, xx = np.mgrid[0:40, 0:40]
        for i in range(6):
            img = 128 + 60 * np.sin(xx / 5.0 + i) * np.cos(yy / 7.0) + 20 * (xx > 20) + 5 * i
            write_grey_png(d / f"img_{i:03d}.png", np.clip(img, 0, 255))
    # unrolled: a fixed number of steps; fpi_gd: the core solver freezes each converged sample,
    # so neither depends on how the batch is split across processes
    size = ["--unroll-steps", "3"] if model == "unrolled" else ["--tol", "1e-3", "--max-iter", "20"]
    return ["train", "denoise", "--data-root", str(tmp_path / "data"), "--model", model, *size,
            "--crop", "24", "--val-images", "2", "--lr", "0.01", "--quiet"]


def _dn_state(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("model", ["unrolled", "fpi_gd"])
def test_torchrun_two_processes_match_one_process_denoise(tmp_path, model):
    # batch 3 over 2 processes: shares of 2 and 1 crops, weighted to the global mean
    argv = [*_dn_args(tmp_path, model), "--batch-size", "3", "--steps", "3", "--val-every", "2", "--dtype", "float64"]
    done = _torchrun(tmp_path, 2, [*argv, "--checkpoint", str(tmp_path / "two" / "ck.pt")])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*argv, "--checkpoint", str(tmp_path / "one" / "ck.pt")]) == 0
    a, b = _dn_state(tmp_path / "two" / "ck.pt"), _dn_state(tmp_path / "one" / "ck.pt")
    assert a["step"] == b["step"] == 3 and a["world_size"] == 2 and b["world_size"] == 1
    for k in b["model"]:
        assert a["model"][k].dtype == torch.float64
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 2, 3]
    for x, y in zip(a["history"], b["history"]):
        assert x["val_psnr"] == pytest.approx(y["val_psnr"], abs=1e-3)  # rounded to 4 decimals
    assert b["history"][-1]["val_psnr"] != b["history"][0]["val_psnr"]  # it trained
    assert a["rejected"] == b["rejected"] == 0
    assert (tmp_path / "two" / f"denoise_{model}_s25.pt").exists()


def test_denoise_nan_loss_is_skipped_then_stop_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    import importlib

    dn_train = importlib.import_module("torchfpi.apps.denoise.train")

    real, calls = dn_train.DenoiseTask.batch, []

    def poisoned(self, step):
        clean, noisy = real(self, step)
        calls.append(1)
        return clean, noisy * float("nan") if len(calls) == 2 else noisy

    monkeypatch.setattr(dn_train.DenoiseTask, "batch", poisoned)
    argv = [*_dn_args(tmp_path), "--batch-size", "2", "--steps", "3", "--val-every", "1"]
    assert main([*argv, "--checkpoint", str(tmp_path / "skip" / "ck.pt")]) == 0
    state = _dn_state(tmp_path / "skip" / "ck.pt")
    assert state["step"] == 3 and state["skipped"] == 1
    assert first_nonfinite(state["model"]) is None and first_nonfinite(state["best_state"]) is None
    calls.clear()
    capsys.readouterr()
    assert main([*argv, "--on-nonfinite", "stop", "--checkpoint", str(tmp_path / "stop" / "ck.pt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("torchfpi: error: training stopped at step 2: the loss is nan; the last good checkpoint is "
                   "kept: lower --lr, or resume from it with --resume")
    assert _dn_state(tmp_path / "stop" / "ck.pt")["step"] == 1
    assert not (tmp_path / "stop" / "denoise_unrolled_s25.pt").exists()


def test_denoise_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    argv = [*_dn_args(tmp_path), "--batch-size", "2", "--steps", "60", "--val-every", "20", "--checkpoint-every", "1",
            "--threads", "1"]
    ref, run = tmp_path / "ref" / "ck.pt", tmp_path / "run" / "ck.pt"
    _run_until_checkpoint_then_sigkill(tmp_path, [*argv, "--checkpoint", str(run)], run, 0.005)
    assert 1 <= _dn_state(run)["step"] < 60  # killed mid-run
    assert main([*argv, "--checkpoint", str(ref)]) == 0
    assert main([*argv, "--checkpoint", str(run), "--resume"]) == 0
    a, b = _dn_state(run), _dn_state(ref)
    assert a["step"] == b["step"] == 60
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    assert all(torch.equal(a["best_state"][k], b["best_state"][k]) for k in b["best_state"])
    assert a["best"] == b["best"] and a["scheduler"] == b["scheduler"]
    assert _timeless(a["history"]) == _timeless(b["history"])


def test_denoise_resume_with_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"truncated")
    argv = [*_dn_args(tmp_path), "--batch-size", "2", "--steps", "1", "--checkpoint", str(ck), "--resume"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("delete it or train without --resume") and str(ck) in err


# ---------------------------------------------------------------- train flow --model fpi_nn
# 8 precomputed 32x32 pairs (procedural textures, the shipped fpi_gd base), 2 validation pairs
NN = ["train", "flow", "--model", "fpi_nn", "--procedural", "--size", "32", "--pairs", "8", "--val-pairs", "2",
      "--lr", "3e-3", "--quiet"]


def _nn_state(run: Path) -> dict:
    return torch.load(run / "checkpoint_nn.pt", weights_only=True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_match_one_process_fpi_nn(tmp_path):
    # the Jacobian penalty's probes are drawn for the global batch and sharded like the pairs;
    # the refinement's solver freezes each converged sample, so the split changes no arithmetic
    # 20 pairs: the fpi_gd flows of the data set come in chunks of 16 and 4, one per process
    argv = [*NN, "--pairs", "20", "--batch-size", "2", "--steps", "3", "--val-every", "2", "--dtype", "float64"]
    one, two = tmp_path / "one", tmp_path / "two"
    done = _torchrun(tmp_path, 2, [*argv, "--out", str(two)])
    assert done.returncode == 0, done.stdout + done.stderr
    assert main([*argv, "--out", str(one)]) == 0
    a, b = _nn_state(two), _nn_state(one)
    assert a["step"] == b["step"] == 3
    for k in b["model"]:
        assert a["model"][k].dtype == torch.float64
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=1e-6)
    assert float(b["model"]["net.6.weight"].abs().max()) > 1e-3  # it trained (the last layer starts at 0)
    ha, hb = a["history"], b["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == [0, 2, 3]
    for x, y in zip(ha, hb):
        assert x["val_epe"] == pytest.approx(y["val_epe"], abs=1e-9)
        assert (x.get("loss") or 0.0) == pytest.approx(y.get("loss") or 0.0, abs=1e-9)
    assert json.loads((two / "train_nn.json").read_text())["world_size"] == 2
    assert (two / "best_nn.pt").exists()


def test_fpi_nn_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    argv = [*NN, "--batch-size", "2", "--steps", "10", "--val-every", "4", "--checkpoint-every", "1", "--seed", "3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    _run_until_checkpoint_then_sigkill(tmp_path, [*argv, "--out", str(run)], run / "checkpoint_nn.pt", 0.005)
    assert 1 <= _nn_state(run)["step"] < 10 and not (run / "train_nn.json").exists()
    assert main([*argv, "--out", str(ref)]) == 0
    assert main([*argv, "--out", str(run), "--resume"]) == 0
    a, b = _nn_state(run), _nn_state(ref)
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in b["model"])
    for (ka, sa), (kb, sb) in zip(a["optimizer"]["state"].items(), b["optimizer"]["state"].items()):
        assert ka == kb and all(torch.equal(sa[n], sb[n]) for n in sa)
    assert all(torch.equal(a["generators"][k], b["generators"][k]) for k in ("data", "noise"))
    assert _timeless(a["history"]) == _timeless(b["history"]) and a["best"] == b["best"]
    ja, jb = (json.loads((d / "train_nn.json").read_text()) for d in (run, ref))
    assert _timeless(ja["history"]) == _timeless(jb["history"]) and ja["best"] == jb["best"]
    wa, wb = (torch.load(d / "best_nn.pt", weights_only=True) for d in (run, ref))
    assert wa["step"] == wb["step"] and all(torch.equal(wa["update"][k], wb["update"][k]) for k in wb["update"])


def _poison_refine_loss(monkeypatch, at_call: int) -> None:
    """Make the ``at_call``-th training EPE of ``fpi_nn`` NaN."""
    import torchfpi.apps.flow.train as flow_train  # both trainers live there

    _poison_epe(monkeypatch, flow_train, at_call)


def test_fpi_nn_nan_loss_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    _poison_refine_loss(monkeypatch, at_call=2)
    argv = [*NN, "--batch-size", "2", "--steps", "3", "--val-every", "3", "--checkpoint-every", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "train_nn.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["world_size"] == 1
    state = _nn_state(tmp_path)
    assert state["step"] == 3 and first_nonfinite(state["model"]) is None
    assert first_nonfinite(state["optimizer"]) is None and math.isfinite(state["history"][-1]["loss"])


def test_fpi_nn_nan_loss_with_stop_policy_exits_1_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    _poison_refine_loss(monkeypatch, at_call=3)
    argv = [*NN, "--batch-size", "2", "--steps", "5", "--val-every", "5", "--checkpoint-every", "1"]
    assert main([*argv, "--on-nonfinite", "stop", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("torchfpi: error: training stopped at step 3: the loss is nan; the last good checkpoint is "
                   "kept: lower --lr, or resume from it with --resume")
    state = _nn_state(tmp_path)
    assert state["step"] == 2 and first_nonfinite(state["model"]) is None
    assert not (tmp_path / "train_nn.json").exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_fpi_nn_killed_then_resumed_ends_like_one_uninterrupted_process(tmp_path):
    argv = [*NN, "--batch-size", "2", "--steps", "10", "--val-every", "4", "--checkpoint-every", "1",
            "--dtype", "float64"]
    a, b = _torchrun_killed_then_resumed(tmp_path, argv, "checkpoint_nn.pt", _nn_state, 10)
    assert [h["step"] for h in a["history"]] == [h["step"] for h in b["history"]] == [0, 4, 8, 10]
    for x, y in zip(a["history"], b["history"]):
        assert x["val_epe"] == pytest.approx(y["val_epe"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_fewer_validation_pairs_than_processes_is_a_usage_error(tmp_path):
    done = _torchrun(tmp_path, 2, [*NN, "--val-pairs", "1", "--batch-size", "2", "--steps", "1",
                                   "--out", str(tmp_path / "x")])
    assert done.returncode != 0
    assert "--val-pairs 1 is smaller than the 2 processes" in done.stderr
    assert "torchfpi/" not in done.stderr
