#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, run 11: bench/scale_gpu.py --steps run11, one run at a time: the
# smoke check (1 and 2 processes must give run 10's smoke digests, else the new paths are switched off), the 8B GPTQ
# 32 layers without the per-call timers (the wall time) on 1 GPU then 2 GPUs, the timed 2-GPU run (the parts), the
# 1-GPU run without the fits beside the factorisation if the budget allows; then the CUDA data-parallel tests.
#   cd <copy of the repo> && PYTHONPATH=$PWD SCALE_BUDGET=300 SCALE_TIMEOUT=310 bash bench/gpu_call_dp5.sh
# A next call (run 12, not run yet): SCALE_STEPS=run12 SCALE_BUDGET=280 SCALE_TIMEOUT=290 (the untimed 2-GPU run with
# LOWBIT_DP_SYNC=0 against the default, the untimed 1-GPU run, then the timed 2-GPU run).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export SCALE_SMOKE_EXPECT=run10
nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
timeout ${SCALE_TIMEOUT:-310} python3 bench/scale_gpu.py --steps ${SCALE_STEPS:-run11} --out $OUT --budget ${SCALE_BUDGET:-300} \
  ${SCALE_RUNS:+--runs $SCALE_RUNS} 2>&1 | tee $OUT/scale.log | cut -c1-700
[ "${SCALE_TESTS:-1}" = 1 ] && timeout ${SCALE_TEST_TIMEOUT:-40} python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_dp_factor_fits.py tests/test_dp_overlap.py tests/test_gptq_sweep.py \
  -k "gpu or cuda or lags or in_place_on_the_gpu or row_pieces_equal" > $OUT/pytest.log 2>&1
tail -3 $OUT/pytest.log
