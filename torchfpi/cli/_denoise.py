"""``torchfpi train denoise`` and ``torchfpi denoise IN.png --sigma 25 --out OUT.png``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Tuple


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``denoise`` (apply a trained model) and ``train denoise``."""
    p = commands.add_parser(
        "denoise",
        help="denoise a grey-scale image with a trained FPI model",
        description="Denoise IN (any image Pillow reads; converted to grey) with a model trained "
        "for white Gaussian noise of level SIGMA on the [0, 255] scale. Weights for sigma 15, 25 "
        "and 50 ship with the package.",
    )
    p.add_argument("input", metavar="IN", help="noisy input image (PNG)")
    p.add_argument("--sigma", type=float, required=True, help="noise level on the [0, 255] scale")
    p.add_argument("--out", required=True, help="output PNG (8-bit grey)")
    p.add_argument("--model", default="fpi_gd", choices=["fpi_gd", "unrolled", "fpi_nn"],
                   help="which trained model denoises: the FoE energy solved by FPI, its unrolled twin, or FPI_NN")
    p.add_argument("--weights", default=None,
                   help="weights file or folder (default: shipped); a file of another --model is refused, one "
                   "trained for another --sigma is used with a one-line warning that names its sigma")
    p.add_argument("--tol", type=float, default=1e-4, help="forward solve tolerance")
    p.add_argument("--max-iter", type=int, default=300, help="forward solve iteration limit")
    p.add_argument("--clean", default=None, metavar="REF",
                   help="clean reference image of the same size: also print PSNR and SSIM (scikit-image)")
    p.add_argument("--device", default="cpu", help="where the model runs: 'cpu', 'cuda[:N]' or 'auto'")
    p.add_argument("--quiet", action="store_true", help="print nothing on success (no progress either)")
    p.set_defaults(func=run_denoise)

    t = train.add_parser(
        "denoise",
        help="train a denoiser on Train400 crops",
        description="Train FPI_GD (FoE energy, implicit gradient), the unrolled TNRD-style "
        "baseline or FPI_NN on random Train400 crops with fresh noise; validation on the last "
        "--val-images Train400 images. The defaults (800 steps, batch 8, 64x64 crops) stop at "
        "--budget-minutes (40) of compute on one CPU thread. Runs under torchrun "
        "(--batch-size split across the processes; rank 0 writes the files).",
    )
    t.add_argument("--sigma", type=float, default=25.0, help="noise level on the [0, 255] scale")
    t.add_argument("--model", default="fpi_gd", choices=["fpi_gd", "unrolled", "fpi_nn"],
                   help="fpi_gd: FoE energy with the implicit gradient; unrolled: TNRD-style baseline; fpi_nn: a "
                   "convolutional FPI_NN")
    t.add_argument("--steps", type=int, default=800, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=8, help="crops per step (the global batch under torchrun)")
    t.add_argument("--crop", type=int, default=64, help="side of the square training crops (pixels)")
    t.add_argument("--lr", type=float, default=5e-3, help="Adam learning rate (cosine schedule down to 5%%)")
    t.add_argument("--val-images", type=int, default=40, help="last Train400 images held out for validation")
    t.add_argument("--val-every", type=int, default=50, help="steps between validations (and checkpoints)")
    t.add_argument("--unroll-steps", type=int, default=None, help="unrolled model: steps T")
    t.add_argument("--tol", type=float, default=None,
                   help="fpi_gd / fpi_nn: forward and backward tolerance (default 1e-3)")
    t.add_argument("--max-iter", type=int, default=None,
                   help="fpi_gd / fpi_nn: forward iteration limit (backward: twice this)")
    t.add_argument("--init", default=None,
                   help="weights file to start from (fine-tuning); for an energy trained at "
                   "another sigma the data weight is rescaled by (sigma_init / sigma)^2; "
                   "--model fpi_gd also starts from the energy of unrolled weights")
    t.add_argument("--init-rescale", choices=("data-weight", "contrast"), default="data-weight",
                   help="an --init energy trained at another sigma: 'data-weight' rescales lambda by "
                   "(sigma_init / sigma)^2 (MAP scaling); 'contrast' also scales the filters by "
                   "sigma_init / sigma, i.e. the init energy applied to the image scaled to its noise level")
    t.add_argument("--calibrate-data-weight", action="store_true",
                   help="fpi_gd / unrolled: before training, set the data weight to the best of "
                   "lambda * exp(-S .. S), steps of 0.1 (S: --calibration-span), on the validation crops, "
                   "among the offsets whose solves converged (an unrolled energy's "
                   "exact minimiser needs a larger lambda)")
    t.add_argument("--calibration-span", type=float, default=2.0, metavar="S",
                   help="--calibrate-data-weight: log offsets -S .. S in steps of 0.1")
    t.add_argument("--filters", type=int, default=None,
                   help="fpi_gd / unrolled: number of FoE filters (default 24); with --init, a "
                   "larger bank than the file's grows it (trained filters kept, new ones added)")
    t.add_argument("--kernel-size", type=int, default=None,
                   help="fpi_gd / unrolled: odd FoE filter size (default 5); with --init, a larger "
                   "size zero-pads the trained filters")
    t.add_argument("--coarse", action="append", default=None, metavar="F:N:K",
                   help="fpi_gd / unrolled: add a coarse filter bank of N KxK filters on the image "
                   "average-pooled by F (repeatable, e.g. --coarse 2:24:5 --coarse 4:16:5; default: none); "
                   "with --init, banks the file lacks start at a tenth of its median penalty weight")
    t.add_argument("--adaptive-data", type=int, default=None, metavar="C",
                   help="fpi_gd / unrolled: a data weight that varies over the image, lambda exp(0.5 tanh(h(y))) "
                   "with h a 3-layer C-channel CNN of the noisy image (default: off, one scalar lambda); "
                   "added to an --init energy it starts as the same energy")
    t.add_argument("--seed", type=int, default=0, help="seed of weights, crops and noise")
    t.add_argument("--budget-minutes", type=float, default=40.0,
                   help="stop after this much training time (over resumes), even before --steps")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--data-root", default=None,
                   help="data root holding denoise/Train400 (default: $TORCHFPI_DATA, then the per-user cache)")
    t.add_argument("--limit-images", type=int, default=None, help="first N Train400 images (tests)")
    t.add_argument("--checkpoint", default=None, help="default: runs/denoise/<model>_s<sigma>.pt")
    t.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints besides those at each validation (0: only there); "
                   "a kill loses at most this many steps")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="weights and data (float64: runs that must agree across process counts)")
    t.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip",
                   help="a NaN/Inf loss or gradient: skip that step, or stop (last good checkpoint kept)")
    t.add_argument("--export", default=None, help="weights file to write (default: next to checkpoint)")
    t.add_argument("--quiet", action="store_true", help="print only errors")
    t.set_defaults(func=run_train)


def run_denoise(args: argparse.Namespace) -> int:
    """Apply a trained denoiser to one image: every argument is checked before the solve."""
    import io

    import numpy as np
    from PIL import Image

    from torchfpi.apps.denoise import MIN_IMAGE_SIDE, denoise_array, load_denoiser
    from torchfpi.cli import _checks
    from torchfpi.cli._progress import ticking
    from torchfpi.data.images import check_sigma, read_grey_png
    from torchfpi.errors import UsageError
    from torchfpi.io import atomic_write_bytes, remove_stale_temp_files
    from torchfpi.runtime import resolve_device

    sigma = check_sigma(args.sigma)
    _checks.positive_number(args.tol, "--tol")
    _checks.positive_int(args.max_iter, "--max-iter")
    out = _checks.output_file(args.out, "--out", _checks.image_suffixes())
    if args.weights is not None and not Path(args.weights).exists():
        raise FileNotFoundError(2, "No such file or directory", str(args.weights))
    if Path(args.input).resolve() == out.resolve():
        raise UsageError(f"--out: '{out}' is the input image: write the result to another file")
    noisy = read_grey_png(args.input)
    if min(noisy.shape) < MIN_IMAGE_SIDE:
        raise UsageError(f"IN: '{args.input}' is {noisy.shape[1]}x{noisy.shape[0]} pixels; the denoisers need "
                         f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}")
    clean = None
    if args.clean is not None:
        clean = read_grey_png(args.clean)
        if clean.shape != noisy.shape:
            raise UsageError(f"--clean: '{args.clean}' is {clean.shape[1]}x{clean.shape[0]} pixels but IN is "
                             f"{noisy.shape[1]}x{noisy.shape[0]}: give the clean version of this image")
    device = resolve_device(args.device)
    model, meta = load_denoiser(args.model, sigma, args.weights)
    model = model.to(device)
    with ticking(f"denoise {args.model} sigma {sigma:g}", enabled=not args.quiet):
        est, info = denoise_array(model, noisy, sigma, tol=args.tol, max_iter=args.max_iter)
    arr = np.clip(np.rint(est), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    fmt = Image.registered_extensions().get(out.suffix.lower(), "PNG")
    Image.fromarray(arr).save(buf, format=fmt)  # uint8 (H, W): mode "L"
    remove_stale_temp_files(out.parent)
    atomic_write_bytes(out, buf.getvalue())
    if not args.quiet:
        print(f"{args.input} -> {out}: {args.model} sigma {sigma:g}, "
              f"{info['forward_iterations']:.0f} iterations, residual {info['residual']:.1e}")
    if clean is not None:
        from skimage.metrics import peak_signal_noise_ratio, structural_similarity

        ref = np.clip(np.rint(clean), 0, 255).astype(np.uint8)
        psnr = peak_signal_noise_ratio(ref, arr, data_range=255)
        ssim = structural_similarity(ref, arr, data_range=255)
        print(f"PSNR {psnr:.2f} dB, SSIM {ssim:.4f} against {args.clean}")
    return 0


def _filter_bank(args: argparse.Namespace) -> Tuple[dict, Optional[int], Optional[list]]:
    """``--filters`` / ``--kernel-size`` as energy options, ``--adaptive-data`` and ``--coarse``,
    checked: ``(bank, adaptive channels or None, coarse banks or None)``."""
    from torchfpi.apps.denoise.energy import check_coarse
    from torchfpi.errors import UsageError

    for flag, value in (("--filters", args.filters), ("--kernel-size", args.kernel_size),
                        ("--adaptive-data", args.adaptive_data), ("--coarse", args.coarse)):
        if value is not None and args.model == "fpi_nn":
            raise UsageError(f"{flag}: only for --model fpi_gd or unrolled")
    bank = {}
    if args.filters is not None:
        if args.filters < 1:
            raise UsageError(f"--filters: expected a positive integer, got {args.filters}")
        bank["n_filters"] = args.filters
    if args.kernel_size is not None:
        if args.kernel_size < 3 or args.kernel_size % 2 != 1:
            raise UsageError(f"--kernel-size: expected an odd integer >= 3, got {args.kernel_size}")
        bank["kernel_size"] = args.kernel_size
    if args.adaptive_data is not None and not 1 <= args.adaptive_data <= 256:
        raise UsageError(f"--adaptive-data: expected 1 .. 256 channels, got {args.adaptive_data}")
    specs = None
    if args.coarse:
        specs = []
        for text in args.coarse:
            try:
                spec = [int(v) for v in str(text).split(":")]
                check_coarse([spec])  # the energy's own rules
            except ValueError:
                raise UsageError(f"--coarse: expected F:N:K, three integers: a factor 2 <= F <= 8, an odd "
                                 f"size K >= 3 and 1 <= N <= K*K-1 filters, got '{text}'") from None
            specs.append(spec)
    return bank, args.adaptive_data, specs


def _read_init(args: argparse.Namespace, sigma: float, model_config: dict) -> Optional[dict]:
    """``--init``: read the weights file safely, check its kind, merge its config; return its state."""
    import math

    from torchfpi.apps import read_weights
    from torchfpi.errors import DataError, UsageError

    if args.init is None:
        return None
    init = Path(args.init)
    try:
        blob = read_weights(init, "denoise", "torchfpi denoiser weights")
    except DataError as exc:
        raise DataError(f"--init: {exc}") from exc
    kind = blob["meta"].get("kind")
    from_unrolled = kind == "unrolled" and args.model == "fpi_gd"
    if kind != args.model and not from_unrolled:
        raise UsageError(f"--init: '{args.init}' holds {kind} weights, not {args.model}: pass --model {kind}")
    if not isinstance(blob.get("state_dict"), dict) or not isinstance(blob.get("config"), dict):
        raise DataError(f"--init: '{init}' is not a torchfpi denoiser weights file (expected a state_dict "
                        "and a config)")
    init_state = dict(blob["state_dict"])
    file_config = dict(blob["config"])
    if from_unrolled:  # same energy class: keep the energy, drop the learned unrolled step
        init_state = {k: v for k, v in init_state.items() if k.startswith("energy.")}
        file_config = {"energy": file_config.get("energy", {})}
    merged = {**file_config, **model_config}  # explicit flags win over the file's config
    model_config.clear()
    model_config.update(merged)
    key = "energy.log_data_weight"
    file_sigma = blob["meta"].get("sigma") or blob.get("sigma")
    if key in init_state and file_sigma is not None and float(file_sigma) != sigma:
        # MAP scaling: the data weight of an energy goes as 1 / sigma^2.
        ratio = float(file_sigma) / sigma
        init_state[key] = init_state[key] + 2.0 * math.log(ratio)
        if args.init_rescale == "contrast":
            # E'(z, y) = E(r z, r y) up to lambda: the energy sees the image at the noise level it was
            # trained for (filters times r; lambda r^2 is the MAP scaling above)
            from torchfpi.apps.denoise.energy import rescale_energy_state

            init_state = rescale_energy_state(init_state, ratio)
    return init_state


def run_train(args: argparse.Namespace) -> int:
    """Train one denoiser and export its best-validation weights.

    Order: every flag, then ``--init`` and the filter bank, then the output paths, then the data
    (image count and sizes against ``--val-images``, ``--limit-images`` and ``--crop``): a wrong
    argument is reported before any data is loaded or any file written.
    """
    from torchfpi.apps import session as distributed_session
    from torchfpi.apps.denoise import TrainConfig, check_training_data, save_weights, train_denoiser
    from torchfpi.cli import _checks
    from torchfpi.data.images import check_sigma
    from torchfpi.errors import UsageError
    from torchfpi.io import data_root, remove_stale_temp_files

    sigma = check_sigma(args.sigma)
    for name in ("steps", "batch_size", "crop", "val_images", "val_every", "threads", "limit_images"):
        _checks.positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    _checks.positive_int(args.threads, "--threads", maximum=1024)
    _checks.positive_number(args.lr, "--lr")
    _checks.positive_number(args.budget_minutes, "--budget-minutes")
    _checks.seed(args.seed)
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: expected 0 (at each validation) or a positive integer, "
                         f"got {args.checkpoint_every}")
    model_config: dict = {}
    if not (0.1 <= args.calibration_span <= 5.0):
        raise UsageError(f"--calibration-span: expected 0.1 .. 5.0, got {args.calibration_span}")
    if args.calibrate_data_weight and args.model == "fpi_nn":
        raise UsageError("--calibrate-data-weight: only for --model fpi_gd or unrolled")
    if args.unroll_steps is not None:
        if args.model != "unrolled":
            raise UsageError("--unroll-steps: only for --model unrolled")
        _checks.positive_int(args.unroll_steps, "--unroll-steps")
        model_config["steps"] = args.unroll_steps
    for name in ("tol", "max_iter"):
        value = getattr(args, name)
        if value is None:
            continue
        if args.model == "unrolled":
            raise UsageError(f"--{name.replace('_', '-')}: not for --model unrolled (use --unroll-steps)")
        if not (value > 0 and value != float("inf")):
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
        model_config[name] = value
    if args.limit_images is not None and args.limit_images <= args.val_images:
        raise UsageError(f"--limit-images: {args.limit_images} images leave none for training after the "
                         f"{args.val_images} validation images (--val-images); expected more than {args.val_images}")
    bank, adaptive, coarse = _filter_bank(args)
    if args.init is not None and not Path(args.init).exists():
        raise FileNotFoundError(2, "No such file or directory", str(args.init))
    ckpt = _checks.output_file(args.checkpoint or f"runs/denoise/{args.model}_s{sigma:g}.pt", "--checkpoint")
    out = (_checks.output_file(args.export, "--export") if args.export
           else ckpt.with_name(f"denoise_{args.model}_s{sigma:g}.pt"))
    if out.resolve() == ckpt.resolve():
        raise UsageError(f"--export: '{out}' is also the checkpoint: give another file name")
    init_state = _read_init(args, sigma, model_config)
    from torchfpi.apps.denoise import DEFAULT_CONFIGS, add_coarse_banks, grow_energy_state

    # the energy the run will build: the defaults, the --init file's, then each flag (fpi_nn: none)
    energy = {**DEFAULT_CONFIGS[args.model].get("energy", {}), **model_config.get("energy", {})}
    if bank:
        grow = init_state is not None and "energy.weight" in init_state
        if grow and init_state is not None:
            k0, k_old = init_state["energy.weight"].shape[0], init_state["energy.weight"].shape[-1]
            bank = {"n_filters": bank.get("n_filters", k0), "kernel_size": bank.get("kernel_size", k_old)}
            if bank["n_filters"] < k0 or bank["kernel_size"] < k_old:
                raise UsageError(f"--filters/--kernel-size: the --init energy has {k0} filters of "
                                 f"size {k_old}; a bank can grow, not shrink (got {bank['n_filters']} "
                                 f"of size {bank['kernel_size']})")
        energy.update(bank)
        n, k = energy["n_filters"], energy["kernel_size"]
        if n > k * k - 1:
            raise UsageError(f"--filters: at most {k * k - 1} filters of size {k}, got {n}")
        if grow and init_state is not None:
            init_state = grow_energy_state(init_state, n, k)
    if adaptive is not None:
        had = energy.get("adaptive_channels", 0)
        if had and had != adaptive:
            raise UsageError(f"--adaptive-data: the --init energy has a {had}-channel data weight network, got {adaptive}")
        energy["adaptive_channels"] = adaptive
    if coarse:
        had_banks = [list(c) for c in energy.get("coarse", [])]
        if coarse[:len(had_banks)] != had_banks:
            raise UsageError(f"--coarse: the --init energy has the coarse banks {had_banks}; give them first, "
                             f"then the new ones (got {coarse})")
        energy["coarse"] = coarse
        if init_state is not None and "energy.weight" in init_state:
            init_state = add_coarse_banks(init_state, coarse)
    if bank or adaptive is not None or coarse:
        model_config["energy"] = energy
    if args.model != "fpi_nn" and args.crop < energy["kernel_size"]:
        kernel = energy["kernel_size"]
        raise UsageError(f"--crop: {args.crop} is smaller than the {kernel}x{kernel} filters of the energy; "
                         f"expected at least {kernel}")
    cfg = TrainConfig(model=args.model, sigma=sigma, steps=args.steps, batch_size=args.batch_size,
                      crop=args.crop, lr=args.lr, val_images=args.val_images,
                      val_every=args.val_every, seed=args.seed,
                      budget_minutes=args.budget_minutes, threads=args.threads,
                      model_config=model_config, dtype=args.dtype,
                      calibrate_data_weight=args.calibrate_data_weight,
                      calibration_span=args.calibration_span)
    train_dir = data_root(args.data_root) / "denoise" / "Train400"
    check_training_data(cfg, train_dir, args.limit_images)
    progress = not args.quiet and sys.stderr.isatty()
    with distributed_session(None) as ctx:
        if args.batch_size < ctx.world_size:
            raise UsageError(f"--batch-size: {args.batch_size} is smaller than the {ctx.world_size} "
                             "processes of this torchrun (each process needs a crop of every batch)")
        export = train_denoiser(cfg, train_dir, ckpt, resume=args.resume,
                       progress=progress, log=(lambda s: None) if args.quiet else print,
                       limit_images=args.limit_images, init_state=init_state, ctx=ctx,
                       on_nonfinite=args.on_nonfinite, command=args.command_line,
                       checkpoint_every=args.checkpoint_every)
    if not ctx.is_main:  # rank 0 writes the weights and prints
        return 0
    export["train"]["command"] = args.command_line  # the last one; every command of the run: "commands"
    remove_stale_temp_files(out.parent)
    save_weights(export, out)
    best = export["train"]["best"]
    print(f"trained {args.model} sigma {sigma:g}: {export['train']['steps']} steps, "
          f"{export['train']['seconds']:.0f} s, best validation PSNR {best['psnr']:.3f} dB "
          f"at step {best['step']}; weights -> {out}")
    return 0
