#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, run 7: the GPU checks of bench/dp_gpu_check.py on GPU 0 (flip
# factorisation timings, stacked pieces bit-identical), then 8B GPTQ 1 GPU and 2 GPUs (4 layers) and, if the
# budget allows, the 70B-class slice on 2 GPUs. Everything in $OUT (gpu.json, check.json, logs).
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call_dp2.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
CUDA_VISIBLE_DEVICES=0 timeout ${CHECK_TIMEOUT:-40} python3 bench/dp_gpu_check.py --out $OUT/check.json > $OUT/check.log 2>&1 \
  || { echo "CHECK FAILED"; tail -15 $OUT/check.log; }
cut -c1-400 $OUT/check.log
grep -q '"sweep_ok": {' $OUT/check.json 2>/dev/null || export LOWBIT_GPTQ_SWEEP=torch
timeout ${SCALE_TIMEOUT:-140} python3 bench/scale_gpu.py --out $OUT --budget ${SCALE_BUDGET:-135} \
  --runs ${SCALE_RUNS:-gptq_8b_1gpu,gptq_8b_2gpu,gptq_70b_2gpu} > $OUT/scale.log 2>&1
cut -c1-700 $OUT/scale.log
