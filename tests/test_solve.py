"""Forward solve: closed forms, per-sample stopping, compaction, tuples, memory, devices."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from problems import SOLVER_TOL, affine, contraction

import torchfpi
from torchfpi import Status


@pytest.mark.parametrize("solver", ["fpi", "anderson", torchfpi.FPI(damping=0.7)])
def test_affine_closed_form(solver, gen, dtype):
    prob = affine(6, 3, 0.8, gen, dtype)
    x = torch.randn(5, 3, generator=gen, dtype=dtype)
    sol = torchfpi.fixed_point(prob, torch.zeros(5, 6, dtype=dtype), x, solver=solver, tol=SOLVER_TOL, max_iter=1000)
    assert sol.converged.all()
    torch.testing.assert_close(sol.value, prob.solution(x), rtol=1e-9, atol=1e-9)
    assert sol.iterations.dtype == torch.int64 and sol.iterations.shape == (5,)
    assert (sol.residual < SOLVER_TOL).all()
    assert sol.trace.shape[1] == 5 and sol.trace.shape[0] == int(sol.iterations.max())


def test_iteration_count_is_calls_of_f(dtype):
    calls = []

    def f(z):
        calls.append(z.shape[0])
        return 0.5 * z + 1

    sol = torchfpi.fixed_point(f, torch.zeros(3, 2, dtype=dtype), tol=1e-8, max_iter=200, compact=True)
    assert int(sol.iterations.max()) == len(calls)


def test_per_sample_results_equal_single_solves(gen, dtype):
    # Samples with very different contraction rates: each batch result equals its solo solve.
    scales = torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=dtype).unsqueeze(1)
    b = torch.randn(4, 3, generator=gen, dtype=dtype)

    def f(z, s, b):
        return s * torch.tanh(z) + b

    for solver in ["fpi", "anderson"]:
        for compact in [False, True]:
            sol = torchfpi.fixed_point(
                f, torch.zeros(4, 3, dtype=dtype), scales, b, solver=solver, tol=1e-10, max_iter=5000, compact=compact
            )
            assert sol.converged.all()
            its = sol.iterations.tolist()
            assert its[0] < its[1] < its[3]
            for i in range(4):
                solo = torchfpi.fixed_point(
                    f, torch.zeros(1, 3, dtype=dtype), scales[i : i + 1], b[i : i + 1], solver=solver, tol=1e-10, max_iter=5000
                )
                assert torch.equal(solo.value, sol.value[i : i + 1])
                assert int(solo.iterations) == its[i]


def test_compaction_removes_converged_samples_from_f(dtype):
    seen = []
    scales = torch.tensor([0.1, 0.99], dtype=dtype).unsqueeze(1)

    def f(z, s):
        seen.append(z.shape[0])
        return s * z + 1

    torchfpi.fixed_point(f, torch.zeros(2, 2, dtype=dtype), scales, tol=1e-8, max_iter=5000, compact=True)
    assert seen[0] == 2 and seen[-1] == 1 and seen.count(2) < 20


def test_absolute_residual(dtype):
    sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1000.0, torch.zeros(1, 1, dtype=dtype), tol=1e-3, residual="absolute", max_iter=200)
    assert float(sol.residual) < 1e-3


def test_tuple_state(gen, dtype):
    x = torch.randn(3, 2, generator=gen, dtype=dtype, requires_grad=True)

    def f(state, x):
        a, b = state
        return (0.5 * b[:, :2] + x, 0.25 * a.sum(1, keepdim=True).expand(-1, 4))

    sol = torchfpi.fixed_point(f, (torch.zeros(3, 2, dtype=dtype), torch.zeros(3, 4, dtype=dtype)), x, tol=1e-12, max_iter=500)
    a, b = sol.value
    assert a.shape == (3, 2) and b.shape == (3, 4)
    torch.testing.assert_close(a, 0.5 * b[:, :2] + x)
    torch.autograd.gradcheck(
        lambda x: torchfpi.fixed_point(f, (torch.zeros(3, 2, dtype=dtype), torch.zeros(3, 4, dtype=dtype)), x, tol=1e-12, max_iter=500).value,
        (x,),
    )


def test_unbatched_state(dtype):
    sol = torchfpi.fixed_point(lambda z: 0.5 * z + 1, torch.zeros(3, dtype=dtype), batched=False, tol=1e-10)
    assert sol.value.shape == (3,)
    torch.testing.assert_close(sol.value, torch.full((3,), 2.0, dtype=dtype))
    assert sol.iterations.shape == (1,)


def test_no_graph_under_no_grad(gen, dtype):
    prob = affine(4, 2, 0.5, gen, dtype)
    x = torch.randn(2, 2, generator=gen, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        sol = torchfpi.fixed_point(prob, torch.zeros(2, 4, dtype=dtype), x)
    assert sol.value.grad_fn is None and not sol.value.requires_grad


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def test_graph_does_not_grow_with_iterations(dtype):
    lin = torch.nn.Linear(4, 4, dtype=dtype)
    x = torch.randn(2, 4, dtype=dtype)
    sizes = []
    for radius, max_iter in [(0.1, 30), (0.99, 3000)]:
        with torch.no_grad():
            lin.weight.copy_(radius * torch.eye(4, dtype=dtype))
        sol = torchfpi.fixed_point(lambda z, x: lin(z) + x, torch.zeros(2, 4, dtype=dtype), x, tol=1e-10, max_iter=max_iter)
        sizes.append((int(sol.iterations.max()), _graph_size(sol.value)))
    assert sizes[1][0] > 5 * sizes[0][0]
    assert sizes[0][1] == sizes[1][1]


def test_unroll_graph_grows_for_reference(dtype):
    x = torch.randn(2, 4, dtype=dtype, requires_grad=True)
    s1 = torchfpi.fixed_point(lambda z, x: 0.1 * z + x, torch.zeros(2, 4, dtype=dtype), x, backward="unroll", tol=1e-10)
    s2 = torchfpi.fixed_point(lambda z, x: 0.9 * z + x, torch.zeros(2, 4, dtype=dtype), x, backward="unroll", tol=1e-10, max_iter=1000)
    assert _graph_size(s2.value) > _graph_size(s1.value)


def test_memory_released_after_backward(dtype):
    # No reference cycle through the graph: reference counting alone frees the solution once
    # dropped. The cyclic collector is off meanwhile, so a cycle would keep it alive and fail.
    import weakref

    gc.collect()
    gc.disable()
    try:
        x = torch.randn(2, 4, dtype=dtype, requires_grad=True)
        sol = torchfpi.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(2, 4, dtype=dtype), x)
        ref = weakref.ref(sol.value)
        sol.value.sum().backward()
        del sol
        assert ref() is None
    finally:
        gc.enable()


def test_anderson_halves_iterations_on_slow_problem(gen, dtype):
    A = contraction(30, 0.98, gen, dtype, symmetric=True)
    b = torch.randn(8, 30, generator=gen, dtype=dtype)
    f = lambda z, b: z @ A.T + b  # noqa: E731
    plain = torchfpi.fixed_point(f, torch.zeros(8, 30, dtype=dtype), b, tol=1e-8, max_iter=3000)
    acc = torchfpi.fixed_point(f, torch.zeros(8, 30, dtype=dtype), b, solver="anderson", tol=1e-8, max_iter=3000)
    assert plain.converged.all() and acc.converged.all()
    assert acc.iterations.max() * 2 <= plain.iterations.min()
    exact = torch.linalg.solve(torch.eye(30, dtype=dtype) - A, b.T).T
    torch.testing.assert_close(acc.value, exact, rtol=1e-5, atol=1e-5)


def test_anderson_nonlinear_and_float32(gen):
    W = contraction(16, 0.95, gen, torch.float32)
    x = torch.randn(4, 16, generator=gen)
    f = lambda z, x: torch.tanh(z @ W.T + x)  # noqa: E731
    plain = torchfpi.fixed_point(f, torch.zeros(4, 16), x, tol=1e-5, max_iter=1000)
    acc = torchfpi.fixed_point(f, torch.zeros(4, 16), x, solver="anderson", tol=1e-5, max_iter=1000)
    assert acc.converged.all() and acc.value.dtype == torch.float32
    assert acc.iterations.max() <= plain.iterations.max()


def test_anderson_safeguard_on_ill_conditioned_problem(dtype):
    # A rotation-like map where the least-squares system degenerates: the safeguard keeps it finite.
    theta = torch.tensor(0.3, dtype=dtype)
    R = 0.9 * torch.stack([torch.stack([theta.cos(), -theta.sin()]), torch.stack([theta.sin(), theta.cos()])])
    sol = torchfpi.fixed_point(lambda z: z @ R.T + 1, torch.zeros(3, 2, dtype=dtype),
                               solver=torchfpi.Anderson(m=8, regularization=0.0), tol=1e-10, max_iter=500)
    assert sol.converged.all() and torch.isfinite(sol.value).all()


def test_status_codes_and_best_iterate(dtype):
    with pytest.warns(torchfpi.ConvergenceWarning):
        sol = torchfpi.fixed_point(lambda z: 0.999 * z + 1, torch.zeros(2, 1, dtype=dtype), max_iter=5)
    assert (sol.status == Status.MAX_ITER).all() and not sol.converged.any()
    assert (sol.iterations == 5).all()


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 6),
    b=st.integers(1, 4),
    radius=st.floats(0.05, 0.9),
    seed=st.integers(0, 10_000),
    solver=st.sampled_from(["fpi", "anderson"]),
)
def test_property_random_contractions(n, b, radius, seed, solver):
    gen = torch.Generator().manual_seed(seed)
    prob = affine(n, 2, radius, gen)
    x = torch.randn(b, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    sol = torchfpi.fixed_point(prob, torch.zeros(b, n, dtype=torch.float64), x, solver=solver, tol=1e-11, max_iter=2000)
    assert sol.converged.all()
    torch.testing.assert_close(sol.value, prob.solution(x.detach()), rtol=1e-8, atol=1e-8)
    w = torch.randn(b, n, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((sol.value * w).sum(), x)
    torch.testing.assert_close(g, prob.grad_x(w), rtol=1e-7, atol=1e-8)


@pytest.mark.gpu
def test_cuda_matches_cpu(gen):
    prob = affine(8, 3, 0.7, gen, torch.float32)
    x = torch.randn(4, 3, generator=gen)
    cpu = torchfpi.fixed_point(prob, torch.zeros(4, 8), x, tol=1e-6)
    dev = torchfpi.fixed_point(
        lambda z, x: z @ prob.A.cuda().T + x @ prob.U.cuda().T, torch.zeros(4, 8, device="cuda"), x.cuda(), tol=1e-6
    )
    assert dev.value.device.type == "cuda"
    torch.testing.assert_close(dev.value.cpu(), cpu.value, rtol=1e-4, atol=1e-5)


def test_bookkeeping_backends_agree(host_backend, dtype):
    scales = torch.tensor([0.1, 0.9, 3.0], dtype=dtype).unsqueeze(1)
    for compact in (False, True):
        with pytest.warns(torchfpi.ConvergenceWarning, match="1 of 3 samples diverged"):
            sol = torchfpi.fixed_point(lambda z, s: s * z + 1, torch.zeros(3, 2, dtype=dtype), scales,
                                       tol=1e-10, max_iter=400, compact=compact)
        assert sol.status.tolist() == [Status.CONVERGED, Status.CONVERGED, Status.DIVERGED]
        torch.testing.assert_close(sol.value[:2], (1 / (1 - scales[:2])).expand(2, 2))
        assert sol.trace.dtype == dtype and torch.isnan(sol.trace[-1, 0])
    with pytest.raises(torchfpi.FixedPointError, match="iteration 2"):
        torchfpi.fixed_point(lambda z: torch.log(z - 0.5), torch.ones(2, 2, dtype=dtype))


def test_compact_backward_matches_full_backward(dtype):
    # Mixed contraction rates: the adjoint solve compacts too, with the same gradients.
    scales = torch.tensor([0.1, 0.3, 0.6, 0.95, 0.99, 0.2], dtype=dtype).unsqueeze(1)
    x = torch.randn(6, 3, dtype=dtype, requires_grad=True)
    W = torch.randn(3, 3, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 3, dtype=dtype)
    grads, evals = [], []
    for compact in (False, True):
        seen = []

        def f(z, x, s, seen=seen):
            seen.append(z.shape[0])
            return s * torch.tanh(z @ W.T * 0.3) + x

        sol = torchfpi.fixed_point(f, torch.zeros(6, 3, dtype=dtype), x, scales, tol=1e-12, max_iter=5000, compact=compact)
        grads.append(torch.autograd.grad((sol.value * w).sum(), [x, W]))
        evals.append(sum(seen))
        assert sol.backward.converged.all()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert evals[1] < 0.6 * evals[0]


def test_anderson_halves_iterations_on_ill_conditioned_gradient_descent(gen, dtype):
    # FPI_GD on an ill-conditioned quadratic: the GD map's spectrum is real in [0, 1 - a mu],
    # the slowly contracting case Anderson is made for.
    from problems import spd

    A = spd(40, gen, dtype, cond=100.0)
    b = torch.randn(6, 40, generator=gen, dtype=dtype)
    a = 1.0 / 100.0

    def f(z, b):
        return z - a * (z @ A - b)

    plain = torchfpi.fixed_point(f, torch.zeros(6, 40, dtype=dtype), b, tol=1e-6, max_iter=5000)
    acc = torchfpi.fixed_point(f, torch.zeros(6, 40, dtype=dtype), b, solver="anderson", tol=1e-6, max_iter=5000)
    assert plain.converged.all() and acc.converged.all()
    assert acc.iterations.max() * 2 <= plain.iterations.min()


def test_trace_is_nan_after_each_samples_stop(dtype):
    # The loop stores raw residuals and masks each sample's rows after its stop at the end:
    # the trace must equal a solo run's residuals up to the stop and NaN after, with or without
    # compaction, for converged, diverged and unfinished samples alike.
    scales = torch.tensor([0.2, 0.7, 3.0, 0.999], dtype=dtype).unsqueeze(1)

    def f(z, s):
        return s * z + 1

    traces = []
    for compact in (False, True):
        with pytest.warns(torchfpi.ConvergenceWarning):
            sol = torchfpi.fixed_point(f, torch.zeros(4, 2, dtype=dtype), scales, tol=1e-9, max_iter=60, compact=compact)
        assert sol.status.tolist() == [Status.CONVERGED, Status.CONVERGED, Status.DIVERGED, Status.MAX_ITER]
        its = sol.iterations.tolist()
        assert its[3] == 60 and sol.trace.shape == (60, 4)
        for i, k in enumerate(its):
            with pytest.warns(torchfpi.ConvergenceWarning) if i >= 2 else contextlib.nullcontext():
                solo = torchfpi.fixed_point(f, torch.zeros(1, 2, dtype=dtype), scales[i : i + 1], tol=1e-9, max_iter=60)
            torch.testing.assert_close(sol.trace[:k, i], solo.trace[:k, 0], rtol=0, atol=0)
            assert torch.isnan(sol.trace[k:, i]).all()
            assert torch.equal(sol.value[i], solo.value[0])
        traces.append(sol.trace)
    torch.testing.assert_close(traces[0], traces[1], rtol=0, atol=0, equal_nan=True)


# -- compact slices only the declared per-sample inputs -------------------------------------------


def test_compact_fpinn_with_batch_equal_to_hidden_matches_per_sample_solves():
    # The repro: B = 16 = hidden, and one sample slower than the others, so the working
    # batch drops to one: weights passed as inputs used to be sliced (and broadcasting hid it).
    torch.manual_seed(0)
    upd = torchfpi.MLPUpdate(4, 3, hidden=16).eval()
    x = torch.randn(16, 3)
    x[1:] = x[0]
    x[5] = 3 * torch.randn(3)
    with torch.no_grad():
        z = torchfpi.FPINN(upd, tol=1e-6, compact=True)(x)
        single = torch.cat([torchfpi.FPINN(upd, tol=1e-6)(x[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(z, single, rtol=0, atol=1e-5)


@pytest.mark.parametrize("batch", [3, 4])  # 4 == W.shape[0]: shape alone cannot tell W apart
def test_compact_shared_input_is_never_sliced(batch, gen, dtype):
    W = 0.5 * contraction(4, 0.9, gen, dtype)
    x = torch.randn(batch, 4, generator=gen, dtype=dtype, requires_grad=True)
    scale = torch.linspace(0.1, 0.9, batch, dtype=dtype).unsqueeze(1)  # samples stop at different times

    def f(z, W, x, s):
        return s * torch.tanh(z @ W.T) + x

    z0 = torch.zeros(batch, 4, dtype=dtype)
    full = torchfpi.fixed_point(f, z0, W, x, scale, tol=1e-12, max_iter=500)
    comp = torchfpi.fixed_point(f, z0, W, x, scale, tol=1e-12, max_iter=500, compact=True, per_sample=(1, 2))
    assert len(set(comp.iterations.tolist())) > 1
    torch.testing.assert_close(comp.value, full.value, rtol=0, atol=1e-10)
    g1 = torch.autograd.grad(full.value.sum(), x)[0]
    g2 = torch.autograd.grad(comp.value.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-9)


def test_compact_declared_input_without_the_batch_is_a_clear_error(dtype):
    W = torch.eye(3, dtype=dtype)  # an input is per-sample unless per_sample says otherwise
    with pytest.raises(ValueError, match=r"inputs\[0\].*shape \(3, 3\).*batch is 2.*per_sample"):
        torchfpi.fixed_point(lambda z, W: 0.5 * z @ W, torch.zeros(2, 3, dtype=dtype), W, compact=True)
    with pytest.raises(ValueError, match="per_sample: input 3"):
        torchfpi.fixed_point(lambda z, W: 0.5 * z @ W, torch.zeros(2, 3, dtype=dtype), W, per_sample=(3,))
    with pytest.raises(TypeError, match="per_sample"):
        torchfpi.fixed_point(lambda z: 0.5 * z, torch.zeros(2, 3, dtype=dtype), per_sample=1)


def test_compact_fpigd_parameters_are_not_sliced(dtype):
    # The energy's parameter has dim 0 == B: a parameter is never an input, never sliced.
    from torchfpi.energies import QuadraticEnergy

    energy = QuadraticEnergy(3, A=torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=dtype))).to(dtype)
    b = torch.randn(3, 3, dtype=dtype)
    b[0] = 0.01 * b[0]
    kw = dict(step_size=0.3, init=lambda b: torch.zeros_like(b), tol=1e-12, max_iter=400)
    full = torchfpi.FPIGD(energy, **kw)(b)
    comp = torchfpi.FPIGD(energy, compact=True, **kw)(b)
    torch.testing.assert_close(comp, full, rtol=0, atol=1e-10)


class _HalfStep:
    """A user solver written against the protocol only: z <- (z + f(z)) / 2, no state."""

    def init(self, z, fz):
        return {}

    def step(self, state, z, fz, residual):
        return torch.lerp(z, fz, 0.5)


def test_user_solver_object_forward_and_adjoint(gen, dtype):
    # Adding a solver: one class with init/step; it serves the forward and the adjoint solve.
    prob = affine(5, 3, 0.7, gen, dtype)
    x = torch.randn(3, 3, generator=gen, dtype=dtype, requires_grad=True)
    z0 = torch.zeros(3, 5, dtype=dtype)
    assert isinstance(_HalfStep(), torchfpi.Solver)
    ref = torchfpi.fixed_point(prob, z0, x, solver=torchfpi.FPI(damping=0.5), backward=torchfpi.FPIBackward(damping=0.5))
    sol = torchfpi.fixed_point(prob, z0, x, solver=_HalfStep(), backward=torchfpi.ImplicitAdjoint(_HalfStep()))
    assert torch.equal(sol.value, ref.value) and torch.equal(sol.iterations, ref.iterations)
    g_ref = torch.autograd.grad(ref.value.sum(), x)[0]
    g = torch.autograd.grad(sol.value.sum(), x)[0]
    assert torch.equal(g, g_ref) and torch.equal(sol.backward.iterations, ref.backward.iterations)
