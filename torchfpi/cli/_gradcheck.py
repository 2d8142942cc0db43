"""``torchfpi gradcheck``: every backward mode against each other and finite differences."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "gradcheck",
        help="check the gradients of every backward mode on a built-in DEQ problem (float64)",
        description=(
            "Builds a random contractive DEQ layer z = tanh(W z + U x) in float64, computes the "
            "gradients of a random linear loss with every backward mode, and compares them with "
            "the dense reference and central finite differences. Exits 1 if an exact mode disagrees."
        ),
    )
    p.add_argument("--batch", type=int, default=4, help="batch size (default 4)")
    p.add_argument("--dim", type=int, default=8, help="state size (default 8)")
    p.add_argument("--radius", type=float, default=0.8, help="spectral norm of W, < 1 (default 0.8)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative error of exact modes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random test problem")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from torchfpi import check_gradients
    from torchfpi.errors import UsageError

    if args.batch < 1 or args.dim < 1:
        raise UsageError(f"--batch and --dim must be >= 1, got {args.batch} and {args.dim}")
    if args.batch > 256 or args.dim > 256:
        raise UsageError(f"--batch and --dim: at most 256 (a dense Jacobian check), got {args.batch} and {args.dim}")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed: expected an integer in [0, 2**63), got {args.seed}")
    if not 0 < args.radius < 1:
        raise UsageError(f"--radius: expected a number in (0, 1), got {args.radius}")
    if not 0 < args.tolerance < float("inf"):
        raise UsageError(f"--tolerance: expected a positive number, got {args.tolerance}")
    gen = torch.Generator().manual_seed(args.seed)
    dt = torch.float64
    W = torch.randn(args.dim, args.dim, generator=gen, dtype=dt)
    W = args.radius * W / torch.linalg.matrix_norm(W, 2)
    layer = torch.nn.Linear(args.dim, args.dim, dtype=dt)
    with torch.no_grad():
        layer.weight.copy_(W)
    x = torch.randn(args.batch, args.dim, generator=gen, dtype=dt, requires_grad=True)

    class Map(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = layer

        def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.lin(z) + x)

    report = check_gradients(
        Map(), torch.zeros(args.batch, args.dim, dtype=dt), x, tolerance=args.tolerance, seed=args.seed
    )
    print(f"reference: {report.reference}; tolerance for exact modes: {report.tolerance:.1e}")
    print(report.table())
    print("OK" if report.ok else "MISMATCH")
    return 0 if report.ok else 1
