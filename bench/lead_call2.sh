#!/usr/bin/env bash
# The lead's second device call (sixth session), after bench/lead_call.sh's first run was cut at its limit and
# its transformers wheels lacked huggingface_hub's httpx2: GPU 1 runs the rest of tests/test_kernels_cuda.py (the
# node ids in $DONE, already passed or skipped in call 1, are deselected) and the other files call 1's GPU 1 never
# reached; GPU 0 re-runs the files that skipped for want of transformers. `-v` logs to $OUT.
#   cd <copy of the repo> && WHL_DIR=<wheels> DONE=<ids file> bash bench/lead_call2.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T=${TEST_TIMEOUT:-240}
if [ -n "${WHL_DIR:-}" ]; then
  python3 -m pip install -q --no-deps --no-index --target /tmp/lowbit-site "$WHL_DIR"/*.whl > "$OUT/wheels.log" 2>&1
  if PYTHONPATH=/tmp/lowbit-site python3 -c "import transformers" 2>> "$OUT/wheels.log"; then
    export PYTHONPATH="/tmp/lowbit-site"
  else
    echo "carried transformers does not import: the image's own is used"; tail -3 "$OUT/wheels.log"
  fi
  python3 -c "import transformers, torch; print('transformers', transformers.__version__, 'torch', torch.__version__)"
fi
DESEL=()
if [ -n "${DONE:-}" ]; then while read -r id; do DESEL+=(--deselect "$id"); done < "$DONE"; fi
(CUDA_VISIBLE_DEVICES=1 timeout "$T" python3 -m pytest -v -m cuda -rfEs -p no:cacheprovider "${DESEL[@]}" \
  tests/test_kernels_cuda.py tests/test_kernels_mm.py tests/test_kernels.py tests/test_nn_qlinear.py \
  tests/test_nn_linear4bit.py tests/test_dp_split.py tests/test_nn_rnn.py tests/test_dp_overlap.py \
  > "$OUT/gpu1.log" 2>&1) &
(CUDA_VISIBLE_DEVICES=0 timeout "$T" python3 -m pytest -v -m cuda -rfEs -p no:cacheprovider \
  tests/test_integration_transformers.py tests/test_model_api.py tests/test_plan_gpu.py tests/test_sparsity.py \
  > "$OUT/gpu0.log" 2>&1) &
wait
for g in 0 1; do echo "== GPU $g"; grep -cE " PASSED" "$OUT/gpu$g.log"; grep -E " FAILED| ERROR" "$OUT/gpu$g.log" | head; tail -n 4 "$OUT/gpu$g.log"; done
