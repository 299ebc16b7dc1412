"""GPTQ on a Llama-7B-shaped decoder block on CUDA (issue 10's GPU timing).

One LlamaDecoderLayer of hidden 4096 / intermediate 11008 / 32 heads with random weights,
calibrated on 128 x 2048 random tokens (through a random embedding), quantized with lowbit's
sequential pipeline (int4, group 128, the GPTQ defaults). Also times the algorithm alone on each
of the block's seven linears from their Hessians. Writes ``bench/results/gptq_gpu.md``.

Run on a CUDA machine: ``python bench/gptq_gpu.py [--out DIR]``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gptq_gpu.py needs a CUDA device")
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit
    from lowbit.algorithms.gptq import gptq_quantize

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    model = LlamaForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, cfg.vocab_size, (args.n_samples, args.seq_len))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lowbit.quantize(model, method="gptq", bits=4, group_size=128, calib_dataset=ids, n_samples=args.n_samples,
                    seq_len=args.seq_len, device="cuda", progress=False)
    torch.cuda.synchronize()
    pipeline_s = time.perf_counter() - t0
    peak_gb = torch.cuda.max_memory_allocated() / 2 ** 30

    rows = []
    for name, (o, i) in {"q/k/v/o_proj": (4096, 4096), "gate/up_proj": (11008, 4096), "down_proj": (4096, 11008)}.items():
        X = torch.randn(8192, i, device="cuda")
        H = X.T @ X / X.shape[0]
        W = torch.randn(o, i, device="cuda") * 0.02
        gptq_quantize(W, H, bits=4, group_size=128)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gptq_quantize(W, H, bits=4, group_size=128)
        torch.cuda.synchronize()
        rows.append((name, o, i, time.perf_counter() - t0))
    lines = [
        "# GPTQ on a Llama-7B-shaped decoder block (CUDA)", "",
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; produced by `python bench/gptq_gpu.py`.", "",
        "| what | time (s) |", "|---|---|",
        f"| whole block through the sequential pipeline: {args.n_samples} x {args.seq_len} calibration tokens "
        f"(statistics, 7 x GPTQ int4 g128, quantized forward) | {pipeline_s:.1f} |",
    ]
    for name, o, i, s in rows:
        lines.append(f"| GPTQ algorithm alone, one {name} layer [{o} x {i}] | {s:.2f} |")
    lines += ["", f"Peak CUDA memory of the pipeline run: {peak_gb:.1f} GiB."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
