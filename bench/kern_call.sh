#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 15 (helper kern): GPU 0 runs the kernel sweep (bench/gemv_sweep.py
# --run3: its own GPU correctness check of the new paths first, then M = 1 prefetch / byte-pair GEMVs and M = 8 / 16
# v1-GEMM configs against v1, dequantize + cuBLAS and F.linear) and then the CUDA tests of the fused matmul paths;
# GPU 1 runs bench/user_decode.py (eager + CUDA-graph generate, prefill split), whose lowbit 4-bit variants come
# last and wait for the sweep's merged TUNED_MM rows. Everything lands in $OUT.
#   cd <copy of the repo> && bash bench/kern_call.sh   (wheels of the peers in ./.whl, optional)
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD OMP_NUM_THREADS=8
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv
python3 -c 'import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__, torch.cuda.device_count())'
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout ${SWEEP_TIMEOUT:-190} python3 bench/gemv_sweep.py --run3 --out $OUT --budget ${SWEEP_BUDGET:-140} --skip-check > $OUT/sweep.log 2>&1
  echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/sweep.log
  timeout ${TEST_TIMEOUT:-70} python3 -m pytest -q -m cuda tests/test_kernels_cuda.py -p no:cacheprovider \
    -k "pair_table or v2_fused" > $OUT/pytest_cuda.log 2>&1
  echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest_cuda.log
) &
CUDA_VISIBLE_DEVICES=1 timeout ${DECODE_TIMEOUT:-280} python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,nf4,int8 --graph bf16,bnb,torchao,int4,nf4,int8 --prefill-parts int4,nf4,int8 \
  --mm-configs $OUT/mm_tuned.json --mm-wait ${MM_WAIT:-200} --time-budget ${DECODE_BUDGET:-250} --out-dir $OUT \
  > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
wait
grep -vE "Warning|warn\(|return forward_call" $OUT/decode.log | cut -c1-300 | tail -30
grep -E "check|copy|took|failures" $OUT/sweep.log | tail -14
tail -3 $OUT/pytest_cuda.log
echo "total $(( $(date +%s) - T0 )) s"
