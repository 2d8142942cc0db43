"""A tiny sparse-ARFF multi-label set (3 features, 2 labels) for the CLI tests."""

from __future__ import annotations

import numpy as np

MULAN_XML = ('<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">\n'
             '<label name="y0"></label>\n<label name="y1"></label>\n</labels>\n')
ARFF_HEADER = ("@relation t\n@attribute f0 numeric\n@attribute f1 numeric\n@attribute f2 numeric\n"
               "@attribute y0 {0,1}\n@attribute y1 {0,1}\n@data\n")


def arff_rows(n: int) -> str:
    """``n`` sparse rows, seeded: three random features, each label on with probability 1/2."""
    rng = np.random.RandomState(0)
    lines = []
    for _ in range(n):
        entries = [f"{j} {rng.rand():.3f}" for j in range(3)]
        entries += [f"{3 + k} 1" for k in range(2) if rng.rand() < 0.5]
        lines.append("{" + ",".join(entries) + "}")
    return "\n".join(lines) + "\n"
