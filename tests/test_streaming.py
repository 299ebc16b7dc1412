"""Streaming quantization from safetensors shards: same result as the whole-model run, one block in memory."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.test_sequential import _ids, _tiny_llama  # noqa: E402

import lowbit  # noqa: E402
from lowbit.io.native import save  # noqa: E402
from lowbit.io.stream import NativeStreamWriter  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402
from lowbit.model.streaming import ShardReader, quantize_streaming  # noqa: E402


def _sharded(tmp_path, n_layers=3):
    model = _tiny_llama()
    if n_layers != 2:
        cfg = model.config
        cfg.num_hidden_layers = n_layers
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(cfg).eval()
    src = tmp_path / "src"
    model.save_pretrained(src, max_shard_size="40KB", safe_serialization=True)
    assert (src / "model.safetensors.index.json").is_file()
    return model, src


@pytest.mark.parametrize("method,kw", [("gptq", dict(micro_batch=3)), ("awq", dict(micro_batch=2, max_memory=0)),
                                       ("rtn", {})])
def test_streamed_equals_whole_model_run(tmp_path, method, kw):
    model, src = _sharded(tmp_path)
    ids = _ids(6, 16)
    calib = dict(calib_dataset=ids) if method != "rtn" else {}
    ref = quantize_model_ptq(model, method=method, bits=4, group_size=32, sym=False, progress=False,
                             **({"pipeline": "staged"} if method != "rtn" else {}), **calib, **kw)
    save(ref, tmp_path / "ref")
    with NativeStreamWriter(tmp_path / "out") as sink:
        summary = quantize_streaming(str(src), sink, method=method, bits=4, group_size=32, sym=False,
                                     progress=False, **calib, **kw)
    a, b = lowbit.load(tmp_path / "ref"), lowbit.load(tmp_path / "out")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]
    assert summary["n_layers"] == ref.ptq_summary["n_layers"] == 21
    assert summary["bits_per_weight"] == ref.ptq_summary["bits_per_weight"]
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    # one block at a time: the largest block read is one block's bytes, every tensor read once
    reader = ShardReader(str(src))
    one_block = sum(reader.nbytes(n) for n in reader.names() if n.startswith("model.layers.0."))
    assert summary["max_block_bytes"] == one_block > 0
    assert summary["streamed_bytes"] == sum(reader.nbytes(n) for n in reader.names())
    assert summary["peak_rss_bytes"] > 0


def test_bad_shards_are_named(tmp_path):
    _, src = _sharded(tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=shard.name):
        ShardReader(str(src))
    with pytest.raises(ValueError, match="model.safetensors"):
        ShardReader(str(tmp_path))
