"""The loop's convergence test, best iterates, windows and host reads (issue: no silent wrong answer)."""

from __future__ import annotations

import math

import pytest
import torch

import torchfpi
from torchfpi import Status, _book, _host, _loop


def test_diverging_sample_returns_its_best_iterate_by_absolute_residual():
    x = torch.randn(4, 3)
    sol = torchfpi.fixed_point(lambda z, x: 2 * z + x, torch.zeros(4, 3), x, on_failure="ignore")
    assert sol.status.tolist() == [Status.DIVERGED] * 4
    # The smallest ||f(z) - z|| is at z0 = 0: its image x (the blow-up reaches ~1e6).
    torch.testing.assert_close(sol.value, x)


@pytest.mark.parametrize("z0, tol, dtype", [(0.0, 1e-3, torch.float32), (1e7, 1e-6, torch.float32), (1e7, 1e-6, torch.float64)])
def test_a_drifting_map_never_converges(z0, tol, dtype):
    sol = torchfpi.fixed_point(lambda z: z + 1, torch.full((2, 3), z0, dtype=dtype), tol=tol, max_iter=3000,
                               on_failure="ignore")
    assert sol.status.tolist() == [Status.MAX_ITER] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fixed_points_at_tiny_and_zero_scales(dtype):
    tiny = torchfpi.fixed_point(lambda z: 0.5 * z + 1e-30, torch.zeros(2, 3, dtype=dtype), tol=1e-6)
    assert bool(tiny.converged.all()) and int(tiny.iterations.min()) > 1
    assert float((tiny.value / 2e-30 - 1).abs().max()) < 1e-5  # relative to itself, not to 1e-9
    zero = torchfpi.fixed_point(lambda z: 0.5 * z, torch.ones(2, 3, dtype=dtype), tol=1e-6)
    assert bool(zero.converged.all()) and float(zero.value.abs().max()) < 1e-8
    exact = torchfpi.fixed_point(lambda z: 0 * z + 2, torch.full((2, 3), 2.0, dtype=dtype), tol=1e-6)
    assert exact.iterations.tolist() == [1, 1]  # f(z0) == z0 exactly: converged at once


def test_relative_residual_documented_formula():
    fz = torch.tensor([[3.0, 4.0], [1e-30, 0.0]], dtype=torch.float64)
    z = torch.tensor([[3.0, 3.0], [0.0, 0.0]], dtype=torch.float64)
    r = torchfpi.relative_residual(fz, z)
    torch.testing.assert_close(r, torch.tensor([0.2, 1.0], dtype=torch.float64))
    r = torchfpi.relative_residual(fz, z, scale=torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert math.isclose(float(r[1]), 1e-30 / 1e-9)


def _solve(**kw):
    gen = torch.Generator().manual_seed(3)
    rates = torch.rand(16, 1, generator=gen, dtype=torch.float64) * 0.95
    c = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    return torchfpi.fixed_point(lambda z, r, c: r * torch.tanh(z) + c, torch.zeros(16, 5, dtype=torch.float64),
                                rates, c, tol=1e-9, max_iter=400, **kw)


@pytest.mark.parametrize("solver", ["fpi", "anderson", "broyden"])
@pytest.mark.parametrize("compact", [False, True])
def test_results_do_not_depend_on_the_window(monkeypatch, solver, compact):
    ref = _solve(solver=solver, compact=compact)
    monkeypatch.setattr(_book, "MAX_WINDOW", 1)  # a host read at every iteration
    one = _solve(solver=solver, compact=compact)
    assert torch.equal(ref.value, one.value)
    assert torch.equal(ref.iterations, one.iterations) and torch.equal(ref.status, one.status)
    torch.testing.assert_close(ref.trace, one.trace, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("solver", ["fpi", "anderson", "broyden"])
@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("residual", ["relative", "absolute"])
def test_norms_taken_per_window_equal_norms_per_iteration(monkeypatch, solver, compact, residual):
    # Small states take the window's norms in one stacked call at the host read (DEFER_ELEMENTS);
    # the results, traces and gradients are bit for bit those of norms taken every iteration.
    def run():
        gen = torch.Generator().manual_seed(3)
        rates = torch.rand(16, 1, generator=gen, dtype=torch.float32) * 0.95
        c = torch.randn(16, 5, generator=gen, dtype=torch.float32).requires_grad_(True)
        sol = torchfpi.fixed_point(lambda z, r, c: r * torch.tanh(z) + c, torch.zeros(16, 5), rates, c,
                                   solver=solver, compact=compact, residual=residual, tol=1e-6, max_iter=400)
        g = torch.autograd.grad((sol.value * torch.arange(5.0)).sum(), c)[0]
        return sol, g

    assert 16 * 5 <= _book.DEFER_ELEMENTS
    ref, gref = run()
    monkeypatch.setattr(_book, "DEFER_ELEMENTS", 0)  # norms every iteration
    one, gone = run()
    assert torch.equal(ref.value, one.value) and torch.equal(gref, gone)
    assert torch.equal(ref.iterations, one.iterations) and torch.equal(ref.status, one.status)
    torch.testing.assert_close(ref.trace, one.trace, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(ref.backward.trace, one.backward.trace, rtol=0, atol=0, equal_nan=True)


def test_samples_do_not_depend_on_the_batch():
    full = _solve()
    gen = torch.Generator().manual_seed(3)
    rates = torch.rand(16, 1, generator=gen, dtype=torch.float64) * 0.95
    c = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    for i in (0, 7):
        alone = torchfpi.fixed_point(lambda z, r, c: r * torch.tanh(z) + c, torch.zeros(1, 5, dtype=torch.float64),
                                     rates[i : i + 1], c[i : i + 1], tol=1e-9, max_iter=400)
        assert torch.equal(alone.value[0], full.value[i]) and int(alone.iterations[0]) == int(full.iterations[i])


def _count_host_reads(monkeypatch) -> list:
    """The shapes of every tensor the loop reads on the host, in order (a list filled as it runs)."""
    calls: list = []
    real = _host._HOST.host

    def counted(t):
        calls.append(t.shape)
        return real(t)

    monkeypatch.setattr(_host._HOST, "host", counted)
    return calls


@pytest.mark.parametrize("solver", ["fpi", "anderson"])
def test_host_reads_once_per_window(monkeypatch, solver):
    calls = _count_host_reads(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    A = 0.97 * torch.linalg.qr(torch.randn(8, 8, generator=gen))[0]  # orthogonal x 0.97: ~450 iterations
    sol = torchfpi.fixed_point(lambda z: z @ A.T + 1, torch.zeros(4, 8), solver=solver, tol=1e-6, max_iter=1000)
    k = int(sol.iterations.max())
    assert bool(sol.converged.all()) and k > 30
    # One device-to-host read per window (windows of up to MAX_WINDOW iterations).
    assert len(calls) <= k / 8 + 2, (len(calls), k)


def test_compiled_map_forward_backward_and_a_clear_double_backward_error():
    # torch.compile'd f (cheap backend): same forward and gradients as eager; the loop itself
    # stays eager, so torchfpi adds no graph break inside f. PyTorch's AOT autograd has no
    # double backward: it fails with one clear line.
    torch.manual_seed(0)
    W = 0.25 * torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    compiled = torch.compile(f, backend="aot_eager")
    sols = [torchfpi.fixed_point(g, torch.zeros(3, 4, dtype=torch.float64), x, tol=1e-12, max_iter=200) for g in (compiled, f)]
    assert torch.equal(sols[0].value, sols[1].value)
    grads = [torch.autograd.grad((s.value ** 2).sum(), x, create_graph=True)[0] for s in sols]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grads[0].sum(), x)


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_map_with_a_float32_state(low):
    # Mixed precision without an option: f computes in bf16/fp16, the state, residuals and the
    # adjoint (VJPs cast back through f) stay float32. Gradient error against float64: the
    # low-precision map's own rounding (bf16 eps 7.8e-3, fp16 9.8e-4), not the solve.
    gen = torch.Generator().manual_seed(0)
    W = 0.5 * torch.linalg.qr(torch.randn(16, 16, generator=gen, dtype=torch.float64))[0]
    x64 = torch.randn(8, 16, generator=gen, dtype=torch.float64)
    w = torch.randn(8, 16, generator=gen, dtype=torch.float64)

    # The map's rounding bounds the reachable residual: tol sits above it.
    tol = {torch.bfloat16: 3e-2, torch.float16: 4e-3}[low]

    def grad(dtype, cast):
        Wd = W.to(dtype).clone().requires_grad_(True)

        def f(z, x):
            if cast is None:
                return torch.tanh(z @ Wd.T + x)
            return torch.tanh(z.to(cast) @ Wd.to(cast).T + x.to(cast)).to(dtype)

        sol = torchfpi.fixed_point(f, torch.zeros(8, 16, dtype=dtype), x64.to(dtype),
                                   tol=1e-12 if cast is None else tol, max_iter=200)
        assert sol.value.dtype == dtype and bool(sol.converged.all())
        return torch.autograd.grad((sol.value * w.to(dtype)).sum(), Wd)[0].double()

    ref = grad(torch.float64, None)
    err = float((grad(torch.float32, low) - ref).norm() / ref.norm())
    assert err < 5 * tol, err


@pytest.mark.parametrize("solver", ["fpi", "anderson"])
def test_batch_stop_returns_every_sample_at_the_slowest_ones_iteration(solver):
    per = _solve(solver=solver)
    batch = _solve(solver=solver, stop="batch")
    k = int(per.iterations.max())
    assert batch.iterations.tolist() == [k] * 16 and bool(batch.converged.all())
    slowest = per.iterations == k
    torch.testing.assert_close(batch.value[slowest], per.value[slowest], rtol=0, atol=0)
    torch.testing.assert_close(batch.value, per.value, rtol=1e-7, atol=1e-9)  # both within tol of z*


def test_batch_stop_gradients_and_option_checks():
    gen = torch.Generator().manual_seed(3)
    rates = torch.rand(16, 1, generator=gen, dtype=torch.float64) * 0.95
    c = torch.randn(16, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    grads = []
    for stop in ("sample", "batch"):
        sol = torchfpi.fixed_point(lambda z, r, c: r * torch.tanh(z) + c, torch.zeros(16, 5, dtype=torch.float64),
                                   rates, c, tol=1e-11, max_iter=800, stop=stop)
        grads.append(torch.autograd.grad(sol.value.pow(2).sum(), c)[0])
        if stop == "batch":
            assert len(set(sol.backward.iterations.tolist())) == 1
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-8, atol=1e-10)
    with pytest.raises(ValueError, match="stop: expected one of"):
        torchfpi.Options(stop="row")
    with pytest.raises(ValueError, match="stop='batch'.*compact=False"):
        torchfpi.Options(stop="batch", compact=True)


def test_a_repeated_solve_reads_the_host_once_per_direction(monkeypatch):
    # The first window of a solve runs to where the previous solve of the same map stopped.
    calls = _count_host_reads(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    W = 0.2 * torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64, requires_grad=True)

    def f(z, x):
        return torch.tanh(z @ W.T + x)

    sols = []
    for _ in range(3):
        calls.clear()
        sol = torchfpi.fixed_point(f, torch.zeros(4, 8, dtype=torch.float64), x, tol=1e-8, max_iter=200)
        assert int(sol.iterations.max()) <= _book.MAX_WINDOW  # one window can hold the solve
        torch.autograd.grad(sol.value.sum(), x)
        sols.append((sol, len(calls)))
    assert sols[0][1] >= 3 and sols[1][1] == 2 and sols[2][1] == 2, [n for _, n in sols]
    for sol, _ in sols[1:]:  # the window changes when the host is read, never the results
        assert torch.equal(sol.value, sols[0][0].value)
        torch.testing.assert_close(sol.trace, sols[0][0].trace, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(sol.backward.trace, sols[0][0].backward.trace, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("damping", [1.0, 0.8])
def test_dropped_window_images_are_replayed_exactly(monkeypatch, damping):
    # A large state keeps only the newest images of a window (KEEP_IMAGES); a sample that
    # stopped earlier in the window gets its image by re-running the window: the same values
    # as a host read at every iteration (where every image is kept).
    gen = torch.Generator().manual_seed(5)
    rates = torch.linspace(0.05, 0.9, 16, dtype=torch.float64)[:, None]
    c = torch.randn(16, 400, generator=gen, dtype=torch.float64)  # 6400 entries: norms every iteration
    calls = []

    def f(z, r, c):
        calls.append(1)
        return r * torch.tanh(z) + c

    def solve():
        calls.clear()
        return torchfpi.fixed_point(f, torch.zeros(16, 400, dtype=torch.float64), rates, c,
                                    solver=torchfpi.FPI(damping=damping), tol=1e-10, max_iter=400)

    assert 16 * 400 > _book.DEFER_ELEMENTS
    monkeypatch.setattr(_loop, "HISTORY_SIZE", 0)  # windows planned from the contraction rate only
    ref = solve()
    replayed = len(calls) > int(ref.iterations.max()) + 1
    monkeypatch.setattr(_book, "MAX_WINDOW", 1)
    one = solve()
    assert replayed  # this batch does need images the window dropped
    assert torch.equal(ref.value, one.value) and torch.equal(ref.iterations, one.iterations)
    torch.testing.assert_close(ref.trace, one.trace, rtol=0, atol=0, equal_nan=True)


def test_best_images_of_a_stalled_solve_are_exact_and_memory_stays_bounded(monkeypatch):
    # A solve that never meets tol returns each sample's best image by absolute residual; when
    # that image is in the middle of a window it is replayed. The results equal a host read at
    # every iteration, and the replay holds a bounded number of states, not one per window
    # iteration: at most this many of f's outputs are alive at any call.
    import weakref

    gen = torch.Generator().manual_seed(7)
    c = torch.randn(16, 400, generator=gen, dtype=torch.float64)
    amp = torch.linspace(0.6, 1.4, 16, dtype=torch.float64)[:, None]
    outputs: list = []
    alive: list = []

    def f(z, c, amp):
        alive.append(sum(o() is not None for o in outputs))
        out = c + amp * torch.sin(3.0 * z)  # no fixed point reached: the residual wanders
        outputs.append(weakref.ref(out))
        return out

    def solve():
        outputs.clear()
        alive.clear()
        return torchfpi.fixed_point(f, torch.zeros(16, 400, dtype=torch.float64), c, amp, tol=1e-12,
                                    max_iter=80, on_failure="ignore")

    monkeypatch.setattr(_loop, "HISTORY_SIZE", 0)
    ref = solve()
    assert not bool(ref.converged.any())
    assert len(outputs) > 80 + 1  # best images inside windows were replayed
    assert max(alive) <= _book.KEEP_IMAGES + 2, max(alive)  # was up to 8 (a whole window replayed)
    monkeypatch.setattr(_book, "MAX_WINDOW", 1)
    one = solve()
    assert torch.equal(ref.value, one.value) and torch.equal(ref.iterations, one.iterations)
    assert torch.equal(ref.status, one.status)
    torch.testing.assert_close(ref.trace, one.trace, rtol=0, atol=0, equal_nan=True)


def test_last_window_gather_of_a_small_state_equals_per_iteration_reads(host_backend, monkeypatch):
    # A repeated solve of a small state runs in one window (history) and its samples converge
    # at different iterations of it: their rows are gathered from the window's stacked images.
    # The result is the per-sample image a host read at every iteration gives, with the numpy
    # and the torch-only host backends.
    rates = torch.linspace(0.1, 0.25, 8, dtype=torch.float64)[:, None]
    c = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def solve():
        return torchfpi.fixed_point(lambda z, r, c: r * torch.tanh(z) + c, torch.zeros(8, 6, dtype=torch.float64),
                                    rates, c, tol=1e-10, max_iter=200)

    gathers = []
    monkeypatch.setattr(_book, "_gather_rows", lambda *a: gathers.append(1) or _host._gather_rows(*a))
    solve()
    reads_before = len(gathers)
    twice = solve()  # planned from the first: one window
    assert len(torch.unique(twice.iterations)) > 1  # rows come from different images
    assert len(gathers) == reads_before  # the stacked window served the gather
    monkeypatch.setattr(_book, "MAX_WINDOW", 1)
    one = solve()
    assert torch.equal(twice.value, one.value) and torch.equal(twice.iterations, one.iterations)
    torch.testing.assert_close(twice.trace, one.trace, rtol=0, atol=0, equal_nan=True)
