"""Streaming quantization from a GGUF file: each block's tensors dequantized from the file when its turn comes;
the result equals the whole-model run on the model loaded (dequantized) whole."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
gguf = pytest.importorskip("gguf")

from lowbit.io import gguf as io  # noqa: E402
from lowbit.io.native import save  # noqa: E402
from lowbit.io.stream import NativeStreamWriter  # noqa: E402
from lowbit.model.loading import tiny_llama, tiny_tokenizer  # noqa: E402
from lowbit.model.sequential import quantize_model_ptq  # noqa: E402
from lowbit.io.gguf_stream import GGUFReader, quantize_gguf_streaming  # noqa: E402
from lowbit.model.streaming import quantize_streaming  # noqa: E402
from tests.test_streaming import _assert_same_checkpoints  # noqa: E402


def load_whole(path):
    """The model loaded whole by transformers' GGUF loader (what ``lowbit.model.loading.load_gguf`` converts)."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = tiny_llama(hidden=64, layers=3, heads=4, kv_heads=2, intermediate=96)
    with torch.no_grad():  # non-trivial norms, as in trained models
        for blk in model.model.layers:
            blk.input_layernorm.weight.uniform_(0.5, 2.0)
            blk.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return io.export_gguf(model, d / "tiny.gguf", "Q8_0", tokenizer=tiny_tokenizer())


@pytest.mark.parametrize("rows", [1024, 7])
def test_gguf_reader_matches_the_whole_model_conversion(tiny_gguf, rows, monkeypatch):
    """Every tensor as transformers' GGUF loader dequantizes it (q/k rows unpermuted), bit for bit, read in row
    chunks of any size."""
    from lowbit.io import gguf_stream

    monkeypatch.setattr(gguf_stream, "ROWS_PER_CHUNK", rows)
    whole = load_whole(tiny_gguf)
    reader = GGUFReader(str(tiny_gguf))
    sd = whole.state_dict()
    names = reader.names()
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.2.mlp.down_proj.weight" in names
    for n in names:
        assert torch.equal(reader.get(n), sd[n]), n
    assert reader.bytes_read == sum(reader.file_bytes(n) for n in names)
    with pytest.raises(KeyError, match="no tensor"):
        reader.get("model.layers.9.mlp.up_proj.weight")


@pytest.mark.parametrize("method,kw", [("gptq", dict(micro_batch=3)), ("rtn", {})])
def test_gguf_streamed_equals_whole_model_run(tmp_path, tiny_gguf, method, kw):
    ids = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(1))
    calib = dict(calib_dataset=ids) if method != "rtn" else {}
    whole = load_whole(tiny_gguf)
    ref = quantize_model_ptq(whole, method=method, bits=4, group_size=32, sym=False, progress=False,
                             **({"pipeline": "staged"} if method != "rtn" else {}), **calib, **kw)
    save(ref, tmp_path / "ref")
    with NativeStreamWriter(tmp_path / "out") as sink:
        summary = quantize_gguf_streaming(tiny_gguf, sink, method=method, bits=4, group_size=32, sym=False,
                                     progress=False, **calib, **kw)
    _assert_same_checkpoints(tmp_path / "ref", tmp_path / "out", ids)
    assert summary["n_layers"] == ref.ptq_summary["n_layers"] == 21
    reader = GGUFReader(str(tiny_gguf))  # one block at a time, every tensor read once
    assert summary["max_block_bytes"] == sum(reader.nbytes(n) for n in reader.names()
                                             if n.startswith("model.layers.0."))
    assert summary["streamed_bytes"] == sum(reader.file_bytes(n) for n in reader.names())


def test_gguf_stream_errors_name_the_file(tmp_path, tiny_gguf):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 12)
    with pytest.raises(Exception, match="x.gguf"):
        GGUFReader(str(bad))
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a .gguf"):
        quantize_streaming(str(other), None, method="rtn", progress=False)
    with pytest.raises(ValueError, match="GGUFReader"):  # a GGUF path goes through its reader
        quantize_streaming(str(tiny_gguf), None, method="rtn", progress=False)
    with pytest.raises(TypeError, match="reader"):
        quantize_streaming(object(), None, method="rtn", progress=False)
