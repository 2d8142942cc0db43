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
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from torchfpi.apps._distributed import DistContext, wrap
from torchfpi.apps._training import (
    NonFiniteGuard,
    first_nonfinite,
    load_checkpoint,
    restoring,
    save_checkpoint,
)
from torchfpi.apps.multilabel.metrics import (
    DEFAULT_THRESHOLDS,
    best_threshold,
    example_f1,
    mean_example_f1,
)
from torchfpi.apps.multilabel.models import MODELS, ModelConfig, MultiLabelModel
from torchfpi.errors import DataError, UsageError
from torchfpi.io import atomic_torch_save, remove_stale_temp_files, safe_load
from torchfpi.runtime import machine_info, rng_state, seed_everything, set_rng_state

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
) -> Dict[str, Any]:
    """Train one model, select epoch and threshold on validation, evaluate the test split once.

    Args:
        cfg: the run's options.
        splits: data (see :func:`make_splits`).
        checkpoint: file for atomic checkpoints after every epoch (and the best weights next to
            it as ``<name>.best.pt``); None: no checkpoints.
        resume: continue from ``checkpoint`` if it exists (model, optimiser, every RNG state,
            epoch, step, history and the best weights so far).
        progress: show a tqdm bar over the batches.
        log: where one line per epoch goes (rank 0 only).
        max_steps: stop after this many optimiser steps in total (tests and smoke runs).
        ctx: data-parallel context from :func:`torchfpi.apps._distributed.setup` (None: one
            process).
        on_nonfinite: a NaN/Inf loss or gradient ``"skip"``\\ s the step or ``"stop"``\\ s training
            (:class:`~torchfpi.apps._training.NonFiniteError`).

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
    if not ctx.is_main:
        log, progress = (lambda msg: None), False
    if checkpoint is not None and ctx.is_main:
        remove_stale_temp_files(checkpoint.parent)
    gen = seed_everything(cfg.seed)
    dev = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    model = MultiLabelModel(cfg.model, splits.x_train.shape[1], splits.y_train.shape[1], cfg.model_cfg).to(dev)
    if dtype != torch.float32:
        model = model.to(dtype)
    unary = [p for n, p in model.named_parameters() if n.startswith("unary.")]
    structured = [p for n, p in model.named_parameters() if not n.startswith("unary.")]
    groups = [{"params": unary}] + ([{"params": structured, "lr": cfg.lr * cfg.energy_lr_mult}] if structured else [])
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    guard = NonFiniteGuard(on_nonfinite, ctx=ctx, log=log)
    history: List[Dict[str, Any]] = []
    best: Dict[str, Any] = {"val_f1": -1.0, "epoch": -1, "threshold": 0.5}
    start_epoch = 0
    step = 0
    best_path = checkpoint.with_suffix(".best.pt") if checkpoint is not None else None
    best_state: Optional[Dict[str, torch.Tensor]] = None
    found = resume and checkpoint is not None and checkpoint.exists()
    if resume and ctx.distributed:
        seen = int(ctx.all_reduce_sum(torch.tensor([float(found)], dtype=torch.float64)))
        if 0 < seen < ctx.world_size:
            raise DataError(f"--resume: '{checkpoint}' exists for {seen} of {ctx.world_size} processes: put "
                            "--checkpoint-dir on a file system every machine sees, or copy the checkpoint")
    if found and checkpoint is not None:
        ck = load_checkpoint(checkpoint, required=("model", "optimizer", "rng", "generator", "epoch", "step",
                                                   "history", "best", "config"), map_location=dev,
                             app="multilabel")
        if ck.get("config") != asdict(cfg):
            raise UsageError(
                f"--resume: the checkpoint '{checkpoint}' was written with other options; "
                "use the same options or another --checkpoint-dir"
            )
        with restoring(checkpoint):
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            set_rng_state(ck["rng"])
            gen.set_state(ck["generator"])
        history, best, start_epoch, step = ck["history"], ck["best"], ck["epoch"] + 1, ck["step"]
        guard.skipped = ck.get("skipped", 0)
        if best_path is not None and best_path.exists():
            try:
                best_state = safe_load(best_path, "best-weights", map_location=dev)
            except DataError as exc:
                raise DataError(f"{exc}: delete it and the checkpoint, or train without --resume") from exc
        log(f"--resume: resumed from '{checkpoint}' at epoch {start_epoch} (step {step})")
    elif resume:
        log(f"--resume: no checkpoint at '{checkpoint}': starting a fresh run")
    net = wrap(model, ctx)  # after loading: DDP starts by broadcasting rank 0's weights
    # Unary-only pretraining goes through its own DDP wrapper of the unary MLP, so its gradients
    # are reduced too. Each wrapper's reducer acts only in the backward of a forward through it.
    unary_net = wrap(model.unary, ctx) if cfg.model != "mlp" and start_epoch < cfg.pretrain_epochs else None

    tqdm = None
    if progress:
        from tqdm import tqdm  # type: ignore[no-redef]

    n = splits.x_train.shape[0]
    bad_epochs = sum(1 for h in history if h["epoch"] > best["epoch"])
    for epoch in range(start_epoch, cfg.epochs):
        if bad_epochs >= cfg.patience or (max_steps is not None and step >= max_steps):
            break
        pretraining = cfg.model != "mlp" and epoch < cfg.pretrain_epochs
        (unary_net if pretraining and unary_net is not None else net).train()
        perm = torch.randperm(n, generator=gen)  # the same on every process (shared seed)
        batches = range(0, n, cfg.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, file=sys.stderr) if tqdm else batches
        t0, c0 = time.perf_counter(), time.process_time()
        loss_sum, fwd, bwd, conv = 0.0, [], [], []
        for i in bar:
            idx = perm[i : i + cfg.batch_size]
            share = 1.0
            if ctx.distributed:  # this process's interleaved share of the global batch
                rows = idx[ctx.shard(len(idx), epoch=epoch, seed=cfg.seed, shuffle=False)]
                # DDP averages gradients over the processes: weight the local mean so that the
                # result is the gradient of the mean over the global batch.
                share = len(rows) * ctx.world_size / len(idx)
                if len(rows) == 0:  # a short last batch: take part with one row of weight 0
                    rows, share = idx[:1], 0.0
            else:
                rows = idx
            x, y = splits.x_train[rows].to(dev, dtype), splits.y_train[rows].to(dev, dtype)
            if pretraining and unary_net is not None:
                z = unary_net(x)[0]
            else:
                z = net(x)
            loss = multilabel_loss(z, y, cfg.f1_weight)
            opt.zero_grad(set_to_none=True)
            taken = guard.backward(loss if share == 1.0 else loss * share, list(model.parameters()), step + 1)
            if taken:
                opt.step()
            step += 1
            if taken and share > 0:
                count = len(rows) if ctx.distributed else len(idx)
                loss_sum += float(loss.detach()) * count
            sol = model.last_solution if (model.kind in ("fpi_gd", "fpi_nn") and not pretraining) else None
            if sol is not None:
                fwd.append(float(sol.iterations.float().mean()))
                conv.append(float(sol.converged.float().mean()))
                b = _backward_iterations(sol)
                if b is not None:
                    bwd.append(b)
            if max_steps is not None and step >= max_steps:
                break
        epoch_s, epoch_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        stats = {"fwd": float(np.mean(fwd)) if fwd else None, "bwd": float(np.mean(bwd)) if bwd else None,
                 "conv": float(np.mean(conv)) if conv else None}
        if ctx.distributed:
            loss_sum = float(ctx.all_reduce_sum(torch.tensor([loss_sum], dtype=torch.float64)))
            present = {k: v for k, v in stats.items() if v is not None}  # the same keys on every process
            stats.update(ctx.reduce_mean(present) if present else {})
        val = _validate(model, splits.x_val, splits.y_val, ctx)
        th, vf1 = val["threshold"], val["f1"]
        rec = {
            "epoch": epoch,
            "loss": loss_sum / n,
            "val_f1": 100 * vf1,
            "threshold": th,
            "epoch_s": epoch_s,
            "epoch_cpu_s": epoch_cpu_s,
            "pretraining": pretraining,
            "train_forward_iterations": stats["fwd"],
            "train_backward_iterations": stats["bwd"],
            "train_converged_fraction": stats["conv"],
            "val_forward_iterations": val["forward_iterations"],
        }
        history.append(rec)
        # Pretraining epochs of the unary net are not candidates for the structured model.
        if not pretraining and vf1 > best["val_f1"] and first_nonfinite(model.state_dict()) is None:
            best = {"val_f1": vf1, "epoch": epoch, "threshold": th}
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if best_path is not None and ctx.is_main:
                atomic_torch_save(best_state, best_path)
            bad_epochs = 0
        elif not pretraining:
            bad_epochs += 1
        log(
            f"[{cfg.dataset}/{cfg.model}/seed {cfg.seed}] epoch {epoch:3d} loss {rec['loss']:.4f} "
            f"val F1 {rec['val_f1']:.2f} (th {th:.2f}) {epoch_s:.1f}s"
            + (f" fwd it {rec['train_forward_iterations']:.1f}" if rec["train_forward_iterations"] else "")
            + (f" bwd it {rec['train_backward_iterations']:.1f}" if rec["train_backward_iterations"] else "")
            + (f" converged {100 * rec['train_converged_fraction']:.1f}%" if conv else "")
            + (" [pretrain]" if pretraining else "")
            + (f" ({guard.skipped} steps skipped)" if guard.skipped else "")
        )
        if checkpoint is not None:
            save_checkpoint(
                {
                    "app": "multilabel",
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "rng": rng_state(),
                    "generator": gen.get_state(),
                    "epoch": epoch,
                    "step": step,
                    "history": history,
                    "best": best,
                    "skipped": guard.skipped,
                    "config": asdict(cfg),
                    "metrics": {"loss": rec["loss"]},
                },
                checkpoint,
                ctx,
            )

    if best_state is not None:
        model.load_state_dict(best_state)
    test_f1, test_iters = None, None
    if ctx.is_main:
        test = predict(model, splits.x_test)
        test_f1 = 100 * float(example_f1(test["prob"] >= best["threshold"], splits.y_test).mean())
        test_iters = test["forward_iterations"]
    trained = [h for h in history if not h["pretraining"]]
    return {
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "test_f1": test_f1,
        "val_f1": 100 * best["val_f1"] if best["val_f1"] >= 0 else None,
        "threshold": best["threshold"],
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "epoch_s_mean": float(np.mean([h["epoch_s"] for h in trained])) if trained else math.nan,
        # CPU time of the training batches (all threads): unlike wall time, not inflated by other
        # jobs on a shared machine, so it compares models run at different times.
        "epoch_cpu_s_mean": float(np.mean([h.get("epoch_cpu_s", math.nan) for h in trained])) if trained else math.nan,
        "train_forward_iterations": _mean_or_none([h["train_forward_iterations"] for h in trained]),
        "train_backward_iterations": _mean_or_none([h["train_backward_iterations"] for h in trained]),
        "test_forward_iterations": test_iters,
        "skipped_steps": guard.skipped,
        "world_size": ctx.world_size,
        "history": history,
        "config": asdict(cfg),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "machine": machine_info(),
    }


def _mean_or_none(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None
