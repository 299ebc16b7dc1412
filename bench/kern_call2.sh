#!/usr/bin/env bash
# Second device call (nvidia-h200-x2) for issue 15 (helper kern), after bench/kern_call.sh, one thing at a time on
# GPU 0 (the first call's eager rows overlapped a pytest run on the other GPU): bench/user_decode.py with the
# committed TUNED_MM rows, the row-contiguous dequantize and the in-kernel split-K fixup; bench/gemv_sweep.py
# --committed (the shipped choice per format / shape / M re-timed); the CUDA tests of the fused paths.
#   cd <copy of the repo> && bash bench/kern_call2.sh   (wheels of the peers in ./.whl, optional)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
export CUDA_VISIBLE_DEVICES=0
timeout ${DECODE_TIMEOUT:-140} python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,nf4,int8 --graph bf16,bnb,torchao,int4,nf4,int8 \
  --prefill-parts bnb,torchao,int4,nf4,int8 --time-budget ${DECODE_BUDGET:-120} --out-dir $OUT > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
timeout ${SWEEP_TIMEOUT:-65} python3 bench/gemv_sweep.py --committed --out $OUT --budget ${SWEEP_BUDGET:-50} \
  --skip-check > $OUT/sweep.log 2>&1
echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/sweep.log
timeout ${TEST_TIMEOUT:-65} python3 -m pytest -q -m cuda tests/test_kernels_cuda.py -p no:cacheprovider \
  -k "pair_table or v2_fused" > $OUT/pytest_cuda.log 2>&1
echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest_cuda.log
grep -vE "Warning|warn\(|return forward_call" $OUT/decode.log | cut -c1-400 | tail -24
grep -vE "^\s*$" $OUT/sweep.log | cut -c1-260 | tail -48
tail -4 $OUT/pytest_cuda.log
