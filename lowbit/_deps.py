"""Optional imports. A missing package raises an ImportError naming the pip extra to install."""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import itertools
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


def _release(version: str) -> tuple:
    """The leading numeric release of a version string: ``"5.23.0.dev0"`` -> ``(5, 23, 0)``."""
    out = []
    for part in version.split("+")[0].split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        out.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(out)


def require(name: str, purpose: str = "", min_version: str = "") -> ModuleType:
    """Import an optional dependency or fail with a message naming the extra that provides it.

    ``min_version`` (the distribution's release, e.g. ``"5.23"``) refuses an older installed version
    with the same kind of message instead of failing later with an unrelated error.
    """
    top = name.split(".")[0]
    extra = _EXTRA.get(top, "all")
    why = f" (needed for {purpose})" if purpose else ""
    if not available(name):
        raise ImportError(
            f"the optional package {top!r} is not installed{why}; "
            f"install it with: pip install 'lowbit[{extra}]'"
        )
    if min_version:
        try:
            found = importlib.metadata.version(top.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found = getattr(importlib.import_module(top), "__version__", "")
        if found and _release(found) < _release(min_version):
            raise ImportError(
                f"{top} {found} is installed but lowbit needs {top}>={min_version}{why}; "
                f"upgrade it with: pip install -U 'lowbit[{extra}]'"
            )
    return importlib.import_module(name)
