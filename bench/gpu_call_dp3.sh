#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issues 20/18, run 8: host <-> GPU copy check, then (bench/scale_gpu.py
# --steps ${SCALE_STEPS:-run8}) 8B GPTQ 1 GPU (GPU 0) beside the 70B-class 4-layer slice and AWQ 1 GPU (GPU 1), then 8B GPTQ
# 2 GPUs, the 70B-class slice on 2 GPUs, AWQ 2 GPUs. Everything in $OUT (gpu.json, xfer.json, scale.log).
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call_dp3.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
[ "${SCALE_XFER:-1}" = 1 ] && CUDA_VISIBLE_DEVICES=0 timeout 40 python3 bench/scale_gpu.py --xfer $OUT/xfer.json 2>&1 | tail -3
timeout ${SCALE_TIMEOUT:-330} python3 bench/scale_gpu.py --steps ${SCALE_STEPS:-run8} --out $OUT --budget ${SCALE_BUDGET:-320} \
  ${SCALE_RUNS:+--runs $SCALE_RUNS} 2>&1 | tee $OUT/scale.log | cut -c1-900
