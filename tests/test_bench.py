"""Tests of the benchmark harness (quick mode on tiny problems)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from torchfpi.bench import PROBLEMS, Config, build, methods, run_benchmark
from torchfpi.bench._harness import gradient_error, peak_memory_bytes, reference_gradients
from torchfpi.bench._peers import relative_residual
from torchfpi.cli import main

GRAD_TOL = 1e-3
"""Relative gradient error allowed for exact modes at tol=1e-5 in float32 on the tiny problems."""


@pytest.mark.parametrize("name", PROBLEMS)
def test_problems_are_deterministic_contractions(name):
    a = build(name, quick=True, dtype=torch.float64)
    b = build(name, quick=True, dtype=torch.float32)
    assert torch.equal(a.weight.float(), b.weight)
    for x, y in zip(a.inputs, b.inputs):
        assert torch.allclose(x.float(), y)
    with torch.no_grad():
        z = a.z0
        for _ in range(400):
            z = a.f(z, *a.inputs)
        assert float(relative_residual(a.f(z, *a.inputs), z).max()) < 1e-10


def test_build_rejects_unknown_names():
    with pytest.raises(ValueError, match="problem: expected one of"):
        build("nope", quick=True)
    with pytest.raises(ValueError, match="unknown size 'width'"):
        build("mlp", quick=True, overrides={"width": 3})


def test_reference_gradient_matches_dense_solve():
    """The float64 reference agrees with a dense per-sample linear solve (mlp, tiny)."""
    inst = build("mlp", quick=True, dtype=torch.float64)
    ref, info = reference_gradients(inst)
    assert info["forward_residual"] < 1e-12 and info["adjoint_residual"] < 1e-12
    with torch.no_grad():
        z = inst.z0
        for _ in range(500):
            z = inst.f(z, *inst.inputs)
    b, n = z.shape
    zd = z.clone().requires_grad_(True)
    y = inst.f(zd, *inst.inputs)
    J = torch.stack([torch.autograd.grad(y[:, i].sum(), zd, retain_graph=True)[0] for i in range(n)], 1)  # (B, n, n)
    u = torch.linalg.solve(torch.eye(n, dtype=z.dtype) - J.transpose(1, 2), inst.weight.unsqueeze(2)).squeeze(2)
    dense = torch.autograd.grad(y, inst.params, u)
    assert gradient_error(ref, dense) < 1e-10


def test_every_method_runs_and_exact_modes_agree():
    inst = build("mlp", quick=True)
    ref, _ = reference_gradients(build("mlp", quick=True, dtype=torch.float64))
    errors = {}
    for m in methods():
        if m.opt_in:
            continue  # compiled maps: test_compiled_map_method
        run = m.run(inst, 1e-5, 300)
        grads = torch.autograd.grad((run.value * inst.weight).sum(), inst.params, allow_unused=True)
        fwd, bwd = run.counts()
        assert fwd >= 1 and bwd >= 0
        errors[m.name] = gradient_error(grads, ref)
    for m in methods():
        if m.exact and not m.opt_in:
            assert errors[m.name] < GRAD_TOL, (m.name, errors[m.name])
    assert errors["torchfpi fpi/onestep"] > 10 * errors["torchfpi fpi/fpi"]


def test_peak_memory_counts_allocations():
    def fn():
        return torch.empty(1 << 20, dtype=torch.float32).fill_(1.0)  # 4 MiB

    peak = peak_memory_bytes(fn, torch.device("cpu"))
    assert 4 * 2**20 <= peak < 8 * 2**20


def test_quick_benchmark_writes_results(tmp_path):
    cfg = Config.quick_config(
        problems=("mlp", "mixed"),
        methods=("torchfpi fpi/fpi", "torchfpi anderson/fpi", "torchfpi fpi/fpi compact",
                 "autograd unrolled", "torchdeq fpi/implicit"),
        repeats=1,
        sweep=(3, 6),
    )
    res = run_benchmark(cfg, tmp_path, make_plots=True, command="test")
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["versions"]["torchdeq"] == "0.1.0"
    assert "commit" in data["machine"] and data["load_average_before"] is not None
    mlp = data["problems"]["mlp"]
    assert set(mlp["methods"]) == set(cfg.methods)  # named explicitly: compact runs on mlp too
    assert math.isfinite(mlp["ratio_vs_torchdeq"])
    for rec in mlp["methods"].values():
        assert rec["max_residual"] < cfg.tol and rec["all_met_tol"]
        assert rec["floor_ms"] > 0 and rec["peak_memory_mb"] > 0
    assert "torchfpi fpi/fpi compact" in data["problems"]["mixed"]["methods"]
    assert [c["number"] for c in res["claims"]] == [1, 2, 3, 4, 5, 6, 7]
    assert (tmp_path / "results.md").read_text().startswith("# torchfpi benchmark")
    assert (tmp_path / "memory_sweep.png").exists() and (tmp_path / "time.png").exists()
    # Rerun with resume: finished problems are kept, not recomputed.
    again = run_benchmark(cfg, tmp_path, resume=True, sweep=False, make_plots=False, command="test")
    assert again["problems"]["mlp"]["methods"]["torchfpi fpi/fpi"]["total_ms_all"] == \
        mlp["methods"]["torchfpi fpi/fpi"]["total_ms_all"]


def test_cli_bench_quick(tmp_path, capsys):
    rc = main(["bench", "--quick", "--problems", "mlp", "--methods", "torchfpi fpi/fpi,torchdeq fpi/implicit",
               "--repeats", "1", "--sweep", "none", "--no-plots", "--quiet", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "ratio_vs_torchdeq" in out and "claim 1:" in out
    assert (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--problems", "foo"], "--problems: unknown"),
        (["--methods", "magic"], "--methods: unknown"),
        (["--repeats", "0"], "--repeats: expected an integer >= 1"),
        (["--tol", "-1"], "--tol: expected a positive number"),
        (["--sweep", "a,b"], "--sweep: expected comma-separated integers"),
    ],
)
def test_cli_bench_usage_errors(argv, message, capsys, tmp_path):
    rc = main(["bench", "--quick", "--out", str(tmp_path), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_cli_bench_list(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert "torchdeq fpi/implicit" in out and "mixed" in out


def test_deq_sizes_plain_loop_peer_and_speed_verdict(tmp_path):
    cfg = Config.quick_config(problems=("deq", "deq_small"),
                              methods=("torchfpi fpi/fpi", "plain loop (batch-wide stop)", "torchfpi broyden/fpi",
                                       "bare iterations (no convergence test)"),
                              repeats=2, sweep=())
    res = run_benchmark(cfg, None, sweep=False, make_plots=False, command="test")
    for name in ("deq", "deq_small"):
        ms = res["problems"][name]["methods"]
        assert set(ms) == set(cfg.methods)
        for rec in ms.values():
            assert rec["all_met_tol"] and rec["grad_rel_error"] < GRAD_TOL
        plain, bare = ms["plain loop (batch-wide stop)"], ms["bare iterations (no convergence test)"]
        # the bare row runs the plain loop's iteration counts, without any test
        assert (bare["forward_iterations"], bare["backward_iterations"]) == (
            plain["forward_iterations"], plain["backward_iterations"])
    verdict = [c for c in res["claims"] if c["number"] == 7][0]
    assert set(verdict["values"]) == {"deq", "deq_small"} and verdict["holds"] in (True, False)
    assert "paired median" in verdict["detail"] and "bare iterations" in verdict["detail"]
    assert all("bare_over_floor" in v for v in verdict["values"].values())


@pytest.mark.parametrize("name", ["torchfpi fpi/fpi compiled f (aot_eager)", "torchfpi fpi/fpi batch stop"])
def test_opt_in_methods_run_only_when_named_and_are_exact(name):
    # The compiled-f rows (compiling costs seconds; aot_eager keeps it cheap) and the batch-stop
    # row run only when named in --methods; each gives the reference gradient.
    from torchfpi.bench._harness import select_methods
    from torchfpi.bench._peers import BATCH_STOP, COMPILED_AOT

    assert name in (COMPILED_AOT, BATCH_STOP)
    inst = build("deq_small", quick=True, dtype=torch.float64)
    ref, _ = reference_gradients(inst)
    assert name not in [m.name for m in select_methods(Config.quick_config(), inst, methods())]
    m = next(m for m in methods() if m.name == name)
    run = m.run(inst, 1e-10, 300)
    grads = torch.autograd.grad((run.value * inst.weight).sum(), inst.params, allow_unused=True)
    assert gradient_error(grads, ref) < 1e-8


def test_time_solve_parts_script_runs_and_refuses_bad_counts():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_solve_parts.py"
    done = subprocess.run([sys.executable, str(script), "--problem", "deq_small", "--solves", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "backward with the in-place sum / without" in done.stdout
    assert done.stdout.count("last window's per-sample results") == 2
    bad = subprocess.run([sys.executable, str(script), "--solves", "0"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--solves: expected a positive integer, got 0" in bad.stderr
