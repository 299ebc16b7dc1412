"""Where a data-parallel GPTQ block's time goes on the GPU, without synchronising timers (issue 20, session 9).

The 8B-shaped GPTQ run of ``bench/scale_gpu.py`` (random bf16 weights, int4 g128 asym, 128 x 2048 tokens,
``max_memory=16GB``) on ``--layers`` layers; ``torch.profiler`` (CPU ops + CUDA kernels) records blocks
``--blk0`` .. ``--blk0 + --nblk - 1`` (after the first blocks have warmed up). Each pipeline part is marked with a
``record_function`` label (nothing synchronises: the run is the one a user gets, plus the profiler's own cost), and
the trace is summarised in the process, per rank:

* the window's wall, the GPU's busy time (the union of every kernel, copy and memset, NCCL apart), its idle gaps;
* GPU time per label (each kernel charged to the innermost label around its launch on the host);
* idle GPU time per label: each gap charged to the label the host was in at the gap's middle (a host-bound part
  shows up here), and the host's blocking waits (stream / device / event synchronisations, blocking copies);
* the launch lag (kernel start minus its launch) per label: small = the GPU waits for the host.

    python bench/dp_trace.py --out DIR                              # 1 GPU
    torchrun --nproc-per-node 2 bench/dp_trace.py --out DIR         # 2 GPUs (NCCL)
"""
from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import sys
import time
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

LABELS = []  # (owner, attr, label): filled by _targets()


def _targets():
    from lowbit.algorithms import stats
    from lowbit.model import _ptq_solve, _ptq_staged, distributed, offload

    return [(_ptq_solve, "gptq_factor", "factor"), (_ptq_solve, "gptq_quantize", "solve"),
            (_ptq_solve, "gptq_static_groups", "fits"), (_ptq_solve, "_exchange_pieces", "exchange"),
            (_ptq_solve, "_gptq_stage", "stage"), (distributed, "min_over_ranks", "agree"),
            (distributed, "sum_in_rank_order", "sums"), (distributed, "shared_chunks", "chunks"),
            (distributed, "all_gather_bytes", "gather"), (stats.InputStats, "add_samples", "hessian"),
            (offload.ActivationStore, "get", "store_get"), (offload.ActivationStore, "put", "store_put"),
            (_ptq_staged._BlockRunner, "run", "runner"), (_ptq_staged, "_reduce_stats", "reduce_stats"),
            # between the blocks (the main thread, and the background trips home)
            (_ptq_staged, "_install_stages", "install"), (_ptq_staged, "_drop_replaced", "drop_replaced"),
            (_ptq_staged._Prefetch, "wait", "prefetch_wait"), (offload.ActivationStore, "replace_first", "replace_first"),
            (_ptq_staged, "_states_follow", "states_follow"), (_ptq_staged, "_in_worker", "in_worker")]


def _annotate():
    import torch

    for owner, attr, label in _targets():
        fn = getattr(owner, attr)

        def make(fn=fn, label=label):
            @functools.wraps(fn)
            def wrapped(*a, **k):
                with torch.profiler.record_function("L:" + label):
                    return fn(*a, **k)
            return wrapped

        setattr(owner, attr, make())
    # sequential imported _gptq_stage by name: the stage function the GPTQ method calls
    from lowbit.model import _ptq_solve, sequential

    sequential._gptq_stage = _ptq_solve._gptq_stage


def _segments(anns):
    """Per thread: sorted ``(start, end, path)`` of innermost-label segments from nested annotations."""
    out = {}
    for tid, evs in anns.items():
        evs.sort(key=lambda e: (e[0], -e[1]))
        stack = []  # (end, label)
        segs = []
        cur = None

        def emit(t):
            nonlocal cur
            if cur is not None and t > cur[0]:
                segs.append((cur[0], t, cur[1]))
            cur = (t, "/".join(l for _, l in stack) if stack else "")

        for s, d, lab in evs:
            e = s + d
            while stack and stack[-1][0] <= s:
                t_end = stack[-1][0]
                stack.pop()
                emit(t_end)
            stack.append((e, lab))
            emit(s)
        while stack:
            t_end = stack[-1][0]
            stack.pop()
            emit(t_end)
        out[tid] = (segs, [x[0] for x in segs])
    return out


def _path_at(segs, tid, t):
    s = segs.get(tid)
    if s is None:
        return ""
    lst, starts = s
    i = bisect.bisect_right(starts, t) - 1
    if i >= 0 and lst[i][0] <= t < lst[i][1]:
        return lst[i][2]
    return ""


def _union(iv):
    iv = sorted(iv)
    out = []
    for s, e in iv:
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return out


def analyse(trace_path: str) -> dict:
    with open(trace_path) as f:
        ev = json.load(f)["traceEvents"]
    X = [e for e in ev if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in X if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    rt = {}
    for e in X:
        if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver":
            c = e.get("args", {}).get("correlation")
            if c is not None:
                rt[c] = e
    anns = defaultdict(list)
    for e in X:
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith("L:"):
            anns[e["tid"]].append((e["ts"], e["dur"], e["name"][2:]))
    segs = _segments(anns)
    # every thread's labels on one timeline (the blocks' calibration threads follow one another; each block runs in
    # a new worker thread): the host's label at a time whatever thread it is in
    allann = {"all": [x for v in anns.values() for x in v if x[2] != "in_worker"]}
    segs_all = _segments(allann)
    # the calibration thread: the one that launched most kernels
    launches = defaultdict(int)
    kinfo = []
    for k in gpu:
        r = rt.get(k.get("args", {}).get("correlation"))
        tid = r["tid"] if r else None
        launches[tid] += 1
        path = (_path_at(segs, tid, r["ts"]) or _path_at(segs_all, "all", r["ts"])) if r else "?"
        lag = k["ts"] - (r["ts"] + r["dur"]) if r else None
        nccl = "nccl" in k.get("name", "").lower()
        kinfo.append((k["ts"], k["ts"] + k["dur"], path or "(unlabelled)", nccl, lag, k.get("args", {}).get("stream"),
                      k.get("name", "")[:60]))
    if not kinfo:
        return {"error": "no kernels"}
    t0 = min(k[0] for k in kinfo)
    t1 = max(k[1] for k in kinfo)
    comp = _union([(s, e) for s, e, _, n, _, _, _ in kinfo if not n])
    allk = _union([(s, e) for s, e, _, _, _, _, _ in kinfo])
    busy = sum(e - s for s, e in comp)
    busy_all = sum(e - s for s, e in allk)
    ktime = defaultdict(float)
    lag = defaultdict(list)
    for s, e, p, n, lg, _, _ in kinfo:
        key = p + (" [nccl]" if n else "")
        ktime[key] += e - s
        if lg is not None and not n:
            lag[p].append(lg)
    # gaps in the compute union, charged to the host's label at the gap's middle on the calibration thread
    gaps = defaultdict(float)
    gap_next = defaultdict(float)
    gap_n = defaultdict(int)
    nccl_iv = _union([(s, e) for s, e, _, n, _, _, _ in kinfo if n])
    nccl_starts = [s for s, _ in nccl_iv]
    gap_under_nccl = 0.0
    kin_sorted = sorted((s, p, nm) for s, e, p, n, _, _, nm in kinfo if not n)
    long_gaps = []
    ks = [x[0] for x in kin_sorted]
    for (s0, e0), (s1, e1) in zip(comp, comp[1:]):
        g = s1 - e0
        if g <= 0:
            continue
        mid = (e0 + s1) / 2
        p = _path_at(segs_all, "all", mid) or "(host: unlabelled)"
        gaps[p] += g
        gap_n[p] += 1
        i = bisect.bisect_left(ks, s1)
        nxt = kin_sorted[i][1] if i < len(kin_sorted) else "?"
        gap_next[nxt] += g
        if g > 300:
            long_gaps.append((round((e0 - t0) / 1e3, 2), round(g / 1e3, 2), p, nxt, kin_sorted[i][2] if i < len(kin_sorted) else ""))
        # overlap with NCCL kernels
        j = bisect.bisect_right(nccl_starts, s1) - 1
        while j >= 0 and nccl_iv[j][1] > e0:
            gap_under_nccl += min(s1, nccl_iv[j][1]) - max(e0, nccl_iv[j][0])
            j -= 1
    # host: blocking waits on the calibration thread, by label
    waits = defaultdict(float)
    host_label = defaultdict(float)
    stream_busy = defaultdict(float)
    for s_, e_, _, n, _, st, _ in kinfo:
        stream_busy[str(st) + (" nccl" if n else "")] += e_ - s_
    for e in X:
        if e.get("cat") not in ("cuda_runtime", "cuda_driver"):
            continue
        name = str(e.get("name", ""))
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and any(
                w in name for w in ("Synchronize", "cudaMemcpy", "cuMemcpy")) and "Async" not in name:
            waits[(_path_at(segs_all, "all", e["ts"]) or "(unlabelled)") + " " + name] += e["dur"]
        elif e.get("cat") in ("cuda_runtime",) and name == "cudaMemcpyAsync" and e["dur"] > 50:
            waits[(_path_at(segs_all, "all", e["ts"]) or "(unlabelled)") + " cudaMemcpyAsync(>50us)"] += e["dur"]
    for s, e_, p in segs_all.get("all", ([], []))[0]:
        host_label[p or "(unlabelled)"] += e_ - s

    def top(d, n=25):
        return sorted(((k, round(v / 1e3, 2)) for k, v in d.items()), key=lambda x: -x[1])[:n]

    # session 10: the kernels behind each label (name, count, ms): what a label's time is made of
    by_name = defaultdict(float)
    n_name = defaultdict(int)
    for s_, e_, p_, n_, _, _, nm in kinfo:
        by_name[(p_ + (" [nccl]" if n_ else ""), nm)] += e_ - s_
        n_name[(p_ + (" [nccl]" if n_ else ""), nm)] += 1
    kernels_by_label_name = [(k[0], k[1], n_name[k], round(v / 1e3, 2))
                             for k, v in sorted(by_name.items(), key=lambda x: -x[1])[:60]]

    return {"window_ms": round((t1 - t0) / 1e3, 2), "gpu_busy_compute_ms": round(busy / 1e3, 2),
            "gpu_busy_all_ms": round(busy_all / 1e3, 2), "gpu_idle_compute_ms": round((t1 - t0 - busy) / 1e3, 2),
            "idle_under_nccl_ms": round(gap_under_nccl / 1e3, 2), "kernels": len(kinfo),
            "kernel_ms_by_label": top(ktime, 40), "kernels_by_label_name": kernels_by_label_name,
            "idle_ms_by_host_label": top(gaps, 30),
            "idle_gaps_by_host_label": sorted(gap_n.items(), key=lambda x: -gaps[x[0]])[:30],
            "idle_ms_by_next_kernel_label": top(gap_next, 30), "host_blocking_ms": top(waits, 30),
            "host_ms_by_label": top(host_label, 40),
            "launch_lag_us_median_by_label": sorted(
                ((k, round(sorted(v)[len(v) // 2], 1), len(v)) for k, v in lag.items()), key=lambda x: -x[2])[:30],
            "threads_launching": {str(k): v for k, v in launches.items()},
            "stream_busy_ms": top(stream_busy, 10), "long_gaps": sorted(long_gaps, key=lambda x: -x[1])[:60],
            "host_waits_note": "blocking runtime calls on any thread, by the host label at their start"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--blk0", type=int, default=3)
    ap.add_argument("--nblk", type=int, default=2)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.environ.update({"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    import torch

    from lowbit.model import _ptq_staged
    from lowbit.model import distributed as D
    from lowbit.model.sequential import quantize_model_ptq
    from scale_gpu import build

    D.init_from_env(torch.device("cuda"))
    rank, world = D.rank_world()
    dev = D.local_device(torch.device("cuda"))
    torch.cuda.set_device(dev if dev.index is not None else torch.device("cuda", 0))
    _annotate()
    model, cfg = build("8b", args.layers)
    ids = torch.randint(0, cfg.vocab_size, (128, 2048), generator=torch.Generator().manual_seed(1))
    state = {"prof": None, "block": -1, "marks": []}
    orig = _ptq_staged._block_stages
    t_start = [None]

    def block_stages(block, sel, prefix):
        state["block"] += 1
        b = state["block"]
        torch.cuda.current_stream().synchronize()  # once per block: the per-block wall below
        state["marks"].append((prefix, time.perf_counter() - t_start[0]))
        if b == args.blk0:
            kw = {}
            try:  # every thread's ops (the prefetch thread's copies too), where this torch has it
                kw["experimental_config"] = torch._C._profiler._ExperimentalConfig(profile_all_threads=True)
            except Exception:
                pass
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                      torch.profiler.ProfilerActivity.CUDA], **kw)
            prof.start()
            state["prof"] = prof
        elif b == args.blk0 + args.nblk and state["prof"] is not None:
            torch.cuda.current_stream().synchronize()
            state["prof"].stop()
        return orig(block, sel, prefix)

    _ptq_staged._block_stages = block_stages
    D.barrier()
    t_start[0] = time.perf_counter()
    quantize_model_ptq(model, method="gptq", bits=4, group_size=128, sym=False, calib_dataset=ids, device=dev,
                       progress=False, max_memory="16GB")
    torch.cuda.synchronize()
    wall = time.perf_counter() - t_start[0]
    prof = state["prof"]
    res = {"rank": rank, "world": world, "layers": args.layers, "wall_s": wall, "marks": state["marks"],
           "window_blocks": [args.blk0, args.blk0 + args.nblk - 1],
           "env": {k: v for k, v in os.environ.items() if k.startswith("LOWBIT_")}}
    if prof is not None:
        tp = f"/tmp/dp_trace_{args.tag}_r{rank}.json"
        t = time.perf_counter()
        prof.export_chrome_trace(tp)
        res["export_s"] = time.perf_counter() - t
        t = time.perf_counter()
        res["analysis"] = analyse(tp)
        res["analyse_s"] = time.perf_counter() - t
        if os.environ.get("TRACE_KEEP", "") in ("all", str(rank)):
            import gzip
            import shutil

            with open(tp, "rb") as fi, gzip.open(os.path.join(args.out, f"raw_{args.tag}_r{rank}.json.gz"), "wb", 6) as fo:
                shutil.copyfileobj(fi, fo)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"trace_{args.tag or world}_r{rank}.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(json.dumps({"rank": rank, "world": world, "wall": round(wall, 2),
                      "blocks": [round(b - a, 3) for (_, a), (_, b) in zip(state["marks"], state["marks"][1:])],
                      **{k: res.get("analysis", {}).get(k) for k in ("window_ms", "gpu_busy_compute_ms",
                                                                      "gpu_idle_compute_ms", "idle_under_nccl_ms")}}))


if __name__ == "__main__":
    main()
