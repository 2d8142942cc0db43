#!/usr/bin/env bash
# The documentation site, built strictly from the repository root: any warning (a broken link,
# a missing page, a docstring mkdocstrings cannot read) fails the build. Output: build/site/.
# Run it in the environment CI set up (.ci/run's virtual environment) or any other.
set -euo pipefail
cd "$(dirname "$0")/.."
# torch first, as in the README, so that pip does not pick a torch build by itself.
python3 -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python3 -m pip install -q -e ".[docs]"
NO_MKDOCS_2_WARNING=1 python3 -m mkdocs build --strict
echo "docs: built build/site/ (mkdocs build --strict)"
