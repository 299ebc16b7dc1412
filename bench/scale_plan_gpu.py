"""``plan``'s GPU memory model for the staged pipeline (``lowbit.model.plan.staged_device_bytes``) against the peak
GPU memory measured on the H200 (bench/results/scale_gpu_run*.json, the latest run of each name), and its
prediction for the 70B class at 128 x 2048 (issue 18; helper scale2, no GPU run of its own). CPU only: the models
are built on the meta device from the shapes of bench/scale_gpu.py (bf16, vocab 128256, untied head).

Run: PYTHONPATH=$PWD python bench/scale_plan_gpu.py > bench/results/scale_plan_gpu.md
"""
import glob, json, os, sys

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from scale_gpu import SHAPES  # noqa: E402

from lowbit.model.offload import parse_bytes  # noqa: E402
from lowbit.model.plan import plan, predict_streaming_peak, staged_device_bytes  # noqa: E402

MEASURED = {  # name -> (shape, layers, method, kwargs) as bench/scale_gpu.py ran them
    "gptq_8b_1gpu": ("8b", 4, "gptq", {"max_memory": "16GB"}, 1),
    "gptq_8b_2gpu": ("8b", 4, "gptq", {"max_memory": "16GB"}, 2),
    "gptq_70b_2gpu": ("70b", 2, "gptq", {"max_memory": "40GB"}, 2),
}


def meta_model(shape, layers, tied=True):
    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=2048,
                                   tie_word_embeddings=tied, **SHAPES[shape])
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def latest():
    out = {}
    for path in sorted(glob.glob(os.path.join(HERE, "results", "scale_gpu_run*.json")),
                       key=lambda p: int(p.rsplit("run", 1)[1].split(".")[0])):
        for name, row in json.load(open(path)).get("gpu", {}).items():
            ranks = row.get("ranks") if isinstance(row, dict) else None
            if ranks and "peak_gpu_mb" in ranks[0]:
                out[name] = (os.path.basename(path), ranks[0])
    return out


def main():
    print(__doc__.split("\n\n")[0].replace("\n", " "))
    print()
    print("| run | layers | max_memory | measured peak GPU (rank 0) | predicted | error | parts (GB): outside, block, "
          "statistics, micro-batch work, store |")
    print("|---|---|---|---|---|---|---|")
    runs = latest()
    for name, (shape, layers, method, kw, nproc) in MEASURED.items():
        src, row = runs.get(name, (None, None))
        m = meta_model(shape, layers)
        p = staged_device_bytes(m, 128 // nproc, 2048, 8, parse_bytes(kw.get("max_memory")))  # each rank its share
        meas = row["peak_gpu_mb"] if row else None
        pred = p["total"] / 2 ** 20
        err = f"{(pred - meas) / meas * 100:+.0f}%" if meas else "-"
        parts = ", ".join(f"{p[k] / 2 ** 30:.1f}" for k in ("outside", "block", "statistics", "work", "store"))
        mm = kw.get("max_memory")
        print(f"| {name} ({src}) | {layers} | {mm} | {meas:,.0f} MB | {pred:,.0f} MB | {err} | {parts} |"
              if meas else f"| {name} | {layers} | {kw.get('max_memory')} | - | {pred:,.0f} MB | - | {parts} |")
    print()
    print("70B class (hidden 8192, MLP 28,672, 80 layers, bf16), GPTQ, 128 x 2048, streaming, one GPU:")
    print()
    print("| max_memory | plan: peak GPU | plan: host RSS, streamed (predict_streaming_peak) |")
    print("|---|---|---|")
    m = meta_model("70b", 80, tied=False)
    for mm in ("48GB", "40GB", "32GB", "24GB"):
        g = plan(m, "gptq", n_samples=128, seq_len=2048, device="cuda", max_memory=mm)["accelerator_mb"]
        h = predict_streaming_peak(m, "gptq", 128, 2048, 8, max_memory=mm, device="cuda")
        print(f"| {mm} | {g / 1024:,.1f} GB | {h['peak_ram_mb'] / 1024:,.1f} GB "
              f"(outside the blocks {h['outside_mb'] / 1024:.1f} GB, block {h['block_mb'] / 1024:.1f} GB, "
              f"host store {h['calibration_mb'] / 1024:.1f} GB) |")


if __name__ == "__main__":
    main()
