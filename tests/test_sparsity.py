"""2:4 semi-structured sparsity: pruning (magnitude, SparseGPT), SparseLinear, methods, formats (issue 21)."""
import json
import time
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.algorithms.sparsegpt import check_nm, magnitude_prune, nm_mask, quantize_kept, sparsegpt_prune
from lowbit.kernels import reference
from lowbit.kernels import sparse as ks
from lowbit.nn import QLinear, SparseLinear

transformers = pytest.importorskip("transformers")


def _tiny(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for blk in model.model.layers:
            blk.input_layernorm.weight.uniform_(0.5, 2.0)
            blk.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    return model


def _ids(n=8, seq=32, seed=1):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def _correlated(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) @ torch.randn(k, k, generator=g) * 0.3 + torch.randn(n, k, generator=g)


def _exactly_24(w: torch.Tensor) -> bool:
    R, K = w.shape
    return bool(((w.reshape(R, K // 4, 4) != 0).sum(-1) == 2).all())


# ---------------------------------------------------------------------------------------------
# the algorithms


def test_nm_mask_and_magnitude():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.0, -2.0, 1.0]])
    assert nm_mask(w.abs()).tolist() == [[False, True, True, False, False, False, True, True]]
    pw, mask = magnitude_prune(w)
    assert pw.tolist() == [[0.0, -4.0, 3.0, 0.0, 0.0, 0.0, -2.0, 1.0]]
    w = torch.randn(32, 64)
    pw, mask = magnitude_prune(w)
    assert _exactly_24(pw) and (mask.reshape(32, 16, 4).sum(-1) == 2).all()
    kept_min = torch.where(mask, w.abs(), torch.inf).reshape(32, 16, 4).amin(-1)
    dropped_max = torch.where(~mask, w.abs(), -1).reshape(32, 16, 4).amax(-1)
    assert (kept_min >= dropped_max).all()
    with pytest.raises(ValueError, match="multiple of M=4"):
        magnitude_prune(torch.randn(4, 6))


def _sparsegpt_float64_reference(W, H, percdamp=0.01):
    """SparseGPT 2:4 with explicit float64 inverses of the remaining Hessian (no Cholesky, no lazy blocks):
    column j's OBS update uses row 0 of inv(H[j:, j:]), the mask of a group the saliency w^2 / [inv(H[c:, c:])]_00."""
    W = W.double().clone()
    H = H.double().clone()
    K = W.shape[1]
    H += percdamp * torch.diag(H).mean() * torch.eye(K, dtype=torch.float64)
    inv_rest = [torch.linalg.inv(H[j:, j:]) for j in range(K)]
    d = torch.tensor([inv_rest[j][0, 0].item() for j in range(K)], dtype=torch.float64)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(K):
        if j % 4 == 0:
            # [H^-1]_jj in the paper's reference is U_jj of the Cholesky factor: U_jj^2 = [inv(H[j:, j:])]_00
            sal = W[:, j:j + 4] ** 2 / d[j:j + 4]
            idx = sal.topk(2, dim=1).indices
            mask[:, j:j + 4].scatter_(1, idx, True)
        w = W[:, j].clone()
        q = torch.where(mask[:, j], w, torch.zeros_like(w))
        err = (w - q) / d[j]
        W[:, j:] -= err[:, None] * inv_rest[j][0][None, :]
        W[:, j] = q
    return W, mask


def test_sparsegpt_matches_float64_obs_reference():
    torch.manual_seed(0)
    K = 48
    W = torch.randn(16, K)
    X = _correlated(512, K)
    H = X.T @ X / 512
    ref_w, ref_mask = _sparsegpt_float64_reference(W, H)
    res = sparsegpt_prune(W, H, blocksize=16)  # lazy block updates exercised (3 blocks)
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight.double(), ref_w, atol=2e-4, rtol=1e-4)
    assert _exactly_24(res.weight)


def test_sparsegpt_beats_magnitude_on_layer_output_error():
    torch.manual_seed(0)
    W = torch.randn(64, 128)
    X = _correlated(2048, 128)
    H = X.T @ X / 2048

    def err(Wh):
        E = W - Wh
        return float(((E @ H) * E).sum())

    mag = err(magnitude_prune(W)[0])
    res = sparsegpt_prune(W, H)
    assert check_nm(res.weight) and err(res.weight) < 0.8 * mag
    r8 = sparsegpt_prune(W, H, bits=8)
    assert check_nm(r8.weight) and err(r8.weight) < 0.8 * mag
    # the int8 grid: symmetric per channel, codes within [1, 255] (int8 -127..127), pruned = zero point
    assert r8.scales.shape == (64, 1) and int(r8.codes.min()) >= 1
    deq = (r8.codes.float() - r8.zeros) * r8.scales
    torch.testing.assert_close(deq, r8.weight)
    assert bool((r8.codes[~r8.mask] == 128).all())
    r4 = sparsegpt_prune(W, H, bits=4, group_size=32)
    assert check_nm(r4.weight) and r4.scales.shape == (64, 4)
    torch.testing.assert_close((r4.codes.float() - r4.zeros.repeat_interleave(32, 1)) * r4.scales.repeat_interleave(32, 1),
                               r4.weight)


def test_quantize_kept_keeps_pattern():
    pw, mask = magnitude_prune(torch.randn(16, 64))
    w_hat, codes, scales, zeros = quantize_kept(pw, mask, 8)
    assert check_nm(w_hat) and bool((codes[~mask] == 128).all())
    assert (w_hat - pw).abs().max() <= scales.max() / 2 + 1e-6


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="H has shape"):
        sparsegpt_prune(torch.randn(4, 8), torch.eye(4))
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.randn(4, 8), 4, 4)


# ---------------------------------------------------------------------------------------------
# the module and kernels (CPU: the dense reference)


def test_sparse_linear_cpu_forward_is_the_dense_reference():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    pw, mask = magnitude_prune(lin.weight.detach())
    sl = SparseLinear.from_pruned(lin, pw)
    x = torch.randn(3, 5, 64)
    assert torch.equal(sl(x), F.linear(x, pw, lin.bias))
    from lowbit.model.sparse_methods import _int8_channel_state

    w_hat, codes, scales, zeros = quantize_kept(pw, mask, 8)
    st = _int8_channel_state(codes, scales, torch.float32)
    torch.testing.assert_close(lowbit.dequantize(st), w_hat)
    s8 = SparseLinear.from_pruned(nn.Linear(64, 32), state=st)
    from lowbit.kernels.api import prepare_int8

    w8, ws = prepare_int8(st)
    assert torch.equal(s8(x), reference.int8_linear_dynamic(x, w8, ws, s8.bias))
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        SparseLinear.from_pruned(nn.Linear(64, 32))
    with pytest.raises(ValueError, match="qint8"):
        SparseLinear(64, 32, weights="qint4")
    with pytest.raises(RuntimeError, match="backend='sparse' needs a CUDA"):
        ks.sparse24_linear(x, pw, backend="sparse")
    assert ks.prepare_24(pw) is None  # CPU: nothing to compress


# ---------------------------------------------------------------------------------------------
# the methods


@pytest.mark.parametrize("method,kw,cls", [
    ("sparse-2:4", {"algorithm": "magnitude"}, SparseLinear),
    ("sparse-2:4", {}, SparseLinear),
    ("sparse-2:4-int8", {}, SparseLinear),
    ("sparse-2:4-int8", {"algorithm": "magnitude"}, SparseLinear),
    ("sparse-2:4-int4", {"group_size": 32}, QLinear),
])
def test_methods_prune_every_layer_exactly_24(method, kw, cls):
    model = _tiny()
    ids = _ids()
    if kw.get("algorithm") != "magnitude":
        kw = dict(kw, calib_dataset=ids, progress=False)
    lowbit.quantize(model, method=method, **kw)
    layers = {n: m for n, m in model.named_modules() if n.endswith("proj")}
    assert len(layers) == 14 and all(type(m) is cls for m in layers.values())
    assert type(model.lm_head) is nn.Linear  # excluded by default
    for n, m in layers.items():
        w = lowbit.dequantize(m.qstate) if m.qstate is not None else m.weight
        if method == "sparse-2:4":
            assert _exactly_24(w), n  # float: every group of 4 keeps exactly 2 (non-zero) weights
        else:
            assert check_nm(w), n  # quantized: a kept weight may round to 0
            assert float((w == 0).float().mean()) >= 0.5
    assert model.sparsity_summary["n_layers"] == 14
    assert torch.isfinite(model(ids).logits).all()


def test_sparsegpt_beats_magnitude_on_the_model():
    ids = _ids(16, 32)
    ref = _tiny()(ids).logits
    errs = {}
    for alg in ("magnitude", "sparsegpt"):
        m = _tiny()
        lowbit.quantize(m, method="sparse-2:4", algorithm=alg, calib_dataset=None if alg == "magnitude" else ids,
                        progress=False)
        errs[alg] = float((m(ids).logits - ref).pow(2).mean())
    assert errs["sparsegpt"] < 0.7 * errs["magnitude"], errs


def test_method_errors_are_clear():
    with pytest.raises(ValueError, match="needs calib_dataset"):
        lowbit.quantize(_tiny(), method="sparse-2:4")
    with pytest.raises(ValueError, match="does not accept 'bits'"):
        lowbit.quantize(_tiny(), method="sparse-2:4-int8", bits=4)
    with pytest.raises(ValueError, match="algorithm="):
        lowbit.quantize(_tiny(), method="sparse-2:4", algorithm="wanda")


def test_method_table_drives_plan():
    from lowbit.model.methods import METHODS
    from lowbit.model.plan import plan

    assert METHODS.get("sparse-2:4-int8").calibrated and not METHODS.get("int8-dynamic").calibrated
    m = _tiny()
    p8, pf = plan(m, "sparse-2:4-int8"), plan(m, "sparse-2:4")
    assert p8["output_mb"] < pf["output_mb"] and p8["peak_ram_mb"] > plan(m, "rtn")["peak_ram_mb"]


# ---------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize("method", ["sparse-2:4", "sparse-2:4-int8"])
def test_native_round_trip(tmp_path, method):
    model = _tiny()
    ids = _ids()
    lowbit.quantize(model, method=method, algorithm="magnitude")
    ref = model(ids).logits
    lowbit.save(model, tmp_path / "ck")
    m2 = lowbit.load(tmp_path / "ck")
    assert type(m2.model.layers[0].mlp.down_proj) is SparseLinear
    assert torch.equal(m2(ids).logits, ref)
    qmap = json.loads((tmp_path / "ck" / "lowbit_quantization.json").read_text())["quantization_map"]
    assert qmap["model.layers.0.self_attn.q_proj"]["class"] == "SparseLinear"


def test_bitmask_packing_matches_numpy():
    import numpy as np

    from lowbit.io.compressed_tensors_sparse import _pack_bits_little, _unpack_bits_little

    mask = torch.rand(5, 44) > 0.5
    ref = np.packbits(mask.numpy(), axis=-1, bitorder="little")
    assert np.array_equal(_pack_bits_little(mask).numpy(), ref)
    assert torch.equal(_unpack_bits_little(torch.from_numpy(ref), 44), mask)


@pytest.mark.parametrize("method", ["sparse-2:4", "sparse-2:4-int8"])
def test_compressed_tensors_sparse24_export(tmp_path, method):
    from safetensors.torch import load_file

    from lowbit.io.compressed_tensors_sparse import decompress_24_bitmask, export_sparse24, load_sparse24

    model = _tiny(tie=False)
    ids = _ids()
    lowbit.quantize(model, method=method, algorithm="magnitude")
    ref = model(ids).logits
    out = export_sparse24(model, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    sc = cfg["sparsity_config"]
    assert sc["format"] == "sparse-24-bitmask" and sc["sparsity_structure"] == "2:4"
    assert "lm_head" in sc["ignore"]
    # compressed-tensors parses the sparsity config
    ct_config = pytest.importorskip("compressed_tensors.config")
    parsed = ct_config.SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert type(parsed).__name__ == "Sparse24BitMaskConfig"
    tensors = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    name = "model.layers.1.mlp.down_proj"
    lin = model.get_submodule(name)
    want = lin.weight.detach() if lin.weights is None else (lin.qstate.data.view(64, 96).to(torch.int16) - 128).to(torch.int8)
    assert tensors[f"{name}.compressed"].shape == (64, 48) and tensors[f"{name}.bitmask"].shape == (64, 12)
    assert tensors[f"{name}.shape"].flatten().tolist() == [64, 96]
    assert tensors[f"{name}.compressed"].dtype == (torch.float32 if method == "sparse-2:4" else torch.int8)
    assert torch.equal(decompress_24_bitmask(tensors[f"{name}.compressed"], tensors[f"{name}.bitmask"],
                                             tensors[f"{name}.shape"]), want)
    if method == "sparse-2:4-int8":
        assert cfg["format"] == "int-quantized" and cfg["config_groups"]["group_0"]["weights"]["strategy"] == "channel"
        assert tensors[f"{name}.weight_scale"].shape == (64, 1)
    # compressed-tensors' own decompressor (present up to compressed-tensors 0.14)
    try:
        from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor
    except ImportError:
        Sparse24BitMaskTensor = None
    if Sparse24BitMaskTensor is not None:
        for n, m in model.named_modules():
            if isinstance(m, SparseLinear):
                t = Sparse24BitMaskTensor.from_compressed_data(shape=tensors[f"{n}.shape"],
                                                               compressed=tensors[f"{n}.compressed"],
                                                               bitmask=tensors[f"{n}.bitmask"])
                w = m.weight.detach() if m.weights is None else \
                    (m.qstate.data.view(m.out_features, m.in_features).to(torch.int16) - 128).to(torch.int8)
                assert torch.equal(t.decompress(), w), n
                again = Sparse24BitMaskTensor.from_dense(w)  # and its compressor writes the same tensors
                assert torch.equal(again.compressed, tensors[f"{n}.compressed"])
                assert torch.equal(again.bitmask, tensors[f"{n}.bitmask"])
    m2 = load_sparse24(out)
    assert torch.equal(m2(ids).logits, ref)
    with pytest.raises(ValueError, match="no SparseLinear"):
        export_sparse24(_tiny(), tmp_path / "none")


def test_compressed_tensors_sparse24_rejects_non_24(tmp_path):
    from lowbit.io.compressed_tensors_sparse import compress_24_bitmask

    with pytest.raises(ValueError, match="not 2:4 sparse"):
        compress_24_bitmask(torch.randn(4, 8))


# ---------------------------------------------------------------------------------------------
# CUDA (the lent H200): cuSPARSELt paths against the references


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sparse_fp_matches_dense(dtype):
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    torch.manual_seed(0)
    w = magnitude_prune(torch.randn(256, 512, device="cuda"))[0].to(dtype)
    b = torch.randn(256, device="cuda", dtype=dtype)
    packed = ks.prepare_24(w)
    assert packed is not None
    for M in (1, 7, 64, 300):
        x = torch.randn(M, 512, device="cuda", dtype=dtype)
        y = ks.sparse24_linear(x, w, b, packed=packed, backend="sparse")
        ref = x.double() @ w.double().T + b.double()
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-2
        assert torch.equal(ks.sparse24_linear(x, w, b, packed=packed, backend="dense"), F.linear(x, w, b))


@pytest.mark.cuda
def test_cuda_sparse_int8_matches_reference():
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    from lowbit.model.sparse_methods import _int8_channel_state
    from lowbit.kernels.api import prepare_int8

    torch.manual_seed(0)
    pw, mask = magnitude_prune(torch.randn(256, 512, device="cuda"))
    _, codes, scales, _ = quantize_kept(pw, mask, 8)
    w8, s8 = prepare_int8(_int8_channel_state(codes, scales, torch.bfloat16))
    packed = ks.prepare_24(w8)
    bias = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    for M in (1, 16, 33, 512):
        x = torch.randn(M, 512, device="cuda", dtype=torch.bfloat16)
        y = ks.sparse24_int8_linear_dynamic(x, w8, s8, bias, packed=packed, backend="sparse").float()
        ref = reference.int8_linear_dynamic(x, w8, s8, bias).float()
        assert float((y - ref).abs().max() / ref.abs().max()) < 2e-2


@pytest.mark.cuda
def test_cuda_model_sparse_methods_run():
    ids = _ids().cuda()
    for method in ("sparse-2:4", "sparse-2:4-int8"):
        m = _tiny().to(torch.bfloat16).cuda()
        ref = m(ids).logits.float()
        lowbit.quantize(m, method=method, calib_dataset=ids, progress=False)
        out = m(ids).logits.float()
        assert torch.isfinite(out).all() and float((out - ref).pow(2).mean()) < float(ref.pow(2).mean())


def _cuda_modules(N=256, K=512, seed=0):
    from lowbit.model.sparse_methods import _int8_channel_state

    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=True, device="cuda", dtype=torch.bfloat16)
    wp, mask = magnitude_prune(lin.weight.detach().float())
    b = lin.bias.detach().clone()
    fp = SparseLinear.from_pruned(lin, wp)
    lin8 = nn.Linear(K, N, bias=True, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin8.bias.copy_(b)
    _, codes, scales, _ = quantize_kept(wp, mask, 8)
    i8 = SparseLinear.from_pruned(lin8, state=_int8_channel_state(codes, scales, torch.bfloat16).to("cuda"))
    return fp, i8, wp.to(torch.bfloat16), b


def _check_modules(fp, i8, wp, b, shapes):
    for shape in shapes:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            y = fp(x)
            ref = F.linear(x.double(), wp.double(), b.double())
            assert y.shape == ref.shape and y.dtype == torch.bfloat16
            assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-2, shape
            y8 = i8(x).float()
            r8 = reference.int8_linear_dynamic(x, *i8._int8(), b).float()
            assert y8.shape == r8.shape
            assert float((y8 - r8).abs().max() / r8.abs().max()) < 2e-2, shape


_SHAPES = [(1, 512), (8, 512), (16, 512), (64, 512), (300, 512), (1024, 512), (2, 150, 512)]


@pytest.mark.cuda
@pytest.mark.parametrize("tune", [True, False])
def test_cuda_sparse_linear_module_matches_dense_reference(monkeypatch, tune):
    """SparseLinear (float and W8A8) against float64 / lowbit's int8 reference at every M, tuned and untuned."""
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    monkeypatch.setattr(ks, "ALG_SEARCH", tune)
    monkeypatch.setattr(ks, "_PLAN", {})
    _check_modules(*_cuda_modules(), _SHAPES)
    assert bool(ks._PLAN) == tune


@pytest.mark.cuda
@pytest.mark.parametrize("plan", [("sparse", True, 0), ("sparse", False, 0), ("dense",)])
def test_cuda_sparse_linear_every_tuned_layout(monkeypatch, plan):
    """Each choice the tuner can make (row-major output, a transposed view, the dense kernel) is correct."""
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    monkeypatch.setattr(ks, "ALG_SEARCH", True)
    monkeypatch.setattr(ks, "_tuned", lambda *a, **k: plan)
    monkeypatch.setattr(ks, "_PLAN", {})
    _check_modules(*_cuda_modules(seed=1), _SHAPES)


@pytest.mark.cuda
def test_cuda_sparse_linear_graph_capture_untuned_shape():
    """A shape met first inside a CUDA graph capture runs untuned (no timing in capture) and replays right."""
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    fp, i8, wp, b = _cuda_modules(N=128, K=256, seed=2)
    x = torch.randn(272, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref8 = fp(x).clone(), i8(x).clone()  # eager (tuned) results
        g = torch.cuda.CUDAGraph()
        xs = x.clone()
        ks._PLAN.clear()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            with torch.cuda.graph(g):
                y, y8 = fp(xs), i8(xs)
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        torch.cuda.synchronize()
    assert float((y.float() - ref.float()).abs().max() / ref.float().abs().max()) < 1e-2
    assert float((y8.float() - ref8.float()).abs().max() / ref8.float().abs().max()) < 2e-2


_GLUE_CHECK = r"""
import torch
from lowbit.kernels import reference
from lowbit.kernels.triton import sparse24 as ts
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for M, K in ((1, 64), (5, 512), (3, 9000), (17, 28672), (2, 1100)):
        big = torch.randn(M, K + 24, device=dev) * 3
        big[0, 5] = 40.0
        x = big.to(dt)[:, 3:K + 3]  # rows not contiguous: read through their stride
        rows = M + (-M) % 16
        q, s = ts.quantize_rows_padded(x, rows)
        qr, sr = reference.quantize_rows(x, fp8=False)
        assert q.shape == (rows, K) and torch.equal(q[:M], qr) and torch.equal(s, sr), (dt, M, K)
        assert not q[M:].any()
for dt in (torch.float16, torch.bfloat16):
    for M, N in ((1, 64), (37, 200), (130, 70)):
        sx = torch.rand(M, device=dev) + 0.1
        bias = torch.randn(N, device=dev).to(dt)
        y = torch.randn(M, N, device=dev).to(dt)
        # within one unit in the last place (exact on the GPU; Triton's interpreter truncates to bf16)
        tol = 2.0 ** -10 if dt == torch.float16 else 2.0 ** -7
        for yin, b in ((y.clone(), bias), (y.t().contiguous().t(), None), (y.t().contiguous().t(), bias)):
            ref = y.float() * sx[:, None] + (b.float() if b is not None else 0.0)
            out = ts.rescale_tokens(yin, sx, b, dt)
            assert out.shape == (M, N) and out.is_contiguous() and out.dtype == dt
            assert float(((out.float() - ref.to(dt).float()).abs() / ref.abs().clamp(min=1e-3)).max()) <= tol, (dt, M)
        yy = y.clone()
        assert ts.rescale_tokens(yy, sx, None, dt).data_ptr() == yy.data_ptr()  # row-major: in place
print("glue ok")
"""


def test_int8_glue_kernels_in_the_triton_interpreter():
    """The Triton glue of the 2:4 int8 path (quantization into the padded operand, per-token rescale) in
    Triton's CPU interpreter: bit for bit lowbit's reference quantization (strided rows, K in one block and
    in chunks), pad rows zero, the rescale in both layouts. Needs triton without CUDA (not in CI's venv);
    on the GPU the same check runs compiled (test_cuda_int8_glue_kernels)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: test_cuda_int8_glue_kernels runs the compiled kernels")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root))
    p = subprocess.run([sys.executable, "-c", _GLUE_CHECK], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0 and "glue ok" in p.stdout, p.stderr[-3000:]


@pytest.mark.cuda
def test_cuda_int8_glue_kernels():
    pytest.importorskip("triton")
    exec(compile(_GLUE_CHECK, "glue_check", "exec"), {})


@pytest.mark.cuda
@pytest.mark.parametrize("objective,glue", [("eager", "fused"), ("graph", "previous")])
def test_cuda_tuner_objectives_and_glues(monkeypatch, objective, glue):
    """Both tuning objectives and both int8 glues give the reference's results; the tuner measured every
    candidate on the GPU by CUDA-graph replay and on the host; the int8 output is row-major with the fused glue."""
    if not ks.cusparselt_available():
        pytest.skip("no cuSPARSELt in this torch build")
    monkeypatch.setattr(ks, "ALG_SEARCH", True)
    monkeypatch.setattr(ks, "GLUE", glue)
    for name in ("_PLAN", "_TUNE_LOG", "_SEARCHED"):
        monkeypatch.setattr(ks, name, {})
    fp, i8, wp, b = _cuda_modules(seed=3)
    fp.tune_for = i8.tune_for = objective
    _check_modules(fp, i8, wp, b, [(1, 512), (300, 512), (2, 150, 512)])
    assert ks._TUNE_LOG and all(k[-1] == objective for k in ks._PLAN)
    for entry in ks._TUNE_LOG.values():
        ok = [c for c in entry["candidates"] if "error" not in c and "cut" not in c]
        assert ok and all(c["gpu_ms"] is not None and c["gpu_ms"] > 0 and c["host_ms"] > 0 for c in ok)
    if glue == "fused":
        with torch.no_grad():
            assert i8(torch.randn(300, 512, device="cuda", dtype=torch.bfloat16)).is_contiguous()


def test_cpu_int8_path_is_the_reference_bit_for_bit():
    torch.manual_seed(0)
    for K in (64, 1100, 2600):  # one and several exact float32 chunks of 1024
        x = torch.randn(2, 5, K) * 3
        w = torch.randint(-127, 128, (24, K), dtype=torch.int8)
        s, b = torch.rand(24) * 0.01, torch.randn(24)
        assert torch.equal(ks.sparse24_int8_linear_dynamic(x, w, s, b), reference.int8_linear_dynamic(x, w, s, b))


def test_cli_quantize_sparse_int8(tmp_path):
    import os
    import subprocess
    import sys

    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    tiny_llama(hidden=64, layers=2, intermediate=96).save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 400)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--model", str(tmp_path / "tiny"), "--method",
                        "sparse-2:4-int8", "--calib-dataset", str(tmp_path / "text.txt"), "--n-samples", "4",
                        "--calib-seq-len", "32", "--dataset", str(tmp_path / "text.txt"), "--max-windows", "2",
                        "--seq-len", "32", "--output", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    m = lowbit.load(tmp_path / "out")
    layers = [mod for n, mod in m.named_modules() if isinstance(mod, SparseLinear)]
    assert len(layers) == 14 and all(mod.weights == "qint8" for mod in layers)
    assert all(check_nm(lowbit.dequantize(mod.qstate)) for mod in layers)


def _fake_measure(timings, timed):
    """A stand-in for ks._measure: the candidate's figures from ``timings`` (a number = the same figure
    for GPU, host and eager time; a dict = those figures)."""
    def measure(fn, **kw):
        c = fn()
        timed.append(c)
        t = timings[c]
        return dict(t) if isinstance(t, dict) else {"gpu_ms": t, "host_ms": t, "eager_ms": t}
    return measure


def _fresh_tuner(monkeypatch):
    monkeypatch.setattr(ks, "_PLAN", {})
    monkeypatch.setattr(ks, "_TUNE_LOG", {})
    monkeypatch.setattr(ks, "_SEARCHED", {})
    monkeypatch.setattr(ks, "_capturing", lambda: False)


def test_tuning_caches_per_shape_and_picks_the_fastest(monkeypatch):
    """The cuSPARSELt tuning: one search per transpose_result, one measurement per candidate, once per key
    (shape, dtype, M bucket, dense allowed, objective); the cheapest wins (the dense path only under backend
    'auto'); no tuning inside a CUDA graph capture; what was measured is logged."""
    calls = []

    def fake_search(packed, b, transpose_result=False, **kw):
        calls.append(("search", transpose_result, b.shape[1]))
        return 5 if transpose_result else 0

    timings = {("sparse", True, 5): 3.0, ("sparse", True, 0): 4.0, ("sparse", False, 0): 2.0, ("dense",): 1.0}
    timed = []
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", fake_search, raising=False)
    monkeypatch.setattr(ks, "_measure", _fake_measure(timings, timed))
    _fresh_tuner(monkeypatch)
    monkeypatch.setattr(ks, "MODES", ks._parse_modes("T0,F0,Ts,Fs"))
    run_sparse = lambda tr, aid: ("sparse", tr, aid)  # noqa: E731
    run_dense = lambda: ("dense",)  # noqa: E731
    key = ("fp", 64, 128, torch.bfloat16, 64, True, False)
    b = torch.zeros(128, 40)
    assert ks._tuned(key, None, b, True, run_sparse, run_dense) == ("dense",)
    assert sorted(timed, key=str) == sorted(timings, key=str)
    assert [c for c in calls if c[0] == "search"] == [("search", True, 40), ("search", False, 40)]
    log = ks._TUNE_LOG[key + (True, "eager")]
    assert log["choice"] == ["dense"] and len(log["candidates"]) == 4
    assert {c["cost_ms"] for c in log["candidates"]} == {1.0, 2.0, 3.0, 4.0}
    calls.clear()
    timed.clear()
    assert ks._tuned(key, None, b, True, run_sparse, run_dense) == ("dense",)  # cached: nothing runs
    assert calls == [] and timed == []
    assert ks._tuned(key, None, b, False, run_sparse, run_dense) == ("sparse", False, 0)  # sparse forced
    assert ("dense",) not in timed and calls == []  # the searches are reused
    monkeypatch.setattr(ks, "_capturing", lambda: True)
    key2 = key[:4] + (128,) + key[5:]
    assert ks._tuned(key2, None, b, True, run_sparse, run_dense) == ("sparse", True, 0)  # capture: untuned
    assert all(k[:5] != key2 for k in ks._PLAN)


def test_tuning_objective_eager_counts_host_time_graph_does_not(monkeypatch):
    """A sparse candidate fast on the GPU but slow to issue (PyTorch rebuilds the cuSPARSELt plan on every
    call) loses to the dense path under the eager objective and wins under the graph objective; the two
    are separate cache entries; the cost falls back to the eager figure where graph capture failed."""
    assert ks._cost({"gpu_ms": 2.0, "host_ms": 3.0, "eager_ms": 9.0}, "eager") == 3.0
    assert ks._cost({"gpu_ms": 2.0, "host_ms": 3.0, "eager_ms": 9.0}, "graph") == 2.0
    assert ks._cost({"gpu_ms": 2.0, "host_ms": 0.5, "eager_ms": 9.0}, "eager") == 2.0
    assert ks._cost({"gpu_ms": None, "host_ms": 0.5, "eager_ms": 4.0}, "graph") == 4.0
    timings = {("sparse", True, 0): {"gpu_ms": 2.0, "host_ms": 3.0, "eager_ms": 3.1},
               ("dense",): {"gpu_ms": 2.5, "host_ms": 0.1, "eager_ms": 2.5}}
    timed = []
    monkeypatch.setattr(ks, "_measure", _fake_measure(timings, timed))
    _fresh_tuner(monkeypatch)
    monkeypatch.setattr(ks, "MODES", ks._parse_modes("T0"))
    rs, rd = (lambda tr, aid: ("sparse", tr, aid)), (lambda: ("dense",))
    key = ("int8", 64, 128, torch.bfloat16, 4096, True, False)
    b = torch.zeros(128, 4096)
    assert ks._tuned(key, None, b, True, rs, rd) == ("dense",)  # default objective: eager
    assert ks._tuned(key, None, b, True, rs, rd, objective="graph") == ("sparse", True, 0)
    assert ks._tuned(key, None, b, True, rs, rd, objective="eager") == ("dense",)
    assert len(timed) == 4 and set(ks._PLAN) == {key + (True, "eager"), key + (True, "graph")}
    monkeypatch.setattr(ks, "OBJECTIVE", "graph")
    assert ks._tuned(key, None, b, True, rs, rd) == ("sparse", True, 0)
    with pytest.raises(ValueError, match="objective 'fast'.*eager, graph"):
        ks._tuned(key, None, b, True, rs, rd, objective="fast")


def test_tuning_cuts_hopeless_candidates_and_fp16_runs_column_major(monkeypatch):
    """A candidate whose single call takes far longer than the best so far is not measured further; fp16 never
    asks cuSPARSELt for a row-major result (~0.2 s of host time per call on the H200): neither as a candidate,
    nor in the untuned or in-capture default."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(ks, "_graph_ms", lambda fn, **kw: 1.0)
    slow = []

    def fn():
        slow.append(1)
        time.sleep(0.06)

    m = ks._measure(fn, limit_ms=5.0)
    assert m["cut"] and m["gpu_ms"] is None and m["host_ms"] >= 50 and len(slow) == 2
    monkeypatch.setattr(torch.cuda, "Event", lambda **kw: types.SimpleNamespace(
        record=lambda: None, synchronize=lambda: None, elapsed_time=lambda other: 8.0))
    m = ks._measure(lambda: None)
    assert m == {"host_ms": m["host_ms"], "gpu_ms": 1.0, "eager_ms": 1.0} and m["host_ms"] < 5
    searches, timed = [], []
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search",
                        lambda packed, b, transpose_result=False, **kw: searches.append(transpose_result) or 7,
                        raising=False)
    monkeypatch.setattr(ks, "_measure", _fake_measure({("sparse", False, 0): 2.0, ("sparse", False, 7): 1.0}, timed))
    _fresh_tuner(monkeypatch)
    monkeypatch.setattr(ks, "MODES", ks._parse_modes("T0,F0,Fs,FsT,Ts,TsF"))
    rs = lambda tr, aid: ("sparse", tr, aid)  # noqa: E731
    assert ks._tuned(("fp16",), None, torch.zeros(8, 64), False, rs, None, row_major=False) == ("sparse", False, 7)
    assert searches == [False] and sorted(timed) == [("sparse", False, 0), ("sparse", False, 7)]
    monkeypatch.setattr(ks, "_capturing", lambda: True)
    assert ks._tuned(("fp16", 2), None, torch.zeros(8, 64), False, rs, None, row_major=False) == ("sparse", False, 0)
    calls = []
    monkeypatch.setattr(torch, "_cslt_sparse_mm",
                        lambda packed, b, alg_id=0, transpose_result=False, **kw: calls.append(transpose_result)
                        or torch.zeros(32, b.shape[1]), raising=False)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    x, w = torch.zeros(300, 64, dtype=torch.float16), torch.zeros(32, 64, dtype=torch.float16)
    assert ks.sparse24_linear(x, w, packed=torch.zeros(4), alg_search=False).shape == (300, 32)
    assert calls == [False]


def test_tuning_modes_and_their_smallest_m(monkeypatch):
    """LOWBIT_CSLT_MODES: only the listed candidates are searched/timed, each from its smallest M on."""
    assert ks._parse_modes("T0, F0,FsT@256") == [("T0", 0), ("F0", 0), ("FsT", 256)]
    with pytest.raises(ValueError, match="unknown mode 'X1'"):
        ks._parse_modes("T0,X1")
    searches, timed = [], []
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search",
                        lambda packed, b, transpose_result=False, **kw: searches.append(transpose_result) or 9,
                        raising=False)
    monkeypatch.setattr(ks, "_measure", _fake_measure({("sparse", True, 0): 1.0, ("sparse", False, 0): 1.0,
                                                       ("sparse", True, 9): 1.0}, timed))
    _fresh_tuner(monkeypatch)
    monkeypatch.setattr(ks, "MODES", ks._parse_modes("T0,F0,FsT@256"))
    rs = lambda tr, aid: ("sparse", tr, aid)  # noqa: E731
    ks._tuned(("k", 64), None, torch.zeros(8, 64), False, rs, None)
    assert searches == [] and timed == [("sparse", True, 0), ("sparse", False, 0)]
    timed.clear()
    ks._tuned(("k", 512), None, torch.zeros(8, 512), False, rs, None)
    assert searches == [False] and timed == [("sparse", True, 0), ("sparse", False, 0), ("sparse", True, 9)]


def test_sparse_linear_backend_attribute_reaches_the_kernel(monkeypatch):
    seen = []
    real = ks.sparse24_linear

    def spy(*a, backend=None, objective=None, **k):
        seen.append((backend, objective))
        return real(*a, backend=backend, objective=objective, **k)

    monkeypatch.setattr(ks, "sparse24_linear", spy)
    lin = nn.Linear(16, 8)
    sl = SparseLinear.from_pruned(lin, magnitude_prune(lin.weight.detach())[0])
    x = torch.randn(3, 16)
    y0 = sl(x)
    sl.backend = "dense"
    sl.tune_for = "graph"
    assert torch.equal(sl(x), y0) and seen == [(None, None), ("dense", "graph")]
    sl.backend = "bogus"
    with pytest.raises(ValueError, match="unknown sparse backend 'bogus'"):
        sl(x)


def test_tuning_off_is_algorithm_0(monkeypatch):
    """LOWBIT_CSLT_SEARCH=0 / alg_search=False: algorithm 0, row-major output, MIN_M crossover (no search)."""
    calls = []

    def fake_mm(packed, b, alg_id=0, transpose_result=False, **kw):
        calls.append((alg_id, transpose_result))
        return torch.zeros(b.shape[1], 32)

    monkeypatch.setattr(torch, "_cslt_sparse_mm", fake_mm, raising=False)
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda *a, **k: 1 / 0, raising=False)
    x = torch.zeros(300, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    y = ks.sparse24_linear(x, w, packed=torch.zeros(4), alg_search=False)
    assert calls == [(0, True)] and y.shape == (300, 32)
    calls.clear()
    ks.sparse24_linear(x[:8], w, packed=torch.zeros(4), alg_search=False)  # below MIN_M: dense F.linear
    assert calls == []
