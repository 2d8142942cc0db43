"""The one training loop of the ``torchfpi train`` commands.

An application describes its run as a :class:`Task` (its model, optimiser, data, one training
step and one evaluation); :class:`Trainer` does everything else, the same way for every command:

- the loop over optimiser steps, with a tqdm bar and readable log lines (rounded numbers) plus a
  JSON-lines log of every record (``<checkpoint>.jsonl``);
- evaluation every ``val_every`` steps (or at the end of every epoch), keeping the best state by
  the task's metric, optional early stopping (``patience`` evaluations without improvement);
- atomic checkpoints in ONE format (:data:`CHECKPOINT_KEYS`) at each evaluation and every
  ``checkpoint_every`` steps, so that a kill loses at most that many steps; ``resume`` restores
  the model, optimiser, scheduler, every RNG (global and the task's own generators), the
  sampler's position in its epoch, the step, the history and the best state: the continued run is
  bit-identical to an uninterrupted one (CPU);
- the non-finite policy (``on_nonfinite``): a NaN/Inf loss or gradient, a
  :class:`~torchfpi.FixedPointError` or a ``FloatingPointError`` raised inside the forward solve
  skips the step or stops the run, the decision taken by every process together;
- data parallelism under ``torchrun`` (:mod:`torchfpi.apps._distributed`): the model is wrapped in
  DDP after loading, evaluation statistics are reduced, only rank 0 logs and writes.

Why not Lightning Fabric or accelerate: both would bring checkpointing and DDP, but neither
restores the position of a seeded data order inside an epoch nor the extra generators the
applications draw from (synthetic pairs, Hutchinson probes, noise), which the bit-identical
resume guarantee needs; they would add a dependency and a second way of launching to a library
whose core needs only torch; and the parts they would replace here (DDP wrapping, rank-0 writes,
reductions) are the ~150 lines of :mod:`torchfpi.apps._distributed`. So the loop is our own.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from torchfpi.apps._distributed import DistContext, wrap
from torchfpi.apps._training import (
    NonFiniteGuard,
    describe_exception,
    first_nonfinite,
    load_checkpoint,
    restoring,
    save_checkpoint,
)
from torchfpi.errors import DataError, FixedPointError, UsageError
from torchfpi.io import remove_stale_temp_files
from torchfpi.runtime import rng_state, set_rng_state

#: The entries of every training checkpoint, whatever the command.
CHECKPOINT_KEYS = ("app", "config", "step", "epoch", "model", "optimizer", "scheduler", "rng", "generators",
                   "task", "running", "history", "best", "best_state", "skipped", "rejected", "elapsed", "world_size",
                   "metrics")


def format_record(record: Mapping[str, Any], digits: int = 4) -> str:
    """One readable log line of a history record: ``key value`` pairs, floats rounded.

    Example:
        >>> format_record({"step": 3, "loss": 0.123456, "iterations": 10.708333333333334, "note": None})
        'step 3 | loss 0.1235 | iterations 10.71'
    """
    parts = []
    for key, value in record.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, float):
            text = f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
        else:
            text = str(value)
        parts.append(f"{key} {text}")
    return " | ".join(parts)


class ShuffledBatches(torch.utils.data.Sampler):
    """Seeded batches of indices ``0..n-1``: a new permutation at each epoch, drawn from ``generator``.

    Its state (the current permutation and the position in it) goes into every checkpoint, so a
    run resumed in the middle of an epoch sees the same batches as an uninterrupted one.

    Example:
        >>> s = ShuffledBatches(5, 2, torch.Generator().manual_seed(0))
        >>> [len(s.next()) for _ in range(4)], s.epoch
        ([2, 2, 1, 2], 1)
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        self.n, self.batch_size, self.generator = n, batch_size, generator
        self.perm: Optional[Tensor] = None
        self.position = 0
        self.epoch = -1

    @property
    def batches_per_epoch(self) -> int:
        """``ceil(n / batch_size)``."""
        return -(-self.n // self.batch_size)

    def next(self) -> Tensor:
        """The next batch of indices (a new epoch starts with a new permutation)."""
        if self.perm is None or self.position >= self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.position, self.epoch = 0, self.epoch + 1
        idx = self.perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return idx

    def __iter__(self) -> Iterator[List[int]]:
        """Batches without end, for ``DataLoader(dataset, batch_sampler=self)``."""
        while True:
            yield self.next().tolist()

    def state_dict(self) -> Dict[str, Any]:
        return {"perm": self.perm, "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.perm, self.position, self.epoch = state["perm"], int(state["position"]), int(state["epoch"])


@dataclass
class StepResult:
    """What a task's training step returns.

    Attributes:
        loss: the scalar to differentiate (in a data-parallel run, scaled so that DDP's gradient
            average is the gradient of the global-batch mean).
        stats: numbers to average until the next record (e.g. ``{"loss": ..., "iterations": ...}``);
            the same keys on every process.
        accept: False when the update would be harmful although finite (e.g. an unconverged solve):
            the step is counted in ``rejected`` and not applied.
    """

    loss: Tensor
    stats: Dict[str, float] = field(default_factory=dict)
    accept: bool = True


class Task:
    """What an application supplies to :class:`Trainer`: override the methods marked so.

    Attributes:
        app: the command's name, stored in checkpoints (a checkpoint of another command is refused).
        model: the module whose state is trained and checkpointed.
        optimizer, scheduler: the optimiser (and an optional learning-rate scheduler).
        generators: the task's own random generators, checkpointed by name.
        metric, mode: the evaluation entry that selects the best state, ``"min"`` or ``"max"``.
        config: JSON-able options that must be the same on resume (except :attr:`may_change`).
    """

    app = "task"
    metric = "val_loss"
    mode = "min"
    may_change: Sequence[str] = ("steps", "epochs", "checkpoint_every", "val_every", "budget_minutes", "threads")

    def __init__(self) -> None:
        self.model: nn.Module = nn.Identity()
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler: Any = None
        self.generators: Dict[str, torch.Generator] = {}
        self.config: Dict[str, Any] = {}

    def forward_module(self) -> nn.Module:
        """The module that the training step calls (wrapped in DDP by the trainer); default ``model``."""
        return self.model

    def parameters(self) -> List[nn.Parameter]:
        """The trained parameters (default: those of ``model`` that require gradients)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_step(self, net: nn.Module, step: int) -> StepResult:  # pragma: no cover - abstract
        """Draw the next batch and compute the loss with ``net`` (override)."""
        raise NotImplementedError

    def evaluate(self) -> Dict[str, Any]:  # pragma: no cover - abstract
        """Validation metrics, the same on every process (override; must contain :attr:`metric`)."""
        raise NotImplementedError

    def begin(self, resumed: bool) -> None:
        """Called once the checkpoint (if any) is loaded, before the first evaluation and step."""

    def after_step(self, out: StepResult) -> None:
        """Called after the backward pass (add to ``out.stats`` what it told; may set ``out.accept``)."""

    def before_update(self) -> None:
        """Called between a good backward and ``optimizer.step()`` (e.g. gradient clipping)."""

    def on_best(self, record: Dict[str, Any]) -> None:
        """Called on every process when the state became the best so far (e.g. export weights)."""

    def state_dict(self) -> Dict[str, Any]:
        """Extra state of the task for checkpoints (sampler position, calibration, ...)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (raise UsageError for a run that cannot continue)."""


class Trainer:
    """Run a :class:`Task` (see the module documentation for everything it takes care of).

    Args:
        task: the application's model, data, step and metric.
        steps: total optimiser steps.
        val_every: steps between evaluations (the last step is always evaluated).
        checkpoint: the checkpoint file (None: none written).
        checkpoint_every: steps between checkpoints besides those at each evaluation (0: only
            there); a SIGKILL loses at most this many steps.
        resume: continue from ``checkpoint`` if it exists.
        ctx: data-parallel context (None: one process).
        on_nonfinite: ``"skip"`` or ``"stop"`` (see :class:`~torchfpi.apps._training.NonFiniteGuard`).
        log: where readable lines go (rank 0 only); ``None`` for silence.
        progress: show a tqdm bar on a terminal.
        evaluate_first: evaluate before the first step (the starting point is a candidate too).
        patience: stop after this many evaluations without a better metric (None: never).
        budget_s: stop once this many seconds of training were spent (over resumes).
        steps_per_epoch: for epoch-based runs: the records carry the epoch number.
        record_extra: adds entries to each record (e.g. ``{"pretraining": True}``).
        log_prefix: the start of every log line.
    """

    def __init__(self, task: Task, *, steps: int, val_every: int, checkpoint: Optional[Path] = None,
                 checkpoint_every: int = 0, resume: bool = False, ctx: Optional[DistContext] = None,
                 on_nonfinite: str = "skip", log: Optional[Callable[[str], None]] = print, progress: bool = False,
                 evaluate_first: bool = True, patience: Optional[int] = None, budget_s: Optional[float] = None,
                 steps_per_epoch: Optional[int] = None,
                 record_extra: Optional[Callable[[int], Dict[str, Any]]] = None, log_prefix: str = "") -> None:
        for name, value in (("--steps", steps), ("--val-every", val_every)):
            if value < 1:
                raise UsageError(f"{name}: expected a positive integer, got {value}")
        if checkpoint_every < 0:
            raise UsageError(f"--checkpoint-every: expected >= 0 (0: at each validation), got {checkpoint_every}")
        self.task, self.steps, self.val_every = task, steps, val_every
        self.checkpoint, self.checkpoint_every, self.resume = checkpoint, checkpoint_every, resume
        self.ctx = ctx or DistContext()
        self.log = log if (log is not None and self.ctx.is_main) else (lambda msg: None)
        self.progress = progress and self.ctx.is_main
        self.evaluate_first, self.patience, self.budget_s = evaluate_first, patience, budget_s
        self.steps_per_epoch, self.record_extra, self.log_prefix = steps_per_epoch, record_extra, log_prefix
        self.guard = NonFiniteGuard(on_nonfinite, ctx=self.ctx, log=self.log)
        self.step = 0
        self.elapsed = 0.0
        self.history: List[Dict[str, Any]] = []
        self.best: Dict[str, Any] = {}
        self.best_state: Optional[Dict[str, Tensor]] = None
        self.rejected = 0
        self.resumed = False
        self._since: Dict[str, List[float]] = {}

    # ------------------------------------------------------------------ checkpoints
    def _state(self) -> Dict[str, Any]:
        t = self.task
        last = self.history[-1] if self.history else {}
        metrics = {k: v for k, v in last.items() if isinstance(v, float) and math.isfinite(v)}
        return {
            "app": t.app, "config": t.config, "step": self.step, "epoch": self._epoch(self.step),
            "model": t.model.state_dict(), "optimizer": t.optimizer.state_dict() if t.optimizer else None,
            "scheduler": t.scheduler.state_dict() if t.scheduler is not None else None,
            "rng": rng_state(), "generators": {k: g.get_state() for k, g in t.generators.items()},
            "task": t.state_dict(), "running": self._since, "history": self.history, "best": self.best, "best_state": self.best_state,
            "skipped": self.guard.skipped, "rejected": self.rejected, "elapsed": self.elapsed,
            "world_size": self.ctx.world_size, "metrics": metrics,
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0, atomically, only when finite)."""
        if self.checkpoint is not None:
            save_checkpoint(self._state(), self.checkpoint, self.ctx,
                            check=("model", "optimizer", "best_state", "metrics"))

    def _found(self) -> bool:
        ck = self.checkpoint
        found = bool(self.resume and ck is not None and ck.exists())
        if self.resume and self.ctx.distributed:
            seen = int(self.ctx.all_reduce_sum(torch.tensor([float(found)], dtype=torch.float64)))
            if 0 < seen < self.ctx.world_size:
                raise DataError(f"--resume: '{ck}' exists for {seen} of {self.ctx.world_size} processes: put "
                                "the checkpoint on a file system every machine sees, or copy it")
        return found

    def restore(self) -> bool:
        """Load the checkpoint when resuming; True when a run was continued."""
        if not self._found() or self.checkpoint is None:
            if self.resume:
                self.log(f"--resume: no checkpoint at '{self.checkpoint}': starting a fresh run")
            return False
        path, t = self.checkpoint, self.task
        ck = load_checkpoint(path, required=CHECKPOINT_KEYS, app=t.app)
        with restoring(path):
            t.model.load_state_dict(ck["model"])
            if t.optimizer is not None:
                t.optimizer.load_state_dict(ck["optimizer"])
            if t.scheduler is not None:
                t.scheduler.load_state_dict(ck["scheduler"])
            set_rng_state(ck["rng"])
            for name, gen in t.generators.items():
                gen.set_state(ck["generators"][name])
            t.load_state_dict(ck["task"])
            old = ck["config"] or {}
            for key in sorted(set(old) | set(t.config)):
                if key not in t.may_change and old.get(key) != t.config.get(key):
                    flag = "--" + key.replace("_", "-")
                    raise UsageError(f"--resume: '{path}' was written with other options ({flag} {old.get(key)}, "
                                     f"this run has {t.config.get(key)}): use the same options or another checkpoint")
            self.step, self.history, self.best = int(ck["step"]), list(ck["history"]), dict(ck["best"])
            self.best_state, self.elapsed = ck["best_state"], float(ck["elapsed"])
            self._since = {k: list(v) for k, v in ck["running"].items()}
            self.guard.skipped, self.rejected = int(ck["skipped"]), int(ck["rejected"])
        self.resumed = True
        self.log(f"--resume: resumed from '{path}' at step {self.step} of {self.steps}")
        return True

    # ------------------------------------------------------------------ records
    def _epoch(self, step: int) -> Optional[int]:
        return None if not self.steps_per_epoch else max(step - 1, 0) // self.steps_per_epoch

    def _better(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        old = self.best.get(self.task.metric)
        if old is None:
            return True
        return value < old if self.task.mode == "min" else value > old

    def _record(self) -> Dict[str, Any]:
        """Evaluate, append the record to the history, keep the best state, log."""
        rec: Dict[str, Any] = {"step": self.step}
        if self.steps_per_epoch:
            rec["epoch"] = self._epoch(self.step)
        keys = sorted(self._since)
        # "_seconds"-like entries add up (time since the last record); the others are averaged
        means = {k.lstrip("_"): (sum(v) if k.startswith("_") else sum(v) / len(v) if v else math.nan)
                 for k, v in self._since.items()}
        if self.ctx.distributed and keys:
            means = self.ctx.reduce_mean(means)
        rec.update({k: (None if math.isnan(v) else v) for k, v in means.items()})
        if self.record_extra is not None:
            rec.update(self.record_extra(self.step))
        rec.update(self.task.evaluate())
        rec["elapsed"] = round(self.elapsed, 1)
        if self.guard.skipped:
            rec["skipped"] = self.guard.skipped
        if self.rejected:
            rec["rejected"] = self.rejected
        self._since = {}
        self.history.append(rec)
        self.log(self.log_prefix + format_record(rec))
        self._write_jsonl(rec)
        candidate = not (self.record_extra is not None and rec.get("pretraining"))
        if candidate and self._better(float(rec[self.task.metric])) and first_nonfinite(
                self.task.model.state_dict()) is None:
            self.best = {"step": self.step, **{k: rec[k] for k in rec if k in (self.task.metric, "epoch")}}
            self.best.update(self.best_extra(rec))
            self.best_state = {k: v.detach().clone() for k, v in self.task.model.state_dict().items()}
            self.task.on_best(rec)
            self.bad_evaluations = 0
        elif candidate:
            self.bad_evaluations = getattr(self, "bad_evaluations", 0) + 1
        return rec

    def best_extra(self, rec: Mapping[str, Any]) -> Dict[str, Any]:
        """Entries of the record kept with the best state (``threshold`` for multi-label)."""
        return {k: rec[k] for k in ("threshold",) if k in rec}

    def _write_jsonl(self, rec: Mapping[str, Any]) -> None:
        if self.checkpoint is None or not self.ctx.is_main:
            return
        path = self.checkpoint.with_suffix(".jsonl")
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(rec), default=str) + "\n")

    # ------------------------------------------------------------------ the loop
    def _within_budget(self) -> bool:
        if self.budget_s is None:
            return True
        spent = self.elapsed
        if self.ctx.distributed:  # one verdict for every process (rank 0's clock)
            spent = float(self.ctx.all_reduce_sum(torch.tensor([spent if self.ctx.is_main else 0.0],
                                                               dtype=torch.float64)))
        return spent < self.budget_s

    def _stop_early(self) -> bool:
        return self.patience is not None and getattr(self, "bad_evaluations", 0) >= self.patience

    def fit(self) -> Trainer:
        """Restore (with ``resume``), evaluate the start, then train to ``steps``; returns ``self``."""
        if self.checkpoint is not None and self.ctx.is_main:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temp_files(self.checkpoint.parent)
        resumed = self.restore()
        self.task.begin(resumed)
        if not resumed and self.evaluate_first:
            self._record()
        if self.resumed and self.patience is not None:
            self.bad_evaluations = sum(1 for h in self.history if h["step"] > self.best.get("step", -1)
                                       and not h.get("pretraining"))
        net = wrap(self.task.forward_module(), self.ctx)  # after loading: DDP broadcasts rank 0's weights
        bar = None
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(total=self.steps, initial=self.step, desc=f"train {self.task.app}", file=sys.stderr)
        params = self.task.parameters()
        while self.step < self.steps and self._within_budget() and not self._stop_early():
            t0, c0 = time.perf_counter(), time.process_time()
            taken = self._one_step(net, params)
            self.step += 1
            seconds = time.perf_counter() - t0
            self.elapsed += seconds
            self._since.setdefault("_seconds", []).append(seconds)
            # CPU time (all threads): unlike wall time, not inflated by other jobs on a shared machine
            self._since.setdefault("_cpu_seconds", []).append(time.process_time() - c0)
            if bar is not None:
                bar.update(1)
                loss = self._since.get("loss")
                if loss and taken:
                    bar.set_postfix(loss=f"{loss[-1]:.4g}")
            evaluate = self.step % self.val_every == 0 or self.step >= self.steps
            if evaluate:
                self._record()
            if evaluate or (self.checkpoint_every and self.step % self.checkpoint_every == 0):
                self.save()
        if bar is not None:
            bar.close()
        if not self.history or self.history[-1]["step"] != self.step:
            self._record()  # stopped by the budget: the last state is a candidate too
        self.save()
        return self

    def _one_step(self, net: nn.Module, params: Sequence[nn.Parameter]) -> bool:
        task, step = self.task, self.step + 1
        if task.optimizer is not None:
            task.optimizer.zero_grad(set_to_none=True)
        try:
            out: Optional[StepResult] = task.train_step(net, self.step)
        except (FixedPointError, FloatingPointError) as exc:  # a NaN met inside the forward solve
            out = None
            what = f"the forward solve failed ({describe_exception(exc, 120)})"
        if out is None:
            what = self.guard._reduce(what, "")  # the other processes learn it with their loss check
            self.guard._skip(what, params, step)
            return False
        taken = self.guard.backward(out.loss, params, step)
        task.after_step(out)
        accept = out.accept
        if self.ctx.distributed:  # every process takes the same decision
            accept = float(self.ctx.all_reduce_sum(torch.tensor([float(not accept)], dtype=torch.float64))) == 0
        if taken and not accept:
            self.rejected += 1
        elif taken and task.optimizer is not None:
            task.before_update()
            task.optimizer.step()
            if task.scheduler is not None:
                task.scheduler.step()
        for key, value in out.stats.items():
            if taken or key != "loss":
                self._since.setdefault(key, []).append(float(value))
            else:
                self._since.setdefault(key, [])
        return taken


def mean_or_none(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None (None when there is none).

    Example:
        >>> mean_or_none([1.0, None, 3.0]), mean_or_none([None])
        (2.0, None)
    """
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


__all__ = ["CHECKPOINT_KEYS", "format_record", "ShuffledBatches", "StepResult", "Task", "Trainer", "mean_or_none"]
