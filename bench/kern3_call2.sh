#!/usr/bin/env bash
# Second device call (nvidia-h200-x2) of helper kern3 (issue 15), after bench/kern3_call.sh, with the committed TUNED_MM
# (the run-5 winners): GPU 0 / CPU cores 0-15 run bench/user_decode.py (bf16, bitsandbytes, torchao, lowbit int4 / nf4
# as quantized on the GPU and re-allocated, int8; eager + CUDA graph); GPU 1 / cores 16-31 run the CUDA tests of the
# new paths and every module x kernel test, verbose (one line per test, so a killed run still names them).
#   cd <copy of the repo> && WHL=../.whl bash bench/kern3_call2.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
W=${WHL:-.whl}
if ls $W/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
mkdir -p $OUT/decode
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${TEST_TIMEOUT:-210} taskset -c 16-31 python3 -m pytest -v -m cuda -p no:cacheprovider -rf \
    tests/test_kernels_cuda.py tests/test_kernels_modules_cuda.py \
    -k "shuffle or state_layout or no_derived or row_blocks or fused_gemv or module or compile_decode" \
    > $OUT/pytest.log 2>&1
  echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
) &
CUDA_VISIBLE_DEVICES=0 timeout ${DECODE_TIMEOUT:-210} taskset -c 0-15 python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,int4r,nf4,nf4r,int8 --graph bf16,bnb,torchao,int4,int4r,nf4,nf4r,int8 \
  --time-budget ${DECODE_BUDGET:-185} --out-dir $OUT/decode > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
wait
rm -f $OUT/decode/user_decode.png
grep -vE "Warning|warn\(|return forward_call|^\s*$|Configuration class" $OUT/decode.log | cut -c1-300 | tail -20
grep -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|rc=" $OUT/pytest.log | grep -vE " PASSED" | cut -c1-300 | tail -40
grep -c " PASSED" $OUT/pytest.log
