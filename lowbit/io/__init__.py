"""Checkpoint formats: native, GGUF, GPTQ/AWQ, compressed-tensors; ``lowbit.io.verify(path)`` checks files
lowbit wrote against their checksums (:mod:`lowbit.io.verify`)."""


def verify(path):
    """Check a checkpoint, export or directory of them; see :func:`lowbit.io.verify.verify`."""
    import importlib

    return importlib.import_module("lowbit.io.verify").verify(path)
