"""compressed-tensors export, verified by the real loaders: transformers + compressed-tensors on CPU give
the lowbit model's logits exactly, and compressed-tensors' own compressor, fed lowbit's scales and zero
points, packs the same int32 words."""
import json

import pytest
import torch
from torch import nn

ct = pytest.importorskip("compressed_tensors")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lowbit  # noqa: E402
from lowbit.io import compressed_tensors as ctio  # noqa: E402
from lowbit.io._affine import AffineWeight, UnsupportedWeight  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import QLinear  # noqa: E402

pytestmark = pytest.mark.oracle


def _ids():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _model():
    return tiny_llama(vocab_size=128, hidden=64, layers=2, intermediate=128)


def _with_states(m, scheme, **kw):
    for name, mod in list(m.named_modules()):
        for cn, c in list(mod.named_children()):
            if type(c) is nn.Linear and cn != "lm_head":
                st = lowbit.quantize(c.weight.detach(), scheme, **kw)
                setattr(mod, cn, QLinear.from_quant_state(c, st))
    return m.eval()


def _load_hf(path, dequantize):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    kw = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()


def _logits(m):
    with torch.no_grad():
        return m(_ids()).logits


WEIGHT_ONLY = {
    "int4_sym_g32": dict(scheme="int4", group_size=32),
    "int4_asym_g64": dict(scheme="int4_asym", group_size=64),
    "int4_asym_channel": dict(scheme="int4_asym", axis=0),
    "int8_sym_channel": dict(scheme="int8", axis=0),
    "int8_asym_g32": dict(scheme="int8_asym", group_size=32),
    "int3_asym_g32": dict(scheme="int3_asym", group_size=32),
    "int4_sym_tensor": dict(scheme="int4", block_size=None),
}


@pytest.mark.parametrize("case", list(WEIGHT_ONLY))
def test_weight_only_logits_equal_transformers(tmp_path, case):
    kw = dict(WEIGHT_ONLY[case])
    m = _with_states(_model(), kw.pop("scheme"), **kw)
    ref = _logits(m)
    ctio.export_compressed_tensors(m, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    ct.quantization.QuantizationConfig.model_validate({k: v for k, v in qc.items()
                                                       if k not in ("version", "sparsity_config", "transform_config")})
    hf = _load_hf(tmp_path / "ct", dequantize=True)
    assert torch.equal(_logits(hf), ref)
    # and every decompressed weight is lowbit's dequantized weight, bit for bit
    for name, mod in m.named_modules():
        if isinstance(mod, QLinear):
            w = hf.get_submodule(name).weight
            assert torch.equal(w.view(torch.int32), lowbit.dequantize(mod.qstate).view(torch.int32)), name


@pytest.mark.parametrize("scheme,bits", [("int4_asym", 4), ("int4", 4), ("int8_asym", 8), ("int2_asym", 2),
                                         ("int3_asym", 3)])
def test_packing_equals_compressed_tensors_compressor(scheme, bits):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    lin = nn.Linear(96, 40)
    st = lowbit.quantize(lin.weight.detach(), scheme, group_size=32)
    scheme_d, ours = ctio.module_scheme(QLinear.from_quant_state(lin, st), st)
    w = AffineWeight.from_state(st)
    off = 1 << (bits - 1)
    sd = {"weight": lowbit.dequantize(st), "weight_scale": w.scales.float()}
    if w.zeros is not None:
        sd["weight_zero_point"] = (w.zeros.to(torch.int16) - off).to(torch.int8)
    qs = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**{
        k: v for k, v in scheme_d["weights"].items() if k in ("num_bits", "type", "symmetric", "group_size",
                                                            "strategy")}))
    ref = PackedQuantizationCompressor.compress(sd, qs)
    assert torch.equal(ref["weight_packed"], ours["weight_packed"])
    assert torch.equal(ref["weight_shape"].to(torch.int64), ours["weight_shape"])
    if w.zeros is not None:
        assert torch.equal(ref["weight_zero_point"], ours["weight_zero_point"])
    else:
        assert "weight_zero_point" not in ref and "weight_zero_point" not in ours
    back = PackedQuantizationCompressor.decompress({**ref, "weight_scale": sd["weight_scale"]}, qs)
    assert torch.equal(back["weight"], sd["weight"])


@pytest.mark.parametrize("case", ["w8a8_static", "fp8_dynamic", "fp8_static"])
def test_activation_quantization_logits_equal(tmp_path, case):
    m = _model()
    x = _ids()
    if case == "w8a8_static":
        lowbit.quantize(m, weights="qint8", activations="qint8")
    elif case == "fp8_dynamic":
        lowbit.quantize(m, weights="qfloat8", activations="qfloat8", act_dynamic=True)
    else:
        lowbit.quantize(m, weights="qfloat8", activations="qfloat8")
    if "static" in case:
        with lowbit.Calibration(observer="minmax"):
            m(x)
        # static int8: compressed-tensors clamps to [-128, 127], lowbit to [-127, 127]; with headroom in
        # the scales no input saturates and the two are identical
        for mod in m.modules():
            if isinstance(mod, QLinear):
                mod.input_scale.mul_(1.25)
    lowbit.freeze(m)
    ref = _logits(m)
    ctio.export_compressed_tensors(m, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert qc["format"] == ("int-quantized" if case == "w8a8_static" else "float-quantized")
    assert group["input_activations"]["dynamic"] is (case == "fp8_dynamic")
    assert group["input_activations"]["strategy"] == ("token" if case == "fp8_dynamic" else "tensor")
    hf = _load_hf(tmp_path / "ct", dequantize=False)  # compressed-tensors runs the activation QDQ itself
    assert torch.equal(_logits(hf), ref)


def test_w8a8_dynamic_documented_difference(tmp_path):
    m = _model()
    lowbit.quantize(m, weights="qint8", activations="qint8", act_dynamic=True)
    lowbit.freeze(m)
    ref = _logits(m)
    ctio.export_compressed_tensors(m, tmp_path / "ct")
    hf = _load_hf(tmp_path / "ct", dequantize=False)
    got = _logits(hf)  # the first forward decompresses the weights
    for name, mod in m.named_modules():
        if isinstance(mod, QLinear):
            assert torch.equal(hf.get_submodule(name).weight, lowbit.dequantize(mod.qstate)), name
    # compressed-tensors' dynamic int8 uses absmax/127.5 over [-128, 127]; lowbit (and vLLM) absmax/127
    diff = (got - ref).abs().max()
    assert 0 < diff < 0.05 * ref.abs().max()


def test_mixed_schemes_and_ignore(tmp_path):
    m = _model()
    lowbit.quantize(m, weights="qint8", include=["*.self_attn.*"])
    lowbit.freeze(m)
    for layer in m.model.layers:
        for cn in ("gate_proj", "up_proj"):
            c = getattr(layer.mlp, cn)
            st = lowbit.quantize(c.weight.detach(), "int4", group_size=32)
            setattr(layer.mlp, cn, QLinear.from_quant_state(c, st))
    ref = _logits(m)
    ctio.export_compressed_tensors(m, tmp_path / "ct")
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    assert sorted(qc["ignore"]) == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    targets = sorted(t for g in qc["config_groups"].values() for t in g["targets"])
    assert r"re:.*\.mlp\.gate_proj$" in targets and r"re:.*\.self_attn\.q_proj$" in targets
    # transformers' dequantize=True path applies one scheme to every dense layer (5.23), so mixed
    # configs are checked through the compressed path, where compressed-tensors matches each module
    assert torch.equal(_logits(_load_hf(tmp_path / "ct", dequantize=False)), ref)
    ck = ctio.read_compressed_tensors(tmp_path / "ct")
    for name, w in ck.weights.items():
        assert torch.equal(w.dequantize(), lowbit.dequantize(m.get_submodule(name).qstate)), name


def test_unsupported(tmp_path):
    m = _with_states(_model(), "int4", group_size=48)  # 48 does not divide 64
    with pytest.raises(UnsupportedWeight, match="group_size 48 does not divide in_features 64"):
        ctio.export_compressed_tensors(m, tmp_path / "a")
    m = _model()
    lowbit.quantize(m, method="bnb-nf4")
    lowbit.freeze(m)
    with pytest.raises(UnsupportedWeight, match="not an integer affine scheme"):
        ctio.export_compressed_tensors(m, tmp_path / "b")
    with pytest.raises(ValueError, match="no quantized Linear layer"):
        ctio.export_compressed_tensors(m, tmp_path / "b", unsupported="dense")
