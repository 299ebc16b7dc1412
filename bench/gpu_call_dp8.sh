#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issue 20, session 10: the host topology, the bits probe of two batched forms
# (bench/dp_bits_probe.py), bench/scale_gpu.py --steps run17 (SCALE_STEPS=...: another list; the smoke digests must
# equal run 10's; the untimed 8B runs, 32 layers), then the CUDA tests of the changed code.
#   cd <copy of the repo> && bash bench/gpu_call_dp8.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c "import safetensors, tqdm" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/lowbit-site \
  .whl/safetensors-*.whl 2>&1 | tail -1
export PYTHONPATH=$PWD:/tmp/lowbit-site
{ nproc; nvidia-smi topo -m; lscpu | grep -Ei "^(model name|numa|socket|thread|core)"; } > $OUT/host.txt 2>&1
grep -i numa $OUT/host.txt | head -4
if [ "${TRACE:-0}" = 1 ]; then
CUDA_VISIBLE_DEVICES=0 timeout 120 python3 bench/dp_trace.py --out $OUT --layers 5 --blk0 2 --nblk 2 --tag 1gpu \
  > $OUT/t1.log 2>&1; tail -1 $OUT/t1.log | cut -c1-300
timeout 120 torchrun --nproc-per-node 2 bench/dp_trace.py --out $OUT --layers 5 --blk0 2 --nblk 2 --tag 2gpu \
  > $OUT/t2.log 2>&1; grep '"rank"' $OUT/t2.log | cut -c1-300
fi
[ "${SKIP_PROBE:-0}" = 1 ] || CUDA_VISIBLE_DEVICES=0 timeout 90 python3 bench/dp_bits_probe.py --out $OUT 2>&1 | tail -3
[ "${SKIP_SCALE:-0}" = 1 ] || SCALE_SMOKE_EXPECT=${SCALE_SMOKE_EXPECT-run10} timeout ${SCALE_TIMEOUT:-330} python3 bench/scale_gpu.py --steps ${SCALE_STEPS:-run17} --out $OUT \
  --budget ${SCALE_BUDGET:-320} 2>&1 | tee $OUT/scale.log | cut -c1-500
[ "${SKIP_TESTS:-0}" = 1 ] || timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_dp_factor_fits.py tests/test_dp_overlap.py \
  tests/test_gptq_sweep.py -k "gpu or cuda or lags or in_place_on_the_gpu or row_pieces_equal or lazy" > $OUT/pytest.log 2>&1
tail -3 $OUT/pytest.log
# at most 8 files come back: the small logs in one
for f in host.txt t1.log t2.log pytest.log; do [ -f $OUT/$f ] && { echo "=== $f"; cat $OUT/$f; rm $OUT/$f; }; done > $OUT/logs.txt
