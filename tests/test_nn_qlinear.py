"""QLinear / QConv2d: fake-quant before freeze == packed after freeze == F.linear on the dequantized weight."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.nn import QConv2d, QLinear
from lowbit.nn.functional import quant_kwargs_for
from lowbit.tensor.functional import dequantize, quantize_tensor

WEIGHTS = ["qint2", "qint4", "qint8", "qfloat8"]


def _lin(in_f=96, out_f=40, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f)


@pytest.mark.parametrize("weights", WEIGHTS)
def test_qlinear_weight_only_matches_dequantized_linear(weights):
    lin = _lin()
    x = torch.randn(5, 96)
    q = QLinear.from_module(lin, weights=weights)
    kw = quant_kwargs_for(weights, (40, 96))
    w_dq = dequantize(quantize_tensor(lin.weight.detach(), **kw))
    y0 = q(x)
    assert torch.equal(y0, F.linear(x, w_dq, lin.bias))
    q.freeze()
    assert q.qstate is not None and "weight" not in q._parameters
    assert torch.equal(q(x), y0)  # identical before/after freeze
    assert q.qstate.nbytes < lin.weight.numel() * 4 / (2 if weights in ("qint8", "qfloat8") else 4)


def test_weight_granularity_rules():
    assert quant_kwargs_for("qint8", (8, 576)) == {"scheme": "int8", "axis": 0}
    assert quant_kwargs_for("qfloat8", (8, 576)) == {"scheme": "fp8_e4m3", "axis": 0}
    assert quant_kwargs_for("qint4", (8, 576)) == {"scheme": "int4_asym", "group_size": 96}
    assert quant_kwargs_for("qint4", (8, 1536)) == {"scheme": "int4_asym", "group_size": 128}
    assert quant_kwargs_for("qint2", (8, 20)) == {"scheme": "int2_asym", "axis": 0}
    assert quant_kwargs_for("qint8", (8, 20), per_channel=False) == {"scheme": "int8", "block_size": None}
    assert quant_kwargs_for("nf4", (8, 20)) == {"scheme": "nf4", "group_size": 64}
    with pytest.raises(ValueError, match="registered"):
        quant_kwargs_for("int9", (8, 20))


def test_state_dict_roundtrip_and_names():
    q = QLinear.from_module(_lin(), weights="qint4")
    q.freeze()
    sd = q.state_dict()
    assert {"bias", "weight.data", "weight.scales", "weight.zeros", "weight.meta"} <= set(sd)
    fresh = QLinear(96, 40, weights="qint4")  # unfrozen, random float weight
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert fresh.frozen and torch.equal(fresh(x), q(x))
    with pytest.raises(RuntimeError, match="size mismatch"):
        QLinear(96, 41, weights="qint4").load_state_dict(sd)
    # a frozen module requires its quantized weight in strict mode
    with pytest.raises(RuntimeError, match="weight.meta"):
        q.load_state_dict({"bias": sd["bias"]})


def test_to_moves_but_keeps_packed_dtypes():
    q = QLinear.from_module(_lin(), weights="qint8")
    q.freeze()
    q.half()
    assert q.qstate.data.dtype == torch.uint8 and q.qstate.scales.dtype == torch.float32
    assert q.bias.dtype == torch.float16
    y = q(torch.randn(2, 96).half())
    assert y.dtype == torch.float16


def test_weight_attribute_after_freeze_is_dequantized():
    q = QLinear.from_module(_lin(), weights="qint8")
    w_fq = q.dequantized_weight().detach().clone()
    q.freeze()
    assert torch.equal(q.weight, w_fq)


def test_from_quant_state():
    lin = _lin()
    st = quantize_tensor(lin.weight.detach(), "int3_asym", group_size=32)
    q = QLinear.from_quant_state(lin, st)
    x = torch.randn(4, 96)
    assert torch.equal(q(x), F.linear(x, dequantize(st), lin.bias))
    assert q.qstate is st and q.weights == "int3_asym"
    with pytest.raises(ValueError, match="does not match"):
        QLinear.from_quant_state(nn.Linear(10, 10), st)
    # a from_quant_state module round-trips its state
    fresh = QLinear(96, 40, weights="int3_asym")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))


def test_static_activations_pass_through_until_calibrated():
    q = QLinear.from_module(_lin(), weights="qint8", activations="qint8")
    x = torch.randn(6, 96)
    ref = QLinear.from_module(_lin(), weights="qint8")
    assert torch.equal(q(x), ref(x))  # input_scale == 0: not calibrated
    q.input_scale.fill_(0.01)
    xq = torch.clamp(torch.round(x / 0.01), -127, 127) * 0.01
    assert torch.equal(q(x), ref(xq))


@pytest.mark.parametrize("act", ["qint8", "qfloat8"])
def test_dynamic_per_token_activations(act):
    q = QLinear.from_module(_lin(), weights="qint8", activations=act, act_dynamic=True)
    ref = QLinear.from_module(_lin(), weights="qint8")
    x = torch.randn(2, 3, 96)
    x[0, 1] *= 50  # one loud token must not affect the others' scales
    qmax = 127.0 if act == "qint8" else 448.0
    s = x.abs().amax(-1, keepdim=True) / qmax
    if act == "qint8":
        xq = torch.clamp(torch.round(x / s), -127, 127) * s
    else:
        xq = torch.clamp(x / s, -448, 448).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(q(x), ref(xq))
    err = (q(x) - ref(x)).abs()
    others = torch.ones(2, 3, dtype=torch.bool)
    others[0, 1] = False
    tol = 0.03 if act == "qint8" else 0.1  # e4m3 keeps 3 mantissa bits
    assert err[others].max() < tol  # quiet tokens keep their own fine scale
    assert err[0, 1].max() < tol * ref(x)[0, 1].abs().max()


def test_ste_gradients():
    lin = _lin()
    q = QLinear.from_module(lin, weights="qint4")
    x = torch.randn(7, 96, requires_grad=True)
    q(x).pow(2).sum().backward()
    w_dq = q.dequantized_weight().detach()
    x2 = x.detach().clone().requires_grad_()
    w2 = w_dq.clone().requires_grad_()
    F.linear(x2, w2, lin.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w2.grad)  # straight through the rounding
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("weights", ["qint4", "qint8"])
def test_qconv2d(weights):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1, groups=2)
    q = QConv2d.from_module(conv, weights=weights)
    x = torch.randn(2, 6, 5, 5)
    k = 3 * 3 * 3
    st = quantize_tensor(conv.weight.detach().reshape(8, k), **quant_kwargs_for(weights, (8, k)))
    ref = F.conv2d(x, dequantize(st).reshape(conv.weight.shape), conv.bias, padding=1, groups=2)
    y = q(x)
    assert torch.equal(y, ref)
    q.freeze()
    assert q.qstate.shape == (8, k) and torch.equal(q(x), y)
    fresh = QConv2d(6, 8, 3, padding=1, groups=2, weights=weights)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), y)


def test_qconv2d_dynamic_activation_is_per_pixel():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 1)
    q = QConv2d.from_module(conv, weights=None, activations="qint8", act_dynamic=True)
    x = torch.randn(1, 4, 2, 2)
    s = x.abs().amax(1, keepdim=True) / 127
    xq = torch.clamp(torch.round(x / s), -127, 127) * s
    assert torch.equal(q(x), conv(xq))


def _weight_only_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 8))
    lowbit.quantize(model, weights="qint4")
    model[2] = lowbit.nn.Linear4bit.from_module(nn.Linear(128, 32), quant_type="nf4", double_quant=True)
    lowbit.freeze(model)
    return model


def test_compile_traces_in_one_graph():
    """fullgraph=True: no graph break in the quantized forward (aot_eager: same kernels, exact)."""
    model = _weight_only_model()
    x = torch.randn(4, 64)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert torch.equal(out, eager)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    model = _weight_only_model()
    x = torch.randn(4, 64)
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("weights", WEIGHTS)
def test_cuda_qlinear_freeze_move_and_compile(weights):
    lin = _lin()
    x = torch.randn(5, 96)
    q_cpu = QLinear.from_module(_lin(), weights=weights)
    q_cpu.freeze()
    q = QLinear.from_module(lin.cuda(), weights=weights, activations="qint8", act_dynamic=True)
    xc = x.cuda()
    y0 = q(xc)
    q.freeze()
    assert q.qstate.device.type == "cuda"
    assert torch.equal(q(xc), y0)
    # quantizing on the GPU packs the same codes as on the CPU
    assert torch.equal(q.qstate.data.cpu(), q_cpu.qstate.data)
    q.cpu()
    assert q.qstate.device.type == "cpu"
    q.cuda()
    wq = QLinear.from_module(_lin().cuda(), weights=weights)
    wq.freeze()
    with torch.no_grad():
        eager = wq(xc)
        torch._dynamo.reset()
        out = torch.compile(wq, fullgraph=True)(xc)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_qconv2d_static_activations():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).cuda()
    q = QConv2d.from_module(conv, weights="qint8", activations="qint8")
    x = torch.randn(2, 4, 8, 8, device="cuda")
    with lowbit.Calibration():
        q(x)
    assert q.input_scale.device.type == "cuda" and q.input_scale > 0
    y = q(x)
    q.freeze()
    assert torch.equal(q(x), y)
    assert (y - conv(x)).abs().max() < 0.05
