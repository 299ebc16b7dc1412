"""Where a streamed SmolLM2 run's resident memory goes before calibration: VmRSS after each phase of
``quantize_gguf_streaming``'s set-up (imports; the GGUF header, metadata and transformers config; the skeleton on the
meta device; the embedding dequantized; block 0's tensors dequantized). One JSON line.

Run: PYTHONPATH=$PWD python bench/scale_rss_phases.py >> bench/results/scale_rss_phases.jsonl
"""
import gc, json


def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    return 0


out = {}
import torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

out["imports_mb"] = rss()
from lowbit.io.gguf_stream import GGUFReader  # noqa: E402
from lowbit.model.loading import default_model_path  # noqa: E402
from lowbit.model.streaming import _empty_model  # noqa: E402

d, n = default_model_path()
r = GGUFReader(str(d / n))
gc.collect()
out["gguf_header_config_mb"] = rss()
m = _empty_model(d, None, r.config)
gc.collect()
out["skeleton_on_meta_mb"] = rss()
x = r.get("model.embed_tokens.weight")
out["embedding_read_mb"] = rss()
out["embedding_fp32_mb"] = x.numel() * 4 >> 20
blk = [r.get(k) for k in r.names() if k.startswith("model.layers.0.")]
out["block0_read_mb"] = rss()
print(json.dumps(out))
