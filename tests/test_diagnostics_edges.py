"""spectral_radius against torch.linalg.eigvals, and the edges of spectral_radius / check_gradients."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch

import torchfpi

# The accuracy promised at the default budget (issue: within 5 % on complex-pair and
# non-normal spectra); tighter bounds below are the ones the docstring states.
RADIUS_RTOL = 0.05
DTYPES = [torch.float64, torch.float32]


def _linear(A):
    """f(z) = A_b z_b per sample b, so df/dz of sample b is A[b]."""
    return lambda z: torch.einsum("bij,bj->bi", A, z)


def _truth(A):
    return torch.linalg.eigvals(A.double()).abs().amax(1)


def _rel_err(est, truth):
    return float(((est.double() - truth) / truth).abs().max())


def _complex_pair(n, gen, rho=0.6, gap=0.8):
    """Dominant pair rho*exp(±i th), the rest inside gap*rho, hidden by a random similarity."""
    D = torch.zeros(n, n, dtype=torch.float64)
    th = 1.0 + float(torch.rand(1, generator=gen))
    D[0, 0] = D[1, 1] = rho * math.cos(th)
    D[0, 1], D[1, 0] = rho * math.sin(th), -rho * math.sin(th)
    D[2:, 2:] = 0.9 * gap * rho * torch.randn(n - 2, n - 2, generator=gen, dtype=torch.float64) / math.sqrt(n - 2)
    S = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return S @ D @ torch.linalg.inv(S)


def _disc(n, gen):
    """Eigenvalues filling a disc of radius about 0.9 (circular law): no spectral gap."""
    return 0.9 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)


def _orthogonal(n, gen):
    return torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]


def _triangular_non_normal(n, gen):
    """Q T Q^T with T upper triangular: diagonal in [-0.5, 0.5] (radius 0.5), large upper part."""
    d = torch.rand(n, generator=gen, dtype=torch.float64) - 0.5
    d[0] = 0.5
    T = torch.diag(d) + torch.triu(torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n), 1)
    Q = _orthogonal(n, gen)
    return Q @ T @ Q.T


def _jordan_like(n, gen, c=20.0):
    """2x2 blocks [[l, c], [0, l - 0.05]] (nearly defective, huge transient growth), radius 0.5."""
    T = torch.zeros(n, n, dtype=torch.float64)
    for i in range(0, n - 1, 2):
        lam = 0.5 if i == 0 else 0.8 * (float(torch.rand(1, generator=gen)) - 0.5)
        T[i, i], T[i + 1, i + 1], T[i, i + 1] = lam, lam - 0.05, c
    Q = _orthogonal(n, gen)
    return Q @ T @ Q.T


def _batch(make, n, gen, dtype, batch=3):
    return torch.stack([make(n, gen) for _ in range(batch)]).to(dtype)


def _power_ratio(A, iters=30):
    """The previous estimator: the last power-iteration ratio ||A v_k|| / ||v_k||."""
    v = torch.randn(A.shape[0], A.shape[1], dtype=A.dtype)
    for _ in range(iters):
        w = torch.einsum("bij,bj->bi", A, v)
        ratio = w.norm(dim=1) / v.norm(dim=1)
        v = w / w.norm(dim=1, keepdim=True)
    return ratio


# --- accuracy against torch.linalg.eigvals -------------------------------------------------


def test_default_budget_is_50_vjps():
    assert inspect.signature(torchfpi.spectral_radius).parameters["iters"].default == 50


@pytest.mark.parametrize("dtype", DTYPES)
def test_complex_dominant_pair(dtype, gen):
    A = _batch(_complex_pair, 256, gen, dtype)
    truth = _truth(A)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(3, 256, dtype=dtype, requires_grad=True))
    assert est.dtype == dtype and est.shape == (3,) and not est.requires_grad
    assert _rel_err(est, truth) < 0.002
    # The last power-iteration ratio oscillates with a complex pair: the case this fixes.
    assert _rel_err(_power_ratio(A.double()), truth) > RADIUS_RTOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_disc_spectrum_without_gap(dtype, gen):
    A = _batch(_disc, 256, gen, dtype)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(3, 256, dtype=dtype))
    assert _rel_err(est, _truth(A)) < 0.03


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [_triangular_non_normal, _jordan_like], ids=["triangular", "jordan_like"])
def test_non_normal_radius_one_half(make, dtype, gen):
    A = _batch(make, 64, gen, dtype)
    truth = _truth(A)
    torch.testing.assert_close(truth, torch.full((3,), 0.5, dtype=torch.float64), rtol=1e-2, atol=0)
    # Non-normal indeed: ||A||_2 > 1 although the radius is 0.5 (transient growth).
    assert (torch.linalg.matrix_norm(A.double(), 2) > 1.0).all()
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(3, 64, dtype=dtype))
    assert _rel_err(est, truth) < 0.01


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_jordan_block(dtype):
    # A defective eigenvalue of multiplicity m is determined to about eps^(1/m) only (by any
    # method): a 4x4 Jordan block still meets 5 % in float32.
    A = (0.5 * torch.eye(4) + torch.diag(torch.ones(3), 1)).expand(2, 4, 4).to(dtype)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(2, 4, dtype=dtype))
    assert _rel_err(est, torch.full((2,), 0.5, dtype=torch.float64)) < 0.025


@pytest.mark.parametrize("dtype", DTYPES)
def test_symmetric(dtype, gen):
    n = 128
    Q = _orthogonal(n, gen)
    eig = torch.linspace(-0.7, 0.6, n, dtype=torch.float64)  # dominant eigenvalue negative
    A = (Q @ torch.diag(eig) @ Q.T).expand(2, n, n).to(dtype)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(2, n, dtype=dtype))
    assert _rel_err(est, torch.full((2,), 0.7, dtype=torch.float64)) < 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_sample_its_own_radius(dtype, gen):
    scales = torch.tensor([0.2, 0.5, 0.9, 1.3], dtype=torch.float64)
    A = torch.stack([s * _complex_pair(96, gen) / 0.6 for s in scales]).to(dtype)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(4, 96, dtype=dtype))
    torch.testing.assert_close(_truth(A), scales, rtol=1e-4, atol=0)
    assert _rel_err(est, scales) < 0.002


def test_exact_when_the_state_fits_in_the_krylov_space(dtype, gen):
    A = torch.randn(3, 8, 8, generator=gen, dtype=dtype)
    est = torchfpi.spectral_radius(_linear(A), torch.zeros(3, 8, dtype=dtype), iters=8)
    assert _rel_err(est, _truth(A)) < 1e-10


def test_invariant_krylov_space_stops_early_and_is_exact(dtype):
    # J = 0.5 I: the first direction is already invariant (the rest is rounding, ignored).
    est = torchfpi.spectral_radius(lambda z: 0.5 * z, torch.ones(2, 300, dtype=dtype))
    torch.testing.assert_close(est, torch.full((2,), 0.5, dtype=dtype), rtol=1e-12, atol=0)


def test_never_above_the_spectral_norm(dtype, gen):
    A = _batch(_disc, 200, gen, dtype)
    for iters in (3, 10, 50):
        est = torchfpi.spectral_radius(_linear(A), torch.zeros(3, 200, dtype=dtype), iters=iters)
        assert (est <= torch.linalg.matrix_norm(A, 2) * (1 + 1e-10)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tanh_deq_at_its_fixed_point(dtype, gen):
    n = 128
    W = (1.2 * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)).to(dtype)
    x = torch.randn(3, n, generator=gen, dtype=dtype)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    sol = torchfpi.fixed_point(f, torch.zeros(3, n, dtype=dtype), x, solver="anderson", tol=1e-6, max_iter=500)
    assert sol.converged.all()
    z = sol.value.detach()
    jac = torch.autograd.functional.jacobian(lambda v: f(v, x), z, vectorize=True)  # (B, n, B, n)
    truth = torch.stack([torch.linalg.eigvals(jac[b, :, b].double()).abs().max() for b in range(3)])
    assert (truth > 0.3).all()
    est = torchfpi.spectral_radius(f, z, x)
    assert _rel_err(est, truth) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_docstring_numbers_at_state_size_1024(dtype, gen):
    A = _batch(_complex_pair, 1024, gen, dtype, batch=2)
    assert _rel_err(torchfpi.spectral_radius(_linear(A), torch.zeros(2, 1024, dtype=dtype)), _truth(A)) < 0.002
    A = _batch(_disc, 1024, gen, dtype, batch=2)
    assert _rel_err(torchfpi.spectral_radius(_linear(A), torch.zeros(2, 1024, dtype=dtype)), _truth(A)) < 0.03


def test_half_precision_keeps_its_dtype(gen):
    A = _batch(_complex_pair, 32, gen, torch.float64)
    for dtype in (torch.float16, torch.bfloat16):
        est = torchfpi.spectral_radius(_linear(A.to(dtype)), torch.zeros(3, 32, dtype=dtype))
        assert est.dtype == dtype
        assert _rel_err(est, _truth(A)) < RADIUS_RTOL


# --- behaviour -------------------------------------------------------------------------------


def test_one_call_of_f_and_same_seed_same_estimate(gen):
    A = _batch(_disc, 100, gen, torch.float64)
    calls = []

    def f(z):
        calls.append(1)
        return torch.einsum("bij,bj->bi", A, z)

    z = torch.zeros(3, 100, dtype=torch.float64)
    a = torchfpi.spectral_radius(f, z, iters=20, seed=3)
    assert len(calls) == 1
    assert torch.equal(a, torchfpi.spectral_radius(f, z, iters=20, seed=np.int64(3)))
    assert not torch.equal(a, torchfpi.spectral_radius(f, z, iters=20, seed=4))


class _CountVJP(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, z):
        return 0.5 * z

    @staticmethod
    def backward(ctx, g):
        _CountVJP.calls += 1
        return 0.5 * g


@pytest.mark.parametrize("n, iters, expected", [(100, 20, 20), (6, 20, 6), (100, 50, 50)])
def test_at_most_iters_vjps(n, iters, expected, gen):
    # 0.5 * z + (A z): the A part keeps the Krylov space from closing early.
    A = _batch(_disc, n, gen, torch.float64, batch=2)
    _CountVJP.calls = 0
    torchfpi.spectral_radius(lambda z: _CountVJP.apply(z) + torch.einsum("bij,bj->bi", A, z),
                             torch.zeros(2, n, dtype=torch.float64), iters=iters)
    assert _CountVJP.calls == expected
    _CountVJP.calls = 0
    torchfpi.spectral_radius(_CountVJP.apply, torch.zeros(2, n, dtype=torch.float64), iters=iters)
    assert _CountVJP.calls == 1  # 0.5 I: the Krylov space closes after one product


def test_zero_when_f_ignores_z_and_nan_for_a_non_finite_sample(dtype):
    x = torch.ones(3, 4, dtype=dtype)
    assert torch.equal(torchfpi.spectral_radius(lambda z, x: x * 2, torch.zeros(3, 4, dtype=dtype), x),
                       torch.zeros(3, dtype=dtype))
    x[1, 0] = math.nan
    est = torchfpi.spectral_radius(lambda z, x: 0.5 * z * x, torch.ones(3, 4, dtype=dtype), x)
    assert math.isnan(est[1]) and torch.allclose(est[[0, 2]], torch.full((2,), 0.5, dtype=dtype))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_works_without_grad(mode, dtype):
    W = torch.randn(5, 5, dtype=dtype)
    f = lambda z, x: torch.tanh(z @ W.T) * x  # noqa: E731  (x saved for backward)
    z, x = torch.randn(2, 5, dtype=dtype), torch.randn(2, 5, dtype=dtype)
    want = torchfpi.spectral_radius(f, z, x)
    with mode():
        z2, x2 = z.clone(), x.clone()  # inference tensors under inference_mode
        got = torchfpi.spectral_radius(f, z2, x2)
    torch.testing.assert_close(got, want)


def test_batch_zero_is_empty_without_calling_f():
    def f(z):
        raise AssertionError("f must not be called")

    est = torchfpi.spectral_radius(f, torch.zeros(0, 3))
    assert est.shape == (0,) and est.dtype == torch.float32


@pytest.mark.parametrize(
    "z, exc, match",
    [
        (torch.tensor(1.0), ValueError, r"z: expected a tensor of shape \(B, \*S\).*0-dim"),
        (torch.zeros(2, 0), ValueError, r"z: every sample has no entries \(shape \(2, 0\)\)"),
        ((), TypeError, r"z: expected .* non-empty tuple of them, got tuple"),
        ((torch.zeros(2, 3), torch.zeros(3, 3)), ValueError, r"z\[1\]: every part of z must share the batch size"),
        ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)), TypeError, r"z\[1\]: expected a real floating-point tensor \(all parts of one dtype\)"),
        ((torch.zeros(2, 3), torch.tensor(0.0)), ValueError, r"z\[1\]: expected a tensor of shape \(B, \*S\).*0-dim"),
        (torch.zeros(2, 3, dtype=torch.int64), TypeError, r"z: expected a real floating-point tensor \(all parts of one dtype\), got dtype torch.int64"),
        ([[0.0, 1.0]], TypeError, r"z: expected a torch.Tensor of shape \(B, \*S\) or a non-empty tuple of them, got list"),
    ],
)
def test_radius_bad_points(z, exc, match):
    with pytest.raises(exc, match=match):
        torchfpi.spectral_radius(lambda z: z, z)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"iters": 0}, ValueError, r"iters: expected an integer >= 1, got 0"),
        ({"iters": True}, TypeError, r"iters: expected an integer >= 1, got bool True"),
        ({"iters": 2.5}, TypeError, r"iters: expected an integer >= 1, got float 2.5"),
        ({"iters": math.nan}, TypeError, r"iters: expected an integer >= 1, got float nan"),
        ({"seed": "0"}, TypeError, r"seed: expected an integer, got str '0'"),
        ({"seed": False}, TypeError, r"seed: expected an integer, got bool"),
    ],
)
def test_radius_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        torchfpi.spectral_radius(lambda z: z, torch.zeros(2, 3), **kwargs)


def test_radius_accepts_numpy_integers_and_checks_f_output():
    est = torchfpi.spectral_radius(lambda z: 0.25 * z, torch.ones(2, 3), iters=np.int64(5))
    torch.testing.assert_close(est, torch.full((2,), 0.25))
    with pytest.raises(ValueError, match=r"f: expected f\(z, \*inputs\) to return z's shape \(2, 3\), got \(2, 4\)"):
        torchfpi.spectral_radius(lambda z: torch.zeros(2, 4), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"f: expected f\(z, \*inputs\) to return a tensor like z, got tuple"):
        torchfpi.spectral_radius(lambda z: (z,), torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"f: expected f\(z, \*inputs\) to return a tuple of 2 tensors like z, got Tensor"):
        torchfpi.spectral_radius(lambda z: z[0], (torch.ones(2, 3), torch.ones(2, 1)))
    with pytest.raises(TypeError, match=r"f: expected a callable f\(z, \*inputs\), got str"):
        torchfpi.spectral_radius("f", torch.ones(2, 3))


def test_tuple_state_is_the_jacobian_of_all_parts(dtype, gen):
    # z = (a, b) with a in R^(2x3), b in R^4: the map is linear with a block matrix M (10 x 10).
    M = _complex_pair(10, gen).to(dtype)

    def f(z, x):
        flat = torch.cat([z[0].flatten(1), z[1]], dim=1) @ M.T + x
        return flat[:, :6].reshape(-1, 2, 3), flat[:, 6:]

    z = (torch.zeros(3, 2, 3, dtype=dtype), torch.zeros(3, 4, dtype=dtype))
    est = torchfpi.spectral_radius(f, z, torch.ones(3, 10, dtype=dtype))
    want = torch.linalg.eigvals(M).abs().max().expand(3)
    torch.testing.assert_close(est, want, rtol=1e-10, atol=0)
    # A part f ignores contributes nothing (its VJP is None): J = [[M_a, 0], [0, 0]].
    est = torchfpi.spectral_radius(lambda z: (0.5 * z[0], torch.zeros_like(z[1])), z)
    torch.testing.assert_close(est, torch.full((3,), 0.5, dtype=dtype), rtol=1e-12, atol=0)


# --- check_gradients ---------------------------------------------------------------------------


def _tanh_map(z, x):
    return 0.5 * torch.tanh(z) + x


def test_check_gradients_tuple_state(dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)

    def f(z, x):
        return 0.5 * torch.tanh(z[0]) + x, 0.3 * z[1] + z[0].sum(1)

    rep = torchfpi.check_gradients(f, (torch.zeros(2, 3, dtype=dtype), torch.zeros(2, dtype=dtype)), x)
    assert rep.reference == "dense"  # 8 entries in all
    assert rep.ok, rep.table()
    assert rep.hints == ()


def test_check_gradients_reference_is_fpi_above_512_entries(dtype):
    x = torch.randn(1, 513, dtype=dtype, requires_grad=True)
    rep = torchfpi.check_gradients(_tanh_map, torch.zeros(1, 513, dtype=dtype), x, modes=("anderson",))
    assert rep.reference == "fpi" and rep.ok, rep.table()


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_check_gradients_works_without_grad_and_restores_inputs(mode, dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    before = x.detach().clone()
    with mode():
        rep = torchfpi.check_gradients(_tanh_map, torch.zeros(2, 3, dtype=dtype), x)
    assert rep.ok, rep.table()
    assert torch.equal(x.detach(), before)


def test_check_gradients_restores_inputs_when_f_raises(dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    before = x.detach().clone()

    def f(z, x):
        if not torch.equal(x.detach(), before):  # only during the finite difference
            raise RuntimeError("boom")
        return _tanh_map(z, x)

    with pytest.raises(RuntimeError, match="boom"):
        torchfpi.check_gradients(f, torch.zeros(2, 3, dtype=dtype), x, modes=("fpi",))
    assert torch.equal(x.detach(), before)


def test_check_gradients_float32_default_step_and_hint():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=gen, requires_grad=True)
    z0 = torch.zeros(2, 3)
    # The default step eps^(1/3) keeps the float32 finite difference meaningful...
    good = torchfpi.check_gradients(_tanh_map, z0, x, modes=("fpi",))
    assert good.finite_difference_error < 1e-3
    # ...a float64-sized step does not, and the failed report says why.
    bad = torchfpi.check_gradients(_tanh_map, z0, x, modes=("fpi",), fd_eps=1e-6)
    assert bad.finite_difference_error > 1e-2 and not bad.ok
    assert any("float64" in h and "rounding" in h for h in bad.hints)
    assert "hint: computed in a low precision" in bad.table()
    assert "hint" in repr(bad)
    # The default step is eps^(1/3) of float32.
    explicit = torchfpi.check_gradients(_tanh_map, z0, x, modes=("fpi",), fd_eps=torch.finfo(torch.float32).eps ** (1 / 3))
    assert explicit == good
    assert abs(torch.finfo(torch.float32).eps ** (1 / 3) - 4.9e-3) < 1e-4
    assert abs(torch.finfo(torch.float64).eps ** (1 / 3) - 6.1e-6) < 1e-7


def test_check_gradients_hint_when_the_solve_did_not_converge(dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    rep = torchfpi.check_gradients(lambda z, x: 0.9 * torch.tanh(z) + x, torch.zeros(2, 3, dtype=dtype), x,
                                   max_iter=3)
    assert not rep.ok
    assert any("max_iter=3" in h for h in rep.hints)
    assert not any("low precision" in h for h in rep.hints)


def test_check_gradients_accepts_numpy_numbers(dtype):
    x = torch.randn(2, 3, dtype=dtype, requires_grad=True)
    rep = torchfpi.check_gradients(_tanh_map, torch.zeros(2, 3, dtype=dtype), x, modes=("fpi",),
                                   max_iter=np.int64(500), tol=np.float64(1e-10), seed=np.int32(1))
    assert rep.ok, rep.table()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"fd_eps": 0}, ValueError, r"fd_eps: expected a positive number \(finite, > 0\), got 0"),
        ({"fd_eps": -1e-6}, ValueError, r"fd_eps: expected a positive number \(finite, > 0\)"),
        ({"fd_eps": math.nan}, ValueError, r"fd_eps: expected a positive number \(finite, > 0\), got nan"),
        ({"fd_eps": math.inf}, ValueError, r"fd_eps: expected a positive number \(finite, > 0\), got inf"),
        ({"fd_eps": "1e-6"}, TypeError, r"fd_eps: expected a positive number, got str"),
        ({"fd_eps": True}, TypeError, r"fd_eps: expected a positive number, got bool"),
        ({"tol": math.nan}, ValueError, r"tol: expected a positive number \(finite, > 0\)"),
        ({"tolerance": 0.0}, ValueError, r"tolerance: expected a positive number \(finite, > 0\)"),
        ({"max_iter": True}, TypeError, r"max_iter: expected an integer >= 1, got bool"),
        ({"max_iter": 0}, ValueError, r"max_iter: expected an integer >= 1, got 0"),
        ({"max_iter": 10.0}, TypeError, r"max_iter: expected an integer >= 1, got float"),
        ({"seed": 1.5}, TypeError, r"seed: expected an integer, got float"),
        ({"modes": "fpi"}, TypeError, r"modes: expected a tuple or list of backward mode names"),
        ({"modes": ()}, ValueError, r"modes: expected at least one backward mode name"),
        ({"modes": ("fpi", 3)}, TypeError, r"modes: expected mode names \(strings\), got \('fpi', 3\)"),
        ({"modes": ("bogus",)}, ValueError, r"backward: expected one of .* got 'bogus'"),
        ({"reference": 1}, TypeError, r"reference: expected a mode name or None, got int"),
    ],
)
def test_check_gradients_bad_options(kwargs, exc, match):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(exc, match=match):
        torchfpi.check_gradients(_tanh_map, torch.zeros(2, 3, dtype=torch.float64), x, **kwargs)


@pytest.mark.parametrize(
    "z0, exc, match",
    [
        (torch.tensor(0.0, dtype=torch.float64), ValueError, r"z0: expected a tensor of shape \(B, \*S\) .* got a 0-dim tensor"),
        (torch.zeros(0, 3, dtype=torch.float64), ValueError, r"z0: expected shape .* got \(0, 3\)"),
        ([0.0, 0.0], TypeError, r"z0: expected a torch.Tensor .* got list"),
        ((), TypeError, r"z0: expected .* non-empty tuple"),
        ((torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.int64)), TypeError,
         r"z0\[1\]: expected a real floating-point tensor .* got dtype torch.int64"),
    ],
)
def test_check_gradients_bad_states(z0, exc, match):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(exc, match=match):
        torchfpi.check_gradients(_tanh_map, z0, x)


def test_check_gradients_needs_a_callable_and_something_to_check():
    with pytest.raises(TypeError, match=r"f: expected a callable"):
        torchfpi.check_gradients("f", torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"inputs: check_gradients needs at least one input"):
        torchfpi.check_gradients(_tanh_map, torch.zeros(2, 3), torch.zeros(2, 3))
