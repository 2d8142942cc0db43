"""Broyden: a forward and adjoint solver of the solver protocol, limited memory, safeguarded."""

from __future__ import annotations

import pytest
import torch
from problems import GRAD_RTOL, SOLVER_TOL, Affine, affine, contraction

import torchfpi
from torchfpi import Status


def test_broyden_converges_on_contractions_and_beats_fpi_on_slow_ones(gen, dtype):
    # Symmetric: the spectral radius is 0.97 (FPI needs hundreds of iterations).
    prob = Affine(contraction(8, 0.97, gen, dtype, symmetric=True), torch.randn(8, 3, generator=gen, dtype=dtype))
    x = torch.randn(5, 3, generator=gen, dtype=dtype)
    fpi = torchfpi.fixed_point(prob, torch.zeros(5, 8, dtype=dtype), x, tol=1e-10, max_iter=3000)
    bro = torchfpi.fixed_point(prob, torch.zeros(5, 8, dtype=dtype), x, solver="broyden", tol=1e-10, max_iter=3000)
    assert bool(bro.converged.all())
    torch.testing.assert_close(bro.value, prob.solution(x), rtol=1e-8, atol=1e-8)
    assert int(bro.iterations.max()) * 3 < int(fpi.iterations.max())


def test_broyden_gradients_exact_against_dense(gen, dtype):
    prob = affine(6, 3, 0.8, gen, dtype)
    x = torch.randn(4, 3, generator=gen, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 6, generator=gen, dtype=dtype)
    kw = dict(tol=SOLVER_TOL, max_iter=2000)
    grads = {}
    for name, solver, backward in (
        ("dense", "fpi", "dense"),
        ("broyden/broyden", "broyden", "broyden"),
        ("object", torchfpi.Broyden(m=3), torchfpi.ImplicitAdjoint(torchfpi.Broyden(m=3))),
    ):
        sol = torchfpi.fixed_point(prob, torch.zeros(4, 6, dtype=dtype), x, solver=solver, backward=backward, **kw)
        (grads[name],) = torch.autograd.grad((sol.value * w).sum(), x)
    torch.testing.assert_close(grads["dense"], prob.grad_x(w), rtol=GRAD_RTOL, atol=GRAD_RTOL)
    for name in ("broyden/broyden", "object"):
        torch.testing.assert_close(grads[name], grads["dense"], rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_broyden_second_derivative_through_its_adjoint(gen, dtype):
    A = contraction(4, 0.5, gen, dtype)
    x = torch.randn(2, 4, generator=gen, dtype=dtype, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ A.T + x)

    def value(solver, backward):
        return torchfpi.fixed_point(f, torch.zeros(2, 4, dtype=dtype), x, solver=solver, backward=backward,
                                    tol=SOLVER_TOL, max_iter=2000).value

    def hess(z):
        (g,) = torch.autograd.grad((z ** 2).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), x)
        return h

    torch.testing.assert_close(hess(value("broyden", "broyden")), hess(value("fpi", "unroll")), rtol=1e-7, atol=1e-8)


def test_broyden_memory_is_bounded_by_its_history(gen, dtype):
    prob = affine(10, 3, 0.99, gen, dtype)
    x = torch.randn(3, 3, generator=gen, dtype=dtype)
    solver = torchfpi.Broyden(m=4)
    seen = []

    class Spy:
        uses_residual = True

        def init(self, z, fz):
            return solver.init(z, fz)

        def step(self, state, z, fz, r):
            out = solver.step(state, z, fz, r)
            seen.append(sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)))
            return out

    torchfpi.fixed_point(prob, torch.zeros(3, 10, dtype=dtype), x, solver=Spy(), tol=1e-30, max_iter=60,
                         on_failure="ignore")
    assert len(seen) >= 50 and max(seen) == seen[5]
    assert max(seen) <= 2 * 4 * 3 * 10 + 2 * 3 * 10 + 3 + 4 * 3  # U, V; z, g; best; valid


def test_broyden_stops_per_sample_and_a_drifting_sample_does_not_disturb_the_others(dtype):
    # Rows 0, 1 contract (rates 0.1, 0.9); row 2 drifts (z + 1: no fixed point, never converges).
    s = torch.tensor([0.1, 0.9, 0.0], dtype=dtype).unsqueeze(1)
    d = torch.tensor([0.0, 0.0, 1.0], dtype=dtype).unsqueeze(1)

    def f(z, s, d):
        return (1 - d) * (s * torch.tanh(z) + 1) + d * (z + 1)

    with pytest.warns(torchfpi.ConvergenceWarning):
        sol = torchfpi.fixed_point(f, torch.zeros(3, 2, dtype=dtype), s, d, solver="broyden", tol=1e-10, max_iter=300)
    assert sol.status.tolist() == [Status.CONVERGED, Status.CONVERGED, Status.MAX_ITER]
    assert int(sol.iterations[0]) < int(sol.iterations[1])
    alone = torchfpi.fixed_point(f, torch.zeros(1, 2, dtype=dtype), s[:1], d[:1], solver="broyden", tol=1e-10)
    torch.testing.assert_close(alone.value, sol.value[:1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(m=0), dict(m=2.5), dict(damping=0.0), dict(restart=1.0), dict(max_step=float("nan"))])
def test_broyden_rejects_bad_options(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        torchfpi.Broyden(**bad)
