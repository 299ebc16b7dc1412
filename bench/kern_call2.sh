#!/usr/bin/env bash
# Second device call (nvidia-h200-x2) for issue 15 (helper kern), after bench/kern_call.sh: bench/user_decode.py alone
# on GPU 0 (nothing else running on the machine: the first call's eager rows overlapped a pytest run), with the
# committed TUNED_MM rows (run 3) and the row-contiguous dequantize; then the CUDA tests of the fused paths.
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
timeout ${DECODE_TIMEOUT:-160} python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,nf4,int8 --graph bf16,bnb,torchao,int4,nf4,int8 \
  --prefill-parts bnb,torchao,int4,nf4,int8 --time-budget ${DECODE_BUDGET:-140} --out-dir $OUT > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -m cuda tests/test_kernels_cuda.py -p no:cacheprovider \
  -k "pair_table or v2_fused" > $OUT/pytest_cuda.log 2>&1
echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest_cuda.log
grep -vE "Warning|warn\(|return forward_call" $OUT/decode.log | cut -c1-400 | tail -24
tail -4 $OUT/pytest_cuda.log
