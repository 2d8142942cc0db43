"""Anderson lands where the plain iteration would: the repelling-point safeguard and the restart."""

from __future__ import annotations

import pytest
import torch
from problems import affine, spd

import torchfpi


def _double_well_step(z):
    """``z - 0.05 grad E`` for E = sum (z_i^2 - 1)^2 / 4 + 0.05 sum z_i z_{i+1}: a max at 0, minima near +-1."""
    with torch.enable_grad():
        zz = z if z.requires_grad else z.detach().requires_grad_(True)
        energy = ((zz**2 - 1) ** 2 / 4).sum(1) + 0.05 * (zz[:, :-1] * zz[:, 1:]).sum(1)
        (g,) = torch.autograd.grad(energy.sum(), zz, create_graph=z.requires_grad)
    return z - 0.05 * g


def _hessian_eigenvalues(z):
    """``(B, n)`` eigenvalues of the energy's Hessian at each sample (from the step's Jacobian)."""
    out = []
    for row in z:
        jac = torch.autograd.functional.jacobian(lambda v: _double_well_step(v.unsqueeze(0)).squeeze(0), row)
        hess = (torch.eye(row.numel(), dtype=row.dtype) - jac) / 0.05
        out.append(torch.linalg.eigvalsh(0.5 * (hess + hess.T)))
    return torch.stack(out)


def _solve(f, z0, solver, **kw):
    return torchfpi.fixed_point(f, z0, solver=solver, max_iter=3000, on_failure="raise", **kw)


def test_double_well_anderson_lands_on_minima_like_fpi():
    z0 = 0.3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fpi = _solve(_double_well_step, z0, "fpi", tol=1e-9)
    acc = _solve(_double_well_step, z0, "anderson", tol=1e-9)
    assert bool(acc.converged.all()) and bool(fpi.converged.all())
    assert bool((_hessian_eigenvalues(fpi.value) > 0).all())
    # Every sample at a minimum (all Hessian eigenvalues positive), the one plain FPI reaches.
    assert bool((_hessian_eigenvalues(acc.value) > 0).all())
    torch.testing.assert_close(acc.value, fpi.value, atol=1e-6, rtol=0)
    # Without the safeguard Anderson finds the local maximum for most samples (so the test can fail).
    bare = torchfpi.fixed_point(_double_well_step, z0, solver=torchfpi.Anderson(safeguard=False),
                                tol=1e-9, max_iter=300, on_failure="ignore")
    at_max = (_hessian_eigenvalues(bare.value) < 0).all(1) & bare.converged
    assert int(at_max.sum()) >= 8


@pytest.mark.parametrize("r", [1.5, 2.8])
def test_logistic_map_anderson_avoids_the_repelling_point(r):
    # f(z) = r z (1 - z): 0 repels (f'(0) = r > 1), 1 - 1/r attracts (|f'| = |2 - r| < 1).
    z0 = torch.rand(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def logistic(z):
        return r * z * (1 - z)

    fpi = _solve(logistic, z0, "fpi", tol=1e-10, residual="absolute")
    acc = _solve(logistic, z0, "anderson", tol=1e-10, residual="absolute")
    attracting = torch.full_like(z0, 1 - 1 / r)
    torch.testing.assert_close(fpi.value, attracting, atol=1e-8, rtol=0)
    torch.testing.assert_close(acc.value, attracting, atol=1e-8, rtol=0)
    # Samples whose first move goes where the map contracts keep Anderson's speed; the others
    # follow FPI exactly (never slower).
    assert bool((acc.iterations <= fpi.iterations).all())
    assert int((acc.iterations < fpi.iterations).sum()) >= 8
    if r == 2.8:
        bare = torchfpi.fixed_point(logistic, z0, solver=torchfpi.Anderson(safeguard=False), tol=1e-10,
                                    residual="absolute", max_iter=3000, on_failure="ignore")
        assert int((bare.value.abs() < 1e-6).sum()) >= 1  # the failure the safeguard prevents


@pytest.mark.parametrize("kind", ["affine", "symmetric", "gradient"])
def test_safeguard_never_acts_where_the_map_contracts(kind, gen, dtype):
    # On contractions (s < 0 along every move) the safeguarded and the bare method are the same.
    if kind == "gradient":
        A = spd(30, gen, dtype, cond=50.0)
        b = torch.randn(5, 30, generator=gen, dtype=dtype)
        step = 1.0 / 50.0

        def f(z, b):
            return z - step * (z @ A - b)
        x = b
    else:
        prob = affine(12, 4, 0.9, gen, dtype) if kind == "affine" else None
        if prob is None:
            from problems import contraction
            A = contraction(12, 0.9, gen, dtype, symmetric=True)
            U = torch.randn(12, 4, generator=gen, dtype=dtype)

            def f(z, x):
                return torch.tanh(z @ A.T + x @ U.T)
        else:
            f = prob
        x = torch.randn(6, 4, generator=gen, dtype=dtype)
    z0 = torch.zeros(x.shape[0], 30 if kind == "gradient" else 12, dtype=dtype)
    on = torchfpi.fixed_point(f, z0, x, solver=torchfpi.Anderson(), tol=1e-10, max_iter=2000)
    off = torchfpi.fixed_point(f, z0, x, solver=torchfpi.Anderson(safeguard=False), tol=1e-10, max_iter=2000)
    assert torch.equal(on.iterations, off.iterations)
    assert torch.equal(on.value, off.value)


def test_restart_uses_the_absolute_residual_which_grows_in_a_blow_up():
    # f(z) = 2 z: the relative residual |f(z) - z| / |f(z)| is 0.5 at every z (it levels off),
    # while the absolute one grows with z. A restart clears the history: one valid slot remains.
    solver = torchfpi.Anderson(m=4, restart=10.0, safeguard=False)
    z = torch.ones(1, 3, dtype=torch.float64)
    state = solver.init(z, 2 * z)
    half = torch.tensor([0.5], dtype=torch.float64)
    for scale in (1.0, 2.0, 4.0):
        solver.step(state, scale * z, 2 * scale * z, half)
    assert int(state["valid"].sum()) == 3
    solver.step(state, 100.0 * z, 200.0 * z, half)  # |g| = 100 sqrt(3) > 10 x the best (sqrt(3))
    assert int(state["valid"].sum()) == 1


def test_repelling_sample_switches_alone():
    # Per sample: a repelled sample runs damped FPI while the other keeps its Anderson history.
    solver = torchfpi.Anderson(m=4)
    z = torch.tensor([[0.1], [0.9]], dtype=torch.float64)

    def f(z):
        return 2.8 * z * (1 - z)

    state = solver.init(z, f(z))
    for _ in range(3):
        fz = f(z)
        z = solver.step(state, z, fz, torch.zeros(2, dtype=torch.float64))
    assert state["plain"].tolist() == [True, False]
    assert int(state["valid"][0].sum()) == 1 and int(state["valid"][1].sum()) == 3


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [({"patience": 0}, ValueError, "patience: expected an integer >= 1"),
     ({"patience": True}, ValueError, "patience"),
     ({"safeguard": 1}, TypeError, "safeguard: expected a bool")],
)
def test_safeguard_options_are_validated(kwargs, err, match):
    with pytest.raises(err, match=match):
        torchfpi.Anderson(**kwargs)


def test_fpigd_layer_with_anderson_reaches_minima_of_a_double_well_energy():
    # FPIGD's map is a gradient step: s > 0 along a move means the energy curves down along it.
    def energy(z):
        return ((z**2 - 1) ** 2 / 4).sum(1) + 0.05 * (z[:, :-1] * z[:, 1:]).sum(1)

    z0 = 0.3 * torch.randn(16, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = dict(step_size=0.05, tol=1e-9, max_iter=3000, on_failure="raise")
    acc = torchfpi.FPIGD(energy, solver="anderson", **kw)(z0=z0)
    fpi = torchfpi.FPIGD(energy, **kw)(z0=z0)
    assert bool((_hessian_eigenvalues(acc) > 0).all())
    torch.testing.assert_close(acc, fpi, atol=1e-6, rtol=0)
    # Energy descends: every sample ends below its start.
    assert bool((energy(acc) < energy(z0)).all())
