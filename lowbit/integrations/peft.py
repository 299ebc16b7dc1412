"""QLoRA through peft: LoRA adapters over lowbit's quantized linears (Dettmers et al. 2023, arXiv:2305.14314).

Importing this module teaches ``peft`` (0.21's LoRA tuner, ``peft/tuners/lora/model.py``) about
lowbit's quantized ``nn.Linear`` subclasses (:class:`~lowbit.nn.Linear4bit`, :class:`~lowbit.nn.QLinear`,
``Linear8bitLt``, any :class:`~lowbit.nn.QModuleMixin` Linear): ``peft.get_peft_model(model,
LoraConfig(target_modules=[...]))`` then wraps each targeted quantized layer in
:class:`LowbitLoraLinear`. The base stays frozen (its weight is a packed QuantState, not a
parameter), only the adapters train, and gradient checkpointing works (the base dequantizes again
in the recomputed forward).

peft has no public registry of layer dispatchers (its bitsandbytes / HQQ / torchao dispatchers
are a fixed list in ``LoraModel._create_new_module``), so :func:`install` wraps that static method
to try lowbit's dispatcher first, and wraps ``LoraModel._replace_module`` to place the adapters on the
device of the packed weight. Both wrappers hand every other layer to peft unchanged. lowbit modules
have no ``qweight`` attribute (peft reads one as a GPTQ weight tensor; the dequantized weight is
``dequantized_weight()``). ``import lowbit`` arranges for this module to be imported as soon as peft
is (:mod:`lowbit.integrations._hooks`), so peft's standard recipe needs no lowbit-specific call. The experimental per-config API
works too: ``config._register_custom_module(LORA_MODULE_MAPPING)``.

Merging: ``LowbitLoraLinear.merge`` (peft's ``merge_and_unload``) re-quantizes the merged weight
with the base layer's own scheme and granularity; :func:`merge_lora` does either that
(``requantize=True``) or a float merge into a plain ``nn.Linear`` (``requantize=False``) in one call.

Example::

    >>> import lowbit.integrations.peft as lbp
    >>> from peft import LoraConfig, get_peft_model
    >>> model = get_peft_model(qmodel, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    >>> # ... train ...
    >>> merged = lbp.merge_lora(model, requantize=False)   # float nn.Linear everywhere LoRA was
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.utils.checkpoint
from torch import nn

from lowbit._deps import require

require("peft", "QLoRA adapters (lowbit.integrations.peft)")

from peft.tuners.lora import layer as _lora_layer  # noqa: E402
from peft.tuners.lora import model as _lora_model  # noqa: E402
from peft.tuners.lora.config import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge  # noqa: E402

from lowbit.nn import QModuleMixin  # noqa: E402
from lowbit.tensor.functional import dequantize, quantize_tensor  # noqa: E402
from lowbit.tensor.state import QuantState  # noqa: E402

# ---------------------------------------------------------------------------------------------
# re-quantization with a state's own scheme


def requantize_like(state: QuantState, weight: torch.Tensor) -> QuantState:
    """Quantize ``weight`` with the scheme, granularity and double quantization of ``state``.

    Example::

        >>> s = lowbit.quantize(torch.randn(64, 96), "int4_asym", group_size=32)
        >>> t = requantize_like(s, torch.randn(64, 96))
        >>> (t.scheme, t.layout, t.block_size)
        ('int4_asym', 'group', 32)
    """
    if tuple(weight.shape) != tuple(state.shape):
        raise ValueError(f"weight of shape {tuple(weight.shape)} cannot take the scheme of a state of shape "
                         f"{tuple(state.shape)}")
    w = weight.detach().to(state.dtype)
    if state.layout == "gguf":
        return quantize_tensor(w, state.scheme)
    kw: Dict[str, Any] = {}
    if state.layout == "group":
        kw["group_size"] = state.block_size
    elif state.layout == "channel":
        kw["axis"] = state.axis
    elif state.layout == "block":
        kw["block_size"] = state.block_size
    elif state.layout == "tensor":
        kw["block_size"] = None
    else:
        raise ValueError(f"QuantState layout {state.layout!r}: expected tensor, channel, group, block or gguf")
    if state.nested is not None:
        kw["double_quant"] = True
        kw["double_quant_block_size"] = state.nested.block_size
    elif state.scales is not None and state.scales.dtype != torch.float32:
        kw["scale_dtype"] = state.scales.dtype
    return quantize_tensor(w, state.scheme, **kw)


def _base_is_lowbit(module: nn.Module) -> bool:
    return isinstance(module, QModuleMixin) and isinstance(module, nn.Linear)


def _module_device(module: nn.Module) -> Optional[torch.device]:
    if isinstance(module, QModuleMixin):
        for s in module.quant_states().values():
            return s.device
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        return t.device
    return None


# ---------------------------------------------------------------------------------------------
# the LoRA layer


class LowbitLoraLinear(_lora_layer.Linear):
    """peft ``lora.Linear`` over a lowbit quantized Linear.

    Forward, dropout, scaling, DoRA and mixed-adapter batches are peft's (``base(x) + B(A(x)) * s``);
    merging dequantizes the base, adds the delta and re-quantizes with the base's own scheme.

    The lowbit base layers keep no dequantized float weight for the backward pass themselves
    (:func:`lowbit.nn.functional.frozen_linear` re-dequantizes it for the input gradient), which is
    what makes QLoRA cheaper than LoRA on the float model. ``recompute_base`` (default False)
    additionally runs the base layer under non-reentrant activation checkpointing (a base module
    that does not manage its weight that way then still keeps nothing); outputs and gradients are
    identical either way.
    """

    recompute_base: bool = False

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ValueError("LowbitLoraLinear does not support lora_bias=True (set it to False)")
        if config.fan_in_fan_out:
            warnings.warn("fan_in_fan_out=True does not apply to a lowbit quantized Linear; using False", stacklevel=2)
            config.fan_in_fan_out = False
        super().__init__(base_layer, adapter_name, config=config, r=r, lora_alpha=lora_alpha, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized base weight (read by code that inspects ``layer.weight``)."""
        return self.get_base_layer().weight

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not (self.recompute_base and torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        plain = type(base).forward.__get__(base)

        def checkpointed(*a: Any, **k: Any) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(plain, *a, use_reentrant=False, **k)

        # peft's forward calls ``self.base_layer(x)``: route that one call through the checkpoint
        base.forward = checkpointed
        try:
            return super().forward(x, *args, **kwargs)
        finally:
            del base.forward

    def _merged_weight(self, adapter_names: List[str], sign: float = 1.0) -> torch.Tensor:
        base = self.get_base_layer()
        w = base.weight.detach()
        orig_dtype = w.dtype
        w = w.float()
        for name in adapter_names:
            if name not in self.lora_A.keys():
                continue
            if name in self.lora_variant:
                if sign > 0:
                    w = self.lora_variant[name].merge_safe(self, name, w).float()
                else:
                    w = self.lora_variant[name].unmerge(self, name, w).float()
            else:
                w = w + sign * self.get_delta_weight(name).float().to(w.device)
        return w.to(orig_dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """Merge the adapters into the base: dequantize, add ``B @ A * scaling``, re-quantize in place."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        w = self._merged_weight(adapter_names)
        if safe_merge and not torch.isfinite(w).all():
            raise ValueError(f"NaNs detected in the merged weights; the adapters {adapter_names} seem to be broken")
        base.set_quant_state("weight", requantize_like(base.qstate, w))
        self.merged_adapters.extend(a for a in adapter_names if a in self.lora_A.keys())

    def unmerge(self) -> None:
        """Subtract the merged adapters again (lossy: the weight is re-quantized twice)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        names = list(reversed(self.merged_adapters))
        self.merged_adapters.clear()
        w = self._merged_weight(names, sign=-1.0)
        base.set_quant_state("weight", requantize_like(base.qstate, w))

    def merged_module(self, requantize: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
        """A new module holding base + adapters: a float ``nn.Linear``, or the base class re-quantized."""
        base = self.get_base_layer()
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        w = self._merged_weight([n for n in names if n not in self.merged_adapters])
        if requantize:
            new = type(base).from_module(_float_linear(base, w), **base.quant_config())
            new.set_quant_state("weight", requantize_like(base.qstate, w))
            return new
        return _float_linear(base, w)

    def __repr__(self) -> str:
        return "lowbit_lora." + nn.Module.__repr__(self)


def _float_linear(base: nn.Module, w: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return lin


def dispatch_lowbit(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> Optional[nn.Module]:
    """peft-style dispatcher: a :class:`LowbitLoraLinear` for a lowbit quantized Linear, else None."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if _base_is_lowbit(base) and kwargs.get("parameter_name") is None:
        kwargs.pop("parameter_name", None)
        return LowbitLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def _lowbit_module_classes() -> tuple:
    from lowbit.model.api import MODULE_CLASSES, _register_optional_classes

    _register_optional_classes()
    return tuple({MODULE_CLASSES.get(n) for n in MODULE_CLASSES.names()
                  if issubclass(MODULE_CLASSES.get(n), nn.Linear)})


#: ``{lowbit Linear class: LowbitLoraLinear}`` for ``LoraConfig._register_custom_module``
LORA_MODULE_MAPPING: Dict[type, type] = {cls: LowbitLoraLinear for cls in _lowbit_module_classes()}


# ---------------------------------------------------------------------------------------------
# teaching peft


def install() -> None:
    """Make peft's LoRA tuner dispatch lowbit quantized Linears to :class:`LowbitLoraLinear` (idempotent)."""
    cls = _lora_model.LoraModel
    if getattr(cls, "_lowbit_installed", False):
        return
    orig_create = cls._create_new_module
    orig_replace = cls._replace_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = dispatch_lowbit(target, adapter_name, lora_config, **kwargs)
        if new is not None:
            return new
        return orig_create(lora_config, adapter_name, target, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child):
        base = child.base_layer if isinstance(child, BaseTunerLayer) else child
        if not _base_is_lowbit(base):
            return orig_replace(self, parent, child_name, new_module, child)
        setattr(parent, child_name, new_module)
        device = _module_device(base)
        meta = torch.device("meta")
        if device is None:
            return None
        for name, module in new_module.named_modules():
            if (self.prefix in name) or ("ranknum" in name):
                if not any(p.device == meta for p in module.parameters()):
                    module.to(device)
        return None

    cls._create_new_module = staticmethod(_create_new_module)
    cls._replace_module = _replace_module
    cls._lowbit_installed = True


install()


# ---------------------------------------------------------------------------------------------
# merging


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _update_hf_quantization(model: nn.Module) -> None:
    """Keep a transformers model's ``quantization_config`` in step with its modules after a merge."""
    cfg = getattr(getattr(model, "config", None), "quantization_config", None)
    if cfg is None or getattr(cfg, "quant_method", None) != "lowbit":
        return
    from lowbit.model.api import quantization_map

    qmap = quantization_map(model)
    if qmap:
        cfg.quantization_map = qmap
        return
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    else:
        del model.config.quantization_config


def merge_lora(model: nn.Module, requantize: bool = False, adapter_names: Optional[List[str]] = None) -> nn.Module:
    """Merge LoRA adapters into their base layers and drop the peft wrappers, in one call.

    * ``requantize=False``: every adapted lowbit layer becomes a float ``nn.Linear`` holding
      ``dequantize(W) + B @ A * scaling`` (in the base's original dtype);
    * ``requantize=True``: the merged weight is quantized again with the base layer's scheme,
      granularity and double quantization (same module class, same options).

    Other LoRA layers (over float Linears) are merged by peft. Accepts a ``PeftModel``, a peft
    ``LoraModel`` or any module with injected LoRA layers; returns the unwrapped model. A
    transformers model's ``quantization_config`` is updated (removed when nothing quantized is left).

    Example::

        >>> merged = merge_lora(peft_model)                    # float merge
        >>> q_merged = merge_lora(peft_model, requantize=True)  # still NF4 / int4 ...
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, LowbitLoraLinear):
            _set_module(model, name, m.merged_module(requantize=requantize, adapter_names=adapter_names))
    if hasattr(model, "merge_and_unload"):  # PeftModel / LoraModel: merges float LoRA layers, unwraps
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Aa]lready unmerged.*")
            out = model.merge_and_unload(adapter_names=adapter_names)
    else:
        for name, m in list(model.named_modules()):
            if isinstance(m, BaseTunerLayer):
                m.merge(adapter_names=adapter_names)
                _set_module(model, name, m.get_base_layer())
        out = model
    _update_hf_quantization(out)
    return out


__all__ = ["LowbitLoraLinear", "LORA_MODULE_MAPPING", "dispatch_lowbit", "install", "merge_lora", "requantize_like"]
