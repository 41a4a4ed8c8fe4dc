#!/bin/bash
# One lent-GPU call (device tool, 15 minutes of device time in all), for issue 12: the host time of one fused linear
# backward and forward (fp32, bf16), the model suite on the GPU's default model against both references, then the
# A/B of the hook path for small weights, the GPU tests of the Triton kernels (the update's finiteness flag, kernels/finite.py, the rotary embedding,
# kernels/rotary.py, and the RMSNorm and SwiGLU kernels, kernels/rms_norm.py and swiglu.py, have only run under the
# interpreter before), the Liger backend and the op counts.  Each step has its own time limit so a slow one cannot
# eat the next (the A/B runs last: the tests matter more); everything lands in $OUT (at most 8 files come back).
#   run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=590)   with liger-kernel's wheel in .whl/
# (issue 18's head+loss comparison against Liger: python3 -m bench.head_loss_bench, results in bench/results/)
set -u
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
T=/tmp/gpu_session
rm -rf $T && mkdir -p $T
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
log() { echo "=== $* ($(date +%T))" | tee -a "$O/log.txt"; }
step() { local limit=$1; shift; log "$*"; timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(|^\s*$" | tee -a "$O/log.txt"; }

log env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  timeout 20 python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  timeout 20 python3 -c "import liger_kernel, importlib.metadata as m; print('liger-kernel', m.version('liger-kernel'))"
  git log -1 --format='commit %h %s' 2>/dev/null | cut -c1-100; } 2>&1 | tee -a "$O/log.txt"

step 45 python3 -m bread_kernels.bench host --dtype fp32
step 45 python3 -m bread_kernels.bench host --dtype bf16
step 150 python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress --out $T/ma \
  --variants BAdam BREAD-SGD-partial BREAD-SGD BREAD-SGD-sign
cp $T/ma/*.json "$O/bench_model_h200_bf16_a.json" 2>/dev/null
step 90 python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress --out $T/mb \
  --variants BREAD BREAD-partial
cp $T/mb/*.json "$O/bench_model_h200_bf16_b.json" 2>/dev/null
log tests
timeout 150 python3 -m pytest tests/kernels tests/backends/test_liger.py tests/backends/test_epilogue.py \
  tests/functions/test_head_loss.py tests/functions/test_rotary.py tests/test_backward_ops.py \
  tests/kernels/test_rms_norm.py tests/kernels/test_swiglu.py tests/functions/test_elementwise_backend.py -q -n 8 -p no:cacheprovider -rfE > "$O/tests.txt" 2>&1
echo "pytest rc $?" >> "$O/tests.txt"
tail -40 "$O/tests.txt"
# A/B of the RMSNorm and SwiGLU kernels: the first run's BAdam and BREAD-SGD rows at block 1, with torch's ops
step 75 env BREAD_ELEMENTWISE=torch python3 -m bread_kernels.bench model --dtype bf16 --repeats 5 --no-progress \
  --out $T/mc --variants BAdam BREAD-SGD --positions 1
cp $T/mc/*.json "$O/bench_model_h200_bf16_torch_elementwise.json" 2>/dev/null
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
