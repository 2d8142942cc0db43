"""Mixed precision (``compute_dtype``): f in bf16/fp16, state, residuals and adjoint in float32.

The reference is the same DEQ MLP solved entirely in float64. Bounds: with f evaluated in a
dtype of unit roundoff eps, the fixed point and its gradient are perturbed by O(eps) times the
conditioning of (I - df/dz) (at most 1 / (1 - 0.5) here). Measured (torch 2.13 CPU, this
problem): bf16 at tol 1e-2, gradient relative errors 4.6e-3..7.3e-3; fp16 at tol 1e-3,
6.8e-4..9.3e-4. The bounds are ~8-10x the unit roundoff (bf16 2^-8 = 3.9e-3, fp16 2^-11 =
4.9e-4), 4-5x over what was measured.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import torchfpi

# dtype -> (forward relative tolerance, bound on the gradient's relative error vs float64)
BOUNDS = {torch.bfloat16: (1e-2, 3e-2), torch.float16: (1e-3, 5e-3)}


def _timing_script():
    """The timing script's module: its DEQ map is the one these tests solve."""
    path = Path(__file__).resolve().parents[1] / "scripts" / "time_mixed_precision.py"
    spec = importlib.util.spec_from_file_location("time_mixed_precision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEQ = _timing_script().DEQ
"""f(z, x) = tanh(W z + U x + b), with ||W||_2 = 0.5 (a contraction), computing in z's dtype."""


def _fp16_cpu_ok() -> bool:
    try:
        a = torch.ones(2, 2, dtype=torch.float16, requires_grad=True)
        torch.autograd.grad(torch.tanh(a @ a).sum(), a)
        return True
    except RuntimeError:
        return False


def _grads(model: DEQ, x: torch.Tensor, w: torch.Tensor, **kw):
    x = x.clone().requires_grad_(True)
    sol = torchfpi.fixed_point(model, torch.zeros(x.shape[0], 16, dtype=x.dtype), x, max_iter=200, **kw)
    loss = (sol.value * w).sum()
    return sol, torch.autograd.grad(loss, [x, *model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


DTYPES = [
    torch.bfloat16,
    pytest.param(
        torch.float16,
        marks=pytest.mark.skipif(not _fp16_cpu_ok(), reason="no float16 matmul/tanh kernels on this CPU build"),
    ),
]


@pytest.mark.parametrize("compute", DTYPES)
def test_gradient_error_against_float64(compute):
    fwd_tol, grad_bound = BOUNDS[compute]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 8, generator=gen)
    w = torch.randn(6, 16, generator=gen)
    model = DEQ()
    sol, g = _grads(model, x, w, tol=fwd_tol, compute_dtype=compute)
    assert sol.value.dtype == torch.float32 and bool(sol.converged.all())
    assert all(t.dtype == torch.float32 for t in g)
    ref_model = DEQ().double()
    ref, g64 = _grads(ref_model, x.double(), w.double(), tol=1e-12)
    assert _rel(sol.value, ref.value) < grad_bound
    for a, b in zip(g, g64):
        assert _rel(a, b) < grad_bound
    # the low-precision f is really used: the float32 solve is far more accurate
    full, g32 = _grads(DEQ(), x, w, tol=1e-6)
    assert _rel(g32[0], g64[0]) < 1e-4 < _rel(g[0], g64[0])


def test_double_backward_runs_through_the_casts():
    model = DEQ()
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    sol = torchfpi.fixed_point(model, torch.zeros(3, 16), x, tol=2e-2, compute_dtype=torch.bfloat16)
    (gx,) = torch.autograd.grad(sol.value.pow(2).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.sum(), x)
    assert ggx.dtype == torch.float32 and bool(torch.isfinite(ggx).all())


def test_tuple_state_and_layer_keyword():
    def f(z, x):
        a, b = z
        assert a.dtype == b.dtype == torch.bfloat16
        return 0.5 * b + x.to(a.dtype), 0.25 * a
    x = torch.ones(2, 3)
    sol = torchfpi.fixed_point(f, (torch.zeros(2, 3), torch.zeros(2, 3)), x, tol=1e-2,
                               compute_dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in sol.value)
    layer = torchfpi.FPILayer(DEQ(), init=lambda x: torch.zeros(x.shape[0], 16), tol=2e-2,
                              compute_dtype=torch.bfloat16)
    assert layer.options.compute_dtype is torch.bfloat16
    assert layer(torch.randn(2, 8)).dtype == torch.float32


def test_default_is_unchanged_and_same_dtype_is_a_no_op():
    model = DEQ()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    sol_a, ga = _grads(model, x, w, tol=1e-6)
    sol_b, gb = _grads(model, x, w, tol=1e-6, compute_dtype=None)
    sol_c, gc = _grads(model, x, w, tol=1e-6, compute_dtype=torch.float32)
    for s in (sol_b, sol_c):
        assert torch.equal(s.value, sol_a.value) and torch.equal(s.iterations, sol_a.iterations)
    for a, b, c in zip(ga, gb, gc):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "value, err",
    [("bfloat16", TypeError), (16, TypeError), (torch.int32, ValueError), (torch.bool, ValueError)],
)
def test_validation_names_the_argument(value, err):
    with pytest.raises(err, match="compute_dtype"):
        torchfpi.Options(compute_dtype=value)
    with pytest.raises(err, match="compute_dtype"):
        torchfpi.fixed_point(lambda z: 0.5 * z, torch.zeros(1, 2), compute_dtype=value)
    with pytest.raises(err, match="compute_dtype"):
        torchfpi.FPILayer(lambda z: 0.5 * z, compute_dtype=value)
