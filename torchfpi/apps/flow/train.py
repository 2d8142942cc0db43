"""Training of :class:`VariationalFlow` on synthetic pairs with the implicit (backward-FPI) gradient.

Model selection uses a fixed synthetic validation set drawn with another seed: nothing of the
Middlebury test pairs is seen.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from torchfpi import errors, io, runtime
from torchfpi.apps._distributed import DistContext, wrap
from torchfpi.apps._training import (
    NonFiniteGuard,
    describe_exception,
    first_nonfinite,
    load_checkpoint,
    restoring,
    save_checkpoint,
)
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


def train(out_dir: Path, config: TrainConfig, flow_config: Optional[FlowConfig] = None,
          data_root: Optional[Path] = None, resume: bool = False, quiet: bool = False,
          command: str = "", ctx: Optional[DistContext] = None) -> Dict[str, Any]:
    """Train, checkpointing to ``out_dir/checkpoint.pt``; the best-on-validation model goes to
    ``out_dir/best.pt``. Returns a summary dict (also written to ``out_dir/train.json``).

    Data parallel (``ctx`` from :func:`torchfpi.apps._distributed.setup`): every process draws
    the same global batch of ``config.batch_size`` pairs from the shared seed and trains on its
    interleaved shard, so N processes take the same steps as one; the validation EPE is reduced
    over the processes; only rank 0 logs and writes files. A NaN/Inf loss or gradient skips the
    step (``config.on_nonfinite == "skip"``) or stops training (``"stop"``); a checkpoint with
    non-finite weights is never written over a good one.

    ``--resume`` restores model, optimiser, scheduler, every RNG state, the step, the history and
    the best model so far; the continued run is bit-identical to an uninterrupted one (CPU).
    """
    from tqdm import tqdm

    ctx = ctx or DistContext()
    quiet = quiet or not ctx.is_main
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        io.remove_stale_temp_files(out_dir)
    gen = runtime.seed_everything(config.seed)
    folder = default_texture_folder(data_root)
    textures = str(folder) if folder is not None else "procedural"
    if not quiet:
        print(f"textures: {'procedural noise (no data set)' if folder is None else folder}", flush=True)
    bank = TextureBank(folder, limit=config.textures)
    val_gen = torch.Generator().manual_seed(10_000 + config.seed)
    val = make_batch(config.val_pairs, config.size, config.size, val_gen, bank, config.max_motion)
    val_rows = ctx.shard(config.val_pairs, epoch=0, seed=config.seed, shuffle=False)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.dtype]
    val = (val[0][val_rows].to(dtype), val[1][val_rows].to(dtype), val[2][val_rows].to(dtype))
    model = VariationalFlow(flow_config).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.steps, 1))
    guard = NonFiniteGuard(config.on_nonfinite, ctx=ctx, log=lambda msg: None if quiet else print(msg, flush=True))
    ckpt = out_dir / "checkpoint.pt"
    found = resume and ckpt.exists()
    if resume and ctx.distributed:
        seen = int(ctx.all_reduce_sum(torch.tensor([float(found)], dtype=torch.float64)))
        if 0 < seen < ctx.world_size:
            raise errors.DataError(f"--resume: '{ckpt}' exists for {seen} of {ctx.world_size} processes: "
                                    "put --out on a file system every machine sees, or copy the checkpoint")
    if found:
        state = load_checkpoint(ckpt, required=("model", "optimizer", "scheduler", "rng", "generator", "step"),
                                app="flow")
        with restoring(ckpt):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            runtime.set_rng_state(state["rng"])
            gen.set_state(state["generator"])
        step, history, best = state["step"], state["history"], state["best"]
        guard.skipped = state.get("skipped", 0)
        if not quiet:
            print(f"--resume: resumed from '{ckpt}' at step {step} of {config.steps}", flush=True)
    else:
        if resume and not quiet:
            print(f"--resume: no checkpoint at '{ckpt}': starting a fresh run", flush=True)
        step = 0
        v0 = evaluate(model, val, ctx)
        best = {"val_epe": v0, "step": 0, "params": model.describe()}
        history = [{"step": 0, "val_epe": v0}]
        if ctx.is_main:
            save_weights(model, out_dir / "best.pt", {"val_epe": v0, "step": 0}, folder is None)
    ddp_model = wrap(model, ctx)  # after loading: DDP starts by broadcasting rank 0's weights
    rows = ctx.shard(config.batch_size, epoch=0, seed=config.seed, shuffle=False)
    bar = tqdm(total=config.steps, initial=step, disable=quiet or not sys.stderr.isatty(), desc="train flow")
    t0 = time.time()
    every = config.checkpoint_every or config.val_every
    train_epe = float(history[-1].get("train_loss", float("nan")))
    while step < config.steps:
        f1, f2, gt = make_batch(config.batch_size, config.size, config.size, gen, bank, config.max_motion)
        flow, info = ddp_model(f1[rows].to(dtype), f2[rows].to(dtype))
        epe = batch_epe(flow, gt[rows].to(dtype))
        # DDP averages gradients over the processes: scale the local sum so that the result is
        # the gradient of the mean over the global batch (with one process: the plain mean).
        loss = epe.mean() if not ctx.distributed else epe.sum() * (ctx.world_size / config.batch_size)
        opt.zero_grad()
        taken = guard.backward(loss, list(model.parameters()), step + 1)
        if taken:
            opt.step()
            sched.step()
        step += 1
        step_epe = ctx.reduce_mean({"epe": float(epe.detach().mean())}, weight=len(rows))["epe"]
        train_epe = step_epe if taken else train_epe  # a skipped step's loss is not a result
        bar.update(1)
        bar.set_postfix(loss=f"{train_epe:.3f}")
        validate = step % config.val_every == 0 or step == config.steps
        if validate:
            v = evaluate(model, val, ctx)
            history.append({"step": step, "val_epe": v, "train_loss": train_epe, "params": model.describe()})
            if not quiet:
                print(f"step {step}: train EPE {train_epe:.4f}  val EPE {v:.4f}  {model.describe()}", flush=True)
            if v < best["val_epe"]:
                best = {"val_epe": v, "step": step, "params": model.describe()}
                if ctx.is_main and first_nonfinite(model.state_dict()) is None:
                    save_weights(model, out_dir / "best.pt", {"val_epe": v, "step": step}, folder is None)
        if validate or step % every == 0:
            save_checkpoint({"app": "flow",
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": runtime.rng_state(), "generator": gen.get_state(), "step": step,
                "history": history, "best": best, "skipped": guard.skipped,
                "metrics": {"train_epe": train_epe} if math.isfinite(train_epe) else {}}, ckpt, ctx)  # fmt: skip
    bar.close()
    summary = {"config": asdict(config), "flow_config": asdict(model.config), "best": best,
               "textures": textures, "procedural": folder is None,
               "history": history, "skipped_steps": guard.skipped, "world_size": ctx.world_size,
               "seconds": round(time.time() - t0, 1), "command": command,
               "machine": runtime.machine_info()}
    if ctx.is_main:
        io.atomic_write_json(summary, out_dir / "train.json")
    ctx.barrier()
    return summary
