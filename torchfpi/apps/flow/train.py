"""Training of :class:`VariationalFlow` on synthetic pairs with the implicit (backward-FPI) gradient.

Model selection uses a fixed synthetic validation set drawn with another seed: nothing of the
Middlebury test pairs is seen.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from torchfpi import errors, io, runtime
from torchfpi.apps._distributed import DistContext
from torchfpi.apps._trainer import StepResult, Task, Trainer
from torchfpi.apps._training import describe_exception
from torchfpi.apps._weights import read_weights, weights_meta
from torchfpi.apps.flow.synthetic import TextureBank, batch_epe, default_texture_folder, make_batch
from torchfpi.apps.flow.variational import FlowConfig, VariationalFlow


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


def load_weights(path: Path, device: Optional[torch.device] = None) -> VariationalFlow:
    """Load a :class:`VariationalFlow` saved by :func:`save_weights`.

    Read with ``weights_only=True``: a file holding other Python objects is refused unread.

    Raises:
        FileNotFoundError: no such file.
        DataError: not a torchfpi flow weights file, or the weights of the ``fpi_nn`` refinement
            (the message says to use ``--method fpi_nn``).
    """
    blob = read_weights(path, "flow", "torchfpi flow weights")
    if blob["meta"].get("kind") != "fpi_gd":
        raise errors.DataError(f"'{path}' holds {blob['meta'].get('kind')} flow weights, not fpi_gd: use them "
                               f"with --method {blob['meta'].get('kind')}")
    try:
        model = VariationalFlow(FlowConfig(**blob["flow_config"]))
        model.load_state_dict(blob["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise errors.DataError(f"'{path}' is not a torchfpi flow weights file ({describe_exception(exc)})") from exc
    return model.to(device or "cpu")


#: What the flow models learned from (stored in their weights' metadata).
def training_data(procedural: bool) -> str:
    """The ``data`` entry of the weights' metadata."""
    return ("synthetic pairs on procedural noise textures" if procedural
            else "synthetic pairs on Train400 image textures")


def save_weights(model: VariationalFlow, path: Path, extra: Optional[Dict[str, Any]] = None,
                 procedural: bool = False) -> None:
    """Save the learned scalars, the solver config and their metadata (a few kB), atomically."""
    blob = {"model": model.state_dict(), "flow_config": asdict(model.config), **(extra or {}),
            "meta": weights_meta("flow", "fpi_gd", asdict(model.config), data=training_data(procedural))}
    io.atomic_torch_save(blob, path)


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
