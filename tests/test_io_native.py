"""Native checkpoints: bit-exact round trips (HF and non-HF models, every lowbit module type, tied
weights, bf16, shards), atomicity (an interrupted save never loads), and clear errors for truncated,
corrupted or inconsistent checkpoints."""
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.io import _files, native  # noqa: E402
from lowbit.io._files import CheckpointError  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import QLinear  # noqa: E402


def _quantized_llama(tied=True, weights="qint4", **kw):
    m = tiny_llama(vocab_size=128, hidden=64, layers=2, tie_word_embeddings=tied)
    lowbit.quantize(m, weights=weights, exclude=["lm_head"], **kw)
    lowbit.freeze(m)
    return m


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def _logits(m):
    with torch.no_grad():
        return m(_ids()).logits


def test_round_trip_bit_exact_tied(tmp_path):
    m = _quantized_llama(tied=True)
    ref = _logits(m)
    lowbit.save(m, tmp_path / "ck")
    m2 = lowbit.load(tmp_path / "ck")
    assert torch.equal(_logits(m2), ref)
    q1 = m.model.layers[0].mlp.down_proj
    q2 = m2.model.layers[0].mlp.down_proj
    assert isinstance(q2, QLinear) and q2.frozen
    for k, v in q1.qstate.state_dict().items():
        assert torch.equal(v, q2.qstate.state_dict()[k]), k
    assert m2.lm_head.weight is m2.model.embed_tokens.weight  # tied again, stored once
    idx = json.loads((tmp_path / "ck" / native.INDEX).read_text())
    assert idx["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    # nothing but JSON and safetensors in the directory (no pickle)
    assert {p.suffix for p in (tmp_path / "ck").iterdir()} == {".json", ".safetensors"}
    assert native.is_checkpoint(tmp_path / "ck")


def test_round_trip_module_zoo_and_activations(tmp_path):
    from lowbit.nn import Linear4bit

    m = tiny_llama(vocab_size=128, hidden=64, layers=2, tie_word_embeddings=False)
    lowbit.quantize(m, weights="qint8", activations="qint8", include=["*.self_attn.*"])
    with lowbit.Calibration():
        m(_ids())
    lowbit.quantize(m, weights="qfloat8", include=["*.mlp.up_proj"])
    lowbit.quantize(m, method="bnb-nf4", include=["*.mlp.down_proj"], double_quant=True)
    lowbit.quantize(m, weights="qint4", group_size=32, include=["*.mlp.gate_proj"])
    lowbit.freeze(m)
    assert isinstance(m.model.layers[1].mlp.down_proj, Linear4bit)
    ref = _logits(m)
    lowbit.save(m, tmp_path / "zoo")
    m2 = lowbit.load(tmp_path / "zoo")
    assert isinstance(m2.model.layers[1].mlp.down_proj, Linear4bit)
    assert float(m2.model.layers[0].self_attn.q_proj.input_scale) > 0
    assert torch.equal(_logits(m2), ref)


def test_unfrozen_fake_quant_round_trip(tmp_path):
    m = tiny_llama(vocab_size=128, hidden=64, layers=1)
    lowbit.quantize(m, weights="qint4")
    ref = _logits(m)
    lowbit.save(m, tmp_path / "u")
    assert torch.equal(_logits(lowbit.load(tmp_path / "u")), ref)


def test_bf16_model_keeps_buffers(tmp_path):
    m = _quantized_llama(tied=False).to(torch.bfloat16)
    ref = _logits(m)
    native.save(m, tmp_path / "b")
    m2 = native.load(tmp_path / "b")
    assert m2.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(m2), ref)


def test_shards(tmp_path):
    m = _quantized_llama(tied=False)
    ref = _logits(m)
    native.save(m, tmp_path / "s", max_shard_size=20_000)
    shards = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"lowbit_model-00001-of-{len(shards):05d}.safetensors"
    assert torch.equal(_logits(native.load(tmp_path / "s")), ref)
    # re-saving unsharded into the same directory removes the stale shards
    native.save(m, tmp_path / "s")
    assert [p.name for p in (tmp_path / "s").glob("*.safetensors")] == ["lowbit_model.safetensors"]
    assert torch.equal(_logits(native.load(tmp_path / "s")), ref)


class Net(nn.Module):
    def __init__(self, width=64, classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_non_hf_model_with_factory(tmp_path):
    torch.manual_seed(0)
    net = Net(width=48)
    lowbit.quantize(net, weights="qint8", include=["conv", "fc1"])
    lowbit.freeze(net)
    x = torch.randn(2, 3, 8, 8)
    ref = net(x)
    native.save(net, tmp_path / "n", config={"width": 48})
    with pytest.raises(CheckpointError, match="model_factory"):
        native.load(tmp_path / "n")
    net2 = native.load(tmp_path / "n", model_factory=lambda cfg: Net(**cfg))
    assert torch.equal(net2(x), ref)
    with pytest.raises(CheckpointError, match="fc1"):  # a factory building another architecture
        native.load(tmp_path / "n", model_factory=lambda cfg: Net(width=32))


def test_interrupted_save_never_loads(tmp_path, monkeypatch):
    m = _quantized_llama()
    d = tmp_path / "i"
    native.save(m, d)  # a valid checkpoint already there
    calls = {"n": 0}
    real = _files.write_safetensors

    def failing(path, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash")
        return real(path, tensors, metadata)

    monkeypatch.setattr(_files, "write_safetensors", failing)
    with pytest.raises(KeyboardInterrupt):
        native.save(m, d, max_shard_size=20_000)
    monkeypatch.undo()
    # the overwrite is atomic: the previous checkpoint is intact and loads; no temporary files left
    assert native.is_checkpoint(d)
    assert torch.equal(_logits(native.load(d)), _logits(m))
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]
    assert [p.name for p in d.parent.iterdir()] == ["i"]
    # an interrupted fresh save leaves nothing that loads
    with monkeypatch.context() as mp:
        calls["n"] = 0
        mp.setattr(_files, "write_safetensors", failing)
        with pytest.raises(KeyboardInterrupt):
            native.save(m, tmp_path / "fresh", max_shard_size=20_000)
    assert not (tmp_path / "fresh").exists()
    with pytest.raises(CheckpointError, match="not a directory"):
        native.load(tmp_path / "fresh")


def test_truncated_and_corrupted_files(tmp_path):
    m = _quantized_llama()
    d = tmp_path / "c"
    native.save(m, d)
    shard = d / "lowbit_model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="lowbit_model.safetensors: .* bytes, expected .*truncated"):
        native.load(d)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        native.load(d)
    # without hashing, a broken header is still a clear error, not a crash
    broken = bytearray(data)
    broken[0:8] = (10 ** 12).to_bytes(8, "little")
    shard.write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        native.load(d, verify=False)


def _rewrite_index(d, fn):
    idx = json.loads((d / native.INDEX).read_text())
    idx.pop("index_sha256", None)  # as in checkpoints written before the index carried its own digest
    fn(idx)
    (d / native.INDEX).write_text(json.dumps(idx))


def test_index_and_map_validation_names_the_culprit(tmp_path):
    m = _quantized_llama()
    d = tmp_path / "v"
    native.save(m, d)
    name = "model.layers.0.mlp.up_proj.weight.scales"

    def wrong_dtype(idx):
        idx["tensors"][name]["dtype"] = "float16"

    _rewrite_index(d, wrong_dtype)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is float32 .* the index says float16"):
        native.load(d)

    native.save(m, d)
    qmap_path = d / native.QMAP
    q = json.loads(qmap_path.read_text())
    q["quantization_map"]["model.layers.0.mlp.nonexistent"] = q["quantization_map"]["model.layers.0.mlp.up_proj"]
    qmap_path.write_text(json.dumps(q))

    def fix_hash(idx):
        idx["files"][native.QMAP] = {"size": qmap_path.stat().st_size, "sha256": _files.sha256_file(qmap_path)}

    _rewrite_index(d, fix_hash)
    with pytest.raises(CheckpointError, match="module 'model.layers.0.mlp.nonexistent' is not in the model"):
        native.load(d)


def test_quant_state_shape_mismatch_is_named(tmp_path):
    m = _quantized_llama()
    d = tmp_path / "w"
    native.save(m, d)
    # swap in the config of a wider model: up_proj's stored state no longer fits
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = cfg["intermediate_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))

    def fix_hash(idx):
        p = d / "config.json"
        idx["files"]["config.json"] = {"size": p.stat().st_size, "sha256": _files.sha256_file(p)}

    _rewrite_index(d, fix_hash)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.(gate|up|down)_proj.weight' has shape"):
        native.load(d)


def test_missing_directory_and_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        native.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert not native.is_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="missing"):
        native.load(tmp_path / "empty")
