#!/usr/bin/env python3
"""Run every multi-label model on Bibtex and Delicious over 3 seeds; write results/multilabel.json.

Each finished (dataset, model, seed) unit is stored in the JSON as soon as it finishes and is
skipped on a rerun, so the grid can be run across several sittings. The markdown table
(results/multilabel.md) is rewritten from the JSON after every unit.

    nohup nice -n 5 python scripts/run_multilabel.py > logs/multilabel.log 2>&1 &

All models share the budget below (epoch cap, early-stopping patience, batch size, optimiser)
and the same validation split; epoch and threshold are chosen on validation; each run
evaluates the test split once.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from torchfpi.apps.multilabel import TrainConfig, make_splits, train_multilabel
from torchfpi.apps.multilabel.recipes import BUDGET, MODEL_OPTIONS, model_config
from torchfpi.data import load_multilabel
from torchfpi.io import atomic_write_bytes, atomic_write_json, read_json
from torchfpi.runtime import machine_info

DATASETS = ("bibtex", "delicious")
MODELS = ("mlp", "spen", "fpi_nn", "fpi_gd")
SEEDS = (0, 1, 2)

PAPER = {"bibtex": {"mlp": 38.9, "spen": 42.2, "fpi_nn": 43.4, "fpi_gd": 43.2}}


def summarise(runs: Dict[str, Any]) -> Dict[str, Any]:
    """Mean/std over seeds of one (dataset, model)."""
    vals = [r["test_f1"] for r in runs.values()]

    def mean(key: str) -> Any:
        xs = [r[key] for r in runs.values() if r.get(key) is not None]
        return sum(xs) / len(xs) if xs else None

    m = sum(vals) / len(vals)
    std = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {
        "test_f1_mean": m,
        "test_f1_std": std,
        "val_f1_mean": mean("val_f1"),
        "seeds": sorted(int(s) for s in runs),
        "epoch_s_mean": mean("epoch_s_mean"),
        "epoch_cpu_s_mean": mean("epoch_cpu_s_mean"),
        "epochs_run_mean": mean("epochs_run"),
        "train_forward_iterations_mean": mean("train_forward_iterations"),
        "train_backward_iterations_mean": mean("train_backward_iterations"),
        "test_forward_iterations_mean": mean("test_forward_iterations"),
    }


def write_markdown(results: Dict[str, Any], path: Path) -> None:
    lines: List[str] = [
        "# Multi-label classification: example-based F1 (%) on the test split",
        "",
        "Command: `python scripts/run_multilabel.py` (resumable; invocations that filled this file: "
        + ", ".join(f"`{c}`" for c in results.get("commands", [results["command"]])) + ")",
        "",
        f"Machine: {results['machine'].get('cpu_model', results['machine'].get('processor'))}, "
        f"torch {results['machine']['torch']}, {results['threads']} thread(s). "
        "Mean ± std over the seeds listed; epoch and threshold chosen on a 10% validation split "
        "of the training set; the test split is evaluated once per run.",
        "",
        "| dataset | model | test F1 | seeds | val F1 | s/epoch | CPU s/epoch | epochs | fwd iters | bwd iters | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v: Any, d: int = 1) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    for ds in DATASETS:
        for model in MODELS:
            s = results.get(ds, {}).get(model)
            if not s or "test_f1_mean" not in s:
                continue
            lines.append(
                f"| {ds} | {model} | {s['test_f1_mean']:.2f} ± {s['test_f1_std']:.2f} | "
                f"{','.join(map(str, s['seeds']))} | {fmt(s['val_f1_mean'], 2)} | "
                f"{fmt(s['epoch_s_mean'])} | {fmt(s.get('epoch_cpu_s_mean'))} | {fmt(s['epochs_run_mean'])} | "
                f"{fmt(s['train_forward_iterations_mean'])} | "
                f"{fmt(s['train_backward_iterations_mean'])} | "
                f"{fmt(PAPER.get(ds, {}).get(model))} |"
            )
    timing = results.get("timing", {})
    if timing:
        lines += ["", "Training step time (median ms per batch of 128, models interleaved step by step "
                  "on the same machine, after warm-up):", "",
                  "| dataset | " + " | ".join(MODELS) + " |", "|---|" + "---|" * len(MODELS)]
        for ds, t in timing.items():
            lines.append(f"| {ds} | " + " | ".join(f"{t[m]['step_s_median'] * 1e3:.0f}" for m in MODELS) + " |")
    lines += [
        "",
        "fwd/bwd iters: mean forward and backward fixed-point iterations per training batch "
        "(SPEN always runs its unrolled steps). paper: the FPI paper's reported numbers "
        "(MLP and SPEN from the SPEN paper), not measured here.",
        "",
    ]
    atomic_write_bytes(path, "\n".join(lines).encode())


def time_models(data: Any, dataset: str, steps: int = 20, batch_size: int = 128) -> Dict[str, Any]:
    """Median seconds per training step (forward + backward + Adam) of each model on one batch size.

    The models take turns step by step, so that the load of a shared machine affects them alike;
    the models are freshly initialised (FPI iteration counts grow during training, so the grid's
    per-epoch times are the numbers that matter; this table only removes the machine's load).
    """
    from torchfpi.apps.multilabel import MultiLabelModel
    from torchfpi.apps.multilabel.train import multilabel_loss

    torch.manual_seed(0)
    models, opts = {}, {}
    for name in MODELS:
        models[name] = MultiLabelModel(name, data.x_train.shape[1], data.y_train.shape[1], model_config(name))
        opts[name] = torch.optim.Adam(models[name].parameters(), lr=BUDGET["lr"])
    times: Dict[str, List[float]] = {name: [] for name in MODELS}
    n = data.x_train.shape[0]
    for step in range(steps + 2):  # the first two steps warm up
        idx = torch.randint(0, n, (batch_size,))
        x, y = data.x_train[idx], data.y_train[idx]
        for name in MODELS:
            t0 = time.perf_counter()
            loss = multilabel_loss(models[name](x), y, BUDGET["f1_weight"])
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {"step_s_median": sorted(t)[len(t) // 2], "steps": len(t), "batch_size": batch_size}
        for name, t in times.items()
    }


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    p.add_argument("--out", default="results/multilabel.json")
    p.add_argument("--redo", nargs="+", default=[], choices=MODELS, metavar="MODEL",
                   help="discard these models' finished runs on --datasets first (after a recipe change)")
    p.add_argument("--retime", action="store_true",
                   help="measure the interleaved training-step times of --datasets again (all models)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    p.add_argument("--epochs", type=int, default=None,
                   help=f"epoch cap (default: the recipes' {BUDGET['epochs']}); smaller for smoke runs, "
                        "into another --out: a file holds runs of one budget only")
    args = p.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        p.error(f"--epochs: expected >= 1, got {args.epochs}")
    budget = BUDGET if args.epochs is None else {**BUDGET, "epochs": args.epochs}
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: Dict[str, Any] = read_json(out, default={}) or {}
    has_runs = any(entry.get("runs") for ds in DATASETS for entry in results.get(ds, {}).values())
    if has_runs and results.get("budget") not in (None, budget):
        p.error(f"--out: {out} holds runs of budget {results['budget']}, this run's budget is {budget}: "
                "use another --out")
    results["command"] = "python scripts/run_multilabel.py" + (" " + " ".join(argv) if argv else "")
    results.setdefault("commands", [])
    if results["command"] not in results["commands"]:
        results["commands"].append(results["command"])
    results["machine"] = machine_info()
    results["threads"] = args.threads
    results["budget"] = budget
    results["model_options"] = MODEL_OPTIONS
    for ds in args.datasets:
        for model in args.redo:
            if model in results.get(ds, {}):
                print(f"redo {ds}/{model}: its {len(results[ds][model].get('runs', {}))} finished runs discarded")
                del results[ds][model]
                on_disk = read_json(out, default={}) or {}
                on_disk.get(ds, {}).pop(model, None)
                atomic_write_json(on_disk, out)
        data = None
        for seed in args.seeds:
            for model in args.models:
                entry = results.setdefault(ds, {}).setdefault(model, {})
                runs = entry.setdefault("runs", {})
                if str(seed) in runs:
                    print(f"skip {ds}/{model}/seed {seed}: done", flush=True)
                    continue
                if data is None:
                    train = load_multilabel(ds, "train", root=args.data_root)
                    test = load_multilabel(ds, "test", root=args.data_root)
                    data = make_splits(train, test)
                cfg = TrainConfig(dataset=ds, model=model, seed=seed, **budget,
                                  model_cfg=model_config(model))
                t0 = time.perf_counter()
                res = train_multilabel(cfg, data, log=lambda m: print(m, flush=True))
                res["wall_s"] = time.perf_counter() - t0
                res.pop("machine", None)
                # Merge this unit into the file as it is now, so that runs over other
                # (dataset, model) pairs may go on in parallel processes.
                results = {**(read_json(out, default={}) or {}),
                           **{k: results[k] for k in ("command", "machine", "threads", "budget", "model_options")}}
                results["commands"] = sorted(set(results.get("commands", [])) | {results["command"]})
                entry = results.setdefault(ds, {}).setdefault(model, {})
                runs = entry.setdefault("runs", {})
                runs[str(seed)] = res
                entry.update(summarise(runs))
                atomic_write_json(results, out)
                write_markdown(results, out.with_suffix(".md"))
                print(f"done {ds}/{model}/seed {seed}: test F1 {res['test_f1']:.2f} "
                      f"({res['wall_s']:.0f} s)", flush=True)
        timing = results.setdefault("timing", {})
        if (ds not in timing or args.retime) and set(args.models) == set(MODELS):
            if data is None:
                data = make_splits(load_multilabel(ds, "train", root=args.data_root),
                                   load_multilabel(ds, "test", root=args.data_root))
            timing[ds] = time_models(data, ds)
            atomic_write_json(results, out)
            write_markdown(results, out.with_suffix(".md"))
            print(f"timing {ds}: " + ", ".join(f"{k} {v['step_s_median'] * 1e3:.0f} ms/step"
                                               for k, v in timing[ds].items()), flush=True)
    # Keep the table in sync even when every unit was skipped.
    atomic_write_json(copy.deepcopy(results), out)
    write_markdown(results, out.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    # a missing data set or a bad file is one line and exit 1, not a traceback
    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="run_multilabel.py"))
