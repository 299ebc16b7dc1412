"""llm-compressor's GPTQ on SmolLM2-135M, under issue 10's protocol, for the peer rows of ``bench/ptq.py``.

Runs in an environment that has ``llmcompressor`` and ``datasets`` beside the pinned CPU torch (it is an
optional peer, not a lowbit dependency)::

    python -m venv /tmp/lc && /tmp/lc/bin/pip install torch==2.13.0 && \\
        /tmp/lc/bin/pip install -c <(echo torch==2.13.0) llmcompressor datasets
    PYTHONPATH=. /tmp/lc/bin/python bench/llmc_peer.py --model-dir DIR --group 64 --sym --out peer.json

``DIR`` is a plain Hugging Face folder of the float model (llm-compressor reloads by path; lowbit's
converted copy in ``~/.cache/lowbit/gguf-plain/...`` is one). Calibration: the same 128 x 512 token
windows of WikiText-2 ``valid.txt`` that lowbit uses (``lowbit.data.calibration``, seed 0); perplexity:
``lowbit.eval.perplexity`` on the first 48 windows of 512 tokens of ``test.txt``. The JSON holds the
wall time of ``oneshot`` (calibration + GPTQ + propagation) and the perplexity; ``bench/ptq.py
--peer-json`` merges it into the peer table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import llmcompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.data.calibration import get_calibration_data
    from lowbit.eval.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    ids = get_calibration_data(tok, str(Path(args.data) / "valid.txt"), n_samples=args.n_samples, seq_len=512,
                               seed=0)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=args.sym, strategy="group", group_size=args.group))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=args.n_samples, max_seq_length=512,
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        r = perplexity(model, tok, text=str(Path(args.data) / "test.txt"), seq_len=512, max_windows=args.windows,
                       progress=False)
    label = f"llm-compressor GPTQ int4 g{args.group} {'sym' if args.sym else 'asym'}"
    row = {"label": label, "ppl": r.ppl, "time_s": seconds, "how": f"llmcompressor {llmcompressor.__version__} "
           f"oneshot(GPTQModifier, W4 group {args.group}, {'symmetric' if args.sym else 'asymmetric'}), 2-core CPU",
           "device": "cpu"}
    Path(args.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
