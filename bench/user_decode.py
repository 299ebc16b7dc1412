"""What a user sees: ``model.generate`` of a Llama-3-8B-shaped model, bf16 vs lowbit variants vs peers (GPU).

A transformers ``LlamaForCausalLM`` with the Llama-3-8B shape (hidden 4096, intermediate 14336, GQA 32/8,
vocab 128256; ``--layers`` of them, 32 = the full model) and random bf16 weights (one seed, the same
weights for every variant), quantized through each library's public API except ``lm_head``:

* bf16 (reference); lowbit ``method="bnb-nf4"`` (Linear4bit); ``method="rtn"`` int4 g128 asym (QLinear);
  GPTQ-format int4 g128 (the rtn model written by ``lowbit.io.gptq.export_gptq`` and re-loaded with
  ``load_gptq``); GGUF Q4_0 blocks (``lowbit.quantize(model, weights="q4_0")``: the same QLinear +
  ``layout="gguf"`` state ``load_gguf_model`` builds); int8 weight-only (``weights=qint8``); ``method=
  "int8-dynamic"``; fp8 weights + dynamic fp8 activations (``weights=qfloat8, activations=qfloat8,
  act_dynamic=True``);
* peers where importable: torchao int4 g128 (``Int4WeightOnlyConfig``), bitsandbytes nf4.

Per variant, after a warm-up model: eager ``generate`` (dynamic cache), batch 1, 64 new tokens after 128
(decode tok/s = 64 / (t(1 + 64 new) - t(1 new))); prefill of 1 x 512 (one forward, ms); weight GB (memory
allocated once built; tensor GB = bytes of the live CUDA tensors, without the allocator's block slack); peak GB during ``generate``; with ``--graph`` the same model decoding greedily from a
``StaticCache`` with one decode step captured in a CUDA graph (:func:`measure_graph`: what the kernels give
without Python / launch overhead; its tokens compared with eager ``generate``'s); with ``--prefill-parts`` the
512-row prefill split per projection into dequantize / cuBLAS time (:func:`prefill_parts`); optionally the
compiled ``generate`` (static cache and ``torch.compile(mode="reduce-overhead")``; slow to compile). Medians
of ``--reps``.

    python bench/user_decode.py --layers 8 --out-dir bench/results --graph bf16,int4,nf4 [--compiled bf16]

Writes ``user_decode.md`` / ``user_decode.json`` / ``user_decode.png`` (rewritten after each variant).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lowbit  # noqa: E402

VARIANTS = ["bf16", "lowbit nf4", "lowbit int4 g128", "lowbit GPTQ-format int4 g128", "lowbit GGUF Q4_0",
            "lowbit int8 weight-only", "lowbit int8-dynamic", "lowbit fp8 dynamic", "torchao int4 g128",
            "bitsandbytes nf4"]
SHORT = {"bf16": "bf16", "nf4": "lowbit nf4", "int4": "lowbit int4 g128", "gptq": "lowbit GPTQ-format int4 g128",
         "gguf": "lowbit GGUF Q4_0", "int8": "lowbit int8 weight-only", "int8dyn": "lowbit int8-dynamic",
         "fp8": "lowbit fp8 dynamic", "torchao": "torchao int4 g128", "bnb": "bitsandbytes nf4",
         "int4r": "lowbit int4 g128" + " (re-allocated)", "nf4r": "lowbit nf4" + " (re-allocated)"}
REALLOC = " (re-allocated)"  # quantized on the GPU as the plain variant, then moved to the CPU and back (fresh
# allocations: the caching allocator's blocks sized for these tensors, not reused from the freed bf16 weights)


DEV = "cuda"
SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
             vocab_size=128256)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def master_model(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPE, num_hidden_layers=layers, max_position_embeddings=2048,
                      rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(DEV):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # modest random weights (std 0.02, as HF init) -> finite logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.eval()
    model.generation_config.pad_token_id = 0
    return model.cpu()


def tensor_bytes() -> int:
    """Bytes of the distinct CUDA tensor storages alive now (what the tensors need, without the caching
    allocator's rounding and block slack that ``torch.cuda.memory_allocated`` includes)."""
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        try:
            if isinstance(o, torch.Tensor) and o.is_cuda:
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - objects that are not plain tensors
            pass
    return sum(seen.values())


def build(name: str, master, workdir: Path):
    if name.endswith(REALLOC):
        m = build(name[:-len(REALLOC)], master, workdir)
        m.cpu()
        gc.collect()
        torch.cuda.empty_cache()
        return m.to(DEV)
    m = copy.deepcopy(master).to(DEV)
    if name == "bf16":
        return m
    if name == "lowbit nf4":
        return lowbit.quantize(m, method="bnb-nf4")
    if name in ("lowbit int4 g128", "lowbit GPTQ-format int4 g128"):
        lowbit.quantize(m, method="rtn", bits=4, group_size=128, sym=False, device=DEV, progress=False)
        if name == "lowbit int4 g128":
            return m
        from lowbit.io.gptq import export_gptq, load_gptq

        d = workdir / "gptq"
        m = m.cpu()
        export_gptq(m, d)
        del m
        gc.collect()
        return load_gptq(d, dtype=torch.bfloat16, device=DEV).eval()
    if name == "lowbit GGUF Q4_0":
        lowbit.quantize(m, weights="q4_0")
        return lowbit.freeze(m) or m
    if name == "lowbit int8 weight-only":
        lowbit.quantize(m, weights=lowbit.qint8)
        return lowbit.freeze(m) or m
    if name == "lowbit int8-dynamic":
        return lowbit.quantize(m, method="int8-dynamic")
    if name == "lowbit fp8 dynamic":
        lowbit.quantize(m, weights=lowbit.qfloat8, activations=lowbit.qfloat8, act_dynamic=True)
        return lowbit.freeze(m) or m
    if name == "torchao int4 g128":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        def flt(mod, fqn):
            return isinstance(mod, nn.Linear) and "lm_head" not in fqn

        try:
            cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
        except TypeError:
            cfg = Int4WeightOnlyConfig(group_size=128)
        quantize_(m, cfg, filter_fn=flt)
        return m
    if name == "bitsandbytes nf4":
        import bitsandbytes as bnb

        for pname, mod in list(m.named_modules()):
            for cname, child in list(mod.named_children()):
                full = f"{pname}.{cname}" if pname else cname
                if isinstance(child, nn.Linear) and "lm_head" not in full:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="cpu")
                    q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False, quant_type="nf4")
                    setattr(mod, cname, q.cuda())
        return m
    raise ValueError(name)


FOUR_BIT = {"lowbit nf4", "lowbit int4 g128", "lowbit GPTQ-format int4 g128", "lowbit GGUF Q4_0",
            "lowbit int8 weight-only", "lowbit int4 g128" + REALLOC, "lowbit nf4" + REALLOC}  # variants whose GEMV configs come from TUNED_MM


def load_mm_configs(path: str, wait: float) -> str:
    """Replace ``TUNED_MM`` rows with those of a ``mm_tuned.json`` (waiting up to ``wait`` s for it); returns
    what happened, for the report."""
    from lowbit.kernels import triton_configs as TC

    t = time.perf_counter()
    f = Path(path)
    while not f.exists() and time.perf_counter() - t < wait:
        time.sleep(2)
    if not f.exists():
        return f"{path} absent after {wait:.0f} s: committed TUNED_MM used"
    time.sleep(1)  # the writer finishes the file
    rows = json.loads(f.read_text())
    TC.config_mm(4, 1, 1, 64, 64)  # the table's own lazy load happens first
    for key, rs in rows.items():
        b, cls = key.split(",")
        TC.TUNED_MM[(int(b), cls)] = [tuple(r[:3]) + (tuple(r[3]),) for r in rs]
    print(f"TUNED_MM from {path}: {rows}", flush=True)
    return f"TUNED_MM rows from {f.name} (waited {time.perf_counter() - t:.0f} s): {json.dumps(rows)}"


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


@torch.no_grad()
def measure(model, prompt, prefill_ids, reps: int, new: int, static: bool = False):
    kw = dict(do_sample=False, use_cache=True)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        out = model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)
        assert out.shape[1] == prompt.shape[1] + n
        return out

    gen(2)
    tokens = gen(new + 1)[0, prompt.shape[1]:].tolist()  # warm-up (compiles under torch.compile, prepares layouts)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    dec = []
    for _ in range(reps):
        t1 = _sync_time(lambda: gen(1))
        tn = _sync_time(lambda: gen(new + 1))
        dec.append(new / max(tn - t1, 1e-9))
    peak = torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else 0.0
    pre = []
    if not static:
        model(prefill_ids)
        for _ in range(reps):
            pre.append(_sync_time(lambda: model(prefill_ids, use_cache=False)) * 1e3)
    return statistics.median(dec), (statistics.median(pre) if pre else None), peak, tokens


@torch.no_grad()
def prefill_chunks(model, prefill_ids, reps: int, values=("32", "0")):
    """The 1 x 512 prefill under each ``LOWBIT_DENSE_CHUNK_MB`` value (read per call by lowbit's dequantize +
    cuBLAS path): median ms, peak GB and the transient over the resident memory during the forward."""
    import os

    out = {}
    old = os.environ.get("LOWBIT_DENSE_CHUNK_MB")
    try:
        for mb in values:
            os.environ["LOWBIT_DENSE_CHUNK_MB"] = mb
            model(prefill_ids, use_cache=False)
            torch.cuda.synchronize()
            gc.collect()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ts = [_sync_time(lambda: model(prefill_ids, use_cache=False)) * 1e3 for _ in range(reps)]
            peak = torch.cuda.max_memory_allocated()
            out[mb] = {"ms": statistics.median(ts), "peak_gb": peak / 1e9, "transient_gb": (peak - base) / 1e9}
    finally:
        if old is None:
            os.environ.pop("LOWBIT_DENSE_CHUNK_MB", None)
        else:
            os.environ["LOWBIT_DENSE_CHUNK_MB"] = old
    return out


@torch.no_grad()
def measure_graph(model, prompt, reps: int, new: int):
    """Greedy decode with a ``StaticCache`` and ONE decode step captured in a CUDA graph, replayed ``new`` times.

    The prompt is prefilled eagerly; the captured step embeds the last token (a static ``[1, 1]`` tensor),
    runs the model on the static cache (its write position is the cache's own device counter, advanced in
    place), takes the argmax and writes it back into the static token and a token buffer. Decode tok/s =
    ``new`` / time of ``new`` replays (host loop of ``g.replay()``). Returns ``(tok/s, peak GB, tokens)``:
    the first token (from the prefill) and the ``new`` generated ones. On the CPU (``--smoke-cpu``) the step
    runs eagerly (checks the logic only)."""
    from transformers import StaticCache

    P = prompt.shape[1]
    dev = prompt.device
    cache = StaticCache(config=model.config, max_cache_len=P + new + 16)
    tok = torch.zeros(1, 1, dtype=torch.long, device=dev)
    toks = torch.zeros(new + 1, dtype=torch.long, device=dev)
    ctr = torch.ones(1, dtype=torch.long, device=dev)

    def prefill():
        cache.reset()
        logits = model(prompt, past_key_values=cache, use_cache=True).logits
        tok.copy_(logits[:, -1].argmax(-1, keepdim=True))
        toks.zero_()
        toks[:1].copy_(tok.view(1))
        ctr.fill_(1)

    def step():
        logits = model(tok, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        tok.copy_(nxt)
        toks.index_copy_(0, ctr, nxt.view(1))
        ctr.add_(1)

    if DEV != "cuda":
        prefill()
        for _ in range(new):
            step()
        return 0.0, 0.0, toks.tolist()
    prefill()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up on a side stream (kernels compiled, plans and workspaces made)
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(s)
    prefill()
    _sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    dec = []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(max(1, reps)):
        prefill()
        _sync()
        t = time.perf_counter()
        for _ in range(new):
            g.replay()
        _sync()
        dec.append(new / (time.perf_counter() - t))
    peak = torch.cuda.max_memory_allocated() / 1e9
    tokens = toks.tolist()
    del g
    return statistics.median(dec), peak, tokens


def _wall_us(fn, n: int = 300) -> float:
    """Wall-clock µs per call of ``n`` back-to-back eager calls (one sync at the end): the host's cost per call
    where it exceeds the kernel's."""
    for _ in range(5):
        fn()
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    _sync()
    return (time.perf_counter() - t) / n * 1e6


def _time_ms(fn, reps: int = 10) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn()`` after 3 warm-up calls (ms)."""
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


@torch.no_grad()
def prefill_parts(model, m: int):
    """Where a ``m``-row prefill's linear time goes, per projection of decoder layer 0: the module's forward,
    and for lowbit modules the two halves of the dequantize + cuBLAS path (the weight dequantized by one
    Triton pass, then ``F.linear`` on it), beside ``F.linear`` on a bf16 weight of the same shape. ms."""
    import torch.nn.functional as F

    from lowbit.kernels.linear import prepare_linear

    layer = model.model.layers[0]
    out = {}
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        mod = layer.get_submodule(name)
        K, N = mod.in_features, mod.out_features
        x = torch.randn(m, K, dtype=torch.bfloat16, device=DEV)
        wb = torch.randn(N, K, dtype=torch.bfloat16, device=DEV) * 0.02
        r = {"NxK": f"{N}x{K}", "module": _time_ms(lambda: mod(x)), "bf16_linear": _time_ms(lambda: F.linear(x, wb))}
        x1 = x[:1].contiguous()
        lin = torch.nn.Linear(K, N, bias=False, device=DEV, dtype=torch.bfloat16)
        r["m1_module_us"] = _wall_us(lambda: mod(x1))
        r["m1_nnlinear_us"] = _wall_us(lambda: lin(x1))
        st = getattr(mod, "qstate", None)
        p = prepare_linear(st) if st is not None and not callable(st) else None
        if p is not None:
            r["dequant"] = _time_ms(lambda: p.dense(torch.bfloat16))
            wd = p.dense(torch.bfloat16)
            r["cublas_on_dequant"] = _time_ms(lambda: F.linear(x, wd))
            r["dequant_GBps"] = (N * K * 2 + p.words.numel() * 4 + p.scales.numel() * 4) / (r["dequant"] * 1e6)
            del wd
        out[name.split(".")[-1]] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
    return out


def _agree(a, b) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--only", default="", help="comma-separated short names: " + ",".join(SHORT))
    ap.add_argument("--compiled", default="", help="short names also timed with static cache + torch.compile")
    ap.add_argument("--graph", default="", help="short names also timed with a static cache + one decode step "
                    "captured in a CUDA graph (on the same model, right after its eager rows)")
    ap.add_argument("--prefill-parts", default="", help="short names whose 1 x 512 prefill is split per linear "
                    "shape into dequantize / cuBLAS / module time (layer 0)")
    ap.add_argument("--mm-configs", default=None, metavar="JSON", help="TUNED_MM rows (bench/gemv_sweep.py's "
                    "mm_tuned.json) loaded before the first lowbit 4-bit variant is built")
    ap.add_argument("--mm-wait", type=float, default=0.0, help="seconds to wait for --mm-configs to appear (a sweep "
                    "running beside this on another GPU)")
    ap.add_argument("--prefill-chunks", default="", help="comma-separated LOWBIT_DENSE_CHUNK_MB values (e.g. 32,0) "
                    "under which the lowbit variants' 1 x 512 prefill is also timed, side by side")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--time-budget", type=float, default=540.0, help="seconds; variants after it are skipped")
    ap.add_argument("--smoke-cpu", action="store_true", help="tiny model on the CPU (checks the script only)")
    ap.add_argument("--report-only", default=None, metavar="JSON", help="re-render user_decode.md from a json")
    ap.add_argument("--note", action="append", default=[], help="a line for the notes section (with --report-only)")
    args = ap.parse_args(argv)
    if args.report_only:
        d = json.loads(Path(args.report_only).read_text())
        d["info"]["notes"] = args.note
        write(d["rows"], d["info"], Path(args.out_dir))
        return 0
    global DEV
    if args.smoke_cpu:
        DEV = "cpu"
        SHAPE.update(TINY)
    t_start = time.perf_counter()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [SHORT[s] for s in args.only.split(",")] if args.only else list(VARIANTS)
    compiled = {SHORT[s] for s in args.compiled.split(",") if s}
    graph = {SHORT[s] for s in args.graph.split(",") if s}
    breakdown = {SHORT[s] for s in args.prefill_parts.split(",") if s}
    master = master_model(args.layers)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, SHAPE["vocab_size"], (1, 128), generator=g).to(DEV)
    prefill_ids = torch.randint(0, SHAPE["vocab_size"], (1, 512), generator=g).to(DEV)
    info = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__, "layers": args.layers,
            "command": "python bench/user_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    peers = []
    for mod in ("bitsandbytes", "torchao"):
        try:
            peers.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:  # noqa: BLE001 - absent peers are reported, not fatal
            peers.append(f"{mod} absent ({type(e).__name__})")
    info["peers"] = ", ".join(peers)
    rows = []
    # warm-up model: the first model timed in a process reads slow
    with tempfile.TemporaryDirectory() as tmp:
        w = build("bf16", master, Path(tmp))
        measure(w, prompt, prefill_ids, 1, 8)
        if graph:
            try:
                measure_graph(w, prompt, 1, 8)
            except Exception:  # noqa: BLE001 - the variants' rows record their own errors
                traceback.print_exc()
        del w
        gc.collect()
        torch.cuda.empty_cache()
        for name in names:
            if time.perf_counter() - t_start > args.time_budget:
                rows.append({"variant": name, "error": "skipped: time budget of this run"})
                continue
            row = {"variant": name}
            if args.mm_configs and name in FOUR_BIT and not info.get("mm_configs"):
                info["mm_configs"] = load_mm_configs(args.mm_configs, args.mm_wait)
            try:
                t = time.perf_counter()
                model = build(name, master, Path(tmp) / name.replace(" ", "_"))
                gc.collect()
                torch.cuda.empty_cache()
                row["build_s"] = time.perf_counter() - t
                row["weight_gb"] = torch.cuda.memory_allocated() / 1e9 if DEV == "cuda" else 0.0
                row["tensor_gb"] = tensor_bytes() / 1e9 if DEV == "cuda" else 0.0
                dec, pre, peak, etoks = measure(model, prompt, prefill_ids, args.reps, args.new)
                gc.collect()
                row.update(decode=dec, prefill_ms=pre, peak_gb=peak,
                           resident_gb=torch.cuda.memory_allocated() / 1e9 if DEV == "cuda" else 0.0)
                print(f"{name}: decode {dec:.1f} tok/s, prefill {pre:.1f} ms, weights {row['weight_gb']:.2f} GB, "
                      f"peak {peak:.2f} GB", flush=True)
                if args.prefill_chunks and name.startswith("lowbit") and DEV == "cuda":
                    try:
                        row["prefill_chunks"] = prefill_chunks(model, prefill_ids, args.reps,
                                                               tuple(args.prefill_chunks.split(",")))
                        print(f"{name} prefill by LOWBIT_DENSE_CHUNK_MB: {row['prefill_chunks']}", flush=True)
                    except Exception as e:  # noqa: BLE001 - recorded in the table
                        row["prefill_chunks_error"] = f"{type(e).__name__}: {e}"[:200]
                        traceback.print_exc()
                if name in graph and time.perf_counter() - t_start <= args.time_budget:
                    try:
                        gdec, gpeak, gtoks = measure_graph(model, prompt, args.reps, args.new)
                        row.update(decode_graph=gdec, peak_graph_gb=gpeak, graph_agree=_agree(etoks, gtoks),
                                   graph_tokens=len(gtoks))
                        print(f"{name} graph: decode {gdec:.1f} tok/s, peak {gpeak:.2f} GB, tokens equal to eager "
                              f"{row['graph_agree']}/{len(gtoks)}", flush=True)
                    except Exception as e:  # noqa: BLE001 - recorded in the table
                        row["graph_error"] = (f"graph: {type(e).__name__}: "
                                              f"{str(e).splitlines()[0][:200] if str(e) else ''}")
                        traceback.print_exc()
                if name in breakdown and DEV == "cuda":
                    try:
                        row["prefill_parts"] = prefill_parts(model, 512)
                        print(f"{name} prefill parts: {row['prefill_parts']}", flush=True)
                    except Exception as e:  # noqa: BLE001
                        row["prefill_parts_error"] = f"{type(e).__name__}: {e}"[:200]
                        traceback.print_exc()
                del model
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            rows.append(row)
            write(rows, info, out)
        # compiled generate (static cache + torch.compile reduce-overhead = CUDA graphs) after the eager table
        for name in [n for n in names if n in compiled]:
            row = next(r for r in rows if r["variant"] == name)
            if "decode" not in row:
                continue
            if time.perf_counter() - t_start > args.time_budget:
                row["compiled_error"] = "skipped: time budget of this run"
                continue
            try:
                model = build(name, master, Path(tmp) / ("c_" + name.replace(" ", "_")))
                with torch.no_grad():  # one eager step: kernel layouts are prepared before tracing
                    model(prompt[:, :8])
                torch._dynamo.reset()
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
                cdec, _, cpeak = measure(model, prompt, prefill_ids, args.reps, args.new, static=True)
                row.update(decode_compiled=cdec, peak_compiled_gb=cpeak)
                print(f"{name} compiled: decode {cdec:.1f} tok/s", flush=True)
                del model
            except Exception as e:  # noqa: BLE001 - recorded in the table
                row["compiled_error"] = f"compiled: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                traceback.print_exc()
            gc.collect()
            torch.cuda.empty_cache()
            torch._dynamo.reset()
            write(rows, info, out)
    write(rows, info, out)
    return 0


def _gb(v) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else "—"


def write(rows, info, out: Path) -> None:
    base = next((r for r in rows if r["variant"] == "bf16" and "decode" in r), None)
    lines = [
        "# `generate` on a Llama-3-8B-shaped model: bf16 vs lowbit vs peers (GPU)",
        "",
        "Written by `bench/user_decode.py` (numbers from the run, never edited).",
        "",
        f"GPU: {info['gpu']}; torch {info['torch']}; transformers {info.get('transformers', '?')}; "
        f"{info['layers']} decoder layers of the Llama-3-8B shape (hidden 4096, intermediate 14336, GQA 32/8, "
        "vocab 128256), random bf16 weights, `lm_head` kept bf16 in every variant. Batch 1, 64 new tokens after a "
        "128-token prompt, greedy; decode tok/s excludes the prefill; prefill = one forward of 1 x 512. Medians. "
        "'CUDA graph' = the same model decoding greedily from a transformers `StaticCache`, one decode step (model "
        "+ argmax) captured in a `torch.cuda.CUDAGraph` and replayed once per token (prompt prefilled eagerly); "
        "'tokens = eager' = how many of its 65 tokens equal eager `generate`'s (dynamic cache) before the first "
        "difference.",
        "",
        f"Command: `{info['command']}`",
        "",
    ]
    if info.get("peers"):
        lines += [f"Peers: {info['peers']}", ""]
    if info.get("mm_configs"):
        lines += [f"Kernel configs: {info['mm_configs']}", ""]
    lines += [
        "| variant | decode tok/s (eager) | × bf16 | decode tok/s (CUDA graph) | × bf16 graph | tokens = eager | "
        "decode tok/s (compiled) | × bf16 compiled | prefill 512 ms | × bf16 prefill | weights GB | tensor GB | "
        "resident GB after generate | peak GB (eager) | peak GB (graph) | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(r, key):
        return f"{r[key] / base[key]:.2f}" if base and key in r and base.get(key) else "—"

    for r in rows:
        if "decode" not in r:
            lines.append(f"| {r['variant']} | — | — | — | — | — | — | — | — | — | — | — | — | — | — | "
                         f"{r.get('error', '')} |")
            continue
        g = f"{r['decode_graph']:.1f}" if "decode_graph" in r else "—"
        agree = f"{r['graph_agree']}/{r['graph_tokens']}" if "graph_agree" in r else "—"
        c = f"{r['decode_compiled']:.1f}" if "decode_compiled" in r else "—"
        pre = f"{r['prefill_ms']:.1f}" if r.get("prefill_ms") else "—"
        pg = f"{r['peak_graph_gb']:.2f}" if "peak_graph_gb" in r else "—"
        note = " ".join(x for x in (r.get("graph_error", ""), r.get("compiled_error", "")) if x)
        lines.append(f"| {r['variant']} | {r['decode']:.1f} | {ratio(r, 'decode')} | {g} | {ratio(r, 'decode_graph')} | "
                     f"{agree} | {c} | {ratio(r, 'decode_compiled')} | {pre} | {ratio(r, 'prefill_ms')} | "
                     f"{r['weight_gb']:.2f} | {_gb(r.get('tensor_gb'))} | {_gb(r.get('resident_gb'))} | "
                     f"{r['peak_gb']:.2f} | {pg} | {note} |")
    ch = [r for r in rows if r.get("prefill_chunks")]
    if ch:
        vals = list(ch[0]["prefill_chunks"])
        bpre = base.get("prefill_ms") if base else None
        lines += ["", "## Prefill 1 x 512 by `LOWBIT_DENSE_CHUNK_MB` (dequantize + cuBLAS in row blocks of at most "
                  "that many MiB of bf16 weight; 0 = whole weights), same process, medians", "",
                  "Transient = peak during the forward minus the memory allocated before it.", "",
                  "| variant | " + " | ".join(f"ms ({v}) | × bf16 ({v}) | peak GB ({v}) | transient GB ({v})"
                                              for v in vals) + " |",
                  "|---|" + "---|---|---|---|" * len(vals)]
        for r in ch:
            cells = []
            for v in vals:
                d = r["prefill_chunks"].get(v, {})
                cells.append(f"{d.get('ms', 0):.1f} | {(d.get('ms', 0) / bpre) if bpre else 0:.2f} | "
                             f"{d.get('peak_gb', 0):.2f} | {d.get('transient_gb', 0):.3f}")
            lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    parts = [r for r in rows if r.get("prefill_parts")]
    if parts:
        lines += ["", "## Prefill 512: where the linear time goes (decoder layer 0, one call per projection, "
                  "CUDA events, median of 10, ms)", "",
                  "`module` = the quantized module's forward on a 512-row bf16 input; `dequant` = the weight "
                  "dequantized to bf16 by lowbit's Triton pass (GB/s: codes + scales read, bf16 written); "
                  "`cuBLAS` = `F.linear` on that dequantized weight; `bf16` = `F.linear` on a bf16 weight of "
                  "the same shape. Last two columns: wall-clock µs per call of 300 back-to-back eager calls at M = 1 "
                  "(one sync at the end), the quantized module against a bf16 `nn.Linear` of the same shape: the "
                  "host's cost per call where it exceeds the kernel's (eager decode is host-bound).", "",
                  "| variant | proj | N x K | module | dequant | dequant GB/s | cuBLAS | bf16 | module × bf16 | "
                  "M=1 eager µs/call: module | bf16 nn.Linear |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in parts:
            for proj, d in r["prefill_parts"].items():
                dq = f"{d['dequant']:.4f}" if "dequant" in d else "—"
                gb = f"{d['dequant_GBps']:.0f}" if "dequant_GBps" in d else "—"
                cb = f"{d['cublas_on_dequant']:.4f}" if "cublas_on_dequant" in d else "—"
                lines.append(f"| {r['variant']} | {proj} | {d['NxK']} | {d['module']:.4f} | {dq} | {gb} | {cb} | "
                             f"{d['bf16_linear']:.4f} | {d['module'] / d['bf16_linear']:.2f} | "
                             f"{d.get('m1_module_us', 0):.1f} | {d.get('m1_nnlinear_us', 0):.1f} |")
    if info.get("notes"):
        lines += ["", "Notes (added when rendering the report, `--note`):", ""] + [f"- {n}" for n in info["notes"]]
    (out / "user_decode.md").write_text("\n".join(lines) + "\n")
    (out / "user_decode.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ok = [r for r in rows if "decode" in r]
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(ok) + 1.5))
        import numpy as np

        y = np.arange(len(ok))
        gr = [r.get("decode_graph", 0) for r in ok]
        h = 0.4 if any(gr) else 0.8
        ax.cla()
        ax.barh(y - (h / 2 if any(gr) else 0), [r["decode"] for r in ok], height=h, label="eager generate")
        if any(gr):
            ax.barh(y + h / 2, gr, height=h, label="static cache + CUDA graph")
        ax.set_yticks(y, [r["variant"] for r in ok])
        ax.set_xlabel("decode tokens/s (batch 1)")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "user_decode.png", dpi=100)
    except Exception:  # noqa: BLE001 - plotting is optional
        pass


if __name__ == "__main__":
    sys.exit(main())
