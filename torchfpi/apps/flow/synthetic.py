"""Synthetic training pairs made on the fly: textured layers moved by smooth, affine and
piecewise-rigid flows with occlusions (FlyingChairs-like), plus photometric changes.

Textures are crops of grey images (e.g. the Train400 denoising set, never a flow test set) or,
when no image folder is given, procedural multi-scale noise. A pair is built from a background
layer (affine plus a smooth random field) and 1-3 foreground objects (ellipses or rotated
rectangles with their own texture and affine motion) composited back to front; the ground truth
of a first-frame pixel is the motion of the layer on top there, so occluded pixels keep their
true flow as in Middlebury.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from torchfpi.apps.flow import _ops


class TextureBank:
    """Grey textures ``(H, W)`` in [0, 255] to crop from: image files, or procedural noise."""

    def __init__(self, folder: Optional[Path] = None, limit: int = 400) -> None:
        self.images: List[torch.Tensor] = []
        if folder is not None:
            files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".bmp"))
            for p in files[:limit]:
                self.images.append(_ops.to_grey_tensor(_ops.read_image(p))[0, 0])

    def crop(self, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        """A random ``(h, w)`` texture (random crop, flip and contrast of a bank image, or noise)."""
        if self.images:
            img = self.images[int(torch.randint(len(self.images), (1,), generator=gen))]
            if img.shape[0] < h or img.shape[1] < w:
                img = F.interpolate(img[None, None], size=(max(h, img.shape[0]), max(w, img.shape[1])),
                                    mode="bilinear", align_corners=False)[0, 0]
            y = int(torch.randint(img.shape[0] - h + 1, (1,), generator=gen))
            x = int(torch.randint(img.shape[1] - w + 1, (1,), generator=gen))
            out = img[y : y + h, x : x + w].clone()
            if bool(torch.rand(1, generator=gen) < 0.5):
                out = out.flip(-1)
            return out
        out = torch.zeros(h, w)
        for octave in range(5):
            s = 2**octave
            noise = torch.rand(1, 1, h // s + 2, w // s + 2, generator=gen)
            out += F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0, 0] / (1.6**octave)
        out = (out - out.min()) / (out.max() - out.min() + 1e-6)
        return out * 255


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(1, generator=gen))


def _affine_flow(h: int, w: int, gen: torch.Generator, max_shift: float, max_rot: float,
                 max_scale: float, centre: Tuple[float, float]) -> torch.Tensor:
    """Affine flow ``(2, H, W)``: rotation and scale about ``centre`` plus a translation."""
    grid = _ops.pixel_grid(h, w, torch.device("cpu"), torch.float32)[0]
    th, sc = _uniform(gen, -max_rot, max_rot), 1 + _uniform(gen, -max_scale, max_scale)
    tx, ty = _uniform(gen, -max_shift, max_shift), _uniform(gen, -max_shift, max_shift)
    x, y = grid[0] - centre[0], grid[1] - centre[1]
    c, s = math.cos(th) * sc, math.sin(th) * sc
    return torch.stack([c * x - s * y - x + tx, s * x + c * y - y + ty])


def _smooth_field(h: int, w: int, gen: torch.Generator, amplitude: float) -> torch.Tensor:
    coarse = torch.randn(1, 2, 4, 4, generator=gen) * amplitude
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]


def _shape_mask(h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """An anti-aliased ellipse or rotated rectangle mask ``(H, W)`` in [0, 1]."""
    grid = _ops.pixel_grid(h, w, torch.device("cpu"), torch.float32)[0]
    cx, cy = _uniform(gen, 0.15, 0.85) * w, _uniform(gen, 0.15, 0.85) * h
    rx, ry = _uniform(gen, 0.08, 0.3) * w, _uniform(gen, 0.08, 0.3) * h
    th = _uniform(gen, 0, math.pi)
    x, y = grid[0] - cx, grid[1] - cy
    xr, yr = math.cos(th) * x + math.sin(th) * y, -math.sin(th) * x + math.cos(th) * y
    if bool(torch.rand(1, generator=gen) < 0.5):
        dist = torch.sqrt((xr / rx) ** 2 + (yr / ry) ** 2) - 1
        sdf = dist * min(rx, ry)
    else:
        sdf = torch.maximum(xr.abs() - rx, yr.abs() - ry)
    return torch.clamp(0.5 - sdf, 0, 1)


def _sample(img: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Sample ``img (C, H, W)`` at absolute positions ``pos (2, H, W)`` (zeros outside)."""
    h, w = img.shape[-2:]
    grid = torch.stack([2 * pos[0] / (w - 1) - 1, 2 * pos[1] / (h - 1) - 1], dim=-1)[None]
    return F.grid_sample(img[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]


def _inverse_positions(flow: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """For each frame-2 pixel y, x with x + flow(x) = y (fixed-point iteration; flow extended by borders)."""
    h, w = flow.shape[-2:]
    y = _ops.pixel_grid(h, w, torch.device("cpu"), torch.float32)[0]
    x = y - flow
    for _ in range(iterations):
        fx, _ = _ops.warp(flow[None], (x - y)[None])
        x = y - fx[0]
    return x


def make_pair(h: int, w: int, gen: torch.Generator, bank: TextureBank, max_motion: float = 6.0
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One synthetic pair: ``(frame1 (1, H, W), frame2 (1, H, W), flow (2, H, W))``, frames in [0, 255]."""
    margin = int(math.ceil(2 * max_motion)) + 4
    hh, ww = h + 2 * margin, w + 2 * margin
    centre = (ww / 2, hh / 2)
    bg_flow = _affine_flow(hh, ww, gen, max_motion * 0.6, 0.04, 0.05, centre)
    bg_flow += _smooth_field(hh, ww, gen, _uniform(gen, 0, 0.3 * max_motion))
    layers = [(bank.crop(hh, ww, gen), torch.ones(hh, ww), bg_flow)]
    for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
        mask = _shape_mask(hh, ww, gen)
        ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
        c = (float(xs.float().mean()), float(ys.float().mean())) if len(xs) else centre
        fl = _affine_flow(hh, ww, gen, max_motion, 0.12, 0.1, c)
        layers.append((bank.crop(hh, ww, gen), mask, fl))
    frame1 = torch.zeros(hh, ww)
    frame2 = torch.zeros(hh, ww)
    gt = torch.zeros(2, hh, ww)
    for tex, mask, fl in layers:
        frame1 = mask * tex + (1 - mask) * frame1
        gt = torch.where(mask[None] > 0.5, fl, gt)
        pos = _inverse_positions(fl)
        both = _sample(torch.stack([tex, mask]), pos)
        m2 = both[1] if mask.min() < 1 else torch.ones(hh, ww)
        t2 = both[0] if mask.min() < 1 else _sample(tex[None], pos.clamp_min(0))[0]
        frame2 = m2 * t2 + (1 - m2) * frame2
    sl = (slice(margin, margin + h), slice(margin, margin + w))
    frame1, frame2, gt = frame1[sl], frame2[sl], gt[(slice(None),) + sl]
    # photometric changes and sensor noise
    frame2 = frame2 * _uniform(gen, 0.9, 1.1) + _uniform(gen, -8, 8)
    noise = _uniform(gen, 0, 2.0)
    frame1 = frame1 + noise * torch.randn(h, w, generator=gen)
    frame2 = frame2 + noise * torch.randn(h, w, generator=gen)
    return frame1.clamp(0, 255)[None], frame2.clamp(0, 255)[None], gt


def make_batch(n: int, h: int, w: int, gen: torch.Generator, bank: TextureBank,
               max_motion: float = 6.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` pairs stacked: ``(frame1 (n, 1, H, W), frame2 (n, 1, H, W), flow (n, 2, H, W))``."""
    pairs = [make_pair(h, w, gen, bank, max_motion) for _ in range(n)]
    return tuple(torch.stack(t) for t in zip(*pairs))  # type: ignore[return-value]


def batch_epe(flow: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-sample mean end-point error ``(B,)`` of flows ``(B, 2, H, W)`` (all truth known)."""
    return torch.sqrt(((flow - truth) ** 2).sum(1) + 1e-8).flatten(1).mean(1)


def default_texture_folder(root: Optional[Path]) -> Optional[Path]:
    """``<data root>/denoise/Train400`` when it exists (never a flow test set), else ``None``."""
    if root is None:
        return None
    cand = Path(root) / "denoise" / "Train400"
    return cand if cand.is_dir() else None


__all__: Sequence[str] = ["TextureBank", "make_pair", "make_batch", "batch_epe", "default_texture_folder"]
