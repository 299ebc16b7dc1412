"""K-quant byte identity with llama.cpp's quantizer itself, in full, where llama-cpp-python is installed
(optional extra ``llamacpp``): ``ggml_quantize_chunk`` of the ``libggml-base`` it ships (what
``llama_model_quantize`` calls per tensor) against lowbit on every K-quantizable SmolLM2-135M tensor and
on synthetic tensors of several widths, and the per-tensor types of ``llama_model_quantize``'s files.

``LOWBIT_GGML_BASE=/path/libggml-base.so`` points the byte tests at a library without llama_cpp."""
import ctypes
import glob
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.formats import kquants as kq

TYPES = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}


def _lib_path():
    if os.environ.get("LOWBIT_GGML_BASE"):
        return os.environ["LOWBIT_GGML_BASE"]
    try:
        import llama_cpp
    except Exception:
        return None
    libs = sorted(glob.glob(str(Path(llama_cpp.__file__).parent / "**" / "libggml-base.so*"), recursive=True))
    return libs[0] if libs else None


@pytest.fixture(scope="module")
def ggml_quantize():
    path = _lib_path()
    if path is None:
        pytest.skip("llama-cpp-python is not installed (pip install 'lowbit[llamacpp]')")
    lib = ctypes.CDLL(path)
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]

    def run(x: torch.Tensor, name: str) -> np.ndarray:
        x = np.ascontiguousarray(x.float().numpy())
        t = kq.kquant_type(name)
        out = np.zeros(x.shape[0] * (x.shape[1] // 256) * t.type_size, np.uint8)
        f(TYPES[name], x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out.reshape(x.shape[0], -1)
    return run


def _check(run, x, name, what):
    want = run(x, name)
    got = kq.quantize_rows(x, name).numpy()
    t = kq.kquant_type(name)
    bad = (got.reshape(-1, t.type_size) != want.reshape(-1, t.type_size)).any(1)
    assert not bad.any(), f"{what} {name}: {int(bad.sum())} of {bad.size} blocks differ from llama.cpp"
    return bad.size


@pytest.mark.parametrize("name", list(TYPES))
def test_synthetic_widths(ggml_quantize, name):
    g = torch.Generator().manual_seed(7)
    n = 0
    for k in (256, 512, 1024, 2304, 4096):
        for scale in (1e-3, 0.05, 3.0):
            x = (torch.randn(16, k, generator=g) * scale).half().float()
            n += _check(ggml_quantize, x, name, f"gauss {k}x{scale}")
        x = torch.distributions.StudentT(2.0).sample((8, k)) * 0.02
        n += _check(ggml_quantize, x, name, f"student {k}")
    assert n > 1000


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TYPES))
def test_every_k_quantizable_smollm2_tensor(ggml_quantize, name):
    from lowbit.model.loading import load_model

    model, _ = load_model("default", dtype=torch.float32)
    n = 0
    for pname, p in model.state_dict().items():
        if p.dim() == 2 and p.shape[1] % 256 == 0:
            x = p.half().float()  # the values of the F16 GGUF that llama-quantize reads
            n += _check(ggml_quantize, x, name, pname)
    assert n == 30 * 576 * 6  # 30 ffn_down tensors [576, 1536]: 576 rows x 6 super-blocks
