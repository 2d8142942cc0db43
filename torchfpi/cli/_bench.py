"""``torchfpi bench``: torchfpi against TorchDEQ 0.1.0 and plain autograd (see docs/bench.md)."""

from __future__ import annotations

import argparse
import sys


def register(commands: argparse._SubParsersAction, train: argparse._SubParsersAction) -> None:
    """Add ``torchfpi bench``."""
    p = commands.add_parser(
        "bench",
        help="benchmark solvers and backward modes against TorchDEQ and unrolled autograd",
        description=(
            "Runs every method on the same problems (DEQ MLP, convolutional DEQ, FPI_GD "
            "multi-label energy, mixed-rate batch) at the same tolerance, dtype and device, "
            "interleaving repeats after warm-up. Writes results.json, results.md and plots to "
            "--out, and prints which of the issue's claims hold. Exit 0 even if a claim fails "
            "(the report says so); exit 1 with --strict."
        ),
    )
    p.add_argument("--quick", action="store_true", help="tiny problems, 2 repeats (a smoke run, ~1 min)")
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results[/quick])")
    p.add_argument("--problems", default=None, help="comma-separated subset of: mlp,conv,multilabel,mixed,smooth_gd")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all); see --list")
    p.add_argument("--list", action="store_true", help="list problems and methods, then exit")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 7, quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up runs per method (default 1)")
    p.add_argument("--tol", type=float, default=1e-5, help="relative residual tolerance (default 1e-5)")
    p.add_argument("--max-iter", type=int, default=500, help="iteration budget, forward and backward")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="precision of the benchmark problems")
    p.add_argument("--device", default="cpu", help="'cpu', 'cuda[:N]' or 'auto'")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings)")
    p.add_argument("--clock", default="auto", choices=["auto", "cpu", "wall"],
                   help="timer: process CPU time (auto on CPU) or wall time (auto on CUDA)")
    p.add_argument("--sweep", default=None,
                   help="comma-separated K of the memory sweep (default 10,25,50,100,150,200); 'none' to skip")
    p.add_argument("--no-torchdeq", action="store_true", help="leave TorchDEQ out even if installed")
    p.add_argument("--no-plots", action="store_true", help="write no PNG figures")
    p.add_argument("--resume", action="store_true", help="keep finished problems of --out/results.json")
    p.add_argument("--strict", action="store_true", help="exit 1 if a claim of the issue fails")
    p.add_argument("--seed", type=int, default=0, help="seed of the random problems")
    p.add_argument("--quiet", action="store_true", help="print only the summary")
    p.set_defaults(func=run)


def _split(value: str, what: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    from torchfpi.errors import UsageError

    items = tuple(s.strip() for s in value.split(",") if s.strip())
    if not items:
        raise UsageError(f"--{what}: expected a comma-separated list, got {value!r}")
    if allowed is not None:
        bad = [s for s in items if s not in allowed]
        if bad:
            raise UsageError(f"--{what}: unknown {bad}; expected some of {list(allowed)}")
    return items


def run(args: argparse.Namespace) -> int:
    """Run the benchmark and print the claims table."""
    from pathlib import Path

    from torchfpi.bench import PROBLEMS, Config, methods, run_benchmark
    from torchfpi.errors import UsageError
    from torchfpi.runtime import require, resolve_device

    require("numpy", "bench")
    if args.list:
        print("problems: " + ", ".join(PROBLEMS))
        print("methods:")
        for m in methods(include_torchdeq=True):
            print(f"  {m.name}{'' if m.exact else '  (inexact gradient)'}")
        return 0
    for name in ("repeats", "max_iter", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if args.warmup < 0:
        raise UsageError(f"--warmup: expected an integer >= 0, got {args.warmup}")
    if not (args.tol > 0 and args.tol < float("inf")):
        raise UsageError(f"--tol: expected a positive number, got {args.tol}")
    if args.threads > 1024 or (args.repeats or 0) > 10_000 or args.warmup > 10_000 or args.max_iter > 10_000_000:
        raise UsageError("--threads, --repeats, --warmup or --max-iter: too large (at most 1024, 10000, 10000 "
                         "and 10000000)")
    from torchfpi.cli import _checks

    _checks.seed(args.seed)
    with_torchdeq = not args.no_torchdeq
    if with_torchdeq:
        require("torchdeq", "bench")
    known = tuple(m.name for m in methods(include_torchdeq=with_torchdeq))
    device = resolve_device(args.device)
    kw = dict(
        warmup=args.warmup, tol=args.tol, max_iter=args.max_iter, dtype=args.dtype,
        device=str(device), threads=args.threads, clock=args.clock, seed=args.seed,
    )
    if args.problems:
        kw["problems"] = _split(args.problems, "problems", PROBLEMS)
    if args.methods:
        kw["methods"] = _split(args.methods, "methods", known)
    if args.repeats is not None:
        kw["repeats"] = args.repeats
    do_sweep = True
    if args.sweep is not None:
        if args.sweep.strip().lower() == "none":
            do_sweep = False
        else:
            try:
                ks = tuple(int(s) for s in _split(args.sweep, "sweep"))
            except ValueError:
                raise UsageError(f"--sweep: expected comma-separated integers or 'none', got {args.sweep!r}") from None
            if min(ks) < 1 or max(ks) > 100_000:
                raise UsageError(f"--sweep: iteration counts must be in 1 .. 100000, got {args.sweep!r}")
            kw["sweep"] = ks
    cfg = Config.quick_config(**kw) if args.quick else Config(**kw)  # type: ignore[arg-type]
    if not args.quick and args.repeats is None:
        cfg.repeats = 7
    out = _checks.output_dir(args.out, "--out") if args.out else Path("benchmarks/results") / (
        "quick" if args.quick else "")
    if args.resume and (out / "results.json").exists():
        import json

        from torchfpi.errors import DataError

        try:
            json.loads((out / "results.json").read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"--resume: '{out / 'results.json'}' is not a JSON results file ({exc}): delete it "
                            "or run without --resume") from exc
    show = not args.quiet and sys.stderr.isatty()

    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(cfg.problems) * cfg.repeats + 1, desc="bench", file=sys.stderr)

    def progress(msg: str) -> None:
        if bar is not None:
            bar.set_postfix_str(msg)
            bar.update(1 if ("repeat" in msg or "sweep" in msg) else 0)
        elif not args.quiet:
            print(msg, file=sys.stderr)

    results = run_benchmark(
        cfg,
        out,
        resume=args.resume,
        with_torchdeq=with_torchdeq,
        sweep=do_sweep,
        make_plots=not args.no_plots,
        command=args.command_line,
        progress=progress,
    )
    if bar is not None:
        bar.close()
    for name, rec in results["problems"].items():
        ratio = rec.get("ratio_vs_torchdeq")
        main = rec["methods"].get("torchfpi fpi/fpi")
        line = f"{name:11s} f {rec['f_ms']:.3f} ms, VJP {rec['vjp_ms']:.3f} ms"
        if main:
            line += (f"; torchfpi fpi/fpi {main['total_ms']:.1f} ms = {main['over_floor']:.2f}x floor, "
                     f"grad error {main['grad_rel_error']:.1e}")
        if ratio is not None:
            line += f"; ratio_vs_torchdeq {ratio:.2f}"
        print(line)
    failed = 0
    if cfg.quick:
        print("quick mode: tiny problems; the claims below say nothing about real sizes")
    for c in results["claims"]:
        mark = {True: "holds", False: "FAILS", None: "n/a"}[c["holds"]]
        failed += c["holds"] is False
        print(f"claim {c['number']}: {mark}: {c['detail']}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 1 if (args.strict and failed) else 0
