"""llama.cpp (llama-cpp-python) tokenization and perplexity of GGUF files on the same text.

Run: python bench/llama_cpp_ppl.py TEXT N_CHARS FILE.gguf [FILE.gguf ...] (prints JSON; needs llama-cpp-python).
"""
import sys, json, numpy as np
from llama_cpp import Llama
text_path, n_chars, files = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
text = open(text_path, encoding="utf-8").read()[:n_chars]
CTX = 512
res = {}
for f in files:
    llm = Llama(model_path=f, n_ctx=CTX, logits_all=True, verbose=False, n_threads=2, n_batch=CTX)
    toks = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    nll, n = 0.0, 0
    for start in range(0, len(toks) - CTX + 1, CTX):
        win = toks[start:start + CTX]
        llm.reset()
        llm.eval(win)
        logits = np.asarray(llm.scores[:CTX], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        tgt = np.asarray(win[1:])
        nll -= lp[np.arange(CTX - 1), tgt].sum()
        n += CTX - 1
    res[f] = {"n_tokens": len(toks), "ppl": float(np.exp(nll / n)), "scored": n, "tokens_head": toks[:8],
              "pre": llm.metadata.get("tokenizer.ggml.pre"), "name": llm.metadata.get("general.name")}
    res[f]["_toks"] = toks
    del llm
base = files[0]
for f in files:
    res[f]["same_tokens_as_first"] = res[f]["_toks"] == res[base]["_toks"]
for f in files:
    del res[f]["_toks"]
print(json.dumps(res, indent=1))
