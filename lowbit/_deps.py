"""Optional imports. A missing package raises an ImportError naming the pip extra to install."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

_EXTRA = {
    "transformers": "hf",
    "accelerate": "hf",
    "gguf": "gguf",
    "matplotlib": "plot",
    "compressed_tensors": "ct",
    "peft": "peft",
    "triton": "triton",
    "bitsandbytes": "test",
}


def available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def require(name: str, purpose: str = "") -> ModuleType:
    """Import an optional dependency or fail with a message naming the extra that provides it."""
    if not available(name):
        extra = _EXTRA.get(name.split(".")[0], "all")
        why = f" (needed for {purpose})" if purpose else ""
        raise ImportError(
            f"the optional package {name.split('.')[0]!r} is not installed{why}; "
            f"install it with: pip install 'lowbit[{extra}]'"
        )
    return importlib.import_module(name)
