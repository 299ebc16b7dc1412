"""What the CUDA kernel layouts of lowbit's quantized modules allocate beside the saved state (CPU, no GPU needed).

For each variant of ``bench/user_decode.py`` (the same ``build``), a Llama with the Llama-3-8B *proportions* scaled
down (hidden 1024, intermediate 3584, GQA 8/2, 2 layers) is quantized on the CPU; then, per quantized linear, the
layout the CUDA path derives on first use is built on the CPU from the same state (``_prepare_cuda`` /
``int8_codes``, exactly the functions the CUDA path calls: what they allocate there they allocate here) and
its tensors are split into storages shared with the state (views: no bytes) and new storages (a derived copy on
the GPU). Bytes per weight are then projected to the 8 layers of the Llama-3-8B shape of ``user_decode.md``
(1,744,830,464 linear weights).

    python bench/derived_memory.py [--out bench/results/derived_memory.md]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WEIGHTS_8L = 8 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)


def _tensors(obj, seen=None):
    """Every tensor reachable from a prepared layout (dataclass fields, tuples, the 4-bit sub-layout)."""
    if seen is None:
        seen = set()
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return [obj]
    out = []
    if isinstance(obj, (tuple, list)):
        for o in obj:
            out += _tensors(o, seen)
    elif dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            if f.name in ("plans", "launch_cache", "configs"):
                continue
            out += _tensors(getattr(obj, f.name), seen)
    return out


def _storages(ts):
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts if t is not None}


def _state_tensors(st):
    ts = [st.__dict__["data"], st.scales, st.zeros]
    if st.nested is not None:
        ts += [st.nested.data, st.nested.scales]
    return ts


def account(model, resident: bool):
    """(weights, bytes of the states as saved, bytes held on the GPU once prepared, {new tensor kind: bytes})."""
    from lowbit.kernels import api
    from lowbit.kernels import linear as L
    from lowbit.nn.base import quantized_modules

    saved = held = weights = 0
    parts = {}
    for _, m in quantized_modules(model):
        st = m.qstate
        if st is None:
            continue
        weights += st.numel
        own = _storages(_state_tensors(st))
        saved += sum(own.values())
        act = m._kernel_act() if hasattr(m, "_kernel_act") else None
        if act == "int8":
            prep = L._cuda_int8_weights(st)
        elif act == "fp8":
            prep = api.prepare_fp8(st)
        else:
            prep = L._prepare_cuda(st)
            if st.layout == "gguf" and prep is not None and resident:  # what prepare_linear does on CUDA
                L._store(st, "linear", prep)
                L._make_resident(st, prep)
        now = _storages(_state_tensors(st) + _tensors(prep))
        held += sum(now.values())
        for t in _tensors(prep):
            k = t.untyped_storage().data_ptr()
            if k not in own and k in now:
                name = f"{t.dtype} {'x'.join(map(str, t.shape[1:])) or 'vec'}".replace("torch.", "")
                parts[name] = parts.get(name, 0) + now.pop(k)
    return weights, saved, held, parts


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "derived_memory.md"))
    ap.add_argument("--only", default="nf4,int4,gptq,gguf,int8,int8dyn,fp8")
    args = ap.parse_args(argv)
    import bench.user_decode as ud

    torch.set_num_threads(1)
    ud.DEV = "cpu"
    ud.SHAPE.update(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
                    vocab_size=1000)
    master = ud.master_model(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for short in args.only.split(","):
            name = ud.SHORT[short]
            for resident in ((False, True) if short == "gguf" else (True,)):
                model = ud.build(name, master, Path(tmp) / short)
                w, s, h, parts = account(model, resident)
                label = name + ("" if short != "gguf" else " (layout replaces the blocks)" if resident
                                else " (LOWBIT_GGUF_RESIDENT=0: blocks + layout, as before)")
                rows.append((label, w, s, h, parts))
                print(label, w, s, h, parts, flush=True)
    lines = ["# Derived CUDA layouts beside the saved state, per variant (CPU accounting)", "",
             "Written by `python bench/derived_memory.py` (numbers from the run, never edited). Each variant of "
             "`bench/user_decode.py` built on the CPU at the Llama-3-8B proportions scaled down (hidden 1024, "
             "intermediate 3584, GQA 8/2, 2 layers); per quantized linear, the layout the CUDA path derives on first "
             "use is built from the same state by the same functions (GGUF: and made to replace the blocks, as "
             "`prepare_linear` does on CUDA), and the distinct storages the GPU then holds are counted: the state's "
             "own tensors plus the layout's new ones. GB = bytes per weight x the 1,744,830,464 linear weights of "
             "the 8-layer Llama-3-8B model of `user_decode.md`.", "",
             "| variant | saved state B/weight | held on the GPU B/weight | extra B/weight | saved GB (8 layers) | "
             "held GB (8 layers) | extra GB (8 layers) | new tensors of the layout (dtype, trailing shape: bytes "
             "over this model) |", "|---|---|---|---|---|---|---|---|"]
    for name, w, s, h, parts in rows:
        desc = "; ".join(f"{k}: {v}" for k, v in parts.items()) or "none (views of the state)"
        g = WEIGHTS_8L / w / 1e9
        lines.append(f"| {name} | {s / w:.4f} | {h / w:.4f} | {(h - s) / w:+.4f} | {s * g:.3f} | {h * g:.3f} | "
                     f"{(h - s) * g:+.3f} | {desc} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
