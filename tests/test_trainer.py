"""The one training loop (``torchfpi.apps._trainer``) on a tiny task: resume, the non-finite policy
for a NaN met inside the forward solve, checkpoints every N steps, early stopping, records."""

from __future__ import annotations

import doctest
import importlib
import json

import pytest
import torch

import torchfpi
from torchfpi.apps._trainer import (
    CHECKPOINT_KEYS,
    ShuffledBatches,
    StepResult,
    Task,
    Trainer,
    format_record,
)
from torchfpi.apps._training import NonFiniteError
from torchfpi.errors import FixedPointError, UsageError


class _Regression(Task):
    """A fixed-point layer ``z = 0.5 tanh(W z) + x`` regressed on seeded random batches."""

    app = "tiny"
    metric = "val_loss"
    mode = "min"

    def __init__(self, fail_at=(), nan_at=(), crash_at=None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = torchfpi.FPINN(torchfpi.MLPUpdate(3, 3, hidden=4, activation="tanh", spectral_norm=False),
                                    tol=1e-10, max_iter=200).double()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        self.generators = {"data": gen}
        self.x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        self.y = torch.tanh(self.x)
        self.sampler = ShuffledBatches(32, 8, gen)
        self.fail_at, self.nan_at, self.crash_at = set(fail_at), set(nan_at), crash_at
        self.config = {"lr": 0.1, "steps": None}

    def train_step(self, net, step):
        if step == self.crash_at:
            raise RuntimeError("killed")
        if step in self.fail_at:
            raise FixedPointError("the forward solve met NaN at iteration 3")
        idx = self.sampler.next()
        loss = ((net(self.x[idx]) - self.y[idx]) ** 2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        return StepResult(loss, {"loss": float(loss.detach())})

    def evaluate(self):
        with torch.no_grad():
            return {"val_loss": float(((self.model(self.x[32:]) - self.y[32:]) ** 2).mean())}

    def state_dict(self):
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state):
        self.sampler.load_state_dict(state["sampler"])


def _fit(task, **kw):
    kw.setdefault("steps", 10)
    kw.setdefault("val_every", 4)
    return Trainer(task, log=None, **kw).fit()


def _timeless(history):
    return [{k: v for k, v in h.items() if k not in ("elapsed", "seconds", "cpu_seconds")} for h in history]


def test_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(tmp_path):
    ref = _fit(_Regression())
    ck = tmp_path / "ck.pt"
    with pytest.raises(RuntimeError, match="killed"):  # dies inside the second epoch, after step 6
        _fit(_Regression(crash_at=6), checkpoint=ck, checkpoint_every=3)
    state = torch.load(ck, weights_only=True)
    assert set(state) == set(CHECKPOINT_KEYS) and state["step"] == 6 and state["task"]["sampler"]["position"] == 16
    run = _fit(_Regression(), checkpoint=ck, resume=True)
    assert run.step == ref.step == 10
    assert all(torch.equal(a, b) for a, b in zip(run.task.model.state_dict().values(),
                                                 ref.task.model.state_dict().values()))
    assert _timeless(run.history) == _timeless(ref.history)
    assert run.best == ref.best
    lines = ck.with_suffix(".jsonl").read_text().splitlines()  # the JSON-lines log
    assert [json.loads(line)["step"] for line in lines] == [0, 4, 8, 10]


def test_a_failed_forward_solve_is_skipped_or_stops_like_a_nan_loss(tmp_path):
    skipped = _fit(_Regression(fail_at={2}, nan_at={5}))
    assert skipped.guard.skipped == 2 and skipped.step == 10
    logged = []
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the forward solve failed "
                                             r"\(FixedPointError: the forward solve met NaN"):
        Trainer(_Regression(fail_at={2}), steps=10, val_every=4, on_nonfinite="stop", log=logged.append,
                checkpoint=tmp_path / "ck.pt", checkpoint_every=1).fit()
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["step"] == 2  # the last good checkpoint


def test_patience_stops_after_evaluations_without_improvement():
    task = _Regression()
    task.optimizer = torch.optim.SGD(task.model.parameters(), lr=0.0)  # nothing improves
    run = _fit(task, steps=100, val_every=2, patience=3)
    assert run.step == 6 and run.best["step"] == 0


def test_resume_with_other_options_is_refused(tmp_path):
    ck = tmp_path / "ck.pt"
    _fit(_Regression(), steps=2, checkpoint=ck)
    task = _Regression()
    task.config["lr"] = 0.2
    with pytest.raises(UsageError, match=r"--resume: .* was written with other options \(--lr 0.1, this run has 0.2\)"):
        _fit(task, checkpoint=ck, resume=True)


def test_bad_schedule_values_are_usage_errors():
    with pytest.raises(UsageError, match="--checkpoint-every"):
        Trainer(_Regression(), steps=2, val_every=1, checkpoint_every=-1)
    with pytest.raises(UsageError, match="--val-every"):
        Trainer(_Regression(), steps=2, val_every=0)


def test_records_are_readable_lines():
    assert format_record({"step": 3, "train_iterations": 10.708333333333334, "val_psnr": 28.31234}) == (
        "step 3 | train_iterations 10.71 | val_psnr 28.31")


@pytest.mark.parametrize("name", ["torchfpi.apps._trainer", "torchfpi.apps.multilabel.metrics",
                                  "torchfpi.apps.denoise.train", "torchfpi.apps.flow.api", "torchfpi.cli._progress"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    assert doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE).failed == 0
