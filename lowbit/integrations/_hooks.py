"""Make peft's standard recipe see lowbit's quantized layers without any lowbit-specific call.

``peft.get_peft_model(model, LoraConfig(target_modules=[...]))`` on a model holding lowbit modules
must wrap them in :class:`lowbit.integrations.peft.LowbitLoraLinear`: peft's generic
``lora.Linear`` would train, but its ``merge`` adds the delta to a dequantized copy of the weight and
so silently drops the adapters. :func:`register` (called by ``import lowbit``) therefore arranges
that :mod:`lowbit.integrations.peft` is imported (it installs lowbit's dispatcher into peft, see
:func:`lowbit.integrations.peft.install`) as soon as both lowbit and peft are imported, in either
order:

* peft already imported: installed at once;
* peft imported later: a one-shot finder on ``sys.meta_path`` wraps the loader of the top-level
  ``peft`` package and installs right after ``peft/__init__`` has run (so peft's own imports are
  complete). ``import lowbit`` never imports peft itself.

``LOWBIT_NO_PEFT_HOOK=1`` turns the finder off.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import os
import sys

logger = logging.getLogger(__name__)


def _install_peft() -> None:
    try:
        import lowbit.integrations.peft  # noqa: F401  (installs on import)
    except Exception as e:  # a peft version lowbit does not support must not break ``import peft``
        logger.warning("lowbit: could not register lowbit's LoRA layers with peft (%s: %s); "
                       "import lowbit.integrations.peft to see why", type(e).__name__, e)


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``peft`` to install lowbit after it ran."""

    def find_spec(self, name, path=None, target=None):
        if name != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec("peft")
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        orig = loader.exec_module

        def exec_module(module):
            orig(module)
            _install_peft()

        loader.exec_module = exec_module
        return spec


_FINDER = _PeftFinder()


def register() -> None:
    """Install lowbit's peft dispatcher now (peft imported) or when peft gets imported (idempotent)."""
    if os.environ.get("LOWBIT_NO_PEFT_HOOK", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if "peft" in sys.modules:
        if "lowbit.integrations.peft" not in sys.modules:
            _install_peft()
        return
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
