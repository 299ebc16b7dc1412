#!/usr/bin/env bash
# Device call (nvidia-h200) of helper gemv5 (issue 15, the M = 1 4-bit GEMV): the multi-group GEMV candidates
# ("gemvq*") compiled first in parallel processes, then bench/gemv_sweep.py --run6 (every candidate checked against
# the float32 reference, then timed under CUDA graphs beside the committed config, F.linear and torchao int4 g128),
# then the CUDA tests of the new kernel.
#   cd <copy of the repo> && bash bench/gemv5_call.sh     (.whl/ with the torchao wheel, optional)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
mkdir -p $OUT/s6
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used --format=csv
timeout ${SWEEP_TIMEOUT:-170} python3 bench/gemv_sweep.py --run6 --prewarm ${PREWARM:-12} --skip-check --out $OUT/s6 \
  --budget ${SWEEP_BUDGET:-140} > $OUT/sweep.log 2>&1
echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/sweep.log
left=$(( ${TOTAL:-240} - ($(date +%s) - T0) ))
timeout $left python3 -m pytest -v -m cuda -p no:cacheprovider -rf tests/test_kernels_cuda.py -k multi_group_gemv \
  > $OUT/pytest.log 2>&1
echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
grep -vE "^\s*$|Warning|warn\(" $OUT/sweep.log | cut -c1-260 | tail -40
grep -E "PASSED|FAILED|ERROR|passed|failed|rc=" $OUT/pytest.log | cut -c1-240 | tail -15
