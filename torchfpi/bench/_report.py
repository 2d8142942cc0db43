"""Render benchmark results: a markdown report and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

_COLUMNS = (
    ("forward ms", "forward_ms", "{:.1f}"),
    ("backward ms", "backward_ms", "{:.1f}"),
    ("total ms", "total_ms", "{:.1f}"),
    ("min-max", "total_range", "{}"),
    ("fwd it", "forward_iterations", "{}"),
    ("bwd it", "backward_iterations", "{}"),
    ("floor ms", "floor_ms", "{:.1f}"),
    ("x floor", "over_floor", "{:.2f}"),
    ("peak MiB", "peak_memory_mb", "{:.2f}"),
    ("grad rel. error", "grad_rel_error", "{:.1e}"),
    ("max residual", "max_residual", "{:.1e}"),
)


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def markdown(results: Dict[str, Any]) -> str:
    """The whole report as markdown: setup, claims, one table per problem, the memory sweep."""
    m = results.get("machine", {})
    lines: List[str] = ["# torchfpi benchmark", ""]
    lines.append(f"Command: `{results.get('command', '')}`  ")
    lines.append(
        f"Machine: {m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count')} cores, "
        f"torch threads {results.get('config', {}).get('threads')}, device {results.get('config', {}).get('device')}"
        f"{', ' + m['cuda'] if m.get('cuda') else ''}; load average before/after "
        f"{results.get('load_average_before')} / {results.get('load_average_after')}  "
    )
    v = results.get("versions", {})
    lines.append(
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()) + f"; commit {m.get('commit', '?')}  "
    )
    cfg = results.get("config", {})
    lines.append(
        f"Clock: {cfg.get('clock')} ('auto' = process CPU time on the CPU, synchronised wall time on CUDA)  "
    )
    lines.append(
        f"Setting: dtype {cfg.get('dtype')}, tol {cfg.get('tol')} (relative residual, every sample), "
        f"max_iter {cfg.get('max_iter')}, {cfg.get('repeats')} interleaved repeats after "
        f"{cfg.get('warmup')} warm-up, medians; quick={cfg.get('quick')}"
    )
    lines += ["", "## What must hold", ""]
    if cfg.get("quick"):
        lines += ["Quick mode: tiny problems where one f call costs microseconds, so per-iteration "
                  "bookkeeping dominates; the claims are computed but say nothing about real sizes.", ""]
    lines += ["| # | claim | holds | measured |", "|---|---|---|---|"]
    for c in results.get("claims", []):
        holds = {True: "yes", False: "**no**", None: "n/a"}[c["holds"]]
        lines.append(f"| {c['number']} | {c['text']} | {holds} | {c['detail']} |")
    for name, rec in results.get("problems", {}).items():
        lines += ["", f"## {name}", "", rec["description"] + ".  "]
        lines.append(
            f"One bare f call {rec['f_ms']:.3f} ms, one VJP {rec['vjp_ms']:.3f} ms (the floor = forward "
            f"iterations x f + backward iterations x VJP). Reference gradient: float64, forward "
            f"residual {rec['reference']['forward_residual']:.1e}, adjoint residual "
            f"{rec['reference']['adjoint_residual']:.1e}."
        )
        if "ratio_vs_torchdeq" in rec:
            lines.append(f"ratio_vs_torchdeq (torchfpi fpi/fpi over TorchDEQ fpi/implicit, total time): "
                         f"**{rec['ratio_vs_torchdeq']:.2f}** (ratio of medians), "
                         f"**{rec.get('ratio_vs_torchdeq_paired', float('nan')):.2f}** (median of per-round ratios)")
        lines += ["", "| method | " + " | ".join(c[0] for c in _COLUMNS) + " |",
                  "|---" * (len(_COLUMNS) + 1) + "|"]
        for mname, mr in rec["methods"].items():
            mr = dict(mr)
            if "total_ms_min" in mr:
                mr["total_range"] = f"{mr['total_ms_min']:.0f}-{mr['total_ms_max']:.0f}"
            cells = [_fmt(fmt, mr.get(key)) for _, key, fmt in _COLUMNS]
            lines.append(f"| {mname}{'' if mr['exact'] else ' (inexact)'} | " + " | ".join(cells) + " |")
    sweep = results.get("memory_sweep")
    if sweep:
        lines += ["", f"## Peak memory (MiB) versus iterations K ({sweep['problem']})", "",
                  "| method | " + " | ".join(f"K={k}" for k in sweep["K"]) + " |",
                  "|---" * (len(sweep["K"]) + 1) + "|"]
        for label, series in sweep["peak_memory_mb"].items():
            lines.append(f"| {label} | " + " | ".join(f"{x:.2f}" for x in series) + " |")
    return "\n".join(lines) + "\n"


def plots(results: Dict[str, Any], out: Path) -> List[Path]:
    """Write the figures next to the JSON; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the bench extra
        return []
    written: List[Path] = []
    problems = results.get("problems", {})
    if problems:
        n = len(problems)
        panels = (
            ("time", "forward + backward time (ms): forward (dark), backward (light), floor (x)"),
            ("iterations", "forward / backward iterations"),
            ("memory", "peak memory (MiB)"),
            ("error", "gradient relative error vs float64 reference"),
            ("overhead", "time per iteration / one bare call: forward over f (dark), backward over VJP (light)"),
        )
        for key, title in panels:
            fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.2), squeeze=False)
            for ax, (pname, rec) in zip(axes[0], problems.items()):
                names = list(rec["methods"])
                ms = [rec["methods"][k] for k in names]
                y = range(len(names))
                if key == "time":
                    fw = [r["forward_ms"] for r in ms]
                    bw = [r["backward_ms"] for r in ms]
                    ax.barh(y, fw, color="tab:blue")
                    ax.barh(y, bw, left=fw, color="tab:cyan")
                    ax.plot([r["floor_ms"] for r in ms], y, "kx")
                elif key == "iterations":
                    ax.barh([i - 0.2 for i in y], [r["forward_iterations"] for r in ms], height=0.4, label="forward")
                    ax.barh([i + 0.2 for i in y], [r["backward_iterations"] for r in ms], height=0.4, label="backward")
                    ax.legend(fontsize=7)
                elif key == "memory":
                    ax.barh(y, [r.get("peak_memory_mb", 0.0) for r in ms], color="tab:green")
                    ax.set_xscale("log")
                elif key == "error":
                    ax.barh(y, [max(r["grad_rel_error"], 1e-12) for r in ms], color="tab:red")
                    ax.set_xscale("log")
                else:
                    fw = [r["forward_ms_per_iteration"] / rec["f_ms"] for r in ms]
                    bw = [(r["backward_ms_per_iteration"] / rec["vjp_ms"]) if r["backward_iterations"] else 0.0
                          for r in ms]
                    ax.barh([i - 0.2 for i in y], fw, height=0.4, color="tab:blue")
                    ax.barh([i + 0.2 for i in y], bw, height=0.4, color="tab:cyan")
                    ax.axvline(1.0, color="k", lw=0.8)
                ax.set_yticks(list(y))
                ax.set_yticklabels(names, fontsize=7)
                ax.invert_yaxis()
                ax.set_title(pname, fontsize=9)
            fig.suptitle(title, fontsize=10)
            fig.tight_layout()
            path = out / f"{key}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    sweep = results.get("memory_sweep")
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.6))
        for label, series in sweep["peak_memory_mb"].items():
            ax.plot(sweep["K"], series, "o-", label=label)
        ax.set_xlabel("iterations K (forward; backward the same)")
        ax.set_ylabel("peak memory (MiB)")
        ax.set_yscale("log")
        ax.set_title(f"memory vs iterations ({sweep['problem']})", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "memory_sweep.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
