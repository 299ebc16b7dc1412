"""llama.cpp side of the K-quant benchmarks: quantize with llama.cpp and evaluate GGUF files with llama.cpp.

Runs in an environment with ``llama-cpp-python`` (0.3.36 here) and numpy only (no torch needed): the
evaluation windows are token ids written beforehand by ``bench/kquants_curve.py --stage tokens``.

    python bench/kquants_llama.py quantize --f16 WORK/lowbit-F16.gguf --out WORK Q3_K_S Q3_K_L Q5_K_S
    python bench/kquants_llama.py eval --tokens WORK/v2/tokens.npz --log WORK/v2/ppl.jsonl \
        --texts wikitext2,shakespeare FILE.gguf [FILE.gguf ...]

``eval`` appends one JSON line per (file, text) as it goes ({"file", "text", "ppl", "nll", "n",
"MB", "eval_s", "windows"}) and skips pairs already in the log, so an interrupted run resumes.
Perplexity: each window of 512 tokens evaluated from an empty context by llama.cpp
(``Llama(..., logits_all=True)``), mean negative log-likelihood of tokens 2..512 of every window.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

FTYPE = {"Q4_0": 2, "Q8_0": 7, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
         "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}


def quantize(f16: Path, out: Path, types, threads: int = 2) -> None:
    import llama_cpp

    for typ in types:
        dst = out / f"llamacpp-{typ}.gguf"
        if dst.exists():
            continue
        t0 = time.time()
        p = llama_cpp.llama_model_quantize_default_params()
        p.ftype = FTYPE[typ]
        p.nthread = threads
        tmp = out / f".llamacpp-{typ}.tmp"
        if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), p):
            raise RuntimeError(f"llama_model_quantize {typ} failed")
        tmp.rename(dst)
        print(f"llama.cpp {typ}: {dst.stat().st_size / 1e6:.2f} MB in {time.time() - t0:.0f} s", flush=True)


def nll(path: Path, windows, threads: int) -> tuple[float, int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(windows[0]), logits_all=True, verbose=False, n_threads=threads,
                n_batch=len(windows[0]))
    tot, n = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval([int(t) for t in w])
        logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        lp = logits - logits.max(1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
        tot -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
    del llm
    return tot, n


def evaluate(files, tokens: Path, log: Path, texts, threads: int) -> None:
    data = np.load(tokens)
    done = set()
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done.add((r["file"], r["text"]))
    for text in texts:  # every file on the first text before the second one
        for f in files:
            f = Path(f)
            if (f.name, text) in done or not f.exists():
                continue
            t0 = time.time()
            wins = data[text]
            tot, n = nll(f, wins, threads)
            r = {"file": f.name, "text": text, "ppl": math.exp(tot / n), "nll": tot, "n": n,
                 "MB": f.stat().st_size / 1e6, "bytes": f.stat().st_size, "eval_s": time.time() - t0,
                 "windows": int(wins.shape[0]), "evaluator": "llama.cpp"}
            with log.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(json.dumps(r), flush=True)


def run_queue(queue: Path, tokens: Path, log: Path, threads: int, workdir: Path) -> None:
    """Evaluate ``FILE TEXT`` lines of ``queue`` in order (re-read after every evaluation, so it can be
    re-prioritised while running); several runners share it through claim files; entries whose file
    does not exist yet are retried every 30 s until the queue holds only finished entries."""
    import os

    claims = log.with_suffix(".claims")
    claims.mkdir(exist_ok=True)
    while True:
        done = set()
        if log.exists():
            for line in log.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    done.add((r["file"], r["text"]))
        todo = [tuple(l.split()) for l in queue.read_text().splitlines() if l.strip() and not l.startswith("#")]
        todo = [t for t in todo if t not in done]
        if not todo:
            return
        picked = None
        for f, text in todo:
            c = claims / f"{f}.{text}"
            if (workdir / f).exists() and not c.exists():
                try:
                    fd = os.open(c, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.close(fd)
                    picked = (f, text)
                    break
                except FileExistsError:
                    continue
        if picked is None:
            if all((claims / f"{f}.{t}").exists() for f, t in todo):
                return
            time.sleep(30)
            continue
        evaluate([workdir / picked[0]], tokens, log, [picked[1]], threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("--f16", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("types", nargs="+")
    e = sub.add_parser("eval")
    e.add_argument("--tokens", required=True)
    e.add_argument("--log", required=True)
    e.add_argument("--texts", default="wikitext2,shakespeare")
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("files", nargs="+")
    r = sub.add_parser("queue")
    r.add_argument("--queue", required=True)
    r.add_argument("--tokens", required=True)
    r.add_argument("--log", required=True)
    r.add_argument("--workdir", required=True)
    r.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    if a.cmd == "queue":
        run_queue(Path(a.queue), Path(a.tokens), Path(a.log), a.threads, Path(a.workdir))
    elif a.cmd == "quantize":
        quantize(Path(a.f16), Path(a.out), a.types)
    else:
        evaluate(a.files, Path(a.tokens), Path(a.log), a.texts.split(","), a.threads)


if __name__ == "__main__":
    main()
