import os

import pytest
import torch

# torch.compile's on-disk cache (TorchInductor) does not key its C++ kernels by ATEN_CPU_CAPABILITY: a run forced to
# avx2 on an AVX-512 machine leaves kernels generated for 8-float vectors that a later default run (16-float vectors)
# reuses, and their stores overrun their buffers (heap corruption, "double free or corruption" in the compile tests).
# A forced capability therefore gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
    import getpass
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}_{os.environ['ATEN_CPU_CAPABILITY']}")

# xdist runs one worker per core: one intra-op thread each avoids oversubscribing the CPU
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="also run tests marked `long` (fuzzing at full size, kill loops); CI runs the rest")


def pytest_collection_modifyitems(config, items):
    run_long = config.getoption("--long") or os.environ.get("LOWBIT_LONG_TESTS") == "1"
    skip_long = pytest.mark.skip(reason="long test: run with --long (or LOWBIT_LONG_TESTS=1)")
    skip_cuda = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "long" in item.keywords and not run_long:
            item.add_marker(skip_long)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(params=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def device(request):
    return torch.device(request.param)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
