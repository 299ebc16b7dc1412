"""Byte identity of every file lowbit writes, for every export format and every method (issue 16's contract).

Each case quantizes the same tiny deterministic Llama (hidden 256, intermediate 320: 320 is not a multiple of
128, so groups of 128 have a ragged tail, as SmolLM2's 576 does) through the public entry points (the CLI's
``quantize`` / ``export`` / ``convert`` run in-process, and the library's exporters) and compares the SHA-256 of
every written file with the digests in ``tests/data/byte_identity.json``, recorded on the tree before the
refactor of issue 16. Files written by third-party code (the tokenizer's own files) and ``lowbit_run.json``
(wall-clock times, peak memory) are not compared.

Which CPUs the digests hold for. The cases split in two:

* **portable** (rtn, nf4/fp4/bnb-*, the quanto int2/int4/int8/fp8 workflow, fp16/bf16, int8-dynamic, the
  GGUF legacy and K-quant writers, compressed-tensors, GPTQ, AWQ and sparse-24 exporters, ``export`` and
  ``convert``): elementwise arithmetic and exact reductions (max/min) only; their digests were checked equal
  under ``ATEN_CPU_CAPABILITY=avx512`` (this box, AMD), ``avx2`` and ``default``. They are checked everywhere.
* **cpu-dependent** (gptq, awq, hqq, sparse-2:4 with SparseGPT, int8-static, nf4/fp4 double quant): their
  algorithms run float matmuls / sums whose rounding depends on the kernel the CPU gets (double quant's mean
  of the absmax differs under ``default``; hqq's digests happened to agree under the three capabilities here
  but it iterates float reductions) (the README's gptq figure differs
  between AVX2 AMD, AVX-512 Intel and AVX-512 AMD machines). Their digests are keyed by a CPU fingerprint
  (``ATEN`` capability + vendor + model name, :func:`_fingerprint`) and checked where a fingerprint was
  recorded; on another CPU the case is skipped with the reason. The *writers* these methods use are the same
  as the portable cases' (same layouts: the portable rtn cases cover the PTQ path's group layout, the GGUF grid
  and every exporter), so the writers' byte identity is proven on every CPU.

The digests were recorded on the tree before issue 16's refactor (commit 4058e7c), with one documented
exception (CHANGELOG.md, issue 16): ``group_size=-1`` (one group per output channel) used to give two on-disk
layouts (``channel`` through ``lowbit.quantize(tensor)``, ``group`` with one group per row through the PTQ
algorithms); it now gives one, ``channel`` along axis 0, from every path. The ``rtn_g-1`` case holds the digests
of that canonical layout; its earlier digests stay in the JSON under ``"before_canonical_g-1"`` for the record
(the native checkpoint and the compressed-tensors ``strategy`` changed; the GPTQ export did not), and files in the
old form still load (tests/test_granularity.py).

Regenerate (only when a format change is intended, and say so in CHANGELOG.md)::

    LOWBIT_UPDATE_BYTE_IDENTITY=1 python -m pytest -q tests/test_byte_identity.py
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

GOLDEN = Path(__file__).resolve().parent / "data" / "byte_identity.json"
UPDATE = os.environ.get("LOWBIT_UPDATE_BYTE_IDENTITY") == "1"
SKIP_FILES = {"lowbit_run.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "vocab.json", "merges.txt"}

CALIB = ("--calib-dataset", "{text}", "--n-samples", "4", "--calib-seq-len", "64")
ALL4 = "native,gguf,compressed-tensors,gptq"

#: name -> (portable, CLI argv after ``quantize --model M --output OUT --quiet``)
QUANTIZE = {
    "rtn_g128_sym": (True, ["--method", "rtn", "--group-size", "128", "--format", ALL4]),
    "rtn_g64_asym": (True, ["--method", "rtn", "--group-size", "64", "--asym", "--format",
                            "native,compressed-tensors,gptq"]),
    "rtn_g-1": (True, ["--method", "rtn", "--group-size", "-1", "--format", "native,compressed-tensors,gptq"]),
    "rtn_b8_g128": (True, ["--method", "rtn", "--bits", "8", "--group-size", "128", "--format", "native,gptq"]),
    "rtn_b3_g128": (True, ["--method", "rtn", "--bits", "3", "--group-size", "128", "--format", "native"]),
    "rtn_b2_g64": (True, ["--method", "rtn", "--bits", "2", "--group-size", "64", "--format", "native"]),
    "rtn_gguf_q4_0": (True, ["--method", "rtn", "--format", "gguf,gptq,compressed-tensors", "--gguf-type", "Q4_0"]),
    "rtn_gguf_q4_1": (True, ["--method", "rtn", "--asym", "--format", "native,gguf", "--gguf-type", "Q4_1"]),
    "rtn_gguf_q5_0": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q5_0"]),
    "rtn_gguf_q5_1": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q5_1"]),
    "rtn_gguf_q8_0": (True, ["--method", "rtn", "--bits", "8", "--format", "gguf,gptq", "--gguf-type", "Q8_0"]),
    "rtn_gguf_q4_k_m": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q4_K_M"]),
    "rtn_gguf_q3_k_s": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q3_K_S"]),
    "rtn_gguf_q5_k_s": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q5_K_S"]),
    "rtn_gguf_q6_k": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q6_K"]),
    "rtn_gguf_q2_k": (True, ["--method", "rtn", "--format", "gguf", "--gguf-type", "Q2_K"]),
    "nf4": (True, ["--method", "nf4", "--format", "native,gguf"]),
    "fp4_dq": (False, ["--method", "fp4", "--double-quant", "--format", "native"]),
    "bnb-int8": (True, ["--method", "bnb-int8", "--format", "native"]),
    "int8": (True, ["--method", "int8", "--format", "native"]),
    "int4": (True, ["--method", "int4", "--format", "native"]),
    "int4_g64": (True, ["--method", "int4", "--group-size", "64", "--format", "native"]),
    "int2": (True, ["--method", "int2", "--format", "native"]),
    "fp8": (True, ["--method", "fp8", "--format", "native"]),
    "fp16": (True, ["--method", "fp16", "--format", "native,gguf"]),
    "bf16": (True, ["--method", "bf16", "--format", "native"]),
    "int8-dynamic": (True, ["--method", "int8-dynamic", "--format", "native"]),
    "gptq_g128_sym": (False, ["--method", "gptq", "--group-size", "128", "--format", ALL4, *CALIB]),
    "gptq_g64_asym": (False, ["--method", "gptq", "--group-size", "64", "--asym", "--format", "native,gptq",
                              *CALIB]),
    "gptq_gguf_q4_0": (False, ["--method", "gptq", "--format", "gguf,gptq", "--gguf-type", "Q4_0", *CALIB]),
    "awq_g128_asym": (False, ["--method", "awq", "--group-size", "128", "--asym", "--format", ALL4, *CALIB]),
    "awq_gguf_q4_1": (False, ["--method", "awq", "--asym", "--format", "gguf", "--gguf-type", "Q4_1", *CALIB]),
    "hqq_g64": (False, ["--method", "hqq", "--group-size", "64", "--format", "native,gptq"]),
    "hqq_g128_asym": (False, ["--method", "hqq", "--group-size", "128", "--asym", "--format", "native"]),
    "sparse-2:4": (False, ["--method", "sparse-2:4", "--format", "native", *CALIB]),
    "sparse-2:4-int8": (False, ["--method", "sparse-2:4-int8", "--format", "native", *CALIB]),
}


def _fingerprint() -> str:
    """The CPU the cpu-dependent digests hold for: ATen's capability, vendor and model name."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    vendor = info.get("vendor_id") or platform.processor() or "?"
    model = info.get("model name") or platform.machine() or "?"
    cap = torch.backends.cpu.get_cpu_capability()
    return f"{cap} | {vendor} | {model} | torch {torch.__version__.split('+')[0]}"


def _digests(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in SKIP_FILES:
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every case written once: ``{case: directory or file}``."""
    from lowbit.cli import main
    from lowbit.model.loading import tiny_llama, tiny_tokenizer

    d = tmp_path_factory.mktemp("bytes")
    cwd = os.getcwd()
    os.chdir(d)  # config.json records the model's path: the relative "tiny", not a temporary folder's name
    try:
        return _write_all(d, main, tiny_llama, tiny_tokenizer)
    finally:
        os.chdir(cwd)


def _tiny_weights(model) -> None:
    """Overwrite the weights with numpy's generator (the same numbers on every CPU: torch's ``normal_`` draws
    differ between ATen's vectorized and scalar paths)."""
    import numpy as np

    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name:
                p.copy_(torch.from_numpy(1.0 + 0.1 * rng.standard_normal(tuple(p.shape), dtype=np.float32)))
            else:
                p.copy_(torch.from_numpy(0.02 * rng.standard_normal(tuple(p.shape), dtype=np.float32)))


def _write_all(base: Path, main, tiny_llama, tiny_tokenizer) -> dict:
    d = Path(".")  # relative paths only: some end up inside the files (config.json's _name_or_path)
    tiny = Path("tiny")
    model = tiny_llama(hidden=256, layers=2, intermediate=320, seed=0)
    _tiny_weights(model)
    model.save_pretrained(tiny)
    tiny_tokenizer().save_pretrained(tiny)
    text = Path("calib.txt")
    text.write_text("".join(f"Line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs. " for i in range(400)))
    res = {}

    def cli(*argv):
        argv = [a.format(text=text) for a in argv]
        rc = main([*argv, "--quiet"])
        assert rc == 0, f"lowbit {' '.join(argv)} -> exit {rc}"

    for name, (_, argv) in QUANTIZE.items():
        out = Path(name.replace(":", "_"))
        cli("quantize", "--model", str(tiny), "--output", str(out), *argv)
        res[name] = out
    # re-export of a native checkpoint, lossless conversion of a GPTQ export
    cli("export", "--input", str(res["rtn_g128_sym"]), "--output", str(d / "export"), "--format",
        "gguf,compressed-tensors,gptq")
    res["export_rtn_g128"] = d / "export"
    (d / "convert").mkdir()
    cli("convert", "--input", str(res["rtn_gguf_q4_0"] / "gptq"), "--output", str(d / "convert" / "m.gguf"))
    res["convert_gptq_q4_0"] = d / "convert"
    # exporters --format cannot reach (issue 16): AWQ, sparse-24 compressed-tensors
    import lowbit
    from lowbit.io.compressed_tensors_sparse import export_sparse24
    from lowbit.io.gptq import export_awq

    model = lowbit.load(res["rtn_g64_asym"])
    export_awq(model, d / "awq_export")
    res["export_awq_rtn_g64_asym"] = d / "awq_export"
    # --format awq (the registry made AWQ reachable from the CLI): the same files as export_awq
    cli("quantize", "--model", str(tiny), "--output", "cli_awq", *QUANTIZE["rtn_g64_asym"][1][:-2], "--format",
        "native,awq")
    res["cli_format_awq"] = d / "cli_awq" / "awq"
    model = lowbit.load(res["sparse-2:4"])
    export_sparse24(model, d / "sparse24")
    res["export_sparse24"] = d / "sparse24"
    # data-free 2:4 (magnitude) through the library: portable, so the sparse writers are checked everywhere
    from lowbit.io.native import save
    from transformers import AutoModelForCausalLM

    for method in ("sparse-2:4", "sparse-2:4-int8"):
        model = AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
        lowbit.quantize(model, method=method, algorithm="magnitude")
        key = f"api_{method}_magnitude"
        save(model, d / key.replace(":", "_"))
        res[key] = d / key.replace(":", "_")
    export_sparse24(lowbit.load(res["api_sparse-2:4_magnitude"]), d / "sparse24_magnitude")
    res["export_sparse24_magnitude"] = d / "sparse24_magnitude"
    # sparse-2:4-int4 with groups dividing 320 (the CLI does not pass --group-size to the sparse methods)
    from lowbit.data.calibration import get_calibration_data

    model = AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    calib = get_calibration_data(tiny_tokenizer(), str(text), n_samples=4, seq_len=64, seed=0)
    lowbit.quantize(model, method="sparse-2:4-int4", group_size=64, calib_dataset=calib, progress=False)
    save(model, d / "sparse24_int4")
    res["api_sparse-2:4-int4"] = d / "sparse24_int4"
    # int8-static (calibrated activation scales) through the library
    model = AutoModelForCausalLM.from_pretrained(tiny, torch_dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (1, 32), generator=g) for _ in range(3)]
    lowbit.quantize(model, method="int8-static", calib_loader=batches)
    save(model, d / "int8_static")
    res["api_int8-static"] = d / "int8_static"
    return {k: base / v for k, v in res.items()}


PORTABLE_EXTRA = ("export_rtn_g128", "convert_gptq_q4_0", "export_awq_rtn_g64_asym", "api_sparse-2:4_magnitude",
                  "api_sparse-2:4-int8_magnitude", "export_sparse24_magnitude")
ALL_CASES = [*QUANTIZE, *PORTABLE_EXTRA, "export_sparse24", "api_sparse-2:4-int4", "api_int8-static"]


def _portable(case: str) -> bool:
    return QUANTIZE[case][0] if case in QUANTIZE else case in PORTABLE_EXTRA


def _load_golden() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {"portable": {}, "cpu_dependent": {}}


_update_state: dict = {}


def test_cli_format_awq_writes_what_export_awq_writes(outputs):
    """New since issue 16 (no recorded digests): ``--format awq`` goes through the exporter registry to the same
    writer as :func:`lowbit.io.gptq.export_awq`."""
    a, b = _digests(outputs["cli_format_awq"]), _digests(outputs["export_awq_rtn_g64_asym"])
    # the CLI also saves the tokenizer into the export, so its checksum sidecar lists two more files
    side = "lowbit-checksums.sha256"
    assert a.pop(side) and b.pop(side) and a == b and {"config.json", "model.safetensors"} <= set(a)
    lines = (outputs["cli_format_awq"] / side).read_text().splitlines()
    assert [ln for ln in lines if "tokenizer" not in ln] == (outputs["export_awq_rtn_g64_asym"] / side).read_text().splitlines()


@pytest.mark.parametrize("case", ALL_CASES)
def test_files_byte_identical(outputs, case):
    got = _digests(outputs[case])
    assert got, f"{case}: nothing written"
    fp = _fingerprint()
    if UPDATE:
        golden = _update_state.setdefault("g", _load_golden())
        if _portable(case):
            golden["portable"][case] = got
        else:
            golden["cpu_dependent"].setdefault(fp, {})[case] = got
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    golden = _load_golden()
    if _portable(case):
        want = golden["portable"].get(case)
        assert want is not None, f"{case}: no golden digests recorded (LOWBIT_UPDATE_BYTE_IDENTITY=1 records them)"
    else:
        table = golden["cpu_dependent"].get(fp)
        if table is None or case not in table:
            pytest.skip(f"{case}: digests depend on the CPU's float kernels and were recorded for "
                        f"{sorted(golden['cpu_dependent'])}, not for {fp!r}; the writers it uses are checked by "
                        f"the portable cases")
        want = table[case]
    diff = {f: (want.get(f), got.get(f)) for f in sorted(set(want) | set(got)) if want.get(f) != got.get(f)}
    assert not diff, f"{case}: files differ from the recorded bytes: {diff}"
