"""Fill the README's results tables from the committed results files.

    python scripts/readme_results.py          # rewrites the marked blocks of README.md

Each block sits between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` and is made
only from ``results/*.json`` and ``benchmarks/results/results.json`` (produced by the commands
named in the README), so no number in the README is typed by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    names = {"noisy": "noisy input", "tv": "TV", "bm3d": "BM3D", "fpi_gd": "FPI_GD (FoE energy, implicit)",
             "unrolled": "same energy, 10 unrolled steps", "fpi_nn": "FPI_NN (conv DEQ)"}
    sigmas = sorted((k for k in d if k.startswith("sigma")), key=lambda k: float(k[5:]))
    rows = ["| method | " + " | ".join(f"sigma {s[5:]}" for s in sigmas) + " |", "|---|" + "---|" * len(sigmas)]
    for key, label in names.items():
        cells = []
        for s in sigmas:
            m = d[s].get(key, {})
            cells.append(f"{m['psnr']:.2f}" if isinstance(m.get("psnr"), (int, float)) and m.get("complete", True) else "-")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
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
    claim1 = next((c for c in d.get("claims", []) if c.get("number") == 1), {}).get("values", {})
    for name in probs:
        ratio = probs[name].get("ratio_vs_torchdeq_paired", probs[name].get("ratio_vs_torchdeq"))
        c = claim1.get(name, {})
        over = c.get("torchfpi_over_floor")
        deq = c.get("torchdeq_over_floor")
        cells = [f"{v:.2f}" if isinstance(v, (int, float)) else "-" for v in (ratio, over, deq)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    lines = ["\n".join(rows), ""]
    for c in d.get("claims", []):
        lines.append(f"- claim {c['number']} ({c['text']}): **{'holds' if c['holds'] else 'does not hold'}**; {c['detail']}")
    return "\n".join(lines)


BLOCKS = {"multilabel": multilabel, "denoise": denoise, "flow": flow, "bench": bench}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, make in BLOCKS.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        body = make()
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)  # noqa: B023
    readme.write_text(text)


if __name__ == "__main__":
    main()
