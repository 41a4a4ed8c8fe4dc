#!/bin/bash
# Run here (with network), before a lent-GPU call of bench/gpu_session.sh: the GPU machine has no network, no
# liger-kernel and no test runner that anyone has seen there (it has torch, triton, transformers and peft:
# .library/device/KINDS.md), so Liger's wheel and pytest's, with the xdist and timeout plugins gpu_session.sh's test
# step passes options to, and what pytest imports at its own import (pygments, packaging: pip installs them with
# --no-deps there), travel in .whl/ (carry=[".whl"]), kept out of git by .git/info/exclude.  Pure-Python wheels only
# (~2 MB): a torch wheel there would shadow the machine's CUDA build.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel>=0.8,<0.9" "pytest>=8,<10" "pluggy>=1.5,<2" "iniconfig>=2" "pytest-xdist>=3.5,<4" \
  "execnet>=2.1" "pytest-timeout>=2.3,<3" "pygments>=2.15" "packaging>=24"
ls -l .whl
