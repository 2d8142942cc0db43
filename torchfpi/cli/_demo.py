"""``torchfpi demo``: train FPI_GD on the Bibtex copy embedded in the package (no data root).

Prints the test example-based F1 and the forward/backward fixed-point iteration counts, and
writes a plot of the training curves. A few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``torchfpi demo``."""
    p = commands.add_parser(
        "demo",
        help="train FPI_GD on the embedded Bibtex multi-label data set (a few minutes on CPU)",
        description="Train FPI_GD (a fixed point of gradient descent on a learned label energy, "
        "trained with the implicit backward FPI) on Bibtex, shipped inside the package. Epoch "
        "and threshold are chosen on a validation split; the test split is evaluated once.",
    )
    p.add_argument("--epochs", type=int, default=25, help="maximum epochs (default 25)")
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, weights and batch order")
    p.add_argument("--out-dir", default="runs/demo", help="where the plot and results go")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda[:N]' or 'auto'")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no per-epoch lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Train, print the test F1 and iteration counts, save the plot."""
    from torchfpi.cli import _checks
    from torchfpi.errors import UsageError
    from torchfpi.io import atomic_write_bytes, atomic_write_json, remove_stale_temp_files
    from torchfpi.runtime import require, resolve_device

    if args.epochs < 1:
        raise UsageError(f"--epochs: expected >= 1, got {args.epochs}")
    if args.patience < 1:
        raise UsageError(f"--patience: expected >= 1, got {args.patience}")
    if args.max_steps is not None and args.max_steps < 1:
        raise UsageError(f"--max-steps: expected >= 1, got {args.max_steps}")
    _checks.seed(args.seed)
    device = resolve_device(args.device)
    out_dir = _checks.output_dir(args.out_dir, "--out-dir")
    for module in ("numpy", "matplotlib"):
        require(module)
    from torchfpi.apps.multilabel import TrainConfig, make_splits, train_multilabel
    from torchfpi.apps.multilabel.recipes import BUDGET, model_config
    from torchfpi.data import load_embedded_bibtex

    splits = make_splits(load_embedded_bibtex("train"), load_embedded_bibtex("test"))
    cfg = TrainConfig(
        dataset="bibtex",
        model="fpi_gd",
        seed=args.seed,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=BUDGET["batch_size"],
        lr=BUDGET["lr"],
        f1_weight=BUDGET["f1_weight"],
        device=str(device),
        model_cfg=model_config("fpi_gd"),
    )
    print(
        f"FPI_GD on embedded Bibtex: {splits.x_train.shape[0]} train / {splits.x_val.shape[0]} "
        f"validation / {splits.x_test.shape[0]} test examples, {splits.x_train.shape[1]} features, "
        f"{splits.y_train.shape[1]} labels",
        flush=True,
    )
    result = train_multilabel(
        cfg,
        splits,
        progress=not args.quiet and sys.stderr.isatty(),
        log=(lambda msg: None) if args.quiet else (lambda msg: print(msg, flush=True)),
        max_steps=args.max_steps,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    plot = out_dir / "training_curves.png"
    atomic_write_bytes(plot, _plot(result["history"]))
    atomic_write_json(result, out_dir / "result.json")

    def fmt(v: object) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    print(f"test example-based F1: {result['test_f1']:.2f} % (threshold {result['threshold']:.2f} "
          f"and epoch {result['best_epoch']} chosen on validation, validation F1 {result['val_f1']:.2f} %)")
    print(f"fixed-point iterations per sample: forward {fmt(result['train_forward_iterations'])} "
          f"(training) / {fmt(result['test_forward_iterations'])} (test), backward "
          f"{fmt(result['train_backward_iterations'])} (training); "
          f"{result['epoch_s_mean']:.1f} s per epoch")
    print(f"training curves: {plot}")
    return 0


def _plot(history: list) -> bytes:
    """The training curves as PNG bytes (written atomically by the caller)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0].set(title="training loss (BCE + 0.1 soft-F1 term)", xlabel="epoch")
    axes[1].plot(epochs, [h["val_f1"] for h in history], marker="o", color="C1")
    axes[1].set(title="validation example F1 (%)", xlabel="epoch")
    for key, label in (("train_forward_iterations", "forward"), ("train_backward_iterations", "backward")):
        vals = [h.get(key) for h in history]
        if any(v is not None for v in vals):
            axes[2].plot(epochs, [float("nan") if v is None else v for v in vals], marker="o", label=label)
    axes[2].set(title="fixed-point iterations per batch", xlabel="epoch")
    axes[2].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
