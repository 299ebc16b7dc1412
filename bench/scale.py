"""Calibration at scale: peak memory, host RSS and wall time of the block-by-block pipeline.

Parts (``--parts``, comma-separated):

* ``cpu``: SmolLM2-135M GPTQ int4 g128 asym at 128 x 512 on the CPU, the previous pipeline
  (``pipeline="threads"``, every sample through the block at once) against the micro-batched one
  (``max_memory``), each run in its own process (peak RSS = ``VmHWM`` reset after loading), the
  runs interleaved old/new; codes compared by hash.
* ``tokens``: peak RSS against the number of calibration samples (new pipeline), for the plot.
* ``gpu``: the Llama-3-8B shape (random bf16, model on the CPU, ``device="cuda"``) at 128 x 2048:
  GPTQ/AWQ int4 g128, micro-batch sizes and offload on/off; peak GPU memory, host RSS, wall time
  (run on the lent H200 through ``bench/scale_gpu.py``; its JSON is merged with ``--merge``).
* ``report``: write ``bench/scale.md`` and the plot from ``bench/results/scale.json``.

Reproduce (CPU): ``PYTHONPATH=$PWD python bench/scale.py --parts cpu,tokens,report``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
JSON = os.path.join(RESULTS, "scale.json")
WIKI = os.path.join(os.path.dirname(ROOT), "shared", "data", "wikitext-2")
if not os.path.isdir(WIKI):
    WIKI = "/work/shared/data/wikitext-2"


def reset_hwm() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def codes_digest(model) -> str:
    h = hashlib.sha256()
    for n, m in sorted(model.named_modules(), key=lambda x: x[0]):
        st = getattr(m, "qstate", None)
        if st is None:
            continue
        for t in (st.data, st.scales, st.zeros):
            if t is not None:
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def one_cpu_run(spec: dict) -> dict:
    """Runs in a child process: load SmolLM2, keep ``layers`` blocks, quantize, measure."""
    import torch

    sys.path.insert(0, HERE)
    from ptq import load_model  # noqa: E402

    from lowbit.data.calibration import get_calibration_data
    from lowbit.model.sequential import quantize_model_ptq

    torch.set_num_threads(spec.get("threads", 2))
    model, tok = load_model("cpu")
    if spec.get("layers"):
        model.model.layers = model.model.layers[: spec["layers"]]
        model.config.num_hidden_layers = spec["layers"]
    cache = "/tmp/lowbit-scale-calib.pt"
    if os.path.exists(cache):
        ids = torch.load(cache)
    else:
        ids = get_calibration_data(tok, os.path.join(WIKI, "valid.txt"), n_samples=128, seq_len=512, seed=0)
        torch.save(ids, cache)
    ids = ids[: spec["n_samples"], : spec["seq_len"]]
    import gc

    gc.collect()
    base = vm_hwm()
    reset_hwm()
    rss0 = vm_hwm()
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    kw = dict(spec.get("kwargs", {}))
    quantize_model_ptq(model, method=spec["method"], bits=4, group_size=128, sym=False, calib_dataset=ids,
                       progress=False, **kw)
    dt = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {**spec, "time_s": dt, "cpu_s": cpu, "peak_rss_mb": vm_hwm() / 2 ** 20, "rss_before_mb": rss0 / 2 ** 20,
            "load_peak_mb": base / 2 ** 20, "digest": codes_digest(model),
            "load_avg": os.getloadavg()[0], "summary": {k: v for k, v in model.ptq_summary.items()
                                                        if isinstance(v, (int, float, str, dict))}}


def run_child(spec: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS=str(spec.get("threads", 2)))
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        return {**spec, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_results() -> dict:
    if os.path.exists(JSON):
        with open(JSON) as f:
            return json.load(f)
    return {}


def save_results(res: dict) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    with open(JSON + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(JSON + ".tmp", JSON)


def part_cpu(args, res):
    rows = res.setdefault("cpu", [])
    old = {"method": "gptq", "n_samples": 128, "seq_len": 512, "layers": args.layers,
           "kwargs": {"pipeline": "threads"}, "label": "previous pipeline (all samples at once)"}
    new = {"method": "gptq", "n_samples": 128, "seq_len": 512, "layers": args.layers,
           "kwargs": {"max_memory": args.max_memory}, "label": f"micro-batched, max_memory={args.max_memory}"}
    newd = {"method": "gptq", "n_samples": 128, "seq_len": 512, "layers": args.layers,
            "kwargs": {}, "label": "micro-batched, default budget (device free memory)"}
    order = [old, new] * args.repeats + [newd]
    for spec in order:
        r = run_child(spec)
        print(json.dumps({k: r.get(k) for k in ("label", "time_s", "peak_rss_mb", "digest", "error")}), flush=True)
        rows.append(r)
        save_results(res)


def part_tokens(args, res):
    rows = res.setdefault("tokens", [])
    for n in (16, 32, 64, 128):
        for label, kw in (("micro-batched", {"max_memory": args.max_memory}), ("previous", {"pipeline": "threads"})):
            spec = {"method": "gptq", "n_samples": n, "seq_len": 512, "layers": 2, "kwargs": kw, "label": label}
            r = run_child(spec)
            print(json.dumps({k: r.get(k) for k in ("label", "n_samples", "time_s", "peak_rss_mb", "error")}),
                  flush=True)
            rows.append(r)
            save_results(res)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="cpu,tokens,report")
    ap.add_argument("--layers", type=int, default=6, help="cpu part: decoder blocks kept (of 30)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-memory", default="1.5GB")
    ap.add_argument("--child", default=None)
    ap.add_argument("--merge", nargs="*", default=None, help="JSON files from the GPU runs to merge")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(one_cpu_run(json.loads(args.child)), default=str))
        return
    res = load_results()
    if args.merge:
        for p in args.merge:
            with open(p) as f:
                part = json.load(f)
            for k, v in part.items():
                res[k] = v
        save_results(res)
    parts = args.parts.split(",")
    if "cpu" in parts:
        part_cpu(args, res)
    if "tokens" in parts:
        part_tokens(args, res)
    if "report" in parts:
        from scale_report import write_report

        write_report(res, RESULTS, os.path.join(HERE, "scale.md"))


if __name__ == "__main__":
    main()
