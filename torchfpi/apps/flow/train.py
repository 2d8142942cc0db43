"""Training of the flow models on synthetic pairs with the implicit (backward-FPI) gradient.

:func:`train` (``fpi_gd``): :class:`VariationalFlow`'s learned scalars. :func:`train_refine`
(``fpi_nn``): the FPI_NN refinement of a trained ``fpi_gd`` model (frozen), with a Jacobian
penalty. Model selection uses a fixed synthetic validation set drawn with another seed: nothing
of the Middlebury test pairs is seen.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

import torchfpi
from torchfpi import errors, io, runtime
from torchfpi.apps._distributed import DistContext
from torchfpi.apps._trainer import CHECKPOINT_KEYS, StepResult, Task, Trainer
from torchfpi.apps._training import load_checkpoint
from torchfpi.apps.flow.api import (
    save_refined,
    save_weights,
)
from torchfpi.apps.flow.models import FlowConfig, RefinedFlow, VariationalFlow
from torchfpi.apps.flow.synthetic import TextureBank, batch_epe, default_texture_folder, make_batch


@dataclass
class TrainConfig:
    """Settings of one training run."""

    steps: int = 150
    batch_size: int = 4
    size: int = 96
    max_motion: float = 6.0
    lr: float = 0.03
    val_pairs: int = 16
    val_every: int = 25
    seed: int = 0
    textures: int = 400
    checkpoint_every: int = 0  # steps between checkpoints; 0: at each validation
    on_nonfinite: str = "skip"  # NaN/Inf loss or gradient: "skip" the step or "stop"
    dtype: str = "float32"  # "float64" for runs that must match across process counts to 1e-6


def evaluate(model: VariationalFlow, val: tuple, ctx: Optional[DistContext] = None) -> float:
    """Mean EPE of ``model`` on a synthetic validation batch ``(frame1, frame2, flow)``.

    In a data-parallel run each process passes its shard and the mean is taken over all of them.
    """
    f1, f2, gt = val
    with torch.no_grad():
        flow, _ = model(f1, f2)
    epe = batch_epe(flow, gt)
    if ctx is None or not ctx.distributed:
        return float(epe.mean())
    return ctx.reduce_mean({"epe": float(epe.mean())}, weight=len(epe))["epe"]


class FlowTask(Task):
    """``train flow``: the variational model on fresh synthetic pairs at every step."""

    app = "flow"
    metric = "val_epe"
    mode = "min"

    def __init__(self, out_dir: Path, config: TrainConfig, flow_config: Optional[FlowConfig],
                 folder: Optional[Path], ctx: DistContext) -> None:
        super().__init__()
        self.out_dir, self.cfg, self.ctx, self.folder = out_dir, config, ctx, folder
        self.generators = {"data": runtime.seed_everything(config.seed)}
        self.bank = TextureBank(folder, limit=config.textures)
        val_gen = torch.Generator().manual_seed(10_000 + config.seed)
        val = make_batch(config.val_pairs, config.size, config.size, val_gen, self.bank, config.max_motion)
        val_rows = ctx.shard(config.val_pairs, epoch=0, seed=config.seed, shuffle=False)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
        self.val = tuple(t[val_rows].to(self.dtype) for t in val)
        self.model: VariationalFlow = VariationalFlow(flow_config).to(self.dtype)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(config.steps, 1))
        self.rows = ctx.shard(config.batch_size, epoch=0, seed=config.seed, shuffle=False)
        self.config = {k: v for k, v in asdict(config).items() if k not in ("on_nonfinite",)}
        self.config["flow_config"] = asdict(self.model.config)

    def train_step(self, net: torch.nn.Module, step: int) -> StepResult:
        cfg, rows = self.cfg, self.rows
        f1, f2, gt = make_batch(cfg.batch_size, cfg.size, cfg.size, self.generators["data"], self.bank,
                                cfg.max_motion)
        flow, _ = net(f1[rows].to(self.dtype), f2[rows].to(self.dtype))
        epe = batch_epe(flow, gt[rows].to(self.dtype))
        # DDP averages gradients over the processes: scale the local sum so that the result is
        # the gradient of the mean over the global batch (with one process: the plain mean).
        loss = epe.mean() if not self.ctx.distributed else epe.sum() * (self.ctx.world_size / cfg.batch_size)
        return StepResult(loss, {"loss": float(epe.detach().mean())})

    def evaluate(self) -> Dict[str, Any]:
        return {"val_epe": evaluate(self.model, self.val, self.ctx), **self.model.describe()}

    def on_best(self, record: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_weights(self.model, self.out_dir / "best.pt", {"val_epe": record["val_epe"], "step": record["step"]},
                         self.folder is None)


def train(out_dir: Path, config: TrainConfig, flow_config: Optional[FlowConfig] = None,
          data_root: Optional[Path] = None, resume: bool = False, quiet: bool = False,
          command: str = "", ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Train, checkpointing to ``out_dir/checkpoint.pt``; the best-on-validation model goes to
    ``out_dir/best.pt``. Returns a summary dict (also written to ``out_dir/train.json``).

    The loop is :class:`~torchfpi.apps._trainer.Trainer` (checkpoints every
    ``config.checkpoint_every`` steps and at each validation, ``--resume`` bit-identical to an
    uninterrupted run, the non-finite policy ``config.on_nonfinite``, progress, a JSON-lines log
    ``checkpoint.jsonl``). Data parallel (``ctx`` from :func:`torchfpi.apps._distributed.setup`):
    every process draws the same global batch of ``config.batch_size`` pairs from the shared seed
    and trains on its interleaved shard, so N processes take the same steps as one.
    """
    ctx = ctx or DistContext()
    quiet = quiet or not ctx.is_main
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    folder = default_texture_folder(data_root)
    textures = str(folder) if folder is not None else "procedural"
    if not quiet:
        print(f"textures: {'procedural noise (no data set)' if folder is None else folder}", flush=True)
    task = FlowTask(out_dir, config, flow_config, folder, ctx)
    t0 = time.time()
    trainer = Trainer(task, steps=config.steps, val_every=config.val_every, checkpoint=out_dir / "checkpoint.pt",
                      checkpoint_every=config.checkpoint_every, resume=resume, ctx=ctx,
                      on_nonfinite=config.on_nonfinite, log=None if quiet else _print, progress=not quiet).fit()
    summary = {"config": asdict(config), "flow_config": asdict(task.model.config), "best": trainer.best,
               "textures": textures, "procedural": folder is None,
               "history": trainer.history, "skipped_steps": trainer.guard.skipped, "world_size": ctx.world_size,
               "seconds": round(time.time() - t0, 1), "command": command,
               "machine": runtime.machine_info()}
    if ctx.is_main:
        io.atomic_write_json(summary, out_dir / "train.json")
    ctx.barrier()
    return summary


def _print(msg: str) -> None:
    print(msg, flush=True)


# -- fpi_nn: the FPI_NN refinement of a trained fpi_gd model ------------------------------------

class _RefineLoss(nn.Module):
    """One training step's per-sample terms as a module, so that DDP's forward sees the step.

    ``DistributedDataParallel`` arms its gradient hooks in ``forward``: the refinement solve and the
    Jacobian penalty both run inside this forward, and the one ``backward`` of their sum reaches
    each parameter of ``update`` once.
    """

    def __init__(self, model: RefinedFlow) -> None:
        super().__init__()
        self.model = model

    def forward(self, zgd: torch.Tensor, frame1: torch.Tensor, frame2: torch.Tensor, truth: torch.Tensor,
                probes: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-sample EPE ``(b,)`` and Jacobian penalty ``(b,)`` (None without ``probes``)."""
        flow = self.model.refine(zgd, frame1, frame2)
        epe = batch_epe(flow, truth)
        if probes is None:
            return epe, None
        x = torch.cat([zgd, frame1 / 255.0, frame2 / 255.0], dim=1)
        return epe, torchfpi.jacobian_penalty(self.model.update, flow.detach(), x, probes=probes)


def _precompute(n: int, size: int, gen: torch.Generator, bank: TextureBank, max_motion: float,
                base: VariationalFlow, dtype: torch.dtype, ctx: DistContext) -> Tuple[torch.Tensor, ...]:
    """``n`` synthetic pairs ``(frame1, frame2, truth)`` and their ``fpi_gd`` flows ``zgd``.

    Every process draws the same pairs; the base flows are computed in chunks of 16, chunk ``c``
    by process ``c % world_size``, and summed over the processes (each entry is filled by one
    process and zero elsewhere, so the sum is exact): the same numbers as one process, in
    ``1 / world_size`` of the time.
    """
    f1, f2, gt = (t.to(dtype) for t in make_batch(n, size, size, gen, bank, max_motion))
    chunks = []
    with torch.no_grad():
        for c, i in enumerate(range(0, n, 16)):
            mine = c % ctx.world_size == ctx.rank
            chunks.append(base(f1[i : i + 16], f2[i : i + 16])[0] if mine
                          else torch.zeros(len(f1[i : i + 16]), 2, size, size, dtype=dtype))
    zgd = ctx.all_reduce_sum(torch.cat(chunks))
    return f1, f2, gt, zgd


class RefineTask(Task):
    """``train flow --model fpi_nn``: the refinement on precomputed synthetic pairs."""

    app = "flow --model fpi_nn"
    metric = "val_epe"
    mode = "min"

    def __init__(self, out_dir: Path, base: VariationalFlow, settings: Dict[str, Any], folder: Optional[Path],
                 ctx: DistContext) -> None:
        super().__init__()
        self.out_dir, self.settings, self.folder, self.ctx = out_dir, settings, folder, ctx
        s = settings
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[s["dtype"]]
        base = base.to(self.dtype)
        gen = runtime.seed_everything(s["seed"] + 1)
        bank = TextureBank(folder)
        self.train_set = _precompute(s["pairs"], s["size"], gen, bank, s["max_motion"], base, self.dtype, ctx)
        val_set = _precompute(s["val_pairs"], s["size"], torch.Generator().manual_seed(20_000 + s["seed"]), bank,
                              s["max_motion"], base, self.dtype, ctx)
        self.val_set = tuple(t[ctx.shard(s["val_pairs"], epoch=0, seed=s["seed"], shuffle=False)] for t in val_set)
        self.refined = RefinedFlow(base).to(self.dtype)
        self.model = self.refined.update
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s["lr"])
        # The Hutchinson probes get their own generator, shared by every process: it starts where the
        # global torch RNG stands after the model's initialisation, i.e. where one process drew them
        # before this generator existed, so single-process numbers did not change.
        noise = torch.Generator()
        noise.set_state(torch.get_rng_state())
        self.generators = {"data": gen, "noise": noise}
        self.rows = ctx.shard(s["batch_size"], epoch=0, seed=s["seed"], shuffle=False)
        self.config = dict(settings)

    def forward_module(self) -> nn.Module:
        return _RefineLoss(self.refined)

    def train_step(self, net: nn.Module, step: int) -> StepResult:
        s, ctx, rows = self.settings, self.ctx, self.rows
        batch_size = s["batch_size"]
        idx = torch.randint(s["pairs"], (batch_size,), generator=self.generators["data"])[rows]
        f1, f2, gt, zgd = (t[idx] for t in self.train_set)
        probes = None
        if s["jac_weight"] > 0:  # the global batch's probes, this process's rows
            probes = torch.randn((1, batch_size, *zgd.shape[1:]), generator=self.generators["noise"],
                                 dtype=self.dtype)[:, rows]
        epe, penalty = net(zgd, f1, f2, gt, probes)
        if ctx.distributed:  # DDP averages over processes: scale the local sum to the global mean
            loss = epe.sum() * (ctx.world_size / batch_size)
            if penalty is not None:
                loss = loss + s["jac_weight"] * penalty.sum() * (ctx.world_size / batch_size)
        else:
            loss = epe.mean()
            if penalty is not None:
                loss = loss + s["jac_weight"] * penalty.mean()
        # the mean of the processes' scaled sums (taken by the trainer) is the global-batch mean
        return StepResult(loss, {"loss": float(loss.detach())})

    def evaluate(self) -> Dict[str, Any]:
        f1, f2, gt, zgd = self.val_set
        with torch.no_grad():
            epe = batch_epe(self.refined.refine(zgd, f1, f2), gt)
        if not self.ctx.distributed:
            return {"val_epe": float(epe.mean())}
        return {"val_epe": self.ctx.reduce_mean({"epe": float(epe.mean())}, weight=len(epe))["epe"]}

    def on_best(self, record: Dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_refined(self.refined, self.out_dir / "best_nn.pt",
                         {"val_epe": record["val_epe"], "step": record["step"]}, self.folder is None)

    def state_dict(self) -> Dict[str, Any]:
        return {"base": self.refined.base.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not _same_state(self.refined.base.state_dict(), state.get("base", {})):
            raise errors.UsageError("--resume: the checkpoint was trained on another --base model: give the same "
                                    "--base, or train without --resume")


def train_refine(out_dir: Path, base: VariationalFlow, pairs: int = 320, val_pairs: int = 32,
                 size: int = 96, steps: int = 400, batch_size: int = 8, lr: float = 1e-3,
                 jac_weight: float = 0.1, val_every: int = 50, seed: int = 0, max_motion: float = 6.0,
                 data_root: Optional[Path] = None, quiet: bool = False, command: str = "",
                 resume: bool = False, checkpoint_every: int = 0, on_nonfinite: str = "skip",
                 dtype: str = "float32", ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Train the refinement on synthetic pairs whose variational flows are computed once.

    Model selection: the best synthetic validation EPE (the step-0 model equals ``fpi_gd``).
    Writes ``out_dir/best_nn.pt``, ``out_dir/checkpoint_nn.pt`` (at each validation and every
    ``checkpoint_every`` steps), its JSON-lines log ``checkpoint_nn.jsonl`` and
    ``out_dir/train_nn.json``. The loop is :class:`~torchfpi.apps._trainer.Trainer`.

    Data parallel (``ctx`` from :func:`torchfpi.apps._distributed.setup`): every process draws the
    same global batch of ``batch_size`` pairs and the same Hutchinson probes for it (from shared
    generators) and trains on its interleaved rows, with the loss scaled so that DDP's gradient
    average is the gradient of the global-batch mean: N processes take the same steps as one.

    ``resume`` restores the weights, the optimiser, every RNG state (data, probes, Python, torch,
    numpy), the step, the history and the best model: the continued run is bit-identical to an
    uninterrupted one (CPU). There is no learning-rate schedule (constant ``lr``).

    Raises:
        UsageError: ``resume`` with a checkpoint written with other settings or another base.
        DataError: an unreadable checkpoint, or one that only some processes find.
        NonFiniteError: NaN/Inf with ``on_nonfinite="stop"`` (or 10 skipped steps in a row).
    """
    ctx = ctx or DistContext()
    quiet = quiet or not ctx.is_main
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    settings = {"pairs": pairs, "val_pairs": val_pairs, "size": size, "steps": steps, "batch_size": batch_size,
                "lr": lr, "jac_weight": jac_weight, "seed": seed, "max_motion": max_motion, "dtype": dtype}
    ckpt = out_dir / "checkpoint_nn.pt"
    if resume and ckpt.exists():  # read and check before the (slow) data set: a wrong --resume fails at once
        _check_resumable(ckpt, load_checkpoint(ckpt, required=CHECKPOINT_KEYS, app=RefineTask.app), settings, base)
    folder = default_texture_folder(data_root)
    if not quiet:
        print(f"textures: {'procedural noise (no data set)' if folder is None else folder}", flush=True)
    t0 = time.time()
    task = RefineTask(out_dir, base, settings, folder, ctx)
    if not quiet:
        print(f"fpi_nn: data ready in {time.time() - t0:.0f} s", flush=True)
    trainer = Trainer(task, steps=steps, val_every=val_every, checkpoint=ckpt, checkpoint_every=checkpoint_every,
                      resume=resume, ctx=ctx, on_nonfinite=on_nonfinite, log=None if quiet else _print,
                      progress=not quiet, log_prefix="fpi_nn ").fit()
    summary = {"textures": str(folder) if folder is not None else "procedural", "procedural": folder is None,
               "best": trainer.best, "history": trainer.history, "seconds": round(time.time() - t0, 1),
               "settings": settings, "skipped_steps": trainer.guard.skipped, "world_size": ctx.world_size,
               "refine_config": asdict(task.refined.config), "command": command, "machine": runtime.machine_info()}
    if ctx.is_main:
        io.atomic_write_json(summary, out_dir / "train_nn.json")
    ctx.barrier()
    return summary


def _same_state(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's base-model state ``theirs`` is this run's ``mine`` (same keys and values)."""
    return set(theirs) == set(mine) and all(torch.equal(theirs[k].to(mine[k].dtype), mine[k]) for k in mine)


def _check_resumable(path: Path, state: Dict[str, Any], settings: Dict[str, Any], base: VariationalFlow) -> None:
    """Refuse to continue a run whose data set or base model would differ from the checkpoint's."""
    for key, value in settings.items():
        if key != "steps" and state["config"].get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise errors.UsageError(f"--resume: '{path}' was written with {flag} {state['config'].get(key)}, "
                                     f"this run has {flag} {value}: resume with the same settings, or train "
                                     "without --resume")
    if not _same_state(base.state_dict(), state["task"].get("base", {})):
        raise errors.UsageError(f"--resume: '{path}' was trained on another --base model: give the same "
                                 "--base, or train without --resume")
