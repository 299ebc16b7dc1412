#!/usr/bin/env bash
# The lead's final device call (nvidia-h200-x2), sixth session: every `cuda`-marked test of the merged tree spread
# over both GPUs (bench/cuda_tests.sh, transformers / gguf / compressed-tensors wheels of CI's pins from $WHL_DIR),
# then bench/user_decode.py on both GPUs at once: GPU 0 with whole-weight dequantize + cuBLAS
# (LOWBIT_DENSE_CHUNK_MB=0) over bf16, lowbit int4 / nf4 and the variants the earlier tables lacked (GPTQ-format,
# GGUF Q4_0, int8-dynamic, fp8), GPU 1 with the default 32 MiB row blocks over bf16, int4, nf4 (prefill and peak
# memory of the two settings side by side).
#   cd <copy of the repo> && WHL_DIR=<wheels> bash bench/lead_call.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
OUT=$OUT/tests bash bench/cuda_tests.sh ${TEST_TIMEOUT:-250}
echo "tests done at $(( $(date +%s) - T0 )) s"
export PYTHONPATH="/tmp/lowbit-site:$PWD"
mkdir -p $OUT/chunk0 $OUT/chunk32
(CUDA_VISIBLE_DEVICES=0 LOWBIT_DENSE_CHUNK_MB=0 timeout ${DECODE_TIMEOUT:-150} taskset -c 0-15 python3 bench/user_decode.py \
  --layers 8 --reps 3 --only bf16,int4,nf4,gptq,gguf,int8dyn,fp8 --graph bf16,int4,nf4,gptq,gguf \
  --time-budget ${DECODE_BUDGET:-130} --out-dir $OUT/chunk0 > $OUT/chunk0/decode.log 2>&1
 echo "chunk0 rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/chunk0/decode.log) &
(CUDA_VISIBLE_DEVICES=1 LOWBIT_DENSE_CHUNK_MB=32 timeout ${DECODE_TIMEOUT:-150} taskset -c 16-31 python3 bench/user_decode.py \
  --layers 8 --reps 3 --only bf16,int4,nf4 --graph bf16,int4,nf4 \
  --time-budget ${DECODE_BUDGET:-130} --out-dir $OUT/chunk32 > $OUT/chunk32/decode.log 2>&1
 echo "chunk32 rc=$? at $(( $(date +%s) - T0 )) s" >> $OUT/chunk32/decode.log) &
wait
rm -f $OUT/chunk0/user_decode.png $OUT/chunk32/user_decode.png
for d in chunk0 chunk32; do echo "== $d"; grep -vE "Warning|warn\(|return forward_call|^\s*$|Configuration class" $OUT/$d/decode.log | cut -c1-300 | tail -14; done
