"""``plan``'s GPU memory model for the staged pipeline (``lowbit.model.plan.staged_device_bytes``) against the peak
GPU memory measured on the H200 (bench/results/scale_gpu_run8.json, run9.json and run27.json, the last with the
GPTQ solve graphs: every rank's ``max_memory_allocated``, the largest), and its prediction for the 70B class at 128 x 2048 (issue 18). Run 8 had the
CPU-era device reserve (``legacy_reserve=True``: the activations mostly in pinned host memory), run 9 the reserve
from the modelled working set (the pipeline now). CPU only: the models are built on the meta device from the
shapes of bench/scale_gpu.py (bf16, vocab 128256, tied head as the runs; the 70B-class prediction untied).

Run: PYTHONPATH=$PWD python bench/scale_plan_gpu.py > bench/results/scale_plan_gpu.md
"""
import json, os, sys

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from scale_gpu import SHAPES  # noqa: E402

from lowbit.model.offload import parse_bytes  # noqa: E402
from lowbit.model.plan import plan, predict_streaming_peak, staged_device_bytes  # noqa: E402


def meta_model(shape, layers, tied=True):
    cfg = transformers.LlamaConfig(vocab_size=128256, num_hidden_layers=layers, max_position_embeddings=2048,
                                   tie_word_embeddings=tied, **SHAPES[shape])
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def main():
    print(__doc__.split("\n\n")[0].replace("\n", " "))
    print()
    print("| run | GPUs | layers | max_memory | measured peak GPU (largest rank) | predicted | error | parts (GiB): "
          "blocks, work of the widest stage, activation store on the device (of its demand), capture phase |")
    print("|---|---|---|---|---|---|---|---|")
    for run in ("scale_gpu_run8.json", "scale_gpu_run9.json", "scale_gpu_run27.json"):
        path = os.path.join(HERE, "results", run)
        if not os.path.exists(path):
            continue
        # runs 8 and 9 predate the GPTQ solve graphs (session 11, run 24 on): their persistent copies not counted
        os.environ["LOWBIT_GPTQ_GRAPH"] = "auto" if run.endswith("run27.json") else "0"
        for name, r in json.load(open(path))["gpu"].items():
            if not r.get("ranks") or name.endswith("_rep"):
                continue
            spec = r["spec"]
            m = meta_model(spec["shape"], spec["layers"])
            mm = spec["kwargs"].get("max_memory")
            p = staged_device_bytes(m, 128, 2048, 8, parse_bytes(mm), world=spec["nproc"], method=spec["method"],
                                    legacy_reserve=run.endswith("run8.json"))
            meas = max(x["peak_gpu_mb"] for x in r["ranks"])
            pred = p["total"] / 2 ** 20
            g = 2 ** 30
            print(f"| {name} ({run}) | {spec['nproc']} | {spec['layers']} | {mm} | {meas:,.0f} MiB | {pred:,.0f} MiB | "
                  f"{(pred - meas) / meas * 100:+.0f}% | {p['blocks'] / g:.1f}, {p['work'] / g:.1f}, "
                  f"{p['store'] / g:.1f} ({p['store_demand'] / g:.1f}), {p['capture'] / g:.1f} |")
    os.environ.pop("LOWBIT_GPTQ_GRAPH", None)
    print()
    print("70B class (hidden 8192, MLP 28,672, 80 layers, bf16, untied head), GPTQ, 128 x 2048, streaming, one GPU "
          "(`plan(..., device='cuda', max_memory=...)` and `predict_streaming_peak(..., device='cuda')`):")
    print()
    print("| max_memory | plan: peak GPU (model loaded; streamed: one block less) | plan: GPU time, 80 layers (H200 constants) | plan: host RSS, streamed |")
    print("|---|---|---|---|")
    m = meta_model("70b", 80, tied=False)
    for mm in ("48GB", "40GB", "32GB", "24GB"):
        pl = plan(m, "gptq", n_samples=128, seq_len=2048, device="cuda", max_memory=mm)
        h = predict_streaming_peak(m, "gptq", 128, 2048, 8, max_memory=mm, device="cuda")
        print(f"| {mm} | {pl['accelerator_mb'] / 1024:,.1f} GiB | {pl['gpu_seconds'] / 60:.1f} min | "
              f"{h['peak_ram_mb'] / 1024:,.1f} GiB "
              f"(outside the blocks {h['outside_mb'] / 1024:.1f}, block {h['block_mb'] / 1024:.1f}, "
              f"host store {h['calibration_mb'] / 1024:.1f}) |")


if __name__ == "__main__":
    main()
