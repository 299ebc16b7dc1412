#!/usr/bin/env bash
# Every `cuda`-marked test on a lent multi-GPU machine, the collected node ids dealt round robin over the GPUs
# (one pytest process per GPU: big files such as tests/test_kernels_cuda.py are shared out too, so the processes
# end together), `-v` logs to $OUT. Usage: bash bench/cuda_tests_split.sh [timeout_s]
# WHL_DIR=<dir of wheels>: installed with --no-deps into a private site dir first (see bench/cuda_tests.sh).
set -u
T=${1:-300}
OUT=${OUT:-/tmp/cuda-tests-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -n "${WHL_DIR:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/lowbit-site "$WHL_DIR"/*.whl > "$OUT/wheels.log" 2>&1 \
    || { echo "wheel install failed"; tail -5 "$OUT/wheels.log"; }
  export PYTHONPATH="/tmp/lowbit-site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
fi
NG=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
mapfile -t FILES < <(grep -l "cuda" tests/test_*.py | sort)
python3 -m pytest --collect-only -q -m cuda -p no:cacheprovider "${FILES[@]}" 2> "$OUT/collect.err" \
  | grep "::" > "$OUT/ids.txt"
echo "collected $(wc -l < "$OUT/ids.txt") cuda tests"
for ((g = 0; g < NG; g++)); do
  awk -v g="$g" -v n="$NG" '(NR - 1) % n == g' "$OUT/ids.txt" > "$OUT/ids_gpu$g.txt"
  CUDA_VISIBLE_DEVICES=$g timeout "$T" python3 -c 'import sys, pytest
ids = [l for l in open(sys.argv[1]).read().splitlines() if l]
sys.exit(pytest.main(["-v", "-m", "cuda", "-rfEs", "-p", "no:cacheprovider"] + ids))' "$OUT/ids_gpu$g.txt" \
    > "$OUT/cuda_tests_gpu$g.log" 2>&1 &
done
wait
for ((g = 0; g < NG; g++)); do
  echo "== GPU $g: $(wc -l < "$OUT/ids_gpu$g.txt") ids"
  grep -cE " PASSED| FAILED| SKIPPED| ERROR" "$OUT/cuda_tests_gpu$g.log"
  grep -E " FAILED| ERROR" "$OUT/cuda_tests_gpu$g.log" | head -20
  tail -n 3 "$OUT/cuda_tests_gpu$g.log"
done
