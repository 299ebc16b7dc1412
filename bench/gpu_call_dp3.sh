#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issues 20/18, run 8: host <-> GPU copy check, a smoke check of the pipeline
# on the GPU (1 and 2 processes, digests compared), then (bench/scale_gpu.py --steps run8) 8B GPTQ 32 layers 1 GPU
# (GPU 0) beside the 70B-class 4-layer slice and AWQ 1 GPU (GPU 1), then 8B GPTQ 2 GPUs, the 70B-class slice on
# 2 GPUs (8 layers), AWQ 2 GPUs. Everything in $OUT (gpu.json, xfer.json, scale.log).
#   cd <copy of the repo> && PYTHONPATH=$PWD SCALE_BUDGET=330 SCALE_TIMEOUT=345 bash bench/gpu_call_dp3.sh
# Run 9 (second call): SCALE_STEPS=run9 SCALE_XFER=0 SCALE_SMOKE=0 SCALE_LAYERS=16 SCALE_BUDGET=160 SCALE_TIMEOUT=172
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
[ "${SCALE_XFER:-1}" = 1 ] && CUDA_VISIBLE_DEVICES=0 timeout 40 python3 bench/scale_gpu.py --xfer $OUT/xfer.json 2>&1 | tail -3
timeout ${SCALE_TIMEOUT:-330} python3 bench/scale_gpu.py --steps ${SCALE_STEPS:-run8} --out $OUT --budget ${SCALE_BUDGET:-320} \
  ${SCALE_RUNS:+--runs $SCALE_RUNS} 2>&1 | tee $OUT/scale.log | cut -c1-900
