"""llama.cpp timing worker for ``bench/cpu_infer.py`` (runs in a Python that has ``llama-cpp-python``).

    python bench/_llama_cpp_worker.py FILE.gguf THREADS

Reads one JSON command per line on stdin, answers one JSON line on stdout:

* ``{"op": "prefill", "ids": [...]}``: a fresh context evaluates the ids in one batch (last-token logits);
  answers ``{"wall": s, "cpu": s}``;
* ``{"op": "decode", "ids": [...], "new": n}``: evaluates the prompt, then ``n`` greedy steps of one token
  each (argmax of the last logits, read from the context, then ``eval`` of that token); answers the time of the ``n`` steps and the tokens;
* ``{"op": "quit"}``.
"""
import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> int:
    path, threads = sys.argv[1], int(sys.argv[2])
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)
    n_vocab = llm.n_vocab()
    print(json.dumps({"ready": True, "n_vocab": n_vocab}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        llm.reset()
        ids = cmd["ids"]
        if cmd["op"] == "prefill":
            c, t = time.process_time(), time.perf_counter()
            llm.eval(ids)
            print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}), flush=True)
        elif cmd["op"] == "decode":
            llm.eval(ids)
            toks = []
            c, t = time.process_time(), time.perf_counter()
            for _ in range(cmd["new"]):
                tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))
                toks.append(tok)
                llm.eval([tok])
            print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c, "tokens": toks}),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
