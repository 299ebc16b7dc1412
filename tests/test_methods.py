"""Method dispatcher: registry, config validation, and every built-in backend on small models."""
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import Bnb4bitConfig, Int8StaticConfig, MethodConfig, QuantoConfig
from lowbit.model.methods import METHODS, list_methods, register_method
from lowbit.nn import DynamicQuantGRU, DynamicQuantLSTM, Linear4bit, Linear8bitLt, QConv2d, QLinear


class Seq(nn.Module):
    """An LSTM + GRU + Linear model."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(8, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0][:, -1])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_builtin_methods_registered():
    names = list_methods()
    for n in ("fp16", "bf16", "int8-dynamic", "int8-static", "bnb-int8", "bnb-nf4", "bnb-fp4", "quanto"):
        assert n in names


def test_unknown_method_lists_registered():
    with pytest.raises(ValueError, match=r"unknown quantization method 'gptq4'.*bnb-nf4.*int8-dynamic"):
        lowbit.quantize(_mlp(), method="gptq4")


@pytest.mark.parametrize("method,key", [("fp16", "bits"), ("bnb-nf4", "threshold"), ("int8-dynamic", "weights"),
                                        ("bnb-int8", "double_quant")])
def test_inapplicable_config_is_an_error(method, key):
    with pytest.raises(ValueError, match=rf"does not accept '{key}'.*accepted keys"):
        lowbit.quantize(_mlp(), method=method, **{key: 1})


@pytest.mark.parametrize("method,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_methods(method, dtype):
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    lowbit.quantize(model, method=method)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model[1].running_mean.dtype == dtype and model[1].num_batches_tracked.dtype == torch.int64


def test_int8_dynamic_on_lstm_gru_linear():
    torch.manual_seed(0)
    model = Seq()
    x = torch.randn(3, 12, 8)
    ref = model(x).detach()
    lowbit.quantize(model, method="int8-dynamic", exclude=None)
    assert isinstance(model.lstm, DynamicQuantLSTM) and isinstance(model.gru, DynamicQuantGRU)
    assert isinstance(model.head, QLinear) and model.head.act_dynamic and model.head.frozen
    y = model(x)
    assert 0 < (y - ref).abs().max() < 0.03


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "histogram"])
def test_int8_static_calibrates_and_freezes(observer):
    model = _cnn()
    g = torch.Generator().manual_seed(1)
    loader = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(3)]
    x = torch.randn(4, 3, 6, 6, generator=g)
    ref = model(x).detach()
    lowbit.quantize(model, method="int8-static", calib_loader=loader, observer=observer, per_channel=True)
    assert isinstance(model[0], QConv2d) and model[0].frozen and model[0].input_scale > 0
    assert model[0].qstate.layout == "channel"
    y = model(x)
    assert (y - ref).abs().max() < 0.05 * ref.abs().max() + 0.02


def test_int8_static_per_tensor_and_errors():
    model = _mlp()
    lowbit.quantize(model, method="int8-static", calib_loader=[(torch.randn(2, 32),)], per_channel=False)
    assert model[0].qstate.layout == "tensor"
    with pytest.raises(ValueError, match="calib_loader"):
        lowbit.quantize(_mlp(), method="int8-static")
    with pytest.raises(ValueError, match="observer='kl'"):
        lowbit.quantize(_mlp(), method="int8-static", calib_loader=[], observer="kl")


def test_int8_static_dict_batches():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, input_ids=None):
            return self.lin(input_ids)

    m = KW()
    lowbit.quantize(m, method="int8-static", calib_loader=[{"input_ids": torch.randn(2, 4)}], exclude=None)
    assert m.lin.input_scale > 0


def test_bnb_int8():
    model = _mlp()
    x = torch.randn(5, 32)
    ref = model(x).detach()
    lowbit.quantize(model, method="bnb-int8", threshold=6.0, exclude=None)
    assert isinstance(model[0], Linear8bitLt) and model[0].weight.dtype == torch.int8
    assert (model(x) - ref).abs().max() < 0.02


@pytest.mark.parametrize("method,qt", [("bnb-nf4", "nf4"), ("bnb-fp4", "fp4")])
def test_bnb_4bit_double_quant_effective_bits(method, qt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    lowbit.quantize(model, method=method, double_quant=True, exclude=None)
    m = model[0]
    assert isinstance(m, Linear4bit) and m.quant_type == qt and m.qstate.nested is not None
    assert m.qstate.bits_per_element == pytest.approx(4.127, abs=2e-3)
    model2 = nn.Sequential(nn.Linear(1024, 1024, bias=False))
    lowbit.quantize(model2, method=method, exclude=None)
    assert model2[0].qstate.bits_per_element == pytest.approx(4.5)
    with pytest.raises(ValueError, match="fixes quant_type"):
        lowbit.quantize(_mlp(), method=method, quant_type="int4")


def test_quanto_method_equals_keyword_form():
    a, b = _mlp(), _mlp()
    lowbit.quantize(a, weights="qint4", exclude=None)
    lowbit.quantize(b, method="quanto", weights="qint4", exclude=None)
    x = torch.randn(2, 32)
    assert torch.equal(a(x), b(x))


def test_config_objects_and_roundtrip():
    cfg = Bnb4bitConfig(quant_type="fp4", double_quant=True, compute_dtype="bfloat16")
    d = cfg.to_dict()
    assert d["compute_dtype"] == "bfloat16" and d["method"] == "bnb-4bit" and d["version"] == 1
    assert Bnb4bitConfig.from_dict(d) == cfg
    q = QuantoConfig(weights="qint4", activations="qfloat8")
    assert QuantoConfig.from_dict(q.to_dict()) == q
    s = Int8StaticConfig(calib_loader=[1, 2], observer="histogram")
    assert "calib_loader" not in s.to_dict()  # runtime input, not configuration
    model = _mlp()
    lowbit.quantize(model, method="quanto", config=QuantoConfig(weights="qint8", exclude=None))
    assert isinstance(model[0], QLinear)
    with pytest.raises(TypeError, match="expects a BnbNf4Config"):
        lowbit.quantize(_mlp(), method="bnb-nf4", config=q)


def test_register_method_with_config_and_with_kwargs():
    @dataclass(frozen=True)
    class HalfLinearConfig(MethodConfig):
        method: ClassVar[str] = "test-half-linear"
        scale: float = 0.5

    @register_method("test-half-linear", config=HalfLinearConfig, overwrite=True)
    def half_linear(model, config):
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(config.scale)
        return model

    @register_method("test-noop", overwrite=True)
    def noop(model, *, flag: bool = False):
        model.flag = flag

    assert "test-half-linear" in list_methods() and "test-noop" in METHODS
    model = nn.Sequential(nn.Linear(2, 2, bias=False))
    w = model[0].weight.detach().clone()
    lowbit.quantize(model, method="test-half-linear", scale=0.25)
    assert torch.equal(model[0].weight, w * 0.25)
    out = lowbit.quantize(model, method="test-noop", flag=True)
    assert out is model and model.flag is True
    with pytest.raises(ValueError, match="does not accept 'scale'.*accepted keys: flag"):
        lowbit.quantize(model, method="test-noop", scale=1)


def test_ptq_methods_registered_when_available():
    import importlib.util

    if importlib.util.find_spec("lowbit.model.ptq_methods") is None:
        pytest.skip("lowbit.model.ptq_methods not present")
    for n in ("rtn", "awq", "gptq", "hqq"):
        assert n in list_methods()
