"""Dynamic int8 LSTM / GRU: the recurrence equals torch's, quantization error is small, freeze is exact."""
import copy

import pytest
import torch
from torch import nn

from lowbit.nn import DynamicQuantGRU, DynamicQuantLSTM, QuantStateDict
from lowbit.tensor.functional import dequantize

CASES = [
    dict(num_layers=1, bidirectional=False, batch_first=False),
    dict(num_layers=2, bidirectional=True, batch_first=True),
]


def _float_twin(rnn: nn.RNNBase, q) -> nn.RNNBase:
    """The float RNN with q's dequantized weights."""
    ref = copy.deepcopy(rnn)
    with torch.no_grad():
        for name in q.quantized_param_names():
            getattr(ref, name).copy_(dequantize(q.qstate[name]))
    return ref


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("case", CASES)
def test_recurrence_matches_torch_with_dequantized_weights(kind, case):
    torch.manual_seed(0)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(12, 16, **case)
    cls = DynamicQuantLSTM if kind == "lstm" else DynamicQuantGRU
    q = cls.from_module(rnn, activations=None)  # weight-only: isolates the recurrence
    q.freeze()
    ref = _float_twin(rnn, q)
    x = torch.randn(3, 7, 12)
    out, h = q(x)
    out_r, h_r = ref(x)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    if kind == "lstm":
        torch.testing.assert_close(h[0], h_r[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h[1], h_r[1], rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(h, h_r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_dynamic_int8_close_to_float_and_freeze_exact(kind):
    torch.manual_seed(0)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(12, 32, num_layers=2, batch_first=True)
    cls = DynamicQuantLSTM if kind == "lstm" else DynamicQuantGRU
    q = cls.from_module(rnn)
    x = torch.randn(4, 10, 12)
    y_fake, _ = q(x)
    q.freeze()
    y, _ = q(x)
    assert torch.equal(y, y_fake)
    y_float, _ = rnn(x)
    err = (y - y_float).abs().max().item()
    assert 0 < err < 0.02  # quantized, but close
    assert isinstance(q.qstate, QuantStateDict)
    float_bytes = sum(p.numel() * 4 for n, p in rnn.named_parameters() if n.startswith("weight"))
    assert q.qstate.nbytes < 0.3 * float_bytes


def test_state_dict_compatibility_and_roundtrip():
    torch.manual_seed(0)
    rnn = nn.LSTM(8, 16, bidirectional=True)
    q = DynamicQuantLSTM(8, 16, bidirectional=True)
    q.load_state_dict(rnn.state_dict())  # float nn.LSTM checkpoint loads directly
    q.freeze()
    sd = q.state_dict()
    assert "weight_ih_l0_reverse.data" in sd and "bias_hh_l0" in sd
    fresh = DynamicQuantLSTM(8, 16, bidirectional=True)
    fresh.load_state_dict(sd)
    x = torch.randn(5, 2, 8)
    assert torch.equal(fresh(x)[0], q(x)[0])


def test_initial_state_and_unbatched_input():
    torch.manual_seed(0)
    rnn = nn.GRU(6, 10, num_layers=2)
    q = DynamicQuantGRU.from_module(rnn, activations=None)
    q.freeze()
    ref = _float_twin(rnn, q)
    x = torch.randn(4, 6)  # unbatched [T, F]
    h0 = torch.randn(2, 10)
    out, h = q(x, h0)
    out_r, h_r = ref(x, h0)
    assert out.shape == out_r.shape == (4, 10)
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_r, rtol=1e-5, atol=1e-5)


def test_rejects_unsupported():
    with pytest.raises(ValueError, match="proj_size"):
        DynamicQuantLSTM.from_module(nn.LSTM(4, 8, proj_size=2))
    with pytest.raises(TypeError, match="nn.GRU"):
        DynamicQuantGRU.from_module(nn.LSTM(4, 8))
    q = DynamicQuantLSTM(4, 8)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 1, 4), [3])
    with pytest.raises(TypeError, match="PackedSequence"):
        q(packed)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_cuda_dynamic_rnn_matches_cpu(kind):
    torch.manual_seed(0)
    rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(12, 32, num_layers=2, batch_first=True, bidirectional=True)
    cls = DynamicQuantLSTM if kind == "lstm" else DynamicQuantGRU
    q = cls.from_module(rnn)
    q.freeze()
    x = torch.randn(4, 10, 12)
    y_cpu, _ = q(x)
    q.cuda()
    assert all(s.device.type == "cuda" for s in q.qstate.values())
    y, _ = q(x.cuda())
    torch.testing.assert_close(y.cpu(), y_cpu, rtol=1e-3, atol=1e-3)
