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
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

import torchfpi
from torchfpi.apps import _common
from torchfpi.apps._training import describe_exception
from torchfpi.apps.flow import _ops
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
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

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
        return sol.value

    def forward(self, frame1: torch.Tensor, frame2: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """Flow from ``frame1`` to ``frame2`` (grey ``(B, 1, H, W)``, [0, 255]) and solve info."""
        with torch.no_grad():
            zgd, info = self.base(frame1, frame2)
        flow = self.refine(zgd, frame1, frame2)
        info = dict(info)
        info["refine_iterations"] = self.last_iterations
        return flow, info


def save_refined(model: RefinedFlow, path: Path, extra: Optional[Dict[str, Any]] = None) -> None:
    """Save base and refinement weights with their configs, atomically."""
    blob = {"base": model.base.state_dict(), "flow_config": asdict(model.base.config),
            "update": model.update.state_dict(), "refine_config": asdict(model.config), **(extra or {})}
    _common.atomic_torch_save(blob, path)


def load_refined(path: Path) -> RefinedFlow:
    """Load what :func:`save_refined` wrote."""
    from torchfpi.apps.flow.variational import FlowConfig

    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load raises many types on a bad file
        raise _common.DataError(f"'{path}': cannot read fpi_nn flow weights ({describe_exception(exc)})") from exc
    if not isinstance(blob, dict) or "update" not in blob:
        raise _common.DataError(f"'{path}': not a torchfpi fpi_nn flow weights file")
    base = VariationalFlow(FlowConfig(**blob["flow_config"]))
    base.load_state_dict(blob["base"])
    model = RefinedFlow(base, RefineConfig(**blob["refine_config"]))
    model.update.load_state_dict(blob["update"])
    return model


def train_refine(out_dir: Path, base: VariationalFlow, pairs: int = 320, val_pairs: int = 32,
                 size: int = 96, steps: int = 400, batch_size: int = 8, lr: float = 1e-3,
                 jac_weight: float = 0.1, val_every: int = 50, seed: int = 0, max_motion: float = 6.0,
                 data_root: Optional[Path] = None, quiet: bool = False, command: str = "") -> Dict[str, Any]:
    """Train the refinement on synthetic pairs whose variational flows are computed once.

    Model selection: the best synthetic validation EPE (the step-0 model equals ``fpi_gd``).
    Writes ``out_dir/best_nn.pt`` and ``out_dir/train_nn.json``.
    """
    from torchfpi.apps.flow.synthetic import (
        TextureBank,
        batch_epe,
        default_texture_folder,
        make_batch,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = _common.seed_everything(seed + 1)
    bank = TextureBank(default_texture_folder(data_root))
    t0 = time.time()

    def dataset(n: int, g: torch.Generator) -> Tuple[torch.Tensor, ...]:
        f1, f2, gt = make_batch(n, size, size, g, bank, max_motion)
        with torch.no_grad():
            zgd = torch.cat([base(f1[i : i + 16], f2[i : i + 16])[0] for i in range(0, n, 16)])
        return f1, f2, gt, zgd

    train_set = dataset(pairs, gen)
    val_set = dataset(val_pairs, torch.Generator().manual_seed(20_000 + seed))
    model = RefinedFlow(base)
    opt = torch.optim.Adam(model.update.parameters(), lr=lr)

    def evaluate() -> float:
        f1, f2, gt, zgd = val_set
        with torch.no_grad():
            return float(batch_epe(model.refine(zgd, f1, f2), gt).mean())

    history = [{"step": 0, "val_epe": evaluate()}]
    best = dict(history[0])
    save_refined(model, out_dir / "best_nn.pt", {"val_epe": best["val_epe"], "step": 0})
    if not quiet:
        print(f"fpi_nn: data ready in {time.time() - t0:.0f} s; step 0 val EPE {best['val_epe']:.4f}", flush=True)
    for step in range(1, steps + 1):
        idx = torch.randint(pairs, (batch_size,), generator=gen)
        f1, f2, gt, zgd = (t[idx] for t in train_set)
        flow = model.refine(zgd, f1, f2)
        loss = batch_epe(flow, gt).mean()
        if jac_weight > 0:
            x = torch.cat([zgd, f1 / 255.0, f2 / 255.0], dim=1)
            loss = loss + jac_weight * torchfpi.jacobian_penalty(model.update, flow.detach(), x).mean()
        _common.finite_or_raise(loss.detach(), "fpi_nn training loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % val_every == 0 or step == steps:
            v = evaluate()
            history.append({"step": step, "val_epe": v, "train_loss": float(loss.detach())})
            if not quiet:
                print(f"fpi_nn step {step}: loss {float(loss.detach()):.4f} val EPE {v:.4f}", flush=True)
            if v < best["val_epe"]:
                best = {"step": step, "val_epe": v}
                save_refined(model, out_dir / "best_nn.pt", {"val_epe": v, "step": step})
    summary = {"best": best, "history": history, "seconds": round(time.time() - t0, 1),
               "settings": {"pairs": pairs, "val_pairs": val_pairs, "size": size, "steps": steps,
                            "batch_size": batch_size, "lr": lr, "jac_weight": jac_weight, "seed": seed},
               "refine_config": asdict(model.config), "command": command, "machine": _common.machine_info()}
    _common.atomic_write_json(summary, out_dir / "train_nn.json")
    return summary
