"""``lowbit plan`` against measured runs on SmolLM2 (CPU): peak memory and time, every PTQ method.

One child process per method (run one after another): the model is loaded (GGUF, its first ``--blocks`` decoder
blocks kept), ``plan`` predicts, the method runs; the child reports the prediction, the process peak RSS of the
loading (``VmHWM`` after loading) and of the quantization (``VmHWM`` reset by ``clear_refs`` after loading), wall and
CPU seconds, and the load average (the box is shared: compare CPU seconds / cores, see bench/scale.md).

Run: PYTHONPATH=$PWD python bench/scale_plan.py --blocks 4 | tee -a bench/results/scale_plan.jsonl
(rtn and bnb-nf4 run on all 30 blocks; gptq, awq and hqq on the first 4, their time scaled by 30/4 in the report)
Since scale3 hqq runs on all 30 blocks (its whole run takes seconds) and ``gptq``/``awq`` are ``pipeline="auto"``,
the staged pipeline; the whole-model (30-block) gptq/awq runs are bench/scale_rss.py's ``whole-auto``/``whole-awq``:
PYTHONPATH=$PWD python bench/scale_plan.py --runs rtn,hqq,bnb-nf4 | tee -a bench/results/scale_plan_scale3.jsonl
"""
import argparse, json, os, resource, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "rtn": dict(method="rtn"), "hqq": dict(method="hqq", group_size=64), "bnb-nf4": dict(method="bnb-nf4"),
    "gptq": dict(method="gptq"), "awq": dict(method="awq"),
    "gptq-staged-1.5GB": dict(method="gptq", max_memory="1.5GB"),
}


def child(a):
    import torch
    sys.path.insert(0, str(ROOT / "bench"))
    from ptq import load_model
    from lowbit.model.plan import measure_peak_rss, plan
    from lowbit.model.streaming import reset_peak_rss

    torch.set_num_threads(2)
    model, _ = load_model("cpu")
    load_peak = measure_peak_rss()
    spec = dict(RUNS[a.run])
    method = spec.pop("method")
    gs = spec.pop("group_size", 128)
    ids = torch.load("/tmp/lowbit-scale-calib.pt")[:a.samples]
    n_all = len(model.model.layers)
    # the prediction for the whole model, as a user gets it before quantizing
    pred = plan(model, method, bits=4, group_size=gs, n_samples=a.samples, seq_len=ids.shape[1], **spec)
    blocks = a.blocks if method in ("gptq", "awq") else n_all
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    reset_peak_rss()
    l0 = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    if method in ("rtn", "hqq", "gptq", "awq"):
        from lowbit.model.sequential import quantize_model_ptq
        kw = dict(calib_dataset=ids) if method in ("gptq", "awq") else {}
        quantize_model_ptq(model, method=method, bits=4, group_size=gs, sym=False, progress=False, **kw, **spec)
    else:
        from lowbit.model.methods import run_method
        run_method(model, method)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out = {"run": a.run, "blocks": blocks, "of_blocks": n_all, "samples": a.samples, "wall_s": round(wall, 1),
           "cpu_s": round(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, 1),
           "load": round((l0 + os.getloadavg()[0]) / 2, 1), "load_peak_mb": round(load_peak / 2 ** 20),
           "run_peak_mb": round(measure_peak_rss() / 2 ** 20),
           "pred_peak_mb": round(pred["peak_ram_mb"]), "pred_s": round(pred["seconds"], 1),
           "pred_cpu_s": round(pred.get("cpu_seconds", float("nan")), 1),
           "gflops": round(pred["gflops"], 1)}
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--run", default=None)
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--samples", type=int, default=128)
    a = ap.parse_args()
    if a.child:
        return child(a)
    for r in a.runs.split(","):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        p = subprocess.run([sys.executable, __file__, "--child", "--run", r, "--blocks", str(a.blocks), "--samples",
                            str(a.samples)], env=env, capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        print(line[0][7:] if line else json.dumps({"run": r, "error": p.stderr[-400:]}), flush=True)


if __name__ == "__main__":
    main()
