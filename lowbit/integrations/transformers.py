"""transformers integration: ``LowbitConfig`` and ``LowbitHfQuantizer`` (``quant_method="lowbit"``).

Follows transformers' quantizer contract (``transformers/quantizers/base.py``, version 5.x, modelled
on ``quantizer_bnb_4bit.py`` and ``quantizer_quanto.py``): importing this module registers the
config and the quantizer in ``transformers.quantizers.auto`` so that::

    import lowbit
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=lowbit.LowbitConfig(method="nf4"))
    model.save_pretrained(out)                     # QuantState buffers + config.json quantization_config
    again = AutoModelForCausalLM.from_pretrained(out)   # no re-quantization, bit-exact

How loading works:

* **data-free formats** (``nf4``, ``fp4``, ``int4``, ``int8``, ``fp8``): before the weights are
  read, every selected ``nn.Linear`` of the meta-device model is replaced by a lowbit module
  (``Linear4bit`` for nf4/fp4, ``QLinear`` otherwise); each weight is quantized the moment it is
  materialised (one float weight alive at a time), so the float model never exists in memory.
  The codes are exactly ``lowbit.quantize(weight, scheme, ...)``'s.
* **data-free algorithms of the dispatcher** (``rtn``, ``hqq``, or any other method registered
  with :func:`lowbit.model.methods.register_method` that needs no data): each float weight, once
  materialised, is handed to ``lowbit.quantize(<that one Linear>, method=...)`` and the layer is
  swapped for the result, again one weight at a time.
* **calibrated methods** (``gptq``, ``awq``): the float model is loaded, then quantized once by
  ``lowbit.quantize(model, method=..., calib_dataset=..., n_samples=..., seq_len=...)`` (the
  block-by-block pipeline of :mod:`lowbit.model`), before ``from_pretrained`` returns.

After quantization the config records ``quantization_map`` (module -> lowbit class and options,
:func:`lowbit.quantization_map`), so a saved directory reloads by rebuilding exactly those modules
on the meta device and installing each QuantState from its tensors (``<module>.weight.data``,
``.scales``, ``.zeros``, ``.code``, ``.meta``, ``.nested.*``), without touching float weights.

A fresh process must import this module (or touch ``lowbit.LowbitConfig``) before
``from_pretrained`` of a saved lowbit directory: transformers has no plugin discovery.
"""
from __future__ import annotations

import copy
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from lowbit._deps import require

# 5.23: the oldest release the save/reload round trip is tested with (5.17's loader does not re-apply the
# quantizer on reload and hands the stored uint8 codes to ``quantize``); the ``hf`` extra has the same floor
require("transformers", "the transformers integration (LowbitConfig)", min_version="5.23")

from transformers.core_model_loading import ConversionOps  # noqa: E402
from transformers.quantizers import auto as _hf_auto  # noqa: E402
from transformers.quantizers.base import HfQuantizer  # noqa: E402
from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

from lowbit.config import WeightOnlyConfig, parse_dtype  # noqa: E402
from lowbit.model.api import MODULE_CLASSES, quantization_map, quantize_model  # noqa: E402
from lowbit.nn import QLinear, QModuleMixin  # noqa: E402
from lowbit.nn.linear4bit import Linear4bit  # noqa: E402
from lowbit.tensor.state import QuantState  # noqa: E402

logger = logging.getLogger(__name__)

QUANT_METHOD = "lowbit"
CONFIG_VERSION = 1

# What each method means, its options and defaults come from lowbit's method table
# (lowbit.model.methods, the config classes of lowbit.config); these names list the built-in ones.
#: data-free methods with a fixed module mapping (quantized weight by weight while loading)
MAPPED_METHODS = ("nf4", "fp4", "int4", "int8", "fp8")
#: methods that need calibration data: run on the loaded model by the lowbit dispatcher
CALIBRATED_METHODS = ("gptq", "awq")
#: data-free algorithms run per weight through the lowbit dispatcher
DISPATCHED_METHODS = ("rtn", "hqq")
KNOWN_METHODS = MAPPED_METHODS + DISPATCHED_METHODS + CALIBRATED_METHODS
#: LowbitConfig keys that are options of the method's config (when the config has that field)
_GRID_KEYS = ("bits", "group_size", "sym", "double_quant", "compute_dtype")
_CALIB_KEYS = ("calib_dataset", "n_samples", "seq_len", "tokenizer")
#: code widths the integration's checkpoints are tested with (the PTQ configs accept 2..8)
INTEGRATION_BITS = (2, 3, 4, 8)
_QSTATE_PARTS = ("data", "scales", "zeros", "code", "meta")
#: shape of the guard tensor saved under each quantized weight's float name (see ``get_state_dict_and_metadata``)
WEIGHT_GUARD_SHAPE = (0,)
#: checkpoint names of one quantized weight (QuantState.state_dict under ``weight.``)
SERIALIZED_WEIGHT_NAMES = [f"weight.{p}" for p in _QSTATE_PARTS] + [f"weight.nested.{p}" for p in _QSTATE_PARTS]


# ---------------------------------------------------------------------------------------------
# configuration


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


class LowbitConfig(QuantizationConfigMixin):
    """Quantization config for ``from_pretrained(..., quantization_config=LowbitConfig(...))``.

    Args:
        method: a name of lowbit's method table, with the same meaning as ``lowbit quantize
            --method`` and ``lowbit.quantize(model, method=...)``: ``nf4`` | ``fp4``
            (bitsandbytes-style 4-bit codebooks over flat blocks), ``int4`` (asymmetric int4,
            quanto's qint4: a zero point per group), ``int8`` (symmetric int8), ``fp8`` (float8
            e4m3 with per-channel or per-group scales), ``rtn`` | ``hqq`` (lowbit's data-free PTQ
            algorithms, any ``bits``), ``gptq`` | ``awq`` (calibrated, run after loading); or any
            method registered in the table.
        bits: code width (fixed 4 for nf4/fp4/int4, 8 for int8/fp8; 2, 3, 4 or 8 otherwise;
            default 4).
        group_size: weights per scale along the input dimension (nf4/fp4: the block size,
            default 64; integer methods default 128; int8/fp8 default -1 = one scale per output
            channel).
        sym: symmetric integer codes (default: the method's; True for rtn/gptq/awq/hqq); ``False``
            stores a zero point per group. ``int4`` is asymmetric (``sym=True`` is an error: use
            ``method="rtn", bits=4`` for symmetric int4).
        double_quant: nf4/fp4 only, quantize the block absmax once more (QLoRA, ~4.127 bits).
        compute_dtype: nf4/fp4 only, dtype of the matmul (default: the input's dtype).
        modules_to_not_convert: module names or patterns kept in float (transformers' matching
            rules: prefix at a module boundary, regex, or suffix). Default: the output
            embedding (``lm_head``) and tied weights, as transformers picks them.
        calib_dataset, n_samples, seq_len, tokenizer: calibration data for gptq/awq (see
            ``lowbit.quantize(model, method="gptq", ...)``); a path or dataset name is saved in
            the config, other objects (token tensors, lists of strings, the tokenizer) are not.
        method_kwargs: extra keyword options passed to the lowbit method as they are (only the
            JSON-able ones are saved).
        quantization_map: filled in after quantization (module -> lowbit class and options);
            what a saved directory is rebuilt from. Not set by users.

    Example::

        >>> cfg = LowbitConfig(method="int4", group_size=64)
        >>> cfg.to_dict()["quant_method"], cfg.bits
        ('lowbit', 4)
    """

    def __init__(self, method: str = "nf4", bits: Optional[int] = None, group_size: Optional[int] = None,
                 sym: Optional[bool] = None, double_quant: bool = False,
                 compute_dtype: Union[str, torch.dtype, None] = None,
                 modules_to_not_convert: Optional[Sequence[str]] = None, calib_dataset: Any = None,
                 n_samples: Optional[int] = None, seq_len: Optional[int] = None, tokenizer: Any = None,
                 method_kwargs: Optional[Dict[str, Any]] = None,
                 quantization_map: Optional[Dict[str, Dict[str, Any]]] = None, **kwargs: Any) -> None:
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        version = kwargs.pop("version", CONFIG_VERSION)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method={quant_method!r}: LowbitConfig is for quant_method {QUANT_METHOD!r}")
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"LowbitConfig version {version!r} is newer than this lowbit ({CONFIG_VERSION})")
        if kwargs:
            raise ValueError(f"LowbitConfig does not accept {', '.join(map(repr, sorted(kwargs)))}; accepted keys: "
                             "method, bits, group_size, sym, double_quant, compute_dtype, modules_to_not_convert, "
                             "calib_dataset, n_samples, seq_len, tokenizer, method_kwargs, quantization_map")
        self.quant_method = QUANT_METHOD
        self.version = CONFIG_VERSION
        self.method = method.lower() if isinstance(method, str) else method
        self.bits = bits
        self.group_size = group_size
        self.sym = sym
        self.double_quant = double_quant
        self.compute_dtype = compute_dtype
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None
        self.calib_dataset = calib_dataset
        self.n_samples = n_samples
        self.seq_len = seq_len
        self.tokenizer = tokenizer
        self.method_kwargs = dict(method_kwargs or {})
        self.quantization_map = quantization_map
        self.post_init()

    def _entry(self):
        from lowbit.model.methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: expected a method of lowbit's method table "
                             f"({', '.join(METHODS.names())})")
        return METHODS.get(self.method)

    def method_config(self):
        """The method's validated config object (:mod:`lowbit.config`), or None for a config-less method."""
        entry = self._entry()
        if entry.config_cls is None:
            return None
        return entry.config_cls.create(**self._config_kwargs(entry, runtime=False))

    def _config_kwargs(self, entry, runtime: bool = True) -> Dict[str, Any]:
        """Keyword options of the method's config: the grid keys it has, calibration keys, ``method_kwargs``."""
        from lowbit.config import Bnb4bitConfig

        accepted = entry.accepted_keys()
        out: Dict[str, Any] = {}
        for key in _GRID_KEYS:
            value = getattr(self, key)
            target = "block_size" if key == "group_size" and entry.config_cls is not None and \
                issubclass(entry.config_cls, Bnb4bitConfig) else key
            if value is None or (key == "double_quant" and not value):
                continue
            if target in accepted:
                out[target] = value
        for key in _CALIB_KEYS:
            value = getattr(self, key)
            if value is not None and key in accepted and (runtime or key != "tokenizer"):
                out[key] = value
        out.update(self.method_kwargs)
        return out

    def post_init(self) -> None:
        """Validate and fill the defaults from the method table (raises ValueError naming the offending value)."""
        from lowbit.config import Bnb4bitConfig, _QTypeConfig

        m = self.method
        if not isinstance(m, str):
            raise TypeError(f"method must be a string, got {type(m).__name__}")
        if not isinstance(self.method_kwargs, dict):
            raise TypeError(f"method_kwargs must be a dict, got {type(self.method_kwargs).__name__}")
        entry = self._entry()
        cls = entry.config_cls
        accepted = entry.accepted_keys()
        if self.sym is not None and not isinstance(self.sym, bool):
            raise TypeError(f"sym must be a bool, got {self.sym!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or (self.group_size <= 0 and self.group_size != -1)):
            raise ValueError(f"group_size={self.group_size!r}: must be a positive integer or -1 (per channel)")
        mapped = cls is not None and issubclass(cls, (Bnb4bitConfig, _QTypeConfig))
        if cls is not None and issubclass(cls, Bnb4bitConfig):
            fixed = {"bits": 4, "sym": True}
            if self.group_size == -1:
                raise ValueError(f"group_size=-1: method {m!r} needs a positive block size (default 64)")
            if self.sym is False:
                raise ValueError(f"sym=False: method {m!r} has no zero point (codebook / float codes)")
        elif cls is not None and issubclass(cls, _QTypeConfig):
            fixed = {"bits": cls().bits, "sym": cls().bits == 8}
            legacy = self.quantization_map is not None  # saved by an older lowbit (int4 was symmetric)
            if self.sym is not None and self.sym != fixed["sym"] and not legacy:
                raise ValueError(f"sym={self.sym!r}: method {m!r} is {'symmetric' if fixed['sym'] else 'asymmetric'}"
                                 + ("" if fixed["sym"] else f" (quanto's qint{fixed['bits']}, a zero point per group); "
                                    f"for symmetric {fixed['bits']}-bit codes use method='rtn', bits={fixed['bits']}"))
        else:
            fixed = {}
        if "bits" in fixed:
            if self.bits is None:
                self.bits = fixed["bits"]
            elif self.bits != fixed["bits"]:
                raise ValueError(f"bits={self.bits!r}: method {m!r} is {fixed['bits']}-bit")
        if self.sym is None:
            self.sym = fixed.get("sym", True)
        if fixed.get("sym") and m in ("fp8",) and not self.sym:
            raise ValueError(f"sym=False: method {m!r} has no zero point (float codes)")
        if self.double_quant and "double_quant" not in accepted:
            raise ValueError(f"double_quant=True: only methods 'nf4' and 'fp4' quantize their scales, not {m!r}")
        if self.compute_dtype is not None:
            if "compute_dtype" not in accepted:
                raise ValueError(f"compute_dtype: only methods 'nf4' and 'fp4' take a compute dtype, not {m!r}")
            self.compute_dtype = str(parse_dtype(self.compute_dtype, "compute_dtype")).replace("torch.", "")
        if self.modules_to_not_convert is not None:
            for p in self.modules_to_not_convert:
                if not isinstance(p, str):
                    raise TypeError(f"modules_to_not_convert entries must be strings, got {p!r}")
        for key in ("n_samples", "seq_len"):
            v = getattr(self, key)
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{key}={v!r}: must be a positive integer")
        if cls is not None and issubclass(cls, WeightOnlyConfig) and self.bits is not None and \
                self.bits not in INTEGRATION_BITS:
            raise ValueError(f"bits={self.bits!r}: method {m!r} supports 2, 3, 4 or 8 bits in the transformers "
                             f"integration")
        if not mapped and self.bits is not None and "bits" not in accepted:
            raise ValueError(f"bits={self.bits!r}: method {m!r} does not take bits")
        cfg = self.method_config() if cls is not None else None
        # the method's defaults, recorded in the config
        if cfg is not None:
            if self.bits is None and "bits" in accepted:
                self.bits = cfg.bits
            if self.group_size is None:
                if isinstance(cfg, Bnb4bitConfig):
                    self.group_size = cfg.block_size
                elif "group_size" in accepted:
                    self.group_size = -1 if cfg.group_size is None else cfg.group_size

    # -- what the config means ------------------------------------------------------------------
    @property
    def is_calibrated(self) -> bool:
        return self._entry().calibrated

    @property
    def is_mapped(self) -> bool:
        from lowbit.config import Bnb4bitConfig, _QTypeConfig

        cls = self._entry().config_cls
        return cls is not None and issubclass(cls, (Bnb4bitConfig, _QTypeConfig))

    def module_for(self, linear: nn.Linear) -> nn.Module:
        """The (unfrozen) lowbit module replacing ``linear`` for a mapped method (parameters shared)."""
        from lowbit.config import Bnb4bitConfig

        cfg = self.method_config()
        if isinstance(cfg, Bnb4bitConfig):
            return Linear4bit.from_module(linear, quant_type=cfg.quant_type, compute_dtype=cfg.compute_dtype,
                                          double_quant=cfg.double_quant, block_size=cfg.block_size)
        return QLinear.from_module(linear, weights=cfg.weights, group_size=cfg.group_size)

    def dispatcher_options(self) -> Dict[str, Any]:
        """Keyword options for ``lowbit.quantize(model, method=self.method, **options)``."""
        entry = self._entry()
        opts = self._config_kwargs(entry)
        if not entry.calibrated and "progress" in entry.accepted_keys():
            opts.setdefault("progress", False)  # one call per weight: no progress bar each time
        return opts

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict (a calibration dataset that is not a path or name is left out)."""
        d = {
            "quant_method": self.quant_method,
            "version": self.version,
            "method": self.method,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "double_quant": self.double_quant,
            "compute_dtype": self.compute_dtype,
            "modules_to_not_convert": self.modules_to_not_convert,
            "n_samples": self.n_samples,
            "seq_len": self.seq_len,
            "method_kwargs": {k: copy.deepcopy(v) for k, v in self.method_kwargs.items() if _jsonable(v)},
            "quantization_map": copy.deepcopy(self.quantization_map),
        }
        if isinstance(self.calib_dataset, str):
            d["calib_dataset"] = self.calib_dataset
        return d

    def __iter__(self):
        yield from self.to_dict().items()

    def to_diff_dict(self) -> Dict[str, Any]:
        return self.to_dict()


# ---------------------------------------------------------------------------------------------
# loading operations


class LowbitQuantize(ConversionOps):
    """Quantize one materialised float weight into the lowbit module that owns it."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: Dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys=None, **kwargs: Any) -> Dict[str, torch.Tensor]:
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, pname = get_module_from_name(model, name)
            if isinstance(module, QModuleMixin):
                module._parameters[pname] = nn.Parameter(value, requires_grad=False)
                module.freeze()
            else:
                module.weight = nn.Parameter(value, requires_grad=False)
                self.hf_quantizer._dispatch_one(model, name.rpartition(".")[0], module)
            module._is_hf_initialized = True
            if missing_keys is not None:
                missing_keys.discard(name)
        return {}


class LowbitDeserialize(ConversionOps):
    """Rebuild a saved QuantState (``weight.data``, ``weight.scales``, ...) and install it in its module."""

    def __init__(self, hf_quantizer: "LowbitHfQuantizer") -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: Dict[str, Any], model: Optional[nn.Module] = None,
                full_layer_name: Optional[str] = None, missing_keys=None, **kwargs: Any) -> Dict[str, torch.Tensor]:
        parts = {}
        plain = None
        for key, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            if key.rpartition(".")[2] == "weight" or key == "weight":
                plain = value  # a float weight of an unquantized module, or a quantized weight's guard
                continue
            parts[key] = value
        module, pname = get_module_from_name(model, full_layer_name)
        if not parts:
            if plain is None or isinstance(module, QModuleMixin) and tuple(plain.shape) == WEIGHT_GUARD_SHAPE:
                return {}
            return {full_layer_name: plain}  # not quantized: loaded as transformers would
        if not isinstance(module, QModuleMixin):
            raise TypeError(f"{full_layer_name}: the checkpoint holds a quantized weight but the module is a "
                            f"{type(module).__name__}, not a lowbit quantized module (is quantization_map complete?)")
        prefix = pname + "."
        state = QuantState.from_state_dict(parts, prefix)
        expected = module.param_shape(pname)
        if tuple(state.shape) != tuple(expected):
            raise ValueError(f"{full_layer_name}: QuantState of shape {tuple(state.shape)} in the checkpoint, "
                             f"expected {tuple(expected)}")
        module.set_quant_state(pname, state)
        module._is_hf_initialized = True
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {}


# ---------------------------------------------------------------------------------------------
# the quantizer


def _rebuild_from_map(model: nn.Module, qmap: Dict[str, Dict[str, Any]]) -> None:
    """Replace the float modules named in ``qmap`` by their lowbit class (unfrozen, on meta)."""
    for name, entry in qmap.items():
        try:
            float_mod = model.get_submodule(name)
        except AttributeError:
            raise KeyError(f"quantization_map names module {name!r}, which the model does not have") from None
        cls = MODULE_CLASSES.get(entry["class"])
        if isinstance(float_mod, cls):
            continue
        model.set_submodule(name, cls.from_module(float_mod, **dict(entry.get("config") or {})))


class LowbitHfQuantizer(HfQuantizer):
    """transformers ``HfQuantizer`` for :class:`LowbitConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: List[str] = []
        self._dispatch_targets: set = set()

    @property
    def quantized_element_size(self) -> Optional[float]:
        cfg = self.quantization_config
        if cfg.is_calibrated and not self.pre_quantized:
            return None  # the float model is loaded first
        return (cfg.bits or 8) / 8

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("device_map places modules on 'disk': lowbit quantized modules cannot be offloaded to "
                             "disk; give them a CPU or GPU device")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module, name = get_module_from_name(model, param_name)
        if name != "weight":
            return False
        if isinstance(module, QModuleMixin):
            return not module.frozen
        return param_name.rpartition(".")[0] in self._dispatch_targets

    def _selected_linears(self, model: nn.Module) -> List[str]:
        return [name for name, m in model.named_modules()
                if name and isinstance(m, nn.Linear) and not isinstance(m, QModuleMixin)
                and should_convert_module(name, self.modules_to_not_convert)]

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        cfg = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, cfg.modules_to_not_convert, getattr(model, "_keep_in_fp32_modules", None),
            add_default_skips=cfg.modules_to_not_convert is None)
        if self.pre_quantized:
            if not cfg.quantization_map:
                raise ValueError("this checkpoint's quantization_config has no quantization_map: it was not saved by "
                                 "lowbit after quantization, so its modules cannot be rebuilt")
            _rebuild_from_map(model, cfg.quantization_map)
            return
        if cfg.is_mapped:
            for name in self._selected_linears(model):
                model.set_submodule(name, cfg.module_for(model.get_submodule(name)))
        elif not cfg.is_calibrated:
            self._dispatch_targets = set(self._selected_linears(model))

    def _dispatch_one(self, model: nn.Module, name: str, linear: nn.Linear) -> None:
        """Quantize one loaded Linear with the lowbit dispatcher and swap it into ``model``."""
        holder = nn.Module()
        holder.add_module("layer", linear)
        quantize_model(holder, method=self.quantization_config.method,
                       **self.quantization_config.dispatcher_options())
        new = holder.layer
        if new is linear or not isinstance(new, QModuleMixin):
            raise RuntimeError(f"lowbit method {self.quantization_config.method!r} did not quantize {name!r}")
        for m in new.modules():
            if isinstance(m, QModuleMixin) and not m.frozen:
                m.freeze()
        model.set_submodule(name, new)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self.quantization_config
        if not self.pre_quantized:
            if cfg.is_calibrated:
                exclude = [n for n, m in model.named_modules()
                           if n and isinstance(m, nn.Linear) and not should_convert_module(n, self.modules_to_not_convert)]
                quantize_model(model, method=cfg.method, exclude=exclude, **cfg.dispatcher_options())
            cfg.quantization_map = quantization_map(model)
        else:
            # transformers reverses the load-time conversions when saving; ours has no reverse (the
            # state dict already holds the serialized names), so it must not be replayed
            convs = getattr(model, "_weight_conversions", None)
            if convs:
                model._weight_conversions = [c for c in convs if not any(
                    isinstance(op, LowbitDeserialize) for op in getattr(c, "operations", ()))]
        return model

    def is_serializable(self) -> bool:
        return True

    def get_state_dict_and_metadata(self, model):
        """The model's state dict plus, per quantized weight, a guard tensor under the float weight's name.

        The guard (``<module>.weight``, shape ``(0,)``) is what makes the checkpoint *refuse* to load
        where lowbit is absent: transformers without lowbit's quantizer skips the unknown
        ``quant_method`` with a warning and would otherwise return plain ``Linear`` layers with the
        quantized weights dropped (randomly initialised); the guard's shape mismatches the float
        weight, so it raises instead. lowbit's loader drops the guards (:data:`WEIGHT_GUARD_SHAPE`).
        """
        sd = model.state_dict()
        for name, m in model.named_modules():
            if isinstance(m, QModuleMixin):
                for pname in m.quantized_param_names():
                    if f"{name}.{pname}.data" in sd and f"{name}.{pname}" not in sd:
                        sd[f"{name}.{pname}"] = torch.empty(WEIGHT_GUARD_SHAPE, dtype=torch.uint8)
        return sd, {"lowbit": "quantized weights are lowbit QuantStates: load with `import lowbit` first"}

    @property
    def is_trainable(self) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
        for name, m in list(model.named_modules()):
            if isinstance(m, QModuleMixin) and isinstance(m, nn.Linear):
                w = m.weight if dtype is None else m.weight.to(dtype)
                lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
                if m.bias is not None:
                    lin.bias = m.bias
                model.set_submodule(name, lin)
        return model

    def get_quantize_ops(self) -> LowbitQuantize:
        return LowbitQuantize(self)

    @property
    def serialized_names(self) -> Dict[str, List[str]]:
        # "weight" itself: the guard saved beside each QuantState (and the float weights of unquantized modules)
        return {"weight": list(SERIALIZED_WEIGHT_NAMES) + ["weight"]} if self.pre_quantized else {}

    def get_load_operations(self) -> Dict[str, type]:
        return {"deserialize": LowbitDeserialize}


# ---------------------------------------------------------------------------------------------
# registration


def register() -> None:
    """Register ``LowbitConfig`` / ``LowbitHfQuantizer`` under ``quant_method="lowbit"`` (idempotent)."""
    if _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not LowbitConfig:
        _hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = LowbitConfig
    if _hf_auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not LowbitHfQuantizer:
        _hf_auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = LowbitHfQuantizer


register()

__all__ = ["LowbitConfig", "LowbitHfQuantizer", "LowbitQuantize", "LowbitDeserialize", "register",
           "SERIALIZED_WEIGHT_NAMES", "KNOWN_METHODS"]
