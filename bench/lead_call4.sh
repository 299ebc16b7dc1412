#!/usr/bin/env bash
# Seventh session's final GPU check (lead): every cuda-marked test of the merged tree over both GPUs
# (`SPLIT=ids bash bench/cuda_tests.sh`, CI's transformers pin carried as wheels in .whl), then dp4's prefetch race test
# with the fix turned off (LOWBIT_PREFETCH_RECORD=0), to see whether the test can catch the race.
set -u
export OUT=${OUT:-/tmp/out}
SPLIT=ids WHL_DIR=.whl bash bench/cuda_tests.sh "${1:-380}"
export PYTHONPATH="/tmp/lowbit-site${PYTHONPATH:+:$PYTHONPATH}"
echo "== race test with LOWBIT_PREFETCH_RECORD=0 (expected to FAIL if the test has power)"
LOWBIT_PREFETCH_RECORD=0 CUDA_VISIBLE_DEVICES=0 timeout 40 python3 -m pytest -q -p no:cacheprovider \
  "tests/test_dp_overlap.py::test_prefetched_weights_not_reused_while_the_gpu_lags" 2>&1 | tail -5
