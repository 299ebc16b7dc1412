#!/usr/bin/env bash
# Run every `cuda`-marked test on a lent multi-GPU machine, one pytest process per GPU, logs to $OUT (`-v`: one
# line per test as it ends, so a run cut by its time limit still shows every result it reached).
# Usage: bash bench/cuda_tests.sh [timeout_s]
# SPLIT=files (default): test files dealt round robin over the GPUs, largest first.
# SPLIT=ids: the collected node ids dealt round robin (big files such as tests/test_kernels_cuda.py are shared
#   out too, so the processes end together).
# PER_GPU=k: k pytest processes per GPU (Triton compilation is CPU-bound and the test kernels are small: on a
#   16-core single-GPU machine several processes can share the GPU: the run should end sooner).
# WHL_DIR=<dir of wheels>: installed with --no-deps into a private site dir first (the device image lacks
# gguf / compressed-tensors and has an older transformers than the one the project pins).
set -u
T=${1:-280}
OUT=${OUT:-/tmp/cuda-tests-out}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -n "${WHL_DIR:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/lowbit-site "$WHL_DIR"/*.whl > "$OUT/wheels.log" 2>&1 \
    || { echo "wheel install failed"; tail -5 "$OUT/wheels.log"; }
  export PYTHONPATH="/tmp/lowbit-site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
fi
NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
NG=$((NGPU * ${PER_GPU:-1}))
mapfile -t FILES < <(grep -l "cuda" tests/test_*.py | sort)
if [ "${SPLIT:-files}" = ids ]; then
  python3 -m pytest --collect-only -q -m cuda -p no:cacheprovider "${FILES[@]}" 2> "$OUT/collect.err" \
    | grep "::" > "$OUT/ids.txt"
  echo "collected $(wc -l < "$OUT/ids.txt") cuda tests"
  for ((g = 0; g < NG; g++)); do awk -v g="$g" -v n="$NG" '(NR - 1) % n == g' "$OUT/ids.txt" > "$OUT/part$g.txt"; done
else
  # largest files first, dealt round robin so the processes end together
  mapfile -t FILES < <(for f in "${FILES[@]}"; do echo "$(wc -c < "$f") $f"; done | sort -rn | cut -d' ' -f2)
  for ((g = 0; g < NG; g++)); do
    for ((i = g; i < ${#FILES[@]}; i += NG)); do echo "${FILES[$i]}"; done > "$OUT/part$g.txt"
  done
fi
for ((g = 0; g < NG; g++)); do
  CUDA_VISIBLE_DEVICES=$((g % NGPU)) timeout "$T" python3 -c 'import sys, pytest
args = [l for l in open(sys.argv[1]).read().splitlines() if l]
sys.exit(pytest.main(["-v", "-m", "cuda", "-rfEs", "-p", "no:cacheprovider"] + args))' "$OUT/part$g.txt" \
    > "$OUT/cuda_tests_gpu$g.log" 2>&1 &
done
wait
for ((g = 0; g < NG; g++)); do
  echo "== process $g (GPU $((g % NGPU))): $(wc -l < "$OUT/part$g.txt") entries"
  grep -cE " PASSED| FAILED| SKIPPED| ERROR" "$OUT/cuda_tests_gpu$g.log"
  grep -E " FAILED| ERROR" "$OUT/cuda_tests_gpu$g.log" | head -20
  tail -n 3 "$OUT/cuda_tests_gpu$g.log"
done
