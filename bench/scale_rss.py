"""Peak host memory of a whole SmolLM2-135M GPTQ run on the 2-core CPU as a user runs it (issue 18, helper scale2):
one fresh child process per row, the model loaded by lowbit's own loader (``load_model("default")``: the GGUF file,
converted once and then read from lowbit's cache) or streamed from the GGUF file (``quantize_gguf_streaming``: the
model is never whole), GPTQ int4 g128 asym on the 128 x 512 calibration set of bench/scale.py, all 30 blocks.
Peak RSS is the child's ``VmHWM`` over its whole life (imports, loading and quantizing), so it is what ``time -v``
would report. CPU seconds are the child's; the box was shared (load average in the row).

Run: PYTHONPATH=$PWD python bench/scale_rss.py --runs load-cache,load-nocache,whole-1.5GB,stream-1.5GB \\
        | tee -a bench/results/scale_rss.jsonl
(the calibration tokens: /tmp/lowbit-scale-calib.pt, written by bench/scale.py)"""
import argparse, hashlib, json, os, resource, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {
    "load-cache": dict(kind="load", cache=True),        # loading only: the converted model from lowbit's cache
    "load-nocache": dict(kind="load", cache=False),     # loading only: GGUF -> float conversion (first use)
    "whole-auto": dict(kind="whole"),                   # quantize_model_ptq, pipeline="auto"
    "whole-threads": dict(kind="whole", pipeline="threads"),
    "whole-1.5GB": dict(kind="whole", max_memory="1.5GB"),
    "stream-default": dict(kind="stream"),
    "stream-1.5GB": dict(kind="stream", max_memory="1.5GB"),
    "stream-rtn": dict(kind="stream", method="rtn"),
    "whole-rtn": dict(kind="whole", method="rtn"),
    "whole-awq": dict(kind="whole", method="awq"),     # pipeline="auto" (staged since scale3)
    "whole-hqq": dict(kind="whole", method="hqq", group_size=64),
}


def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def digest_model(m):
    h = hashlib.sha256()
    for n, mod in sorted(m.named_modules(), key=lambda x: x[0]):
        st = getattr(mod, "qstate", None)
        if st is not None:
            h.update(n.encode())
            for t in (st.data, st.scales, st.zeros):
                if t is not None:
                    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def child(a):
    import torch
    torch.set_num_threads(2)
    spec = dict(RUNS[a.run])
    kind = spec.pop("kind")
    method = spec.pop("method", "gptq")
    ids = torch.load("/tmp/lowbit-scale-calib.pt")[:a.samples]
    calib = dict(calib_dataset=ids) if method in ("gptq", "awq") else {}
    gs = spec.pop("group_size", 128)
    out = {"run": a.run, "samples": a.samples, "seq": int(ids.shape[1]), "method": method}
    l0 = os.getloadavg()[0]
    t = time.perf_counter()
    from lowbit.model.loading import default_model_path, load_model
    if kind == "load":
        model, _ = load_model("default", cache=spec["cache"])
        out["load_peak_mb"] = round(hwm() / 2 ** 20)
    elif kind == "whole":
        from lowbit.model.sequential import quantize_model_ptq
        model, _ = load_model("default")
        out["load_peak_mb"] = round(hwm() / 2 ** 20)
        quantize_model_ptq(model, method=method, bits=4, group_size=gs, sym=False, progress=False, **calib, **spec)
        out["codes"] = digest_model(model) if method in ("gptq", "awq") else None
        out["pipeline_summary"] = {k: model.ptq_summary.get(k) for k in ("micro_batch", "tail_replays",
                                                                         "offload_peak_bytes")}
    else:
        import lowbit
        from lowbit.io.gguf_stream import quantize_gguf_streaming
        from lowbit.io.stream import NativeStreamWriter
        d, name = default_model_path()
        before = hwm()
        with tempfile.TemporaryDirectory() as tmp:
            with NativeStreamWriter(Path(tmp) / "out") as sink:
                s = quantize_gguf_streaming(Path(d) / name, sink, method=method, bits=4, group_size=128, sym=False,
                                            progress=False, **calib, **spec)
            after = hwm()
            out["codes"] = digest_model(lowbit.load(Path(tmp) / "out")) if method == "gptq" else None
        out["before_mb"] = round(before / 2 ** 20)
        out["stream_summary"] = {"peak_rss_mb": round(s["peak_rss_bytes"] / 2 ** 20),
                                 "max_block_mb": round(s["max_block_bytes"] / 2 ** 20, 1),
                                 "streamed_mb": round(s["streamed_bytes"] / 2 ** 20, 1),
                                 "tail_replays": s.get("tail_replays")}
        out["peak_before_digest_mb"] = round(max(before, after) / 2 ** 20)
    r = resource.getrusage(resource.RUSAGE_SELF)
    out.update(wall_s=round(time.perf_counter() - t, 1), cpu_s=round(r.ru_utime + r.ru_stime, 1),
               load=round((l0 + os.getloadavg()[0]) / 2, 1), peak_rss_mb=round(hwm() / 2 ** 20),
               commit=a.commit)
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="load-cache,whole-1.5GB,stream-1.5GB")
    ap.add_argument("--run")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--commit", default="")
    a = ap.parse_args()
    if a.run:
        return child(a)
    for r in a.runs.split(","):
        env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1")
        p = subprocess.run([sys.executable, __file__, "--run", r, "--samples", str(a.samples), "--commit", a.commit],
                           env=env, capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        print(lines[-1] if lines else json.dumps({"run": r, "failed": p.stderr.strip().splitlines()[-1:]}),
              flush=True)


if __name__ == "__main__":
    main()
