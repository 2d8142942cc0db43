"""Time a DEQ MLP solve (forward + backward) with ``compute_dtype`` against plain float32.

Usage: ``python scripts/time_mixed_precision.py [--batch 256] [--width 512] [--repeats 5]``.
Prints, per compute dtype, the median wall time of forward + backward (interleaved rounds), the iteration counts and
the gradient's relative error against a float64 solve of the same problem.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import torchfpi


class DEQ(nn.Module):
    """f(z, x) = tanh(W z + U x + b), ||W||_2 = 0.5; computes in the dtype z arrives in."""

    def __init__(self, n: int = 16, d: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(n, n, generator=gen)
        self.W = nn.Parameter(0.5 * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(d, n, generator=gen) / d**0.5)
        self.b = nn.Parameter(0.1 * torch.randn(n, generator=gen))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = z.dtype
        return torch.tanh(z @ self.W.to(dt) + x.to(dt) @ self.U.to(dt) + self.b.to(dt))


def run(model: DEQ, x: torch.Tensor, w: torch.Tensor, tol: float, compute: object) -> tuple:
    x = x.clone().requires_grad_(True)
    sol = torchfpi.fixed_point(model, torch.zeros(x.shape[0], w.shape[1], dtype=x.dtype), x,
                               tol=tol, max_iter=500, compute_dtype=compute)  # type: ignore[arg-type]
    (g,) = torch.autograd.grad((sol.value * w).sum(), x)
    return sol, g


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    d = 64
    x, w = torch.randn(args.batch, d), torch.randn(args.batch, args.width)
    _, g64 = run(DEQ(args.width, d).double(), x.double(), w.double(), 1e-12, None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, width {args.width}")
    configs = (("float32", None, 1e-6), ("bfloat16", torch.bfloat16, 1e-2),
               ("float16", torch.float16, 1e-3), ("float32 at tol 1e-2", None, 1e-2))
    models = [DEQ(args.width, d) for _ in configs]
    times: list = [[] for _ in configs]
    results: list = [None] * len(configs)
    for r in range(args.repeats + 1):  # rounds interleave the configurations (shared machines)
        for i, (_, compute, tol) in enumerate(configs):
            t0 = time.perf_counter()
            results[i] = run(models[i], x, w, tol, compute)
            if r:  # round 0 warms up
                times[i].append(time.perf_counter() - t0)
    for (name, _, _), ts, (sol, g) in zip(configs, times, results):
        err = float((g.double() - g64).norm() / g64.norm())
        bwd = int(sol.backward.iterations.max()) if sol.backward is not None else 0
        print(f"{name:>20}: {1e3 * statistics.median(ts):8.1f} ms fwd+bwd (median of {len(ts)}), "
              f"iterations {int(sol.iterations.max())}/{bwd}, grad rel err vs float64 {err:.1e}")

if __name__ == "__main__":
    main()
