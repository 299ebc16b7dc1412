#!/usr/bin/env bash
# Last device call (nvidia-h200) of helper gemv5: the shipped M = 1 rows of TUNED_MM through prepared_linear for
# every weight format (bench/gemv_sweep.py --check-m1: one process per format, eager + CUDA graph vs the float32
# reference), beside the CUDA tests of the multi-group GEMV that run 7's call did not reach (q8_0, int8).
#   cd <copy of the repo> && bash bench/gemv5_check.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
timeout ${TEST_TIMEOUT:-40} python3 -m pytest -v -m cuda -p no:cacheprovider -rf tests/test_kernels_cuda.py \
  -k "multi_group_gemv and (q8_0 or int8)" > $OUT/pytest.log 2>&1 &
TP=$!
timeout ${CHECK_TIMEOUT:-40} python3 bench/gemv_sweep.py --check-m1 --out $OUT > $OUT/check.log 2>&1
echo "check rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/check.log
wait $TP
echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
grep -vE "^\s*$|Warning|warn\(" $OUT/check.log | cut -c1-400 | tail -20
grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $OUT/pytest.log | cut -c1-240 | tail -8
