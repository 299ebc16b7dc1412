"""Extending lowbit from outside the package (issue 16): a toy export format and a toy scheme kind, each added
with one registration line, used end to end (CLI ``--format``, ``write_formats``, detection and loading; the
tensor API, QuantState serialisation, a native checkpoint)."""
import json
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.io import registry
from lowbit.tensor import functional as F
from lowbit.tensor.granularity import pad_groups, to_view, unpad_groups
from lowbit.tensor.packing import pack_bits
from lowbit.tensor.state import QuantState


# ---------------------------------------------------------------------------------------------
# a toy export format: every weight as JSON lists (floats of the dequantized model)


def _toy_write(model, path: Path, options):
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().tolist() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and v.is_floating_point()}
    (path / "toy.json").write_text(json.dumps({"format": "toy-json", "tensors": tensors}))
    return {"tensors": len(tensors)}


def _toy_detect(path: Path) -> bool:
    p = Path(path) / "toy.json"
    return p.is_file() and p.read_text()[:22] == '{"format": "toy-json",'


def _toy_read(path, **kw):
    d = json.loads((Path(path) / "toy.json").read_text())
    return {k: torch.tensor(v) for k, v in d["tensors"].items()}


@pytest.fixture
def toy_format():
    registry.register_format("toy-json", write=_toy_write, read=_toy_read, detect=_toy_detect, target="toy")  # the one line
    yield "toy-json"
    registry.EXPORTERS._items.pop("toy-json", None)


def test_toy_exporter_end_to_end(tmp_path, toy_format):
    from lowbit.model.loading import tiny_llama

    assert "toy-json" in registry.format_names()
    model = tiny_llama(vocab_size=32, hidden=32, layers=1)
    rep = registry.write_formats(model, tmp_path, "native,toy-json", root_format="native")
    assert rep["toy-json"]["tensors"] > 0 and (tmp_path / "toy" / "toy.json").is_file()
    assert registry.detect(tmp_path / "toy") == "toy-json" and registry.detect(tmp_path) == "native"
    back = registry.read(tmp_path / "toy")
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(back[k], v.float()), k
    # the CLI's --format takes it too (its choices come from the registry)
    from lowbit.cli import _format_names
    from lowbit.workflow import check_formats

    assert "toy-json" in _format_names() and check_formats(["native", "toy-json"]) == ["native", "toy-json"]


def test_unknown_format_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown format 'onnx'; expected one of .*awq.*gguf.*gptq.*native"):
        registry.parse_formats("native,onnx")


def test_builtin_formats_detect_their_own_files(tmp_path):
    """Load dispatch by detection: every built-in format recognises what it writes and nothing else."""
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    model = tiny_llama(vocab_size=256, hidden=64, layers=1, intermediate=128)
    lowbit.quantize(model, method="rtn", bits=4, group_size=32, progress=False)
    lowbit.freeze(model)
    opts = registry.ExportOptions(tokenizer=tiny_tokenizer(), gguf_fallback="requantize")
    rep = registry.write_formats(model, tmp_path, "native,gguf,compressed-tensors,gptq,awq", options=opts)
    for name, entry in rep.items():
        assert registry.detect(entry["path"]) == name, name
    assert registry.detect(tmp_path) is None and registry.detect(tmp_path / "nothing") is None
    loaded = registry.read(rep["gptq"]["path"])
    from lowbit.io._affine import quantized_linears

    a = {n: lowbit.dequantize(st) for n, (_, st) in quantized_linears(model).items()}
    b = {n: lowbit.dequantize(st) for n, (_, st) in quantized_linears(loaded).items()}
    assert set(a) == set(b)
    for n in a:  # GPTQ stores fp16 scales: equal up to that rounding
        assert torch.allclose(a[n].float(), b[n].float(), rtol=2e-3, atol=1e-5), n


# ---------------------------------------------------------------------------------------------
# a toy scheme kind: 1-bit signs times the mean |x| of each group (binary weights)


def _sign_quantize(tensor, scheme, layout, scale_dtype):
    r, k, g = layout.view_shape(tuple(tensor.shape))
    vg = pad_groups(to_view(tensor.float(), layout), g, fill="zero")
    n = torch.tensor([min(g, k - i * g) for i in range(vg.shape[1])], dtype=torch.float32)
    scale = vg.abs().sum(-1) / n  # the mean |x| of the real elements of each group
    codes = unpad_groups((vg >= 0).to(torch.uint8), k)
    return QuantState(scheme=scheme.name, bits=1, shape=tuple(tensor.shape), dtype=tensor.dtype, layout=layout.kind,
                      block_size=layout.block_size, axis=layout.axis, data=pack_bits(codes.reshape(-1), 1),
                      scales=scale if layout.kind == "group" else scale.reshape(-1))


def _sign_dequantize(state, layout):
    r, k, g = layout.view_shape(tuple(state.shape))
    signs = F.codes(state).float() * 2 - 1
    return unpad_groups(pad_groups(signs, g) * state.scales.float().reshape(r, -1, 1), k)


@pytest.fixture
def sign_kind():
    F.register_scheme_kind("toy-sign", quantize=_sign_quantize, dequantize=_sign_dequantize, schemes=[("sign1", 1)])  # the one line
    yield "sign1"
    F.KINDS._items.pop("toy-sign", None)
    F.SCHEMES._items.pop("sign1", None)


def test_toy_scheme_kind_end_to_end(tmp_path, sign_kind):
    w = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    st = lowbit.quantize(w, "sign1", group_size=32)
    # against a float64 reference of the same rule
    ref = torch.empty(8, 100, dtype=torch.float64)
    for a in range(0, 100, 32):
        blk = w[:, a:a + 32].double()
        ref[:, a:a + 32] = torch.where(blk >= 0, 1.0, -1.0) * blk.abs().mean(-1, keepdim=True)
    assert torch.allclose(lowbit.dequantize(st).double(), ref, rtol=1e-6, atol=1e-7)
    assert st.nbytes < w.numel() // 8 + 8 * 4 * 4 + 1  # 1 bit per weight + the scales
    # per-channel and blockwise layouts work through the same two functions
    for kw in ({"group_size": -1}, {"block_size": 64}, {"axis": 1}):
        assert lowbit.dequantize(lowbit.quantize(w, "sign1", **kw)).shape == w.shape
    # serialisation round trip
    again = QuantState.from_state_dict(st.state_dict())
    assert torch.equal(lowbit.dequantize(again), lowbit.dequantize(st))
    from safetensors.torch import load_file, save_file

    save_file(st.state_dict(), str(tmp_path / "w.safetensors"))
    assert torch.equal(lowbit.dequantize(QuantState.from_state_dict(load_file(str(tmp_path / "w.safetensors")))),
                       lowbit.dequantize(st))


def test_unknown_scheme_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown scheme kind 'nope'"):
        F.register_scheme("x1", "nope", 1)
