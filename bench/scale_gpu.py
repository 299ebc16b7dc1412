"""GPU part of ``bench/scale.py`` and of ``bench/results/multi_gpu.md``: run on the lent H200 machine.

Llama-3-8B-shaped decoder (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256, random bf16
weights, std 0.02) and a 70B-class slice (hidden 8192, MLP 28672, 64 heads, 8 KV heads), model on
the CPU, ``device="cuda"``, 128 x 2048 random calibration tokens. Each run is its own process (one
GPU) or a ``torchrun`` of 2 processes (NCCL, one GPU each); it reports wall time, peak GPU memory
(``max_memory_allocated``, per rank), peak host RSS (``VmHWM``), the seconds spent in collectives and
a digest of the codes per layer. The driver time-boxes the runs and writes ``$OUT/gpu.json`` after
each one, so a timeout still returns what finished.

    PYTHONPATH=$PWD python bench/scale_gpu.py --out $OUT --budget 420
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
SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
SHAPES = {"8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
          "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}


def build(shape: str, layers: int, vocab: int = 128256):
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=2048,
                                   rope_theta=500000.0, tie_word_embeddings=True, **SHAPES[shape])
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(p.dtype))
    model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model.eval(), cfg


def vm_hwm() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> None:
    import torch

    from lowbit.model import distributed as D
    from lowbit.model.plan import plan
    from lowbit.model.sequential import quantize_model_ptq

    cuda = os.environ.get("SCALE_DEVICE", "cuda") == "cuda"
    D.init_from_env(torch.device("cuda" if cuda else "cpu"))
    rank, world = D.rank_world()
    dev = D.local_device(torch.device("cuda" if cuda else "cpu"))
    if not cuda:  # local smoke test of this script
        torch.cuda.set_device = lambda d: None
        torch.cuda.reset_peak_memory_stats = lambda d=None: None
        torch.cuda.synchronize = lambda d=None: None
        torch.cuda.max_memory_allocated = lambda d=None: 0
    torch.cuda.set_device(dev if dev.index is not None or not cuda else torch.device("cuda", 0))
    model, cfg = build(spec["shape"], spec["layers"])
    ids = torch.randint(0, cfg.vocab_size, (spec.get("n_samples", 128), spec.get("seq_len", 2048 if cuda else 64)),
                        generator=torch.Generator().manual_seed(1))
    pred = plan(model, spec["method"], bits=4, group_size=128, n_samples=ids.shape[0], seq_len=ids.shape[1],
                device="cuda", **({"max_memory": spec["kwargs"]["max_memory"]} if "max_memory" in spec.get("kwargs", {})
                                  and "max_memory" in plan.__code__.co_varnames else {}))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.synchronize()
    D.barrier()
    t0 = time.perf_counter()
    quantize_model_ptq(model, method=spec["method"], bits=4, group_size=128, sym=False, calib_dataset=ids,
                       device=dev, progress=False, **spec.get("kwargs", {}))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    digests = []
    for i, blk in enumerate(model.model.layers):
        h = hashlib.sha256()
        for n, m in sorted(blk.named_modules(), key=lambda x: x[0]):
            st = getattr(m, "_lowbit_ptq_state", None)
            if st is not None:
                for t in (st.data, st.scales, st.zeros):
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests.append(h.hexdigest()[:16])
    res = {"rank": rank, "world": world, "wall_s": wall, "peak_gpu_mb": torch.cuda.max_memory_allocated(dev) / 2 ** 20,
           "peak_rss_mb": vm_hwm() / 2 ** 20, "comm_s": dict(D.COMM_SECONDS), "digests": digests,
           "summary": {k: v for k, v in model.ptq_summary.items() if isinstance(v, (int, float, str, dict))},
           "plan": {k: v for k, v in pred.items() if isinstance(v, (int, float, str))}}
    with open(os.path.join(spec["tmp"], f"{spec['name']}_r{rank}.json"), "w") as f:
        json.dump(res, f, default=str)


def launch(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, **SAFE)
    nproc = spec.get("nproc", 1)
    if nproc == 1:
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        env["CUDA_VISIBLE_DEVICES"] = "0"
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               "29533", __file__, "--worker", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        err = p.stderr[-3000:] if p.returncode else None
    except subprocess.TimeoutExpired:
        err = f"timed out after {timeout:.0f} s"
    ranks = []
    for r in range(nproc):
        path = os.path.join(spec["tmp"], f"{spec['name']}_r{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                ranks.append(json.load(f))
    return {"spec": {k: v for k, v in spec.items() if k != "tmp"}, "process_s": time.perf_counter() - t0,
            "ranks": ranks, "error": err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default="/tmp/scale_gpu")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all runs together")
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    os.makedirs(args.out, exist_ok=True)
    tmp = "/tmp/scale_gpu_parts"
    os.makedirs(tmp, exist_ok=True)
    t_start = time.perf_counter()
    runs = [
        # name, shape, layers, method, nproc, kwargs, minimum seconds left to start it
        ("gptq_8b_1gpu", "8b", int(os.environ.get("SCALE_LAYERS", 4)), "gptq", 1, {"max_memory": "16GB"}, 30),
        ("gptq_8b_2gpu", "8b", int(os.environ.get("SCALE_LAYERS", 4)), "gptq", 2, {"max_memory": "16GB"}, 30),
        ("awq_8b_1gpu", "8b", int(os.environ.get("SCALE_LAYERS", 4)), "awq", 1, {"max_memory": "14GB"}, 25),
        ("awq_8b_2gpu", "8b", 4, "awq", 2, {"max_memory": "14GB"}, 35),
        ("gptq_70b_2gpu", "70b", 2, "gptq", 2, {"max_memory": "40GB"}, 70),
        ("gptq_8b_1gpu_nooffload_mb16", "8b", 2, "gptq", 1, {"micro_batch": 16}, 30),
        ("gptq_8b_1gpu_offload_mb2", "8b", 2, "gptq", 1, {"max_memory": "12GB", "micro_batch": 2}, 30),
    ]
    results = {"gpu": {}, "device": None}
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}"
        results["torch"] = torch.__version__
    except Exception as e:  # pragma: no cover
        results["device"] = repr(e)
    if os.environ.get("SCALE_DEVICE") == "cpu":
        runs = [(n + "_smoke", "tiny", 2, m, p, kw, 0) for n, _, _, m, p, kw, _ in runs[:4]]
    for name, shape, layers, method, nproc, kw, need in runs:
        left = args.budget - (time.perf_counter() - t_start)
        if left < need:
            results["gpu"][name] = {"skipped": f"{left:.0f} s left of the budget"}
            continue
        spec = {"name": name, "shape": shape, "layers": layers, "method": method, "nproc": nproc, "kwargs": kw,
                "tmp": tmp}
        r = launch(spec, left)
        results["gpu"][name] = r
        print(json.dumps({"name": name, "process_s": r["process_s"], "error": r["error"],
                          "ranks": [{k: x[k] for k in ("wall_s", "peak_gpu_mb", "peak_rss_mb", "comm_s")}
                                    for x in r["ranks"]]}), flush=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
