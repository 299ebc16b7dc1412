#!/usr/bin/env bash
# One device call (nvidia-h200-x2) for issues 18/20 (fused GPTQ sweep, GPU plan): smoke-check the fused sweep and
# the half-precision Hessian products (falling back to the torch paths if either fails), then the CUDA tests of
# tests/test_gptq_sweep.py on GPU 1 while GPU 0 runs the 1-GPU slices, then the 2-GPU runs. Everything in $OUT.
#   cd <copy of the repo> && PYTHONPATH=$PWD bash bench/gpu_call_dp.sh
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=index,name,memory.used,clocks.sm --format=csv
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())'
CUDA_VISIBLE_DEVICES=0 timeout 90 python3 - <<'PY' > $OUT/smoke.log 2>&1 || { echo "SMOKE FAILED"; tail -20 $OUT/smoke.log; }
import time, torch
from lowbit.kernels.triton.gptq_sweep import sweep_block
from lowbit.algorithms.gptq import sweep_block_emulated
n = 128
A = torch.randn(n, n, device="cuda", dtype=torch.float64)
U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(A @ A.T + n * torch.eye(n, device="cuda", dtype=torch.float64))), upper=True).float()
W = torch.randn(300, n, device="cuda"); S = torch.rand(300, n, device="cuda") * .3 + .05; Z = torch.randint(0, 16, (300, n), device="cuda").float()
t = time.perf_counter(); q, e = sweep_block(W, S, Z, U, 15); torch.cuda.synchronize(); print("compile+run", time.perf_counter() - t)
q2, e2 = sweep_block_emulated(W, S, Z, U, 15)
print("SWEEP_OK mismatch", (q != q2).float().mean().item(), (e - e2).abs().max().item())
x = torch.randn(1, 64, 256, device="cuda").bfloat16()
g = torch.bmm(x.transpose(1, 2), x, out_dtype=torch.float32)
print("HESS_OK", g.dtype, (g - x.double().transpose(1, 2) @ x.double()).abs().max().item())
PY
cat $OUT/smoke.log
grep -q SWEEP_OK $OUT/smoke.log || export LOWBIT_GPTQ_SWEEP=torch
grep -q HESS_OK $OUT/smoke.log || export LOWBIT_HESSIAN_GEMM=fp32
echo "sweep=${LOWBIT_GPTQ_SWEEP:-auto} hessian=${LOWBIT_HESSIAN_GEMM:-auto}"
rm -f /tmp/gpu1_done
( export CUDA_VISIBLE_DEVICES=1
  LOWBIT_SWEEP_REPORT=$OUT/sweep_tests.jsonl timeout 150 python3 -m pytest -q -m cuda tests/test_gptq_sweep.py \
    -p no:cacheprovider -rs > $OUT/pytest_cuda.log 2>&1
  tail -3 $OUT/pytest_cuda.log
  touch /tmp/gpu1_done ) > $OUT/gpu1.log 2>&1 &
timeout ${SCALE_TIMEOUT:-300} python3 bench/scale_gpu.py --out $OUT --budget ${SCALE_BUDGET:-290} \
  --runs ${SCALE_RUNS:-gptq_8b_1gpu,awq_8b_1gpu,gptq_8b_2gpu,awq_8b_2gpu,gptq_70b_2gpu} \
  --wait-file /tmp/gpu1_done --wait-max 100 > $OUT/scale.log 2>&1
wait
cat $OUT/gpu1.log
grep -E "passed|failed|error" $OUT/pytest_cuda.log | tail -3
cut -c1-600 $OUT/scale.log
