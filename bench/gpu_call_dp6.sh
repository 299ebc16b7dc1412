#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, session 9: bench/dp_trace.py on the 8B GPTQ (profiler over two
# blocks, no synchronising timers), 1 GPU then 2 GPUs, then (time allowing) 2 GPUs with LOWBIT_DP_SYNC=0.
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call_dp6.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import safetensors, tqdm" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/lowbit-site \
  .whl/safetensors-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/lowbit-site
L=${TRACE_LAYERS:-5} S=${TRACE_START:-2} N=${TRACE_N:-2}
CUDA_VISIBLE_DEVICES=0 timeout ${T1:-150} python3 bench/dp_trace.py --out $OUT --layers $L --blk0 $S --nblk $N --tag 1gpu \
  > $OUT/t1.log 2>&1; tail -2 $OUT/t1.log | cut -c1-600
timeout ${T2:-150} torchrun --nproc-per-node 2 bench/dp_trace.py --out $OUT --layers $L --blk0 $S --nblk $N --tag 2gpu \
  > $OUT/t2.log 2>&1; grep '"rank"' $OUT/t2.log | cut -c1-600; tail -3 $OUT/t2.log | cut -c1-300
for v in ${TRACE_VARIANTS:-}; do  # name=ENV=VAL
  name=${v%%=*}; kv=${v#*=}
  env $kv timeout ${T3:-120} torchrun --nproc-per-node 2 bench/dp_trace.py --out $OUT --layers $L --blk0 $S --nblk $N \
    --tag $name > $OUT/t_$name.log 2>&1; grep '"rank"' $OUT/t_$name.log | cut -c1-600
done
