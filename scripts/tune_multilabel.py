#!/usr/bin/env python3
"""Compare multi-label recipe variants on the validation split only; write results/multilabel_tuning.json.

The test split is never loaded: each run gets the validation rows in place of a test split and
only its validation F1 (epoch and threshold chosen on it), per-epoch time and iteration counts
are kept. This is how the recipes in :mod:`torchfpi.apps.multilabel.recipes` were chosen.

    nohup nice -n 5 python scripts/tune_multilabel.py --dataset bibtex --seeds 0 1 2 \\
        --variants fpi_gd fpi_gd_pre10 > logs/tune.log 2>&1 &

Finished (dataset, variant, seed) units are kept in the JSON and skipped on a rerun.

``--folds K`` compares variants by K-fold cross-validation on the training set instead: fold i
holds out the i-th tenth of the same fixed permutation (fold 0 is the usual validation split) and
trains with seed i; the fold scores go to ``cv`` of each variant, with their mean and the mean
paired difference to the ``mlp_r`` variant on the same folds. The validation split of 488 rows
moves a run's F1 by 0.4-0.6 between seeds, the size of the differences being chosen between.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from torchfpi.apps.multilabel import TrainConfig, train_multilabel
from torchfpi.apps.multilabel.recipes import BUDGET, model_config
from torchfpi.apps.multilabel.train import Splits
from torchfpi.data import load_multilabel, train_val_split
from torchfpi.io import atomic_write_json, read_json
from torchfpi.runtime import machine_info

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
    # session 4, compared by 10-fold cross-validation (--folds 10)
    "fpi_gd_recipe": ("fpi_gd", {}, {}),
    "fpi_nn_tied_h512": ("fpi_nn", {}, {"update_tied": True, "update_hidden": 512}),
    "fpi_nn_tied_h256_lr3": ("fpi_nn", {"energy_lr_mult": 3.0}, {"update_tied": True, "update_hidden": 256}),
    "fpi_nn_g002": ("fpi_nn", {}, {"update_gain_init": 0.02}),
    "fpi_nn_h256_g002": ("fpi_nn", {}, {"update_hidden": 256, "update_gain_init": 0.02}),
    "fpi_gd_bwd_anderson": ("fpi_gd", {}, {"backward": "anderson"}),
    "fpi_gd_anderson": ("fpi_gd", {}, {"solver": "anderson", "backward": "anderson"}),
}


def fold_indices(num: int, fold: int) -> Tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows of fold ``fold``: the ``fold``-th tenth of the grid split's permutation
    (:func:`torchfpi.data.train_val_split`, fraction 0.1, seed 0; fold 0 is the grid's split)."""
    return train_val_split(num, 0.1, 0, fold)


def validation_splits(dataset: str, data_root: Any, fold: int = 0) -> Splits:
    """Train/validation tensors of ``fold`` (0: as in the results grid); the 'test' slot repeats validation."""
    train = load_multilabel(dataset, "train", root=data_root)
    tr, va = fold_indices(len(train), fold)
    x, y = torch.from_numpy(train.features), torch.from_numpy(train.labels)
    return Splits(x[tr], y[tr], x[va], y[va], x[va[:1]], y[va[:1]])


def _mean_std(values: List[float]) -> Tuple[float, float]:
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / max(1, len(values) - 1))


def _summarise(entry: Dict[str, Any]) -> None:
    """Means and standard deviations of a variant's seed runs and of its folds."""
    runs = entry.get("runs", {})
    if runs:
        entry["val_f1_mean"], entry["val_f1_std"] = _mean_std([r["val_f1"] for r in runs.values()])
        for key in ("epoch_s_mean", "epoch_cpu_s_mean"):
            entry[key] = sum(r.get(key, math.nan) for r in runs.values()) / len(runs)
    if entry.get("cv"):
        entry["cv_f1_mean"], entry["cv_f1_std"] = _mean_std([r["val_f1"] for r in entry["cv"].values()])


def main(argv: List[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="bibtex", choices=("bibtex", "delicious"))
    p.add_argument("--variants", nargs="+", default=["mlp", "fpi_gd"], choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--folds", type=int, default=0, help="K-fold cross-validation (K <= 10) instead of --seeds")
    p.add_argument("--out", default="results/multilabel_tuning.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None)
    args = p.parse_args(argv)
    if not 0 <= args.folds <= 10:
        p.error(f"--folds: expected 0 .. 10 (tenths of the training set), got {args.folds}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: Dict[str, Any] = read_json(out, default={}) or {}
    results["machine"] = machine_info()
    results["budget"] = BUDGET
    results.setdefault("commands", [])
    cmd = "python scripts/tune_multilabel.py " + " ".join(argv)
    if cmd not in results["commands"]:
        results["commands"].append(cmd)
    units = [(i, i) for i in range(args.folds)] if args.folds else [(seed, 0) for seed in args.seeds]
    slot = "cv" if args.folds else "runs"
    splits: Dict[int, Splits] = {}
    for seed, fold in units:
        for name in args.variants:
            model, train_over, model_over = VARIANTS[name]
            entry = results.setdefault(args.dataset, {}).setdefault(name, {"runs": {}})
            entry["options"] = {"model": model, "train": train_over, "model_cfg": model_over}
            done = entry.setdefault(slot, {})
            if slot == "cv" and "0" not in done and "0" in entry["runs"]:
                done["0"] = entry["runs"]["0"]  # fold 0 with seed 0 is the usual split's run
            key = str(fold if args.folds else seed)
            if key in done:
                continue
            if fold not in splits:
                splits[fold] = validation_splits(args.dataset, args.data_root, fold)
            cfg = TrainConfig(dataset=args.dataset, model=model, seed=seed, **{**BUDGET, **train_over},
                              model_cfg=model_config(model, **model_over))
            t0 = time.perf_counter()
            res = train_multilabel(cfg, splits[fold], log=lambda m: print(m, flush=True))
            keep = ("val_f1", "threshold", "best_epoch", "epochs_run", "epoch_s_mean",
                    "epoch_cpu_s_mean", "train_forward_iterations", "train_backward_iterations")
            done[key] = {k: res[k] for k in keep} | {"wall_s": time.perf_counter() - t0}
            _summarise(entry)
            # Merge into the file as it is now: several tuning runs may share it.
            on_disk: Dict[str, Any] = read_json(out, default={}) or {}
            on_disk.setdefault(args.dataset, {})[name] = entry
            on_disk.update({k: results[k] for k in ("machine", "budget")})
            on_disk["commands"] = sorted(set(on_disk.get("commands", [])) | set(results["commands"]))
            results = {**on_disk, args.dataset: {**on_disk[args.dataset]}}
            atomic_write_json(results, out)
            print(f"done {args.dataset}/{name}/{'fold' if args.folds else 'seed'} {key}: val F1 {res['val_f1']:.2f}, "
                  f"{res['epoch_s_mean']:.1f} s/epoch ({res['epoch_cpu_s_mean']:.1f} s CPU), it {res['train_forward_iterations']}/"
                  f"{res['train_backward_iterations']}", flush=True)
    table = results.get(args.dataset, {})
    base = table.get("mlp_r", {}).get("cv", {})
    for name, e in table.items():
        if args.folds:
            if not e.get("cv"):
                continue
            paired = [e["cv"][k]["val_f1"] - base[k]["val_f1"] for k in e["cv"] if k in base]
            diff = f", paired vs mlp_r {sum(paired) / len(paired):+.2f} over {len(paired)} folds" if paired else ""
            print(f"{args.dataset:10s} {name:18s} {len(e['cv'])}-fold F1 {e['cv_f1_mean']:.2f} ± {e['cv_f1_std']:.2f}{diff}")
            continue
        if not e.get("runs"):
            continue
        print(f"{args.dataset:10s} {name:18s} val F1 {e['val_f1_mean']:.2f} ± {e['val_f1_std']:.2f} "
              f"(seeds {sorted(e['runs'])}) {e['epoch_s_mean']:.1f} s/epoch, "
              f"{e.get('epoch_cpu_s_mean', math.nan):.1f} s CPU/epoch")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
