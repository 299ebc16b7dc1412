#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issues 18/20/21: GPU 1 checks which cuSPARSELt combinations run
# (bench/sparse_diag.py), the GPTQ row-split identity, then the 2:4 bench and the CUDA tests, while GPU 0
# runs the 1-GPU 8B GPTQ slice; then the 2-GPU runs (which wait for GPU 1). Everything lands in $OUT.
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call.sh <commit>
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
COMMIT=${1:-?}
rm -f /tmp/gpu1_done
(
  export CUDA_VISIBLE_DEVICES=1
  nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv
  python3 -c 'import torch; print(torch.__version__, torch.cuda.device_count(), torch.backends.cusparselt.version())'
  python3 bench/scale_gpu.py --rowsplit-check /tmp/rowsplit.json &
  MODES=$(timeout 150 python3 bench/sparse_diag.py --out $OUT/sparse_diag.jsonl | tail -1)
  wait
  echo "LOWBIT_CSLT_MODES=$MODES"
  export LOWBIT_CSLT_MODES=$MODES
  timeout 200 python3 bench/sparsity.py --part gpu --out /tmp/sp --commit $COMMIT && cp /tmp/sp/sparsity_gpu.json $OUT/
  timeout 120 python3 -m pytest -q -m cuda tests/test_sparsity.py -p no:cacheprovider > $OUT/pytest_cuda.log 2>&1
  tail -3 $OUT/pytest_cuda.log
  touch /tmp/gpu1_done
) > $OUT/gpu1.log 2>&1 &
python3 bench/scale_gpu.py --out $OUT --budget ${SCALE_BUDGET:-300} --runs ${SCALE_RUNS:-gptq_8b_1gpu,gptq_8b_2gpu,gptq_70b_2gpu} \
  --wait-file /tmp/gpu1_done --wait-max 150 --rowsplit-json /tmp/rowsplit.json > $OUT/scale.log 2>&1
wait
grep -E "LOWBIT_CSLT_MODES|passed|failed" $OUT/gpu1.log | tail -4
cut -c1-400 $OUT/scale.log
