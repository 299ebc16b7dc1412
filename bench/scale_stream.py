"""Streaming quantization from safetensors shards under a memory limit smaller than the model (issue 18 item 2).

Writes a random Llama-shaped model as safetensors shards (fp32), then runs ``quantize_streaming`` (GPTQ int4 g128
asym) in a child process under ``ulimit -v`` (address space) smaller than the shards' total, and checks that loading
the model whole fails under the same limit. Then a sweep of calibration tokens (peak RSS vs tokens, in memory and
with ``max_memory`` spilling to files). Every figure is measured in the child and written as JSON lines.

Run: PYTHONPATH=$PWD python bench/scale_stream.py --out bench/results    (box shared: see the load column)
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def write_model(d: Path, layers: int, shard_mb: int = 256) -> int:
    import torch
    import transformers
    from safetensors.torch import save_file

    d.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(num_hidden_layers=layers, **SHAPE)
    cfg.save_pretrained(d)
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    shards, cur, size, total = [], {}, 0, 0
    for name, p in meta.state_dict().items():
        t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g) * 0.02
        cur[name] = t
        size += t.numel() * 4
        total += t.numel() * 4
        if size >= shard_mb * 2 ** 20:
            shards.append(cur); cur, size = {}, 0
    if cur:
        shards.append(cur)
    wm = {}
    for i, sh in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(d / fname), metadata={"format": "pt"})
        wm.update({k: fname for k in sh})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": wm}))
    return total


def child_stream(a):
    import torch
    from lowbit.io.stream import NativeStreamWriter
    from lowbit.model.streaming import quantize_streaming
    from lowbit.model.plan import plan_streaming

    torch.set_num_threads(2)
    ids = torch.randint(0, SHAPE["vocab_size"], (a.samples, a.seq), generator=torch.Generator().manual_seed(1))
    kw = {} if a.max_memory is None else {"max_memory": a.max_memory}
    pred = plan_streaming(a.model, "gptq", n_samples=a.samples, seq_len=a.seq, micro_batch=4, **kw)
    t = time.perf_counter(); c0 = time.process_time(); l0 = os.getloadavg()[0]
    with NativeStreamWriter(a.dest) as sink:
        s = quantize_streaming(a.model, sink, method="gptq", bits=4, group_size=128, sym=False, calib_dataset=ids,
                               progress=False, micro_batch=4, **kw)
    out = {k: s[k] for k in ("peak_rss_bytes", "peak_vm_bytes", "peak_rss_reset", "max_block_bytes", "streamed_bytes", "n_layers",
                             "calib_tokens", "offload_peak_bytes")}
    out.update(wall_s=round(time.perf_counter() - t, 1), cpu_s=round(time.process_time() - c0, 1),
               load=round((l0 + os.getloadavg()[0]) / 2, 1), predicted_peak_mb=round(pred["peak_ram_mb"], 1),
               samples=a.samples, seq=a.seq, max_memory=a.max_memory, limit_kb=a.limit_kb)
    print("RESULT " + json.dumps(out), flush=True)


def child_whole(a):
    import torch
    import transformers
    try:
        transformers.AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        print("RESULT " + json.dumps({"whole_load": "ok", "limit_kb": a.limit_kb}), flush=True)
    except (MemoryError, RuntimeError, OSError) as e:
        print("RESULT " + json.dumps({"whole_load": f"failed: {type(e).__name__}: {str(e)[:120]}",
                                      "limit_kb": a.limit_kb}), flush=True)


def spawn(args, limit_kb):
    # a fixed mmap threshold: freed large blocks go back to the system at once (with the dynamic threshold the
    # heap kept growing across the model builds and an address-space limit was hit at construction)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="2",
               MALLOC_MMAP_THRESHOLD_="1048576")
    cmd = f"ulimit -v {limit_kb}; exec {sys.executable} {Path(__file__).resolve()} " + " ".join(args) + \
        f" --limit-kb {limit_kb}"
    p = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True)
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (p.stderr or p.stdout)[-600:], "limit_kb": limit_kb}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", default=None)
    ap.add_argument("--model"); ap.add_argument("--dest"); ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256); ap.add_argument("--max-memory", default=None)
    ap.add_argument("--limit-kb", type=int, default=0)
    ap.add_argument("--out", default="bench/results"); ap.add_argument("--work", default="/tmp/lowbit-stream-bench")
    ap.add_argument("--layers", type=int, default=40); ap.add_argument("--limit-gb", type=float, default=1.75)
    ap.add_argument("--parts", default="main,sweep")
    a = ap.parse_args()
    if a.child == "stream":
        return child_stream(a)
    if a.child == "whole":
        return child_whole(a)
    work, out = Path(a.work), Path(a.out)
    rows = []
    jl = out / "scale_stream.jsonl"
    if "main" in a.parts:
        src = work / f"llama-{a.layers}L"
        total = write_model(src, a.layers) if not (src / "model.safetensors.index.json").is_file() else \
            json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        limit = int(a.limit_gb * 2 ** 20)
        r = spawn(["--child", "whole", "--model", str(src)], limit)
        r.update(part="whole", model_bytes=total); rows.append(r); print(r, flush=True)
        r = spawn(["--child", "stream", "--model", str(src), "--dest", str(work / "out"), "--samples", "8",
                   "--seq", "256"], limit)
        r.update(part="main", model_bytes=total, layers=a.layers); rows.append(r); print(r, flush=True)
    if "sweep" in a.parts:
        src = work / "llama-2L"
        if not (src / "model.safetensors.index.json").is_file():
            write_model(src, 2)
        total = json.loads((src / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
        for mm in (None, "1GB"):
            for n in (4, 16, 64):
                args = ["--child", "stream", "--model", str(src), "--dest", str(work / "out2"), "--samples", str(n),
                        "--seq", "256"] + (["--max-memory", mm] if mm else [])
                r = spawn(args, 16 * 2 ** 20)
                r.update(part="sweep", model_bytes=total, layers=2); rows.append(r); print(r, flush=True)
    with open(jl, "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
