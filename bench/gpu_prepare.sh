#!/bin/bash
# Run here (with network), before a lent-GPU call of bench/gpu_session.sh: the GPU machine has no network and no
# liger-kernel (it has torch, triton, transformers and peft: .library/device/KINDS.md), so Liger's wheel travels in
# .whl/ (carry=[".whl"]), kept out of git by .git/info/exclude.  Only this one pure-Python wheel (~1 MB): a torch wheel
# there would shadow the machine's CUDA build.
set -eu
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "liger-kernel>=0.8,<0.9"
ls -l .whl
