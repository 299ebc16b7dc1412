"""In-process, interleaved CPU-time comparison of the previous ("threads") and the micro-batched ("staged") pipeline on
SmolLM2 (GPTQ int4 g128 asym): one process, the model loaded once, the pipelines run in turn on deep copies; process CPU
seconds (all threads), wall time, the load average, and a digest of the codes.

Run: PYTHONPATH=$PWD python bench/scale_cpu_ratio.py --blocks 4 --samples 128 --rounds 2 \
        | tee bench/results/scale_cpu_ratio_after.jsonl
(the calibration tokens: /tmp/lowbit-scale-calib.pt, written by bench/scale.py)
Since scale3 ``pipeline="auto"`` (the default, variant ``auto``) is the staged pipeline:
PYTHONPATH=$PWD python bench/scale_cpu_ratio.py --blocks 4 --samples 128 --rounds 2 --variants previous,auto,new-1.5GB \
        | tee bench/results/scale_cpu_ratio_scale3.jsonl"""
import argparse, copy, hashlib, json, os, resource, sys, time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ptq import load_model  # noqa: E402

from lowbit.model.sequential import quantize_model_ptq  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--blocks", type=int, default=1)
ap.add_argument("--samples", type=int, default=32)
ap.add_argument("--rounds", type=int, default=2)
ap.add_argument("--variants", default="previous,new-default,new-1.5GB")
a = ap.parse_args()
torch.set_num_threads(2)
model, tok = load_model("cpu")
model.model.layers = model.model.layers[:a.blocks]
ids = torch.load("/tmp/lowbit-scale-calib.pt")[:a.samples]
KW = {"previous": dict(pipeline="threads"), "new-default": dict(pipeline="staged"), "auto": dict(),
      "new-1.5GB": dict(pipeline="staged", max_memory="1.5GB")}


def digest(m):
    h = hashlib.sha256()
    for n, mod in m.named_modules():
        st = getattr(mod, "qstate", None)
        if st is not None:
            h.update(st.data.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


for rep in range(a.rounds):
    for name in a.variants.split(","):
        m = copy.deepcopy(model)
        l0 = os.getloadavg()[0]
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t = time.perf_counter()
        quantize_model_ptq(m, method="gptq", bits=4, group_size=128, sym=False, calib_dataset=ids, progress=False,
                           **KW[name])
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"pipeline": name, "rep": rep, "blocks": a.blocks, "samples": a.samples,
                          "wall_s": round(time.perf_counter() - t, 2),
                          "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 2),
                          "load": round((l0 + os.getloadavg()[0]) / 2, 1), "codes": digest(m)}), flush=True)
        del m
