"""Where a DEQ solve's time goes beyond the map: parts of torchfpi's loop timed in place.

Usage: ``python benchmarks/time_solve_parts.py [--problem deq] [--solves 300]`` (one torch
thread; pin it to a core, e.g. ``taskset -c 1``, for steadier numbers).

A developer's tool, not a user script: it times private parts of the loop (``torchfpi._book``,
``torchfpi._adjoints``) in place, which is why it lives beside the benchmark results and not in
``scripts/`` (whose files use the public modules only).

On the benchmark's ``deq`` problem (``--problem deq_small`` for 32x64), ``fixed_point(f, z0,
*inputs, tol=1e-6, max_iter=500)`` and its gradient, interleaved solves, process CPU time:

* the adjoint's in-place sum (``u <- J^T u + g`` into the autograd engine's result): the
  backward's time with it over the time without it, paired median;
* the per-iteration norms (:meth:`_Book.measure`) and the host read of a window
  (:meth:`_Book.check`, the last window's per-sample gather included), per call, with the
  default per-sample stop and with ``stop="batch"``;
* the calls of f and of the VJPs, per call, for scale.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any, Callable, Dict, List

import torch

import torchfpi
from torchfpi import _adjoints, _book
from torchfpi.bench._problems import build


def _timed(owner: Any, name: str, sink: Dict[str, List[float]], label: str) -> Callable[[], None]:
    """Wrap ``owner.name`` to add each call's CPU time to ``sink[label]``; returns the undo."""
    real = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        t = time.process_time()
        try:
            return real(*args, **kwargs)
        finally:
            sink[label].append(time.process_time() - t)

    setattr(owner, name, wrapped)
    return lambda: setattr(owner, name, real)


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", choices=("deq", "deq_small"), default="deq")
    parser.add_argument("--solves", type=int, default=300, help="solves per arm (default 300)")
    args = parser.parse_args(argv)
    if args.solves < 1:
        parser.error(f"--solves: expected a positive integer, got {args.solves}")
    torch.set_num_threads(1)
    inst = build(args.problem, quick=False, dtype=torch.float32, device=torch.device("cpu"), seed=0)
    loss_weight = inst.weight
    real_fresh = _adjoints._fresh

    def backward_time(in_place: bool, stop: str = "sample") -> float:
        _adjoints._fresh = real_fresh if in_place else (lambda *a: False)
        z = torchfpi.fixed_point(inst.f, inst.z0, *inst.inputs, tol=1e-6, max_iter=500, stop=stop).value
        t = time.process_time()
        torch.autograd.grad((loss_weight * z).sum(), inst.params)
        return time.process_time() - t

    for _ in range(10):  # warm-up (also fills the loop's window history)
        backward_time(True), backward_time(False)
    arms: Dict[bool, List[float]] = {True: [], False: []}
    for r in range(args.solves):
        for arm in ((True, False) if r % 2 else (False, True)):
            arms[arm].append(backward_time(arm))
    _adjoints._fresh = real_fresh
    ratio = statistics.median(a / b for a, b in zip(arms[True], arms[False]))
    print(f"{args.problem}: backward with the in-place sum / without: {ratio:.3f} (paired median of "
          f"{args.solves}; {1e3 * statistics.median(arms[True]):.3f} vs {1e3 * statistics.median(arms[False]):.3f} ms)")

    for stop in ("sample", "batch"):
        sink: Dict[str, List[float]] = collections.defaultdict(list)
        undo = [_timed(_book._Book, "measure", sink, "norms per iteration (measure)"),
                _timed(_book._Book, "check", sink, "host read of a window (check)"),
                _timed(_book._Book, "_all_converged", sink, "last window's per-sample results (in check)")]
        def counted_f(z: torch.Tensor, *a: Any, _f: Any = inst.f, _sink: Any = sink) -> torch.Tensor:
            t = time.process_time()
            out = _f(z, *a)
            _sink["call of f"].append(time.process_time() - t)
            return out

        for _ in range(args.solves):
            z = torchfpi.fixed_point(counted_f, inst.z0, *inst.inputs, tol=1e-6, max_iter=500, stop=stop).value
            torch.autograd.grad((loss_weight * z).sum(), inst.params)
        for u in undo:
            u()
        print(f"{args.problem}, stop={stop!r}, per call (median, both directions):")
        for label, times in sink.items():
            print(f"  {label}: {1e6 * statistics.median(times):.1f} us over {len(times)} calls")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
