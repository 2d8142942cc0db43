"""The benchmark harness: torchfpi against TorchDEQ 0.1.0 and plain autograd on the same problems.

Run it with ``torchfpi bench`` (see ``docs/bench.md``) or from Python::

    from torchfpi.bench import Config, run_benchmark
    results = run_benchmark(Config.quick_config(), out_dir="benchmarks/results/quick")

It writes ``results.json`` (machine, versions, commit, load average, per problem and method:
times, iterations, floor, overhead, peak memory, gradient error; ``ratio_vs_torchdeq``),
``results.md`` and plots, and checks the issue's claims (``results["claims"]``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

import torch

from torchfpi.bench._harness import (
    Claim,
    Config,
    evaluate_claims,
    gradient_error,
    memory_sweep,
    reference_gradients,
    run_problem,
)
from torchfpi.bench._peers import Method, methods
from torchfpi.bench._problems import PROBLEMS, Instance, build

__all__ = [
    "Claim", "Config", "Instance", "Method", "PROBLEMS", "build", "gradient_error", "methods",
    "reference_gradients", "run_benchmark",
]  # fmt: skip


def _load() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def _versions() -> Dict[str, str]:
    import numpy

    import torchfpi

    out = {"torchfpi": torchfpi.__version__, "torch": torch.__version__, "numpy": numpy.__version__}
    try:
        out["torchdeq"] = importlib.metadata.version("torchdeq")
    except Exception:  # noqa: BLE001 - not installed
        out["torchdeq"] = "not installed"
    return out


def run_benchmark(
    cfg: Config,
    out_dir: Union[str, Path, None] = None,
    *,
    resume: bool = False,
    with_torchdeq: Optional[bool] = None,
    sweep: bool = True,
    make_plots: bool = True,
    command: Optional[str] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Run the benchmark described by ``cfg``; write JSON, markdown and plots to ``out_dir``.

    Args:
        cfg: what to run.
        out_dir: output folder (created); ``None`` writes nothing.
        resume: keep problems already in ``out_dir/results.json`` with the same settings.
        with_torchdeq: include TorchDEQ (default: if it is importable).
        sweep: run the memory-versus-iterations sweep.
        make_plots: write PNG figures (needs matplotlib).
        command: the command line to record (default ``sys.argv``).
        progress: called with a short message after each unit of work.

    Returns:
        The results dictionary (as written to ``results.json``).
    """
    from torchfpi.bench._report import markdown, plots
    from torchfpi.io import atomic_write_json, read_json
    from torchfpi.runtime import machine_info

    if with_torchdeq is None:
        try:
            importlib.import_module("torchdeq")
            with_torchdeq = True
        except ImportError:
            with_torchdeq = False
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    available = methods(include_torchdeq=with_torchdeq)
    out = Path(out_dir) if out_dir is not None else None
    previous: Dict[str, Any] = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            previous = read_json(out / "results.json", default={}) or {}
    results: Dict[str, Any] = {
        "command": command or " ".join(["torchfpi" if sys.argv[0].endswith("torchfpi") else sys.argv[0], *sys.argv[1:]]),
        "machine": machine_info(),
        "versions": _versions(),
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(cfg).items()},
        "load_average_before": _load(),
        "problems": {},
    }

    def save() -> None:
        if out is not None:
            atomic_write_json(results, out / "results.json")

    for name in cfg.problems:
        old = previous.get("problems", {}).get(name)
        if old is not None and old.get("fingerprint") == cfg.fingerprint(name):
            results["problems"][name] = old
            if progress:
                progress(f"{name}: kept from the previous run")
            continue
        results["problems"][name] = run_problem(name, cfg, available, progress)
        save()
    if sweep and cfg.sweep:
        old = previous.get("memory_sweep")
        if old is not None and old.get("K") == list(cfg.sweep) and old.get("quick") == cfg.quick:
            results["memory_sweep"] = old
        else:
            results["memory_sweep"] = memory_sweep(cfg, available)
            results["memory_sweep"]["quick"] = cfg.quick
        if progress:
            progress("memory sweep done")
    results["load_average_after"] = _load()
    results["claims"] = [vars(c) for c in evaluate_claims(results["problems"], results.get("memory_sweep"), cfg.tol)]
    save()
    if out is not None:
        (out / "results.md").write_text(markdown(results))
        if make_plots:
            results["plots"] = [p.name for p in plots(results, out)]
            save()
    return results
