"""Tests of the flow application: .flo I/O, EPE, warping, Horn-Schunck, the learned model, CLI."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from torchfpi.apps.flow import _ops
from torchfpi.apps.flow.baselines import horn_schunck, horn_schunck_step
from torchfpi.apps.flow.models import FlowConfig, VariationalFlow
from torchfpi.apps.flow.synthetic import TextureBank, batch_epe, make_batch
from torchfpi.data.flo import (
    end_point_error,
    flow_to_color,
    read_flo,
    valid_mask,
    write_flo,
    write_flow_png,
)
from torchfpi.errors import DataError, UsageError

WEIGHTS = Path(__file__).resolve().parents[1] / "torchfpi" / "weights" / "flow_fpi_gd.pt"


def _texture(h: int, w: int, seed: int = 0, sigma: float = 1.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return _ops.gaussian_blur(torch.rand(1, 1, h, w, generator=gen) * 255, sigma)


def _translated_pair(h: int, w: int, u: float, v: float, seed: int = 0):
    """frame1(x) = frame2(x + (u, v)): the true flow from frame1 to frame2 is (u, v) everywhere."""
    frame2 = _texture(h, w, seed)
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0], flow[:, 1] = u, v
    frame1, _ = _ops.warp(frame2, flow, mode="bicubic")
    return frame1, frame2


# ---------------------------------------------------------------- .flo files and EPE
def test_flo_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(7, 11, 2)).astype(np.float32)
    flow[2, 3] = 1e10  # unknown value survives the round trip
    path = tmp_path / "a.flo"
    write_flo(path, flow)
    assert path.stat().st_size == 12 + 7 * 11 * 8
    back = read_flo(path)
    assert back.shape == (7, 11, 2) and back.dtype == np.float32
    np.testing.assert_array_equal(back, flow)
    # torch (2, H, W) input is written in the same layout
    write_flo(tmp_path / "b.flo", torch.from_numpy(flow).permute(2, 0, 1))
    np.testing.assert_array_equal(read_flo(tmp_path / "b.flo"), flow)


def test_flo_header_layout(tmp_path):
    path = tmp_path / "c.flo"
    write_flo(path, np.zeros((2, 3, 2), np.float32))
    magic, w, h = struct.unpack("<fii", path.read_bytes()[:12])
    assert (magic, w, h) == (202021.25, 3, 2)


def test_flo_errors(tmp_path):
    bad = tmp_path / "bad.flo"
    bad.write_bytes(struct.pack("<fii", 123.0, 2, 2) + b"\0" * 32)
    with pytest.raises(DataError, match="magic number"):
        read_flo(bad)
    short = tmp_path / "short.flo"
    short.write_bytes(struct.pack("<fii", 202021.25, 4, 4) + b"\0" * 40)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_flo(short)
    tiny = tmp_path / "tiny.flo"
    tiny.write_bytes(b"\0\0")
    with pytest.raises(DataError, match="truncated .flo header"):
        read_flo(tiny)
    with pytest.raises(FileNotFoundError):
        read_flo(tmp_path / "missing.flo")
    with pytest.raises(ValueError, match=r"expected an array \(H, W, 2\)"):
        write_flo(tmp_path / "x.flo", np.zeros((3, 3)))


def test_epe_hand_computed_with_unknown_mask():
    est = np.zeros((1, 3, 2), np.float32)
    gt = np.array([[[3.0, 4.0], [0.0, 1.0], [2e9, 0.0]]], np.float32)
    # pixel 0: |(3, 4)| = 5; pixel 1: |(0, 1)| = 1; pixel 2 unknown (skipped) -> (5 + 1) / 2
    assert end_point_error(est, gt) == pytest.approx(3.0)
    assert valid_mask(gt).tolist() == [[True, True, False]]
    with pytest.raises(ValueError, match="shape"):
        end_point_error(np.zeros((2, 3, 2)), gt)
    with pytest.raises(ValueError, match="no known pixel"):
        end_point_error(est, np.full((1, 3, 2), 1e10, np.float32))


def test_color_wheel_image(tmp_path):
    flow = np.zeros((4, 5, 2), np.float32)
    flow[0, 0] = (1.0, 0.0)
    flow[1, 1] = (1e10, 1e10)
    img = flow_to_color(flow)
    assert img.shape == (4, 5, 3) and img.dtype == np.uint8
    assert (img[2, 2] == 255).all()  # zero motion is white
    assert (img[1, 1] == 0).all()  # unknown is black
    assert img[0, 0].tolist() != [255, 255, 255]
    assert write_flow_png(tmp_path / "f.png", flow) == (4, 5)
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- warping
def test_warp_direction_known_shift():
    h, w = 6, 9
    ramp = torch.arange(w, dtype=torch.float32).repeat(h, 1)[None, None]  # I2(x, y) = x
    flow = torch.zeros(1, 2, h, w)
    flow[:, 0] = 2.0  # pixel x of frame1 moves to x + 2 in frame2
    out, inside = _ops.warp(ramp, flow)
    # backward warping samples frame2 at x + u: out(x) = x + 2 where x + 2 is inside
    assert torch.allclose(out[0, 0, :, : w - 2], ramp[0, 0, :, : w - 2] + 2)
    assert inside[0, 0, :, : w - 2].all() and not inside[0, 0, :, w - 1].any()
    with pytest.raises(ValueError, match="flow must be"):
        _ops.warp(ramp, torch.zeros(1, 2, h, w + 1))


def test_resize_flow_scales_vectors():
    flow = torch.ones(1, 2, 9, 9)
    big = _ops.resize_flow(flow, (17, 17))
    assert torch.allclose(big, torch.full_like(big, 2.0))


# ---------------------------------------------------------------- Horn-Schunck as an FPI
def test_horn_schunck_synthetic_translation():
    f1, f2 = _translated_pair(48, 64, 1.5, -0.7)
    with torch.no_grad():
        flow, info = horn_schunck(f1, f2, alpha=4.0)
    inner = flow[0, :, 8:-8, 8:-8].mean(dim=(1, 2))
    assert inner.tolist() == pytest.approx([1.5, -0.7], abs=0.1)
    assert info["solves"] >= 3 and info["iterations"] > info["solves"]


def test_horn_schunck_step_fixed_point_residual():
    """At the solver's output, the Jacobi map leaves the flow (almost) unchanged."""
    import torchfpi

    f1, f2 = _translated_pair(24, 24, 0.5, 0.25)
    ix, iy = _ops.gradient(0.5 * (f1 + f2))
    it = f2 - f1
    z0 = torch.zeros(1, 2, 24, 24)
    sol = torchfpi.fixed_point(horn_schunck_step, z0, ix, iy, it, 3.0, tol=1e-7, max_iter=5000)
    z = sol.value
    assert bool(sol.converged.all())
    assert (horn_schunck_step(z, ix, iy, it, 3.0) - z).abs().max() < 1e-3


def test_frame_size_mismatch_is_a_usage_error():
    a, b = torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16, 18)
    with pytest.raises(UsageError, match="frame sizes differ"):
        horn_schunck(a, b)
    with pytest.raises(UsageError, match="frame sizes differ"):
        VariationalFlow()(a, b)
    with pytest.raises(UsageError, match="grey image tensor"):
        VariationalFlow()(torch.zeros(1, 3, 16, 16), torch.zeros(1, 3, 16, 16))


# ---------------------------------------------------------------- the learned model
def test_variational_flow_translation():
    f1, f2 = _translated_pair(48, 48, 1.2, 0.6, seed=3)
    with torch.no_grad():
        flow, info = VariationalFlow()(f1, f2)
    inner = flow[0, :, 8:-8, 8:-8].mean(dim=(1, 2))
    assert inner.tolist() == pytest.approx([1.2, 0.6], abs=0.1)
    assert len(info["per_solve"]) == info["solves"]


def test_implicit_gradient_matches_finite_differences():
    """One level, one warp, no median: the output is the fixed point itself, so its implicit
    gradient must match central differences of the loss (float64)."""
    cfg = FlowConfig(warps=1, median=1, min_size=64, max_iter=3000, tol=1e-12,
                     backward_max_iter=3000, backward_tol=1e-12, pre_sigma=0.0)
    model = VariationalFlow(cfg).double()
    f1, f2 = _translated_pair(12, 12, 0.4, -0.3, seed=1)
    f1, f2 = f1.double(), f2.double()
    target = torch.zeros(1, 2, 12, 12, dtype=torch.float64)
    target[:, 0], target[:, 1] = 0.4, -0.3

    def loss() -> torch.Tensor:
        flow, _ = model(f1, f2)
        return ((flow - target) ** 2).mean()

    value = loss()
    value.backward()
    for name in ("log_lam", "log_gamma", "a_s_raw"):
        p = getattr(model, name)
        h = 1e-5
        with torch.no_grad():
            p += h
            up = float(loss())
            p -= 2 * h
            down = float(loss())
            p += h
        fd = (up - down) / (2 * h)
        assert float(p.grad) == pytest.approx(fd, rel=2e-3, abs=1e-9), name


def test_short_training_step_changes_parameters():
    gen = torch.Generator().manual_seed(0)
    f1, f2, gt = make_batch(2, 32, 32, gen, TextureBank(None), max_motion=2.0)
    model = VariationalFlow(FlowConfig(max_iter=15, backward_max_iter=15))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    flow, _ = model(f1, f2)
    loss = batch_epe(flow, gt).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs()) > 0 for g in grads)
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.named_parameters())


def test_synthetic_pairs_are_consistent():
    gen = torch.Generator().manual_seed(1)
    f1, f2, gt = make_batch(2, 40, 40, gen, TextureBank(None), max_motion=3.0)
    assert f1.shape == (2, 1, 40, 40) and gt.shape == (2, 2, 40, 40)
    assert 0 <= float(f1.min()) and float(f1.max()) <= 255
    assert float(gt.abs().max()) < 3.0 * 2.5
    # warping frame2 by the true flow explains frame1 better than no motion does
    warped, _ = _ops.warp(f2, gt)
    assert (warped - f1).abs().mean() < (f2 - f1).abs().mean()


def test_train_and_resume(tmp_path):
    from torchfpi.apps.flow.api import load_weights
    from torchfpi.apps.flow.train import TrainConfig, train

    cfg = TrainConfig(steps=2, batch_size=1, size=32, val_pairs=1, val_every=1, max_motion=2.0)
    fcfg = FlowConfig(max_iter=5, backward_max_iter=5)
    summary = train(tmp_path, cfg, fcfg, data_root=None, quiet=True)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "checkpoint.pt").exists()
    assert len(summary["history"]) == 3
    cfg.steps = 3
    summary = train(tmp_path, cfg, fcfg, data_root=None, resume=True, quiet=True)
    assert summary["history"][-1]["step"] == 3 and len(summary["history"]) == 4
    model = load_weights(tmp_path / "best.pt")
    assert isinstance(model, VariationalFlow)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="is not a torchfpi flow weights file"):
        load_weights(tmp_path / "junk.pt")


# ---------------------------------------------------------------- CLI
def _save_pair(tmp_path: Path, shape2=(40, 48)):
    from PIL import Image

    f1, f2 = _translated_pair(40, 48, 1.0, 0.5, seed=2)
    p1, p2 = tmp_path / "f1.png", tmp_path / "f2.png"
    Image.fromarray(f1[0, 0].clamp(0, 255).byte().numpy()).save(p1)
    img2 = f2[0, 0].clamp(0, 255).byte().numpy()
    if shape2 != (40, 48):
        img2 = np.zeros(shape2, np.uint8)
    Image.fromarray(img2).save(p2)
    return p1, p2


@pytest.mark.skipif(not WEIGHTS.exists(), reason="shipped weights not built yet")
def test_cli_flow_writes_outputs(tmp_path, capsys):
    from torchfpi.cli import main

    p1, p2 = _save_pair(tmp_path)
    rc = main(["flow", str(p1), str(p2), "--out", str(tmp_path / "o.flo"), "--png", str(tmp_path / "o.png")])
    assert rc == 0, capsys.readouterr().err
    flow = read_flo(tmp_path / "o.flo")
    assert flow.shape == (40, 48, 2)
    assert flow[8:-8, 8:-8].mean(axis=(0, 1)).tolist() == pytest.approx([1.0, 0.5], abs=0.15)
    assert (tmp_path / "o.png").exists()
    rc = main(["flow", str(p1), str(p2), "--method", "fpi_nn", "--quiet", "--out", str(tmp_path / "n.flo")])
    assert rc == 0, capsys.readouterr().err
    assert read_flo(tmp_path / "n.flo").shape == (40, 48, 2)


def test_cli_flow_errors(tmp_path, capsys):
    from torchfpi.cli import main

    p1, p2 = _save_pair(tmp_path, shape2=(30, 30))
    assert main(["flow", str(p1), str(p2), "--out", str(tmp_path / "o.flo")]) == 2
    assert "frame sizes differ" in capsys.readouterr().err
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    assert main(["flow", str(p1), str(junk), "--out", str(tmp_path / "o.flo")]) == 1
    assert "cannot read it as an image" in capsys.readouterr().err
    assert main(["flow", str(p1), str(tmp_path / "nope.png"), "--png", str(tmp_path / "o.png")]) == 1
    assert "nope.png" in capsys.readouterr().err
    assert main(["flow", str(p1), str(p1)]) == 2
    assert "nothing to write" in capsys.readouterr().err
    assert main(["flow", str(p1), str(p1), "--out", str(tmp_path / "o.txt")]) == 2
    assert main(["flow", str(p1), str(p1), "--png", "x.png", "--threads", "-1"]) == 2
    assert "--threads" in capsys.readouterr().err
    assert main(["train", "flow", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err


def test_math_sanity():
    assert math.isclose(end_point_error(np.ones((2, 2, 2)), np.zeros((2, 2, 2))), math.sqrt(2))


def test_step_fixed_point_is_stationary_point_of_energy():
    """The hand-derived sweep and the autograd gradient of the energy agree: grad E(z*) ~ 0."""
    import torchfpi

    model = VariationalFlow().double()
    f1, f2 = _translated_pair(16, 16, 0.8, -0.4, seed=4)
    a, b = f1.double(), f2.double()
    u0 = torch.zeros(1, 2, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        d = model._data_terms(a, b, u0)
        wx, wy = model._edge_weights(a)
        red = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 == 0)[None, None]
        z = u0.clone()
        for _ in range(2000):
            z = model.step(z, u0, d, wx, wy, red)
        g0 = torchfpi.energy_grad(model.energy, u0, u0, d, wx, wy)
        g = torchfpi.energy_grad(model.energy, z, u0, d, wx, wy)
        assert float(g.norm()) < 1e-6 * float(g0.norm())
        assert float(model.energy(z, u0, d, wx, wy)) < float(model.energy(u0, u0, d, wx, wy))


def test_fpi_nn_refinement_starts_at_base_and_trains(tmp_path):
    from torchfpi.apps.flow.api import load_refined, save_refined
    from torchfpi.apps.flow.models import RefinedFlow

    gen = torch.Generator().manual_seed(2)
    f1, f2, gt = make_batch(2, 32, 32, gen, TextureBank(None), max_motion=2.0)
    model = RefinedFlow(VariationalFlow(FlowConfig(max_iter=10)))
    with torch.no_grad():
        zgd, _ = model.base(f1, f2)
    flow = model.refine(zgd, f1, f2)
    assert torch.allclose(flow, zgd)  # zero-initialised last layer: z* = z_gd
    loss = batch_epe(flow, gt).mean()
    loss.backward()
    last = model.update.net[-1].weight
    assert last.grad is not None and float(last.grad.abs().sum()) > 0
    assert all(p.grad is None for p in model.base.parameters())
    torch.optim.SGD(model.update.parameters(), lr=1e-2).step()
    with torch.no_grad():
        moved = model.refine(zgd, f1, f2)
    assert not torch.allclose(moved, zgd)
    save_refined(model, tmp_path / "nn.pt")
    back = load_refined(tmp_path / "nn.pt")
    with torch.no_grad():
        assert torch.allclose(back.refine(zgd, f1, f2), moved, atol=1e-5)


def _flo_bytes(flow: np.ndarray) -> bytes:
    """The Middlebury layout written by hand: magic, width, height, (u, v) row by row."""
    h, w, _ = flow.shape
    return (np.array([202021.25], "<f4").tobytes() + np.array([w, h], "<i4").tobytes()
            + np.ascontiguousarray(flow, "<f4").tobytes())


def test_flo_io_through_opencv_is_the_middlebury_layout_and_atomic(tmp_path):
    from torchfpi.data.flo import read_flo, write_flo

    flow = np.random.RandomState(0).randn(5, 7, 2).astype(np.float32)
    path = tmp_path / "f.flo"
    path.write_bytes(b"old")
    write_flo(path, flow)
    assert path.read_bytes() == _flo_bytes(flow)  # OpenCV writes exactly the format
    assert [p.name for p in tmp_path.iterdir()] == ["f.flo"]  # no temporary file left
    np.testing.assert_array_equal(read_flo(path), flow)


@pytest.mark.data("middlebury")
def test_read_flo_of_rubberwhale_matches_the_raw_layout(data_root):
    from torchfpi.data.flo import read_flo

    path = data_root / "flow" / "middlebury" / "other-gt-flow" / "RubberWhale" / "flow10.flo"
    raw = path.read_bytes()
    w, h = np.frombuffer(raw, "<i4", count=2, offset=4)
    np.testing.assert_array_equal(read_flo(path), np.frombuffer(raw, "<f4", offset=12).reshape(h, w, 2))


def test_one_list_of_methods_for_the_cli_the_script_and_the_loader():
    from torchfpi.apps.flow import load_flow_model
    from torchfpi.apps.flow.api import LEARNED, METHODS
    from torchfpi.apps.flow.baselines import HornSchunck
    from torchfpi.cli import build_parser

    parser = build_parser()
    flow = parser._subparsers._group_actions[0].choices["flow"]  # type: ignore[union-attr]
    method = next(a for a in flow._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS and set(LEARNED) < set(METHODS)
    model = load_flow_model("horn_schunck")
    assert isinstance(model, HornSchunck) and not model.training
    f1 = torch.rand(1, 1, 24, 24) * 255
    flow_a, info_a = model(f1, f1.roll(1, -1))
    flow_b, info_b = horn_schunck(f1, f1.roll(1, -1))
    assert torch.equal(flow_a, flow_b) and info_a == info_b
    with pytest.raises(UsageError, match="weights: not for method 'horn_schunck'"):
        load_flow_model("horn_schunck", WEIGHTS)
    with pytest.raises(UsageError, match="method: expected one of"):
        load_flow_model("farneback")
