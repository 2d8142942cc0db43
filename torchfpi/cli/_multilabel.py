"""``torchfpi train multilabel``: train MLP / SPEN / FPI_NN / FPI_GD on a multi-label dataset."""

from __future__ import annotations

import argparse
import sys

DATASETS = ("bibtex", "delicious", "bookmarks")
MODEL_NAMES = ("mlp", "spen", "fpi_nn", "fpi_gd")


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``torchfpi train multilabel``."""
    p = train.add_parser(
        "multilabel",
        help="multi-label classification (Bibtex, Delicious, Bookmarks)",
        description="Train one model on one multi-label dataset. Epoch and decision threshold "
        "are chosen on a validation split carved from the training set; the test split is "
        "evaluated once, at the end.",
    )
    p.add_argument("--dataset", choices=DATASETS, default="bibtex", help="multi-label data set (ARFF, Mulan format)")
    p.add_argument("--model", choices=MODEL_NAMES, default="fpi_gd",
                   help="mlp: the unary network alone; spen: the unrolled energy baseline; fpi_gd / fpi_nn: "
                   "fixed-point layers")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--epochs", type=int, default=40, help="maximum epochs (default 40)")
    p.add_argument("--patience", type=int, default=6, help="early-stopping patience in epochs")
    p.add_argument("--batch-size", type=int, default=128, help="rows per step (the global batch under torchrun)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--f1-weight", type=float, default=0.1,
                   help="weight of the soft example-F1 term of the loss (default 0.1; 0: BCE only)")
    p.add_argument("--pretrain-epochs", type=int, default=0,
                   help="epochs of unary-only training before the structured model (default 0)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training rows held out for validation (epoch and threshold choice)")
    p.add_argument("--hidden", type=int, default=None, help="hidden width of the unary MLP (default 1024)")
    p.add_argument("--energy-hidden", type=int, default=None, help="label-interaction units K (default: recipe)")
    p.add_argument("--unroll-steps", type=int, default=None, help="SPEN's unrolled steps T (default 10)")
    p.add_argument("--step-size", type=float, default=None, help="gradient step of SPEN / FPI_GD (default 1)")
    p.add_argument("--tol", type=float, default=1e-4, help="fixed-point tolerance (forward and backward)")
    p.add_argument("--max-iter", type=int, default=50, help="fixed-point iteration cap")
    p.add_argument("--solver", choices=("fpi", "anderson"), default="fpi",
                   help="forward solver of fpi_gd / fpi_nn (default fpi)")
    p.add_argument("--backward", choices=("fpi", "anderson", "neumann", "onestep", "unroll"), default="fpi",
                   help="backward mode of fpi_gd / fpi_nn (default fpi: the exact implicit gradient)")
    p.add_argument("--data-root", default=None,
                   help="data root (default $TORCHFPI_DATA, then the per-user cache; see docs/data.md)")
    p.add_argument("--train-arff", default=None, help="ARFF file of the training split (e.g. Bookmarks)")
    p.add_argument("--test-arff", default=None, help="ARFF file of the test split")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:N' or 'auto'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint-dir", default="checkpoints/multilabel",
                   help="folder of the checkpoint DATASET-MODEL-seedSEED.pt and its .jsonl log")
    p.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    p.add_argument("--out", default=None, help="write the result JSON here (a .json file, checked before training)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--checkpoint-every", type=int, default=0,
                   help="steps between checkpoints besides the one at each epoch's end (0: only there); "
                   "a kill loses at most this many steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 for runs that must match across process counts to 1e-6")
    p.add_argument("--input-dropout", type=float, default=None, help="dropout on the features (default 0.3)")
    p.add_argument("--hidden-dropout", type=float, default=None, help="dropout on the hidden layer (default 0.5)")
    p.add_argument("--on-nonfinite", choices=("skip", "stop"), default="skip",
                   help="a NaN/Inf loss or gradient: skip the step (default) or stop training")
    p.set_defaults(func=run)


def _check_options(args: argparse.Namespace) -> None:
    """Refuse every bad flag with a usage error naming it, before any data is read."""
    import math

    from torchfpi.cli import _checks
    from torchfpi.errors import UsageError

    for name in ("hidden", "energy_hidden", "unroll_steps"):
        _checks.positive_int(getattr(args, name), f"--{name.replace('_', '-')}", maximum=1_000_000)
    if args.max_iter < 1:
        raise UsageError(f"--max-iter: expected a positive integer, got {args.max_iter}")
    for name in ("epochs", "batch_size", "patience"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.pretrain_epochs < 0:
        raise UsageError(f"--pretrain-epochs: expected >= 0, got {args.pretrain_epochs}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr: expected > 0, got {args.lr}")
    if not 0.0 < args.val_fraction < 1.0:
        raise UsageError(f"--val-fraction: expected a number in (0, 1), got {args.val_fraction}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps: expected >= 1, got {args.max_steps}")
    if args.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every: expected 0 (at each epoch's end) or a positive integer, "
                         f"got {args.checkpoint_every}")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise UsageError(f"--threads: expected >= 1, got {args.threads}" if args.threads < 1
                         else f"--threads: expected at most 1024, got {args.threads}")
    _checks.seed(args.seed)
    if (args.train_arff is None) != (args.test_arff is None):
        raise UsageError("--train-arff and --test-arff go together: give both or neither")
    for name in ("tol", "step_size"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    for name in ("input_dropout", "hidden_dropout"):
        value = getattr(args, name)
        if value is not None and not 0.0 <= value < 1.0:
            raise UsageError(f"--{name.replace('_', '-')}: expected a number in [0, 1), got {value}")
    for name in ("solver", "backward"):
        if getattr(args, name) != "fpi" and args.model not in ("fpi_gd", "fpi_nn"):
            raise UsageError(f"--{name}: only for --model fpi_gd or fpi_nn (got --model {args.model})")
    if not (math.isfinite(args.f1_weight) and args.f1_weight >= 0):
        raise UsageError(f"--f1-weight: expected a number >= 0, got {args.f1_weight}")


def run(args: argparse.Namespace) -> int:
    """Train and print the test F1. Every flag and output path is checked before the data is read."""
    from torchfpi.cli import _checks
    from torchfpi.errors import UsageError
    from torchfpi.io import atomic_write_json, remove_stale_temp_files
    from torchfpi.runtime import require, resolve_device

    _check_options(args)
    device = resolve_device(args.device)
    ckpt_dir = _checks.output_dir(args.checkpoint_dir, "--checkpoint-dir")
    out = _checks.output_file(args.out, "--out", (".json",)) if args.out else None
    for module in ("numpy", "arff"):
        require(module)
    import torch

    from torchfpi.apps import session as distributed_session
    from torchfpi.apps.multilabel import TrainConfig, make_splits, train_multilabel
    from torchfpi.apps.multilabel.recipes import model_config
    from torchfpi.data import load_multilabel

    train = load_multilabel(args.dataset, "train", root=args.data_root, path=args.train_arff)
    test = load_multilabel(args.dataset, "test", root=args.data_root, path=args.test_arff)
    if train.num_labels != test.num_labels or train.num_features != test.num_features:
        raise UsageError(
            f"train and test files disagree: {train.num_features} vs {test.num_features} features, "
            f"{train.num_labels} vs {test.num_labels} labels"
        )
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = {
        k: v
        for k, v in dict(
            hidden=args.hidden,
            energy_hidden=args.energy_hidden,
            unroll_steps=args.unroll_steps,
            step_size=args.step_size,
            input_dropout=args.input_dropout,
            hidden_dropout=args.hidden_dropout,
        ).items()
        if v is not None
    }
    model_cfg = model_config(
        args.model,
        tol=args.tol,
        backward_tol=args.tol,
        max_iter=args.max_iter,
        backward_max_iter=args.max_iter,
        solver=args.solver,
        backward=args.backward,
        **overrides,
    )
    cfg = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        pretrain_epochs=args.pretrain_epochs,
        f1_weight=args.f1_weight,
        device=str(device),
        dtype=args.dtype,
        model_cfg=model_cfg,
    )
    splits = make_splits(train, test, args.val_fraction)
    ckpt = ckpt_dir / f"{args.dataset}-{args.model}-seed{args.seed}.pt"
    with distributed_session(device) as ctx:
        result = train_multilabel(
            cfg,
            splits,
            checkpoint=ckpt,
            resume=args.resume,
            progress=not args.quiet and sys.stderr.isatty(),
            log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr)),
            max_steps=args.max_steps,
            ctx=ctx,
            on_nonfinite=args.on_nonfinite,
            checkpoint_every=args.checkpoint_every,
        )
    if not ctx.is_main:  # rank 0 prints and writes the results
        return 0
    result["command"] = args.command_line
    print(
        f"{args.dataset} {args.model} seed {args.seed}: test F1 {result['test_f1']:.2f} "
        f"(validation F1 {result['val_f1']:.2f}, threshold {result['threshold']:.2f}, "
        f"best epoch {result['best_epoch']}, {result['epoch_s_mean']:.1f} s/epoch"
        + (
            f", forward iterations {result['train_forward_iterations']:.1f}"
            if result["train_forward_iterations"] is not None
            else ""
        )
        + (
            f", backward iterations {result['train_backward_iterations']:.1f}"
            if result["train_backward_iterations"] is not None
            else ""
        )
        + ")"
    )
    if out is not None:
        remove_stale_temp_files(out.parent)
        atomic_write_json(result, out)
    return 0
