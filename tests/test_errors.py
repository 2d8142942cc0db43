"""Every error path of the core API: clear messages, raised up front."""

from __future__ import annotations

import math

import pytest
import torch

import torchfpi


def ok(z, *a):
    return 0.5 * z


@pytest.fixture
def z0():
    return torch.zeros(2, 3)


@pytest.mark.parametrize("grad", [False, True])
def test_shape_mismatch_raises_before_iterating(grad, z0):
    calls = []

    def f(z, x):
        calls.append(1)
        return torch.zeros(2, 4)

    x = torch.randn(2, 3, requires_grad=grad)
    with pytest.raises(ValueError, match=r"shape \(2, 4\), expected shape \(2, 3\)"):
        torchfpi.fixed_point(f, z0, x)
    assert len(calls) == 1


def test_dtype_mismatch(z0):
    with pytest.raises(ValueError, match="dtype torch.float64, expected z0's dtype torch.float32"):
        torchfpi.fixed_point(lambda z: z.double(), z0)


def test_device_mismatch_message(z0):
    meta = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="device"):
        torchfpi.fixed_point(lambda z: meta, z0)


def test_output_not_a_tensor(z0):
    with pytest.raises(ValueError, match="must return a tensor like z0, got list"):
        torchfpi.fixed_point(lambda z: [z], z0)


def test_tuple_structure_mismatch():
    with pytest.raises(ValueError, match="tuple of 2 tensors"):
        torchfpi.fixed_point(lambda s: s[0], (torch.zeros(2, 1), torch.zeros(2, 2)))


@pytest.mark.parametrize("tol", [0, -1e-3, float("nan"), float("inf"), -float("inf")])
def test_non_positive_tol(tol, z0):
    with pytest.raises(ValueError, match="tol: expected a positive number"):
        torchfpi.fixed_point(ok, z0, tol=tol)


@pytest.mark.parametrize("tol", ["1e-3", True, None, torch.tensor(1e-3)])
def test_tol_of_wrong_type_is_type_error(tol, z0):
    with pytest.raises(TypeError, match="tol: expected a positive number, got"):
        torchfpi.fixed_point(ok, z0, tol=tol)


def test_backward_tol_and_max_iter_checked(z0):
    with pytest.raises(ValueError, match="backward_tol"):
        torchfpi.fixed_point(ok, z0, backward_tol=0.0)
    with pytest.raises(ValueError, match="backward_max_iter"):
        torchfpi.fixed_point(ok, z0, backward_max_iter=0)
    with pytest.raises(TypeError, match="max_iter: expected an integer >= 1, got float 2.5"):
        torchfpi.fixed_point(ok, z0, max_iter=2.5)


def test_unknown_solver_lists_choices(z0):
    with pytest.raises(ValueError, match=r"solver: expected one of \['anderson', 'broyden', 'fpi'\]"):
        torchfpi.fixed_point(ok, z0, solver="newton")
    with pytest.raises(ValueError, match="solver object with init"):
        torchfpi.fixed_point(ok, z0, solver=3)


def test_unknown_backward_lists_choices(z0):
    with pytest.raises(ValueError, match=r"backward: expected one of \['anderson', 'broyden', 'dense', 'fpi', 'neumann', 'onestep', 'unroll'\]"):
        torchfpi.fixed_point(ok, z0, backward="phantom")


def test_unknown_on_failure_and_residual(z0):
    with pytest.raises(ValueError, match="on_failure"):
        torchfpi.fixed_point(ok, z0, on_failure="shout")
    with pytest.raises(ValueError, match="residual"):
        torchfpi.fixed_point(ok, z0, residual="max")


def test_unknown_option_is_type_error(z0):
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_iters'"):
        torchfpi.fixed_point(ok, z0, max_iters=3)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3, dtype=torch.bool)])
def test_non_float_z0_is_type_error(bad):
    with pytest.raises(TypeError, match="z0: expected a floating-point tensor, got dtype"):
        torchfpi.fixed_point(ok, bad)


def test_z0_wrong_type():
    with pytest.raises(TypeError, match="z0: expected a floating-point torch.Tensor"):
        torchfpi.fixed_point(ok, [1.0, 2.0])


def test_scalar_z0_needs_batched_false():
    with pytest.raises(ValueError, match="batched=False"):
        torchfpi.fixed_point(ok, torch.tensor(1.0))


def test_f_not_callable(z0):
    with pytest.raises(TypeError, match="f: expected a callable"):
        torchfpi.fixed_point(3, z0)


@pytest.mark.parametrize("where", ["z0", "input"])
def test_nan_in_z0_or_inputs(where, z0):
    x = torch.zeros(2, 3)
    if where == "z0":
        z0 = z0.clone()
        z0[0, 0] = math.nan
        match = "z0 contains NaN"
    else:
        x[1, 2] = math.inf
        match = r"inputs\[0\] contains NaN or Inf \(at iteration 0"
    with pytest.raises(torchfpi.FixedPointError, match=match):
        torchfpi.fixed_point(lambda z, x: 0.5 * z + x, z0, x)


def test_nan_from_f_names_iteration(z0):
    def f(z):
        return torch.where(z > 0.7, torch.full_like(z, math.nan), 0.5 * z + 0.5)

    with pytest.raises(torchfpi.FixedPointError, match="NaN or Inf at iteration 3"):
        torchfpi.fixed_point(f, z0)


def test_divergence_detected_early_and_never_converged(z0):
    with pytest.warns(torchfpi.ConvergenceWarning, match="diverged"):
        sol = torchfpi.fixed_point(lambda z: 2.0 * z + 1.0, z0, max_iter=1000)
    assert (sol.status == torchfpi.Status.DIVERGED).all()
    assert not sol.converged.any()
    assert int(sol.iterations.max()) < 40
    with pytest.raises(torchfpi.FixedPointError, match="diverged"):
        torchfpi.fixed_point(lambda z: 2.0 * z + 1.0, z0, max_iter=1000, on_failure="raise")


def test_overflowing_norm_is_divergence_not_convergence():
    # Huge but finite entries make ||f(z)|| overflow to inf in float32: a relative residual
    # would look like 0. It must be reported as divergence.
    z0 = torch.full((1, 4), 1e30)
    with pytest.warns(torchfpi.ConvergenceWarning, match="diverged"):
        sol = torchfpi.fixed_point(lambda z: z * 10.0, z0, max_iter=5)
    assert not sol.converged.any()


def test_mixed_batch_diverged_sample_does_not_affect_others():
    scales = torch.tensor([[0.5], [3.0]])
    with pytest.warns(torchfpi.ConvergenceWarning, match="1 of 2 samples diverged"):
        sol = torchfpi.fixed_point(lambda z, s: s * z + 1, torch.zeros(2, 2), scales, max_iter=500)
    assert sol.status.tolist() == [torchfpi.Status.CONVERGED, torchfpi.Status.DIVERGED]
    torch.testing.assert_close(sol.value[0], torch.full((2,), 2.0))


def test_on_failure_ignore_is_silent(z0, recwarn):
    torchfpi.fixed_point(lambda z: 0.999 * z + 1, z0, max_iter=3, on_failure="ignore")
    assert len(recwarn) == 0


def test_non_convergence_message_names_knobs(z0):
    with pytest.raises(torchfpi.FixedPointError, match="raise max_iter, use solver='anderson'"):
        torchfpi.fixed_point(lambda z: 0.999 * z + 1, z0, max_iter=3, on_failure="raise")


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: torchfpi.FPI(damping=0), "damping: expected a number in"),
        (lambda: torchfpi.FPI(damping=1.5), "damping"),
        (lambda: torchfpi.Anderson(m=0), "m: expected an integer >= 1"),
        (lambda: torchfpi.Anderson(regularization=-1), "regularization"),
        (lambda: torchfpi.Anderson(restart=1.0), "restart"),
        (lambda: torchfpi.NeumannBackward(terms=0), "terms"),
        (lambda: torchfpi.FPIBackward(damping=2), "damping"),
    ],
)
def test_strategy_options_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dense_refuses_large_states():
    x = torch.randn(64, 128, requires_grad=True)
    sol = torchfpi.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(64, 128), x, backward="dense")
    with pytest.raises(ValueError, match="max_size"):
        sol.value.sum().backward()


def test_layer_without_init_needs_z0():
    layer = torchfpi.FPILayer(lambda z, x: 0.5 * z + x)
    with pytest.raises(ValueError, match="z0: this layer has no init"):
        layer(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="tol"):
        torchfpi.FPILayer(ok, tol=0)
