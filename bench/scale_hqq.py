"""HQQ int4 g64 asym on SmolLM2 (2-core CPU): time, CPU seconds and WikiText perplexity (48 x 512) per early_stop.
Run: PYTHONPATH=$PWD python bench/scale_hqq.py 1e-3 0 | tee bench/results/scale_hqq.jsonl"""
import sys, time, os, json, copy, torch, resource
sys.path.insert(0, 'bench')
from ptq import load_model, ppl, WIKI
from lowbit.data.calibration import load_text
from lowbit.eval.perplexity import encode_text
from lowbit.model.sequential import quantize_model_ptq
torch.set_num_threads(2)
base, tok = load_model("cpu")
test = encode_text(tok, load_text(os.path.join(WIKI, "test.txt")))[: 48 * 512 + 1]
out = {}
for es in [float(x) for x in sys.argv[1:]]:
    m = copy.deepcopy(base)
    r0 = resource.getrusage(resource.RUSAGE_SELF); t = time.perf_counter()
    quantize_model_ptq(m, method="hqq", bits=4, group_size=64, sym=False, progress=False, early_stop=es)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    res = {"early_stop": es, "time_s": time.perf_counter() - t, "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
           "load": os.getloadavg()[0]}
    res["wiki_ppl"] = ppl(m, test, 48)
    print(json.dumps(res), flush=True)
