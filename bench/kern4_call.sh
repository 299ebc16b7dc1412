#!/usr/bin/env bash
# Last device call (nvidia-h200-x2) of helper kern4 (issue 15): GPU 0 / CPU cores 0-15 run bench/user_decode.py
# with every variant of the issue (eager + CUDA-graph decode, prefill 512 under LOWBIT_DENSE_CHUNK_MB 32 and 0);
# GPU 1 / cores 16-31 run bench/gpu.py's 4-bit kernel table (M = 1 / 16 / 64 / 256, both issue shapes, peers),
# then the CUDA tests (the new tc tests first, then every module x kernel test, then test_kernels_cuda.py), verbose
# (one line per test, so a run cut by its time limit still names what it reached).
#   cd <copy of the repo> && WHL=.whl bash bench/kern4_call.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=$PWD
W=${WHL:-.whl}
if ls $W/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
T0=$(date +%s)
mkdir -p $OUT/decode $OUT/gpu
(
  export CUDA_VISIBLE_DEVICES=1
  timeout ${GPU_TIMEOUT:-90} taskset -c 16-31 python3 bench/gpu.py --sections gemm --quick --out $OUT/gpu \
    > $OUT/gpu.log 2>&1
  echo "gpu.py rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/gpu.log
  left=$(( ${TOTAL:-200} - ($(date +%s) - T0) ))
  timeout $left taskset -c 16-31 python3 -m pytest -v -m cuda -p no:cacheprovider -rf \
    tests/test_kernels_tc_cuda.py tests/test_kernels_modules_cuda.py tests/test_kernels_cuda.py \
    > $OUT/pytest.log 2>&1
  echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/pytest.log
) &
CUDA_VISIBLE_DEVICES=0 timeout ${DECODE_TIMEOUT:-200} taskset -c 0-15 python3 bench/user_decode.py --layers 8 --reps 3 \
  --only bf16,bnb,torchao,int4,nf4,gptq,gguf,int8,int8dyn,fp8 --graph bf16,bnb,torchao,int4,nf4,gptq,gguf,int8,int8dyn,fp8 \
  --prefill-chunks 32,0 --time-budget ${DECODE_BUDGET:-170} --out-dir $OUT/decode > $OUT/decode.log 2>&1
echo "decode rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/decode.log
wait
find $OUT/decode $OUT/gpu -type f ! -name "*.json" -delete  # at most 8 files come back: the JSONs + 3 logs
grep -vE "Warning|warn\(|return forward_call|^\s*$|Configuration class" $OUT/decode.log | cut -c1-260 | tail -24
grep -E "speedup|rc=|took" $OUT/gpu.log | cut -c1-200 | tail -5
grep -E "FAILED|ERROR|passed|failed|rc=" $OUT/pytest.log | grep -vE " PASSED" | cut -c1-240 | tail -30
echo "PASSED $(grep -c ' PASSED' $OUT/pytest.log) FAILED $(grep -c ' FAILED' $OUT/pytest.log) SKIPPED $(grep -c ' SKIPPED' $OUT/pytest.log)"
