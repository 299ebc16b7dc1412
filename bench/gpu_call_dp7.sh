#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, session 9, run 13: after the changes the first trace found
# (bench/dp_trace.py: a new calibration thread per block rebuilt cuDNN's attention plans, the Hessian sums were added
# in 100 launches per sample at k = 14336, host waits in the factorisation and the solve): (1) the mixed-dtype add's
# memory on CUDA (no float64 temporary), (2) the trace again (1 and 2 GPUs), (3) bench/scale_gpu.py --steps run13 (SCALE_STEPS=run14: the next call) (the
# smoke digests must equal run 10's; the untimed 8B runs, 32 layers), (4) the CUDA data-parallel tests.
#   cd <copy of the repo> && bash bench/gpu_call_dp7.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import safetensors, tqdm" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/lowbit-site \
  .whl/safetensors-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/lowbit-site
python3 - <<'PY'
import torch
x = torch.zeros(14336, 14336, dtype=torch.float64, device="cuda"); g = torch.randn(14336, 14336, device="cuda")
ref = x[:4096].clone() + g[:4096].double()
torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
x += g; torch.cuda.synchronize()
print("mixed add: extra peak bytes", torch.cuda.max_memory_allocated() - base, "equal", torch.equal(x[:4096], ref))
PY
if [ "${SKIP_TRACE:-0}" != 1 ]; then
[ "${TRACE_1GPU:-1}" = 1 ] && CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/dp_trace.py --out $OUT --layers 5 --blk0 2 --nblk 2 --tag 1gpu \
  > $OUT/t1.log 2>&1; tail -1 $OUT/t1.log | cut -c1-400
timeout 120 torchrun --nproc-per-node 2 bench/dp_trace.py --out $OUT --layers 5 --blk0 2 --nblk 2 --tag 2gpu \
  > $OUT/t2.log 2>&1; grep '"rank"' $OUT/t2.log | cut -c1-400
fi
SCALE_SMOKE_EXPECT=${SCALE_SMOKE_EXPECT-run10} timeout ${SCALE_TIMEOUT:-330} python3 bench/scale_gpu.py --steps ${SCALE_STEPS:-run13} --out $OUT \
  --budget ${SCALE_BUDGET:-320} 2>&1 | tee $OUT/scale.log | cut -c1-500
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_dp_factor_fits.py tests/test_dp_overlap.py \
  tests/test_gptq_sweep.py -k "gpu or cuda or lags or in_place_on_the_gpu or row_pieces_equal or lazy" > $OUT/pytest.log 2>&1
tail -3 $OUT/pytest.log
