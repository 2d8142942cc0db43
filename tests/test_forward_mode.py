"""Forward-mode AD: the implicit JVP of fixed_point and of the layers, and torch.func transforms.

The tangent of z* solves t = (df/dz) t + (df/dx) x' + (df/dtheta) theta' (FPI on JVPs to
backward_tol); it is checked in float64 against central finite differences of the solve and
against ``torch.autograd.functional.jvp`` of an unrolled solve.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from problems import contraction, spd
from torch.func import functional_call

import torchfpi
from torchfpi.energies import QuadraticEnergy

with warnings.catch_warnings():
    # torch's own: its first make_dual imports JVP decompositions that call torch.jit.script.
    warnings.simplefilter("ignore", DeprecationWarning)
    import torch._decomp.decompositions_for_jvp  # noqa: F401

TOL = 1e-13
UNROLL = 300  # iterations of the unrolled reference (the maps contract at <= 0.7)


def _tangent(t):
    return fwAD.unpack_dual(t).tangent


def _rebind(module, names, params):
    """Set ``module``'s parameters to ``params`` for good (a differentiable unrolled reference)."""
    for name, p in zip(names, params):
        *path, attr = name.split(".")
        mod = module
        for part in path:
            mod = getattr(mod, part)
        mod._parameters.pop(attr, None)
        setattr(mod, attr, p)


def _tanh_map(gen, dtype, n=6, d=4):
    A = contraction(n, 0.7, gen, dtype)
    U = torch.randn(n, d, generator=gen, dtype=dtype)

    def f(z, x):
        return torch.tanh(z @ A.T + x @ U.T)

    return f


def test_fixed_point_jvp_matches_finite_differences_and_unrolled_jvp(gen, dtype):
    f = _tanh_map(gen, dtype)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    v = torch.randn(3, 4, generator=gen, dtype=dtype)
    z0 = torch.zeros(3, 6, dtype=dtype)
    with fwAD.dual_level():
        sol = torchfpi.fixed_point(f, z0, fwAD.make_dual(x, v), tol=TOL, backward_tol=TOL)
        tan = _tangent(sol.value)
    assert tan is not None and bool(sol.converged.all())
    eps = 1e-6
    plus = torchfpi.fixed_point(f, z0, x + eps * v, tol=TOL).value
    minus = torchfpi.fixed_point(f, z0, x - eps * v, tol=TOL).value
    torch.testing.assert_close(tan, (plus - minus) / (2 * eps), atol=1e-8, rtol=1e-7)

    def unrolled(x):
        z = z0
        for _ in range(UNROLL):
            z = f(z, x)
        return z

    _, ref = torch.autograd.functional.jvp(unrolled, x, v)
    torch.testing.assert_close(tan, ref, atol=1e-12, rtol=1e-10)


def test_fixed_point_jvp_tuple_state_and_captured_dual(gen, dtype):
    # A tuple state, one explicit dual input and one dual tensor f captures through its closure.
    A = contraction(3, 0.5, gen, dtype)
    x = torch.randn(2, 3, generator=gen, dtype=dtype)
    c = torch.randn(3, generator=gen, dtype=dtype)
    vx, vc = torch.randn(2, 3, generator=gen, dtype=dtype), torch.randn(3, generator=gen, dtype=dtype)
    z0 = (torch.zeros(2, 3, dtype=dtype), torch.zeros(2, 1, dtype=dtype))

    def make(cap):
        def f(z, x):
            a, b = z
            return torch.tanh(a @ A.T + x * b + cap), 0.5 * torch.sin(a.sum(1, keepdim=True)) + 0.1

        return f

    with fwAD.dual_level():
        sol = torchfpi.fixed_point(make(fwAD.make_dual(c, vc)), z0, fwAD.make_dual(x, vx), tol=1e-12,
                                   backward_tol=1e-12, max_iter=1000)
        tans = tuple(_tangent(p) for p in sol.value)

    def unrolled(x, c):
        z = z0
        for _ in range(UNROLL):
            z = make(c)(z, x)
        return z

    _, ref = torch.autograd.functional.jvp(unrolled, (x, c), (vx, vc))
    for t, r in zip(tans, ref):
        torch.testing.assert_close(t, r, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("kind", ["FPINN", "FPIGD"])
def test_layers_jvp_with_dual_parameters_and_inputs(kind, dtype):
    torch.manual_seed(0)
    if kind == "FPINN":
        upd = torchfpi.MLPUpdate(4, 3, hidden=8, activation="tanh").to(dtype).eval()
        layer: torchfpi.FPILayer = torchfpi.FPINN(upd, tol=TOL, backward_tol=TOL)
        x = torch.randn(2, 3, dtype=dtype)
    else:
        A = spd(4, torch.Generator().manual_seed(1), dtype, cond=4.0)
        layer = torchfpi.FPIGD(QuadraticEnergy(4, A=A).to(dtype), step_size=0.3,
                               init=lambda b: torch.zeros_like(b), tol=TOL, backward_tol=TOL)
        x = torch.randn(2, 4, dtype=dtype)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone() for _, p in layer.named_parameters()]
    vs = [torch.randn_like(t) for t in [x, *params]]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, v) for t, v in zip([x, *params], vs)]
        out = functional_call(layer, dict(zip(names, duals[1:])), (duals[0],))
        tan = _tangent(out)
    assert tan is not None and bool(layer.last_solution.converged.all())
    z0 = layer.initial_state((x,), None)

    def unrolled(x, *ps):
        _rebind(layer, names, ps)
        z = z0
        for _ in range(UNROLL):
            z = layer.map(z, x)
        return z

    _, ref = torch.autograd.functional.jvp(unrolled, (x, *params), tuple(vs))
    torch.testing.assert_close(tan, ref, atol=1e-11, rtol=1e-9)


def test_unbatched_state_and_fpilayer_jvp(gen, dtype):
    A = contraction(3, 0.6, gen, dtype)
    x = torch.randn(3, generator=gen, dtype=dtype)
    v = torch.randn(3, generator=gen, dtype=dtype)
    exact = torch.linalg.solve(torch.eye(3, dtype=dtype) - A, v)  # z* = (I - A)^{-1} x
    layer = torchfpi.FPILayer(lambda z, x: z @ A.T + x, init=torch.zeros_like, tol=TOL, backward_tol=TOL)
    with fwAD.dual_level():
        t1 = _tangent(torchfpi.fixed_point(lambda z, x: A @ z + x, torch.zeros(3, dtype=dtype),
                                           fwAD.make_dual(x, v), batched=False, tol=TOL, backward_tol=TOL).value)
        t2 = _tangent(layer(fwAD.make_dual(x.unsqueeze(0), v.unsqueeze(0))))
    torch.testing.assert_close(t1, exact, atol=1e-12, rtol=0)
    torch.testing.assert_close(t2, exact.unsqueeze(0), atol=1e-12, rtol=0)


def test_no_dual_means_no_tangent_and_the_same_value(gen, dtype):
    f = _tanh_map(gen, dtype)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    z0 = torch.zeros(3, 6, dtype=dtype)
    plain = torchfpi.fixed_point(f, z0, x, tol=1e-10).value
    with fwAD.dual_level():
        sol = torchfpi.fixed_point(f, z0, x, tol=1e-10)
        assert _tangent(sol.value) is None
        # z* does not depend on z0: a tangent on z0 alone gives none either.
        sol0 = torchfpi.fixed_point(f, fwAD.make_dual(z0, torch.ones_like(z0)), x, tol=1e-10)
        assert _tangent(sol0.value) is None
    assert torch.equal(sol.value, plain) and torch.equal(sol0.value, plain)


def test_forward_and_reverse_mode_together_and_under_no_grad(gen, dtype):
    f = _tanh_map(gen, dtype)
    x = torch.randn(3, 4, generator=gen, dtype=dtype, requires_grad=True)
    v = torch.randn(3, 4, generator=gen, dtype=dtype)
    z0 = torch.zeros(3, 6, dtype=dtype)
    with fwAD.dual_level():
        out = torchfpi.fixed_point(f, z0, fwAD.make_dual(x, v), tol=TOL, backward_tol=TOL).value
        tan = _tangent(out)
        (g,) = torch.autograd.grad(fwAD.unpack_dual(out).primal.sum(), x)
        with torch.no_grad():
            tan_ng = _tangent(torchfpi.fixed_point(f, z0, fwAD.make_dual(x.detach(), v), tol=TOL, backward_tol=TOL,
                                                   compact=True).value)
    ref = torchfpi.fixed_point(f, z0, x, tol=TOL, backward_tol=TOL).value
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(tan, tan_ng, atol=1e-13, rtol=0)


def test_tangent_solve_reports_non_convergence(gen, dtype):
    f = _tanh_map(gen, dtype)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)
    with fwAD.dual_level():
        with pytest.raises(torchfpi.FixedPointError, match=r"tangent \(forward mode\).*backward_max_iter=2"):
            torchfpi.fixed_point(f, torch.zeros(3, 6, dtype=dtype), fwAD.make_dual(x, torch.ones_like(x)),
                                 tol=1e-10, backward_tol=1e-12, backward_max_iter=2, on_failure="raise")


@pytest.mark.parametrize("transform", ["vmap", "jvp", "grad", "jacrev", "jacfwd", "hessian"])
def test_torch_func_transforms_raise_one_clear_error(transform, gen, dtype):
    f = _tanh_map(gen, dtype)
    x = torch.randn(3, 4, generator=gen, dtype=dtype)

    def solve(x):
        return torchfpi.fixed_point(f, torch.zeros(x.shape[:-1] + (6,), dtype=dtype), x, tol=1e-10).value

    def scalar(x):
        return solve(x).sum()

    calls = {
        "vmap": lambda: torch.func.vmap(lambda xi: solve(xi.unsqueeze(0)))(x),
        "jvp": lambda: torch.func.jvp(solve, (x,), (torch.ones_like(x),)),
        "grad": lambda: torch.func.grad(scalar)(x),
        "jacrev": lambda: torch.func.jacrev(solve)(x),
        "jacfwd": lambda: torch.func.jacfwd(solve)(x),
        "hessian": lambda: torch.func.hessian(scalar)(x),
    }
    with pytest.raises(NotImplementedError, match=r"does not support torch\.func transforms.*pass a batch"
                       r".*torch\.autograd\.functional\.jacobian.*torch\.autograd\.forward_ad"):
        calls[transform]()
    # What the message names works.
    jac = torch.autograd.functional.jacobian(solve, x[:1])
    assert jac.shape == (1, 6, 1, 4)
