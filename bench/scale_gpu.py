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
          "smoke": dict(hidden_size=1024, intermediate_size=4608, num_attention_heads=8, num_key_value_heads=2),
          "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8)}


def build(shape: str, layers: int, vocab: int = 128256):
    import torch
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=2048,
                                   rope_theta=500000.0, tie_word_embeddings=True, **SHAPES[shape])
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocated in bf16 at once (run 8 on: no fp32 copy of the model)
    try:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model = model.to_empty(device="cpu")
    # random weights drawn on the GPU when there is one (seconds instead of a minute of CPU randn for the
    # 8B/70B shapes); the same seed and device type give the same weights in every process
    gdev = "cuda" if torch.cuda.is_available() and os.environ.get("SCALE_DEVICE", "cuda") == "cuda" else "cpu"
    g = torch.Generator(device=gdev).manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32, device=gdev).mul_(0.02).to(p.dtype))
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
    # run 10: "<name>_untimed" runs have no per-call timers (each of which synchronised the whole device twice,
    # the background block copies on their side stream included): the wall time as a user gets it
    untimed = "_untimed" in spec["name"]
    timers = {"_nested": {}} if untimed else _install_timers()
    t_build = time.perf_counter()
    model, cfg = build(spec["shape"], spec["layers"])
    t_build = time.perf_counter() - t_build
    ids = torch.randint(0, cfg.vocab_size, (spec.get("n_samples", 128), spec.get("seq_len", 2048 if cuda else 64)),
                        generator=torch.Generator().manual_seed(1))
    smoke = spec["shape"] == "smoke"
    pred = {} if smoke else plan(model, spec["method"], bits=4, group_size=128, n_samples=ids.shape[0], seq_len=ids.shape[1],
                device="cuda" if cuda else "cpu", n_gpus=world, **({"max_memory": spec["kwargs"]["max_memory"]} if "max_memory" in spec.get("kwargs", {})
                                  and "max_memory" in plan.__code__.co_varnames else {}))
    from lowbit.model import plan_gpu

    t_rates = time.perf_counter()
    rates = plan_gpu.measure_rates(dev) if cuda and not smoke else None
    t_rates = time.perf_counter() - t_rates
    pred_gpu = plan_gpu.gpu_seconds(model, spec["method"], ids.shape[0], ids.shape[1], world=world, rates=rates)
    from lowbit.model.plan import staged_device_bytes
    from lowbit.model.offload import parse_bytes

    try:
        pred_mem = staged_device_bytes(model, ids.shape[0], ids.shape[1], spec.get("kwargs", {}).get("micro_batch", 8),
                                       parse_bytes(spec.get("kwargs", {}).get("max_memory")), world=world,
                                       method=spec["method"])
    except TypeError:
        pred_mem = None
    blocks_log = _install_block_log(timers, stream_sync=untimed)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    torch.cuda.reset_peak_memory_stats(dev)
    torch.cuda.synchronize()
    nested = timers.pop("_nested")
    for d in (timers, nested):  # only what quantize_model_ptq spends
        for k in d:
            d[k] = 0.0
    D.barrier()
    t0 = time.perf_counter()
    blocks_log["t0"] = t0
    quantize_model_ptq(model, method=spec["method"], bits=4, group_size=128, sym=False, calib_dataset=ids,
                       device=dev, progress=False, **spec.get("kwargs", {}))
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    blocks_log["marks"].append(("end", wall, torch.cuda.max_memory_allocated(dev), torch.cuda.memory_allocated(dev)))
    peak_all = max([m[2] for m in blocks_log["marks"]] + [torch.cuda.max_memory_allocated(dev)])
    digests = []
    for i, blk in enumerate(model.model.layers):
        h = hashlib.sha256()
        for n, m in sorted(blk.named_modules(), key=lambda x: x[0]):
            st = getattr(m, "qstate", None)
            if st is not None:
                for t in (st.data, st.scales, st.zeros):
                    h.update(t.detach().cpu().contiguous().numpy().tobytes())
        digests.append(h.hexdigest()[:16])
    res = {"rank": rank, "world": world, "wall_s": wall, "build_s": t_build, "timers": dict(timers),
           "timers_nested": dict(nested), "block_prefetch": model.ptq_summary.get("block_prefetch"),
           "env": {k: os.environ.get(k) for k in ("LOWBIT_GPTQ_FACTOR", "LOWBIT_DP_BATCH", "LOWBIT_PREFETCH",
                                                  "LOWBIT_OUTSIDE_HOME", "LOWBIT_HOME_ASYNC", "LOWBIT_DP_FACTOR",
                                                  "LOWBIT_GPTQ_FITS", "LOWBIT_GPTQ_SWEEP_INTO", "LOWBIT_GPTQ_SWEEP_CFG",
                                                  "LOWBIT_DP_EXCHANGE", "LOWBIT_PREFETCH_RECORD", "SCALE_SYNC",
                                                  "LOWBIT_GPTQ_OVERLAP", "LOWBIT_DP_REDUCE", "LOWBIT_DP_SYNC",
                                                  "LOWBIT_DP_AGREE", "LOWBIT_DP_CHUNKS",
                                                  "LOWBIT_DP_AFFINITY", "LOWBIT_GPTQ_DAMP", "LOWBIT_DP_CONNECT",
                                                  "LOWBIT_GPTQ_LAZY", "LOWBIT_GPTQ_FIT_LOSS",
                                                  "LOWBIT_PREFETCH_STAGED", "LOWBIT_STAGE_AHEAD",
                                                  "LOWBIT_PREFETCH_FIRST", "LOWBIT_DP_AWQ", "LOWBIT_GPTQ_GRAPH",
                                                  "LOWBIT_GPTQ_ORDER", "LOWBIT_GPTQ_CHOL")},
           "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
           "dp_split": os.environ.get("LOWBIT_DP_SPLIT", "rows"), "peak_gpu_mb": peak_all / 2 ** 20,
           "block_marks": blocks_log["marks"], "events": blocks_log["events"][:4000], "plan_mem": pred_mem,
           "gpu_index": os.environ.get("CUDA_VISIBLE_DEVICES"),
           "peak_rss_mb": vm_hwm() / 2 ** 20, "comm_s": dict(D.COMM_SECONDS), "digests": digests,
           "summary": {k: v for k, v in model.ptq_summary.items() if isinstance(v, (int, float, str, dict))},
           "plan": {k: v for k, v in pred.items() if isinstance(v, (int, float, str))},
           "plan_gpu": pred_gpu, "rates": rates, "rates_s": t_rates,
           "sweep": os.environ.get("LOWBIT_GPTQ_SWEEP", "auto"),
           "hessian_gemm": os.environ.get("LOWBIT_HESSIAN_GEMM", "auto")}
    with open(os.path.join(spec["tmp"], f"{spec['name']}_r{rank}.json"), "w") as f:
        json.dump(res, f, default=str)


def _install_block_log(timers: dict, stream_sync: bool = False) -> dict:
    """Per-block marks ``(label, seconds since the start, peak GPU bytes since the previous mark, GPU bytes in use)``
    (the peak counter is reset at each mark, so the run's peak is the largest of them) and a timeline of the
    outside-the-runner calls ``(name, start, end)``, seconds since the start (run 8 on)."""
    import torch

    from lowbit.model import _ptq_staged

    _LOG.clear()
    _LOG.update({"t0": None, "marks": [], "events": []})
    log = _LOG
    cuda = torch.cuda.is_available()

    def mark(label):
        if log["t0"] is None:
            return
        if cuda:
            if stream_sync:  # this thread's stream only (the background block copies go on)
                torch.cuda.current_stream().synchronize()
            else:
                torch.cuda.synchronize()
            log["marks"].append((label, time.perf_counter() - log["t0"], torch.cuda.max_memory_allocated(),
                                 torch.cuda.memory_allocated()))
            torch.cuda.reset_peak_memory_stats()
        else:
            log["marks"].append((label, time.perf_counter() - log["t0"], 0, 0))

    orig_stages = _ptq_staged._block_stages

    def block_stages(block, sel, prefix):  # called once per block, after the block is on the device
        mark("block " + prefix)
        return orig_stages(block, sel, prefix)

    _ptq_staged._block_stages = block_stages
    orig_capture = _ptq_staged._capture_block0
    first = [True]

    def capture(*a, **k):
        if first[0]:
            first[0] = False
            mark("capture")
        return orig_capture(*a, **k)

    _ptq_staged._capture_block0 = capture
    return _LOG


_LOG: dict = {}
EVENT_KEYS = {"activation_store", "block_to", "capture_block0", "install_stages", "non_block_moves", "make_store",
              "states_follow", "drop_replaced", "fingerprint", "calibration_tokens", "replace_first", "store_close",
              "in_worker", "prefetch_wait", "block_runner", "run_calibrated"}


def _install_timers() -> dict:
    """Seconds (device-synchronised) spent in the GPTQ factorisation and solves, AWQ searches and the
    statistics accumulation of this process (wrappers around the functions the pipeline calls)."""
    import torch

    from lowbit.algorithms import stats
    from lowbit.model import _ptq_solve as sequential  # where _gptq_stage / _awq_stage look these names up

    timers = {"gptq_factor": 0.0, "gptq_solve": 0.0, "awq_search": 0.0, "stats_add": 0.0}
    # SCALE_SYNC=stream (after run 10): the timers wait for the calling thread's stream only; the default (runs 5-10)
    # synchronises the whole device, which also waits for the background block copies (run 10: one 73-94 ms wait
    # per block, counted in the activation store's first call of the block)
    if os.environ.get("SCALE_SYNC", "device") == "stream":
        def sync():
            torch.cuda.current_stream().synchronize()
    else:
        def sync():
            torch.cuda.synchronize()

    import threading

    nested = timers.setdefault("_nested", {})

    def wrap(owner, attr, key, into=timers):
        fn = getattr(owner, attr)
        into.setdefault(key, 0.0)

        def wrapped(*a, **k):
            if threading.current_thread().name == "lowbit-prefetch":  # the background block copies: not timed
                return fn(*a, **k)
            if torch.cuda.is_available():
                sync()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            if torch.cuda.is_available():
                sync()
            t1 = time.perf_counter()
            into[key] += t1 - t0
            log = _LOG
            if log and log["t0"] is not None and key in EVENT_KEYS and len(log["events"]) < 20000:
                log["events"].append((key if key != "activation_store" else
                                      f"store_{threading.current_thread().name[:12]}", t0 - log["t0"], t1 - log["t0"]))
            return out

        setattr(owner, attr, wrapped)

    wrap(sequential, "gptq_factor", "gptq_factor")
    wrap(sequential, "gptq_quantize", "gptq_solve")
    wrap(sequential, "awq_search", "awq_search")
    for attr in ("add", "add_samples"):
        if hasattr(stats.InputStats, attr):
            wrap(stats.InputStats, attr, "stats_add")
    # the rest of the pipeline, where it can be wrapped (the block forwards are what these leave)
    from lowbit.model import _ptq_staged, offload

    for key in ("install_stages", "capture_block0", "activation_store", "block_to"):
        timers[key] = 0.0
    wrap(_ptq_staged, "_install_stages", "install_stages")
    wrap(_ptq_staged, "_capture_block0", "capture_block0")
    wrap(offload.ActivationStore, "put", "activation_store")
    wrap(offload.ActivationStore, "get", "activation_store")
    if hasattr(_ptq_staged, "_Prefetch"):  # waiting for the next block's background copy (run 7 on)
        wrap(_ptq_staged._Prefetch, "wait", "prefetch_wait")
    # nested timers (they contain the ones above; kept apart so that the sum of `timers` stays the timed part):
    # the block runner (forward passes + everything per stage), the GPTQ stage (factor, solve, broadcasts,
    # installs of the weights), the per-pass rank agreement (waiting for the slower rank)
    from lowbit.model import distributed as dist_mod, sequential as seq_mod

    wrap(_ptq_staged._BlockRunner, "run", "block_runner", nested)
    wrap(seq_mod, "_gptq_stage", "gptq_stage", nested)
    wrap(dist_mod, "min_over_ranks", "min_over_ranks", nested)
    # the rest of the wall time (run 8 on): the pipeline as a whole, the non-block weights' moves and put-back
    wrap(seq_mod, "_run_calibrated", "run_calibrated", nested)
    wrap(_ptq_staged, "_to_device_except", "non_block_moves", nested)
    if hasattr(_ptq_staged, "_restore_kept"):
        wrap(_ptq_staged, "_restore_kept", "non_block_moves", nested)
    # run 8: the rest of the outside-the-runner calls, one by one (and in the timeline)
    for name in ("_make_store", "_states_follow", "_drop_replaced", "_fingerprint", "_calibration_tokens"):
        for mod in (_ptq_staged, seq_mod):
            if hasattr(mod, name):
                wrap(mod, name, name.strip("_"), nested)
    wrap(offload.ActivationStore, "replace_first", "replace_first", nested)
    wrap(offload.ActivationStore, "close", "store_close", nested)
    if hasattr(_ptq_staged, "_Prefetch"):
        wrap(_ptq_staged, "_in_worker", "in_worker", nested)
    _orig_to = torch.nn.Module.to
    depth = [0]

    def module_to(self, *a, **k):  # the blocks moved to the device and back (outermost calls only)
        if depth[0] or not hasattr(self, "self_attn") or threading.current_thread().name == "lowbit-prefetch":
            return _orig_to(self, *a, **k)
        depth[0] += 1
        try:
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            t0 = time.perf_counter()
            out = _orig_to(self, *a, **k)
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            timers["block_to"] += time.perf_counter() - t0
            return out
        finally:
            depth[0] -= 1

    torch.nn.Module.to = module_to
    return timers


def rowsplit_check(out_path: str) -> None:
    """GPTQ of 8B-shaped linears on this GPU, whole and in the row pieces a 2-rank run solves: equal codes?"""
    import torch

    from lowbit.algorithms.gptq import gptq_factor, gptq_quantize

    res = {}
    g = torch.Generator(device="cuda").manual_seed(3)
    for name, (R, K, cut) in {"down_proj": (4096, 14336, 2048), "q_proj": (4096, 4096, 3072)}.items():
        X = torch.randn(4096, K, device="cuda", generator=g)
        X[:, : K // 2] *= 3.0  # unequal channel scales: a realistic act_order permutation
        H = X.T @ X / X.shape[0]
        w = torch.randn(R, K, device="cuda", generator=g) * 0.02
        f = gptq_factor(H)
        t0 = time.perf_counter()
        a = gptq_quantize(w, H, 4, 128, False, factor=f)
        torch.cuda.synchronize()
        t_whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        p = [gptq_quantize(w[lo:hi], H, 4, 128, False, factor=f) for lo, hi in ((0, cut), (cut, R))]
        torch.cuda.synchronize()
        t_pieces = time.perf_counter() - t0
        same = all(torch.equal(torch.cat([x.__dict__[k] for x in p]), a.__dict__[k]) for k in ("codes", "scales", "zeros"))
        res[name] = {"shape": [R, K], "cut": cut, "identical": same, "whole_s": t_whole, "pieces_s": t_pieces}
        print("rowsplit", name, res[name], flush=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


def launch(spec: dict, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT, **SAFE)
    nproc = spec.get("nproc", 1)
    env.update(spec.get("env", {}))
    if nproc == 1:
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
        env["CUDA_VISIBLE_DEVICES"] = str(spec.get("gpu", 0))
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


def xfer_check(out_path: str) -> None:
    """Host <-> GPU copies on this machine (run 8): what the pipeline's moves outside the block runner cost.
    Pageable and pinned, first-time pinned allocations (fresh host memory) and cached ones."""
    import torch

    res = {}
    dev = torch.device("cuda", 0)
    GB = 2 ** 30

    def t(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    res["pageable_alloc_fill_1GB_s"], host = t(lambda: torch.empty(GB // 2, dtype=torch.bfloat16).fill_(1.0))
    res["pageable_h2d_1GB_s"], d = t(lambda: host.to(dev))
    res["pageable_h2d_1GB_again_s"], d = t(lambda: host.to(dev))
    res["pageable_d2h_1GB_fresh_s"], back = t(lambda: d.to("cpu"))
    res["pageable_d2h_1GB_into_s"], _ = t(lambda: back.copy_(d))
    res["pinned_alloc_1GB_first_s"], pin = t(lambda: torch.empty(GB // 2, dtype=torch.bfloat16, pin_memory=True))
    res["pinned_d2h_1GB_s"], _ = t(lambda: pin.copy_(d))
    res["pinned_h2d_1GB_s"], _ = t(lambda: pin.to(dev))
    del pin
    res["pinned_alloc_1GB_cached_s"], pin = t(lambda: torch.empty(GB // 2, dtype=torch.bfloat16, pin_memory=True))
    del pin
    res["pinned_alloc_8x128MB_first_s"], pins = t(lambda: [torch.empty(64 * 2 ** 20, dtype=torch.bfloat16,
                                                                        pin_memory=True) for _ in range(8)])
    res["pinned_d2h_8x128MB_s"], _ = t(lambda: [p.copy_(d[: p.numel()]) for p in pins])
    del pins, d, host, back
    res["device"] = torch.cuda.get_device_name(0)
    print("xfer", json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


#: run 8's plan (bench/gpu_call_dp3.sh): steps one after the other; a step's chains run at the same time (one GPU
#: each for single-GPU runs), a chain's runs one after the other. (name, shape, layers, method, nproc, kwargs, gpu,
#: seconds it needs at least)
def run8_steps(L8: int, L70_1: int, L70_2: int, Lawq: int):
    return [
        [[("gptq_8b_1gpu", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 40)],
         [("gptq_70b_1gpu", "70b", L70_1, "gptq", 1, {"max_memory": "40GB"}, 1, 40),
          ("awq_8b_1gpu", "8b", Lawq, "awq", 1, {"max_memory": "14GB"}, 1, 25)]],
        [[("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 40)]],
        [[("gptq_70b_2gpu", "70b", L70_2, "gptq", 2, {"max_memory": "40GB"}, None, 60)]],
        [[("awq_8b_2gpu", "8b", Lawq, "awq", 2, {"max_memory": "14GB"}, None, 25)]],
    ]


def run9_steps(L8: int, L70_1: int, Lawq: int):
    """Run 9 (second call): the GPU reserve from the modelled working set and the in-place rank-ordered sums."""
    return [
        [[("gptq_8b_1gpu", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 40)],
         [("gptq_70b_1gpu", "70b", L70_1, "gptq", 1, {"max_memory": "40GB"}, 1, 40),
          ("awq_8b_1gpu", "8b", Lawq, "awq", 1, {"max_memory": "14GB"}, 1, 25)]],
        [[("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 35)]],
        [[("awq_8b_2gpu", "8b", Lawq, "awq", 2, {"max_memory": "14GB"}, None, 25)]],
    ]


def run10_steps(L8: int, Lawq: int):
    """Run 10: one run at a time (no single-GPU runs side by side): the 8B GPTQ pair with the per-call timers (as
    runs 8-9), the same pair without them (``_untimed``: the wall time as a user gets it), then AWQ 1 and 2 GPUs."""
    return [
        [[("gptq_8b_1gpu", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 60)]],
        [[("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 45)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 60)]],
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 45)]],
        [[("awq_8b_1gpu", "8b", Lawq, "awq", 1, {"max_memory": "14GB"}, 0, 25)]],
        [[("awq_8b_2gpu", "8b", Lawq, "awq", 2, {"max_memory": "14GB"}, None, 25)]],
    ]


def run11_steps(L8: int):
    """Run 11 (issue 20, after run 10): the wall time is the run without the per-call timers (``_untimed``), 1 GPU
    then 2 GPUs; the timed 2-GPU run (its timers waiting for the calling thread's stream only, ``SCALE_SYNC=stream``)
    for the parts, then, if the budget allows, the 1-GPU run without the fits beside the factorisation (what that
    overlap buys on one GPU). A 9th entry: the run's environment."""
    return [
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 60)]],
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 45)]],
        [[("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 70, {"SCALE_SYNC": "stream"})]],
        [[("gptq_8b_1gpu_untimed_nooverlap", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 60,
           {"LOWBIT_GPTQ_OVERLAP": "0"})]],
    ]


def run12_steps(L8: int):
    """A next call (not run yet): the untimed 2-GPU run with ``LOWBIT_DP_SYNC=0`` (no host waits around the
    collectives) against the default, and the untimed 1-GPU run; then the timed 2-GPU run for the parts."""
    return [
        [[("gptq_8b_2gpu_untimed_nosync", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_DP_SYNC": "0"})]],
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 70, {"SCALE_SYNC": "stream"})]],
    ]


def run13_steps(L8: int):
    """Session 9 (one long-lived calibration thread, the Hessian sums added in one kernel per sample on CUDA, fewer
    host waits in the factorisation and the solve): the untimed 2-GPU run, the untimed 1-GPU run, then the untimed
    2-GPU run with ``LOWBIT_DP_SYNC=0``."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_nosync", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_DP_SYNC": "0"})]],
    ]


def run14_steps(L8: int):
    """Session 9, second call: the data-parallel defaults changed after run 13 (the pass agreement on the host over
    gloo, no host waits around the collectives, the 2-rank statistics sums as one exchange, the triangular-inverse
    chunks broadcast while the next is solved): the untimed 2-GPU run, the untimed 1-GPU run, then the untimed
    2-GPU run with run 13's settings (``_run13env``) as the A/B."""
    old = {"LOWBIT_DP_SYNC": "1", "LOWBIT_DP_AGREE": "device", "LOWBIT_DP_REDUCE": "loop", "LOWBIT_DP_CHUNKS": "after"}
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_run13env", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60, old)]],
    ]


def run15_steps(L8: int):
    """Session 9, third call (GPTQ's block update subtracted in the GEMM on CUDA, no loss sums in the pipelines' solves,
    the in-place sweep's checks once per solve): the untimed 2-GPU run, the untimed 1-GPU run, the untimed 2-GPU run
    again (run-to-run spread)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_rep", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
    ]


def run16_steps(L8: int):
    """Session 9, last call (the statistics count summed on the host too): the untimed 2-GPU run, then the untimed
    1-GPU run."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
    ]


def run17_steps(L8: int):
    """Session 10, first call (the first dampening kept on the device, the fits' objectives made per run of groups and
    their errors laid out per group, each rank pinned to its share of the CPUs, the connections made before the run):
    the untimed 2-GPU run, the untimed 1-GPU run, then the untimed 2-GPU run without the pinning (the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_nopin", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_DP_AFFINITY": "0"})]],
    ]


def run18_steps(L8: int):
    """Session 10, second call (the triangular-inverse chunks solved back to back while NCCL carries them, the block
    update of the solve as one batched GEMM, the fits' losses as one batched GEMM, no pinning by default): the untimed
    2-GPU run, the untimed 1-GPU run, then the untimed 2-GPU run with session 9's chunk broadcasts (the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_overlapchunks", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_DP_CHUNKS": "overlap"})]],
    ]


def run19_steps(L8: int):
    """Session 10, third call (the block copies host <-> GPU staged through pinned buffers: no pageable copy holding
    the driver while the calibration thread waits): the untimed 2-GPU run, the untimed 1-GPU run, then the untimed
    2-GPU run with the pageable copies (``LOWBIT_PREFETCH_STAGED=0``, the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_pageable", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_PREFETCH_STAGED": "0"})]],
    ]


def run20_steps(L8: int):
    """Session 10, fourth call (the quantized blocks' states go home through the staged copies too): the untimed
    2-GPU run, the untimed 1-GPU run, then the untimed 2-GPU run with the pageable copies (the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_pageable", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_PREFETCH_STAGED": "0"})]],
    ]


def run21_steps(L8: int):
    """Session 10, last call (the staging buffers made once per copy stream, small tensors by plain copies, the
    broadcast connected before the run): the untimed 2-GPU run, then the untimed 1-GPU run."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
    ]


def run22_steps(L8: int):
    """Planned for the next session's call (not run yet): after the smoke runs (which compile the Triton kernels), the
    untimed 2-GPU and 1-GPU GPTQ runs, then AWQ on the whole 8B shape (32 layers; runs 8-10 had 2 layers) on 1 and 2
    GPUs: ``SKIP_PROBE=1 SCALE_STEPS=run22 SCALE_BUDGET=470 SCALE_TIMEOUT=480 bash bench/gpu_call_dp8.sh``."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("awq_8b_1gpu_untimed", "8b", L8, "awq", 1, {"max_memory": "14GB"}, 0, 150)]],
        [[("awq_8b_2gpu_untimed", "8b", L8, "awq", 2, {"max_memory": "14GB"}, None, 130)]],
    ]


def run23_steps(L8: int):
    """Session 11, first call (block 0 copied during the capture, the staging buffers made before it and used for
    tensors of one chunk too): the untimed 2-GPU run, the untimed 1-GPU run, then the 2-GPU run without both
    (``LOWBIT_STAGE_AHEAD=0 LOWBIT_PREFETCH_FIRST=0``, the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_lazyfirst", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_STAGE_AHEAD": "0", "LOWBIT_PREFETCH_FIRST": "0"})]],
    ]


def run24_steps(L8: int):
    """Session 11, second call (each rank's solve replayed from CUDA graphs, ``LOWBIT_GPTQ_GRAPH=auto``; staging pool
    for every size): the untimed 2-GPU run, the untimed 1-GPU run (no graphs: one process), then the 2-GPU run
    without graphs (``LOWBIT_GPTQ_GRAPH=0``, the A/B)."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_nograph", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_GPTQ_GRAPH": "0"})]],
    ]


def run25_steps(L8: int):
    """Session 11, third call: the smoke runs compile the kernels for the smoke shapes only, so the first 8B run of a
    call also compiled the 8B shapes' Triton variants inside its block 0 (runs 20, 23, 24: the first 2-GPU run's block
    0 0.13-0.28 s longer than the third's). A 2-layer 8B warm-up on 2 GPUs (not reported) first, then the untimed
    2-GPU run and the untimed 1-GPU run; then the 2-GPU run with the fits queued before the triangular inverse
    (``LOWBIT_GPTQ_ORDER=fits-first``, the A/B of this call's other change; the host waits of boolean indexing are gone
    in both)."""
    return [
        [[("gptq_8b_2gpu_warmup", "8b", 2, "gptq", 2, {"max_memory": "16GB"}, None, 40)]],
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_fitsfirst", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60,
           {"LOWBIT_GPTQ_ORDER": "fits-first"})]],
    ]


def run26_steps(L8: int):
    """Session 11, fourth call: AWQ on the whole 8B shape (32 layers; runs 8-10 had 2) on 1 and 2 GPUs (the grid of
    scale exponents shared out over the ranks, ``LOWBIT_DP_AWQ=shared``), after a 2-layer 2-GPU warm-up."""
    return [
        [[("awq_8b_2gpu_warmup", "8b", 2, "awq", 2, {"max_memory": "14GB"}, None, 40)]],
        [[("awq_8b_2gpu_untimed", "8b", L8, "awq", 2, {"max_memory": "14GB"}, None, 130)]],
        [[("awq_8b_1gpu_untimed", "8b", L8, "awq", 1, {"max_memory": "14GB"}, 0, 150)]],
    ]


def run27_steps(L8: int):
    """Session 11, last call (the solve graphs; the fits back before the triangular inverse): the untimed 2-GPU run,
    the untimed 1-GPU run, the 2-GPU run again (the 2-GPU run first in a call had the longer block 0 in runs 20, 23,
    24 and 25: both positions reported), then AWQ on the whole 8B shape on 2 and 1 GPUs."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 75)]],
        [[("gptq_8b_2gpu_untimed_rep", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 60)]],
        [[("awq_8b_2gpu_untimed", "8b", L8, "awq", 2, {"max_memory": "14GB"}, None, 130)]],
        [[("awq_8b_1gpu_untimed", "8b", L8, "awq", 1, {"max_memory": "14GB"}, 0, 150)]],
    ]


def run28_steps(L8: int):
    """Session 11, last device time (269 s): the down_proj Cholesky split in two levels (its off-diagonal solve and
    Schur complement in two row pieces, one per rank; other bits than cuSOLVER's whole factor, so the 8B digests
    change from run 8's, the 1- and 2-GPU ones must agree): the untimed 2-GPU run, then the untimed 1-GPU run. It
    measured slower (20.16 s against 19.74-19.81 s on 2 GPUs, 35.80 against 35.51 s on 1): the split was removed
    from lowbit afterwards, so these steps no longer run that code."""
    return [
        [[("gptq_8b_2gpu_untimed", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, None, 55)]],
        [[("gptq_8b_1gpu_untimed", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 0, 62)]],
    ]


#: the smoke model's per-layer digests (3 layers, 16 x 256 tokens) of run 10's code, 1 and 2 processes
SMOKE_DIGESTS_RUN10 = ["6405faf24046a258", "c4e1ad6ac1506813", "ea703bf2fa637bfc"]


def main_steps(args, steps) -> None:
    import threading

    os.makedirs(args.out, exist_ok=True)
    tmp = "/tmp/scale_gpu_parts"
    os.makedirs(tmp, exist_ok=True)
    t_start = time.perf_counter()
    results = {"gpu": {}, "device": None, "plan": "run8 steps"}
    try:
        import torch

        results["device"] = torch.cuda.get_device_name(0) + f" x{torch.cuda.device_count()}"
        results["torch"] = torch.__version__
    except Exception as e:  # pragma: no cover
        results["device"] = repr(e)
    only = set(args.runs.split(",")) if args.runs else None
    lock = threading.Lock()

    def save():
        with lock:
            with open(os.path.join(args.out, "gpu.json"), "w") as f:
                json.dump(results, f, indent=1, default=str)

    def chain(specs):
        for name, shape, layers, method, nproc, kw, gpu, need, *extra in specs:
            if only is not None and name not in only:
                continue
            left = args.budget - (time.perf_counter() - t_start)
            if left < need:
                with lock:
                    results["gpu"][name] = {"skipped": f"{left:.0f} s left of the budget"}
                save()
                continue
            spec = {"name": name, "shape": shape, "layers": layers, "method": method, "nproc": nproc, "kwargs": kw,
                    "tmp": tmp, "env": dict(extra[0]) if extra else {}, "gpu": gpu}
            r = launch(spec, left)
            r["started_s"] = time.perf_counter() - t_start - r["process_s"]
            with lock:
                results["gpu"][name] = r
            print(json.dumps({"name": name, "process_s": round(r["process_s"], 1), "error": (r["error"] or "")[-600:],
                              "ranks": [{k: (round(x[k], 2) if isinstance(x[k], float) else x[k])
                                         for k in ("wall_s", "peak_gpu_mb", "peak_rss_mb", "digests")}
                                        for x in r["ranks"]]}), flush=True)
            save()

    if os.environ.get("SCALE_DEVICE") == "cpu":  # local smoke test: the tiny shape, 2 layers
        steps = [[[(x[0] + "_smoke", "tiny", 2, x[3], x[4], x[5], x[6], 0, *x[8:]) for x in c] for c in st]
                 for st in steps]
    fallback = {"LOWBIT_OUTSIDE_HOME": "0", "LOWBIT_HOME_ASYNC": "0", "LOWBIT_DP_FACTOR": "every",
                "LOWBIT_GPTQ_OVERLAP": "0", "LOWBIT_DP_REDUCE": "loop"}
    if os.environ.get("SCALE_SMOKE", "1") == "force" or (os.environ.get("SCALE_SMOKE", "1") == "1"
                                                         and os.environ.get("SCALE_DEVICE") != "cpu"):
        smoke = {}
        for tag, env, nproc in (("new", {}, 1), ("new", {}, 2)):
            if True:
                spec = {"name": f"smoke_{tag}_{nproc}", "shape": "smoke", "layers": 3, "method": "gptq", "nproc": nproc,
                        "kwargs": {"max_memory": "2GB"}, "tmp": tmp, "env": dict(env), "gpu": 0,
                        "n_samples": 16, "seq_len": 256}
                r = launch(spec, 90)
                smoke[spec["name"]] = {"error": (r["error"] or "")[-1500:], "process_s": r["process_s"],
                                       "digests": [x["digests"] for x in r["ranks"]],
                                       "peak_gpu_mb": [x["peak_gpu_mb"] for x in r["ranks"]],
                                       "wall_s": [x["wall_s"] for x in r["ranks"]]}
        ok = all(not v["error"] and v["digests"] for v in smoke.values()) and len(
            {json.dumps(d) for v in smoke.values() for d in v["digests"]}) == 1
        if os.environ.get("SCALE_SMOKE_EXPECT", "") == "run10":  # run 11 on: the changes are bit-identical
            ok = ok and all(d == SMOKE_DIGESTS_RUN10 for v in smoke.values() for d in v["digests"])
        results["smoke"] = dict(smoke, ok=ok)
        print("smoke", json.dumps({k: (v if k == "ok" else {"error": v["error"][-300:], "d": v["digests"][:1],
                                                            "wall": v["wall_s"]}) for k, v in results["smoke"].items()}),
              flush=True)
        if not ok:  # run 8's new paths broke something on the GPU: measure without them
            os.environ.update(fallback)
            results["fallback_env"] = fallback
        save()
    for step in steps:
        threads = [threading.Thread(target=chain, args=(c,)) for c in step]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    results["total_s"] = time.perf_counter() - t_start
    save()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default="/tmp/scale_gpu")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for all runs together")
    ap.add_argument("--runs", default="", help="comma-separated run names (default: all, in order)")
    ap.add_argument("--wait-file", default="", help="before the first multi-GPU run, wait (up to --wait-max s) "
                    "for this file: GPU 1 is busy until then (another job)")
    ap.add_argument("--wait-max", type=float, default=120.0)
    ap.add_argument("--rowsplit-check", default="", help="only run the row-split identity check; JSON to this path")
    ap.add_argument("--rowsplit-json", default="", help="a --rowsplit-check result: multi-GPU runs fall back to "
                    "LOWBIT_DP_SPLIT=units if the row pieces did not give identical codes")
    ap.add_argument("--xfer", default="", help="only the host <-> GPU copy check; JSON to this path")
    ap.add_argument("--steps", default="", help="'run8': the run-8 plan (concurrent single-GPU runs, see run8_steps)")
    args = ap.parse_args()
    if args.xfer:
        xfer_check(args.xfer)
        return
    if args.steps == "run8":
        e = os.environ.get
        main_steps(args, run8_steps(int(e("SCALE_LAYERS", 32)), int(e("SCALE_LAYERS_70B_1", 4)),
                                    int(e("SCALE_LAYERS_70B", 8)), int(e("SCALE_LAYERS_AWQ", 2))))
        return
    if args.steps == "run9":
        e = os.environ.get
        main_steps(args, run9_steps(int(e("SCALE_LAYERS", 16)), int(e("SCALE_LAYERS_70B_1", 4)),
                                    int(e("SCALE_LAYERS_AWQ", 2))))
        return
    if args.steps == "run10":
        e = os.environ.get
        main_steps(args, run10_steps(int(e("SCALE_LAYERS", 32)), int(e("SCALE_LAYERS_AWQ", 2))))
        return
    if args.steps in ("run11", "run12", "run13", "run14", "run15", "run16", "run17", "run18", "run19", "run20", "run21",
                      "run22", "run23", "run24", "run25", "run26",
                      "run27", "run28"):
        main_steps(args, {"run11": run11_steps, "run12": run12_steps, "run13": run13_steps, "run14": run14_steps,
                         "run15": run15_steps, "run16": run16_steps, "run17": run17_steps,
                         "run18": run18_steps, "run19": run19_steps, "run20": run20_steps,
                         "run21": run21_steps, "run22": run22_steps,
                         "run23": run23_steps, "run24": run24_steps, "run25": run25_steps,
                         "run26": run26_steps, "run27": run27_steps, "run28": run28_steps}[args.steps](
            int(os.environ.get("SCALE_LAYERS", 32))))
        return
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.rowsplit_check:
        rowsplit_check(args.rowsplit_check)
        return
    os.makedirs(args.out, exist_ok=True)
    tmp = "/tmp/scale_gpu_parts"
    os.makedirs(tmp, exist_ok=True)
    t_start = time.perf_counter()
    L8 = int(os.environ.get("SCALE_LAYERS", 4))
    runs = [
        # name, shape, layers, method, nproc, kwargs, minimum seconds left to start it
        ("gptq_8b_1gpu", "8b", L8, "gptq", 1, {"max_memory": "16GB"}, 30),
        ("gptq_8b_2gpu", "8b", L8, "gptq", 2, {"max_memory": "16GB"}, 30),
        ("gptq_70b_2gpu", "70b", int(os.environ.get("SCALE_LAYERS_70B", 2)), "gptq", 2, {"max_memory": "40GB"}, 70),
        ("awq_8b_1gpu", "8b", 2, "awq", 1, {"max_memory": "14GB"}, 40),
        ("awq_8b_2gpu", "8b", 2, "awq", 2, {"max_memory": "14GB"}, 35),
        ("gptq_8b_1gpu_nooffload_mb16", "8b", 2, "gptq", 1, {"micro_batch": 16}, 30),
        ("gptq_8b_1gpu_offload_mb2", "8b", 2, "gptq", 1, {"max_memory": "12GB", "micro_batch": 2}, 30),
    ]
    if args.runs:
        order = args.runs.split(",")
        runs = sorted([r for r in runs if r[0] in order], key=lambda r: order.index(r[0]))
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
                "tmp": tmp, "env": {}}
        if nproc > 1 and args.wait_file:
            t_w = time.perf_counter()
            while not os.path.exists(args.wait_file) and time.perf_counter() - t_w < args.wait_max:
                time.sleep(1.0)
            results.setdefault("waited_s", {})[name] = time.perf_counter() - t_w
            left = args.budget - (time.perf_counter() - t_start)
            if left < need:
                results["gpu"][name] = {"skipped": f"{left:.0f} s left of the budget"}
                continue
        if nproc > 1 and args.rowsplit_json:
            try:
                with open(args.rowsplit_json) as f:
                    rs = json.load(f)
                results["rowsplit"] = rs
                if not all(v.get("identical") for v in rs.values()):
                    spec["env"]["LOWBIT_DP_SPLIT"] = "units"
            except (OSError, ValueError) as e:
                results["rowsplit"] = {"error": repr(e)}
        r = launch(spec, left)
        results["gpu"][name] = r
        print(json.dumps({"name": name, "process_s": r["process_s"], "error": r["error"],
                          "ranks": [{k: x[k] for k in ("wall_s", "peak_gpu_mb", "peak_rss_mb", "comm_s")}
                                    for x in r["ranks"]]}), flush=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
