#!/usr/bin/env bash
# Device call (nvidia-h200-x2) for issue 15, helper kern3: GPU 1 runs the kernel sweep (bench/gemv_sweep.py --run5:
# NF4 / int4 shuffle-table GEMVs vs the table / bit-trick ones, the state's own scale layout vs transposed copies,
# M = 16 / 64 committed paths vs dequantize + cuBLAS) and then the CUDA tests with the sweep's winners
# (LOWBIT_MM_CONFIGS); GPU 0 runs bench/user_decode.py (bf16, bitsandbytes, torchao, lowbit int4 / nf4 / int8,
# eager + CUDA graph), which loads the sweep's winners before its first lowbit variant.
#   cd <copy of the repo> && WHL=../.whl bash bench/kern3_call.sh   (wheels of the peers, optional)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
W=${WHL:-.whl}
if ls $W/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
mkdir -p $OUT/s1 $OUT/decode
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${SWEEP_TIMEOUT:-175} python3 bench/gemv_sweep.py --run5 --skip-check --out $OUT/s1 \
    --budget ${SWEEP_BUDGET:-130} > $OUT/sweep.log 2>&1
  echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/sweep.log
  LOWBIT_MM_CONFIGS=$OUT/s1/mm_tuned.json timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -m cuda \
    tests/test_kernels_cuda.py tests/test_kernels_modules_cuda.py -p no:cacheprovider -rf \
    -k "shuffle or state_layout or no_derived or row_blocks or v2_fused or pair_table or linear_4bit_all_paths or module or fused_gemv" \
    > $OUT/pytest.log 2>&1
  echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
) &
CUDA_VISIBLE_DEVICES=0 timeout ${DECODE_TIMEOUT:-300} python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,nf4,int8 --graph bf16,bnb,torchao,int4,nf4,int8 \
  --mm-configs $OUT/s1/mm_tuned.json --mm-wait 200 --time-budget ${DECODE_BUDGET:-250} --out-dir $OUT/decode \
  > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
wait
rm -f $OUT/decode/user_decode.png
grep -vE "Warning|warn\(|return forward_call|^\s*$" $OUT/decode.log | cut -c1-300 | tail -22
grep -vE "^\s*$" $OUT/sweep.log | cut -c1-230 | tail -60
tail -25 $OUT/pytest.log | cut -c1-400
