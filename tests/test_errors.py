"""Every error path of the core API: clear messages, raised up front."""

from __future__ import annotations

import inspect
import math
import warnings

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


# -- maps that write into their arguments or return a view of z (issue 14) --------------------
MODES = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference": torch.inference_mode}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "f, match",
    [
        (lambda z, x: z.mul_(0.5).add_(x), "modified its input z.* in place"),
        (lambda z, x: (z.mul_(0.5), z + x)[1], "modified its input z.* in place"),
        (lambda z, x: z.view(z.shape), "returned its input z or a view of it"),
        (lambda z, x: z, "returned its input z or a view of it"),
        (lambda z, x: (x.add_(0.0), 0.5 * z + x)[1], r"modified inputs\[0\] in place"),
    ],
)
def test_inplace_or_view_map_is_refused_and_z0_kept(mode, f, match):
    with MODES[mode]():
        z0 = torch.zeros(4, 3)  # an inference tensor in inference mode
    x = torch.randn(4, 3)  # (an inference tensor keeps no version counter: inputs made so are not checked)
    x_before = x.clone()
    with MODES[mode]():
        with pytest.raises(ValueError, match="f: the map " + match):
            torchfpi.fixed_point(f, z0, x)
    assert torch.equal(z0, torch.zeros(4, 3))
    if "inputs" not in match:
        assert torch.equal(x, x_before)


def test_inplace_map_refused_with_unroll_and_tuple_state():
    z0 = torch.zeros(2, 3)
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="in place"):
        torchfpi.fixed_point(lambda z, x: z.mul_(0.5).add_(x), z0, x, backward="unroll")
    assert torch.equal(z0, torch.zeros(2, 3))
    parts = (torch.zeros(2, 3), torch.zeros(2, 1))
    with torch.no_grad(), pytest.raises(ValueError, match="in place"):
        torchfpi.fixed_point(lambda s: (s[0].mul_(0.5), 0.5 * s[1]), parts)
    with pytest.raises(ValueError, match="in place"):  # with grad on, torch's own refusal, reworded
        torchfpi.fixed_point(lambda s, x: (s[0].mul_(0.5), 0.5 * s[1] + x), parts, torch.ones(2, 1, requires_grad=True))
    assert all(torch.equal(p, torch.zeros_like(p)) for p in parts)


# -- empty batch ----------------------------------------------------------------------------------
@pytest.mark.parametrize("grad", [False, True])
def test_empty_batch_returns_an_empty_solution_after_one_call(grad):
    calls = []
    x = torch.zeros(0, 3, requires_grad=grad)

    def f(z, x):
        calls.append(1)
        return 0.5 * z + x

    sol = torchfpi.fixed_point(f, torch.zeros(0, 3), x, max_iter=50)
    assert len(calls) == 1
    assert sol.value.shape == (0, 3)
    assert sol.status.shape == sol.iterations.shape == (0,) and sol.trace.shape == (0, 0)
    if grad:
        sol.value.sum().backward()
        assert x.grad is not None and x.grad.shape == (0, 3)


def test_empty_batch_still_checks_the_output_and_tuple_states():
    with pytest.raises(ValueError, match=r"shape \(0, 4\), expected shape \(0, 3\)"):
        torchfpi.fixed_point(lambda z: torch.zeros(0, 4), torch.zeros(0, 3))
    sol = torchfpi.fixed_point(lambda s: (0.5 * s[0], 0.5 * s[1]), (torch.zeros(0, 2), torch.zeros(0, 1, 2)))
    assert [tuple(p.shape) for p in sol.value] == [(0, 2), (0, 1, 2)]


# -- option types -----------------------------------------------------------------------------------
def test_numpy_integers_and_floats_are_accepted():
    np = pytest.importorskip("numpy")
    sol = torchfpi.fixed_point(lambda z: 0.1 * z + 1, torch.ones(2, 3), max_iter=np.int64(50), tol=np.float32(1e-3),
                               backward_max_iter=np.int32(4))
    assert bool(sol.converged.all())
    assert torchfpi.Options(per_sample=(np.int64(1),)).per_sample == (1,)
    assert type(torchfpi.Anderson(m=np.int64(3)).m) is int and torchfpi.NeumannBackward(terms=np.int64(4)).terms == 4
    assert torchfpi.FPI(damping=np.float32(0.5)).damping == 0.5
    assert torchfpi.Options(max_iter=np.int64(7)).max_iter == 7
    assert type(torchfpi.Options(max_iter=np.int64(7)).max_iter) is int


@pytest.mark.parametrize("tol", [1.0, 1e300])
def test_relative_tol_of_one_or_more_is_refused(tol, z0):
    with pytest.raises(ValueError, match="relative residual tolerance must be < 1"):
        torchfpi.fixed_point(ok, z0, tol=tol)
    torchfpi.fixed_point(ok, z0, tol=tol, residual="absolute")


# -- warnings point at the user's line (issue 14, point 6) -----------------------------------------
def _convergence_warnings(call):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        call()
    hits = [x for x in w if issubclass(x.category, torchfpi.ConvergenceWarning)]
    assert hits
    return hits


@pytest.mark.parametrize("grad", [False, True])
def test_forward_warning_points_at_the_callers_line(grad):
    x = torch.randn(2, 3, requires_grad=grad)
    hits = _convergence_warnings(lambda: torchfpi.fixed_point(lambda z, x: 0.999 * z + x, torch.zeros(2, 3), x, max_iter=3))
    assert [h.filename for h in hits] == [__file__]


@pytest.mark.parametrize("how", ["backward", "grad", "create_graph"])
def test_backward_warning_points_at_the_backward_call(how):
    x = torch.randn(2, 3, requires_grad=True)
    sol = torchfpi.fixed_point(lambda z, x: 0.9 * z + x, torch.zeros(2, 3), x, tol=1e-10, max_iter=1000,
                               backward_max_iter=2, backward_tol=1e-12)
    loss = sol.value.sum()
    if how == "backward":
        hits = _convergence_warnings(lambda: loss.backward()); line = inspect.currentframe().f_lineno  # noqa: E702
    elif how == "grad":
        hits = _convergence_warnings(lambda: torch.autograd.grad(loss, x)); line = inspect.currentframe().f_lineno  # noqa: E702
    else:
        hits = _convergence_warnings(lambda: torch.autograd.grad(loss, x, create_graph=True)); line = inspect.currentframe().f_lineno  # noqa: E702
    assert all("fixed-point solve" in str(h.message) for h in hits)
    assert [(h.filename, h.lineno) for h in hits] == [(__file__, line)] * len(hits)


def test_backward_warning_from_an_engine_thread_points_at_the_backward_call():
    # An autograd device thread runs backward with only torch/torchfpi frames on its stack; the
    # warning then goes to the line of the thread blocked in torch.autograd.grad.
    import _thread
    import os

    from torchfpi._solution import warn_user

    ns = {"warn_user": warn_user, "W": torchfpi.ConvergenceWarning}
    src = "def work(done):\n    try:\n        warn_user('from an engine thread', W)\n    finally:\n        done.release()\n"
    exec(compile(src, os.path.join(os.path.dirname(torch.__file__), "_engine_stand_in.py"), "exec"), ns)

    class Noisy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x

        @staticmethod
        def backward(ctx, g):
            done = _thread.allocate_lock()
            done.acquire()
            _thread.start_new_thread(ns["work"], (done,))
            done.acquire()
            return 2 * g

    x = torch.ones(3, requires_grad=True)
    hits = _convergence_warnings(lambda: torch.autograd.grad(Noisy.apply(x).sum(), x)); line = inspect.currentframe().f_lineno  # noqa: E702
    assert [(h.filename, h.lineno) for h in hits] == [(__file__, line)]
