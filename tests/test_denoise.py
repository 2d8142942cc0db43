"""Tests of the denoising application: protocol, metrics, energy, FPI_GD, training, CLI."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from torchfpi.apps.denoise import (
    FoEEnergy,
    FPIGDDenoiser,
    FPINNDenoiser,
    TrainConfig,
    UnrolledDenoiser,
    add_coarse_banks,
    available_sigmas,
    grow_energy_state,
    load_denoiser,
    save_weights,
    train_denoiser,
)
from torchfpi.cli import main
from torchfpi.data.images import (
    add_noise,
    check_sigma,
    noise_seed,
    psnr,
    read_grey_png,
    ssim,
    write_grey_png,
)
from torchfpi.errors import DataError, UsageError

ROOT = Path(__file__).resolve().parents[1]
#: Agreement of two computations of the same float64 fixed point solved to 1e-10.
TIGHT = 1e-8


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 128 + 60 * np.sin(xx / 5.0 + seed) * np.cos(yy / 7.0) + 20 * (xx > w // 2)
    return np.clip(img + rng.normal(0, 2, (h, w)), 0, 255)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A tiny data root: denoise/Train400 with 6 images of 40x40, denoise/BSD68 with 2."""
    for sub, n in (("Train400", 6), ("BSD68", 2)):
        d = tmp_path / "denoise" / sub
        d.mkdir(parents=True)
        for i in range(n):
            write_grey_png(d / f"img_{i:03d}.png", _smooth_image(40, 40, i))
    return tmp_path


# ---- protocol and metrics ---------------------------------------------------------------------

def test_psnr_formula_pinned() -> None:
    clean = np.full((4, 4), 100.0)
    est = clean + 5.0  # mse 25
    assert psnr(est, clean) == pytest.approx(10 * math.log10(255.0**2 / 25.0), abs=1e-12)
    # the estimate is clipped to [0, 255] before the error is taken
    clean = np.array([[255.0, 0.0]])
    est = np.array([[300.0, -40.0]])
    assert psnr(est, clean) == math.inf
    est = np.array([[265.0, 10.0]])  # clipped: errors 0 and 10 -> mse 50
    assert psnr(est, clean) == pytest.approx(10 * math.log10(255.0**2 / 50.0), abs=1e-12)
    with pytest.raises(UsageError, match="shape"):
        psnr(np.zeros((2, 2)), np.zeros((2, 3)))


def test_ssim_identity_and_noise() -> None:
    clean = _smooth_image(32, 32)
    assert ssim(clean, clean) == pytest.approx(1.0)
    assert ssim(add_noise(clean, 25, [1]), clean) < 0.9


def test_noise_protocol_fixed_and_unclipped() -> None:
    clean = np.full((64, 64), 250.0)
    a = add_noise(clean, 25, noise_seed(0, 25, 3))
    b = add_noise(clean, 25, noise_seed(0, 25, 3))
    c = add_noise(clean, 25, noise_seed(0, 25, 4))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.max() > 255  # not clipped
    assert np.std(a - clean) == pytest.approx(25, rel=0.1)


@pytest.mark.parametrize("bad", [0, -5, float("nan"), 1000, "abc"])
def test_check_sigma_rejects(bad) -> None:
    with pytest.raises(UsageError, match="--sigma"):
        check_sigma(bad)


def test_read_png_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_grey_png(tmp_path / "missing.png")
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(DataError, match="not a readable image"):
        read_grey_png(bad)
    with pytest.raises(DataError, match="is a directory"):
        read_grey_png(tmp_path)


def test_png_roundtrip_and_colour(tmp_path: Path) -> None:
    from PIL import Image

    img = np.rint(_smooth_image(10, 12))
    write_grey_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_grey_png(tmp_path / "a.png"), img)
    rgb = np.stack([img] * 3, -1).astype(np.uint8)
    Image.fromarray(rgb, mode="RGB").save(tmp_path / "rgb.png")
    assert read_grey_png(tmp_path / "rgb.png").shape == (10, 12)


# ---- energy and layers ------------------------------------------------------------------------

@pytest.mark.parametrize("coarse", [(), ((2, 4, 3),), ((2, 3, 3), (3, 2, 5))])
def test_energy_gradient_is_exact(coarse) -> None:
    """Closed-form gradient = autograd of the energy, with and without coarse banks (odd sizes too)
    and an adaptive data weight."""
    torch.manual_seed(0)
    e = FoEEnergy(5, 3, n_mixture=2, coarse=coarse, adaptive_channels=3 if coarse else 0).double()
    with torch.no_grad():
        for p in e.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.rand(2, 1, 19, 22, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 1, 19, 22, dtype=torch.float64)
    (g,) = torch.autograd.grad(e(z, y).sum(), z)
    torch.testing.assert_close(e.grad(z, y), g, atol=1e-12, rtol=1e-10)
    assert e(z, y).shape == (2,)


@pytest.mark.parametrize("coarse", [(), ((2, 4, 3), (4, 3, 3))])
def test_lipschitz_bound_dominates_hessian(coarse) -> None:
    torch.manual_seed(1)
    e = FoEEnergy(6, 3, coarse=coarse, adaptive_channels=3 if coarse else 0).double()
    with torch.no_grad():  # make the coarse banks matter as much as the fine one
        for bank in e.coarse:
            bank.log_alpha.fill_(float(e.log_alpha.mean()) + 1.0)
        if e.data_net is not None:  # an adaptive weight at its largest: lambda exp(span)
            e.data_net[-1].bias.fill_(10.0)
    y = torch.rand(1, 1, 16, 16, dtype=torch.float64)
    z = y.clone()
    v = torch.randn_like(z)
    for _ in range(15):  # power iteration on the Hessian at z
        zz = z.clone().requires_grad_()
        (hv,) = torch.autograd.grad(e.grad(zz, y), zz, v)
        v = hv / hv.norm()
    zz = z.clone().requires_grad_()
    (hv,) = torch.autograd.grad(e.grad(zz, y), zz, v)
    assert float((hv * v).sum()) <= e.lipschitz_bound(grid=64) * (1 + 1e-6)


@pytest.mark.parametrize("coarse", [(), ((2, 4, 3), (3, 2, 3))])
def test_grad_split_has_the_same_value_and_first_derivatives(coarse) -> None:
    """grad_split: analytic Hessian-vector products in z, autograd in the parameters and y."""
    torch.manual_seed(3)
    e = FoEEnergy(5, 3, n_mixture=2, coarse=coarse, adaptive_channels=3 if coarse else 0).double()
    with torch.no_grad():
        for p in e.parameters():
            p.add_(0.2 * torch.randn_like(p))
    z = torch.rand(2, 1, 13, 14, dtype=torch.float64, requires_grad=True)
    y = torch.rand(2, 1, 13, 14, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 1, 13, 14, dtype=torch.float64)
    wrt = [z, y, *e.parameters()]
    ref = torch.autograd.grad(e.grad(z, y), wrt, v)
    split = e.grad_split(z, y)
    torch.testing.assert_close(split, e.grad(z, y), atol=1e-14, rtol=1e-12)
    for a, b in zip(torch.autograd.grad(split, wrt, v), ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    with torch.no_grad():  # no graph wanted: the plain gradient
        torch.testing.assert_close(e.grad_split(z, y), e.grad(z, y))


def test_calibrate_data_weight_picks_the_best_offset() -> None:
    from torchfpi.apps.denoise.train import calibrate_data_weight, evaluate

    clean = torch.tensor(np.stack([_smooth_image(24, 24, s) for s in range(3)]) / 255.0,
                         dtype=torch.float32).unsqueeze(1)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    m = FPIGDDenoiser(FoEEnergy(4, 3, penalty_weight=5e-4, penalty_scale=0.06), tol=1e-4)
    base = float(m.energy.log_data_weight.detach())
    rec = calibrate_data_weight(m, clean, noisy, offsets=(-1.0, 0.0, 1.0), log=lambda s: None)
    assert rec["chosen_offset"] == (-1.0, 0.0, 1.0)[int(np.argmax(rec["psnr"]))]
    assert float(m.energy.log_data_weight.detach()) == pytest.approx(base + rec["chosen_offset"])
    assert evaluate(m, clean, noisy)["psnr"] == pytest.approx(max(rec["psnr"]), abs=1e-3)
    assert rec["converged"] == [1.0, 1.0, 1.0]
    # an offset whose solves stop at the iteration limit is no candidate, however well it scores
    m.max_iter = 2
    rec2 = calibrate_data_weight(m, clean, noisy, offsets=(-1.0, 0.0), log=lambda s: None)
    assert rec2["converged"] == [0.0, 0.0]
    assert rec2["chosen_offset"] == (-1.0, 0.0)[int(np.argmax(rec2["psnr"]))]  # none converged: the best score
    scores = {}

    def fake(model, c, n, chunk=20):
        off = round(float(model.energy.log_data_weight.detach()) - base, 1)
        scores[off] = {"psnr": 30.0 if off == 0.0 else 20.0, "iterations": 5.0,
                       "converged": 0.5 if off == 0.0 else 1.0}
        return scores[off]

    import torchfpi.apps.denoise.train as train_module

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "evaluate", fake)
        m.energy.log_data_weight.data.fill_(base)
        rec3 = calibrate_data_weight(m, clean, noisy, offsets=(-1.0, 0.0, 1.0), log=lambda s: None)
    assert rec3["chosen_offset"] == -1.0  # 0.0 scores best but converged on half the crops only


def test_fpigd_paths_agree_with_library_layer() -> None:
    """The closed-form gradient map and torchfpi.FPIGD give the same z* and gradients."""
    torch.manual_seed(0)
    e = FoEEnergy(4, 3, n_mixture=1, penalty_weight=5e-4, penalty_scale=0.06).double()
    y = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    out = {}
    for path in ("analytic", "layer"):
        e.zero_grad()
        z = FPIGDDenoiser(e, tol=1e-10, max_iter=100, path=path)(y)
        z.square().sum().backward()
        out[path] = [z.detach()] + [p.grad.clone() for p in e.parameters()]
    for a, b in zip(out["analytic"], out["layer"]):
        torch.testing.assert_close(a, b, atol=TIGHT, rtol=TIGHT)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"coarse": [(2, 3, 3)], "adaptive_channels": 4}])
def test_implicit_gradient_matches_unrolled_to_convergence(extra) -> None:
    """Every parameter's implicit gradient (coarse banks and the adaptive data weight's CNN
    included) equals back-propagation through gradient descent run to convergence."""
    torch.manual_seed(2)
    e = FoEEnergy(4, 3, n_mixture=1, penalty_weight=5e-4, penalty_scale=0.06, **extra).double()
    with torch.no_grad():  # a non-zero adaptive map, so its CNN gets a gradient
        for p in e.parameters():
            p.add_(0.05 * torch.randn_like(p))
    y = torch.rand(1, 1, 10, 10, dtype=torch.float64)
    implicit = FPIGDDenoiser(e, tol=1e-11, max_iter=300)
    e.zero_grad()
    implicit(y).sum().backward()
    g_imp = [p.grad.clone() for p in e.parameters()]
    unrolled = UnrolledDenoiser(e, steps=200)
    with torch.no_grad():
        unrolled.log_step.fill_(math.log(implicit.step_size()))
    e.zero_grad()
    unrolled(y).sum().backward()
    for (name, p), g in zip(e.named_parameters(), g_imp):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_fpinn_denoiser_shapes_and_gradient() -> None:
    torch.manual_seed(0)
    m = FPINNDenoiser(channels=4, depth=3, tol=1e-4, max_iter=30)
    y = torch.rand(2, 1, 12, 12)
    z = m(y)
    assert z.shape == y.shape
    z.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_denoising_improves_psnr_with_init_energy() -> None:
    clean = _smooth_image(48, 48, 3)
    noisy = add_noise(clean, 25, [7])
    m = FPIGDDenoiser(FoEEnergy(8, 3, n_mixture=1, penalty_weight=5e-4, penalty_scale=0.06), tol=1e-4)
    with torch.no_grad():
        est = m(torch.tensor(noisy / 255, dtype=torch.float32)[None, None])[0, 0].double().numpy()
    assert psnr(est * 255, clean) > psnr(noisy, clean) + 3


# ---- training, weights, CLI -------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fpi_gd", "unrolled", "fpi_nn"])
def test_train_few_steps_and_resume(kind: str, data_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model=kind, steps=2, batch_size=2, crop=24, val_images=2, val_every=1,
                      model_config={"tol": 1e-3, "max_iter": 20} if kind != "unrolled" else {"steps": 3})
    if kind != "fpi_nn":
        cfg.model_config["energy"] = {"n_filters": 4, "kernel_size": 3, "n_mixture": 1,
                                      "penalty_weight": 5e-4, "penalty_scale": 0.06}
    else:
        cfg.model_config.update(channels=4)
    ck = tmp_path / "ck.pt"
    export = train_denoiser(cfg, data_dir / "denoise" / "Train400", ck, progress=False, log=lambda s: None,
                   command="first")
    assert export["train"]["steps"] == 2 and ck.exists()
    assert math.isfinite(export["train"]["best"]["psnr"])
    cfg2 = TrainConfig(**{**cfg.__dict__, "steps": 3})
    export2 = train_denoiser(cfg2, data_dir / "denoise" / "Train400", ck, resume=True, progress=False,
                    log=lambda s: None, command="second")
    assert export2["train"]["steps"] == 3
    assert export2["train"]["commands"] == ["first", "second"]  # a resumed run keeps every command
    save_weights(export2, tmp_path / f"denoise_{kind}_s25.pt")
    model, meta = load_denoiser(kind, 25, tmp_path)
    assert meta["kind"] == kind and not model.training


def test_cli_train_and_denoise(data_dir: Path, tmp_path: Path, capsys) -> None:
    w = tmp_path / "w"
    rc = main(["train", "denoise", "--data-root", str(data_dir), "--steps", "1", "--batch-size", "2",
               "--crop", "24", "--val-images", "2", "--checkpoint", str(w / "ck.pt"), "--quiet"])
    assert rc == 0
    assert (w / "denoise_fpi_gd_s25.pt").exists()
    # the weights record the command given to main (not the test runner's sys.argv); a resumed
    # run adds its own
    args = ["train", "denoise", "--data-root", str(data_dir), "--steps", "2", "--batch-size", "2",
            "--crop", "24", "--val-images", "2", "--checkpoint", str(w / "ck.pt"), "--quiet", "--resume"]
    assert main(args) == 0
    record = torch.load(w / "denoise_fpi_gd_s25.pt", weights_only=True)["train"]
    assert [c.split()[:3] for c in record["commands"]] == [["torchfpi", "train", "denoise"]] * 2
    assert record["commands"][-1].endswith("--quiet --resume") and record["command"] == record["commands"][-1]
    src = data_dir / "denoise" / "BSD68" / "img_000.png"
    out = tmp_path / "out.png"
    rc = main(["denoise", str(src), "--sigma", "25", "--out", str(out), "--weights", str(w)])
    assert rc == 0 and read_grey_png(out).shape == (40, 40)


def test_cli_fpi_gd_from_unrolled_energy(data_dir: Path, tmp_path: Path, capsys) -> None:
    """--init with unrolled weights starts FPI_GD from that energy; --calibrate-data-weight runs."""
    w = tmp_path / "w"
    common = ["--data-root", str(data_dir), "--steps", "1", "--batch-size", "2", "--crop", "24",
              "--val-images", "2", "--quiet"]
    assert main(["train", "denoise", "--model", "unrolled", *common, "--unroll-steps", "2",
                 "--checkpoint", str(w / "u.pt")]) == 0
    unrolled = torch.load(w / "denoise_unrolled_s25.pt", weights_only=True)
    assert main(["train", "denoise", "--model", "fpi_gd", *common, "--init", str(w / "denoise_unrolled_s25.pt"),
                 "--calibrate-data-weight", "--tol", "1e-3", "--checkpoint", str(w / "g.pt")]) == 0
    blob = torch.load(w / "denoise_fpi_gd_s25.pt", weights_only=True)
    assert blob["kind"] == "fpi_gd" and "log_step" not in blob["state_dict"]
    assert blob["train"]["calibration"]["chosen_offset"] in blob["train"]["calibration"]["offsets"]
    assert blob["config"]["energy"] == unrolled["config"]["energy"]
    assert main(["train", "denoise", "--model", "fpi_nn", *common, "--calibrate-data-weight"]) == 2
    assert "--calibrate-data-weight" in capsys.readouterr().err


def test_grow_energy_state_keeps_the_trained_energy_and_adds_filters() -> None:
    """Padding keeps the trained responses; new filters start small; shrinking is refused."""
    torch.manual_seed(0)
    small = FoEEnergy(6, 3)
    with torch.no_grad():
        small.weight.add_(0.3 * torch.randn_like(small.weight))  # not zero-mean: padding must handle it
    state = {"energy." + k: v for k, v in small.state_dict().items()}
    z, y = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    same = FoEEnergy(6, 5)
    same.load_state_dict({k[7:]: v for k, v in grow_energy_state(state, 6, 5).items()})
    # a valid 5x5 correlation loses one more pixel per side: compare away from the border
    torch.testing.assert_close(same.grad(z, y)[..., 4:-4, 4:-4], small.grad(z, y)[..., 4:-4, 4:-4])
    grown = grow_energy_state(state, 10, 5, new_weight=0.1)
    big = FoEEnergy(10, 5)
    big.load_state_dict({k[7:]: v for k, v in grown.items()})
    alpha = big.log_alpha.exp()
    torch.testing.assert_close(alpha[6:], 0.1 * small.log_alpha.exp().median(dim=0).values.expand(4, -1))
    torch.testing.assert_close(big.filters()[:6], same.filters())
    with pytest.raises(ValueError, match="n_filters: expected at least the 6 trained filters, got 4"):
        grow_energy_state(state, 4, 5)
    with pytest.raises(ValueError, match="kernel_size: expected an odd size >= the trained 3, got 4"):
        grow_energy_state(state, 6, 4)


def test_add_coarse_banks_keeps_the_trained_energy() -> None:
    """New coarse banks start small, existing ones are kept, bad specs are refused by name."""
    torch.manual_seed(0)
    fine = FoEEnergy(6, 3)
    state = {"energy." + k: v for k, v in fine.state_dict().items()}
    grown = add_coarse_banks(state, [(2, 4, 3)], new_weight=0.01)
    multi = FoEEnergy(6, 3, coarse=[(2, 4, 3)])
    multi.load_state_dict({k[7:]: v for k, v in grown.items()})
    torch.testing.assert_close(multi.coarse[0].log_alpha.exp(),
                               0.01 * fine.log_alpha.exp().median(dim=0).values.expand(4, -1))
    z, y = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        assert float((multi.grad(z, y) - fine.grad(z, y)).abs().max()) < 0.05 * float(fine.grad(z, y).abs().max())
    with torch.no_grad():
        multi.coarse[0].weight.mul_(3.0)
    kept = add_coarse_banks({"energy." + k: v for k, v in multi.state_dict().items()}, [(2, 4, 3), (4, 2, 3)])
    torch.testing.assert_close(kept["energy.coarse.0.weight"], multi.coarse[0].weight.detach())
    assert kept["energy.coarse.1.weight"].shape == (2, 1, 3, 3)
    for bad, msg in (([(1, 4, 3)], r"coarse\[0\]: expected a pooling factor 2 \.\. 8, got 1"),
                     ([(2, 4, 4)], r"coarse\[0\]: expected an odd kernel size >= 3, got 4"),
                     ([(2, 9, 3)], r"coarse\[0\]: expected 1 \.\. 8 filters of size 3, got 9"),
                     ([(2, 4)], r"coarse\[0\]: expected \(factor, n_filters, kernel_size\) integers")):
        with pytest.raises(ValueError, match=msg):
            FoEEnergy(6, 3, coarse=bad)
    for weight in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="new_weight: expected a positive number"):
            add_coarse_banks(state, [(2, 4, 3)], new_weight=weight)


def test_multiscale_fpigd_on_the_smallest_image() -> None:
    """A coarse bank's padding can exceed the image side: the padding reflects in steps."""
    from torchfpi.apps.denoise import MIN_IMAGE_SIDE

    e = FoEEnergy(8, 5, coarse=[(4, 4, 5)])
    assert e.pad == 8 and e.pad >= MIN_IMAGE_SIDE
    model = FPIGDDenoiser(e, tol=1e-4, max_iter=200)
    y = torch.rand(1, 1, MIN_IMAGE_SIDE, MIN_IMAGE_SIDE + 3)
    out = model(y)
    assert out.shape == y.shape and bool(torch.isfinite(out).all())
    assert bool(model.last_info.solution.converged.all())


def test_cli_coarse_banks_and_contrast_rescale(data_dir: Path, tmp_path: Path, capsys) -> None:
    """--coarse adds banks to an --init energy; --init-rescale contrast scales its filters."""
    common = ["--data-root", str(data_dir), "--steps", "1", "--batch-size", "2", "--crop", "24",
              "--val-images", "2", "--quiet", "--tol", "1e-3", "--filters", "6", "--kernel-size", "3"]
    assert main(["train", "denoise", *common, "--checkpoint", str(tmp_path / "a.pt")]) == 0
    base = tmp_path / "denoise_fpi_gd_s25.pt"
    assert main(["train", "denoise", *common, "--init", str(base), "--coarse", "2:4:3", "--steps", "1",
                 "--lr", "1e-9", "--checkpoint", str(tmp_path / "b.pt"), "--export", str(tmp_path / "ms.pt")]) == 0
    ms = torch.load(tmp_path / "ms.pt", weights_only=True)
    assert ms["config"]["energy"]["coarse"] == [[2, 4, 3]]
    assert ms["state_dict"]["energy.coarse.0.weight"].shape == (4, 1, 3, 3)
    model, _ = load_denoiser("fpi_gd", 25, tmp_path / "ms.pt")
    assert model.energy.coarse_factors == [2]
    assert main(["train", "denoise", *common, "--sigma", "50", "--init", str(tmp_path / "ms.pt"),
                 "--coarse", "2:4:3", "--init-rescale", "contrast", "--lr", "1e-9",
                 "--checkpoint", str(tmp_path / "c.pt"), "--export", str(tmp_path / "s50.pt")]) == 0
    s50 = torch.load(tmp_path / "s50.pt", weights_only=True)["state_dict"]
    for key in ("energy.weight", "energy.coarse.0.weight"):  # filters halved (lr 1e-9: one tiny step)
        torch.testing.assert_close(s50[key], 0.5 * ms["state_dict"][key], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(s50["energy.log_data_weight"],
                               ms["state_dict"]["energy.log_data_weight"] - 2 * math.log(2.0), atol=1e-6, rtol=0)
    # an adaptive data weight added to a trained energy starts as the same energy
    assert main(["train", "denoise", *common, "--init", str(tmp_path / "ms.pt"), "--coarse", "2:4:3",
                 "--adaptive-data", "4", "--lr", "1e-9", "--checkpoint", str(tmp_path / "f.pt"),
                 "--export", str(tmp_path / "ad.pt")]) == 0
    ad = torch.load(tmp_path / "ad.pt", weights_only=True)
    assert ad["config"]["energy"]["adaptive_channels"] == 4
    assert ad["state_dict"]["energy.data_net.4.weight"].abs().max() < 1e-6
    model_ad, _ = load_denoiser("fpi_gd", 25, tmp_path / "ad.pt")
    y = torch.rand(1, 1, 20, 20)
    with torch.no_grad():
        torch.testing.assert_close(model_ad(y, tol=1e-7, max_iter=3000), model(y, tol=1e-7, max_iter=3000),
                                   atol=1e-4, rtol=0)
    capsys.readouterr()
    assert main(["train", "denoise", *common, "--adaptive-data", "0", "--checkpoint", str(tmp_path / "g.pt")]) == 2
    assert "--adaptive-data: expected 1 .. 256 channels, got 0" in capsys.readouterr().err
    assert main(["train", "denoise", *common, "--calibrate-data-weight", "--calibration-span", "0",
                 "--checkpoint", str(tmp_path / "h.pt")]) == 2
    assert "--calibration-span: expected 0.1 .. 5.0, got 0.0" in capsys.readouterr().err
    for bad in ("2:4", "1:4:3", "2:4:4", "2:x:3"):
        assert main(["train", "denoise", *common, "--coarse", bad, "--checkpoint", str(tmp_path / "d.pt")]) == 2
        assert "--coarse: expected" in capsys.readouterr().err
    assert main(["train", "denoise", *common, "--init", str(tmp_path / "ms.pt"), "--coarse", "4:2:3",
                 "--checkpoint", str(tmp_path / "e.pt")]) == 2
    assert "--coarse: the --init energy has the coarse banks [[2, 4, 3]]" in capsys.readouterr().err


def test_cli_grows_the_filter_bank_of_init_weights(data_dir: Path, tmp_path: Path) -> None:
    """--filters / --kernel-size with --init start a larger FoE from the trained one."""
    common = ["--data-root", str(data_dir), "--steps", "1", "--batch-size", "2", "--crop", "24",
              "--val-images", "2", "--quiet", "--tol", "1e-3"]
    assert main(["train", "denoise", *common, "--filters", "8", "--kernel-size", "3",
                 "--checkpoint", str(tmp_path / "a.pt")]) == 0
    small = torch.load(tmp_path / "denoise_fpi_gd_s25.pt", weights_only=True)
    assert small["config"]["energy"]["n_filters"] == 8 and small["state_dict"]["energy.weight"].shape == (8, 1, 3, 3)
    assert main(["train", "denoise", *common, "--init", str(tmp_path / "denoise_fpi_gd_s25.pt"),
                 "--filters", "12", "--kernel-size", "5", "--checkpoint", str(tmp_path / "b.pt"),
                 "--export", str(tmp_path / "big.pt")]) == 0
    big = torch.load(tmp_path / "big.pt", weights_only=True)
    assert big["config"]["energy"]["n_filters"] == 12 and big["config"]["energy"]["kernel_size"] == 5
    assert big["state_dict"]["energy.weight"].shape == (12, 1, 5, 5)


def test_cli_denoise_shipped_weights(tmp_path: Path, capsys) -> None:
    """``torchfpi denoise`` works from the weights shipped with the package."""
    assert 25.0 in available_sigmas("fpi_gd"), "shipped weights for sigma 25 are missing"
    clean = _smooth_image(40, 40, 5)
    src = tmp_path / "noisy.png"
    write_grey_png(src, add_noise(clean, 25, [0]))
    out = tmp_path / "out.png"
    assert main(["denoise", str(src), "--sigma", "25", "--out", str(out)]) == 0
    assert psnr(read_grey_png(out), clean) > psnr(read_grey_png(src), clean) + 3
    assert "iterations" in capsys.readouterr().out


def test_cli_denoise_errors(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.png"
    assert main(["denoise", str(tmp_path / "none.png"), "--sigma", "25", "--out", str(out)]) == 1
    assert "does not exist" in capsys.readouterr().err
    txt = tmp_path / "a.txt"
    txt.write_text("hello")
    assert main(["denoise", str(txt), "--sigma", "25", "--out", str(out)]) == 1
    assert "not a readable image" in capsys.readouterr().err
    img = tmp_path / "i.png"
    write_grey_png(img, _smooth_image(20, 20))
    assert main(["denoise", str(img), "--sigma", "-3", "--out", str(out)]) == 2
    assert "--sigma" in capsys.readouterr().err
    assert main(["denoise", str(img), "--sigma", "37", "--out", str(out)]) == 2
    assert "no fpi_gd weights for sigma 37" in capsys.readouterr().err
    assert main(["train", "denoise", "--steps", "0"]) == 2
    assert "--steps" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert main(["denoise", str(img), "--sigma", "25", "--out", str(out), "--weights", str(bad)]) == 1
    assert "not a torchfpi denoiser weights file" in capsys.readouterr().err


def test_results_script_skips_finished_units(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "run_denoise.py"), "--data-root", str(data_dir),
           "--sigmas", "25", "--methods", "noisy", "tv", "--out", str(out), "--tv-images", "2"]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "sigma25.tv: psnr" in first.stdout
    res = json.loads(out.read_text())
    assert res["sigma25"]["noisy"]["complete"] and res["sigma25"]["tv"]["images"] == 2
    assert "command" in res and "machine" in res
    second = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "(skipped)" in second.stdout
    # a model row stored under its own key, and a figure with one row per image
    fig = tmp_path / "fig.png"
    third = subprocess.run([*cmd[:7], "fpi_gd", "--out", str(out), "--store-as", "fpi_gd_foe",
                            "--figure", str(fig), "--figure-image", "0", "1"], capture_output=True, text=True)
    assert third.returncode == 0, third.stderr
    res = json.loads(out.read_text())
    assert res["sigma25"]["fpi_gd_foe"]["complete"] and "fpi_gd" not in res["sigma25"]
    assert "single-scale FoE" in third.stdout and fig.stat().st_size > 0
    bad = subprocess.run([*cmd[:7], "noisy", "--out", str(out), "--store-as", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--store-as: expected exactly one model method" in bad.stderr


def test_training_summary_script_reads_the_weights(tmp_path: Path) -> None:
    """The training table comes from the weights files (history, rejected updates), not by hand."""
    w = ROOT / "torchfpi" / "weights" / "denoise_fpi_gd_s25.pt"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "denoise_training_summary.py"), str(w)],
                          capture_output=True, text=True, check=True)
    row = done.stdout.splitlines()[2]
    assert row.startswith("| denoise_fpi_gd_s25.pt | 25.0 | ") and re.search(r"\d+\.\d{3} \(step \d+\)", row)
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"junk")
    fail = subprocess.run([sys.executable, str(ROOT / "scripts" / "denoise_training_summary.py"), str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 1 and "not a torchfpi denoiser weights file" in fail.stderr


def test_self_ensemble_script_prints_both_scores(data_dir: Path) -> None:
    cmd = [sys.executable, str(ROOT / "scripts" / "denoise_self_ensemble.py"), "--data-root", str(data_dir),
           "--val-images", "2", "--crop", "24"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert re.search(r"validation PSNR: model \d+\.\d{3} dB, 8-fold dihedral mean \d+\.\d{3} dB", done.stdout)


@pytest.mark.slow
def test_implicit_training_uses_less_memory_than_unrolled() -> None:
    from torchfpi.apps.denoise.memory import measure_training_memory

    imp = measure_training_memory("fpi_gd", 20, batch_size=4, crop=48)
    unr = measure_training_memory("unrolled", 20, batch_size=4, crop=48)
    assert imp["peak_step_mib"] < unr["peak_step_mib"]
