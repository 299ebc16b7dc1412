#!/usr/bin/env bash
# quantk's one device call (nvidia-h200-x2, issue 15 item 4): GPU 1 runs the blockwise quantize / dequantize CUDA
# tests (-v: one line per test); GPU 0 runs bench/blockwise.py (lowbit beside bitsandbytes when its wheel is in
# whl/) and then its configuration sweep. Usage: cd <copy of the repo> && OUT=<dir> bash bench/quantk_call.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
export PYTHONPATH=$PWD
if ls whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl \
    > /tmp/pip.log 2>&1 && export PYTHONPATH=$PWD:/tmp/site || tail -3 /tmp/pip.log
fi
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.mem,driver_version --format=csv > "$OUT/smi.txt" 2>&1
(CUDA_VISIBLE_DEVICES=1 timeout "${TEST_T:-80}" python3 -m pytest -v -rfEs -p no:cacheprovider \
   tests/test_kernels_cuda.py -k "test_quantize or test_double_quant" > "$OUT/pytest_cuda.log" 2>&1
 echo "pytest rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/pytest_cuda.log") &
CUDA_VISIBLE_DEVICES=0 timeout "${BENCH_T:-75}" python3 bench/blockwise.py --out "$OUT" > "$OUT/bench.log" 2>&1
echo "bench rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/bench.log"
CUDA_VISIBLE_DEVICES=0 timeout "${SWEEP_T:-40}" python3 bench/blockwise.py --out "$OUT" --sweep-only > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? at $(( $(date +%s) - T0 )) s" >> "$OUT/sweep.log"
wait
echo "== tests"; grep -cE " PASSED| FAILED| SKIPPED| ERROR" "$OUT/pytest_cuda.log"; grep -E " FAILED| ERROR" "$OUT/pytest_cuda.log" | head -20
tail -n 4 "$OUT/pytest_cuda.log"
echo "== bench"; grep -vE "^\{" "$OUT/bench.log" | tail -n 8
echo "== sweep"; tail -n 4 "$OUT/sweep.log"
