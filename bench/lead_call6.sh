#!/usr/bin/env bash
# Eighth session's final GPU call (lead): every cuda-marked test of the merged tree (CI's transformers pin carried
# as wheels in .whl; PER_GPU pytest processes per GPU, node ids dealt over them), then bench/gpu.py's kernel tables
# with torchao (the best peer at M <= 64 in the last run) in the same processes as lowbit; bitsandbytes is not
# carried (its 43 MB wheel and .whl exceed one call's 64 MiB).
#   cd <repo> && AO=.dev-lead/ao bash bench/lead_call6.sh [test timeout s] [gpu.py timeout s]
set -u
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1
NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
SPLIT=ids PER_GPU=${PER_GPU:-4} WHL_DIR=.whl bash bench/cuda_tests.sh "${1:-300}"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site-ao "${AO:-.dev-lead/ao}"/*.whl \
  || echo "torchao wheel install failed"
export PYTHONPATH="$PWD:/tmp/lowbit-site:/tmp/site-ao"
T=${2:-150}
mkdir -p "$OUT/g0" "$OUT/g1"
if [ "$NGPU" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0 timeout "$T" python3 bench/gpu.py --sections anchors,gemm --quick --out "$OUT/g0" \
    > "$OUT/g0.log" 2>&1 &
  CUDA_VISIBLE_DEVICES=1 timeout "$T" python3 bench/gpu.py --sections w8a8,blockwise --quick --out "$OUT/g1" \
    > "$OUT/g1.log" 2>&1 &
  wait
else  # one GPU: one process, the blockwise section (kernels unchanged this session) left out
  timeout "$T" python3 bench/gpu.py --sections anchors,gemm,w8a8 --quick --out "$OUT/g0" > "$OUT/g0.log" 2>&1
fi
find "$OUT/g0" "$OUT/g1" -type f ! -name "*.json" -delete
grep -E "NOTE|took|Error" "$OUT/g0.log" "$OUT/g1.log" | cut -c1-220 | tail -20
# at most 8 files come back from $OUT: the logs and lists in one archive, the two gpu.json beside it
(cd "$OUT" && tar czf logs.tgz --exclude=logs.tgz --exclude='g0' --exclude='g1' . && find . -maxdepth 1 -type f ! -name logs.tgz -delete)
ls -R "$OUT" | head -20
