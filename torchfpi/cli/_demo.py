"""``torchfpi demo``: the main job (placeholder until the multi-label demo lands)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    p = commands.add_parser("demo", help="solve and train a small FPI layer, printing its stats")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import torchfpi

    torch.manual_seed(args.seed)
    layer = torchfpi.FPINN(torchfpi.MLPUpdate(8, 4, hidden=32), tol=1e-5)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(64, 4)
    target = torch.sin(x @ torch.randn(4, 8))
    for step in range(args.steps):
        loss = ((layer(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            sol = layer.last_solution
            print(f"step {step:4d} loss {loss.item():.4f} forward iters {sol.iterations.float().mean():.1f} "
                  f"backward iters {sol.backward.iterations.float().mean():.1f}")
    return 0
