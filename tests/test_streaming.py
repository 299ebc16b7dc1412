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


def _assert_same_checkpoints(ref_dir, out_dir, ids):
    """The two saved checkpoints load to the same tensors and the same logits on ``ids``."""
    a, b = lowbit.load(ref_dir), lowbit.load(out_dir)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


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
    _assert_same_checkpoints(tmp_path / "ref", tmp_path / "out", ids)
    assert summary["n_layers"] == ref.ptq_summary["n_layers"] == 21
    assert summary["bits_per_weight"] == ref.ptq_summary["bits_per_weight"]
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


def test_one_block_materialised_at_a_time_and_peak_loosely_bounded(tmp_path, monkeypatch):
    from lowbit.model import streaming
    from lowbit.model.offload import current_rss

    _, src = _sharded(tmp_path, n_layers=4)
    seen, linears = [], []
    orig = streaming.BlockStream.load_block

    def load_block(self, i, block, prefix):
        blocks = self.model.model.layers
        real = [j for j, b in enumerate(blocks) if any(p.device.type != "meta" for p in b.parameters())]
        seen.append(real)
        out = orig(self, i, block, prefix)
        linears.extend(self.linears)
        return out

    monkeypatch.setattr(streaming.BlockStream, "load_block", load_block)
    rss0 = current_rss()
    with NativeStreamWriter(tmp_path / "out") as sink:
        summary = quantize_streaming(str(src), sink, method="gptq", bits=4, group_size=32, sym=False,
                                     calib_dataset=_ids(4, 16), progress=False, micro_batch=2)
    assert seen == [[], [], [], []]  # when block i is read, no other block holds weights
    assert len(linears) == 28 and all(m.weight.device.type == "meta" for m in linears)  # nothing kept behind
    if summary["peak_rss_reset"]:  # loose: a tiny model adds far less than this to the process
        assert summary["peak_rss_bytes"] <= rss0 + 300 * 2 ** 20


def test_plan_streaming_peak_is_flat_in_layers_and_bounded_by_max_memory():
    from lowbit.model.plan import predict_streaming_peak

    def model(n):
        cfg = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=n,
                                       num_attention_heads=4, num_key_value_heads=2)
        with torch.device("meta"):
            return transformers.LlamaForCausalLM(cfg)

    a = predict_streaming_peak(model(2), "gptq", n_samples=64, seq_len=256)
    b = predict_streaming_peak(model(40), "gptq", n_samples=64, seq_len=256)
    assert a["peak_ram_mb"] == b["peak_ram_mb"]
    big = predict_streaming_peak(model(2), "gptq", n_samples=640, seq_len=256)
    assert big["peak_ram_mb"] > a["peak_ram_mb"]
    capped = [predict_streaming_peak(model(2), "gptq", n_samples=n, seq_len=256, max_memory="600MB")["peak_ram_mb"]
              for n in (64, 640, 6400)]
    assert capped[1] == capped[2] <= 600 + 1
