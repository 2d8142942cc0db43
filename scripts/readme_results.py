"""Fill the results tables of the README and the docs from the committed results files.

    python scripts/readme_results.py          # rewrites the marked blocks of README.md and docs/
    python scripts/readme_results.py --check  # exit 1 if a block is out of date (changes nothing)

Each block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is made
only from ``results/*.json`` and ``benchmarks/results/results.json`` (produced by the commands
named beside the tables), so no number in those tables is typed by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]


def _load(rel: str) -> dict:
    path = ROOT / rel
    return json.loads(path.read_text()) if path.exists() else {}


def multilabel() -> str:
    d = _load("results/multilabel.json")
    rows = ["| dataset | MLP (strong) | SPEN (unrolled) | FPI_NN | FPI_GD | seeds | CPU s/epoch SPEN / FPI_GD |",
            "|---|---|---|---|---|---|---|"]
    for ds in ("bibtex", "delicious"):
        if ds not in d:
            continue
        cells, seeds = [], set()
        for model in ("mlp", "spen", "fpi_nn", "fpi_gd"):
            m = d[ds].get(model, {})
            if "test_f1_mean" in m:
                cells.append(f"{m['test_f1_mean']:.2f} ± {m.get('test_f1_std', 0.0):.2f}")
                seeds.add(len(m.get("seeds", [])))
            else:
                cells.append("-")
        cpu = [d[ds].get(model, {}).get("epoch_cpu_s_mean") for model in ("spen", "fpi_gd")]
        cpu_cell = " / ".join("-" if c is None else f"{c:.1f}" for c in cpu)
        rows.append(f"| {ds} | " + " | ".join(cells) + f" | {max(seeds) if seeds else 0} | {cpu_cell} |")
    return "\n".join(rows)


def denoise() -> str:
    d = _load("results/denoise.json")
    names = {"noisy": "noisy input", "tv": "TV", "bm3d": "BM3D",
             "fpi_gd": "FPI_GD (multi-scale FoE energy, implicit)",
             "fpi_gd_foe": "FPI_GD (single-scale FoE energy, earlier weights)",
             "unrolled": "single-scale FoE, 10 unrolled steps", "fpi_nn": "FPI_NN (conv DEQ)"}
    sigmas = sorted((k for k in d if k.startswith("sigma")), key=lambda k: float(k[5:]))
    rows = ["| method | " + " | ".join(f"sigma {s[5:]}" for s in sigmas) + " |", "|---|" + "---|" * len(sigmas)]
    for key, label in names.items():
        cells = []
        for s in sigmas:
            m = d[s].get(key, {})
            cells.append(f"{m['psnr']:.2f}" if isinstance(m.get("psnr"), (int, float)) and m.get("complete", True) else "-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def denoise_memory() -> str:
    """Training memory and time per step, implicit FPI_GD against the same energy unrolled."""
    m = _load("results/denoise.json").get("memory", {})
    rows = ["| iterations N | implicit FPI_GD: peak MiB, s / step | unrolled: peak MiB, s / step | memory ratio |",
            "|---|---|---|---|"]
    keys = sorted((k for k in m if k.startswith("iterations")), key=lambda k: int(k[10:]))
    for k in keys:
        imp, unr = m[k]["fpi_gd"], m[k]["unrolled"]
        rows.append(f"| {k[10:]} | {imp['peak_step_mib']:.0f}, {imp['seconds_per_step']:.2f} | "
                    f"{unr['peak_step_mib']:.0f}, {unr['seconds_per_step']:.2f} | "
                    f"{m[k]['ratio_unrolled_over_implicit']:.1f}x |")
    t = m.get("trained_sigma25_tol1e-3")
    if t:
        rows.append(f"| trained, tol 1e-3 ({t['forward_iterations']:.0f} forward, {t['backward_iterations']:.0f} "
                    f"backward) | {t['peak_step_mib']:.0f}, {t['seconds_per_step']:.2f} | - | - |")
    return "\n".join(rows)


def flow() -> str:
    d = _load("results/flow.json").get("methods", {})
    names = [("fpi_gd", "FPI_GD (learned variational, implicit)"), ("fpi_nn", "FPI_NN refinement"),
             ("horn_schunck", "Horn-Schunck (FPI)"), ("dis", "OpenCV DIS medium"), ("farneback", "OpenCV Farneback")]
    rows = ["| method | mean EPE |", "|---|---|"]
    rows += [f"| {label} | {d[k]['mean_epe']:.3f} |" for k, label in names if k in d]
    return "\n".join(rows)


def bench() -> str:
    d = _load("benchmarks/results/results.json")
    probs = d.get("problems", {})
    rows = ["| problem | torchfpi / TorchDEQ implicit time | torchfpi x floor | TorchDEQ x floor |", "|---|---|---|---|"]
    for name in probs:
        ratio = probs[name].get("ratio_vs_torchdeq_paired", probs[name].get("ratio_vs_torchdeq"))
        methods = probs[name].get("methods", {})
        over = methods.get("torchfpi fpi/fpi", {}).get("over_floor")
        deq = methods.get("torchdeq fpi/implicit", {}).get("over_floor")
        cells = [f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in (ratio, over, deq)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def bench_targets() -> str:
    """The benchmark's performance targets (``claims`` in results.json) and whether the run meets them."""
    d = _load("benchmarks/results/results.json")
    rows = ["| # | target | met | measured |", "|---|---|---|---|"]
    for c in d.get("claims", []):
        met = {True: "yes", False: "**no**"}.get(c.get("holds"), "not measured")
        detail = str(c.get("detail", "")).replace("|", "\\|")
        rows.append(f"| {c['number']} | {c['text']} | {met} | {detail} |")
    return "\n".join(rows)


BLOCKS = {"multilabel": multilabel, "denoise": denoise, "denoise-memory": denoise_memory, "flow": flow, "bench": bench, "bench-targets": bench_targets}
TARGETS = ["README.md", "docs/*.md"]


def refresh(text: str) -> str:
    """``text`` with every results block it holds regenerated."""
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if pattern.search(text):
            body = make()
            text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)  # noqa: B023
    return text


def stale() -> Dict[Path, str]:
    """The files whose blocks are out of date, with their refreshed text."""
    out: Dict[Path, str] = {}
    paths: List[Path] = []
    for pattern in TARGETS:
        paths.extend(sorted(ROOT.glob(pattern)))
    for path in paths:
        text = path.read_text()
        new = refresh(text)
        if new != text:
            out[path] = new
    return out


def main(argv: List[str]) -> int:
    changed = stale()
    if "--check" in argv:
        for path in changed:
            print(f"{path.relative_to(ROOT)}: results tables out of date; run python scripts/readme_results.py")
        return 1 if changed else 0
    for path, text in changed.items():
        path.write_text(text)
        print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
