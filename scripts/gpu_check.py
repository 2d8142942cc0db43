#!/usr/bin/env python3
"""CUDA correctness checks and GPU timings of torchfpi, in under 5 minutes.

Prepared for a session with a GPU; runs anywhere with ``--device cpu`` (to prove it works).

    python scripts/gpu_check.py                        # CUDA: checks + timings -> $OUT or benchmarks/results/gpu
    python scripts/gpu_check.py --device cpu --quick   # the same code path on the CPU, tiny sizes

Part 1 (correctness, float32 and float64 on the device, each compared with a float64 CPU
reference): forward solve, gradients of every exact backward mode, compaction, a double
backward, FPI_GD with autograd inside f, errors raised on the device, ``cuda_graph=True`` against
the eager loop on the DEQ problems. Part 2 (timings): ``cuda_graph`` against the eager loop, then the
benchmark harness (``torchfpi.bench``) on the device with wall-clock timing synchronised
after every half, CUDA peak memory, and the memory sweep. Writes ``gpu_check.json`` plus
the harness's ``results.json``/``results.md`` and exits 1 if a correctness check fails.
Each part stops early if ``--budget-s`` would be exceeded (the JSON records what ran).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

import torchfpi
from torchfpi.bench import Config, build, gradient_error, reference_gradients, run_benchmark


def _check(results: List[Dict[str, Any]], name: str, fn: Callable[[], Dict[str, Any]]) -> None:
    t0 = time.perf_counter()
    try:
        info = fn()
        ok = bool(info.pop("ok"))
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, then the next check runs
        ok, info = False, {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc(limit=3)}
    info.update(name=name, ok=ok, seconds=round(time.perf_counter() - t0, 3))
    results.append(info)
    print(f"[{'ok' if ok else 'FAIL'}] {name} ({info['seconds']:.1f} s) "
          + ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("name", "ok", "seconds", "trace")),
          flush=True)


def correctness(device: torch.device, quick: bool) -> List[Dict[str, Any]]:
    """Checks on tiny problems (all four) and, unless ``quick``, the full-size mlp and conv."""
    results: List[Dict[str, Any]] = []
    cpu = torch.device("cpu")

    def grads_vs_reference(problem: str, dtype: torch.dtype, limit: float, small: bool = True) -> Callable[[], Dict[str, Any]]:
        def fn() -> Dict[str, Any]:
            ref, _ = reference_gradients(build(problem, quick=small, dtype=torch.float64, device=cpu))
            inst = build(problem, quick=small, dtype=dtype, device=device)
            tol = 1e-5 if dtype == torch.float32 else 1e-11
            errors = {}
            # Unrolling *through Anderson* differentiates the mixing weights: not a gradient
            # method (it can be far off on projected maps), so it is left out here.
            for solver, mode in (("fpi", "fpi"), ("fpi", "anderson"), ("anderson", "fpi"),
                                 ("anderson", "anderson"), ("fpi", "unroll"), ("broyden", "fpi"),
                                 ("broyden", "broyden")):
                sol = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, solver=solver, backward=mode,
                                           tol=tol, max_iter=2000, on_failure="raise")
                assert sol.value.device.type == device.type
                g = torch.autograd.grad((sol.value * inst.weight).sum(), inst.params)
                assert all(t.device.type == device.type for t in g)
                errors[f"{solver}/{mode}"] = gradient_error(g, ref)
            worst = max(errors.values())
            return {"ok": worst < limit, "worst_error": f"{worst:.1e}", "limit": limit,
                    "errors": {k: f"{v:.1e}" for k, v in errors.items()}}
        return fn

    for problem in ("mlp", "conv", "multilabel", "mixed"):
        _check(results, f"{problem} (tiny) float32 gradients vs float64 CPU reference",
               grads_vs_reference(problem, torch.float32, 2e-3))
    _check(results, "mlp (tiny) float64 gradients vs float64 CPU reference",
           grads_vs_reference("mlp", torch.float64, 1e-8))
    if not quick:
        for problem in ("mlp", "conv"):
            _check(results, f"{problem} (full size) float32 gradients vs float64 CPU reference",
                   grads_vs_reference(problem, torch.float32, 2e-3, small=False))

    def compaction() -> Dict[str, Any]:
        inst = build("mixed", quick=True, device=device)
        a = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, tol=1e-5, max_iter=1000, compact=True,
                                 per_sample=inst.sample_inputs)
        b = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, tol=1e-5, max_iter=1000, compact=False)
        ga = torch.autograd.grad((a.value * inst.weight).sum(), inst.params)
        gb = torch.autograd.grad((b.value * inst.weight).sum(), inst.params)
        same_it = bool(torch.equal(a.iterations, b.iterations))
        diff = float((a.value - b.value).detach().abs().max())
        err = gradient_error(ga, gb)
        return {"ok": same_it and diff < 1e-5 and err < 1e-4 and bool(a.converged.all()),
                "same_iterations": same_it, "value_diff": f"{diff:.1e}", "grad_diff": f"{err:.1e}",
                "iterations": f"{int(a.iterations.min())}..{int(a.iterations.max())}"}

    _check(results, "compaction gives the per-sample result of the full batch", compaction)

    def double_backward() -> Dict[str, Any]:
        def second(dev: torch.device) -> torch.Tensor:
            x = torch.linspace(-1, 1, 6, dtype=torch.float64, device=dev).reshape(2, 3).requires_grad_(True)
            sol = torchfpi.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros_like(x), x,
                                       tol=1e-12, max_iter=500)
            (g,) = torch.autograd.grad(sol.value.pow(2).sum(), x, create_graph=True)
            (h,) = torch.autograd.grad(g.sum(), x)
            return h.cpu()

        a, b = second(device), second(cpu)
        diff = float((a - b).abs().max() / b.abs().max())
        return {"ok": diff < 1e-8, "relative_diff": f"{diff:.1e}"}

    _check(results, "double backward on the device matches the CPU", double_backward)

    def fpigd_layer() -> Dict[str, Any]:
        from torchfpi.energies import MultiLabelEnergy

        layer = torchfpi.FPIGD(MultiLabelEnergy(12, 4, space="logit", center=0.5), step_size=0.1, projection="box",
                               init=lambda s: torch.full_like(s, 0.5), tol=1e-5, max_iter=500).to(device)
        s = torch.randn(8, 12, device=device, requires_grad=True)
        y = layer(s)
        y.sum().backward()
        grads_ok = s.grad is not None and all(p.grad is not None for p in layer.parameters() if p.requires_grad)
        return {"ok": bool(layer.last_solution.converged.all()) and grads_ok and y.device.type == device.type,
                "iterations": int(layer.last_solution.iterations.max())}

    _check(results, "FPIGD layer (autograd inside f) on the device", fpigd_layer)

    def errors_on_device() -> Dict[str, Any]:
        z0 = torch.zeros(2, 3, device=device)
        try:
            torchfpi.fixed_point(lambda z: z + float("nan"), z0)
        except torchfpi.FixedPointError as exc:
            nan_ok = "NaN" in str(exc)
        else:
            nan_ok = False
        try:
            torchfpi.fixed_point(lambda z: 1.5 * z + 1, z0, max_iter=20, on_failure="raise")
        except torchfpi.FixedPointError:
            raise_ok = True
        else:
            raise_ok = False
        return {"ok": nan_ok and raise_ok, "nan_raises": nan_ok, "divergence_raises": raise_ok}

    _check(results, "NaN and non-convergence raise on the device", errors_on_device)

    def cuda_graph_matches_eager() -> Dict[str, Any]:
        if device.type != "cuda":
            return {"ok": True, "skipped": "cuda_graph needs a CUDA device"}
        out: Dict[str, Any] = {}
        ok = True
        for problem in ("deq_small", "deq"):
            inst = build(problem, quick=quick, device=device)
            sols, grads = [], []
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for graph in (False, True):
                    sol = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, tol=1e-6, max_iter=500,
                                               on_failure="ignore", cuda_graph=graph)
                    sols.append(sol)
                    grads.append(torch.autograd.grad((sol.value * inst.weight).sum(), inst.params))
            fell_back = any("could not be captured" in str(w.message) for w in caught)
            same_it = bool(torch.equal(sols[0].iterations, sols[1].iterations))
            diff = float((sols[0].value - sols[1].value).abs().max())
            err = gradient_error(grads[1], grads[0])
            ok &= same_it and not fell_back and diff <= 1e-6 and err <= 1e-6
            out[problem] = {"same_iterations": same_it, "value_diff": f"{diff:.1e}", "grad_diff": f"{err:.1e}",
                            "fell_back": fell_back}
        return {"ok": ok, **out}

    _check(results, "cuda_graph=True gives the eager results (deq, deq_small)", cuda_graph_matches_eager)

    return results


def graph_timings(device: torch.device, quick: bool, repeats: int) -> Dict[str, Any]:
    """Forward + backward wall time (synchronised) with and without ``cuda_graph``, interleaved,
    on the DEQ bench problems; medians in ms and their paired ratio."""
    import statistics

    out: Dict[str, Any] = {}
    for problem in ("deq_small", "deq"):
        inst = build(problem, quick=quick, device=device)
        times: Dict[str, List[float]] = {"eager": [], "cuda_graph": []}

        def once(graph: bool, inst: Any = inst) -> float:
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            sol = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, tol=1e-6, max_iter=500,
                                       on_failure="ignore", cuda_graph=graph)
            torch.autograd.grad((sol.value * inst.weight).sum(), inst.params)
            torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        for graph in (False, True):
            once(graph)  # warm-up
        for rep in range(max(repeats, 3) * 3):
            for graph in ((False, True) if rep % 2 == 0 else (True, False)):
                times["cuda_graph" if graph else "eager"].append(once(graph))
        paired = statistics.median(g / e for g, e in zip(times["cuda_graph"], times["eager"]))
        out[problem] = {"eager_ms": 1e3 * statistics.median(times["eager"]),
                        "cuda_graph_ms": 1e3 * statistics.median(times["cuda_graph"]),
                        "cuda_graph_over_eager_paired": paired}
        print(f"cuda_graph timings {problem}: {out[problem]}", flush=True)
    return out


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="device to check (default cuda)")
    p.add_argument("--quick", action="store_true", help="tiny problem sizes")
    p.add_argument("--out", default=None, help="output folder (default $OUT/gpu_check or benchmarks/results/gpu)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new work after this many seconds")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip-timings", action="store_true")
    args = p.parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    # On the CPU one thread (a shared machine); on CUDA leave torch's default.
    threads = 1 if device.type == "cpu" else None
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else (Path(os.environ["OUT"]) / "gpu_check" if os.environ.get("OUT")
                                           else Path("benchmarks/results/gpu"))
    out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"device": str(device), "command": " ".join(sys.argv),
                              "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                              "torch": torch.__version__, "torchfpi": torchfpi.__version__}
    report["checks"] = correctness(device, args.quick)
    report["correctness_seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    if device.type == "cuda" and not args.skip_timings:
        try:
            report["cuda_graph_timings"] = graph_timings(device, args.quick, args.repeats)
        except Exception as exc:  # noqa: BLE001 - keep the rest of the report
            report["cuda_graph_timings_error"] = f"{type(exc).__name__}: {exc}"
    left = args.budget_s - (time.perf_counter() - start)
    if not args.skip_timings and left > 30:
        problems = ("deq", "deq_small", "mlp", "conv", "mixed", "multilabel")
        t0 = time.perf_counter()
        try:
            res: Dict[str, Any] = {}
            # One problem per call (finished ones are kept through resume), so the budget is
            # checked between problems; the memory sweep comes last.
            for i in range(len(problems)):
                if time.perf_counter() - start > args.budget_s - 20:
                    report["timings_cut"] = f"budget reached before {problems[i]}"
                    break
                last = i == len(problems) - 1
                cfg = (Config.quick_config if args.quick else Config)(
                    device=str(device), repeats=args.repeats, threads=threads,
                    sweep=((10, 50, 100, 200) if not args.quick else (5, 10)), problems=problems[: i + 1],
                )
                res = run_benchmark(cfg, out, resume=True, sweep=last, make_plots=last,
                                    command=report["command"], progress=lambda m: print(m, flush=True))
            report["timings"] = {n: {"ratio_vs_torchdeq": r.get("ratio_vs_torchdeq"), "f_ms": r["f_ms"],
                                     "methods": {m: {k: v[k] for k in ("total_ms", "over_floor", "grad_rel_error",
                                                                        "peak_memory_mb")}
                                                 for m, v in r["methods"].items()}}
                                 for n, r in res["problems"].items()}
            report["claims"] = res["claims"]
        except Exception as exc:  # noqa: BLE001 - keep the correctness report
            report["timings_error"] = f"{type(exc).__name__}: {exc}"
        report["timing_seconds"] = round(time.perf_counter() - t0, 1)
    else:
        report["timings_skipped"] = f"budget left {left:.0f} s"
    report["total_seconds"] = round(time.perf_counter() - start, 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    print(f"{len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed; "
          f"{report['total_seconds']} s; wrote {out / 'gpu_check.json'}")
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
