"""Training the learned denoisers on Train400 crops with fresh noise, validation on held-out crops.

Train400 is split by image: the first ``400 - val_images`` images give random training crops
(random flips and 90-degree rotations, fresh Gaussian noise each step), the last ``val_images``
images give fixed validation crops with fixed noise. BSD68 is never touched here. The state with
the best validation PSNR is what gets exported. Checkpoints are atomic and hold everything
``--resume`` needs (model, optimiser, scheduler, RNG states, step, elapsed time, best state).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from torchfpi.apps._common import (
    atomic_torch_save,
    rng_state,
    seed_everything,
    set_rng_state,
)
from torchfpi.apps.denoise._models import build_model
from torchfpi.data.images import load_folder

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


def _to_tensor(images: List[np.ndarray]) -> List[Tensor]:
    return [torch.tensor(im / 255.0, dtype=torch.float32) for im in images]


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
    noisy = clean + (sigma / 255.0) * torch.randn(clean.shape, generator=gen)
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
    return clean, clean + (sigma / 255.0) * torch.randn(clean.shape, generator=gen)


def batch_psnr(est: Tensor, clean: Tensor) -> float:
    """Mean PSNR (dB, [0, 255] scale, clipped estimate) over a batch of [0, 1] images."""
    mse = ((est.clamp(0, 1) - clean) ** 2).flatten(1).mean(1) * 255.0**2
    return float((10 * torch.log10(255.0**2 / mse)).mean())


@torch.no_grad()
def evaluate(model: nn.Module, clean: Tensor, noisy: Tensor, chunk: int = 20) -> Dict[str, float]:
    """Validation PSNR and mean forward iterations."""
    model.eval()
    ests, its = [], []
    for i in range(0, clean.shape[0], chunk):
        ests.append(model(noisy[i:i + chunk]))
        its.append(model.last_info.iterations)
    model.train()
    return {"psnr": batch_psnr(torch.cat(ests), clean), "iterations": float(np.mean(its))}


def train(
    cfg: TrainConfig,
    train_dir: Path,
    checkpoint: Path,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    limit_images: Optional[int] = None,
    init_state: Optional[Dict[str, Tensor]] = None,
) -> Dict[str, Any]:
    """Train one denoiser; returns the export dict (kind, config, best state, training record)."""
    torch.set_num_threads(cfg.threads)
    gen = seed_everything(cfg.seed)
    images = _to_tensor(load_folder(train_dir, limit=limit_images))
    if len(images) <= cfg.val_images:
        raise ValueError(f"val_images: need fewer than the {len(images)} training images, got {cfg.val_images}")
    train_imgs, val_imgs = images[: -cfg.val_images], images[-cfg.val_images:]
    val_clean, val_noisy = validation_set(val_imgs, cfg.crop, cfg.sigma)
    mcfg = {**DEFAULT_CONFIGS[cfg.model], **cfg.model_config}
    cfg.model_config = mcfg
    model = build_model(cfg.model, mcfg)
    if init_state is not None:
        model.load_state_dict(init_state)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)) * 0.95 + 0.05)
    step, elapsed, best, history = 0, 0.0, {"psnr": -math.inf}, []
    best_state = None
    if resume and checkpoint.exists():
        ck = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        gen.set_state(ck["generator"])
        step, elapsed, best, history = ck["step"], ck["elapsed"], ck["best"], ck["history"]
        best_state = ck["best_state"]
        log(f"resumed from {checkpoint} at step {step}")

    def save() -> None:
        atomic_torch_save({
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "rng": rng_state(), "generator": gen.get_state(), "step": step, "elapsed": elapsed,
            "best": best, "history": history, "best_state": best_state, "config": asdict(cfg),
        }, checkpoint)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.model} sigma {cfg.sigma:g}")
    fwd_its: List[float] = []
    bwd_its: List[float] = []
    skipped = 0
    if step == 0:  # the starting point is a candidate too (it matters when fine-tuning)
        val = evaluate(model, val_clean, val_noisy)
        history.append({"step": 0, "elapsed": 0.0, "val_psnr": round(val["psnr"], 4),
                        "val_iterations": val["iterations"]})
        log(f"step 0 {history[-1]}")
        best = {"psnr": val["psnr"], "step": 0}
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    while step < cfg.steps and elapsed < cfg.budget_minutes * 60:
        t0 = time.perf_counter()
        clean, noisy = random_batch(train_imgs, cfg.batch_size, cfg.crop, cfg.sigma, gen)
        est = model(noisy)
        loss = ((est - clean) ** 2).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is not finite at step {step}")
        opt.zero_grad()
        loss.backward()
        sol = model.last_info.solution
        # An unconverged forward or backward solve gives a wrong gradient: skip the update rather
        # than let it corrupt the energy (a non-convex prior can get there; see docs/denoise.md).
        bad = sol is not None and (not bool(sol.converged.all()) or (
            sol.backward is not None and not bool(sol.backward.converged.all())))
        if bad:
            skipped += 1
        else:
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        step += 1
        elapsed += time.perf_counter() - t0
        fwd_its.append(model.last_info.iterations)
        bwd_its.append(model.last_info.backward_iterations())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.2e}", it=f"{fwd_its[-1]:.0f}")
        if step % cfg.val_every == 0 or step >= cfg.steps:
            val = evaluate(model, val_clean, val_noisy)
            rec = {"step": step, "elapsed": round(elapsed, 1), "val_psnr": round(val["psnr"], 4),
                   "val_iterations": val["iterations"],
                   "train_iterations": float(np.mean(fwd_its)) if fwd_its else 0.0,
                   "train_backward_iterations": float(np.nanmean(bwd_its))
                   if np.isfinite(bwd_its).any() else None, "skipped_updates": skipped}
            fwd_its, bwd_its = [], []
            history.append(rec)
            log(f"step {step} {rec}")
            if val["psnr"] > best["psnr"]:
                best = {"psnr": val["psnr"], "step": step}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save()
    if bar is not None:
        bar.close()
    if best_state is None:
        best_state = model.state_dict()
    save()
    return {
        "kind": cfg.model, "sigma": cfg.sigma, "config": mcfg, "state_dict": best_state,
        "train": {"steps": step, "seconds": round(elapsed, 1), "best": best, "history": history,
                  "settings": asdict(cfg)},
    }
