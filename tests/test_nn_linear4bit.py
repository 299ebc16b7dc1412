"""Linear4bit: bitsandbytes-identical 4-bit Linear, state_dict, device moves, gradients, QLoRA adapters."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import effective_bits_4bit
from lowbit.nn import Linear4bit
from lowbit.tensor.functional import dequantize


def _lin(in_f=96, out_f=40, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f).to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_is_linear_on_dequantized_weight(quant_type, double_quant):
    lin = _lin()
    m = Linear4bit.from_module(lin, quant_type=quant_type, double_quant=double_quant)
    x = torch.randn(3, 5, 96)
    y_fake = m(x)  # before packing: fake-quantized float weight
    m.quantize_weight()
    assert m.frozen and (m.qstate.nested is not None) == double_quant
    y = m(x)
    assert torch.equal(y, y_fake)
    assert torch.equal(y, F.linear(x, dequantize(m.qstate), lin.bias))


@pytest.mark.oracle
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_linear4bit(quant_type, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    # in_features a multiple of the block (64): bitsandbytes 0.50.2's AVX-512 CPU dequantize mis-assigns
    # block scales when a 64-block straddles two rows of a weight whose row length is not a multiple of
    # 64 (measured: in_features=96 gives errors up to 2.0 on N(0,1) weights, 100 and 128 do not), so its
    # output is only a reference where rows hold whole blocks. Ragged rows are covered by the byte-identity
    # tests of the primitive (test_formats_codebook.py).
    lin = _lin(in_f=128)
    ref = bnb.nn.Linear4bit(128, 40, quant_type=quant_type, compress_statistics=double_quant,
                            compute_dtype=torch.float32)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")  # bitsandbytes quantizes on the device move
    m = Linear4bit.from_module(lin, quant_type=quant_type, double_quant=double_quant,
                               compute_dtype=torch.float32).quantize_weight()
    assert torch.equal(m.qstate.data.reshape(-1), ref.weight.data.reshape(-1))
    w_bnb = bnb.functional.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert torch.equal(dequantize(m.qstate), w_bnb)
    x = torch.randn(4, 128)
    with torch.no_grad():
        y, y_ref = m(x), ref(x)
    # bitsandbytes picks its fused CPU forward by processor; some kernels round activations to bfloat16.
    # Bound: two bf16 roundings per product (relative 2**-8 each) plus fp32 accumulation over K terms.
    bound = (2 * 2**-8 + 128 * 2**-24) * (x.abs() @ w_bnb.abs().T) * 1.01 + 1e-6
    assert ((y - y_ref).abs() <= bound).all()
    assert torch.equal(y, F.linear(x, w_bnb, lin.bias))


def test_double_quant_reaches_documented_bits():
    m = Linear4bit(1024, 1024, bias=False, quant_type="nf4", double_quant=True).quantize_weight(block_size=64)
    assert m.qstate.bits_per_element == pytest.approx(effective_bits_4bit(64, True), abs=2e-3)
    assert effective_bits_4bit(64, True) == pytest.approx(4.127, abs=1e-3)
    m2 = Linear4bit(1024, 1024, bias=False, quant_type="nf4").quantize_weight()
    assert m2.qstate.bits_per_element == pytest.approx(4.5)
    m3 = Linear4bit(256, 256, bias=False).quantize_weight(block_size=128)
    assert m3.qstate.block_size == 128


def test_compute_dtype_and_output_dtype():
    lin = _lin()
    m = Linear4bit.from_module(lin, compute_dtype="bfloat16").quantize_weight()
    x = torch.randn(2, 96)
    y = m(x)
    assert y.dtype == torch.float32
    ref = F.linear(x.bfloat16(), dequantize(m.qstate).bfloat16(), lin.bias.bfloat16()).float()
    assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(4, 4, compute_dtype="int8")
    with pytest.raises(ValueError, match="quant_type"):
        Linear4bit(4, 4, quant_type="nf3")


def test_state_dict_roundtrip_and_dtype_moves():
    m = Linear4bit.from_module(_lin(), quant_type="nf4", double_quant=True).quantize_weight()
    sd = m.state_dict()
    assert {"weight.data", "weight.nested.data", "weight.nested.scales", "weight.meta", "bias"} <= set(sd)
    fresh = Linear4bit(96, 40, quant_type="nf4", double_quant=True)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 96)
    assert torch.equal(fresh(x), m(x))
    m.to(torch.float16)  # packed codes and fp32 statistics keep their dtypes
    assert m.qstate.data.dtype == torch.uint8 and m.qstate.nested.scales.dtype == torch.float32
    assert m(x.half()).dtype == torch.float16


@pytest.fixture
def one_thread():
    # tiny matmuls: one thread avoids oversubscription on a shared 2-core CI box
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_gradients_reach_input_and_lora_adapter(one_thread):
    torch.manual_seed(0)
    base = Linear4bit.from_module(nn.Linear(32, 32), quant_type="nf4").quantize_weight()
    assert not any(p.requires_grad for n, p in base.named_parameters() if n != "bias")
    base.bias.requires_grad_(False)
    rank = 4
    lora_a = nn.Parameter(torch.randn(rank, 32) * 0.1)
    lora_b = nn.Parameter(torch.zeros(32, rank))

    def model(x):
        return base(x) + F.linear(F.linear(x, lora_a), lora_b)

    x = torch.randn(64, 32, requires_grad=True)
    target_w = torch.randn(32, rank) @ torch.randn(rank, 32) * 0.1  # reachable by a rank-4 adapter
    target = base(x).detach() + x.detach() @ target_w.t()
    model(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    opt = torch.optim.Adam([lora_a, lora_b], lr=3e-2)
    state_before = base.qstate.data.clone()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = F.mse_loss(model(x.detach()), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert torch.equal(base.qstate.data, state_before)  # the 4-bit base stays frozen


@pytest.mark.cuda
def test_cuda_forward_and_move():
    lin = _lin()
    m = Linear4bit.from_module(lin, quant_type="nf4", double_quant=True, compute_dtype=torch.float16)
    m.quantize_weight()
    x = torch.randn(8, 96)
    y_cpu = m(x)
    m.cuda()
    assert m.qstate.device.type == "cuda" and m.qstate.nested.data.device.type == "cuda"
    y = m(x.cuda())
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=2e-2, atol=2e-2)
    # quantizing directly on the GPU gives the same packed codes as on the CPU (midpoint rule)
    g = Linear4bit.from_module(_lin().cuda(), quant_type="nf4").quantize_weight()
    c = Linear4bit.from_module(_lin(), quant_type="nf4").quantize_weight()
    assert torch.equal(g.qstate.data.cpu(), c.qstate.data)
