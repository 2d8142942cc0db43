"""Multi-label application: example-based F1, the four models on real Bibtex, training, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from torchfpi.apps.multilabel import (
    MODELS,
    ModelConfig,
    MultiLabelModel,
    TrainConfig,
    best_threshold,
    example_f1,
    make_splits,
    train_multilabel,
)
from torchfpi.cli import main
from torchfpi.data import MultiLabelData, load_embedded_bibtex


@pytest.mark.parametrize("zero_division", [0.0, 1.0])
def test_example_f1_matches_sklearn(zero_division):
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(0)
    target = (torch.rand(50, 7, generator=g) < 0.3).long()
    pred = (torch.rand(50, 7, generator=g) < 0.3).long()
    target[:3] = 0  # examples with no true label
    pred[1:4] = 0  # and with no predicted label (row 1, 2: both empty)
    ours = float(example_f1(pred, target, zero_division=zero_division).mean())
    ref = metrics.f1_score(target.numpy(), pred.numpy(), average="samples", zero_division=zero_division)
    assert ours == pytest.approx(ref, abs=1e-12)


def test_example_f1_errors_and_threshold():
    with pytest.raises(ValueError, match=r"same \(N, L\) shape"):
        example_f1(torch.zeros(3, 2), torch.zeros(3, 4))
    prob = torch.tensor([[0.9, 0.3, 0.1], [0.2, 0.6, 0.35]])
    target = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    th, f1 = best_threshold(prob, target, thresholds=(0.5, 0.3, 0.1))
    assert th == 0.3 and f1 == pytest.approx(1.0)


@pytest.fixture(scope="module")
def tiny_bibtex():
    train, test = load_embedded_bibtex("train"), load_embedded_bibtex("test")

    def cut(d: MultiLabelData, n: int) -> MultiLabelData:
        return MultiLabelData(d.features[:n], d.labels[:n], d.feature_names, d.label_names)

    return make_splits(cut(train, 160), cut(test, 64), val_fraction=0.25)


SMALL = ModelConfig(hidden=32, energy_hidden=4, update_hidden=8, unroll_steps=3, max_iter=20, backward_max_iter=20)


@pytest.mark.parametrize("kind", MODELS)
def test_each_model_trains_a_step_on_real_bibtex(kind, tiny_bibtex):
    cfg = TrainConfig(model=kind, epochs=1, batch_size=32, model_cfg=SMALL)
    res = train_multilabel(cfg, tiny_bibtex, log=lambda m: None, max_steps=2)
    assert 0.0 <= res["test_f1"] <= 100.0 and res["epochs_run"] == 1
    if kind in ("fpi_gd", "fpi_nn"):
        assert res["train_forward_iterations"] >= 1 and res["train_backward_iterations"] >= 1
        assert res["test_forward_iterations"] >= 1
    else:
        assert res["train_forward_iterations"] is None


@pytest.mark.parametrize("kind, energy_kind", [("fpi_gd", "label"), ("fpi_gd", "icnn"), ("fpi_nn", "label")])
def test_fixed_point_models_reach_their_fixed_point(kind, energy_kind):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=16, energy_hidden=4, update_hidden=8, tol=1e-6, energy_init_scale=1.0,
                      energy_kind=energy_kind)
    model = MultiLabelModel(kind, 20, 6, cfg).eval()
    x = (torch.rand(5, 20) < 0.3).float()
    with torch.no_grad():
        z = model(x)
        s, h = model.unary(x)
        if kind == "fpi_nn":
            f = model._nn_update(z, s, model.u(h))
        else:
            f = model._gd_update(z, s, h if energy_kind == "icnn" else None)
    torch.testing.assert_close(f, z, atol=1e-4, rtol=1e-4)
    assert bool(model.last_solution.converged.all())


def test_energy_is_mlp_without_interaction():
    model = MultiLabelModel("spen", 10, 3, ModelConfig(hidden=8)).eval()
    x = torch.rand(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.unary(x)[0])  # c = 0 at init, tau = 1: z* = s


def test_checkpoint_and_resume(tmp_path, tiny_bibtex):
    ck = tmp_path / "run.pt"
    cfg = TrainConfig(model="fpi_gd", epochs=2, batch_size=64, model_cfg=SMALL)
    full = train_multilabel(cfg, tiny_bibtex, log=lambda m: None)
    cfg1 = TrainConfig(model="fpi_gd", epochs=1, batch_size=64, model_cfg=SMALL)
    train_multilabel(cfg1, tiny_bibtex, checkpoint=ck, log=lambda m: None)
    assert ck.exists()
    # A checkpoint of other options is refused; the same options continue where it stopped.
    from torchfpi.errors import UsageError

    with pytest.raises(UsageError, match="other options"):
        train_multilabel(TrainConfig(model="fpi_gd", epochs=2, batch_size=64, model_cfg=SMALL, lr=0.1),
                         tiny_bibtex, checkpoint=ck, resume=True, log=lambda m: None)
    ck_state = torch.load(ck, weights_only=True)
    ck_state["config"]["epochs"] = 2
    torch.save(ck_state, ck)
    resumed = train_multilabel(cfg, tiny_bibtex, checkpoint=ck, resume=True, log=lambda m: None)
    assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    assert resumed["history"][1]["loss"] == pytest.approx(full["history"][1]["loss"], rel=1e-4)
    assert resumed["test_f1"] == pytest.approx(full["test_f1"], abs=1e-6)


def test_train_config_errors(tiny_bibtex):
    from torchfpi.errors import UsageError

    with pytest.raises(UsageError, match="--model"):
        train_multilabel(TrainConfig(model="svm"), tiny_bibtex)
    with pytest.raises(UsageError, match="--epochs"):
        train_multilabel(TrainConfig(epochs=0), tiny_bibtex)


def test_cli_train_multilabel(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main([
        "train", "multilabel", "--dataset", "bibtex", "--model", "mlp", "--hidden", "16",
        "--epochs", "1", "--max-steps", "2", "--quiet", "--checkpoint-dir", str(tmp_path),
        "--out", str(out), "--threads", "1",
    ])
    assert code == 0
    assert "test F1" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["model"] == "mlp" and "machine" in res


def test_cli_train_multilabel_anderson(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main([
        "train", "multilabel", "--model", "fpi_gd", "--hidden", "16", "--energy-hidden", "8",
        "--solver", "anderson", "--backward", "anderson", "--epochs", "1", "--max-steps", "2",
        "--quiet", "--checkpoint-dir", str(tmp_path), "--out", str(out), "--threads", "1",
    ])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    mc = res["config"]["model_cfg"]
    assert (mc["solver"], mc["backward"]) == ("anderson", "anderson")
    assert res["train_forward_iterations"] >= 1 and res["train_backward_iterations"] >= 1


def test_cli_usage_errors(tmp_path, capsys):
    code = main(["train", "multilabel", "--train-arff", str(tmp_path / "a.arff")])
    assert code == 2 and "--test-arff" in capsys.readouterr().err
    code = main(["train", "multilabel", "--model", "svm"])
    assert code == 2
    code = main(["train", "multilabel", "--dataset", "bookmarks", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "bookmarks" in err.lower()


def test_demo_smoke(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    code = main(["demo", "--epochs", "1", "--max-steps", "2", "--quiet", "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "test example-based F1" in out and "forward" in out and "backward" in out
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert main(["demo", "--epochs", "0"]) == 2


def test_bounded_energy_contracts_and_validates():
    from torchfpi.energies import MultiLabelEnergy

    cfg = ModelConfig(hidden=16, energy_hidden=8, energy_init_scale=50.0, energy_max_norm=5.0, tol=1e-6)
    model = MultiLabelModel("fpi_gd", 20, 6, cfg)
    with torch.no_grad():
        # far outside the bound: the forward rescales it
        model.energy.C.parametrizations.weight.original.mul_(100.0)
    x = (torch.rand(5, 20) < 0.3).float()
    with torch.no_grad():
        for _ in range(50):  # training-mode calls advance the power iteration
            model._bounded_energy_weights()
        model.eval()
        W, c = model._bounded_energy_weights()
        model(x)
    assert torch.linalg.matrix_norm(W, ord=2) <= 1.0 + 1e-4 and c.norm() <= 5.0 + 1e-5
    assert bool(model.last_solution.converged.all())
    with pytest.raises(ValueError, match="space: expected 'prob' or 'logit', got 'log'"):
        MultiLabelEnergy(4, space="log")
    with pytest.raises(ValueError, match="tau: expected a number > 0, got 0.0"):
        MultiLabelEnergy(4, tau=0.0)
    with pytest.raises(ValueError, match="energy_kind"):
        MultiLabelModel("fpi_gd", 4, 3, ModelConfig(energy_kind="dense"))


def test_the_models_energy_is_the_public_one_in_both_forms():
    from torchfpi.energies import ICNNEnergy, MultiLabelEnergy

    torch.manual_seed(0)
    for kind in ("label", "icnn"):
        model = MultiLabelModel("fpi_gd", 20, 6, ModelConfig(hidden=16, energy_hidden=8, energy_kind=kind))
        assert type(model.energy) is MultiLabelEnergy
    # the convex form: -<z, s> + ICNN(z, x), the ICNN's mu being tau
    energy = MultiLabelEnergy(6, 8, tau=0.5, convex_input=16).double()
    z, s, x = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 16, dtype=torch.float64)
    assert isinstance(energy.icnn, ICNNEnergy) and energy.icnn.mu == 0.5
    torch.testing.assert_close(energy(z, s, x), energy.icnn(z, x) - (z * s).sum(1))
    with pytest.raises(ValueError, match="context: the input-convex energy needs the input x"):
        energy(z, s)
    with pytest.raises(ValueError, match="convex_input: the input-convex interaction term"):
        MultiLabelEnergy(6, convex_input=16, space="logit")
    # the form on y in [0, 1] (logit space, quadratic centred at 1/2), as torchfpi 0.1's class
    box = MultiLabelEnergy(6, 4, tau=2.0, space="logit", center=0.5, init_scale=1.0).double()
    y = torch.rand(3, 6, dtype=torch.float64)
    expected = (-(s * y).sum(1) + torch.nn.functional.softplus(box.C(y)) @ box.c
                + 0.5 * 2.0 * ((y - 0.5) ** 2).sum(1))
    torch.testing.assert_close(box(y, s), expected)


@torch.no_grad()
def test_energy_models_of_torchfpi_0_1_load_with_the_same_function():
    # 0.1 bounded C with its own power iteration: raw ``energy.C.weight`` and a ``_power_u``; the
    # bound was C / max(1, u'^T C v) with v = normalize(C^T u), u' = normalize(C v)
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=16, energy_hidden=8, energy_max_norm=4.0, energy_condition=True)
    for kind in ("spen", "fpi_gd"):
        model = MultiLabelModel(kind, 20, 6, cfg).eval()
        state = {k: v for k, v in model.state_dict().items() if "parametrizations" not in k}
        W = 3.0 * torch.randn(8, 6)
        u = torch.nn.functional.normalize(torch.randn(8), dim=0)
        owners = ("energy.", "layer.energy.") if kind == "fpi_gd" else ("energy.",)
        state.update({o + "C.weight": W for o in owners}, _power_u=u)
        model.load_state_dict(state)
        v = torch.nn.functional.normalize(W.t() @ u, dim=0)
        u2 = torch.nn.functional.normalize(W @ v, dim=0)
        W_bound, _ = model._bounded_energy_weights()
        torch.testing.assert_close(W_bound, W / torch.dot(u2, W @ v).clamp_min(1.0))
    unbounded = MultiLabelModel("fpi_gd", 20, 6, ModelConfig(hidden=16, energy_hidden=8))
    unbounded.load_state_dict({**unbounded.state_dict(), "_power_u": torch.ones(8)})  # dropped


def test_icnn_energy_trains_a_step(tiny_bibtex):
    cfg = TrainConfig(model="fpi_gd", epochs=1, batch_size=32,
                      model_cfg=ModelConfig(hidden=32, energy_hidden=8, energy_kind="icnn"))
    res = train_multilabel(cfg, tiny_bibtex, log=lambda m: None, max_steps=2)
    assert res["train_backward_iterations"] >= 1


@pytest.mark.parametrize("kind", ["fpi_gd", "fpi_nn"])
def test_anderson_solver_and_backward_give_the_fpi_fixed_point_and_gradient(kind):
    torch.manual_seed(0)
    base = dict(hidden=16, energy_hidden=4, update_hidden=8, tol=1e-9, backward_tol=1e-9,
                max_iter=200, backward_max_iter=200, energy_init_scale=2.0, energy_max_norm=4.0)
    x = (torch.rand(5, 20) < 0.3).double()
    outs = []
    for solver in ("fpi", "anderson"):
        torch.manual_seed(1)
        model = MultiLabelModel(kind, 20, 6, ModelConfig(**base, solver=solver, backward=solver)).double().eval()
        z = model(x)
        z.square().sum().backward()
        outs.append((z.detach(), model.unary.hidden.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-6)


def test_update_max_gain_bounds_the_fpi_nn_gain():
    model = MultiLabelModel("fpi_nn", 10, 3, ModelConfig(hidden=8, update_max_gain=1.0))
    with torch.no_grad():
        model.gain_logit.fill_(50.0)
    assert float(model._gain().detach()) <= 1.0
    with pytest.raises(ValueError, match=r"update_max_gain: expected a value in \(0, 4\), got 4.0"):
        MultiLabelModel("fpi_nn", 10, 3, ModelConfig(update_max_gain=4.0))
    small = MultiLabelModel("fpi_nn", 10, 3, ModelConfig(hidden=8, update_max_gain=2.0, update_gain_init=0.02))
    assert abs(float(small._gain().detach()) - 0.04) < 1e-6
    with pytest.raises(ValueError, match=r"update_gain_init: expected a fraction in \(0, 1\), got 1.0"):
        MultiLabelModel("fpi_nn", 10, 3, ModelConfig(update_gain_init=1.0))


def test_tied_fpi_nn_update_uses_the_transposed_input_weights():
    torch.manual_seed(0)
    model = MultiLabelModel("fpi_nn", 10, 3, ModelConfig(hidden=8, update_hidden=5, update_tied=True))
    assert not hasattr(model, "w_b")
    for _ in range(30):  # let spectral norm's power iteration converge, then freeze it
        _ = model.w_a.weight
    model.eval()
    z, s, hu = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 5)
    w = model.w_a.weight  # (5, 3), spectral norm <= 1
    expected = s + model._gain() * torch.tanh(torch.sigmoid(z) @ w.t() + hu) @ w
    torch.testing.assert_close(model._nn_update(z, s, hu), expected)
    # the Jacobian in z is bounded by gain / 4 < 1: the update contracts
    jac = torch.autograd.functional.jacobian(lambda v: model._nn_update(v, s[:1], hu[:1]), z[:1])
    assert float(torch.linalg.matrix_norm(jac.reshape(3, 3), ord=2)) <= float(model._gain().detach()) / 4 + 1e-6


def _load_script(name: str):
    """Import ``scripts/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tuning_folds_partition_the_training_set():
    """scripts/tune_multilabel.py --folds: fold 0 is the grid's validation split; folds are disjoint."""
    import numpy as np

    from torchfpi.data import train_val_split

    tune = _load_script("tune_multilabel")
    n = 4880
    vals = []
    for fold in range(10):
        tr, va = tune.fold_indices(n, fold)
        assert len(va) == 488 and np.array_equal(np.union1d(tr, va), np.arange(n))
        assert len(np.intersect1d(tr, va)) == 0
        vals.append(va)
        if fold == 0:
            assert all(np.array_equal(a, b) for a, b in zip((tr, va), train_val_split(n, 0.1, 0)))
    assert len(np.unique(np.concatenate(vals))) == n  # ten disjoint tenths
    s = tune.validation_splits("bibtex", None, 3)
    assert (len(s.x_train), len(s.x_val)) == (4392, 488)


def test_results_grid_script_keeps_units_and_refuses_mixed_budgets(tmp_path, capsys):
    """scripts/run_multilabel.py on the embedded Bibtex with a 1-epoch budget: JSON keys, markdown
    table, finished units skipped on a rerun, and a different budget refused for the same file."""
    grid = _load_script("run_multilabel")
    out = tmp_path / "grid.json"
    args = ["--datasets", "bibtex", "--models", "mlp", "fpi_gd", "--seeds", "0", "--epochs", "1", "--out", str(out)]
    assert grid.main(args) == 0
    res = json.loads(out.read_text())
    assert res["budget"]["epochs"] == 1
    for model in ("mlp", "fpi_gd"):
        entry = res["bibtex"][model]
        assert set(entry["runs"]) == {"0"} and 0.0 < entry["test_f1_mean"] < 100.0
    assert res["bibtex"]["fpi_gd"]["runs"]["0"]["train_forward_iterations"] > 0
    assert "| bibtex | fpi_gd |" in out.with_suffix(".md").read_text()
    capsys.readouterr()
    assert grid.main(args) == 0
    assert capsys.readouterr().out.count("skip bibtex/") == 2
    assert json.loads(out.read_text())["bibtex"]["mlp"]["runs"] == res["bibtex"]["mlp"]["runs"]
    with pytest.raises(SystemExit):
        grid.main([a if a != "1" else "2" for a in args])
    assert "holds runs of budget" in capsys.readouterr().err


def test_load_multilabel_model_gives_the_best_validated_model(tmp_path, tiny_bibtex):
    from torchfpi.apps.multilabel import load_multilabel_model

    ck = tmp_path / "run.pt"
    cfg = TrainConfig(model="fpi_gd", epochs=2, batch_size=64, model_cfg=SMALL)
    res = train_multilabel(cfg, tiny_bibtex, checkpoint=ck, log=lambda m: None)
    model, info = load_multilabel_model(ck)
    assert not model.training and info["threshold"] == res["threshold"] and info["epoch"] == res["best_epoch"]
    prob = torch.sigmoid(model(tiny_bibtex.x_test)).detach()
    f1 = 100 * float(example_f1(prob >= info["threshold"], tiny_bibtex.y_test).mean())
    assert f1 == pytest.approx(res["test_f1"], abs=1e-6)
    assert (ck.with_suffix(".jsonl")).read_text().count("\n") == len(res["history"])  # the JSON-lines log
