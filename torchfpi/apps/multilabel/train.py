"""Training loop of the multi-label models: validation-based threshold and early stopping,
atomic checkpoints with resume, per-epoch timing and fixed-point iteration counts.

Data parallel under ``torchrun`` (see :mod:`torchfpi.apps._distributed`): every process draws the
same epoch order from the shared seed and trains on its interleaved share of each global batch,
so N processes take the same steps as one, unary pretraining included (to rounding; dropout masks differ, so pass
``--input-dropout 0 --hidden-dropout 0`` for runs that must match to 1e-6); validation metrics are
reduced over the processes; checkpoints, logs and the test evaluation happen on rank 0. A NaN/Inf
loss or gradient skips the step or stops training, and never reaches a checkpoint.

The test split is evaluated exactly once, at the end, with the weights and the threshold that
were best on the validation split.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from torchfpi.apps._distributed import DistContext, wrap
from torchfpi.apps._trainer import ShuffledBatches, StepResult, Task, Trainer, mean_or_none
from torchfpi.apps.multilabel.metrics import (
    DEFAULT_THRESHOLDS,
    best_threshold,
    mean_example_f1,
)
from torchfpi.apps.multilabel.models import MODELS, ModelConfig, MultiLabelModel
from torchfpi.data.datasets import MultiLabelDataset
from torchfpi.errors import UsageError
from torchfpi.runtime import machine_info, seed_everything

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class TrainConfig:
    """Options of one training run (one dataset, one model, one seed).

    Attributes:
        dataset: ``bibtex``, ``delicious`` or ``bookmarks``.
        model: one of :data:`MODELS`.
        seed: training seed (weights, dropout, batch order).
        epochs: maximum number of epochs.
        patience: stop after this many epochs without a better validation F1.
        batch_size, lr, weight_decay: Adam options.
        val_fraction, split_seed: the validation split carved from the training set.
        f1_weight: weight λ of a soft example-F1 term added to the loss,
            ``BCE(z, y) + λ mean(1 - 2 <σ(z), y> / (Σσ(z) + Σy))`` (0: plain BCE).
        energy_lr_mult: learning-rate multiplier of the structured part (energy, update network):
            its weights must move further from their initialisation than the unary net's.
        pretrain_epochs: structured models first train their unary MLP alone for this many
            epochs (0: train end-to-end from scratch).
        device: torch device string.
        dtype: ``"float32"`` or ``"float64"`` (weights and data; float64 for runs that must match
            across process counts to 1e-6).
        model_cfg: architecture and solver options.
    """

    dataset: str = "bibtex"
    model: str = "fpi_gd"
    seed: int = 0
    epochs: int = 40
    patience: int = 6
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    val_fraction: float = 0.1
    split_seed: int = 0
    pretrain_epochs: int = 0
    f1_weight: float = 0.0
    energy_lr_mult: float = 1.0
    device: str = "cpu"
    dtype: str = "float32"
    model_cfg: ModelConfig = field(default_factory=ModelConfig)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise UsageError(f"--model: expected one of {list(MODELS)}, got '{self.model}'")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(self, name)}")
        if self.patience < 1:
            raise UsageError(f"--patience: expected >= 1, got {self.patience}")
        if not self.lr > 0:
            raise UsageError(f"--lr: expected > 0, got {self.lr}")
        if self.dtype not in DTYPES:
            raise UsageError(f"--dtype: expected one of {list(DTYPES)}, got '{self.dtype}'")
        if self.pretrain_epochs < 0:
            raise UsageError(f"--pretrain-epochs: expected >= 0, got {self.pretrain_epochs}")


@dataclass
class Splits:
    """Tensors of the train / validation / test splits (features float32, labels 0/1)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def make_splits(train: Any, test: Any, val_fraction: float = 0.1, split_seed: int = 0) -> Splits:
    """Carve a fixed-seed validation split out of ``train`` (two :class:`MultiLabelData`)."""
    from torchfpi.data import train_val_split

    tr, va = train_val_split(len(train), val_fraction, split_seed)
    xf = torch.from_numpy(train.features)
    yf = torch.from_numpy(train.labels)
    return Splits(
        xf[tr], yf[tr], xf[va], yf[va], torch.from_numpy(test.features), torch.from_numpy(test.labels)
    )


def multilabel_loss(z: torch.Tensor, y: torch.Tensor, f1_weight: float = 0.0) -> torch.Tensor:
    """Mean binary cross-entropy of logits ``z`` (B, L), plus ``f1_weight`` times (1 - soft F1)."""
    loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y)
    if f1_weight:
        p = torch.sigmoid(z)
        soft_f1 = 2 * (p * y).sum(1) / (p.sum(1) + y.sum(1)).clamp_min(1e-6)
        loss = loss + f1_weight * (1 - soft_f1).mean()
    return loss


@torch.no_grad()
def predict(model: MultiLabelModel, x: torch.Tensor, batch_size: int = 512) -> Dict[str, Any]:
    """Probabilities ``σ(z)`` of ``x`` in eval mode, with the mean forward iteration count."""
    model.eval()
    probs: List[torch.Tensor] = []
    iters: List[float] = []
    first = next(model.parameters())
    for i in range(0, x.shape[0], batch_size):
        z = model(x[i : i + batch_size].to(first.device, first.dtype))
        probs.append(torch.sigmoid(z).cpu())
        if model.last_solution is not None and model.kind in ("fpi_gd", "fpi_nn"):
            iters.append(float(model.last_solution.iterations.float().mean()))
    return {"prob": torch.cat(probs), "forward_iterations": float(np.mean(iters)) if iters else None}


def _backward_iterations(sol: Any) -> Optional[float]:
    bwd = getattr(sol, "backward", None)
    if bwd is None:
        return None
    if isinstance(bwd, dict):
        it = bwd.get("iterations")
    else:
        it = getattr(bwd, "iterations", None)
    if it is None:
        return None
    return float(torch.as_tensor(it).float().mean())


def _validate(model: MultiLabelModel, x: torch.Tensor, y: torch.Tensor, ctx: DistContext) -> Dict[str, Any]:
    """Validation threshold, F1 and forward iterations; each process scores its shard of the rows
    and the per-threshold mean F1 is reduced over the processes (same choice rule as
    :func:`best_threshold`: the highest F1, ties to the smaller threshold)."""
    if not ctx.distributed:
        val = predict(model, x)
        th, vf1 = best_threshold(val["prob"], y)
        return {"threshold": th, "f1": vf1, "forward_iterations": val["forward_iterations"]}
    rows = ctx.shard(x.shape[0], epoch=0, seed=0, shuffle=False)
    values: Dict[str, float] = {f"t{k:03d}": 0.0 for k in range(len(DEFAULT_THRESHOLDS))}
    values["iterations"] = 0.0
    if len(rows):
        val = predict(model, x[rows])
        for k, th in enumerate(DEFAULT_THRESHOLDS):
            values[f"t{k:03d}"] = mean_example_f1(val["prob"], y[rows], float(th))
        values["iterations"] = val["forward_iterations"] or 0.0
    mean = ctx.reduce_mean(values, weight=float(len(rows)))
    best = (float(DEFAULT_THRESHOLDS[0]), -1.0)
    for k, th in enumerate(DEFAULT_THRESHOLDS):
        if mean[f"t{k:03d}"] > best[1]:
            best = (float(th), mean[f"t{k:03d}"])
    iters = mean["iterations"] if model.kind in ("fpi_gd", "fpi_nn") else None
    return {"threshold": best[0], "f1": best[1], "forward_iterations": iters}


class MultiLabelTask(Task):
    """``train multilabel``: epochs of seeded shuffled batches, validation F1 at each epoch's end."""

    app = "multilabel"
    metric = "val_f1"
    mode = "max"

    def __init__(self, cfg: TrainConfig, splits: Splits, ctx: DistContext) -> None:
        super().__init__()
        self.cfg, self.splits, self.ctx = cfg, splits, ctx
        gen = seed_everything(cfg.seed)
        self.device, self.dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
        model = MultiLabelModel(cfg.model, splits.x_train.shape[1], splits.y_train.shape[1], cfg.model_cfg)
        self.model: MultiLabelModel = model.to(self.device, self.dtype)
        unary = [p for n, p in model.named_parameters() if n.startswith("unary.")]
        structured = [p for n, p in model.named_parameters() if not n.startswith("unary.")]
        groups = [{"params": unary}] + ([{"params": structured, "lr": cfg.lr * cfg.energy_lr_mult}]
                                        if structured else [])
        self.optimizer = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generators = {"data": gen}
        self.sampler = ShuffledBatches(splits.x_train.shape[0], cfg.batch_size, gen)
        # the rows come through a DataLoader whose batches are the sampler's (its state is
        # checkpointed; the loader asks for the next batch only when a step needs it)
        dataset = MultiLabelDataset((splits.x_train, splits.y_train))
        self.loader = iter(DataLoader(dataset, batch_sampler=self.sampler))
        self.config = asdict(cfg)
        self.unary_net: Optional[torch.nn.Module] = None

    def pretraining(self, step: int) -> bool:
        """True while the step (0-based) belongs to a unary-only pretraining epoch."""
        return self.cfg.model != "mlp" and step // self.sampler.batches_per_epoch < self.cfg.pretrain_epochs

    def train_step(self, net: torch.nn.Module, step: int) -> StepResult:
        cfg, ctx = self.cfg, self.ctx
        pretraining = self.pretraining(step)
        if pretraining and self.unary_net is None:
            # Unary-only pretraining goes through its own DDP wrapper of the unary MLP (created
            # after loading, like the trainer's), so its gradients are reduced too.
            self.unary_net = wrap(self.model.unary, ctx)
        (self.unary_net if pretraining and self.unary_net is not None else net).train()
        xb, yb = next(self.loader)  # the same global batch on every process (shared seed)
        rows, share = torch.arange(len(xb)), 1.0
        if ctx.distributed:  # this process's interleaved share of the global batch
            rows = rows[ctx.shard(len(rows), epoch=0, seed=cfg.seed, shuffle=False)]
            # DDP averages gradients over the processes: weight the local mean so that the
            # result is the gradient of the mean over the global batch.
            share = len(rows) * ctx.world_size / len(xb)
            if len(rows) == 0:  # a short last batch: take part with one row of weight 0
                rows, share = torch.arange(1), 0.0
        x, y = xb[rows].to(self.device, self.dtype), yb[rows].to(self.device, self.dtype)
        z = self.unary_net(x)[0] if pretraining and self.unary_net is not None else net(x)
        loss = multilabel_loss(z, y, cfg.f1_weight)
        scaled = loss if share == 1.0 else loss * share
        stats = {"loss": float(scaled.detach())}  # averaged over processes: the global-batch mean
        sol = self.model.last_solution if (self.model.kind in ("fpi_gd", "fpi_nn") and not pretraining) else None
        if sol is not None:
            stats["train_forward_iterations"] = float(sol.iterations.float().mean())
            stats["train_converged_fraction"] = float(sol.converged.float().mean())
        return StepResult(scaled, stats)

    def after_step(self, out: StepResult) -> None:
        """Backward iterations are known once the backward pass ran."""
        sol = self.model.last_solution
        b = _backward_iterations(sol) if sol is not None and "train_forward_iterations" in out.stats else None
        if b is not None:
            out.stats["train_backward_iterations"] = b

    def evaluate(self) -> Dict[str, Any]:
        val = _validate(self.model, self.splits.x_val, self.splits.y_val, self.ctx)
        return {"val_f1": 100 * val["f1"], "threshold": val["threshold"],
                "val_forward_iterations": val["forward_iterations"]}

    def state_dict(self) -> Dict[str, Any]:
        dims = {"num_features": self.splits.x_train.shape[1], "num_labels": self.splits.y_train.shape[1]}
        return {"sampler": self.sampler.state_dict(), "dims": dims}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state["sampler"])


def train_multilabel(
    cfg: TrainConfig,
    splits: Splits,
    *,
    checkpoint: Optional[Path] = None,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
    max_steps: Optional[int] = None,
    ctx: Optional[DistContext] = None,
    on_nonfinite: str = "skip",
    checkpoint_every: int = 0,
) -> Dict[str, Any]:
    """Train one model, select epoch and threshold on validation, evaluate the test split once.

    The loop is :class:`~torchfpi.apps._trainer.Trainer`: a validation at the end of each epoch
    (early stopping after ``cfg.patience`` epochs without a better F1), checkpoints there and every
    ``checkpoint_every`` steps (the position in the epoch's shuffled order included, so a run
    resumed mid-epoch sees the same batches), the non-finite policy, progress and a JSON-lines log.

    Args:
        cfg: the run's options.
        splits: data (see :func:`make_splits`).
        checkpoint: file for atomic checkpoints (holding the best weights too); None: none.
        resume: continue from ``checkpoint`` if it exists.
        progress: show a tqdm bar over the steps.
        log: where one line per epoch goes (rank 0 only).
        max_steps: stop after this many optimiser steps in total (tests and smoke runs).
        ctx: data-parallel context from :func:`torchfpi.apps._distributed.setup` (None: one
            process).
        on_nonfinite: a NaN/Inf loss or gradient ``"skip"``\\ s the step or ``"stop"``\\ s training
            (:class:`~torchfpi.apps._training.NonFiniteError`).
        checkpoint_every: steps between checkpoints besides the one at each epoch's end (0: none).

    Returns:
        A JSON-able dict: test F1 (%), validation F1, chosen threshold and epoch, per-epoch
        history (loss, validation F1, seconds, forward/backward iterations), timings. On ranks
        other than 0 the test entries are None (the test split is evaluated on rank 0 only).

    Raises:
        UsageError: bad options or a checkpoint written with other options.
        DataError: an unreadable checkpoint on ``resume``.
        NonFiniteError: NaN/Inf with ``on_nonfinite="stop"``, or too many skipped steps.
    """
    cfg.validate()
    ctx = ctx or DistContext()
    task = MultiLabelTask(cfg, splits, ctx)
    per_epoch = task.sampler.batches_per_epoch
    steps = cfg.epochs * per_epoch if max_steps is None else min(max_steps, cfg.epochs * per_epoch)
    trainer = Trainer(task, steps=steps, val_every=per_epoch, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, resume=resume, ctx=ctx, on_nonfinite=on_nonfinite,
                      log=log, progress=progress, evaluate_first=False, patience=cfg.patience,
                      steps_per_epoch=per_epoch, log_prefix=f"[{cfg.dataset}/{cfg.model}/seed {cfg.seed}] ",
                      record_extra=lambda step: {"pretraining": task.pretraining(step - 1)}).fit()
    model, best, history = task.model, trainer.best, trainer.history
    if trainer.best_state is not None:
        model.load_state_dict(trainer.best_state)
    test_f1, test_iters = None, None
    if ctx.is_main:
        test = predict(model, splits.x_test)
        test_f1 = 100 * mean_example_f1(test["prob"], splits.y_test, best.get("threshold", 0.5))
        test_iters = test["forward_iterations"]
    trained = [h for h in history if not h["pretraining"]]
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "test_f1": test_f1,
        "val_f1": best.get("val_f1"),
        "threshold": best.get("threshold", 0.5),
        "best_epoch": best.get("epoch", -1),
        "epochs_run": len(history),
        "epoch_s_mean": float(np.mean([h["seconds"] for h in trained])) if trained else math.nan,
        # CPU time of the training batches (all threads): unlike wall time, not inflated by other
        # jobs on a shared machine, so it compares models run at different times.
        "epoch_cpu_s_mean": float(np.mean([h["cpu_seconds"] for h in trained])) if trained else math.nan,
        "train_forward_iterations": mean_or_none(h.get("train_forward_iterations") for h in trained),
        "train_backward_iterations": mean_or_none(h.get("train_backward_iterations") for h in trained),
        "test_forward_iterations": test_iters,
        "skipped_steps": trainer.guard.skipped,
        "world_size": ctx.world_size,
        "history": history,
        "config": asdict(cfg),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "machine": machine_info(),
    }
