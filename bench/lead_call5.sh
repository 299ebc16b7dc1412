#!/usr/bin/env bash
# Seventh session (lead): bench/gpu.py's kernel tables on the H200 x2 with the peers in the same processes:
# GPU 0 / cores 0-15 the 4-bit GEMM section (M = 1 / 16 / 64 / 256, both issue shapes; lowbit, bitsandbytes,
# torchao), GPU 1 / cores 16-31 the W8A8 (int8 / fp8) and blockwise sections. Peer wheels in $WHL.
#   cd <copy of the repo> && WHL=.dev-lead/whl bash bench/lead_call5.sh
# The two gpu.json files are merged here afterwards: python bench/gpu.py --report-only g0/gpu.json g1/gpu.json
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
W=${WHL:-.dev-lead/whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
  && export PYTHONPATH=$PWD:/tmp/site
mkdir -p $OUT/g0 $OUT/g1
CUDA_VISIBLE_DEVICES=0 timeout ${T:-160} taskset -c 0-15 python3 bench/gpu.py --sections anchors,gemm --quick \
  --out $OUT/g0 > $OUT/g0.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout ${T:-160} taskset -c 16-31 python3 bench/gpu.py --sections w8a8,blockwise --quick \
  --out $OUT/g1 > $OUT/g1.log 2>&1 &
wait
find $OUT/g0 $OUT/g1 -type f ! -name "*.json" -delete
grep -E "NOTE|took|Error" $OUT/g0.log $OUT/g1.log | cut -c1-220 | tail -20
