"""HQQ ``zero_rounding="float"``: WikiText-2 perplexity (first 8 windows of 512, hqq_compare.md's protocol) for the
float zero points stored as float32 / bfloat16 (``lowbit.algorithms.hqq.FLOAT_ZERO_DTYPE``); the float16 row comes
from the ``hqq_compare.py`` run made while float16 was the storage.

Run: PYTHONPATH=$PWD python bench/hqq_float_zero_dtype.py >> bench/results/hqq_float_zero_dtype.jsonl
"""
import copy, json, os, sys

import torch

sys.argv = [sys.argv[0]]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hqq_compare as hc  # noqa: E402

from lowbit.algorithms import hqq  # noqa: E402

torch.set_num_threads(1)
base, tok = hc.load_model("cpu")
test = hc.encode_text(tok, hc.load_text(os.path.join(hc.WIKI, "test.txt")))[: 8 * 512 + 1]
for dt in (torch.float32, torch.bfloat16):
    hqq.FLOAT_ZERO_DTYPE = dt
    m = copy.deepcopy(base)
    hc.seq.quantize_model_ptq(m, method="hqq", progress=False, zero_rounding="float", **hc.CFG)
    print(json.dumps({"zero_dtype": str(dt), "wiki_ppl_8": hc.ppl(m, test, 8)}), flush=True)
