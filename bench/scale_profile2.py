"""Where the staged pipeline's CPU time goes against the previous pipeline's (issue 18, helper scale2):
one process, the model loaded once, the pipelines run in turn on deep copies (interleaved rounds); process
CPU seconds per component of the staged pipeline (its calibration runs in one worker thread at a time, so
process CPU time deltas are attributable), and the peak RSS growth of each run.

Run: PYTHONPATH=$PWD python bench/scale_profile2.py --blocks 2 --samples 128 --rounds 2 \
        | tee -a bench/results/scale_profile2.jsonl
(the calibration tokens: /tmp/lowbit-scale-calib.pt, written by bench/scale.py)"""
import argparse, copy, functools, hashlib, json, os, resource, sys, time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptq import load_model  # noqa: E402

import lowbit.model._ptq_solve as solve  # noqa: E402
import lowbit.model._ptq_threads as threads_mod  # noqa: E402
from lowbit.algorithms import stats as stats_mod  # noqa: E402
from lowbit.model import offload  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--blocks", type=int, default=2)
ap.add_argument("--samples", type=int, default=128)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--variants", default="previous,new-default")
ap.add_argument("--commit", default="")
a = ap.parse_args()
torch.set_num_threads(2)
model, tok = load_model("cpu")
model.model.layers = model.model.layers[:a.blocks]
ids = torch.load("/tmp/lowbit-scale-calib.pt")[:a.samples]
KW = {"previous": dict(pipeline="threads"), "new-default": dict(pipeline="staged"),
      "new-1.5GB": dict(pipeline="staged", max_memory="1.5GB")}
T = defaultdict(float)
N = defaultdict(int)
DEPTH = {"d": 0}


def timed(key, fn):
    @functools.wraps(fn)
    def w(*args, **kw):
        t = time.process_time()
        try:
            return fn(*args, **kw)
        finally:
            T[key] += time.process_time() - t
            N[key] += 1
    return w


stats_mod.InputStats.add_samples = timed("hessian_add_samples", stats_mod.InputStats.add_samples)
solve.gptq_quantize = timed("gptq_quantize", solve.gptq_quantize)
solve.gptq_factor = timed("gptq_factor", solve.gptq_factor)
offload.ActivationStore.put = timed("store_put", offload.ActivationStore.put)
offload.ActivationStore.get = timed("store_get", offload.ActivationStore.get)
from lowbit.model._ptq_staged import _BlockRunner  # noqa: E402
_run = _BlockRunner.run


def run_counting(self, *a, **k):
    try:
        return _run(self, *a, **k)
    finally:
        N["tail_replays"] += getattr(self, "tail_hits", 0)


_BlockRunner.run = run_counting
blk = type(model.model.layers[0])
attn = type(model.model.layers[0].self_attn)
mlp = type(model.model.layers[0].mlp)
blk.forward = timed("block_forward_incl", blk.forward)
attn.forward = timed("attn_forward_incl", attn.forward)
mlp.forward = timed("mlp_forward_incl", mlp.forward)


def digest(m):
    h = hashlib.sha256()
    for n, mod in m.named_modules():
        st = getattr(mod, "qstate", None)
        if st is not None:
            h.update(st.data.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def rss_hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


for rep in range(a.rounds):
    for name in a.variants.split(","):
        m = copy.deepcopy(model)
        T.clear(); N.clear()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = rss_hwm()
        l0 = os.getloadavg()[0]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        quantize_model_ptq(m, method="gptq", bits=4, group_size=128, sym=False, calib_dataset=ids, progress=False,
                           **KW[name])
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"commit": a.commit, "pipeline": name, "rep": rep, "blocks": a.blocks, "samples": a.samples,
                          "wall_s": round(time.perf_counter() - t, 2),
                          "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2),
                          "load": round((l0 + os.getloadavg()[0]) / 2, 1), "rss_base_mb": round(base / 2**20),
                          "rss_peak_mb": round(rss_hwm() / 2**20), "codes": digest(m),
                          "parts_cpu_s": {k: round(v, 2) for k, v in sorted(T.items())},
                          "calls": dict(N)}), flush=True)
        del m
