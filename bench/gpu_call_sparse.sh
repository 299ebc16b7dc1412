#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 21's speed part: GPU 0 runs bench/sparsity.py's correctness,
# host-overhead and per-layer steps; GPU 1 runs the CUDA tests of the sparse code, then the Llama-8B-shaped
# `generate` comparison. Everything lands in $OUT; each step saves its JSON as it goes.
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call_sparse.sh <commit> [gpu0 seconds] [gpu1 seconds]
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMIT=${1:-?}
T0=${2:-150}
T1=${3:-150}
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv > $OUT/nvsmi.txt 2>&1
(
  export CUDA_VISIBLE_DEVICES=0
  timeout $T0 python3 bench/sparsity.py --part gpu --steps correctness,overhead,layers --out $OUT --commit $COMMIT
) > $OUT/gpu0.log 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  S=$(date +%s)
  timeout $((T1 * 45 / 100)) python3 -m pytest -q -m cuda tests/test_sparsity.py -p no:cacheprovider -x \
    > $OUT/pytest_cuda.log 2>&1
  echo "pytest rc=$? $(( $(date +%s) - S )) s" >> $OUT/pytest_cuda.log
  LEFT=$(( T1 - ($(date +%s) - S) ))
  timeout $LEFT python3 bench/sparsity.py --part gpu --steps generate --layers 4 --new-tokens 32 \
    --json sparsity_gpu_generate.json --out $OUT --commit $COMMIT
) > $OUT/gpu1.log 2>&1 &
wait
tail -4 $OUT/pytest_cuda.log
grep -E "^8192 8192 4096|overhead .*4096|Traceback|Error" $OUT/gpu0.log | cut -c1-200 | tail -40
grep -E "^dense|^2:4|Traceback|Error" $OUT/gpu1.log | cut -c1-300 | tail -8
