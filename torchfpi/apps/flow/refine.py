"""``fpi_nn``: an FPI_NN refinement of the variational flow, in the spirit of recurrent refinement.

Given the variational flow ``z_gd`` (the ``fpi_gd`` model) and the frames, the refined flow is
the fixed point of a small convolutional update (``torchfpi.FPINN``):

    z* = f(z*, x),   f(z, x) = z_gd + h_theta(z - z_gd, I2(. + z) - I1, I1)

``h_theta`` sees the brightness residual of the current flow, so its fixed point is a flow that
the network judges consistent with the frames. Its last layer starts at zero (``z* = z_gd`` before
training) and the forward solve is damped; training uses the implicit gradient plus a small
Jacobian penalty (Hutchinson) that keeps ``f`` contractive.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, cast

import torch
import torch.nn as nn

import torchfpi
from torchfpi import errors, io, runtime
from torchfpi.apps._distributed import DistContext
from torchfpi.apps._trainer import CHECKPOINT_KEYS, StepResult, Task, Trainer
from torchfpi.apps._training import describe_exception, load_checkpoint
from torchfpi.apps._weights import read_weights, weights_meta
from torchfpi.apps.flow import _ops
from torchfpi.apps.flow.synthetic import TextureBank, batch_epe, default_texture_folder, make_batch
from torchfpi.apps.flow.variational import VariationalFlow


class RefineUpdate(nn.Module):
    """``f(z, x) = z_gd + h(z - z_gd, residual, image)``; ``x = [z_gd, I1, I2]`` ``(B, 4, H, W)``, frames / 255."""

    def __init__(self, hidden: int = 24) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(6, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2), nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(hidden, 2, 3, padding=1),
        )  # fmt: skip
        last = self.net[-1]
        if isinstance(last, nn.Conv2d):  # h starts at zero: z* = z_gd before training
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)  # type: ignore[arg-type]  # bias=True: a tensor

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        zgd, i1, i2 = x[:, :2], x[:, 2:3], x[:, 3:4]
        i2w, inside = _ops.warp(i2, z)
        res = (i2w - i1) * inside
        gx, gy = _ops.gradient(i1)
        feats = torch.cat([z - zgd, 10 * res, i1 - 0.5, 4 * gx, 4 * gy], dim=1)
        return zgd + self.net(feats)


@dataclass
class RefineConfig:
    """Solver settings of the refinement (not learned)."""

    hidden: int = 24
    damping: float = 0.5
    max_iter: int = 30
    tol: float = 1e-4


class RefinedFlow(nn.Module):
    """``fpi_nn``: the variational flow (frozen) refined by an FPI_NN layer (see module doc)."""

    def __init__(self, base: VariationalFlow, config: Optional[RefineConfig] = None) -> None:
        super().__init__()
        self.config = config or RefineConfig()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.update = RefineUpdate(self.config.hidden)
        self.last_iterations = 0
        self.layer = torchfpi.FPINN(self.update, solver=torchfpi.FPI(damping=self.config.damping),
                                    tol=self.config.tol, max_iter=self.config.max_iter,
                                    backward_tol=self.config.tol, backward_max_iter=self.config.max_iter,
                                    on_failure="ignore")

    def refine(self, zgd: torch.Tensor, frame1: torch.Tensor, frame2: torch.Tensor) -> torch.Tensor:
        """Refined flow ``(B, 2, H, W)`` from the variational flow ``zgd`` and frames in [0, 255]."""
        x = torch.cat([zgd.detach(), frame1 / 255.0, frame2 / 255.0], dim=1)
        sol = self.layer.solve(x, z0=zgd.detach())
        self.last_iterations = int(sol.iterations[0])
        return cast(torch.Tensor, sol.value)  # a tensor z0 gives a tensor value

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Flow from ``frame1`` to ``frame2`` (grey ``(B, 1, H, W)``, [0, 255]) and solve info."""
        with torch.no_grad():
            zgd, info = self.base(frame1, frame2)
        flow = self.refine(zgd, frame1, frame2)
        info = dict(info)
        info["refine_iterations"] = self.last_iterations
        return flow, info


def save_refined(model: RefinedFlow, path: Path, extra: Optional[Dict[str, Any]] = None,
                 procedural: bool = False) -> None:
    """Save base and refinement weights with their configs and metadata, atomically."""
    from torchfpi.apps.flow.train import training_data

    arch = {"flow_config": asdict(model.base.config), "refine_config": asdict(model.config)}
    blob = {"base": model.base.state_dict(), "flow_config": asdict(model.base.config),
            "update": model.update.state_dict(), "refine_config": asdict(model.config), **(extra or {}),
            "meta": weights_meta("flow", "fpi_nn", arch, data=training_data(procedural))}
    io.atomic_torch_save(blob, path)


def load_refined(path: Path) -> RefinedFlow:
    """Load what :func:`save_refined` wrote (``weights_only=True``: never runs code from the file).

    Raises:
        FileNotFoundError: no such file.
        DataError: not a torchfpi flow weights file, or ``fpi_gd`` weights (use ``--method fpi_gd``).
    """
    from torchfpi.apps.flow.variational import FlowConfig

    blob = read_weights(path, "flow", "torchfpi flow weights")
    if blob["meta"].get("kind") != "fpi_nn":
        raise errors.DataError(f"'{path}' holds {blob['meta'].get('kind')} flow weights, not fpi_nn: use them "
                               f"with --method {blob['meta'].get('kind')}")
    try:
        base = VariationalFlow(FlowConfig(**blob["flow_config"]))
        base.load_state_dict(blob["base"])
        model = RefinedFlow(base, RefineConfig(**blob["refine_config"]))
        model.update.load_state_dict(blob["update"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise errors.DataError(f"'{path}' is not a torchfpi flow weights file ({describe_exception(exc)})") from exc
    return model


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
        mine = self.refined.base.state_dict()
        theirs = state.get("base", {})
        if set(theirs) != set(mine) or any(not torch.equal(theirs[k].to(mine[k].dtype), mine[k]) for k in mine):
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


def _print(msg: str) -> None:
    print(msg, flush=True)


def _check_resumable(path: Path, state: Dict[str, Any], settings: Dict[str, Any], base: VariationalFlow) -> None:
    """Refuse to continue a run whose data set or base model would differ from the checkpoint's."""
    for key, value in settings.items():
        if key != "steps" and state["config"].get(key) != value:
            flag = "--" + key.replace("_", "-")
            raise errors.UsageError(f"--resume: '{path}' was written with {flag} {state['config'].get(key)}, "
                                     f"this run has {flag} {value}: resume with the same settings, or train "
                                     "without --resume")
    mine, theirs = base.state_dict(), state["task"].get("base", {})
    if set(theirs) != set(mine) or any(not torch.equal(theirs[k].to(mine[k].dtype), mine[k])
                                              for k in mine):
        raise errors.UsageError(f"--resume: '{path}' was trained on another --base model: give the same "
                                 "--base, or train without --resume")
