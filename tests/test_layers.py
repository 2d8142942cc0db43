"""FPI_NN and FPI_GD layers, energies, contraction tools (float64 where exactness matters)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from problems import GRAD_RTOL, SOLVER_TOL, spd
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import torchfpi
from torchfpi.energies import ICNNEnergy, MultiLabelEnergy, QuadraticEnergy


def _params_call(layer, x):
    """(fn, args) for gradcheck w.r.t. x and every parameter of ``layer``.

    The parameters are rebound to the gradcheck inputs for good (not just during the call, as
    ``functional_call`` does): a double backward recomputes f after the call has returned.
    """
    named = list(layer.named_parameters())
    names = [n for n, _ in named]
    params = tuple(p.detach().clone().requires_grad_() for _, p in named)

    def fn(x, *ps):
        for name, p in zip(names, ps):
            *path, attr = name.split(".")
            mod = layer
            for part in path:
                mod = getattr(mod, part)
            mod._parameters.pop(attr, None)
            setattr(mod, attr, p)
        return layer(x)

    return fn, (x, *params)


def test_fpigd_quadratic_reaches_closed_form_with_exact_gradients(gen, dtype):
    A = spd(4, gen, dtype, cond=4.0)
    layer = torchfpi.FPIGD(QuadraticEnergy(4, A=A), step_size=0.4, init=lambda b: torch.zeros_like(b),
                           tol=SOLVER_TOL, max_iter=1000)
    b = torch.randn(3, 4, generator=gen, dtype=dtype, requires_grad=True)
    z = layer(b)
    torch.testing.assert_close(z, torch.linalg.solve(A, b.detach().T).T, rtol=1e-9, atol=1e-9)
    w = torch.randn(3, 4, generator=gen, dtype=dtype)
    (g,) = torch.autograd.grad((z * w).sum(), b)
    torch.testing.assert_close(g, w @ torch.linalg.inv(A), rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_fpigd_learned_quadratic_parameter_gradient_closed_form(gen, dtype):
    # z* = A^{-1} b with A = L L^T + eps I: dL/dA = -A^{-T} w z*^T summed over the batch.
    energy = QuadraticEnergy(3, eps=0.5).to(dtype)
    with torch.no_grad():
        energy.L.copy_(torch.eye(3, dtype=dtype) + 0.1 * torch.randn(3, 3, generator=gen, dtype=dtype))
    layer = torchfpi.FPIGD(energy, step_size=0.3, init=lambda b: torch.zeros_like(b), tol=SOLVER_TOL, max_iter=2000)
    b = torch.randn(5, 3, generator=gen, dtype=dtype)
    w = torch.randn(5, 3, generator=gen, dtype=dtype)
    (gL,) = torch.autograd.grad((layer(b) * w).sum(), energy.L)
    L = energy.L.detach().clone().requires_grad_()
    A = L @ L.T + 0.5 * torch.eye(3, dtype=dtype)
    (gL_ref,) = torch.autograd.grad((torch.linalg.solve(A, b.T).T * w).sum(), L)
    torch.testing.assert_close(gL, gL_ref, rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_gradcheck_and_gradgradcheck_fpinn_with_parameters(dtype):
    layer = torchfpi.FPINN(torchfpi.MLPUpdate(3, 2, hidden=4, activation="tanh", spectral_norm=False), tol=SOLVER_TOL, max_iter=500).to(dtype)
    layer.eval()  # freeze the spectral-norm power iteration between calls
    fn, args = _params_call(layer, torch.randn(2, 2, dtype=dtype, requires_grad=True))
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


def test_gradcheck_and_gradgradcheck_fpigd_with_parameters(dtype):
    energy = MultiLabelEnergy(3, interactions=2, tau=1.0).to(dtype)
    with torch.no_grad():
        energy.C.weight.normal_(0, 0.3)
        energy.c.normal_(0, 0.3)
    layer = torchfpi.FPIGD(energy, step_size=0.5, init=lambda s: torch.zeros_like(s),
                           tol=SOLVER_TOL, max_iter=500).to(dtype)
    fn, args = _params_call(layer, torch.randn(2, 3, dtype=dtype, requires_grad=True))
    assert gradcheck(fn, args)
    assert gradgradcheck(fn, args)


def test_projected_fpigd_stays_in_box_and_gradients_where_inactive(gen, dtype):
    A = spd(4, gen, dtype, cond=3.0)
    layer = torchfpi.FPIGD(QuadraticEnergy(4, A=A), step_size=0.5, projection="box", box=(0.0, 1.0),
                           init=lambda b: torch.full_like(b, 0.5), tol=SOLVER_TOL, max_iter=2000)
    b = (3 * torch.randn(6, 4, generator=gen, dtype=dtype)).requires_grad_()
    z = layer(b)
    assert (z >= 0).all() and (z <= 1).all()
    # Rows whose unconstrained minimiser lies strictly inside the box: gradient = A^{-1}.
    b_in = (A @ torch.full((4,), 0.5, dtype=dtype) + 0.2 * torch.randn(4, generator=gen, dtype=dtype)).unsqueeze(0)
    b_in.requires_grad_()
    z_in = layer(b_in)
    assert ((z_in > 0) & (z_in < 1)).all()
    w = torch.randn(1, 4, generator=gen, dtype=dtype)
    (g,) = torch.autograd.grad((z_in * w).sum(), b_in)
    torch.testing.assert_close(g, w @ torch.linalg.inv(A), rtol=GRAD_RTOL, atol=GRAD_RTOL)


def test_icnn_is_convex_and_fpigd_finds_its_minimiser(gen, dtype):
    torch.manual_seed(1)
    energy = ICNNEnergy(5, 3, hidden=(16, 16), mu=1.0).to(dtype)
    x = torch.randn(4, 3, dtype=dtype)
    z1, z2 = torch.randn(4, 5, dtype=dtype), torch.randn(4, 5, dtype=dtype)
    for t in torch.linspace(0.05, 0.95, 10, dtype=dtype):
        lhs = energy(t * z1 + (1 - t) * z2, x)
        rhs = t * energy(z1, x) + (1 - t) * energy(z2, x)
        assert (lhs <= rhs + 1e-12).all()
    layer = torchfpi.FPIGD(energy, step_size=0.2, init=lambda x: torch.zeros(x.shape[0], 5, dtype=dtype),
                           tol=1e-12, max_iter=3000)
    with torch.no_grad():
        z = layer(x)
    grad = torchfpi.energy_grad(energy, z, x)
    assert grad.abs().max() < 1e-9
    # Any perturbation raises the energy (unique minimiser of a strongly convex function).
    for _ in range(5):
        assert (energy(z + 1e-3 * torch.randn_like(z), x) > energy(z, x)).all()


def test_contraction_check_warns_only_for_large_steps(gen, dtype):
    A = spd(4, gen, dtype, cond=4.0)  # largest eigenvalue 4: steps below 0.5 contract
    b = torch.randn(2, 4, generator=gen, dtype=dtype)
    good = torchfpi.FPIGD(QuadraticEnergy(4, A=A), step_size=0.3, init=lambda b: torch.zeros_like(b), tol=1e-10, max_iter=500)
    good(b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = good.contraction_check(b)
    assert (r < 1).all()
    bad = torchfpi.FPIGD(QuadraticEnergy(4, A=A), step_size=0.7, init=lambda b: torch.zeros_like(b),
                         max_iter=5, on_failure="ignore")
    with pytest.warns(torchfpi.ConvergenceWarning, match="smaller step_size"):
        r = bad.contraction_check(b, z=torch.linalg.solve(A, b.T).T)
    assert (r > 1).all()


def test_energy_trace_decreases(gen, dtype):
    A = spd(4, gen, dtype, cond=4.0)
    layer = torchfpi.FPIGD(QuadraticEnergy(4, A=A), step_size=0.2, record_energy=True,
                           init=lambda b: torch.zeros_like(b), tol=1e-10, max_iter=500)
    layer(torch.randn(3, 4, generator=gen, dtype=dtype))
    tr = layer.energy_trace
    assert tr is not None and tr.shape[1] == 3
    assert (tr[1:] <= tr[:-1] + 1e-12).all()


def test_jacobian_regularisation_reduces_spectral_radius():
    torch.manual_seed(0)
    update = torchfpi.MLPUpdate(8, 4, hidden=32, gamma=1.0, spectral_norm=False, activation="tanh")
    with torch.no_grad():
        update.Wz.mul_(3.0)
    x = torch.randn(32, 4)
    z = torch.randn(32, 8)

    def radius():
        return float(torchfpi.spectral_radius(update, z, x).mean())

    before = radius()
    opt = torch.optim.Adam(update.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torchfpi.jacobian_penalty(update, z, x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = radius()
    assert after < 0.7 * before


def test_jacobian_penalty_linear_map_closed_form_and_probes():
    torch.manual_seed(0)
    a = torch.randn(5, 5, dtype=torch.float64)
    f = lambda z, x: z @ a.T + x  # noqa: E731  (J = a for every sample)
    z, x = torch.zeros(3, 5, dtype=torch.float64), torch.ones(3, 5, dtype=torch.float64)
    exact = a.square().sum() / 5
    est = torchfpi.jacobian_penalty(f, z, x, samples=4000).mean()
    assert torch.allclose(est, exact, rtol=0.05)
    # A shared generator gives the same penalty; explicit probes give ||J^T eps||^2 exactly.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    p1 = torchfpi.jacobian_penalty(f, z, x, samples=2, generator=g1)
    p2 = torchfpi.jacobian_penalty(f, z, x, samples=2, generator=g2)
    assert torch.equal(p1, p2)
    probes = torch.randn(2, 3, 5, dtype=torch.float64)
    got = torchfpi.jacobian_penalty(f, z, x, probes=probes)
    want = (probes @ a).square().sum(-1).mean(0) / 5
    assert torch.allclose(got, want)
    # Rows of a global batch's probes give the rows of its penalty (data-parallel sharding).
    part = torchfpi.jacobian_penalty(f, z[1:], x[1:], probes=probes[:, 1:])
    assert torch.allclose(part, got[1:])
    with pytest.raises(ValueError, match="probes: expected a tensor of shape"):
        torchfpi.jacobian_penalty(f, z, x, probes=torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="samples: expected an integer >= 1"):
        torchfpi.jacobian_penalty(f, z, x, samples=0)


def test_fpinn_conv_update_trains_one_step():
    layer = torchfpi.FPINN(torchfpi.ConvUpdate(1, 1, hidden=4), tol=1e-4, max_iter=100)
    x = torch.randn(2, 1, 8, 8)
    out = layer(x)
    assert out.shape == (2, 1, 8, 8)
    out.square().mean().backward()
    raw = layer.f.parametrizations.Wz.original  # the parameter behind the normalised Wz
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    assert layer.last_solution.backward.converged.all()


def test_fpinn_mlp_is_contractive_by_construction():
    layer = torchfpi.FPINN(torchfpi.MLPUpdate(16, 8, hidden=64, gamma=0.9), tol=1e-6, max_iter=200)
    x = torch.randn(8, 8)
    z = layer(x)
    r = torchfpi.spectral_radius(layer.f, z.detach(), x)
    assert (r <= 0.9 + 1e-3).all()


def test_energy_grad_checks_energy_shape():
    with pytest.raises(ValueError, match=r"one value per sample, shape \(2,\); got \(\)"):
        torchfpi.energy_grad(lambda z: z.sum(), torch.zeros(2, 3))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torchfpi.FPIGD(lambda z: z.sum(1), step_size=0), "step_size"),
        (lambda: torchfpi.FPIGD(lambda z: z.sum(1), projection="sphere"), "projection"),
        (lambda: torchfpi.FPIGD(lambda z: z.sum(1), projection="box", box=(1.0, 0.0)), "box"),
        (lambda: torchfpi.MLPUpdate(2, 2, activation="gelu"), "activation"),
        (lambda: torchfpi.MLPUpdate(2, 2, gamma=1.5), "gamma"),
        (lambda: torchfpi.ConvUpdate(1, 1, kernel_size=2), "kernel_size"),
        (lambda: torchfpi.ConvUpdate(1, 1, activation="gelu"), "activation"),
        (lambda: ICNNEnergy(2, 2, hidden=()), "hidden"),
        (lambda: QuadraticEnergy(2, A=torch.eye(3)), "A: expected shape"),
    ],
)
def test_layer_option_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_functional_call_first_order_and_loud_double_backward(dtype):
    energy = MultiLabelEnergy(3, interactions=2).to(dtype)
    layer = torchfpi.FPIGD(energy, step_size=0.5, init=lambda s: torch.zeros_like(s), tol=1e-10).to(dtype)
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    fn = lambda x, *ps: functional_call(layer, dict(zip(names, ps)), (x,))  # noqa: E731
    assert gradcheck(fn, (x, *params))
    out = fn(x, *params)
    # A differentiable backward recomputes f, which now uses the module's own parameters again.
    with pytest.raises(torchfpi.FixedPointError, match="no longer uses a tensor"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


def test_one_options_dataclass_for_every_entry_point():
    opts = torchfpi.Options(tol=1e-8, backward="anderson", batched=True)
    upd = torchfpi.MLPUpdate(4, 3, hidden=8)
    layers = [
        torchfpi.FPILayer(upd, options=opts),
        torchfpi.FPINN(upd, options=opts),
        torchfpi.FPINN(upd, tol=1e-8, backward="anderson", batched=True),  # FPINN takes batched too
        torchfpi.FPIGD(lambda z: 0.5 * (z**2).sum(1), tol=1e-8, backward="anderson"),
    ]
    assert all(layer.options == opts for layer in layers)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.tol = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError, match=r"FPINN: unknown option\(s\) \['tolerance'\]"):
        torchfpi.FPINN(upd, tolerance=1e-3)
    with pytest.raises(ValueError, match="tol: expected a positive number"):
        torchfpi.FPIGD(lambda z: (z**2).sum(1), tol=-1.0)
    assert opts.replace(backward_tol=None).adjoint_tol == 1e-8


# -- FPIGD's step size: z* does not depend on it (learn_step_size is deprecated) -------------------


def test_learn_step_size_is_deprecated_and_registers_no_parameter(gen, dtype):
    energy = QuadraticEnergy(3, A=spd(3, gen, dtype, cond=3.0)).to(dtype)
    with pytest.warns(FutureWarning, match=r"learn_step_size=True\) is deprecated.*does not depend on the step size"):
        layer = torchfpi.FPIGD(energy, step_size=0.2, learn_step_size=True, init=torch.zeros_like, tol=1e-10)
    plain = torchfpi.FPIGD(energy, step_size=0.2, init=torch.zeros_like, tol=1e-10)
    assert "log_step_size" not in dict(layer.named_parameters())
    assert "log_step_size" in dict(layer.named_buffers())
    assert {n for n, _ in layer.named_parameters()} == {n for n, _ in plain.named_parameters()}
    b = torch.randn(4, 3, generator=gen, dtype=dtype)
    assert torch.equal(layer(b), plain(b))
    # A checkpoint of the old trainable step size still loads (same key, now a buffer).
    state = dict(plain.state_dict(), log_step_size=torch.tensor(-1.0, dtype=dtype))
    plain.load_state_dict(state)
    assert float(plain.step_size) == pytest.approx(torch.e**-1)


@pytest.mark.parametrize("projection", [None, "box"])
def test_fixed_point_gradient_wrt_step_size_is_zero_for_projections(projection, gen, dtype):
    # z* = P(z* - a grad E(z*)) does not depend on a when P is the identity or a convex
    # projection: the exact gradient w.r.t. a vanishes (to the solve's tolerance), while the
    # gradient w.r.t. b does not. (Why learn_step_size was deprecated.)
    A = spd(4, gen, dtype, cond=4.0)
    b = (2.0 * torch.randn(3, 4, generator=gen, dtype=dtype)).requires_grad_(True)
    a = torch.tensor(0.2, dtype=dtype, requires_grad=True)

    def f(z, b, a):
        step = z - a * (z @ A - b)
        return step if projection is None else step.clamp(0.0, 1.0)

    z = torchfpi.fixed_point(f, torch.zeros(3, 4, dtype=dtype), b, a, tol=1e-13, backward_tol=1e-13,
                             max_iter=2000, backward_max_iter=2000, per_sample=(0,)).value
    w = torch.randn(3, 4, generator=gen, dtype=dtype)
    ga, gb = torch.autograd.grad((w * z).sum(), (a, b))
    assert abs(float(ga)) < 1e-10
    assert float(gb.abs().max()) > 1e-2
    if projection == "box":
        assert bool(((z == 0) | (z == 1)).any())  # some constraints are active
    # The boundary of the claim: a map that is not a projection makes z* depend on a.
    z2 = torchfpi.fixed_point(lambda z, b, a: 0.5 * (z - a * (z @ A - b)), torch.zeros(3, 4, dtype=dtype), b, a,
                              tol=1e-13, backward_tol=1e-13, per_sample=(0,)).value
    (ga2,) = torch.autograd.grad((w * z2).sum(), a)
    assert abs(float(ga2)) > 1e-3


# -- docstring claims of _layers.py ------------------------------------------------------------------


def test_fpinn_prepares_its_constants_once_per_solve():
    upd = torchfpi.MLPUpdate(4, 3, hidden=8)
    calls = []
    original = upd.prepare
    upd.prepare = lambda x: calls.append(1) or original(x)  # type: ignore[method-assign]
    layer = torchfpi.FPINN(upd, tol=1e-6, max_iter=50)
    layer(torch.randn(5, 3))
    assert len(calls) == 1 and int(layer.last_solution.iterations.max()) > 1


def test_spectral_norm_refreshes_once_per_training_call_and_never_in_eval():
    upd = torchfpi.MLPUpdate(4, 3, hidden=8)
    layer = torchfpi.FPINN(upd, tol=1e-6, max_iter=50)
    sn = upd.parametrizations.Wz[0]  # torch's spectral norm
    W2 = upd.parametrizations.Wz.original.detach()
    u = torch.nn.functional.normalize(W2 @ sn._v, dim=0)
    v = torch.nn.functional.normalize(W2.T @ u, dim=0)
    layer(torch.randn(5, 3))  # training mode: one power step per call, not per iteration
    assert int(layer.last_solution.iterations.max()) > 1
    torch.testing.assert_close((sn._u, sn._v), (u, v))
    layer.eval()
    u1 = sn._u.clone()
    layer(torch.randn(5, 3))
    assert torch.equal(sn._u, u1)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@torch.no_grad()
def test_a_fresh_update_is_normalised_and_old_state_dicts_load(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        make, x, names = (lambda: torchfpi.MLPUpdate(6, 3, hidden=32)), torch.randn(2, 3), ("Wz", "out.weight")
    else:
        make, x, names = (lambda: torchfpi.ConvUpdate(2, 1, hidden=4)), torch.randn(2, 1, 5, 5), ("Wz", "Wo")
    upd = make().eval()
    _, Wz, Wo, _ = upd.prepare(x)
    for W in (Wz, Wo):  # 15 power iterations at construction: normalised from the start
        assert abs(float(torch.linalg.matrix_norm(W.reshape(W.shape[0], -1), ord=2)) - 1.0) < 0.02  # was 2.55
    # a torchfpi 0.1 state dict: raw weights under their names and one vector sn_*.u each; its
    # estimate sigma = u^T W normalize(W^T u) must give the same function
    old = {k: v for k, v in upd.state_dict().items() if "parametrizations" not in k}
    expected = []
    for name, vec in zip(names, ("sn_z.u", "sn_o.u")):
        holder, _, leaf = name.rpartition(".")
        W = getattr((upd.get_submodule(holder) if holder else upd).parametrizations, leaf).original.clone()
        W2 = W.reshape(W.shape[0], -1)
        u = torch.nn.functional.normalize(torch.randn(W2.shape[0]), dim=0)
        old[name], old[vec] = W, u
        expected.append(W / torch.dot(u, W2 @ torch.nn.functional.normalize(W2.T @ u, dim=0)))
    fresh = make().eval()
    fresh.load_state_dict(old)
    _, Wz, Wo, _ = fresh.prepare(x)
    torch.testing.assert_close((Wz, Wo), tuple(expected))


def test_mlp_update_out_activation_and_its_validation():
    upd = torchfpi.MLPUpdate(4, 3, hidden=8, out_activation="sigmoid")
    z = torchfpi.FPINN(upd, tol=1e-6)(torch.randn(6, 3))
    assert bool(((z > 0) & (z < 1)).all())
    with pytest.raises(ValueError, match="out_activation: expected None, 'sigmoid' or 'tanh'"):
        torchfpi.MLPUpdate(4, 3, out_activation="relu")


def test_contraction_check_needs_a_solve_or_z():
    layer = torchfpi.FPIGD(lambda z: 0.5 * (z**2).sum(1), step_size=0.5)
    with pytest.raises(ValueError, match="no solve has run yet"):
        layer.contraction_check()
    radius = layer.contraction_check(z=torch.zeros(2, 3))
    torch.testing.assert_close(radius, torch.full((2,), 0.5), atol=1e-4, rtol=0)


def test_fpigd_compact_never_slices_energy_parameters(gen, dtype):
    # The energy's parameters are parameters, never sliced: batch == their dim 0 is harmless.
    n = 5
    energy = QuadraticEnergy(n, A=spd(n, gen, dtype, cond=50.0)).to(dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    b[1:] = b[0]
    b[3] = 5 * torch.randn(n, generator=gen, dtype=dtype)  # converges at another iteration
    comp = torchfpi.FPIGD(energy, step_size=0.02, init=torch.zeros_like, tol=1e-10, max_iter=5000, compact=True)(b)
    rows = [torchfpi.FPIGD(energy, step_size=0.02, init=torch.zeros_like, tol=1e-10, max_iter=5000)(b[i:i + 1])
            for i in range(n)]
    torch.testing.assert_close(comp, torch.cat(rows), atol=1e-9, rtol=0)


# -- input rank, step size and inference mode (issue 14) -----------------------------------------
@pytest.mark.parametrize(
    "make, x, shape",
    [
        (lambda: torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8)), torch.randn(3), r"\(B, 3\), got \(3,\)"),
        (lambda: torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8)), torch.randn(2, 5), r"\(B, 3\), got \(2, 5\)"),
        (lambda: torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8)), torch.randn(2, 1, 3), r"\(B, 3\)"),
        (lambda: torchfpi.FPINN(torchfpi.ConvUpdate(2, 1, hidden=4)), torch.randn(1, 5, 5), r"\(B, 1, \*, \*\)"),
        (lambda: torchfpi.FPINN(torchfpi.ConvUpdate(2, 1, hidden=4)), torch.randn(1, 3, 5, 5), r"\(B, 1, \*, \*\)"),
    ],
)
def test_layer_checks_its_input_rank(make, x, shape):
    layer = make()
    with pytest.raises(ValueError, match=r"x: (MLP|Conv)Update expects shape " + shape):
        layer(x)


def test_one_sample_without_batch_dim_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"x\.unsqueeze\(0\)"):
        torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8))(torch.randn(3))
    with pytest.raises(ValueError, match=r"z: MLPUpdate expects shape \(B, 4\)"):
        torchfpi.MLPUpdate(4, 3, hidden=8)(torch.zeros(4), torch.zeros(1, 3))


@pytest.mark.parametrize("bad, exc", [(float("nan"), ValueError), (float("inf"), ValueError), (0.0, ValueError),
                                      (-0.1, ValueError), (True, TypeError), ("0.1", TypeError)])
def test_fpigd_step_size_must_be_finite_positive(bad, exc):
    with pytest.raises(exc, match="step_size: expected a positive number"):
        torchfpi.FPIGD(lambda z: z.sum(1), step_size=bad)


@pytest.mark.parametrize("record", [False, True])
def test_fpigd_and_energy_grad_work_under_inference_mode(record):
    layer = torchfpi.FPIGD(QuadraticEnergy(2, A=2 * torch.eye(2)), step_size=0.3,
                           init=lambda b: torch.zeros_like(b), tol=1e-8, record_energy=record)
    with torch.inference_mode():
        b = torch.tensor([[2.0, 4.0]])
        z = layer(b)
        g = torchfpi.energy_grad(lambda z, b: 0.5 * ((z - b) ** 2).sum(1), torch.ones(2, 2), torch.zeros(2, 2))
    torch.testing.assert_close(z, torch.tensor([[1.0, 2.0]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(g, torch.ones(2, 2))
    assert (layer.energy_trace is not None) == record
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.tensor([[2.0, 4.0]])), z)


def _user_warnings(call):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        call()
    hits = [x for x in w if issubclass(x.category, torchfpi.ConvergenceWarning)]
    assert hits, "expected a ConvergenceWarning"
    return hits


@pytest.mark.parametrize("which", ["FPILayer", "FPINN", "FPIGD"])
def test_layer_warning_points_at_the_callers_line(which):
    x = torch.randn(2, 3, requires_grad=True)
    if which == "FPILayer":
        layer = torchfpi.FPILayer(lambda z, x: 0.999 * z + x, init=torch.zeros_like, max_iter=3)
    elif which == "FPINN":
        layer = torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8, gamma=1.0, spectral_norm=False), max_iter=2, tol=1e-12)
    else:
        layer = torchfpi.FPIGD(QuadraticEnergy(3), step_size=0.01, init=torch.zeros_like, max_iter=2)
    hits = _user_warnings(lambda: layer(x))
    assert all(h.filename == __file__ for h in hits), [(h.filename, h.lineno) for h in hits]


def test_layers_take_the_stop_and_cuda_graph_options():
    # stop="batch": every converged sample returns the image of the batch's last iteration;
    # cuda_graph=True off CUDA is refused by name when the layer runs.
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64)
    nn_layer = torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8).double(), tol=1e-9, stop="batch")
    gd_layer = torchfpi.FPIGD(QuadraticEnergy(3, A=2 * torch.eye(3, dtype=torch.float64)), step_size=0.3,
                              init=lambda b: torch.zeros_like(b), tol=1e-9, stop="batch")
    for layer, inp in ((nn_layer, x), (gd_layer, torch.randn(5, 3, dtype=torch.float64))):
        assert layer.options.stop == "batch"
        layer(inp)
        sol = layer.last_solution
        assert sol.converged.all() and len(torch.unique(sol.iterations)) == 1
    graph_layer = torchfpi.FPINN(torchfpi.MLPUpdate(4, 3, hidden=8).double(), cuda_graph=True)
    assert graph_layer.options.cuda_graph
    with pytest.raises(ValueError, match="cuda_graph=True needs the state on a CUDA device"):
        graph_layer(x)
