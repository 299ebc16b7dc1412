"""In-process, interleaved CPU-time comparison of the previous and the micro-batched pipeline on SmolLM2 (1 block,
32 x 512 calibration, GPTQ int4 g128 asym). Run: PYTHONPATH=$PWD python bench/scale_cpu_ratio.py | tee bench/results/scale_cpu_ratio.jsonl"""
import sys, time, torch, copy, resource, json
sys.path.insert(0, 'bench')
from ptq import load_model
from lowbit.model.sequential import quantize_model_ptq
torch.set_num_threads(2)
model, tok = load_model("cpu")
model.model.layers = model.model.layers[:1]
ids = torch.load("/tmp/lowbit-scale-calib.pt")[:32]
for rep in range(2):
    for name, kw in [("previous", dict(pipeline="threads")), ("new", dict(max_memory="1.5GB")), ("new-default", {})]:
        m = copy.deepcopy(model)
        r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
        quantize_model_ptq(m, method="gptq", bits=4, group_size=128, sym=False, calib_dataset=ids, progress=False, **kw)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"pipeline": name, "rep": rep, "wall_s": time.perf_counter() - t,
                          "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime}), flush=True)
