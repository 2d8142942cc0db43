"""cuda_graph=True: option checks and the loop around a replayed block (CPU), capture on CUDA.

The CPU tests replace the captured graph by an eager replay of the same block body, so the
loop that reads a window per replay is checked here against the ordinary loop; the capture
itself needs a GPU (those tests skip without one).
"""

from __future__ import annotations

import pytest
import torch

import torchfpi
from torchfpi import _graph, _loop, _problem

CUDA = torch.cuda.is_available()
NEEDS_CUDA = pytest.mark.skipif(not CUDA, reason="needs a CUDA device: CUDA graphs capture GPU kernels")


def _problem_data(device="cpu", dtype=torch.float64, b=16, d=5):
    gen = torch.Generator().manual_seed(3)
    rates = (torch.rand(b, 1, generator=gen, dtype=dtype) * 0.95).to(device)
    c = torch.randn(b, d, generator=gen, dtype=dtype).to(device)
    return rates, c, torch.zeros(b, d, dtype=dtype, device=device)


def f(z, r, c):
    return r * torch.tanh(z) + c


class EagerBlock(_graph.GraphBlock):
    """The block body run eagerly at each replay (what the CUDA graph replays on a GPU)."""

    def __init__(self, call, z0, damping, relative):
        self._buffers(z0, damping, relative, _graph.GRAPH_BLOCK)
        body = self._body
        self.graph = type("Replay", (), {"replay": staticmethod(lambda: body(call))})()


def test_options_are_checked():
    with pytest.raises(TypeError, match="cuda_graph: expected a bool"):
        torchfpi.Options(cuda_graph=1)
    with pytest.raises(ValueError, match="cuda_graph=True captures plain or damped FPI only"):
        torchfpi.Options(cuda_graph=True, solver="anderson")
    with pytest.raises(ValueError, match="cuda_graph=True needs compact=False"):
        torchfpi.Options(cuda_graph=True, compact=True)
    with pytest.raises(ValueError, match="backward='unroll'"):
        torchfpi.Options(cuda_graph=True, backward="unroll")
    assert torchfpi.Options(cuda_graph=True, solver=torchfpi.FPI(damping=0.5)).cuda_graph


def test_a_cpu_state_is_refused_clearly():
    r, c, z0 = _problem_data()
    with pytest.raises(ValueError, match=r"cuda_graph=True needs the state on a CUDA device, got z0 on cpu"):
        torchfpi.fixed_point(f, z0, r, c, cuda_graph=True)


@pytest.mark.parametrize("damping", [1.0, 0.7])
@pytest.mark.parametrize("residual", ["relative", "absolute"])
@pytest.mark.parametrize("max_iter", [400, 13])
def test_the_block_loop_gives_the_eager_loop_results(damping, residual, max_iter):
    r, c, z0 = _problem_data()
    solver = torchfpi.FPI(damping=damping)
    ref = torchfpi.fixed_point(f, z0, r, c, solver=solver, residual=residual, tol=1e-9, max_iter=max_iter,
                               on_failure="ignore")
    block = EagerBlock(lambda z: f(z, r, c), z0, damping, residual == "relative")
    z, stats = _loop.iterate_graph(block, z0, tol=1e-9, max_iter=max_iter, absolute=residual == "absolute")
    assert torch.equal(z, ref.value)
    assert torch.equal(stats.iterations, ref.iterations) and torch.equal(stats.status, ref.status)
    torch.testing.assert_close(stats.trace, ref.trace, rtol=0, atol=0, equal_nan=True)


def test_a_diverging_sample_in_the_block_loop():
    x = torch.randn(4, 3, dtype=torch.float64)
    rate = torch.tensor([[0.5], [2.0], [0.5], [0.5]], dtype=torch.float64)

    def g(z):
        return rate * z + x

    ref = torchfpi.fixed_point(g, torch.zeros(4, 3, dtype=torch.float64), on_failure="ignore", max_iter=200)
    block = EagerBlock(g, torch.zeros(4, 3, dtype=torch.float64), 1.0, True)
    z, stats = _loop.iterate_graph(block, torch.zeros(4, 3, dtype=torch.float64), tol=1e-6, max_iter=200)
    assert stats.status.tolist() == ref.status.tolist()
    assert torch.equal(z, ref.value)


def test_a_map_that_cannot_be_captured_warns_and_solves_eagerly(monkeypatch):
    class Refused(_graph.GraphBlock):
        def __init__(self, *args, **kwargs):
            raise _graph.NotCapturable("RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(_problem, "GraphBlock", Refused)
    monkeypatch.setattr(torchfpi._solve, "check_graph_device", lambda z: None)  # pretend CUDA
    r, c, z0 = _problem_data()
    c.requires_grad_(True)
    ref = torchfpi.fixed_point(f, z0, r, c, tol=1e-9, max_iter=400)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        sol = torchfpi.fixed_point(f, z0, r, c, tol=1e-9, max_iter=400, cuda_graph=True)
    assert torch.equal(sol.value, ref.value)
    g1, g2 = (torch.autograd.grad(s.value.sum(), c)[0] for s in (ref, sol))
    assert torch.equal(g1, g2)


@NEEDS_CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_captured_solve_matches_the_eager_solve_on_cuda(dtype):
    r, c, z0 = _problem_data("cuda", dtype, b=64, d=32)
    c.requires_grad_(True)
    ref = torchfpi.fixed_point(f, z0, r, c, tol=1e-6 if dtype == torch.float32 else 1e-12, max_iter=500)
    sol = torchfpi.fixed_point(f, z0, r, c, tol=1e-6 if dtype == torch.float32 else 1e-12, max_iter=500,
                               cuda_graph=True)
    assert torch.equal(sol.iterations, ref.iterations) and torch.equal(sol.status, ref.status)
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=0)
    g1, g2 = (torch.autograd.grad(s.value.pow(2).sum(), c)[0] for s in (ref, sol))
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@NEEDS_CUDA
def test_a_host_sync_in_the_map_falls_back_with_a_warning_on_cuda():
    r, c, z0 = _problem_data("cuda", torch.float32)

    def syncing(z, r, c):
        if float(z.abs().max().item()) > 1e30:  # a host read: not capturable
            raise AssertionError
        return f(z, r, c)

    ref = torchfpi.fixed_point(f, z0, r, c)
    with pytest.warns(UserWarning, match="could not be captured in a CUDA graph"):
        sol = torchfpi.fixed_point(syncing, z0, r, c, cuda_graph=True)
    torch.testing.assert_close(sol.value, ref.value, rtol=0, atol=0)


def test_capture_glue_runs_the_warm_up_and_falls_back_when_capture_fails(monkeypatch):
    # The CUDA calls around the capture, stood in for on the CPU: the warm-up call of f runs on
    # the side stream, then the capture fails (as a map with .item() makes it fail on a GPU),
    # and the solve warns and runs eagerly.
    import contextlib

    events = []

    class Stream:
        def __init__(self, device=None):
            events.append(("stream", device))

        def wait_stream(self, other):
            events.append("wait")

    def failing_graph(g):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream(device))
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(torchfpi._solve, "check_graph_device", lambda z: None)
    calls = []
    r, c, z0 = _problem_data()

    def counted(z, r, c):
        calls.append(1)
        return f(z, r, c)

    ref = torchfpi.fixed_point(f, z0, r, c, tol=1e-9, max_iter=400)
    with pytest.warns(UserWarning, match=r"could not be captured in a CUDA graph \(RuntimeError: operation not permitted"):
        sol = torchfpi.fixed_point(counted, z0, r, c, tol=1e-9, max_iter=400, cuda_graph=True)
    assert torch.equal(sol.value, ref.value)
    assert "wait" in events and "sync" in events
    assert len(calls) == int(sol.iterations.max()) + 1  # the first call, the warm-up, the eager loop (f(z0) reused)
