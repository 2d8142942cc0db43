"""Training the learned denoisers on Train400 crops with fresh noise, validation on held-out crops.

Train400 is split by image: the first ``400 - val_images`` images give random training crops
(random flips and 90-degree rotations, fresh Gaussian noise each step), the last ``val_images``
images give fixed validation crops with fixed noise. BSD68 is never touched here. The state with
the best validation PSNR is what gets exported. Checkpoints are atomic and hold everything
``--resume`` needs (model, optimiser, scheduler, RNG states, step, elapsed time, best state).

Issue 8: the loop goes through :class:`~torchfpi.apps._training.NonFiniteGuard` (a NaN/Inf loss or
gradient skips the step or stops the run), checkpoints are written only when finite and only by
rank 0 (:func:`~torchfpi.apps._training.save_checkpoint`), and under ``torchrun`` every process
draws the same global batch from the shared generator and trains on its interleaved share of the
rows (loss weighted so that DDP's gradient average is the global-batch mean); validation PSNR is
reduced over the processes, so N processes follow one process's steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from torchfpi.apps._distributed import DistContext
from torchfpi.apps._trainer import StepResult, Task, Trainer
from torchfpi.apps.denoise.models import Denoiser, build_model
from torchfpi.data.datasets import DenoisingCrops
from torchfpi.data.images import load_folder
from torchfpi.errors import DataError, UsageError
from torchfpi.runtime import seed_everything

#: Default model configurations (JSON-able; stored in checkpoints and weights).
DEFAULT_CONFIGS: Dict[str, Dict[str, Any]] = {
    "fpi_gd": {
        "energy": {"n_filters": 24, "kernel_size": 5, "n_mixture": 1,
                   "penalty_weight": 0.0005, "penalty_scale": 0.06},
        "tol": 1e-3, "max_iter": 60,
    },
    "unrolled": {
        "energy": {"n_filters": 24, "kernel_size": 5, "n_mixture": 1,
                   "penalty_weight": 0.0005, "penalty_scale": 0.06},
        "steps": 10,
    },
    "fpi_nn": {"channels": 24, "depth": 3, "tol": 1e-3, "max_iter": 40},
}


@dataclass
class TrainConfig:
    """Settings of one training run (defaults fit in well under an hour on 2 CPU cores)."""

    model: str = "fpi_gd"
    sigma: float = 25.0
    steps: int = 800
    batch_size: int = 8
    crop: int = 64
    lr: float = 5e-3
    val_images: int = 40
    val_every: int = 50
    seed: int = 0
    budget_minutes: float = 40.0
    threads: int = 1
    model_config: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    calibrate_data_weight: bool = False
    calibration_span: float = 2.0


#: ``--dtype`` choices (float64 for runs that must agree across process counts to rounding).
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def to_tensor(images: List[np.ndarray], dtype: torch.dtype = torch.float32) -> List[Tensor]:
    """Images on the [0, 255] scale as tensors on the [0, 1] scale."""
    return [torch.tensor(im / 255.0, dtype=dtype) for im in images]


def random_batch(images: List[Tensor], batch: int, crop: int, sigma: float, gen: torch.Generator):
    """Random augmented crops ``(B, 1, crop, crop)`` and their noisy versions (fresh noise)."""
    idx = torch.randint(len(images), (batch,), generator=gen)
    out = []
    for i in idx.tolist():
        im = images[i]
        h, w = im.shape
        if h < crop or w < crop:
            raise ValueError(f"crop: {crop} is larger than a training image ({h}x{w})")
        r = int(torch.randint(h - crop + 1, (1,), generator=gen))
        c = int(torch.randint(w - crop + 1, (1,), generator=gen))
        x = im[r:r + crop, c:c + crop]
        k = int(torch.randint(4, (1,), generator=gen))
        x = torch.rot90(x, k)
        if bool(torch.randint(2, (1,), generator=gen)):
            x = x.flip(1)
        out.append(x)
    clean = torch.stack(out).unsqueeze(1)
    noisy = clean + (sigma / 255.0) * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)
    return clean, noisy


def validation_set(images: List[Tensor], crop: int, sigma: float, seed: int = 1234):
    """One centre crop per held-out image with fixed noise: ``(clean, noisy)`` ``(N, 1, c, c)``."""
    gen = torch.Generator().manual_seed(seed)
    crops = []
    for im in images:
        h, w = im.shape
        r, c = (h - crop) // 2, (w - crop) // 2
        crops.append(im[r:r + crop, c:c + crop])
    clean = torch.stack(crops).unsqueeze(1)
    return clean, clean + (sigma / 255.0) * torch.randn(clean.shape, generator=gen, dtype=clean.dtype)


def batch_psnr(est: Tensor, clean: Tensor) -> float:
    """Mean PSNR (dB, [0, 255] scale, clipped estimate) over a batch ``(N, 1, H, W)`` of [0, 1] images,
    each by ``skimage.metrics.peak_signal_noise_ratio`` (measured faster here than the torch form:
    about 1.4 ms against 22 ms for 40 crops of 64x64 on 2 CPU cores).

    Example:
        >>> round(batch_psnr(torch.full((1, 1, 4, 4), 0.5), torch.full((1, 1, 4, 4), 0.6)), 4)
        20.0
    """
    from skimage.metrics import peak_signal_noise_ratio

    est64 = est.detach().clamp(0, 1).double().cpu().numpy() * 255.0
    ref64 = clean.detach().double().cpu().numpy() * 255.0
    return float(np.mean([peak_signal_noise_ratio(r, e, data_range=255.0) for r, e in zip(ref64, est64)]))


@torch.no_grad()
def evaluate(model: Denoiser, clean: Tensor, noisy: Tensor, chunk: int = 20) -> Dict[str, float]:
    """Validation PSNR, mean forward iterations and the fraction of crops whose solve converged."""
    model.eval()
    ests, its, done = [], [], []
    for i in range(0, clean.shape[0], chunk):
        ests.append(model(noisy[i:i + chunk]))
        its.append(model.last_info.iterations)
        sol = model.last_info.solution
        done.append(sol.converged.float() if sol is not None else torch.ones(ests[-1].shape[0]))
    model.train()
    return {"psnr": batch_psnr(torch.cat(ests), clean), "iterations": float(np.mean(its)),
            "converged": float(torch.cat(done).mean())}


#: Offsets of ``log lambda`` tried by :func:`calibrate_data_weight`.
def calibration_offsets(span: float) -> tuple:
    """``-span .. span`` in steps of 0.1 (``span`` rounded to a tenth)."""
    n = int(round(10 * span))
    return tuple(round(0.1 * i, 1) for i in range(-n, n + 1))


CALIBRATION_OFFSETS = calibration_offsets(2.0)


@torch.no_grad()
def calibrate_data_weight(
    model: Any, clean: Tensor, noisy: Tensor, offsets: tuple = CALIBRATION_OFFSETS,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Set the energy's data weight ``lambda`` to the best of ``lambda * exp(offsets)`` on validation crops.

    An energy trained by unrolling T gradient steps (TNRD style) is used through an early-stopped
    iterate: its exact minimiser over-smooths, and a larger ``lambda`` compensates. This picks the
    factor on the (Train400) validation crops before implicit fine-tuning starts. Only offsets whose
    solves converged on at least 95 % of the crops are candidates (an iterate stopped at the
    iteration limit is not the energy's minimiser); if none did, the best score wins.

    Args:
        model: a denoiser with an ``energy`` holding ``log_data_weight`` (changed in place).
        clean, noisy: validation crops ``(N, 1, H, W)`` on the [0, 1] scale.
        offsets: values added to ``log lambda``.

    Returns:
        ``{"offsets": [...], "psnr": [...], "chosen_offset": o, "data_weight": lambda}``.
    """
    param = model.energy.log_data_weight
    base = param.detach().clone()
    scores, converged = [], []
    for off in offsets:
        param.copy_(base + off)
        res = evaluate(model, clean, noisy)
        scores.append(res["psnr"])
        converged.append(res["converged"])
        log(f"calibrate data weight: log offset {off:+.1f} -> validation PSNR {scores[-1]:.3f} "
            f"({100 * converged[-1]:.0f} % converged)")
    ok = [s if c >= 0.95 else -math.inf for s, c in zip(scores, converged)]
    best = int(np.argmax(ok if max(ok) > -math.inf else scores))
    param.copy_(base + offsets[best])
    return {"offsets": list(offsets), "psnr": [round(v, 4) for v in scores],
            "converged": [round(c, 3) for c in converged],
            "chosen_offset": offsets[best], "data_weight": float(param.exp())}


def _validate(model: Denoiser, clean: Tensor, noisy: Tensor, ctx: DistContext) -> Dict[str, float]:
    """:func:`evaluate` on this process's interleaved share of the validation crops, reduced over
    the processes (weighted by crops), so the result is the mean over all crops."""
    if not ctx.distributed:
        return evaluate(model, clean, noisy)
    rows = ctx.shard(clean.shape[0], epoch=0, seed=0, shuffle=False)
    if len(rows) == 0:
        return ctx.reduce_mean({"psnr": 0.0, "iterations": 0.0, "converged": 0.0}, weight=0.0)
    return ctx.reduce_mean(evaluate(model, clean[rows], noisy[rows]), weight=float(len(rows)))


def check_training_data(cfg: TrainConfig, train_dir: Path, limit_images: Optional[int] = None) -> int:
    """Check the settings against the images before anything is loaded; return the image count.

    Reads only the image headers: the count must leave training images after ``cfg.val_images``
    validation images, and ``cfg.crop`` must fit in every image used.

    Raises:
        DataError: no image folder, or no PNG in it (the message names the folder).
        UsageError: ``limit_images < 1``, too few images for ``val_images``, or a crop larger than
            an image (the message names the flag and the limit).
    """
    from PIL import Image

    from torchfpi.data.images import list_images

    if limit_images is not None and limit_images < 1:
        raise UsageError(f"--limit-images: expected a positive integer, got {limit_images}")
    files = list_images(train_dir)
    if limit_images is not None:
        files = files[:limit_images]
    if len(files) <= cfg.val_images:
        raise UsageError(f"--val-images: {cfg.val_images} validation images leave none of the {len(files)} "
                         f"training images in '{train_dir}'; expected at most {len(files) - 1}")
    smallest = None
    for f in files:
        try:
            with Image.open(f) as im:
                w, h = im.size
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"'{f}' is not a readable image file ({exc})") from exc
        if smallest is None or min(h, w) < min(smallest):
            smallest = (h, w)
    if smallest is not None and cfg.crop > min(smallest):
        raise UsageError(f"--crop: {cfg.crop} is larger than the smallest training image "
                         f"({smallest[0]}x{smallest[1]} in '{train_dir}'); expected at most {min(smallest)}")
    return len(files)


class DenoiseTask(Task):
    """``train denoise``: random augmented crops with fresh noise, validation PSNR on fixed crops."""

    app = "denoise"
    metric = "val_psnr"
    mode = "max"

    def __init__(self, cfg: TrainConfig, train_dir: Path, limit_images: Optional[int],
                 init_state: Optional[Dict[str, Tensor]], ctx: DistContext, log: Callable[[str], None]) -> None:
        super().__init__()
        self.cfg, self.ctx, self.log = cfg, ctx, log
        dtype = DTYPES[cfg.dtype]
        self.generators = {"data": seed_everything(cfg.seed)}
        arrays = load_folder(train_dir, limit=limit_images)
        images = to_tensor(arrays, dtype)
        val_imgs = images[-cfg.val_images:]
        # sample i of the run is a pure function of (seed, i): a resumed run reads on at its step
        self.crops = DenoisingCrops(arrays[: -cfg.val_images], cfg.crop, cfg.sigma,
                                    length=cfg.steps * cfg.batch_size, seed=cfg.seed, dtype=dtype)
        self._loader: Optional[Iterator[Any]] = None
        self._next_step = -1
        self.val_clean, self.val_noisy = validation_set(val_imgs, cfg.crop, cfg.sigma)
        cfg.model_config = {**DEFAULT_CONFIGS[cfg.model], **cfg.model_config}
        self.model: Denoiser = build_model(cfg.model, cfg.model_config).to(dtype)
        if init_state is not None:
            # an adaptive data weight added to a trained energy starts from its fresh (seeded)
            # initialisation, whose last layer is zero: the same energy
            missing, unexpected = self.model.load_state_dict(init_state, strict=False)
            bad = [k for k in missing if not k.startswith("energy.data_net.")] + list(unexpected)
            if bad:
                raise UsageError(f"--init: the weights do not fit the model (missing or unexpected: "
                                 f"{', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''})")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)) * 0.95 + 0.05)
        self.calibration: Optional[Dict[str, Any]] = None
        self.commands: List[str] = []
        self.command: Optional[str] = None
        self.config = asdict(cfg)

    def begin(self, resumed: bool) -> None:
        if self.command:
            self.commands.append(self.command)
        if not resumed and self.cfg.calibrate_data_weight:
            if not hasattr(self.model, "energy"):
                raise UsageError(f"--calibrate-data-weight: only for energy models, not {self.cfg.model}")
            self.calibration = calibrate_data_weight(self.model, self.val_clean, self.val_noisy,
                                                     offsets=calibration_offsets(self.cfg.calibration_span),
                                                     log=self.log)
            self.log(f"calibrated data weight: {self.calibration['data_weight']:.4g} "
                     f"(log offset {self.calibration['chosen_offset']:+.1f})")

    def batch(self, step: int) -> Tuple[Tensor, Tensor]:
        """The global batch of ``step``: crops ``step * B .. (step + 1) * B - 1`` through a DataLoader."""
        b = self.cfg.batch_size
        if self._loader is None or step != self._next_step:
            order = [list(range(s * b, (s + 1) * b)) for s in range(step, self.cfg.steps)]
            self._loader = iter(DataLoader(self.crops, batch_sampler=order))
        self._next_step = step + 1
        clean, noisy = next(self._loader)
        return clean, noisy

    def train_step(self, net: nn.Module, step: int) -> StepResult:
        cfg, ctx = self.cfg, self.ctx
        clean, noisy = self.batch(step)
        share = 1.0
        if ctx.distributed:  # every process drew the same global batch: keep this process's rows
            rows = ctx.shard(cfg.batch_size, epoch=0, seed=0, shuffle=False)
            # DDP averages gradients over the processes: weight the local mean so that the
            # average equals the global-batch mean (every crop has the same number of pixels)
            share = len(rows) * ctx.world_size / cfg.batch_size
            clean, noisy = clean[rows], noisy[rows]
        loss = ((net(noisy) - clean) ** 2).mean()
        scaled = loss if share == 1.0 else loss * share
        return StepResult(scaled, {"loss": float(scaled.detach()), "train_iterations": self.model.last_info.iterations})

    def after_step(self, out: StepResult) -> None:
        info = self.model.last_info
        bwd = info.backward_iterations()
        if bwd is not None and math.isfinite(bwd):
            out.stats["train_backward_iterations"] = bwd
        # An unconverged forward or backward solve gives a wrong gradient: reject the update rather
        # than let it corrupt the energy (a non-convex prior can get there; see docs/denoise.md).
        sol = info.solution
        out.accept = not (sol is not None and (not bool(sol.converged.all()) or (
            sol.backward is not None and not bool(sol.backward.converged.all()))))

    def before_update(self) -> None:
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)

    def evaluate(self) -> Dict[str, Any]:
        val = _validate(self.model, self.val_clean, self.val_noisy, self.ctx)
        return {"val_psnr": round(val["psnr"], 4), "val_iterations": val["iterations"]}

    def state_dict(self) -> Dict[str, Any]:
        return {"calibration": self.calibration, "commands": self.commands}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.calibration, self.commands = state["calibration"], list(state["commands"])


def train_denoiser(
    cfg: TrainConfig,
    train_dir: Path,
    checkpoint: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    limit_images: Optional[int] = None,
    init_state: Optional[Dict[str, Tensor]] = None,
    ctx: Optional[DistContext] = None,
    on_nonfinite: str = "skip",
    command: Optional[str] = None,
    checkpoint_every: int = 0,
) -> Dict[str, Any]:
    """Train one denoiser; returns the export dict (kind, config, best state, training record).

    The loop is :class:`~torchfpi.apps._trainer.Trainer` (validation every ``cfg.val_every``
    steps, checkpoints there and every ``checkpoint_every`` steps, ``resume`` bit-identical to an
    uninterrupted run, the non-finite policy, progress, a JSON-lines log next to the checkpoint).

    Args:
        command: the command line of this call, appended to the run's ``commands`` (kept in the
            checkpoint, so a run resumed several times records every command that made it).
        ctx: data-parallel context from :func:`torchfpi.apps._distributed.setup` (None: one
            process). Every process needs the same ``cfg``; only rank 0 logs and writes files.
        on_nonfinite: ``"skip"`` a step whose loss or gradient is NaN/Inf, or ``"stop"`` there
            (:class:`~torchfpi.apps._training.NonFiniteError`; the last good checkpoint is kept).
        checkpoint_every: steps between checkpoints besides those at each validation (0: none).

    Raises:
        DataError: if ``resume`` and the checkpoint is unreadable or incomplete.
        UsageError: if ``cfg.dtype`` is unknown, or the images do not fit the settings
            (:func:`check_training_data`).
    """
    ctx = ctx or DistContext()
    if not ctx.is_main:
        log, progress = (lambda msg: None), False
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype: expected one of {list(DTYPES)}, got '{cfg.dtype}'")
    check_training_data(cfg, train_dir, limit_images)
    torch.set_num_threads(cfg.threads)
    task = DenoiseTask(cfg, train_dir, limit_images, init_state, ctx, log)
    trainer = Trainer(task, steps=cfg.steps, val_every=cfg.val_every, checkpoint=checkpoint,
                      checkpoint_every=checkpoint_every, resume=resume, ctx=ctx, on_nonfinite=on_nonfinite,
                      log=log, progress=progress, budget_s=cfg.budget_minutes * 60)
    task.command = command
    trainer.fit()
    best = {"psnr": trainer.best.get("val_psnr", -math.inf), "step": trainer.best.get("step", 0)}
    best_state = trainer.best_state if trainer.best_state is not None else task.model.state_dict()
    return {
        "kind": cfg.model, "sigma": cfg.sigma, "config": cfg.model_config, "state_dict": best_state,
        "train": {"steps": trainer.step, "seconds": round(trainer.elapsed, 1), "best": best,
                  "history": trainer.history, "settings": asdict(cfg), "skipped": trainer.guard.skipped,
                  "rejected": trainer.rejected, "world_size": ctx.world_size, "calibration": task.calibration,
                  "commands": task.commands},
    }
