"""Per-sample Hessian sums: the staged pipeline's ``InputStats.add_samples`` (float64 sums of per-sample fp32
products, upper block triangle since scale2) against the full per-sample product it replaced (written out here) and
the previous pipeline's fp32 ``gram`` over whole chunks; 128 random samples of 512 tokens, micro-batches of 8, process
CPU seconds (run with ``OMP_WAIT_POLICY=PASSIVE``: issued from the main thread, libgomp's spinning inflates them, see
bench/scale.md), and the largest difference between the old and the new sums.

Run: OMP_WAIT_POLICY=PASSIVE PYTHONPATH=$PWD python bench/scale_hessian_bench.py
"""
import time

import torch

from lowbit.algorithms.stats import InputStats


def full_product_sums(st, x):
    """The previous add_samples: each sample's full x^T x (bmm), every element added to the float64 sums."""
    samples = x.reshape(x.shape[0], -1, st.in_features)
    k = st.in_features
    per = max(1, (64 * 2 ** 20) // (k * k * 4))
    for a in range(0, samples.shape[0], per):
        xs = samples[a:a + per].float()
        g = torch.bmm(xs.transpose(1, 2), xs)
        rows = max(1, (16 * 2 ** 20) // (k * 8))
        for i in range(g.shape[0]):
            for r in range(0, k, rows):
                st.xtx[r:r + rows] += g[i, r:r + rows]
        st.count += xs.shape[0] * xs.shape[1]


torch.set_num_threads(2)
torch.manual_seed(0)
for k in (576, 1536):
    x = torch.randn(128, 512, k)
    for rep in range(2):
        t0 = time.process_time()
        old = InputStats(k, absmean=False, dtype=torch.float64)
        for i in range(0, 128, 8):
            full_product_sums(old, x[i:i + 8])
        t1 = time.process_time()
        new = InputStats(k, absmean=False, dtype=torch.float64)
        for i in range(0, 128, 8):
            new.add_samples(x[i:i + 8])
        t2 = time.process_time()
        g = InputStats(k, absmean=False)
        for i in range(0, 128, 8):
            g.add(x[i:i + 8])
        t3 = time.process_time()
        print(f"k={k} run {rep}: full products {t1 - t0:.2f} CPU s, triangular {t2 - t1:.2f}, fp32 gram "
              f"{t3 - t2:.2f}; max |new - old| = {(new.xtx - old.xtx).abs().max().item()}", flush=True)
