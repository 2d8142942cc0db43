#!/usr/bin/env python3
"""Middlebury flow benchmark: learned FPI model vs Horn-Schunck (FPI) vs OpenCV Farneback / DIS.

Writes results/flow.json (per-sequence EPE, ``mean_epe`` per method, fixed-point iteration
counts, seconds, command, machine) and results/flow_<Seq>.png (frame, ground truth and each
method, colour-coded on one scale). Each finished (method, sequence) unit is kept in the JSON and
skipped on rerun; ``--force`` recomputes.

    python scripts/run_flow.py [--data-root DIR] [--weights torchfpi/weights/flow_fpi_gd.pt]
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from torchfpi.apps.flow import load_flow_model
from torchfpi.apps.flow.api import METHODS as MODELS
from torchfpi.apps.flow.api import SHIPPED_WEIGHTS
from torchfpi.apps.flow.baselines import dis, farneback
from torchfpi.apps.flow.models import VariationalFlow
from torchfpi.data.datasets import MIDDLEBURY_GT_SEQUENCES, MiddleburyPairs
from torchfpi.data.flo import end_point_error, flow_to_color, valid_mask
from torchfpi.io import atomic_write_bytes, atomic_write_json, data_root, read_json
from torchfpi.runtime import machine_info

# the fixed-point methods (listed once in torchfpi.apps.flow.api, run through load_flow_model),
# OpenCV's methods on the colour frames, and fpi_gd_init: the same model at its hand-set initial
# values before training (an ablation that shows what training on synthetic pairs changed; never
# used to choose anything)
METHODS = (*MODELS, "farneback", "dis", "fpi_gd_init")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--weights", default=str(SHIPPED_WEIGHTS["fpi_gd"]))
    parser.add_argument("--nn-weights", default=str(SHIPPED_WEIGHTS["fpi_nn"]))
    parser.add_argument("--out", default="results/flow.json")
    parser.add_argument("--figures", default="results")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sequences", nargs="+", default=list(MIDDLEBURY_GT_SEQUENCES),
                        choices=MIDDLEBURY_GT_SEQUENCES, help="which pairs (default all eight)")
    parser.add_argument("--force", action="store_true", help="recompute finished units")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = data_root(args.data_root)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: unknown method {m!r}, expected some of {METHODS}")
    pairs = MiddleburyPairs(root, args.sequences)  # every pair is there before any work
    out = Path(args.out)
    results = {} if args.force else read_json(out, default={})
    results.setdefault("methods", {})
    results["command"] = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    results["machine"] = machine_info()
    results["protocol"] = ("Middlebury 'other' training pairs with ground truth (frame10 -> frame11), grey "
                           "frames; EPE averaged over pixels with known truth; no tuning on these pairs")
    weights = {"fpi_gd": args.weights, "fpi_nn": args.nn_weights}
    models = {m: load_flow_model(m, weights.get(m)) for m in MODELS if m in methods}
    model = models.get("fpi_gd")
    models["fpi_gd_init"] = VariationalFlow(model.config if model is not None else None)
    if model is not None:
        results["fpi_gd_params"] = model.describe()
        results["fpi_gd_config"] = model.extra_state()
    flows = {}
    # grey frames (1, 1, H, W) in [0, 255] and the truth, one pair a batch (their sizes differ);
    # OpenCV's methods take the same grey frames (they would make them from colour the same way)
    for seq, (g1, g2, gt_t) in zip(pairs.sequences, DataLoader(pairs, batch_size=1)):
        f1, f2, gt = g1[0, 0].numpy(), g2[0, 0].numpy(), gt_t[0].permute(1, 2, 0).numpy()
        flows[seq] = {}
        for m in methods:
            entry = results["methods"].setdefault(m, {"per_sequence": {}})
            done = entry["per_sequence"].get(seq)
            flo_cache = Path("runs") / "flow_cache" / f"{m}_{seq}.npy"  # git-ignored
            if done is not None and flo_cache.exists():
                flows[seq][m] = np.load(flo_cache)
                continue
            t0 = time.time()
            info = {}
            with torch.no_grad():
                if m in models:
                    fl, info = models[m](g1, g2)
                    est = fl[0].permute(1, 2, 0).numpy()
                elif m == "farneback":
                    est = farneback(f1, f2)
                else:
                    est = dis(f1, f2, "medium")
            rec = {"epe": round(end_point_error(est, gt), 4), "seconds": round(time.time() - t0, 2)}
            if info:
                rec["iterations"] = info["iterations"]
                rec["solves"] = info["solves"]
                if "refine_iterations" in info:
                    rec["refine_iterations"] = info["refine_iterations"]
            entry["per_sequence"][seq] = rec
            buf = io.BytesIO()  # atomic: a killed run never leaves half a cache file to load
            np.save(buf, est.astype(np.float32))
            atomic_write_bytes(flo_cache, buf.getvalue())
            flows[seq][m] = est
            print(f"{seq:12s} {m:13s} EPE {rec['epe']:.3f}  ({rec['seconds']:.1f} s)", flush=True)
            for e in results["methods"].values():
                vals = [v["epe"] for v in e["per_sequence"].values()]
                if len(vals) == len(MIDDLEBURY_GT_SEQUENCES):
                    e["mean_epe"] = round(float(np.mean(vals)), 4)
            atomic_write_json(results, out)
        _figure(Path(args.figures) / f"flow_{seq}.png", seq, f1, gt, flows[seq], results["methods"])
    print("mean EPE: " + ", ".join(f"{m} {results['methods'][m].get('mean_epe')}" for m in methods))
    return 0


def _figure(path: Path, seq: str, frame: np.ndarray, gt: np.ndarray, flows: dict, methods: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = valid_mask(gt)
    scale = float(np.sqrt((gt[mask] ** 2).sum(1)).max())
    panels = [("frame10", frame), ("ground truth", flow_to_color(gt, scale))]
    for m, est in flows.items():
        if m.endswith("_init"):
            continue
        panels.append((f"{m}  EPE {methods[m]['per_sequence'][seq]['epe']:.3f}", flow_to_color(est, scale)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8))
    for ax, (title, img) in zip(axes, panels):
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"Middlebury {seq} (colour scale: max |gt| = {scale:.1f} px)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    # a missing data set or a bad file is one line and exit 1, not a traceback
    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="run_flow.py"))
