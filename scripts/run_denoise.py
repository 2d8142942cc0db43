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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import torch

from torchfpi.apps._common import atomic_write_json, data_root, machine_info, read_json
from torchfpi.data.images import (
    add_noise,
    list_images,
    load_folder,
    noise_seed,
    psnr,
    read_grey_png,
    ssim,
)

METHODS = ("noisy", "tv", "bm3d", "fpi_gd", "unrolled", "fpi_nn")
MODEL_METHODS = ("fpi_gd", "unrolled", "fpi_nn")


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
    parser.add_argument("--redo", nargs="*", default=[], help="METHOD@SIGMA units to recompute")
    args = parser.parse_args(argv)
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
            unit = block.get(method, {})
            if f"{method}@{sigma:g}" in args.redo:
                unit = {}
            if unit.get("complete") and unit.get("images") == len(files):
                print(f"{skey}.{method}: done, psnr {unit['psnr']:.3f} (skipped)", flush=True)
                continue
            block[method] = unit
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
                atomic_write_json(results, out)
            vals = [per[p.name] for p in files]
            unit["psnr"] = float(np.mean([v["psnr"] for v in vals]))
            unit["ssim"] = float(np.mean([v["ssim"] for v in vals]))
            unit["seconds_per_image"] = float(np.mean([v["seconds"] for v in vals]))
            for key in ("forward_iterations", "residual"):
                if key in vals[0]:
                    unit[f"mean_{key}"] = float(np.mean([v[key] for v in vals]))
            unit["images"] = len(files)
            unit["complete"] = True
            atomic_write_json(results, out)
            print(f"{skey}.{method}: psnr {unit['psnr']:.3f} ssim {unit['ssim']:.4f} "
                  f"({unit['seconds_per_image']:.2f} s/image)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
