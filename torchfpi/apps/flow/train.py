"""Training of :class:`VariationalFlow` on synthetic pairs with the implicit (backward-FPI) gradient.

Model selection uses a fixed synthetic validation set drawn with another seed: nothing of the
Middlebury test pairs is seen.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from torchfpi.apps import _common
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


def evaluate(model: VariationalFlow, val: tuple) -> float:
    """Mean EPE of ``model`` on a synthetic validation batch ``(frame1, frame2, flow)``."""
    f1, f2, gt = val
    with torch.no_grad():
        flow, _ = model(f1, f2)
    return float(batch_epe(flow, gt).mean())


def load_weights(path: Path, device: Optional[torch.device] = None) -> VariationalFlow:
    """Load a :class:`VariationalFlow` saved by :func:`save_weights` (or a training checkpoint)."""
    try:
        blob = torch.load(path, map_location=device or "cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch.load raises many types (pickle, zip, runtime) on a bad file
        raise _common.DataError(f"'{path}': cannot read flow weights ({exc})") from exc
    if not isinstance(blob, dict) or "model" not in blob or "flow_config" not in blob:
        raise _common.DataError(f"'{path}': not a torchfpi flow weights file (keys 'model', 'flow_config' missing)")
    model = VariationalFlow(FlowConfig(**blob["flow_config"]))
    model.load_state_dict(blob["model"])
    return model.to(device or "cpu")


def save_weights(model: VariationalFlow, path: Path, extra: Optional[Dict[str, Any]] = None) -> None:
    """Save the learned scalars and the solver config (a few kB), atomically."""
    blob = {"model": model.state_dict(), "flow_config": asdict(model.config), **(extra or {})}
    _common.atomic_torch_save(blob, path)


def train(out_dir: Path, config: TrainConfig, flow_config: Optional[FlowConfig] = None,
          data_root: Optional[Path] = None, resume: bool = False, quiet: bool = False,
          command: str = "") -> Dict[str, Any]:
    """Train, checkpointing to ``out_dir/checkpoint.pt``; the best-on-validation model goes to
    ``out_dir/best.pt``. Returns a summary dict (also written to ``out_dir/train.json``).
    """
    from tqdm import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    gen = _common.seed_everything(config.seed)
    bank = TextureBank(default_texture_folder(data_root), limit=config.textures)
    val_gen = torch.Generator().manual_seed(10_000 + config.seed)
    val = make_batch(config.val_pairs, config.size, config.size, val_gen, bank, config.max_motion)
    model = VariationalFlow(flow_config)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(config.steps, 1))
    step, history = 0, []
    best = {"val_epe": evaluate(model, val), "step": 0, "params": model.describe()}
    history.append({"step": 0, "val_epe": best["val_epe"]})
    save_weights(model, out_dir / "best.pt", {"val_epe": best["val_epe"], "step": 0})
    ckpt = out_dir / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _common.set_rng_state(state["rng"])
        gen.set_state(state["generator"])
        step, history, best = state["step"], state["history"], state["best"]
    bar = tqdm(total=config.steps, initial=step, disable=quiet or not sys.stderr.isatty(), desc="train flow")
    t0 = time.time()
    while step < config.steps:
        f1, f2, gt = make_batch(config.batch_size, config.size, config.size, gen, bank, config.max_motion)
        flow, info = model(f1, f2)
        loss = batch_epe(flow, gt).mean()
        _common.finite_or_raise(loss.detach(), "training loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if step % config.val_every == 0 or step == config.steps:
            v = evaluate(model, val)
            history.append({"step": step, "val_epe": v, "train_loss": float(loss.detach()), "params": model.describe()})
            if not quiet:
                print(f"step {step}: train EPE {float(loss.detach()):.4f}  val EPE {v:.4f}  {model.describe()}", flush=True)
            if v < best["val_epe"]:
                best = {"val_epe": v, "step": step, "params": model.describe()}
                save_weights(model, out_dir / "best.pt", {"val_epe": v, "step": step})
            _common.atomic_torch_save({
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "rng": _common.rng_state(), "generator": gen.get_state(), "step": step,
                "history": history, "best": best}, ckpt)  # fmt: skip
    bar.close()
    summary = {"config": asdict(config), "flow_config": asdict(model.config), "best": best,
               "history": history, "seconds": round(time.time() - t0, 1), "command": command,
               "machine": _common.machine_info()}
    _common.atomic_write_json(summary, out_dir / "train.json")
    return summary
