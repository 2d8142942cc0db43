"""``torchfpi train flow`` and ``torchfpi flow FRAME1 FRAME2 --out flow.flo --png flow.png``."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional

from torchfpi.apps.flow.api import LEARNED, METHODS, SHIPPED_WEIGHTS


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``torchfpi flow`` and ``torchfpi train flow``."""
    p = commands.add_parser("flow", help="estimate optical flow between two frames with the learned FPI model")
    p.add_argument("frame1", help="first frame (image file)")
    p.add_argument("frame2", help="second frame (image file, same size)")
    p.add_argument("--out", default=None, help="write the flow as a Middlebury .flo file")
    p.add_argument("--png", default=None, help="write a colour-wheel visualisation PNG")
    p.add_argument("--weights", default=None, help="weights file (default: the shipped weights of --method, e.g. "
                   f"{SHIPPED_WEIGHTS['fpi_gd'].name})")
    p.add_argument("--method", choices=METHODS, default="fpi_gd",
                   help="learned variational FPI model (default), its FPI_NN refinement, or Horn-Schunck")
    p.add_argument("--truth", default=None, help="ground-truth .flo file: also print the end-point error")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the model runs: 'cpu', 'cuda[:N]' or 'auto'")
    p.add_argument("--quiet", action="store_true", help="print nothing on success (no progress either)")
    p.set_defaults(func=run_flow)

    t = train.add_parser("flow", help="train the learned variational flow model on synthetic pairs")
    t.add_argument("--model", choices=LEARNED, default="fpi_gd",
                   help="fpi_gd: the variational energy model; fpi_nn: its FPI_NN refinement (needs --base)")
    t.add_argument("--base", default=str(SHIPPED_WEIGHTS["fpi_gd"]), help="fpi_gd weights refined by --model fpi_nn (default: the shipped flow_fpi_gd.pt)")
    t.add_argument("--out", default="runs/flow", help="output folder (checkpoint.pt, its JSON-lines log checkpoint.jsonl, best.pt, train.json)")
    t.add_argument("--steps", type=int, default=150, help="optimiser steps")
    t.add_argument("--batch-size", type=int, default=None,
                   help="global batch of pairs per step (default 4 for fpi_gd, 8 for fpi_nn)")
    t.add_argument("--size", type=int, default=96, help="side of the synthetic training images")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.03 for fpi_gd, 1e-3 for fpi_nn)")
    t.add_argument("--max-motion", type=float, default=6.0, help="largest synthetic translation (pixels)")
    t.add_argument("--pairs", type=int, default=None,
                   help="--model fpi_nn: synthetic training pairs whose fpi_gd flows are precomputed (default 320)")
    t.add_argument("--val-pairs", type=int, default=16, help="synthetic validation pairs (fixed seed)")
    t.add_argument("--val-every", type=int, default=25, help="steps between validations (and checkpoints)")
    t.add_argument("--seed", type=int, default=0, help="seed of weights and synthetic pairs")
    t.add_argument("--max-iter", type=int, default=40, help="sweeps per fixed-point solve")
    t.add_argument("--data-root", default=None,
                   help="data root holding denoise/Train400, whose images are the textures (default "
                   "$TORCHFPI_DATA, then the per-user cache; 'torchfpi data fetch train400' brings them); "
                   "without them the command stops unless --procedural is given")
    t.add_argument("--procedural", action="store_true",
                   help="procedural noise textures instead of Train400 (said in the output and train.json)")
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (--model fpi_nn: OUT/checkpoint_nn.pt)")
    t.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints (default 0: at each validation)")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="model and data precision (float64: runs match across process counts)")
    t.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip",
                   help="a NaN/Inf loss or gradient skips the step (default) or stops training")
    t.add_argument("--quiet", action="store_true", help="print only errors")
    t.set_defaults(func=run_train)


def _texture_root(args: argparse.Namespace) -> Optional[Path]:
    """The data root whose ``denoise/Train400`` images give the textures; None with ``--procedural``.

    Raises:
        DataError: no such data root, or no Train400 images under it (the message names the
            command that fetches them and ``--procedural``).
    """
    from torchfpi.data.images import list_images
    from torchfpi.errors import DataError
    from torchfpi.io import data_root

    if args.procedural:
        return None
    root = data_root(args.data_root)
    folder = root / "denoise" / "Train400"
    try:
        list_images(folder)
    except DataError as exc:
        # The reader's message already names the fetch command; add only the alternative.
        raise DataError(f"train flow: no texture images: {exc}; or pass --procedural to train on "
                        "procedural noise textures") from exc
    return root


def run_train(args: argparse.Namespace) -> int:
    """Train the model; print the best validation EPE. Runs unchanged under ``torchrun``.

    Every flag, the ``--base`` weights, the ``--out`` folder and the texture images are checked
    before any work.
    """
    import torch

    from torchfpi.apps import session as distributed_session
    from torchfpi.apps.flow import load_flow_model
    from torchfpi.apps.flow.models import FlowConfig
    from torchfpi.apps.flow.train import TrainConfig, train
    from torchfpi.cli import _checks
    from torchfpi.errors import UsageError

    if args.batch_size is None:
        args.batch_size = 4 if args.model == "fpi_gd" else 8
    for name in ("steps", "batch_size", "size", "val_pairs", "val_every", "max_iter", "threads"):
        _checks.positive_int(getattr(args, name), f"--{name.replace('_', '-')}")
    _checks.positive_int(args.threads, "--threads", maximum=1024)
    _checks.positive_int(args.size, "--size", maximum=4096)
    _checks.seed(args.seed)
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: expected 0 (at each validation) or a positive integer, got {args.checkpoint_every}")
    if args.size < 32:
        raise UsageError(f"--size: expected at least 32, got {args.size}")
    if args.pairs is not None and args.model != "fpi_nn":
        raise UsageError(f"--pairs: only for --model fpi_nn (its precomputed data set); --model {args.model} "
                         "draws new pairs at every step: drop --pairs")
    if args.pairs is None:
        args.pairs = 320
    _checks.positive_int(args.pairs, "--pairs", maximum=100_000)
    if args.lr is None:
        args.lr = 0.03 if args.model == "fpi_gd" else 1e-3
    if not (math.isfinite(args.lr) and args.lr > 0 and math.isfinite(args.max_motion) and args.max_motion > 0):
        raise UsageError(f"--lr and --max-motion must be positive, got {args.lr} and {args.max_motion}")
    if args.procedural and args.data_root is not None:
        raise UsageError("--procedural and --data-root contradict each other: procedural textures "
                         "need no data; drop one of them")
    base = Path(args.base)
    if args.model == "fpi_nn" and not base.exists():
        raise FileNotFoundError(2, "No such file or directory", str(base))
    out = _checks.output_dir(args.out, "--out")
    base_model = load_flow_model("fpi_gd", base) if args.model == "fpi_nn" else None
    root = _texture_root(args)
    torch.set_num_threads(args.threads)
    command = args.command_line
    with distributed_session(torch.device("cpu")) as ctx:
        if ctx.distributed and args.batch_size % ctx.world_size:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by the {ctx.world_size} "
                             "processes of this torchrun: choose a multiple of --nproc_per_node")
        if ctx.distributed and args.val_pairs < ctx.world_size:
            raise UsageError(f"--val-pairs {args.val_pairs} is smaller than the {ctx.world_size} processes of this "
                             "torchrun: each process validates on its share, give at least one pair each")
        if base_model is not None:
            summary, best_file = _train_refine(args, base_model, root, command, ctx), out / "best_nn.pt"
        else:
            cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, size=args.size, lr=args.lr,
                              max_motion=args.max_motion, val_pairs=args.val_pairs, val_every=args.val_every,
                              seed=args.seed, checkpoint_every=args.checkpoint_every,
                              on_nonfinite=args.on_nonfinite, dtype=args.dtype)
            summary = train(out, cfg, FlowConfig(max_iter=args.max_iter), data_root=root,
                            resume=args.resume, quiet=args.quiet, command=command, ctx=ctx)
            best_file = out / "best.pt"
    if not args.quiet and ctx.is_main:
        b = summary["best"]
        where = "procedural noise textures" if root is None else "Train400 textures"
        print(f"best synthetic validation EPE {b['val_epe']:.4f} at step {b['step']} ({where}): {best_file}")
    return 0


def _train_refine(args: argparse.Namespace, base: Any, root: Optional[Path], command: str, ctx: Any) -> dict:
    """``--model fpi_nn``: train the FPI_NN refinement of the ``--base`` model; returns the summary."""
    from torchfpi.apps.flow.train import train_refine

    return train_refine(Path(args.out), base, pairs=args.pairs, steps=args.steps, size=args.size,
                        batch_size=args.batch_size, val_pairs=args.val_pairs, val_every=args.val_every,
                        seed=args.seed, max_motion=args.max_motion, data_root=root, quiet=args.quiet,
                        lr=args.lr, command=command, resume=args.resume,
                        checkpoint_every=args.checkpoint_every, on_nonfinite=args.on_nonfinite,
                        dtype=args.dtype, ctx=ctx)


def run_flow(args: argparse.Namespace) -> int:
    """Estimate the flow of one pair and write the requested outputs (checked before the solve)."""
    import torch

    from torchfpi.apps import flow as flow_app
    from torchfpi.apps.flow.api import load_flow_model
    from torchfpi.cli import _checks
    from torchfpi.cli._progress import ticking
    from torchfpi.data.flo import write_flo, write_flow_png
    from torchfpi.errors import DataError, UsageError
    from torchfpi.io import remove_stale_temp_files
    from torchfpi.runtime import resolve_device

    if args.threads < 0:
        raise UsageError(f"--threads: expected 0 (default) or a positive integer, got {args.threads}")
    _checks.positive_int(args.threads or None, "--threads", maximum=1024)
    if args.out is None and args.png is None and args.truth is None:
        raise UsageError("nothing to write: give --out FLOW.flo and/or --png FLOW.png (or --truth GT.flo for the error)")
    if args.out is not None and not str(args.out).endswith(".flo"):
        raise UsageError(f"--out: expected a path ending in .flo, got '{args.out}'")
    if args.png is not None and not str(args.png).lower().endswith(".png"):
        raise UsageError(f"--png: expected a path ending in .png, got '{args.png}'")
    out = _checks.output_file(args.out, "--out", (".flo",)) if args.out is not None else None
    png = _checks.output_file(args.png, "--png", (".png",)) if args.png is not None else None
    if out is not None and png is not None and out.resolve() == png.resolve():
        raise UsageError("--out and --png name the same file")
    if args.method not in LEARNED and args.weights is not None:
        raise UsageError(f"--weights: not for --method {args.method} (it has no learned weights)")
    device = resolve_device(args.device)
    model = load_flow_model(args.method, args.weights, device)  # its errors come before the frames'
    f1 = flow_app.to_grey_tensor(flow_app.read_image(args.frame1))
    f2 = flow_app.to_grey_tensor(flow_app.read_image(args.frame2))
    flow_app.check_pair(f1, f2)
    truth = None
    if args.truth is not None:
        from torchfpi.data.flo import read_flo

        truth = read_flo(args.truth)
        if truth.shape[:2] != tuple(f1.shape[-2:]):
            raise DataError(f"--truth: '{args.truth}' is {truth.shape[0]}x{truth.shape[1]} (H x W) but the "
                            f"frames are {f1.shape[-2]}x{f1.shape[-1]}: give the ground truth of this pair")
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad(), ticking(f"flow {args.method}", enabled=not args.quiet):
        flow, info = model(f1.to(device), f2.to(device))
    flow = flow.cpu()
    for target in (out, png):
        if target is not None:
            remove_stale_temp_files(target.parent)
    if out is not None:
        write_flo(out, flow[0].numpy().transpose(1, 2, 0))
    if png is not None:
        write_flow_png(png, flow[0])
    if not args.quiet:
        mag = flow[0].norm(dim=0)
        print(f"flow {tuple(flow.shape[-2:])}: mean |flow| {float(mag.mean()):.3f} px, max {float(mag.max()):.3f} px, "
              f"{info['iterations']} fixed-point iterations over {info['solves']} solves")
    if truth is not None:
        from torchfpi.data.flo import end_point_error

        try:
            epe = end_point_error(flow[0], truth)
        except ValueError as exc:  # no known pixel in the ground truth
            raise DataError(f"--truth: '{args.truth}': {exc}") from exc
        print(f"end-point error {epe:.4f} px against {args.truth}")
    return 0
