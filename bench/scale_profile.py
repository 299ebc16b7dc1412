"""Why the staged pipeline cost several times the previous one's CPU seconds: the same GPTQ solve (576 x 576, int4 g128
asym, act_order) issued from the main thread and from a worker thread, 2 torch threads, interleaved, in one process.

Run: PYTHONPATH=$PWD python bench/scale_profile.py | tee bench/results/scale_profile.jsonl
(``OMP_WAIT_POLICY=PASSIVE`` in the environment removes the difference: libgomp's spin-waiting on the main thread.)"""
import hashlib, json, os, resource, threading, time

import torch

from lowbit.algorithms.gptq import gptq_factor, gptq_quantize

torch.set_num_threads(2)
torch.manual_seed(0)
x = torch.randn(4096, 576)
H = (x.t() @ x) / 4096
w = torch.randn(576, 576)


def solve(where, box):
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    f = gptq_factor(H, 0.01, True)
    res = gptq_quantize(w, H, 4, 128, False, factor=f, percdamp=0.01, act_order=True)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    box.update(where=where, wall_s=round(time.perf_counter() - t, 3),
               cpu_s=round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 3),
               load=round(os.getloadavg()[0], 1), omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"),
               codes=hashlib.sha256(res.codes.numpy().tobytes()).hexdigest()[:12])


for rep in range(3):
    for where in ("main thread", "worker thread"):
        box = {"rep": rep}
        if where == "main thread":
            solve(where, box)
        else:
            t = threading.Thread(target=solve, args=(where, box))
            t.start()
            t.join()
        print(json.dumps(box), flush=True)
