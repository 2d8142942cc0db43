#!/usr/bin/env python3
"""Compare multi-label recipe variants on the validation split only; write results/multilabel_tuning.json.

The test split is never loaded: each run gets the validation rows in place of a test split and
only its validation F1 (epoch and threshold chosen on it), per-epoch time and iteration counts
are kept. This is how the recipes in :mod:`torchfpi.apps.multilabel.recipes` were chosen.

    nohup nice -n 5 python scripts/tune_multilabel.py --dataset bibtex --seeds 0 1 2 \\
        --variants fpi_gd fpi_gd_pre10 > logs/tune.log 2>&1 &

Finished (dataset, variant, seed) units are kept in the JSON and skipped on a rerun.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch

from torchfpi.apps._common import atomic_write_json, machine_info, read_json
from torchfpi.apps.multilabel import TrainConfig, train_multilabel
from torchfpi.apps.multilabel.recipes import BUDGET, model_config
from torchfpi.apps.multilabel.train import Splits
from torchfpi.data import load_multilabel, train_val_split

# name -> (model, TrainConfig overrides, ModelConfig overrides)
VARIANTS: Dict[str, Tuple[str, Dict[str, Any], Dict[str, Any]]] = {
    "mlp": ("mlp", {}, {}),
    "spen": ("spen", {}, {}),
    "fpi_nn": ("fpi_nn", {}, {}),
    "fpi_gd": ("fpi_gd", {}, {}),
    "fpi_nn_pre10": ("fpi_nn", {"pretrain_epochs": 10}, {}),
    "fpi_gd_pre10": ("fpi_gd", {"pretrain_epochs": 10}, {}),
    "spen_pre10": ("spen", {"pretrain_epochs": 10}, {}),
    "fpi_gd_maxnorm2": ("fpi_gd", {}, {"energy_max_norm": 2.0}),
    "fpi_gd_maxnorm4": ("fpi_gd", {}, {"energy_max_norm": 4.0}),
    "fpi_gd_maxnorm8": ("fpi_gd", {}, {"energy_max_norm": 8.0}),
    "spen_maxnorm4": ("spen", {}, {"energy_max_norm": 4.0}),
    "fpi_gd_tol1e-3": ("fpi_gd", {}, {"tol": 1e-3, "backward_tol": 1e-3}),
    "fpi_gd_icnn": ("fpi_gd", {}, {"energy_kind": "icnn", "energy_hidden": 128}),
    "fpi_gd_k256": ("fpi_gd", {}, {"energy_hidden": 256}),
    "fpi_gd_maxnorm4_k256": ("fpi_gd", {}, {"energy_max_norm": 4.0, "energy_hidden": 256}),
    "fpi_gd_maxnorm4_lr3": ("fpi_gd", {"energy_lr_mult": 3.0}, {"energy_max_norm": 4.0}),
    "fpi_nn_h256": ("fpi_nn", {}, {"update_hidden": 256}),
    "fpi_nn_gain1": ("fpi_nn", {}, {"update_max_gain": 1.0}),
    "fpi_nn_gain2": ("fpi_nn", {}, {"update_max_gain": 2.0}),
    "fpi_nn_r": ("fpi_nn", {}, {}),  # the current recipe, rerun with 3 seeds (session 3)
    "fpi_nn_h256_r": ("fpi_nn", {}, {"update_hidden": 256}),
    "fpi_nn_tied": ("fpi_nn", {}, {"update_tied": True}),
    "fpi_nn_tied_h256": ("fpi_nn", {}, {"update_tied": True, "update_hidden": 256}),
    "mlp_r": ("mlp", {}, {}),
    "fpi_nn_g002": ("fpi_nn", {}, {"update_gain_init": 0.02}),
    "fpi_nn_h256_g002": ("fpi_nn", {}, {"update_hidden": 256, "update_gain_init": 0.02}),
    "fpi_gd_bwd_anderson": ("fpi_gd", {}, {"backward": "anderson"}),
    "fpi_gd_anderson": ("fpi_gd", {}, {"solver": "anderson", "backward": "anderson"}),
}


def validation_splits(dataset: str, data_root: Any) -> Splits:
    """Train/validation tensors as in the results grid; the 'test' slot repeats validation."""
    train = load_multilabel(dataset, "train", root=data_root)
    tr, va = train_val_split(len(train), 0.1, 0)
    x, y = torch.from_numpy(train.features), torch.from_numpy(train.labels)
    return Splits(x[tr], y[tr], x[va], y[va], x[va[:1]], y[va[:1]])


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="bibtex", choices=("bibtex", "delicious"))
    p.add_argument("--variants", nargs="+", default=["mlp", "fpi_gd"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--out", default="results/multilabel_tuning.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: Dict[str, Any] = read_json(out, default={}) or {}
    results["machine"] = machine_info()
    results["budget"] = BUDGET
    results.setdefault("commands", [])
    cmd = "python scripts/tune_multilabel.py " + " ".join(argv)
    if cmd not in results["commands"]:
        results["commands"].append(cmd)
    splits = None
    for seed in args.seeds:
        for name in args.variants:
            model, train_over, model_over = VARIANTS[name]
            entry = results.setdefault(args.dataset, {}).setdefault(name, {"runs": {}})
            entry["options"] = {"model": model, "train": train_over, "model_cfg": model_over}
            if str(seed) in entry["runs"]:
                continue
            splits = splits or validation_splits(args.dataset, args.data_root)
            cfg = TrainConfig(dataset=args.dataset, model=model, seed=seed, **{**BUDGET, **train_over},
                              model_cfg=model_config(model, **model_over))
            t0 = time.perf_counter()
            res = train_multilabel(cfg, splits, log=lambda m: print(m, flush=True))
            keep = ("val_f1", "threshold", "best_epoch", "epochs_run", "epoch_s_mean",
                    "epoch_cpu_s_mean", "train_forward_iterations", "train_backward_iterations")
            entry["runs"][str(seed)] = {k: res[k] for k in keep} | {"wall_s": time.perf_counter() - t0}
            vals = [r["val_f1"] for r in entry["runs"].values()]
            m = sum(vals) / len(vals)
            entry["val_f1_mean"] = m
            entry["val_f1_std"] = math.sqrt(sum((v - m) ** 2 for v in vals) / max(1, len(vals) - 1))
            for key in ("epoch_s_mean", "epoch_cpu_s_mean"):
                entry[key] = sum(r.get(key, math.nan) for r in entry["runs"].values()) / len(vals)
            # Merge into the file as it is now: several tuning runs may share it.
            on_disk: Dict[str, Any] = read_json(out, default={}) or {}
            on_disk.setdefault(args.dataset, {})[name] = entry
            on_disk.update({k: results[k] for k in ("machine", "budget")})
            on_disk["commands"] = sorted(set(on_disk.get("commands", [])) | set(results["commands"]))
            results = {**on_disk, args.dataset: {**on_disk[args.dataset]}}
            atomic_write_json(results, out)
            print(f"done {args.dataset}/{name}/seed {seed}: val F1 {res['val_f1']:.2f}, "
                  f"{res['epoch_s_mean']:.1f} s/epoch ({res['epoch_cpu_s_mean']:.1f} s CPU), it {res['train_forward_iterations']}/"
                  f"{res['train_backward_iterations']}", flush=True)
    for name, e in results.get(args.dataset, {}).items():
        print(f"{args.dataset:10s} {name:18s} val F1 {e['val_f1_mean']:.2f} ± {e['val_f1_std']:.2f} "
              f"(seeds {sorted(e['runs'])}) {e['epoch_s_mean']:.1f} s/epoch, "
              f"{e.get('epoch_cpu_s_mean', math.nan):.1f} s CPU/epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
