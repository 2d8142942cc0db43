#!/usr/bin/env bash
# The released artefact works outside the repository: build the wheel, install it into a fresh
# virtual environment (torch first, then the wheel with the apps extra), and run `torchfpi demo`
# (smoke-sized) and `torchfpi denoise` (shipped weights) from an empty temporary folder.
# Fails on any error. TORCH_SPEC overrides the torch requirement, as in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "+ build the wheel"
python3 -m pip wheel -q --no-deps -w "$work/dist" .
wheel=$(ls "$work"/dist/torchfpi-*.whl)
echo "  $(basename "$wheel")"
python3 - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["torchfpi/py.typed", "torchfpi/data/_embedded/bibtex.npz", "torchfpi/data/_embedded/manifest.tsv", "torchfpi/weights/denoise_fpi_gd_s25.pt"]
missing = [n for n in need if n not in names]
stray = [n for n in names if n.startswith(("tests/", "docs/", "scripts/", "benchmarks/", "results/"))]
if missing or stray:
    sys.exit(f"wheel: missing {missing}, should not contain {stray[:5]}")
PY

echo "+ install it into a fresh virtual environment"
python3 -m venv "$work/venv"
# shellcheck disable=SC1091
source "$work/venv/bin/activate"
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q "${wheel}[apps]"

echo "+ run it from an empty folder"
mkdir "$work/empty"
cd "$work/empty"
unset TORCHFPI_DATA
torchfpi --version
torchfpi data list > /dev/null
torchfpi demo --epochs 1 --max-steps 3 --quiet --out-dir demo
test -s demo/result.json
python - <<'PY'
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
clean = np.tile(np.linspace(40, 215, 48), (48, 1))
Image.fromarray(np.clip(clean + rng.normal(0, 25, clean.shape), 0, 255).astype(np.uint8)).save("noisy.png")
PY
torchfpi denoise noisy.png --sigma 25 --out clean.png --quiet
python - <<'PY'
from PIL import Image
image = Image.open("clean.png")
assert image.size == (48, 48) and image.mode == "L", (image.size, image.mode)
PY
echo "wheel: built, installed and ran torchfpi demo and torchfpi denoise from an empty folder"
