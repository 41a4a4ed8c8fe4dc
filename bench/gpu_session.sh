#!/bin/bash
# One lent-GPU call (device tool, 15 minutes of device time in all), for issue 12: the model suite in bf16 on the
# GPU's default model against both references, the GPU tests of the Triton kernels (the update's finiteness flag,
# kernels/finite.py, the rotary embedding, kernels/rotary.py, and the RMSNorm and SwiGLU kernels, kernels/rms_norm.py
# and swiglu.py, have only run under the interpreter before), the Liger backend and the op counts, the host time of one
# fused linear backward and forward (bf16; the H200's fp32 rows are in bench/results/host_time_h200.txt), then the A/Bs
# of the elementwise kernels and of the hook path for small weights; everything lands in $OUT (at most 8 files come
# back).
#   bash bench/gpu_prepare.sh   (here, with network: Liger's and pytest's wheels into .whl/, which git ignores), then
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)
# The steps run by priority (the bf16 model tables, the GPU tests, the host time, then the A/Bs) within 540 s in all:
# a step is cut to what is left and skipped under 20 s, a model step writes its JSON after every case, and a cut step
# gets SIGINT (pytest then prints its summary).
# (issue 18's head+loss comparison against Liger: python3 -m bench.head_loss_bench, results in bench/results/)
set -u
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
T=/tmp/gpu_session
rm -rf $T && mkdir -p $T
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
END=$((SECONDS + 540))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
log() { echo "=== $* ($(date +%T))" | tee -a "$O/log.txt"; }
# the library's own warnings (a backend or Liger unavailable: a silent fallback otherwise) stay in the log
step() { local limit=$1; shift; local left=$((END - SECONDS))
  if (( left < 20 )); then log "SKIPPED (time): $*"; return; fi
  (( limit > left )) && limit=$left
  log "$* [${limit}s]"
  timeout -s INT -k 10 "$limit" "$@" 2>&1 \
    | grep --line-buffered -v -E "(Future|Deprecation|User)Warning|^\s*warnings\.warn\(|^\s*$" | tee -a "$O/log.txt"; }

log env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 60 python3 -c "
import torch, triton, transformers, peft, importlib.metadata as m
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)
try:
    import pytest, xdist, pytest_timeout
    print('pytest', pytest.__version__, 'from', pytest.__file__)
except ImportError as e:
    print('pytest or a plugin MISSING (run bench/gpu_prepare.sh and carry .whl):', e)
try:
    print('liger-kernel', m.version('liger-kernel'))
except m.PackageNotFoundError:
    print('liger-kernel MISSING: the fused loss runs its own loop (run bench/gpu_prepare.sh and carry .whl)')"
  git log -1 --format='commit %h %s' 2>/dev/null | cut -c1-100; } 2>&1 | tee -a "$O/log.txt"
G=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o -i -E 'h100|h200|a100|l40s' | head -1 \
  | tr A-Z a-z)
G=${G:-gpu}

step 150 python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress --out $T/ma \
  --variants BAdam BREAD-SGD-partial BREAD-SGD BREAD-SGD-sign
cp $T/ma/*.json "$O/bench_model_${G}_bf16_a.json" 2>/dev/null
step 90 python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress --out $T/mb \
  --variants BREAD BREAD-partial
cp $T/mb/*.json "$O/bench_model_${G}_bf16_b.json" 2>/dev/null
# the GPU tests of the Triton kernels (the update's finiteness flag, kernels/finite.py, the rotary embedding,
# kernels/rotary.py, the RMSNorm and SwiGLU kernels: only run under the interpreter before), Liger and the op counts;
# not the native CPU backend's (its C++ build takes minutes) nor the ahead-of-time compiles (a real GPU compiles)
step 130 python3 -m pytest tests/kernels tests/backends/test_liger.py tests/backends/test_epilogue.py \
  tests/functions/test_head_loss.py tests/functions/test_rotary.py tests/test_backward_ops.py \
  tests/functions/test_elementwise_backend.py -k "not native" --deselect tests/kernels/test_compiles_for_gpu.py \
  -q -n 8 --timeout 90 -p no:cacheprovider -rfE
step 70 python3 -m bread_kernels.bench host --dtype bf16
# A/B of the RMSNorm and SwiGLU kernels: the first run's BAdam and BREAD-SGD rows at block 1, with torch's ops
step 75 env BREAD_ELEMENTWISE=torch python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress \
  --out $T/mc --variants BAdam BREAD-SGD --positions 1
cp $T/mc/*.json "$O/bench_model_${G}_bf16_torch_elementwise.json" 2>/dev/null
# A/B of patch's hook_update_numel on the host-bound 8x512 model (the CPU default; weights of 2^18-2^19.4
# elements, above the default 2^17, so the default run is the fused one): every update fused (0) against every
# block linear hooked (2^20) — whether a GPU, host-bound at this size, wants a larger default; the GPU default
# model's weights are far above any such threshold
for n in 0 1048576; do
  step 40 env BREAD_HOOK_UPDATE_NUMEL=$n python3 -m bread_kernels.bench model --dtype bf16 --repeats 3 --no-progress \
    --out $T/mh$n --variants BREAD-SGD --positions 1 --layers 8 --hidden 512 --intermediate 1376 --vocab 4096 \
    --batch 4 --seq 256
done

log done
