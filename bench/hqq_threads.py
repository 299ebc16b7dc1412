"""lowbit HQQ on one SmolLM2-sized layer (1536 x 576, random N(0, 0.02)), int4 g64 asym, with 2 and 1 torch
threads alternately: wall and process CPU seconds per call. On the shared 2-core box, 2 threads make every
small op an OpenMP parallel region whose partner thread is often descheduled (spin-waiting counts as CPU).
Run: PYTHONPATH=$PWD python bench/hqq_threads.py | tee bench/results/hqq_threads.txt"""
import os
import time

import torch

from lowbit.algorithms.hqq import hqq_quantize

torch.manual_seed(0)
W = torch.randn(1536, 576) * 0.02
hqq_quantize(W, 4, 64, False)
for nt in (2, 1, 2, 1):
    torch.set_num_threads(nt)
    load = os.getloadavg()[0]
    t, c = time.perf_counter(), time.process_time()
    for _ in range(2):
        hqq_quantize(W, 4, 64, False)
    print(f"threads {nt}: wall {(time.perf_counter() - t) / 2:.3f} s, CPU {(time.process_time() - c) / 2:.3f} s "
          f"per layer (load average {load:.1f})", flush=True)
