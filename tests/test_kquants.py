"""K-quants Q2_K..Q6_K: byte identity with llama.cpp's reference quantizer on committed vectors
(``tests/data/kquants_vectors.npz``, produced by llama.cpp's own C code), bit-equal dequantization with
gguf-py, lossless pack/unpack, the tensor API, llama.cpp's mixture recipes (type maps for SmolLM2 and
the GGUF writer)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit
from lowbit.formats import kquants as kq
from lowbit.io import gguf_recipes as rec

gguf = pytest.importorskip("gguf")

DATA = Path(__file__).resolve().parent / "data"
TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


@pytest.fixture(scope="module")
def vectors():
    z = np.load(DATA / "kquants_vectors.npz")
    return {k: z[k] for k in z.files}


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_equal_llama_cpp_reference(vectors, qtype):
    keys = [k[2:] for k in vectors if k.startswith("x/")]
    assert len(keys) >= 15 and any(k.startswith("smollm2") for k in keys)
    n_blocks = 0
    for key in keys:
        x = torch.from_numpy(vectors[f"x/{key}"])
        want = vectors[f"q/{key}/{qtype}"]
        got = kq.quantize_rows(x, qtype).numpy()
        t = kq.kquant_type(qtype)
        bad = (got.reshape(-1, t.type_size) != want.reshape(-1, t.type_size)).any(1)
        assert not bad.any(), f"{key}: {int(bad.sum())} of {bad.size} {qtype} blocks differ from llama.cpp"
        n_blocks += bad.size
    assert n_blocks > 150


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_bit_equal_to_gguf_py(vectors, qtype):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 512, generator=g) * 0.05, torch.from_numpy(vectors["x/edge_256"])]
    raws = [kq.quantize_rows(x, qtype) for x in xs]
    raws.append(torch.from_numpy(vectors[f"q/student_1280/{qtype}"]))
    # arbitrary bytes are valid blocks too: every field decodes the same way (fp16 fields kept finite)
    rnd = torch.randint(0, 256, (8, 2 * kq.kquant_type(qtype).type_size), generator=g, dtype=torch.uint8)
    codes, p = kq.unpack_kblocks(rnd, qtype)
    p = p._replace(d=torch.randn(p.d.shape, generator=g).half(),
                   dmin=None if p.dmin is None else torch.randn(p.dmin.shape, generator=g).half())
    raws.append(kq.pack_kblocks(codes, p, qtype))
    for raw in raws:
        ref = gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[qtype])
        got = kq.dequantize_rows(raw, qtype).numpy()
        assert np.array_equal(ref.view(np.uint32), got.view(np.uint32))
        c, pp = kq.unpack_kblocks(raw, qtype)
        assert torch.equal(kq.pack_kblocks(c, pp, qtype), raw)  # lossless


def test_quantization_error_ordering_and_range():
    x = torch.randn(32, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    errs = []
    for qtype in TYPES:
        y = kq.dequantize_rows(kq.quantize_rows(x, qtype), qtype)
        errs.append(float((y - x).square().mean() / x.square().mean()))
        codes, p = kq.quantize_params(x, qtype)
        assert int(codes.max()) <= kq.kquant_type(qtype).qmax
    assert errs == sorted(errs, reverse=True), errs  # more bits, less error
    assert errs[2] < 0.01 and errs[4] < 0.001  # Q4_K, Q6_K on Gaussian rows


def test_nearest_int_matches_the_c_trick():
    v = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 3.4999, 4194303.0, -7.5])
    assert kq.nearest_int(v).tolist() == [0, 2, 2, 0, -2, 3, 4194303, -8]


def test_tensor_api_schemes():
    w = torch.randn(24, 600)
    for qtype in TYPES:
        st = lowbit.quantize(w, qtype.lower())
        assert st.block_size == 256 and st.layout == "gguf"
        d = lowbit.dequantize(st)
        # padded to 768 with zeros, exactly as quantizing the padded rows
        wp = torch.cat([w, w.new_zeros(24, 168)], 1)
        assert torch.equal(d, kq.dequantize_rows(kq.quantize_rows(wp, qtype), qtype)[:, :600])
    with pytest.raises(ValueError, match="fixed blocks of 256"):
        lowbit.quantize(w, "q4_k", group_size=32)


def test_errors():
    with pytest.raises(ValueError, match="multiple of 256"):
        kq.quantize_rows(torch.randn(2, 576), "q4_k")
    with pytest.raises(ValueError, match="expected one of"):
        kq.kquant_type("q7_k")
    with pytest.raises(ValueError, match="non-finite"):
        kq.quantize_rows(torch.full((1, 256), float("nan")), "q6_k")
    codes, p = kq.quantize_params(torch.randn(1, 256), "q4_k")
    with pytest.raises(ValueError, match="0..15"):
        kq.pack_kblocks(codes + 16, p, "q4_k")
    with pytest.raises(ValueError, match="0..63"):
        kq.pack_kblocks(codes, p._replace(sc=p.sc + 64), "q4_k")


# ---------------------------------------------------------------------------------------------
# recipes


@pytest.fixture(scope="module")
def smollm2_maps():
    path = DATA / "kquants_smollm2_types.json"
    if not path.exists():
        pytest.skip("tests/data/kquants_smollm2_types.json not generated (needs llama-cpp-python: "
                    "python tests/data/make_kquants_smollm2_types.py)")
    return json.loads(path.read_text())


@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q4_K_S", "Q5_K_M", "Q3_K_M", "Q6_K"])
def test_recipe_type_map_equals_llama_quantize(smollm2_maps, recipe):
    m = smollm2_maps
    tensors = [(n, tuple(s)) for n, s in m["shapes"].items()]
    got = rec.recipe_types(recipe, tensors, n_layer=m["n_layer"])
    want = m["types"][recipe]
    diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert not diff and set(got) == set(want), diff
    if recipe in ("Q4_K_M", "Q5_K_M", "Q6_K"):  # the count: 180 of 272 tensors fall back
        k_rows = [n for n, s in tensors if len(s) == 2 and s[-1] % 256 == 0]
        assert sum(1 for n, t in got.items() if t in ("Q8_0", "Q5_0", "Q5_1") and n != "token_embd.weight") == 180
        assert all(got[n].endswith("_K") for n in k_rows)


def test_recipe_rules():
    assert [i for i in range(30) if rec.use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert rec.fallback_type("Q6_K", 576) == "Q8_0" and rec.fallback_type("Q3_K", 576) == "Q4_0"
    assert rec.fallback_type("Q5_K", 48) == "F16"
    names = [("output.weight", (100, 512)), ("token_embd.weight", (100, 512)), ("blk.0.attn_v.weight", (64, 512))]
    t = rec.recipe_types("Q4_K_S", names, n_layer=1)
    assert t == {"output.weight": "Q6_K", "token_embd.weight": "Q4_K", "blk.0.attn_v.weight": "Q5_K"}
    with pytest.raises(ValueError, match="expected one of"):
        rec.recipe_types("Q4_K_X", names, n_layer=1)


def _tiny(hidden=256, inter=512, layers=3, vocab=300, tied=True):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.oracle
@pytest.mark.parametrize("recipe", ["Q4_K_M", "Q3_K_M"])
def test_export_recipe_writes_llama_cpp_blocks(tmp_path, recipe):
    pytest.importorskip("transformers")
    from lowbit.io import gguf as io

    model = _tiny()
    path = io.export_gguf(model, tmp_path / f"m-{recipe}.gguf", recipe)
    reader = gguf.GGUFReader(str(path))
    plan = io.gguf_tensor_plan(model, recipe)
    tensors = {t.name: t for t in reader.tensors}
    params = model.state_dict()
    for hf, (g, typ) in plan.items():
        t = tensors[g]
        assert t.tensor_type.name == typ, g
        if typ.endswith("_K"):  # the bytes are llama.cpp's reference quantization of the permuted rows
            h = {"q_proj": 4, "k_proj": 2}.get(next((k for k in ("q_proj", "k_proj") if k in hf), ""), None)
            w = io.permute_qk_rows(params[hf].float(), h) if h else params[hf].float()
            raw = kq.quantize_rows(w, typ)
            assert np.array_equal(np.asarray(t.data).reshape(w.shape[0], -1), raw.numpy()), g
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            assert np.array_equal(got, kq.dequantize_rows(raw, typ).numpy()), g
    types = {t.tensor_type.name for t in reader.tensors}
    assert any(x.endswith("_K") for x in types)
    assert reader.fields["general.file_type"].contents() == {"Q4_K_M": 15, "Q3_K_M": 12}[recipe]
    if recipe == "Q4_K_M":  # of 3 layers, use_more_bits picks layer 2 for Q6_K attn_v and ffn_down
        assert tensors["blk.2.attn_v.weight"].tensor_type.name == "Q6_K"
        assert tensors["blk.2.ffn_down.weight"].tensor_type.name == "Q6_K"
        assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_K"
        assert tensors["token_embd.weight"].tensor_type.name == "Q6_K"  # tied: the output rule


def test_k_quant_states_round_trip_through_the_writer(tmp_path):
    pytest.importorskip("transformers")
    from lowbit.io import gguf as io

    model = _tiny(layers=1)
    st = lowbit.quantize(model.model.layers[0].mlp.down_proj.weight.detach(), "q5_k")
    path = io.export_gguf(model, tmp_path / "m.gguf", "Q4_K_M",
                          quant_states={"model.layers.0.mlp.down_proj.weight": st})
    back = io.load_gguf_quant_states(path)["model.layers.0.mlp.down_proj.weight"]
    assert back.qtype == "Q5_K" and torch.equal(back.data, st.data)
    st2 = io.to_quant_state(back)
    assert st2.scheme == "q5_k" and torch.equal(lowbit.dequantize(st2), lowbit.dequantize(st))


@pytest.mark.parametrize("qtype", ["Q3_K", "Q4_K", "Q6_K"])
def test_gptq_on_the_k_grid_beats_the_reference_rounding(qtype):
    from lowbit.algorithms.grid import gptq_kquant

    g = torch.Generator().manual_seed(3)
    X = torch.randn(2048, 512, generator=g) @ (torch.randn(512, 512, generator=g) * 0.1 + torch.eye(512))
    H = X.t() @ X / X.shape[0]
    W = torch.randn(32, 512, generator=g) * 0.02
    st, _ = gptq_kquant(W, H, qtype)
    assert st.scheme == qtype.lower() and st.block_size == 256
    ref = gguf.quants.dequantize(st.data.numpy(), gguf.GGMLQuantizationType[qtype])  # what llama.cpp reads
    assert np.array_equal(ref, lowbit.dequantize(st).numpy())

    def out_err(E):
        E = E.double()
        return float(((E @ H.double()) * E).sum())

    rtn = out_err(lowbit.dequantize(lowbit.quantize(W, qtype.lower())) - W)
    assert out_err(torch.from_numpy(ref) - W) < 0.8 * rtn
