"""transformers integration: LowbitConfig / LowbitHfQuantizer.

Quantize-while-loading must give exactly the QuantStates that ``lowbit.quantize`` gives on the
float checkpoint's weights, the model must compute ``F.linear`` on those dequantized weights, and
``save_pretrained`` -> ``from_pretrained`` must reload the same tensors and logits bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.23")  # the `hf` extra's floor
safetensors_torch = pytest.importorskip("safetensors.torch")

import lowbit  # noqa: E402
from lowbit.integrations import transformers as lbt  # noqa: E402
from lowbit.model.loading import tiny_llama  # noqa: E402
from lowbit.nn import Linear4bit, QLinear, QModuleMixin  # noqa: E402
from lowbit.tensor.functional import dequantize, quantize_tensor  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# method config -> quantize_tensor arguments it must reproduce (hidden 96, intermediate 160: ragged groups)
CASES = {
    "nf4": (dict(method="nf4"), dict(scheme="nf4", block_size=64)),
    "fp4-dq": (dict(method="fp4", double_quant=True), dict(scheme="fp4", block_size=64, double_quant=True)),
    "int4-asym-g64": (dict(method="int4", group_size=64, sym=False), dict(scheme="int4_asym", group_size=64)),
    "int8": (dict(method="int8"), dict(scheme="int8", group_size=-1)),
    "fp8": (dict(method="fp8"), dict(scheme="fp8_e4m3", group_size=-1)),
    # int4 means what `lowbit quantize --method int4` means: quanto's asymmetric qint4, groups of 128
    "int4-default-g128": (dict(method="int4"), dict(scheme="int4_asym", group_size=128)),
}


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_float")
    model = tiny_llama(vocab_size=256, hidden=96, layers=2, intermediate=160, seed=0, heads=4, kv_heads=2)
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def float_sd(float_dir) -> dict:
    return safetensors_torch.load_file(str(float_dir / "model.safetensors"))


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))


def _quantized_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


def _states_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_validation_and_json_roundtrip():
    cfg = lowbit.LowbitConfig(
        method="int4", group_size=32, sym=False, modules_to_not_convert=["lm_head", "mlp"]
    )
    d = cfg.to_dict()
    assert d["quant_method"] == "lowbit" and d["bits"] == 4 and d["group_size"] == 32
    again = lbt.LowbitConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    assert transformers.quantizers.auto.AutoQuantizationConfig.from_dict(d).to_dict() == d
    assert lowbit.LowbitConfig is lbt.LowbitConfig
    assert (
        lowbit.LowbitConfig(method="nf4").group_size == 64
        and lowbit.LowbitConfig(method="gptq").group_size == 128
    )
    assert lowbit.LowbitConfig(method="int8").group_size == -1
    bad = [
        dict(method="nf5"),
        dict(method="nf4", bits=8),
        dict(method="rtn", bits=5),
        dict(method="int4", double_quant=True),
        dict(method="nf4", sym=False),
        dict(method="int4", group_size=0),
        dict(method="int4", sym=True),  # int4 is asymmetric (CHANGELOG): symmetric 4-bit is method="rtn"
        dict(method="nf4", colour="red"),
        dict(method="int4", compute_dtype="bfloat16"),
        dict(method="gptq", n_samples=0),
    ]
    for kw in bad:
        with pytest.raises((ValueError, TypeError)):
            lowbit.LowbitConfig(**kw)
    with pytest.raises(ValueError, match="newer"):
        lbt.LowbitConfig.from_dict({**d, "version": 99})
    # a calibration tensor is a runtime input, a path is configuration
    assert (
        "calib_dataset" not in lowbit.LowbitConfig(method="gptq", calib_dataset=torch.zeros(2, 8)).to_dict()
    )
    assert (
        lowbit.LowbitConfig(method="gptq", calib_dataset="valid.txt").to_dict()["calib_dataset"]
        == "valid.txt"
    )


def test_registered_in_transformers():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is lbt.LowbitConfig
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is lbt.LowbitHfQuantizer
    lbt.register()  # idempotent
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is lbt.LowbitHfQuantizer


@pytest.mark.parametrize("case", list(CASES))
def test_load_quantizes_like_lowbit_quantize(case, float_dir, float_sd):
    cfg_kw, tensor_kw = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=lowbit.LowbitConfig(**cfg_kw))
    qmods = _quantized_linears(model)
    assert len(qmods) == 2 * len(LINEARS)
    expected_cls = Linear4bit if cfg_kw["method"] in ("nf4", "fp4") else QLinear
    assert all(type(m) is expected_cls and m.frozen and "weight" not in m._parameters for m in qmods.values())
    assert type(model.lm_head) is nn.Linear  # the output embedding stays float by default
    for name, m in qmods.items():
        ref = quantize_tensor(float_sd[name + ".weight"], **tensor_kw)
        assert _states_equal(m.qstate, ref), name
    # the model computes F.linear on the dequantized weights: swap them into the float model
    ref_model = AutoModelForCausalLM.from_pretrained(float_dir)
    with torch.no_grad():
        for name, m in qmods.items():
            ref_model.get_submodule(name).weight.copy_(dequantize(m.qstate))
        x = _ids()
        assert torch.equal(model(x).logits, ref_model(x).logits)
    qc = model.config.quantization_config
    assert (
        set(qc.quantization_map) == set(qmods)
        and qc.quantization_map[next(iter(qmods))]["class"] == expected_cls.__name__
    )


@pytest.mark.parametrize("case", ["nf4", "fp4-dq", "int4-asym-g64", "fp8"])
def test_save_pretrained_reload_bit_exact(case, float_dir, tmp_path):
    cfg_kw, _ = CASES[case]
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=lowbit.LowbitConfig(**cfg_kw))
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert (
        conf["quant_method"] == "lowbit" and conf["method"] == cfg_kw["method"] and conf["quantization_map"]
    )
    saved = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight.data" in saved
    # no float copy of a quantized weight: only the empty guard that makes lowbit-less transformers refuse the file
    assert saved["model.layers.0.self_attn.q_proj.weight"].shape == (0,)

    # reloading must not quantize again
    calls = []
    orig = lbt.LowbitQuantize.convert
    lbt.LowbitQuantize.convert = lambda self, *a, **k: calls.append(1) or orig(self, *a, **k)
    try:
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
    finally:
        lbt.LowbitQuantize.convert = orig
    assert not calls
    assert again.hf_quantizer.pre_quantized
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    g1 = model.generate(x[:1], max_new_tokens=6, do_sample=False)
    g2 = again.generate(x[:1], max_new_tokens=6, do_sample=False)
    assert g1.shape == (1, 18) and torch.equal(g1, g2)
    # and a second save of the reloaded model writes the same tensors
    again.save_pretrained(tmp_path / "second")
    saved2 = safetensors_torch.load_file(str(tmp_path / "second" / "model.safetensors"))
    assert saved.keys() == saved2.keys() and all(torch.equal(saved[k], saved2[k]) for k in saved)


def test_bfloat16_load_keeps_fp32_scales_and_reloads(float_dir, float_sd, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, dtype=torch.bfloat16, quantization_config=lowbit.LowbitConfig(method="nf4")
    )
    m = model.model.layers[1].mlp.down_proj
    ref = quantize_tensor(
        float_sd["model.layers.1.mlp.down_proj.weight"].to(torch.bfloat16), "nf4", block_size=64
    )
    assert _states_equal(m.qstate, ref) and m.qstate.scales.dtype == torch.float32
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.model.norm.weight.dtype == torch.bfloat16
    assert _states_equal(again.model.layers[1].mlp.down_proj.qstate, m.qstate)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_modules_to_not_convert_patterns(float_dir):
    cfg = lowbit.LowbitConfig(
        method="int8", modules_to_not_convert=["lm_head", "down_proj", "model.layers.1.self_attn"]
    )
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
    names = set(_quantized_linears(model))
    assert names == {
        f"model.layers.{i}.{blk}.{p}"
        for i in (0, 1)
        for blk, p in [
            ("self_attn", "q_proj"),
            ("self_attn", "k_proj"),
            ("self_attn", "v_proj"),
            ("self_attn", "o_proj"),
            ("mlp", "gate_proj"),
            ("mlp", "up_proj"),
        ]
        if not (i == 1 and blk == "self_attn")
    }
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


def test_dispatcher_method_quantizes_weight_by_weight(float_dir, float_sd, tmp_path):
    """Any data-free method registered in the lowbit dispatcher runs on each weight as it is loaded."""
    from lowbit.model.methods import METHODS, register_method

    seen = []

    @register_method("test-int4-g32", overwrite=True)
    def _m(model: nn.Module, bits: int = 4, group_size: int = 32, sym: bool = True) -> nn.Module:
        for name, child in list(model.named_children()):
            if isinstance(child, nn.Linear):
                seen.append(tuple(child.weight.shape))
                st = quantize_tensor(
                    child.weight.detach(), f"int{bits}" if sym else f"int{bits}_asym", group_size=group_size
                )
                setattr(model, name, QLinear.from_quant_state(child, st))
        return model

    try:
        cfg = lowbit.LowbitConfig(method="test-int4-g32", method_kwargs={"group_size": 32, "sym": False})
        model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=cfg)
        assert len(seen) == 2 * len(LINEARS)  # one call per weight, each on a lone Linear
        qmods = _quantized_linears(model)
        for name, m in qmods.items():
            assert _states_equal(
                m.qstate, quantize_tensor(float_sd[name + ".weight"], "int4_asym", group_size=32)
            )
        model.save_pretrained(tmp_path)
        again = AutoModelForCausalLM.from_pretrained(tmp_path)
        x = _ids()
        with torch.no_grad():
            assert torch.equal(model(x).logits, again(x).logits)
    finally:
        METHODS._items.pop("test-int4-g32", None)


PTQ_CASES = {
    "rtn": dict(bits=3, sym=False),
    "hqq": dict(bits=4, group_size=64, method_kwargs={"iters": 4}),
    "gptq": dict(bits=4, group_size=64, sym=False, n_samples=4, seq_len=32),
    "awq": dict(bits=4, group_size=64, n_samples=4, seq_len=32),
}


@pytest.mark.parametrize("method", list(PTQ_CASES))
def test_ptq_methods_match_the_dispatcher_and_reload(method, float_dir, tmp_path):
    """rtn/hqq run per weight while loading, gptq/awq on the loaded model: either way the result is
    what ``lowbit.quantize(float_model, method=...)`` gives, and it reloads bit-exactly."""
    kw = dict(PTQ_CASES[method])
    calib = _ids(32, seed=1).repeat(2, 1)
    if method in ("gptq", "awq"):
        kw["calib_dataset"] = calib
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(method=method, **kw)
    )
    qmods = _quantized_linears(model)
    assert len(qmods) == 2 * len(LINEARS) and type(model.lm_head) is nn.Linear

    ref = AutoModelForCausalLM.from_pretrained(float_dir)
    ref_kw = {k: v for k, v in kw.items() if k != "method_kwargs"}
    ref_kw.update(kw.get("method_kwargs", {}))
    ref_kw.setdefault("group_size", 128)
    lowbit.quantize(ref, method=method, progress=False, **ref_kw)
    sd, sd_ref = model.state_dict(), ref.state_dict()
    assert sd.keys() == sd_ref.keys() and all(torch.equal(sd[k], sd_ref[k]) for k in sd)

    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert "calib_dataset" not in conf  # a token tensor is a runtime input, not configuration
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    x = _ids()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)


def test_reload_without_quantization_map_is_an_error(float_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(method="int8")
    )
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["quantization_config"]["quantization_map"] = None
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="quantization_map"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_dequantize_gives_float_model(float_dir):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(method="int8")
    )
    x = _ids()
    with torch.no_grad():
        ref = model(x).logits
    w = dequantize(model.model.layers[0].self_attn.q_proj.qstate)
    model = model.dequantize()
    assert not _quantized_linears(model) and getattr(model.config, "quantization_config", None) is None
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, w)
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)


# ---------------------------------------------------------------------------------------------
# the real model


def _smollm2_plain_dir(tmp_path: Path) -> Path:
    from lowbit.model.loading import load_model

    try:
        model, tok = load_model("default")  # GGUF -> plain float model (cached outside the repo)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    d = tmp_path / "smollm2"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _smollm2_roundtrip(tmp_path: Path, device: str) -> None:
    src = _smollm2_plain_dir(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=lowbit.LowbitConfig(method="nf4"), device_map=device
    )
    qmods = _quantized_linears(model)
    assert len(qmods) == 30 * 7 and all(type(m) is Linear4bit for m in qmods.values())
    assert all(m.qstate.device.type == device for m in qmods.values())
    assert (
        type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    )  # tied, float
    ids = tok("The capital of France is", return_tensors="pt").input_ids.to(device)
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    model.save_pretrained(tmp_path / "nf4")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map=device)
    sd1, sd2 = model.state_dict(), again.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    with torch.no_grad():
        logits = model(out).logits
        assert torch.equal(logits, again(out).logits)
    # NF4 stays close to the float model: the same next token after the prompt
    ref = AutoModelForCausalLM.from_pretrained(src, device_map=device)
    with torch.no_grad():
        assert ref(ids).logits[0, -1].argmax() == logits[0, ids.shape[1] - 1].argmax()


@pytest.mark.slow
def test_smollm2_nf4_load_generate_save_reload(tmp_path):
    _smollm2_roundtrip(tmp_path, "cpu")


@pytest.mark.cuda
def test_tiny_cuda_roundtrip(float_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=lowbit.LowbitConfig(method="nf4"), device_map="cuda"
    )
    assert all(m.qstate.device.type == "cuda" for m in _quantized_linears(model).values())
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cuda")
    x = _ids().cuda()
    with torch.no_grad():
        assert torch.equal(model(x).logits, again(x).logits)
    assert torch.equal(
        model.generate(x[:1], max_new_tokens=4, do_sample=False),
        again.generate(x[:1], max_new_tokens=4, do_sample=False),
    )


@pytest.mark.cuda
@pytest.mark.slow
def test_smollm2_nf4_cuda(tmp_path):
    _smollm2_roundtrip(tmp_path, "cuda")
