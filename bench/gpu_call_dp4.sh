#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, run 10: bench/scale_gpu.py --steps run10, one run at a time:
# 8B GPTQ 32 layers 1 GPU then 2 GPUs with the per-call timers (as runs 8-9), the same pair without them
# ("_untimed": the wall time as a user gets it), AWQ 2 layers 1 and 2 GPUs; then the GPU sweep tests.
#   cd <copy of the repo> && PYTHONPATH=$PWD SCALE_BUDGET=340 bash bench/gpu_call_dp4.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
timeout ${SCALE_TIMEOUT:-360} python3 bench/scale_gpu.py --steps run10 --out $OUT --budget ${SCALE_BUDGET:-340} \
  ${SCALE_RUNS:+--runs $SCALE_RUNS} 2>&1 | tee $OUT/scale.log | cut -c1-700
[ "${SCALE_TESTS:-1}" = 1 ] && timeout ${SCALE_TEST_TIMEOUT:-40} python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_gptq_sweep.py -k "in_place_on_the_gpu or row_pieces_equal or block_matches" > $OUT/pytest.log 2>&1
tail -3 $OUT/pytest.log
