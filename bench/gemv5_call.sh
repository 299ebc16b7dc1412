#!/usr/bin/env bash
# Device calls (nvidia-h200) of helper gemv5 (issue 15, the M = 1 4-bit GEMV). The CUDA tests of the multi-group
# GEMV run while its sweep candidates compile in parallel processes (--prewarm-only: Triton's on-disk cache); then
# bench/gemv_sweep.py --run6 (round 1: run 6, round 2: run 7) checks every candidate against the float32 reference
# and times it under CUDA graphs beside the committed config, F.linear and torchao int4 g128 (.whl/ wheel).
#   cd <copy of the repo> && ROUND=2 bash bench/gemv5_call.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
R=${ROUND:-1}
mkdir -p $OUT/s$R
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv
timeout ${TEST_TIMEOUT:-110} python3 -m pytest -v -m cuda -p no:cacheprovider -rf tests/test_kernels_cuda.py \
  -k multi_group_gemv > $OUT/pytest.log 2>&1 &
TP=$!
timeout 60 python3 bench/gemv_sweep.py --run6 --round $R --prewarm ${PREWARM:-10} --prewarm-only > $OUT/sweep.log 2>&1
wait $TP
echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
timeout ${SWEEP_TIMEOUT:-120} python3 bench/gemv_sweep.py --run6 --round $R --skip-check --out $OUT/s$R \
  --budget ${SWEEP_BUDGET:-90} >> $OUT/sweep.log 2>&1
echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/sweep.log
grep -vE "^\s*$|Warning|warn\(|Configuration class" $OUT/sweep.log | cut -c1-260 | tail -40
grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $OUT/pytest.log | cut -c1-240 | tail -12
