#!/usr/bin/env python3
"""Denoising results on BSD68: every method at every noise level, into results/denoise.json.

Methods: ``noisy`` (the input), ``tv`` (scikit-image, weight chosen on Train400 images), ``bm3d``
(PyPI ``bm3d``), and the learned models ``fpi_gd`` (Fields-of-Experts energy minimised by FPI_GD,
trained with the implicit gradient), ``unrolled`` (the same energy trained by unrolling T gradient
steps, TNRD style) and ``fpi_nn`` (a small convolutional deep-equilibrium denoiser).

Each (method, sigma) unit is kept in the JSON once finished and skipped on the next run; within a
unit, finished images are kept too (BM3D takes several seconds per image), so an interrupted run
resumes where it stopped. Noise: ``add_noise(clean, sigma, noise_seed(seed, sigma, i))``.

Example (the command that produced the committed results)::

    python scripts/run_denoise.py --sigmas 25 15 50 --methods noisy tv bm3d fpi_gd unrolled fpi_nn

``--store-as KEY`` keeps one model method's unit under another key, e.g. earlier weights as a
row of their own::

    git show ad6156f:torchfpi/weights/denoise_fpi_gd_s25.pt > runs/foe/denoise_fpi_gd_s25.pt
    python scripts/run_denoise.py --sigmas 25 --methods fpi_gd --weights-dir runs/foe --store-as fpi_gd_foe
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from torchfpi.data.images import (
    add_noise,
    list_images,
    load_folder,
    noise_seed,
    psnr,
    read_grey_png,
    ssim,
)
from torchfpi.io import atomic_write_bytes, atomic_write_json, data_root, read_json
from torchfpi.runtime import machine_info

METHODS = ("noisy", "tv", "bm3d", "fpi_gd", "unrolled", "fpi_nn")
MODEL_METHODS = ("fpi_gd", "unrolled", "fpi_nn")
#: Top-level entries every write refreshes.
HEADER = [["command"], ["machine"], ["protocol"]]
#: Row labels of the table (``--store-as`` keys included).
NAMES = {"noisy": "noisy input", "tv": "TV (scikit-image)", "bm3d": "BM3D (PyPI bm3d)",
         "fpi_gd": "FPI_GD, multi-scale FoE energy (ours)",
         "fpi_gd_foe": "FPI_GD, single-scale FoE energy (ours, earlier weights)",
         "unrolled": "single-scale FoE, 10 unrolled steps", "fpi_nn": "FPI_NN, conv DEQ (ours)"}


def _merge_write(out: Path, results: Dict[str, Any], keys: List[List[str]]) -> None:
    """Write ``results[k1][k2]...`` for each key path into ``out`` under a file lock, on top of
    what is there now: runs of this script for different sigmas can go side by side."""
    import fcntl

    with open(out.with_name(out.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current: Dict[str, Any] = read_json(out, default={}) or {}
        for path in keys:
            src, dst = results, current
            for k in path[:-1]:
                src, dst = src[k], dst.setdefault(k, {})
            dst[path[-1]] = src[path[-1]]
        atomic_write_json(current, out)


def _denoiser(method: str, sigma: float, args: argparse.Namespace, unit: Dict[str, Any]):
    """Return ``fn(noisy) -> (estimate, info)`` for one method, filling ``unit`` with its settings."""
    if method == "noisy":
        return lambda noisy: (noisy, {})
    if method == "bm3d":
        from torchfpi.apps.denoise import bm3d_denoise

        return lambda noisy: (bm3d_denoise(noisy, sigma), {})
    if method == "tv":
        from torchfpi.apps.denoise import choose_tv_weight

        if "tv_weight" not in unit:
            train = load_folder(Path(args.root) / "denoise" / "Train400", limit=args.tv_images)
            choice = choose_tv_weight(train, sigma)
            unit["tv_weight"] = choice["weight"]
            unit["tv_weight_selection"] = {
                "images": f"first {args.tv_images} of Train400, noise seed 1000",
                **choice,
            }
        weight = unit["tv_weight"]
        from torchfpi.apps.denoise import tv_denoise as tv

        return lambda noisy: (tv(noisy, weight), {})
    from torchfpi.apps.denoise import denoise_array, load_denoiser

    model, meta = load_denoiser(method, sigma, weights=args.weights_dir)
    unit.setdefault("model", meta)

    def run(noisy: np.ndarray):
        return denoise_array(model, noisy, sigma, tol=args.tol, max_iter=args.max_iter)

    return run


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[25, 15, 50])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="results/denoise.json")
    parser.add_argument("--limit", type=int, default=None, help="first N BSD68 images only (tests)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the test images")
    parser.add_argument("--tv-images", type=int, default=8)
    parser.add_argument("--weights-dir", default=None, help="checkpoint folder (default: shipped)")
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--max-iter", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--redo", nargs="*", default=[],
                        help="METHOD@SIGMA units to recompute; 'memory' recomputes the memory block")
    parser.add_argument("--memory", action="store_true",
                        help="also measure training memory of implicit FPI_GD vs unrolled")
    parser.add_argument("--memory-iterations", type=int, nargs="+", default=[10, 30])
    parser.add_argument("--figure", default=None, help="write a noisy/BM3D/ours/clean figure here")
    parser.add_argument("--figure-sigma", type=float, default=25)
    parser.add_argument("--figure-image", type=int, nargs="+", default=[1],
                        help="BSD68 indices for the figure (one row each)")
    parser.add_argument("--store-as", default=None, metavar="KEY",
                        help="store the unit of the one model method under KEY (e.g. fpi_gd_foe)")
    args = parser.parse_args(argv)
    if args.store_as is not None and (len(args.methods) != 1 or args.methods[0] not in MODEL_METHODS):
        parser.error("--store-as: expected exactly one model method in --methods")
    torch.set_num_threads(args.threads)
    args.root = data_root(args.data_root)
    files = list_images(Path(args.root) / "denoise" / "BSD68")
    if args.limit is not None:
        files = files[: args.limit]
    out = Path(args.out)
    results: Dict[str, Any] = read_json(out, default={}) or {}
    results["command"] = "python " + " ".join([sys.argv[0]] + argv)
    results["machine"] = machine_info()
    results["protocol"] = (
        "BSD68 (68 grey images); noisy = clean + sigma * N(0,1), numpy default_rng([seed, "
        "round(1000 sigma), image index]), seed 0, not clipped; PSNR on [0,255] of the clipped "
        "estimate; SSIM scikit-image defaults, data_range 255"
    )
    for sigma in args.sigmas:
        skey = f"sigma{sigma:g}"
        block = results.setdefault(skey, {})
        for method in args.methods:
            store = args.store_as or method
            unit = block.get(store, {})
            if f"{store}@{sigma:g}" in args.redo:
                unit = {}
            if unit.get("complete") and unit.get("images") == len(files):
                print(f"{skey}.{store}: done, psnr {unit['psnr']:.3f} (skipped)", flush=True)
                continue
            block[store] = unit
            fn = _denoiser(method, sigma, args, unit)
            per = unit.setdefault("per_image", {})
            for i, path in enumerate(files):
                if path.name in per:
                    continue
                clean = read_grey_png(path)
                noisy = add_noise(clean, sigma, noise_seed(args.seed, sigma, i))
                t0 = time.perf_counter()
                est, info = fn(noisy)
                sec = time.perf_counter() - t0
                per[path.name] = {"psnr": psnr(est, clean), "ssim": ssim(est, clean), "seconds": sec, **info}
                _merge_write(out, results, [[skey, store], *HEADER])
            vals = [per[p.name] for p in files]
            unit["psnr"] = float(np.mean([v["psnr"] for v in vals]))
            unit["ssim"] = float(np.mean([v["ssim"] for v in vals]))
            unit["seconds_per_image"] = float(np.mean([v["seconds"] for v in vals]))
            for key in ("forward_iterations", "residual"):
                if key in vals[0]:
                    unit[f"mean_{key}"] = float(np.mean([v[key] for v in vals]))
            unit["images"] = len(files)
            unit["complete"] = True
            unit["command"] = results["command"]
            _merge_write(out, results, [[skey, store], *HEADER])
            print(f"{skey}.{store}: psnr {unit['psnr']:.3f} ssim {unit['ssim']:.4f} "
                  f"({unit['seconds_per_image']:.2f} s/image)", flush=True)
    print(markdown_table(results), flush=True)
    if args.memory:
        if "memory" in args.redo:
            results.pop("memory", None)
        _memory(results, args, out)
    if args.figure:
        _figure(results, args, files)
    return 0


def markdown_table(results: Dict[str, Any]) -> str:
    """Mean PSNR / SSIM per method and sigma as a markdown table (incomplete units marked)."""
    sigmas = sorted((k for k in results if k.startswith("sigma")), key=lambda k: float(k[5:]))
    head = "| method | " + " | ".join(f"sigma {k[5:]} PSNR / SSIM" for k in sigmas) + " |"
    rows = [head, "|---" * (len(sigmas) + 1) + "|"]
    for m in NAMES:
        cells = []
        for k in sigmas:
            u = results[k].get(m)
            if not u or not u.get("per_image"):
                cells.append("-")
            elif u.get("complete"):
                cells.append(f"{u['psnr']:.2f} / {u['ssim']:.4f}")
            else:
                vals = list(u["per_image"].values())
                cells.append(f"({np.mean([v['psnr'] for v in vals]):.2f} on {len(vals)} images)")
        if any(c != "-" for c in cells):
            rows.append(f"| {NAMES[m]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _memory(results: Dict[str, Any], args: argparse.Namespace, out: Path) -> None:
    """Peak extra memory of one training step, implicit FPI_GD vs unrolled, equal iterations."""
    from torchfpi.apps.denoise import DEFAULT_CONFIGS, load_denoiser, measure_training_memory

    _, meta = load_denoiser("fpi_gd", 25, args.weights_dir)
    w = meta["weights"]
    # the energy of the sigma-25 weights (its filter bank), for both models
    energy = {**DEFAULT_CONFIGS["fpi_gd"]["energy"], **meta["config"].get("energy", {})}
    block = results.setdefault("memory", {
        "what": f"peak RSS growth (MiB) during a training step (batch 8, 64x64 crops, FoE energy "
                f"{energy['n_filters']} filters {energy['kernel_size']}x{energy['kernel_size']} of the "
                "sigma-25 FPI_GD weights), measured in a fresh subprocess; FPI_GD runs exactly N forward "
                "iterations (Anderson) + backward FPI, the unrolled model N gradient steps"})
    imgs = str(Path(args.root) / "denoise" / "Train400")
    if "trained_sigma25_tol1e-3" not in block:
        # the trained sigma-25 energy at the training tolerance: natural iteration counts
        imp = measure_training_memory("fpi_gd", 200, batch_size=8, crop=64, energy=energy,
                                      weights=w, tol=1e-3, images=imgs)
        block["trained_sigma25_tol1e-3"] = imp
        _merge_write(out, results, [["memory"]])
        print(f"trained FPI_GD step: forward {imp['forward_iterations']:.1f} it, backward "
              f"{imp['backward_iterations']:.1f} it, {imp['peak_step_mib']:.1f} MiB", flush=True)
    for n in args.memory_iterations:
        key = f"iterations{n}"
        if key in block:
            continue
        imp = measure_training_memory("fpi_gd", n, batch_size=8, crop=64, energy=energy, weights=w,
                                     images=imgs)
        unr = measure_training_memory("unrolled", n, batch_size=8, crop=64, energy=energy, weights=w,
                                      images=imgs)
        block[key] = {"fpi_gd": imp, "unrolled": unr,
                      "ratio_unrolled_over_implicit": unr["peak_step_mib"] / max(imp["peak_step_mib"], 1e-9)}
        _merge_write(out, results, [["memory"]])
        print(f"memory at {n} iterations: implicit {imp['peak_step_mib']:.1f} MiB, "
              f"unrolled {unr['peak_step_mib']:.1f} MiB", flush=True)


def _figure(results: Dict[str, Any], args: argparse.Namespace, files: List[Path]) -> None:
    """Crops of noisy / BM3D / FPI_GD / clean, one row per BSD68 image, PSNR of the whole image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from torchfpi.apps.denoise import bm3d_denoise, denoise_array, load_denoiser

    sigma = args.figure_sigma
    model, _ = load_denoiser("fpi_gd", sigma, weights=args.weights_dir)
    rows = args.figure_image
    fig, axes = plt.subplots(len(rows), 4, figsize=(12, 3.3 * len(rows)), squeeze=False)
    for row, i in zip(axes, rows):
        clean = read_grey_png(files[i])
        noisy = add_noise(clean, sigma, noise_seed(args.seed, sigma, i))
        ours, _ = denoise_array(model, noisy, sigma, tol=args.tol, max_iter=args.max_iter)
        panels = [("noisy", noisy), ("BM3D", bm3d_denoise(noisy, sigma)), ("FPI_GD", ours), ("clean", clean)]
        h, w = clean.shape
        r0, c0 = (h - 160) // 2, (w - 160) // 2
        for ax, (name, img) in zip(row, panels):
            crop = np.clip(img, 0, 255)[r0:r0 + 160, c0:c0 + 160]
            ax.imshow(crop, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            title = files[i].name if name == "clean" else f"{name}: {psnr(img, clean):.2f} dB"
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    fig.suptitle(f"BSD68, sigma {sigma:g}: centre crops (PSNR of the whole image)", fontsize=10)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(args.figure, buf.getvalue())
    print(f"figure -> {args.figure}", flush=True)


if __name__ == "__main__":
    from torchfpi.cli import run_guarded

    # a missing data set or a bad file is one line and exit 1, not a traceback
    sys.exit(run_guarded(lambda: main(sys.argv[1:]), prog="run_denoise.py"))
