"""The calibration pipeline's device traffic (issue 20, run 7): the next block prefetched on a side stream,
the non-block weights put back instead of copied back, the finished blocks' states following them home."""
import pytest
import torch
from torch import nn

from lowbit.model import _ptq_staged
from lowbit.model._ptq_blocks import _restore_kept, _to_device_except
from lowbit.model._ptq_staged import _prefetching, _RunConfig, _states_follow

transformers = pytest.importorskip("transformers")


def _tiny():
    from tests.test_sequential import _tiny_llama

    return _tiny_llama()


def test_restore_kept_puts_back_the_same_tensors(monkeypatch):
    m = _tiny()
    blocks = m.model.layers
    emb = m.model.embed_tokens.weight
    before = emb.data
    inv = m.model.rotary_emb.inv_freq
    other = torch.device("cpu", 0)  # a "device" unequal to the blocks' home; moves to it copy
    orig_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self.clone() if a and a[0] == other
                        else orig_to(self, *a, **k))
    keep = []
    _to_device_except(m, blocks, other, keep=keep)
    assert emb.data.data_ptr() != before.data_ptr() and m.lm_head.weight is emb  # tied: moved once
    assert m.model.rotary_emb.inv_freq is not inv
    assert len(keep) >= 3  # embedding, final norm, rotary buffer
    _restore_kept(keep)
    assert emb.data.data_ptr() == before.data_ptr() and emb.device.type == "cpu" and keep == []
    assert m.model.rotary_emb.inv_freq is inv


def test_states_follow_the_block_home():
    from lowbit.algorithms.rtn import rtn_quantize
    from lowbit.model._ptq_blocks import _install

    m = _tiny()
    n = "model.layers.0.self_attn.q_proj"
    lin = m.get_submodule(n)
    st = rtn_quantize(lin.weight.detach(), 4, 32, False)
    new = _install(m, n, lin, st)
    own = new.quant_states()["weight"]
    states = {n: st.to("meta")}  # as installed on the device, the module since moved home
    _states_follow(states, [n], m, torch.device("cpu"))
    assert states[n] is own
    states = {n: own}
    _states_follow(states, [n], m, torch.device("cpu"))  # already home: unchanged
    assert states[n] is own


def test_prefetching_only_for_cuda_blocks_kept_off_the_device(monkeypatch):
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _prefetching(cuda, [cpu, cpu], _RunConfig())
    assert not _prefetching(cpu, [cpu, cpu], _RunConfig())
    assert not _prefetching(cuda, [cpu], _RunConfig())  # one block: nothing to prefetch
    assert not _prefetching(cuda, [cpu, cuda], _RunConfig())
    assert not _prefetching(cuda, [cpu, cpu], _RunConfig(stream=object()))
    monkeypatch.setenv("LOWBIT_PREFETCH", "0")
    assert not _prefetching(cuda, [cpu, cpu], _RunConfig())


@pytest.mark.cuda
def test_prefetch_and_put_back_give_the_same_model_on_cuda(monkeypatch):
    from tests.test_sequential import _ids

    from lowbit.model.sequential import quantize_model_ptq

    out = {}
    for pre in ("1", "0"):
        monkeypatch.setenv("LOWBIT_PREFETCH", pre)
        m = _tiny()
        emb = m.model.embed_tokens.weight.data
        quantize_model_ptq(m, method="gptq", bits=4, group_size=32, sym=False, calib_dataset=_ids(6, 32),
                           micro_batch=2, device="cuda", progress=False)
        assert m.ptq_summary["block_prefetch"] is (pre == "1")
        assert m.model.embed_tokens.weight.data.data_ptr() == emb.data_ptr()  # the original tensor back
        out[pre] = {k: v.cpu() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    assert out["1"].keys() == out["0"].keys()
    assert all(torch.equal(out["1"][k], out["0"][k]) for k in out["1"])


@pytest.mark.cuda
def test_prefetched_weights_not_reused_while_the_gpu_lags(monkeypatch):
    """The prefetched blocks' tensors live in the side stream's memory pool but are used on the default stream: with
    the GPU far behind the host (a sleep queued before every block forward) a replaced linear's float weight is
    dropped while its block's last pass is still queued, and the next prefetch must not get that memory before the
    pass ran (run 10 found the codes changed from layer 2 on without ``record_stream``). The codes equal those of the
    run without prefetch."""
    from tests.test_sequential import _ids

    from lowbit.model.sequential import quantize_model_ptq

    import transformers

    def five_blocks():  # the race needs a prefetched block's dropped weights and a later prefetch: >= 4 blocks
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(cfg).eval()

    out = {}
    for pre in ("0", "1"):
        monkeypatch.setenv("LOWBIT_PREFETCH", pre)
        m = five_blocks()
        cls = type(m.model.layers[0])
        orig = cls.forward

        def slow(self, *a, _orig=orig, **k):
            torch.cuda._sleep(20_000_000)  # about 10 ms of GPU time queued ahead of the block's kernels
            return _orig(self, *a, **k)

        monkeypatch.setattr(cls, "forward", slow)
        quantize_model_ptq(m, method="gptq", bits=4, group_size=32, sym=False, calib_dataset=_ids(6, 32),
                           micro_batch=2, device="cuda", progress=False)
        monkeypatch.setattr(cls, "forward", orig)
        out[pre] = {k: v.cpu() for k, v in m.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(out["1"][k], out["0"][k]) for k in out["0"])


def test_quant_state_to_with_a_copy_function():
    """``QuantState.to(device, copy=fn)`` moves every tensor (the nested scales' state too) through ``fn``."""
    from lowbit import quantize

    st = quantize(torch.randn(64, 512), scheme="nf4", block_size=64, double_quant=True, double_quant_block_size=256)
    seen = []
    moved = st.to("cpu", copy=lambda t: seen.append(t.shape) or t.clone())
    assert len(seen) >= 3 and moved.nested is not None
    assert all(torch.equal(a, b) for a, b in zip(moved.state_dict("x.").values(), st.state_dict("x.").values())
               if isinstance(a, torch.Tensor))


def test_move_block_falls_back_to_to(monkeypatch):
    """Without a GPU on either side (or ``LOWBIT_PREFETCH_STAGED=0``) the staged move is ``block.to``: the same
    parameter objects, the same values."""
    lin = nn.Linear(8, 4)
    w = lin.weight
    ref = lin.weight.detach().clone()
    _ptq_staged._move_block(lin, torch.device("cpu"), stream=None)
    assert lin.weight is w and torch.equal(lin.weight, ref)
    monkeypatch.setenv("LOWBIT_PREFETCH_STAGED", "0")
    _ptq_staged._move_block(lin, torch.device("cpu"), stream=None)
    assert torch.equal(lin.weight, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("stage_bytes", [4096, 1000, 2 ** 25])
def test_staged_copies_move_the_same_bytes_on_cuda(monkeypatch, stage_bytes):
    """Session 10: the block copies host <-> GPU through two pinned buffers (no pageable cudaMemcpy holding the
    driver): every parameter and buffer arrives with the bytes of ``.to``, both ways, with chunks that do not divide
    the tensors (odd sizes, bf16/fp32, a buffer), on the given side stream; the parameter objects are kept."""
    monkeypatch.setattr(_ptq_staged, "STAGE_BYTES", stage_bytes)
    monkeypatch.setattr(_ptq_staged, "STAGE_MIN_BYTES", 1)  # every tensor staged (the default skips small ones)
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(333, 517), nn.Linear(517, 7)).to(torch.bfloat16)
    m[1].float()
    m.register_buffer("extra", torch.randn(1001, generator=g))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    from lowbit.algorithms.gptq import gptq_quantize
    from lowbit.nn import QLinear

    lin = nn.Linear(256, 96, bias=False)
    X = torch.randn(512, 256, generator=g)
    q = QLinear.from_quant_state(lin, gptq_quantize(lin.weight.detach(), X.T @ X / 512, 4, 128, False).state)
    m.append(q)  # a quantized linear: its state moves outside the parameters (QuantState.to)
    ref = {k: v.detach().clone() for k, v in m.state_dict().items()}
    params = [p for p in m.parameters()]
    side = torch.cuda.Stream()
    _ptq_staged._move_block(m, torch.device("cuda", torch.cuda.current_device()), side)
    side.synchronize()
    assert all(p is q for p, q in zip(params, m.parameters()))
    assert m[2].quant_states()["weight"].device.type == "cuda"
    for k, v in m.state_dict().items():
        if not k.endswith(".meta"):  # a state's metadata (JSON bytes) stays on the host
            assert v.is_cuda and v.dtype == ref[k].dtype and torch.equal(v.cpu(), ref[k]), k
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(2)  # changed on the GPU: the way home must carry the new bytes
    want = {k: v.detach().cpu() for k, v in m.state_dict().items()}
    side.wait_stream(torch.cuda.current_stream())  # as the pipeline's way home does (wait_main)
    _ptq_staged._move_block(m, torch.device("cpu"), side)
    assert m[2].quant_states()["weight"].device.type == "cpu"
    for k, v in m.state_dict().items():
        assert not v.is_cuda and torch.equal(v, want[k]), k
    assert all(not t.is_cuda for t in m[2].quant_states()["weight"].state_dict("w.").values()
               if isinstance(t, torch.Tensor))


@pytest.mark.cuda
def test_stage_pool_serves_every_size_on_cuda(monkeypatch):
    """Session 11: a tensor of one chunk is copied through the stream's pinned staging buffers too (no page-locking
    allocation of its own): the same bytes both ways, and no new pool entry after the first copy."""
    monkeypatch.setattr(_ptq_staged, "STAGE_BYTES", 2 ** 16)
    monkeypatch.setattr(_ptq_staged, "STAGE_MIN_BYTES", 1)
    side = torch.cuda.Stream()
    key = (id(side), 2 ** 16)
    bufs = _ptq_staged._stage_buffers(side, 2 ** 16)
    assert len(bufs) == 2 and all(b.is_pinned() and b.numel() == 2 ** 16 for b in bufs)
    n_pool = len(_ptq_staged._STAGE_POOL)
    dev = torch.device("cuda", torch.cuda.current_device())
    for numel in (1000, 2 ** 15, 2 ** 16 // 2 + 3, 3 * 2 ** 15 + 7):  # one chunk (bf16 / fp32), and several
        t = torch.randn(numel).to(torch.bfloat16 if numel % 2 else torch.float32)
        got = _ptq_staged._staged_copy(t, dev, side)
        side.synchronize()
        assert got.is_cuda and torch.equal(got.cpu(), t)
        back = _ptq_staged._staged_copy(got, torch.device("cpu"), side)
        assert not back.is_cuda and torch.equal(back, t)
    assert len(_ptq_staged._STAGE_POOL) == n_pool and _ptq_staged._STAGE_POOL[key] is bufs
    _ptq_staged._STAGE_POOL.pop(key, None)
