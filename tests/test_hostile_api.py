"""The API half of the bad-input corpus (issue 14, point 3): what a careless or hostile caller
passes to the core, one case a line.

Each case asserts the exception class (``TypeError`` / ``ValueError`` for a wrong type or value,
``FixedPointError`` for a failure of the solve itself), a message that names the argument, and
that nothing the caller handed in was modified (tensors compared bit for bit, module parameters
too). The CLI half is ``tests/test_hostile_cli.py``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict

import numpy as np
import pytest
import torch

import torchfpi
from torchfpi.energies import QuadraticEnergy

FPE = torchfpi.FixedPointError


def half(z, *a):
    return 0.5 * z + 1


def lin(z, x):
    return 0.5 * z + x


def fresh() -> Dict[str, Any]:
    """New tensors and modules for each case (so a case cannot leak into the next)."""
    torch.manual_seed(0)
    nan_x = torch.randn(2, 3)
    nan_x[0, 1] = math.nan
    inf_z = torch.zeros(2, 3)
    inf_z[1, 0] = math.inf
    return {
        "z0": torch.zeros(2, 3),
        "x": torch.randn(2, 3),
        "xg": torch.randn(2, 3, requires_grad=True),
        "x1": torch.randn(3),
        "img": torch.randn(2, 1, 5, 5),
        "nan_x": nan_x,
        "inf_z": inf_z,
        "mlp": torchfpi.MLPUpdate(4, 3, hidden=8),
        "conv": torchfpi.ConvUpdate(2, 1, hidden=4),
        "quad": QuadraticEnergy(3),
    }


def fp(**kw: Any) -> Callable[[Dict[str, Any]], Any]:
    """``fixed_point(half, z0, x, **kw)`` on the case's tensors."""
    return lambda t: torchfpi.fixed_point(half, t["z0"], t["x"], **kw)


def fp_f(f: Any, **kw: Any) -> Callable[[Dict[str, Any]], Any]:
    return lambda t: torchfpi.fixed_point(f, t["z0"], t["x"], **kw)


def fp_z(z0: Any, **kw: Any) -> Callable[[Dict[str, Any]], Any]:
    return lambda t: torchfpi.fixed_point(half, z0() if callable(z0) else z0, **kw)


def bad_nan(z, x):
    return torch.where(z > 0.7, torch.full_like(z, math.nan), 0.5 * z + 0.5)


def _backward(sol: Any) -> None:
    sol.value.sum().backward()


def _no_grad(call: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return call()


INT = torch.zeros(2, 3, dtype=torch.int64)

CASES = [
    # -- tol ----------------------------------------------------------------------------------
    ("tol-zero", fp(tol=0), ValueError, r"^tol: expected a positive number"),
    ("tol-negative", fp(tol=-1e-3), ValueError, r"^tol: expected a positive number"),
    ("tol-nan", fp(tol=math.nan), ValueError, r"^tol: expected a positive number \(finite"),
    ("tol-inf", fp(tol=math.inf), ValueError, r"^tol: expected a positive number \(finite"),
    ("tol-minus-inf", fp(tol=-math.inf), ValueError, r"^tol: "),
    ("tol-1e300-relative", fp(tol=1e300), ValueError, r"^tol: a relative residual tolerance must be < 1"),
    ("tol-one-relative", fp(tol=1.0), ValueError, r"^tol: a relative residual tolerance must be < 1"),
    ("tol-inf-absolute", fp(tol=math.inf, residual="absolute"), ValueError, r"^tol: expected a positive number"),
    ("tol-str", fp(tol="1e-3"), TypeError, r"^tol: expected a positive number, got str"),
    ("tol-bool", fp(tol=True), TypeError, r"^tol: expected a positive number, got bool"),
    ("tol-none", fp(tol=None), TypeError, r"^tol: .*got NoneType"),
    ("tol-tensor", fp(tol=torch.tensor(1e-3)), TypeError, r"^tol: .*got Tensor"),
    ("tol-complex", fp(tol=1e-3 + 0j), TypeError, r"^tol: .*got complex"),
    ("tol-list", fp(tol=[1e-3]), TypeError, r"^tol: .*got list"),
    # -- max_iter -----------------------------------------------------------------------------
    ("max-iter-zero", fp(max_iter=0), ValueError, r"^max_iter: expected an integer >= 1, got 0"),
    ("max-iter-negative", fp(max_iter=-5), ValueError, r"^max_iter: expected an integer >= 1"),
    ("max-iter-float", fp(max_iter=2.5), TypeError, r"^max_iter: expected an integer >= 1, got float"),
    ("max-iter-whole-float", fp(max_iter=5.0), TypeError, r"^max_iter: .*got float"),
    ("max-iter-str", fp(max_iter="5"), TypeError, r"^max_iter: .*got str"),
    ("max-iter-bool", fp(max_iter=True), TypeError, r"^max_iter: .*got bool"),
    ("max-iter-none", fp(max_iter=None), TypeError, r"^max_iter: .*got NoneType"),
    ("max-iter-np-float", fp(max_iter=np.float64(5)), TypeError, r"^max_iter: .*got float64"),
    ("max-iter-np-zero", fp(max_iter=np.int64(0)), ValueError, r"^max_iter: expected an integer >= 1"),
    ("max-iter-inf", fp(max_iter=math.inf), TypeError, r"^max_iter: "),
    # -- backward_tol / backward_max_iter -----------------------------------------------------
    ("backward-tol-zero", fp(backward_tol=0.0), ValueError, r"^backward_tol: expected a positive number"),
    ("backward-tol-nan", fp(backward_tol=math.nan), ValueError, r"^backward_tol: "),
    ("backward-tol-inf", fp(backward_tol=math.inf), ValueError, r"^backward_tol: "),
    ("backward-tol-big-relative", fp(backward_tol=10.0), ValueError, r"^backward_tol: a relative residual"),
    ("backward-tol-str", fp(backward_tol="small"), TypeError, r"^backward_tol: .*got str"),
    ("backward-tol-bool", fp(backward_tol=False), TypeError, r"^backward_tol: .*got bool"),
    ("backward-max-iter-zero", fp(backward_max_iter=0), ValueError, r"^backward_max_iter: expected an integer >= 1"),
    ("backward-max-iter-float", fp(backward_max_iter=1.5), TypeError, r"^backward_max_iter: .*got float"),
    ("backward-max-iter-bool", fp(backward_max_iter=True), TypeError, r"^backward_max_iter: .*got bool"),
    # -- the string and flag options ----------------------------------------------------------
    ("on-failure-unknown", fp(on_failure="shout"), ValueError, r"^on_failure: expected one of \['warn', 'raise', 'ignore'\]"),
    ("on-failure-none", fp(on_failure=None), TypeError, r"^on_failure: .*got NoneType"),
    ("on-failure-int", fp(on_failure=1), TypeError, r"^on_failure: "),
    ("on-failure-case", fp(on_failure="WARN"), ValueError, r"^on_failure: "),
    ("residual-unknown", fp(residual="max"), ValueError, r"^residual: expected one of \['relative', 'absolute'\]"),
    ("residual-none", fp(residual=None), TypeError, r"^residual: "),
    ("compact-str", fp(compact="yes"), TypeError, r"^compact: expected a bool, got str"),
    ("compact-int", fp(compact=1), TypeError, r"^compact: expected a bool"),
    ("batched-str", fp(batched="no"), TypeError, r"^batched: expected a bool"),
    ("batched-none", fp(batched=None), TypeError, r"^batched: expected a bool"),
    ("per-sample-negative", fp(per_sample=(-1,)), ValueError, r"^per_sample: expected input indices >= 0"),
    ("per-sample-int", fp(per_sample=0), TypeError, r"^per_sample: expected None or a sequence"),
    ("per-sample-str", fp(per_sample="0"), TypeError, r"^per_sample: "),
    ("per-sample-bool", fp(per_sample=(True,)), TypeError, r"^per_sample: "),
    ("per-sample-float", fp(per_sample=(0.0,)), TypeError, r"^per_sample: "),
    ("per-sample-twice", fp(per_sample=(0, 0)), ValueError, r"^per_sample: an input index is listed twice"),
    ("per-sample-missing", fp(per_sample=(3,)), ValueError, r"^per_sample: input 3 must be a tensor input of f, got missing"),
    ("per-sample-not-tensor", lambda t: torchfpi.fixed_point(lambda z, x, s: 0.5 * z + x * s, t["z0"], t["x"], 2.0, per_sample=(1,)),
     ValueError, r"^per_sample: input 1 must be a tensor input of f, got float"),
    ("compact-shared-in-per-sample", lambda t: torchfpi.fixed_point(lambda z, x, w: 0.5 * z + x @ w, t["z0"], t["x"], torch.eye(3),
                                                                    compact=True), ValueError, r"^inputs\[1\]: compact=True slices"),
    ("solver-unknown", fp(solver="newton"), ValueError, r"^solver: expected one of \[.*'anderson'.*'fpi'"),
    ("solver-int", fp(solver=3), ValueError, r"^solver: "),
    ("solver-none", fp(solver=None), ValueError, r"^solver: "),
    ("backward-unknown", fp(backward="phantom"), ValueError, r"^backward: expected one of"),
    ("backward-int", fp(backward=3), ValueError, r"^backward: "),
    ("unknown-keyword", fp(max_iters=3), TypeError, r"unexpected keyword argument 'max_iters'"),
    # -- z0 -----------------------------------------------------------------------------------
    ("z0-list", fp_z([[0.0, 1.0]]), TypeError, r"^z0: expected a floating-point torch.Tensor"),
    ("z0-none", fp_z(None), TypeError, r"^z0: expected a floating-point torch.Tensor"),
    ("z0-numpy", fp_z(np.zeros((2, 3))), TypeError, r"^z0: expected a floating-point torch.Tensor"),
    ("z0-int", fp_z(INT), TypeError, r"^z0: expected a floating-point tensor, got dtype torch.int64"),
    ("z0-bool", fp_z(lambda: torch.zeros(2, 3, dtype=torch.bool)), TypeError, r"^z0: expected a floating-point tensor"),
    ("z0-complex", fp_z(lambda: torch.zeros(2, 3, dtype=torch.complex64)), TypeError, r"^z0: expected a floating-point tensor"),
    ("z0-scalar", fp_z(lambda: torch.tensor(1.0)), ValueError, r"^z0: dim 0 is the batch.*batched=False"),
    ("z0-empty-tuple", fp_z(()), TypeError, r"^z0: expected a floating-point torch.Tensor or a non-empty tuple"),
    ("z0-tuple-dtypes", fp_z(lambda: (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64))), ValueError,
     r"^z0\[1\]: every part of z0 must share dtype and device"),
    ("z0-tuple-batch", fp_z(lambda: (torch.zeros(2, 3), torch.zeros(3, 3))), ValueError, r"^z0\[1\]: dim 0 is the batch"),
    ("z0-tuple-with-list", fp_z(lambda: (torch.zeros(2, 3), [0.0])), TypeError, r"^z0: expected"),
    ("z0-inf", lambda t: torchfpi.fixed_point(half, t["inf_z"]), FPE, r"z0 contains NaN or Inf"),
    ("input-nan", lambda t: torchfpi.fixed_point(lin, t["z0"], t["nan_x"]), FPE, r"inputs\[0\] contains NaN or Inf"),
    # -- f --------------------------------------------------------------------------------------
    ("f-int", lambda t: torchfpi.fixed_point(3, t["z0"]), TypeError, r"^f: expected a callable"),
    ("f-none", lambda t: torchfpi.fixed_point(None, t["z0"]), TypeError, r"^f: expected a callable"),
    ("f-str", lambda t: torchfpi.fixed_point("f", t["z0"]), TypeError, r"^f: expected a callable"),
    ("f-shape", fp_f(lambda z, x: torch.zeros(2, 4)), ValueError, r"^f's output has shape \(2, 4\), expected shape \(2, 3\)"),
    ("f-batch", fp_f(lambda z, x: torch.zeros(3, 3)), ValueError, r"^f's output has shape \(3, 3\)"),
    ("f-dtype", fp_f(lambda z, x: z.double()), ValueError, r"^f's output has dtype torch.float64"),
    ("f-int-output", fp_f(lambda z, x: z.long()), ValueError, r"^f's output has dtype torch.int64"),
    ("f-list", fp_f(lambda z, x: [z]), ValueError, r"^f must return a tensor like z0, got list"),
    ("f-none-output", fp_f(lambda z, x: None), ValueError, r"^f must return a tensor like z0, got NoneType"),
    ("f-tuple-for-tensor", fp_f(lambda z, x: (z + 1,)), ValueError, r"^f must return a tensor like z0, got tuple"),
    ("f-tensor-for-tuple", lambda t: torchfpi.fixed_point(lambda s: s[0] + 1, (t["z0"], t["x"])), ValueError,
     r"^f must return a tuple of 2 tensors"),
    ("f-inplace", fp_f(lambda z, x: z.mul_(0.5).add_(x)), ValueError, r"^f: the map modified its input z.* in place"),
    ("f-inplace-op", fp_f(lambda z, x: z.__iadd__(x)), ValueError, r"^f: the map modified its input z.* in place"),
    ("f-identity", fp_f(lambda z, x: z), ValueError, r"^f: the map returned its input z or a view of it"),
    ("f-view", fp_f(lambda z, x: z[:, :]), ValueError, r"^f: the map returned its input z or a view of it"),
    ("f-grad-inplace-tuple", lambda t: torchfpi.fixed_point(lambda s, x: (s[0].mul_(0.5), 0.5 * s[1] + x), (t["z0"], t["x"]), t["xg"]),
     ValueError, r"^f: the map modified its input z in place \(a part of the tuple state\)"),
    ("f-nograd-inplace-tuple", lambda t: _no_grad(lambda: torchfpi.fixed_point(lambda s: (s[0].mul_(0.5), 0.5 * s[1]), (t["z0"], t["x"]))),
     ValueError, r"^f: the map modified its input z.* in place"),
    ("f-grad-inplace", lambda t: torchfpi.fixed_point(lambda z, x: z.mul_(0.5).add_(x), t["z0"], t["xg"]), ValueError,
     r"^f: the map modified its input z.* in place"),
    ("f-grad-inplace-parameter", lambda t: torchfpi.fixed_point(lambda z, x: 0.5 * z + t["xg"].mul_(1.0) + x, t["z0"], t["x"]),
     ValueError, r"^f: the map modified its input z, or another tensor that requires grad, in place"),
    ("f-nan", fp_f(bad_nan), FPE, r"NaN or Inf at iteration 3"),
    ("f-raise-on-failure", fp_f(lambda z, x: 0.999 * z + x, max_iter=3, on_failure="raise"), FPE, r"did not converge within max_iter=3"),
    ("f-diverges", fp_f(lambda z, x: 2.0 * z + x + 1, max_iter=1000, on_failure="raise"), FPE, r"diverged"),
    ("backward-dense-too-large", lambda t: _backward(torchfpi.fixed_point(lin, torch.zeros(64, 128), torch.randn(64, 128, requires_grad=True),
                                                                         backward="dense")), ValueError, r"max_size"),
    ("backward-raise-on-failure", lambda t: _backward(torchfpi.fixed_point(lambda z, x: 0.9 * z + x, t["z0"], t["xg"], tol=1e-10, max_iter=1000,
                                                                           backward_max_iter=2, on_failure="raise")),
     FPE, r"^backward fixed-point solve: .*backward_max_iter=2"),
    # -- layers -----------------------------------------------------------------------------------
    ("layer-f-int", lambda t: torchfpi.FPILayer(3), TypeError, r"^f: expected a callable"),
    ("layer-tol", lambda t: torchfpi.FPILayer(half, tol=0), ValueError, r"^tol: "),
    ("layer-max-iter", lambda t: torchfpi.FPILayer(half, max_iter=1.5), TypeError, r"^max_iter: "),
    ("layer-unknown-option", lambda t: torchfpi.FPILayer(half, tolerance=1e-3), TypeError, r"FPILayer: unknown option\(s\) \['tolerance'\]"),
    ("layer-options-dict", lambda t: torchfpi.FPILayer(half, options={"tol": 1e-3}), TypeError, r"^options: expected a torchfpi.Options"),
    ("layer-no-init", lambda t: torchfpi.FPILayer(lin)(t["x"]), ValueError, r"^z0: this layer has no init"),
    ("fpinn-1d-input", lambda t: torchfpi.FPINN(t["mlp"])(t["x1"]), ValueError, r"^x: MLPUpdate expects shape \(B, 3\), got \(3,\)"),
    ("fpinn-features", lambda t: torchfpi.FPINN(t["mlp"])(t["img"].reshape(2, 25)), ValueError, r"^x: MLPUpdate expects shape \(B, 3\)"),
    ("fpinn-3d-input", lambda t: torchfpi.FPINN(t["mlp"])(t["x"][None]), ValueError, r"^x: MLPUpdate expects shape \(B, 3\)"),
    ("fpinn-list-input", lambda t: torchfpi.FPINN(t["mlp"])([[1.0, 2.0, 3.0]]), TypeError, r"^x: MLPUpdate expects a torch.Tensor"),
    ("fpinn-z0-shape", lambda t: torchfpi.FPINN(t["mlp"])(t["x"], z0=t["z0"]), ValueError, r"^z: MLPUpdate expects shape \(B, 4\), got \(2, 3\)"),
    ("conv-3d-input", lambda t: torchfpi.FPINN(t["conv"])(t["img"][0]), ValueError, r"^x: ConvUpdate expects shape \(B, 1, \*, \*\)"),
    ("conv-channels", lambda t: torchfpi.FPINN(t["conv"])(t["img"].expand(2, 3, 5, 5)), ValueError, r"^x: ConvUpdate expects shape"),
    ("mlp-gamma-zero", lambda t: torchfpi.MLPUpdate(4, 3, gamma=0.0), ValueError, r"^gamma: "),
    ("mlp-gamma-big", lambda t: torchfpi.MLPUpdate(4, 3, gamma=1.5), ValueError, r"^gamma: expected a number in \(0, 1\]"),
    ("mlp-gamma-nan", lambda t: torchfpi.MLPUpdate(4, 3, gamma=math.nan), ValueError, r"^gamma: "),
    ("mlp-gamma-str", lambda t: torchfpi.MLPUpdate(4, 3, gamma="0.9"), TypeError, r"^gamma: "),
    ("mlp-state-dim-zero", lambda t: torchfpi.MLPUpdate(0, 3), ValueError, r"^state_dim: expected an integer >= 1"),
    ("mlp-input-dim-float", lambda t: torchfpi.MLPUpdate(4, 3.0), TypeError, r"^input_dim: "),
    ("mlp-hidden-negative", lambda t: torchfpi.MLPUpdate(4, 3, hidden=-8), ValueError, r"^hidden: "),
    ("mlp-activation", lambda t: torchfpi.MLPUpdate(4, 3, activation="gelu"), ValueError, r"^activation: expected one of"),
    ("mlp-out-activation", lambda t: torchfpi.MLPUpdate(4, 3, out_activation="relu"), ValueError, r"^out_activation: "),
    ("conv-kernel-even", lambda t: torchfpi.ConvUpdate(2, 1, kernel_size=4), ValueError, r"^kernel_size: expected an odd integer"),
    ("conv-kernel-float", lambda t: torchfpi.ConvUpdate(2, 1, kernel_size=3.0), TypeError, r"^kernel_size: "),
    ("conv-channels-zero", lambda t: torchfpi.ConvUpdate(0, 1), ValueError, r"^channels: "),
    ("fpigd-step-nan", lambda t: torchfpi.FPIGD(t["quad"], step_size=math.nan), ValueError, r"^step_size: expected a positive number"),
    ("fpigd-step-inf", lambda t: torchfpi.FPIGD(t["quad"], step_size=math.inf), ValueError, r"^step_size: expected a positive number"),
    ("fpigd-step-zero", lambda t: torchfpi.FPIGD(t["quad"], step_size=0), ValueError, r"^step_size: "),
    ("fpigd-step-negative", lambda t: torchfpi.FPIGD(t["quad"], step_size=-0.1), ValueError, r"^step_size: "),
    ("fpigd-step-str", lambda t: torchfpi.FPIGD(t["quad"], step_size="0.1"), TypeError, r"^step_size: "),
    ("fpigd-step-tensor", lambda t: torchfpi.FPIGD(t["quad"], step_size=torch.tensor(0.1)), TypeError, r"^step_size: "),
    ("fpigd-projection", lambda t: torchfpi.FPIGD(t["quad"], projection="sphere"), ValueError, r"^projection: "),
    ("fpigd-box-order", lambda t: torchfpi.FPIGD(t["quad"], projection="box", box=(1.0, 0.0)), ValueError, r"^box: expected \(low, high\)"),
    ("fpigd-box-nan", lambda t: torchfpi.FPIGD(t["quad"], projection="box", box=(0.0, math.nan)), ValueError, r"^box: "),
    ("fpigd-box-str", lambda t: torchfpi.FPIGD(t["quad"], projection="box", box="ab"), TypeError, r"^box: expected a pair"),
    ("fpigd-box-three", lambda t: torchfpi.FPIGD(t["quad"], projection="box", box=(0, 1, 2)), TypeError, r"^box: "),
    ("fpigd-energy-shape", lambda t: torchfpi.FPIGD(lambda z, x: (z * x).sum(), init=torch.zeros_like)(t["x"]), ValueError,
     r"energy must return one value per sample, shape \(2,\)"),
    ("fpigd-no-init", lambda t: torchfpi.FPIGD(t["quad"])(t["x"]), ValueError, r"^z0: this layer has no init"),
    ("energy-grad-not-callable", lambda t: torchfpi.energy_grad(3, t["z0"]), TypeError, r"^energy: expected a callable"),
    ("fpigd-energy-not-callable", lambda t: torchfpi.FPIGD("quadratic"), TypeError, r"^energy: expected a callable"),
    ("fpinn-update-not-callable", lambda t: torchfpi.FPINN(None), TypeError, r"^update: expected an nn.Module"),
    ("energy-grad-int-z", lambda t: torchfpi.energy_grad(lambda z: z.sum(1), INT), TypeError, r"^z: energy_grad expects a floating-point"),
    ("energy-grad-0d", lambda t: torchfpi.energy_grad(lambda z: z, torch.tensor(1.0)), ValueError, r"^z: energy_grad expects shape \(B, \*S\)"),
    ("energy-grad-scalar-energy", lambda t: torchfpi.energy_grad(lambda z: z.sum(), t["z0"]), ValueError, r"energy must return one value per sample"),
    # -- Options and strategy objects -------------------------------------------------------------
    ("options-tol", lambda t: torchfpi.Options(tol=-1), ValueError, r"^tol: "),
    ("options-max-iter", lambda t: torchfpi.Options(max_iter="10"), TypeError, r"^max_iter: "),
    ("options-replace", lambda t: torchfpi.Options().replace(tol=math.inf), ValueError, r"^tol: "),
    ("fpi-damping-zero", lambda t: torchfpi.FPI(damping=0), ValueError, r"^damping: expected a number in \(0, 1\]"),
    ("fpi-damping-nan", lambda t: torchfpi.FPI(damping=math.nan), ValueError, r"^damping: "),
    ("anderson-m-zero", lambda t: torchfpi.Anderson(m=0), ValueError, r"^m: expected an integer >= 1"),
    ("anderson-regularization", lambda t: torchfpi.Anderson(regularization=-1), ValueError, r"^regularization: "),
    ("anderson-regularization-inf", lambda t: torchfpi.Anderson(regularization=math.inf), ValueError, r"^regularization: "),
    ("anderson-m-float", lambda t: torchfpi.Anderson(m=2.0), ValueError, r"^m: expected an integer >= 1"),
    ("neumann-terms", lambda t: torchfpi.NeumannBackward(terms=0), ValueError, r"^terms: "),
    ("spectral-radius-0d", lambda t: torchfpi.spectral_radius(half, torch.tensor(1.0)), ValueError, r"^z: expected a tensor of shape \(B, \*S\)"),
    ("spectral-radius-iters", lambda t: torchfpi.spectral_radius(half, t["z0"], iters=0), ValueError, r"^iters: "),
    ("check-gradients-fd-eps-zero", lambda t: torchfpi.check_gradients(lin, t["z0"], t["xg"], fd_eps=0), ValueError, r"^fd_eps: "),
    ("check-gradients-fd-eps-str", lambda t: torchfpi.check_gradients(lin, t["z0"], t["xg"], fd_eps="1e-6"), TypeError, r"^fd_eps: "),
    ("register-adjoint-name", lambda t: torchfpi.register_adjoint("", torchfpi.FPIBackward), ValueError, r"^name: expected a non-empty string"),
    ("register-adjoint-taken", lambda t: torchfpi.register_adjoint("fpi", torchfpi.FPIBackward), ValueError, r"^name: backward mode 'fpi' is already registered"),
]


def _snapshot(t: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    snap = {}
    for key, v in t.items():
        if isinstance(v, torch.Tensor):
            snap[key] = v.detach().clone()
        elif isinstance(v, torch.nn.Module):
            for name, p in v.state_dict().items():
                snap[f"{key}.{name}"] = p.detach().clone()
    return snap


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal, NaN where NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("case, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_api_input_is_one_clear_error_and_changes_nothing(case, exc, match):
    t = fresh()
    before = _snapshot(t)
    with pytest.raises(exc, match=match) as info:
        case(t)
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    assert "\n" not in str(info.value), "one line"
    after = _snapshot(t)
    changed = [k for k in before if not _same(before[k], after[k])]
    assert not changed, f"inputs modified: {changed}"


def test_corpus_size():
    assert len(CASES) >= 80
    assert len({c[0] for c in CASES}) == len(CASES)
