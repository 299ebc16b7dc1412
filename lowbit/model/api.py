"""Model-level API: ``quantize(model, ...)``, ``freeze``, ``quantization_map``, ``requantize``.

The optimum-quanto workflow (``optimum/quanto/quantize.py``) on any PyTorch model::

    import lowbit
    lowbit.quantize(model, weights=lowbit.qint4, activations=lowbit.qint8, exclude=["lm_head"])
    with lowbit.Calibration(momentum=0.9):
        model(calibration_batch)
    lowbit.freeze(model)                                   # float weights -> packed QuantStates
    safetensors.torch.save_file(model.state_dict(), "model.safetensors")
    qmap = lowbit.quantization_map(model)                  # JSON-able

    with torch.device("meta"):                             # later, elsewhere
        empty = build_model()
    model = lowbit.requantize(empty, safetensors.torch.load_file("model.safetensors"), qmap, device="cpu")

and the method dispatcher, ``lowbit.quantize(model, method="bnb-nf4", double_quant=True)``
(see :mod:`lowbit.model.methods`). Modules are selected by fnmatch patterns on their qualified
names (``include`` / ``exclude``; ``lm_head`` is excluded by default, as in quanto's examples).
"""
from __future__ import annotations

import fnmatch
import importlib
import importlib.util
from typing import Any, Callable, Dict, Optional, Sequence

import torch
from torch import nn

from lowbit._registry import Registry
from lowbit.nn import QConv2d, QLinear, QModuleMixin, quantized_modules
from lowbit.nn.linear4bit import Linear4bit
from lowbit.nn.rnn import DynamicQuantGRU, DynamicQuantLSTM

_UNSET: Any = object()

#: quantized module classes that ``requantize`` can rebuild, by class name
MODULE_CLASSES: Registry[type] = Registry("quantized module class")
for _cls in (QLinear, QConv2d, Linear4bit, DynamicQuantLSTM, DynamicQuantGRU):
    MODULE_CLASSES.add(_cls.__name__, _cls)


def _register_optional_classes() -> None:
    if "linear8bitlt" not in MODULE_CLASSES and importlib.util.find_spec("lowbit.nn.linear8bit") is not None:
        mod = importlib.import_module("lowbit.nn.linear8bit")
        MODULE_CLASSES.add("Linear8bitLt", mod.Linear8bitLt)
    if "sparselinear" not in MODULE_CLASSES:
        MODULE_CLASSES.add("SparseLinear", importlib.import_module("lowbit.nn.sparse").SparseLinear)


def _ensure_builtin_methods() -> None:
    """Import the built-in methods and, when present, the PTQ methods that register themselves."""
    from lowbit.model import methods

    methods._load_plugins()


# ---------------------------------------------------------------------------------------------
# module selection and replacement


def _matches(name: str, pattern: str) -> bool:
    """fnmatch on the qualified module name; a pattern also matches as a suffix at a module boundary
    (``"lm_head"`` matches ``model.lm_head``, ``"mlp.*"`` matches ``model.layers.0.mlp.up_proj``)."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def _selected(name: str, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> bool:
    """The one module selection rule (quanto workflow, dispatcher methods and PTQ alike)."""
    if include is not None and not any(_matches(name, p) for p in include):
        return False
    if exclude and any(_matches(name, p) for p in exclude):
        return False
    return True


def replace_modules(model: nn.Module, factory: Callable[[str, nn.Module], Optional[nn.Module]],
                    include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = None) -> nn.Module:
    """Replace every selected submodule ``m`` for which ``factory(name, m)`` returns a module.

    Already quantized modules are skipped (and not descended into). Returns ``model`` (or the
    replacement of the root when the root itself is replaced).
    """
    if isinstance(model, QModuleMixin):
        return model
    if _selected("", include, exclude) and not list(model.children()):
        new = factory("", model)
        if new is not None:
            return new

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            full = prefix + child_name
            if isinstance(child, QModuleMixin):
                continue
            if _selected(full, include, exclude):
                new = factory(full, child)
                if new is not None:
                    setattr(parent, child_name, new)
                    continue
            visit(child, full + ".")

    visit(model, "")
    return model


# ---------------------------------------------------------------------------------------------
# public API


def quantize_model(model: nn.Module, weights: Any = _UNSET, activations: Any = _UNSET, include: Any = _UNSET,
                   exclude: Any = _UNSET, *, method: Optional[str] = None, config: Any = None,
                   **kwargs: Any) -> nn.Module:
    """Quantize ``model`` in place (and return it).

    * quanto workflow (no ``method``): ``weights=`` qint2 | qint4 | qint8 | qfloat8 (default qint8),
      ``activations=`` qint8 | qfloat8 | None, ``include`` / ``exclude`` fnmatch patterns
      (default ``exclude=["lm_head"]``), ``group_size=``, ``act_dynamic=``. Modules stay
      fake-quantized (trainable, QAT) until :func:`freeze`.
    * ``method=NAME``: one of :func:`lowbit.model.methods.list_methods` with its own options;
      a key the method does not accept is an error.

    Example::

        >>> lowbit.quantize(model, weights="qint4", exclude=["lm_head", "*.gate"])
        >>> lowbit.quantize(model, method="int8-dynamic")
    """
    from lowbit.model.methods import run_method

    _check_model(model)
    _ensure_builtin_methods()
    for key, value in (("weights", weights), ("activations", activations), ("include", include),
                       ("exclude", exclude)):
        if value is not _UNSET:
            kwargs[key] = value
    if method is None:
        method = "quanto"
    return run_method(model, method, config=config, **kwargs)


def _check_model(model: nn.Module) -> None:
    """Clear errors for models no method can quantize: not a module, no parameters, weights on the meta device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"lowbit.quantize(model, ...) expects a torch.nn.Module (or a tensor with a scheme), "
                        f"got {type(model).__name__}")
    params = list(model.named_parameters())
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters: there is nothing to quantize")
    meta = [n for n, p in params if p.is_meta]
    if meta:
        shown = ", ".join(repr(n) for n in meta[:3]) + (" ..." if len(meta) > 3 else "")
        raise ValueError(
            f"cannot quantize {type(model).__name__}: {len(meta)} of its {len(params)} parameters are on the meta "
            f"device ({shown}) and hold no values. Load the weights first; to rebuild an already quantized "
            "checkpoint into an empty model use lowbit.requantize(model, state_dict, quantization_map) or lowbit.load"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Replace the float weights of every quantized module by packed QuantStates (outputs unchanged).

    Example::

        >>> lowbit.quantize(model, weights="qint4"); lowbit.freeze(model)
    """
    for _, m in quantized_modules(model):
        m.freeze()
    return model


def quantization_map(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """JSON-able ``{module name: {"weights", "activations", "class", "config"}}`` of the quantized modules.

    ``weights`` / ``activations`` follow optimum-quanto's map (qtype names or ``"none"``);
    ``class`` and ``config`` let :func:`requantize` rebuild every lowbit module type.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for name, m in quantized_modules(model):
        out[name] = {
            "weights": m.weights or "none",
            "activations": m.activations or "none",
            "class": type(m).__name__,
            "config": m.quant_config(),
        }
    return out


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def requantize(model: nn.Module, state_dict: Dict[str, torch.Tensor], quantization_map: Dict[str, Dict[str, Any]],
               device: Any = None, strict: bool = True) -> nn.Module:
    """Rebuild quantized modules from ``quantization_map`` and load a frozen model's ``state_dict``.

    ``model`` is the float architecture, typically created on the meta device (``with
    torch.device("meta"):``) or with ``accelerate.init_empty_weights()``; loaded tensors are
    assigned (no copy) and moved to ``device``. Non-persistent buffers (not in a state dict,
    e.g. rotary tables) must be real tensors: build such models with
    ``accelerate.init_empty_weights()`` (parameters on meta, buffers real).

    Example::

        >>> model = lowbit.requantize(empty, load_file("q.safetensors"), qmap, device="cpu")
    """
    _register_optional_classes()
    if not isinstance(quantization_map, dict):
        raise TypeError(f"quantization_map must be a dict, got {type(quantization_map).__name__}")
    root_replacement = None
    for name, entry in quantization_map.items():
        try:
            float_mod = model.get_submodule(name) if name else model
        except AttributeError:
            raise KeyError(f"quantization map names module {name!r}, which the model does not have") from None
        cls_name = entry.get("class")
        if cls_name is None:  # an optimum-quanto map: weights/activations only
            cls = QConv2d if isinstance(float_mod, nn.Conv2d) else QLinear
            config = {"weights": entry.get("weights"), "activations": entry.get("activations")}
            config = {k: (None if v in (None, "none") else v) for k, v in config.items()}
        else:
            cls = MODULE_CLASSES.get(cls_name)
            config = dict(entry.get("config") or {})
        if isinstance(float_mod, cls):
            continue
        new = cls.from_module(float_mod, **config)
        if name:
            _set_submodule(model, name, new)
        else:
            root_replacement = new
    if root_replacement is not None:
        model = root_replacement
    if device is not None:
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
    try:
        result = model.load_state_dict(state_dict, strict=strict, assign=True)
    except RuntimeError as e:
        mismatch = [ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("size mismatch")]
        if not mismatch:
            raise
        raise ValueError(
            f"requantize: the checkpoint does not fit this {type(model).__name__} ({len(mismatch)} tensors of other "
            f"shapes; it was made for a model of other dimensions): " + "; ".join(mismatch[:4])
            + (" ..." if len(mismatch) > 4 else "")
        ) from None
    if callable(getattr(model, "tie_weights", None)):
        # transformers models: assign=True replaced the embedding, re-point tied heads at it
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        shown = ", ".join(leftover[:5]) + (" ..." if len(leftover) > 5 else "")
        raise RuntimeError(
            f"after loading, {len(leftover)} tensors are still on the meta device ({shown}); they are not in the "
            "state dict (non-persistent buffers or missing keys). Build the empty model with "
            "accelerate.init_empty_weights() so that buffers are real, or pass the missing tensors."
        )
    if not strict and (result.missing_keys or result.unexpected_keys):
        import warnings

        warnings.warn(f"requantize: missing keys {result.missing_keys}, unexpected keys {result.unexpected_keys}",
                      stacklevel=2)
    if device is not None:
        model.to(device)
    return model
