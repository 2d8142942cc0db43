"""Backward modes: closed forms, finite differences, gradcheck and gradgradcheck in float64."""

from __future__ import annotations

import pytest
import torch
from problems import GRAD_RTOL, SOLVER_TOL, affine, spd
from torch.autograd import gradcheck, gradgradcheck

import torchfpi

EXACT = ["fpi", "anderson", "unroll", "dense"]
INEXACT = ["neumann", "onestep"]


def _solve(f, z0, *inputs, **kw):
    kw.setdefault("tol", SOLVER_TOL)
    kw.setdefault("max_iter", 2000)
    return torchfpi.fixed_point(f, z0, *inputs, **kw)


@pytest.mark.parametrize("mode", EXACT)
def test_exact_modes_match_closed_form(mode, gen, dtype):
    prob = affine(5, 3, 0.7, gen, dtype)
    x = torch.randn(4, 3, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 5, generator=gen, dtype=dtype)
    sol = _solve(prob, torch.zeros(4, 5, dtype=dtype), x, backward=mode)
    (g,) = torch.autograd.grad((sol.value * w).sum(), x)
    torch.testing.assert_close(g, prob.grad_x(w), rtol=GRAD_RTOL, atol=GRAD_RTOL)


@pytest.mark.parametrize("mode", INEXACT)
def test_inexact_modes_are_inexact_but_close_for_small_radius(mode, gen, dtype):
    prob = affine(5, 3, 0.3, gen, dtype)
    x = torch.randn(4, 3, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 5, generator=gen, dtype=dtype)
    sol = _solve(prob, torch.zeros(4, 5, dtype=dtype), x, backward=mode)
    (g,) = torch.autograd.grad((sol.value * w).sum(), x)
    err = float((g - prob.grad_x(w)).abs().max() / prob.grad_x(w).abs().max())
    # onestep drops the whole series after its first term; neumann after 10 terms (0.3^11).
    assert (1e-2 < err < 0.6) if mode == "onestep" else (1e-9 < err < 1e-4)


def test_neumann_terms_option(gen, dtype):
    prob = affine(5, 3, 0.5, gen, dtype)
    x = torch.randn(2, 3, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 5, generator=gen, dtype=dtype)
    errs = []
    for k in (2, 8, 32):
        sol = _solve(prob, torch.zeros(2, 5, dtype=dtype), x, backward=torchfpi.NeumannBackward(terms=k))
        (g,) = torch.autograd.grad((sol.value * w).sum(), x)
        errs.append(float((g - prob.grad_x(w)).abs().max()))
    assert errs[0] > errs[1] > errs[2]


@pytest.mark.parametrize("mode", EXACT + INEXACT)
def test_gradcheck_all_modes_with_module_parameters(mode, dtype):
    lin = torch.nn.Linear(3, 3, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)

    backward = torchfpi.NeumannBackward(terms=2) if mode == "neumann" else mode

    def fn(x, W, b):
        return _solve(lambda z, x: torch.tanh(torch.nn.functional.linear(z, W, b) + x), torch.zeros(2, 3, dtype=dtype), x, backward=backward).value

    if mode in EXACT:
        assert gradcheck(fn, (x, lin.weight, lin.bias))
    else:
        assert not gradcheck(fn, (x, lin.weight, lin.bias), raise_exception=False)


@pytest.mark.parametrize("mode", ["fpi", "anderson"])
def test_gradgradcheck_inputs_and_parameters(mode, dtype):
    torch.manual_seed(3)
    W = (0.3 * torch.randn(3, 3, dtype=dtype)).requires_grad_()
    U = torch.randn(3, 2, dtype=dtype, requires_grad=True)
    x = torch.randn(2, 2, dtype=dtype, requires_grad=True)

    def fn(x, W, U):
        return _solve(lambda z, x: torch.tanh(z @ W.T + x @ U.T), torch.zeros(2, 3, dtype=dtype), x, backward=mode).value

    assert gradcheck(fn, (x, W, U))
    assert gradgradcheck(fn, (x, W, U))


def test_gradgradcheck_through_module_parameters_captured(dtype):
    # f is an nn.Module (parameters captured, not passed): Hessian-vector products w.r.t. them.
    lin = torch.nn.Linear(3, 3, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(0.3)
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    f = lambda z, x: torch.tanh(lin(z) + x)  # noqa: E731
    sol = _solve(f, torch.zeros(2, 3, dtype=dtype), x)
    (gx,) = torch.autograd.grad((sol.value ** 2).sum(), x, create_graph=True)
    d = torch.randn_like(lin.weight)
    (hvp,) = torch.autograd.grad((gx * torch.ones_like(gx)).sum(), lin.weight)

    def gsum(W):
        g = lambda z, x: torch.tanh(torch.nn.functional.linear(z, W, lin.bias) + x)  # noqa: E731
        v = _solve(g, torch.zeros(2, 3, dtype=dtype), x).value
        (gx_,) = torch.autograd.grad((v ** 2).sum(), x, create_graph=True)
        return float(gx_.sum().detach())

    eps = 1e-6
    with torch.no_grad():
        W0 = lin.weight.detach().clone()
    fd = (gsum(W0 + eps * d) - gsum(W0 - eps * d)) / (2 * eps)
    assert abs(float((hvp * d).sum()) - fd) < 1e-6 * max(1.0, abs(fd))


def test_second_order_adjoint_is_a_backward_fpi(dtype):
    # The double backward runs a fixed-point solve whose statistics are recorded.
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    sol = _solve(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(2, 3, dtype=dtype), x, backward_tol=1e-11)
    (gx,) = torch.autograd.grad((sol.value ** 2).sum(), x, create_graph=True)
    assert sol.backward is not None and sol.backward.converged.all()
    (h,) = torch.autograd.grad(gx.sum(), x)
    assert torch.isfinite(h).all()


def test_captured_tensor_gets_exact_gradient(gen, dtype):
    # A tensor f merely captures (not an input, not a module parameter) gets exact gradients.
    A0 = (0.2 * torch.randn(4, 4, generator=gen, dtype=dtype)).requires_grad_()
    A = A0 * 2.0  # non-leaf capture: gradient must reach the leaf A0
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    sol = _solve(lambda z, x: z @ A.T + x, torch.zeros(3, 4, dtype=dtype), x)
    w = torch.randn(3, 4, generator=gen, dtype=dtype)
    (g,) = torch.autograd.grad((sol.value * w).sum(), A0)
    ref = _solve(lambda z, x, A: z @ A.T + x, torch.zeros(3, 4, dtype=dtype), x, A0 * 2.0, backward="dense")
    (g_ref,) = torch.autograd.grad((ref.value * w).sum(), A0)
    torch.testing.assert_close(g, g_ref, rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_backward_stats_recorded_and_deterministic(gen, dtype):
    prob = affine(4, 2, 0.6, gen, dtype)
    x = torch.randn(3, 2, generator=gen, dtype=dtype, requires_grad=True)
    grads = []
    for _ in range(2):
        sol = _solve(prob, torch.zeros(3, 4, dtype=dtype), x)
        assert sol.backward is None
        (g,) = torch.autograd.grad(sol.value.sum(), x)
        grads.append(g)
        assert sol.backward.converged.all() and sol.backward.trace.shape[1] == 3
    assert torch.equal(grads[0], grads[1])


def test_backward_non_convergence_follows_on_failure(dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    f = lambda z, x: 0.99 * z + x  # noqa: E731
    sol = torchfpi.fixed_point(f, torch.zeros(2, 3, dtype=dtype), x, tol=1e-8, max_iter=5000, backward_max_iter=5)
    with pytest.warns(torchfpi.ConvergenceWarning, match="backward_max_iter"):
        sol.value.sum().backward()
    sol = torchfpi.fixed_point(f, torch.zeros(2, 3, dtype=dtype), x, tol=1e-8, max_iter=5000, backward_max_iter=5, on_failure="raise")
    with pytest.raises(torchfpi.FixedPointError, match="backward fixed-point solve"):
        sol.value.sum().backward()


def test_energy_gd_fixed_point_closed_form(gen, dtype):
    # Gradient-descent map of a quadratic energy: z* = A^{-1} b, dz*/db = A^{-1}.
    A = spd(5, gen, dtype, cond=5.0)
    b = torch.randn(3, 5, generator=gen, dtype=dtype, requires_grad=True)

    def f(z, b):
        g = torchfpi.energy_grad(lambda z, b: 0.5 * ((z @ A) * z).sum(1) - (b * z).sum(1), z, b)
        return z - 0.3 * g

    for mode in ["fpi", "anderson"]:
        sol = _solve(f, torch.zeros(3, 5, dtype=dtype), b, backward=mode)
        torch.testing.assert_close(sol.value, torch.linalg.solve(A, b.detach().T).T, rtol=1e-9, atol=1e-9)
        w = torch.randn(3, 5, generator=gen, dtype=dtype)
        (g,) = torch.autograd.grad((sol.value * w).sum(), b)
        torch.testing.assert_close(g, w @ torch.linalg.inv(A), rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_implicit_vs_unrolled_vs_finite_differences(dtype):
    lin = torch.nn.Linear(4, 4, dtype=dtype)
    with torch.no_grad():
        lin.weight.mul_(0.4)

    class Map(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    x = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    rep = torchfpi.check_gradients(Map(), torch.zeros(3, 4, dtype=dtype), x, tolerance=1e-6)
    assert rep.ok, rep.table()
    assert rep.errors["onestep"] > 1e-3 and rep.errors["fpi"] < 1e-8


class _TwoTerms:
    """A user adjoint: u = g + J^T g (a two-term Neumann series), written only against the protocol."""

    exact = False

    def solve(self, system):
        return system.g + system.vjp(system.g), None


def test_user_adjoint_object_and_registered_name(gen, dtype):
    # Adding an adjoint: one class with solve(system), one registry entry.
    from torchfpi import _adjoints

    prob = affine(5, 3, 0.5, gen, dtype)
    x = torch.randn(2, 3, generator=gen, dtype=dtype, requires_grad=True)

    def grad(backward):
        sol = _solve(prob, torch.zeros(2, 5, dtype=dtype), x, backward=backward)
        return torch.autograd.grad(sol.value.sum(), x)[0]

    reference = grad(torchfpi.NeumannBackward(terms=1))
    torch.testing.assert_close(grad(_TwoTerms()), reference, rtol=0, atol=0)
    assert isinstance(_TwoTerms(), torchfpi.Adjoint)
    torchfpi.register_adjoint("two-terms", _TwoTerms)
    try:
        torch.testing.assert_close(grad("two-terms"), reference, rtol=0, atol=0)
        assert "two-terms" not in torchfpi.check_gradients(prob, torch.zeros(1, 5, dtype=dtype), x[:1].detach().requires_grad_(), modes=("fpi", "two-terms")).exact_modes
        with pytest.raises(ValueError, match="already registered"):
            torchfpi.register_adjoint("fpi", _TwoTerms)
    finally:
        del _adjoints.ADJOINTS["two-terms"]
    with pytest.raises(ValueError, match="two-terms"):
        grad("two-terms")


@pytest.mark.parametrize("solver", ["fpi", "anderson", torchfpi.Anderson(m=3)])
def test_implicit_adjoint_with_any_solver_is_exact_to_second_order(solver, gen, dtype):
    prob = affine(4, 3, 0.6, gen, dtype)
    x = torch.randn(2, 3, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(2, 4, generator=gen, dtype=dtype)
    sol = _solve(prob, torch.zeros(2, 4, dtype=dtype), x, backward=torchfpi.ImplicitAdjoint(solver))
    (g,) = torch.autograd.grad((sol.value * w).sum(), x, create_graph=True)
    torch.testing.assert_close(g, prob.grad_x(w), rtol=GRAD_RTOL, atol=GRAD_RTOL)
    (gg,) = torch.autograd.grad((g**2).sum(), x, allow_unused=True)  # affine: grad_x is constant in x
    assert gg is None or float(gg.abs().max()) < GRAD_RTOL


def test_adjoint_adds_g_in_place_only_into_a_fresh_vjp():
    # u <- g + J^T u writes g into the engine's result only when that is a new tensor of its
    # own: never into u, g, a view of either, a broadcast or another dtype.
    from torchfpi._adjoints import _fresh

    g = torch.randn(4, 3)
    u = torch.randn(4, 3)
    mem = g.untyped_storage().data_ptr()
    assert _fresh(torch.randn(4, 3), g, mem, u)
    for v in (u, u.view(4, 3), u.reshape(12).view(4, 3), g, g[:], torch.randn(1, 3).expand(4, 3),
              torch.randn(3, 4).T, torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, requires_grad=True)):
        assert not _fresh(v, g, mem, u)


def test_adjoint_in_place_sum_on_a_large_state_gives_the_exact_gradient(monkeypatch):
    # A large state (above IN_PLACE_ELEMENTS) takes u <- J^T u + g in place into the engine's
    # result; with a pass-through node on the path (its backward hands the gradient on as it
    # is), the gradient is still exact.
    from torchfpi import _adjoints

    class Through(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return z.view_as(z)

        @staticmethod
        def backward(ctx, grad):
            return grad

    n = 300
    assert 64 * n > _adjoints.IN_PLACE_ELEMENTS
    x = torch.randn(64, n, dtype=torch.float64, requires_grad=True)
    seen = []
    real = _adjoints._fresh
    monkeypatch.setattr(_adjoints, "_fresh", lambda *a: seen.append(real(*a)) or seen[-1])
    z = torchfpi.fixed_point(lambda z, x: 0.4 * Through.apply(z) + x, torch.zeros(64, n, dtype=torch.float64), x,
                             tol=1e-12, max_iter=200).value
    w = torch.randn(64, n, dtype=torch.float64)
    (gx,) = torch.autograd.grad((z * w).sum(), x)
    torch.testing.assert_close(gx, w / 0.6)  # dz*/dx = (1 - 0.4)^-1
    assert seen and all(seen)  # 0.4 u is a new tensor: g went into it in place
