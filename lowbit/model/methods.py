"""The method dispatcher: ``lowbit.quantize(model, method=NAME, **config)`` and its registry.

Every backend has the same signature, ``fn(model, config) -> nn.Module``, and registers by name::

    from lowbit.config import MethodConfig
    from lowbit.model.methods import register_method

    @dataclass(frozen=True)
    class MyConfig(MethodConfig):
        method: ClassVar[str] = "my-method"
        bits: int = 4

    @register_method("my-method", config=MyConfig)
    def my_method(model, config):
        ...
        return model

A weight-only PTQ method needs no model-level function: its config subclasses
:class:`lowbit.config.WeightOnlyConfig` (which owns ``bits``/``group_size``/``sym`` and the
calibration options) and it registers the function that quantizes one layer, and the block-by-block
pipeline (:mod:`lowbit.model.sequential`) runs it::

    @dataclass(frozen=True)
    class ToyConfig(WeightOnlyConfig):
        method: ClassVar[str] = "toy"
        shrink: float = 1.0                      # the method's own option, with its default

    def toy_layer(weight, config):               # [out, in] float -> QuantState
        return rtn_quantize(weight * config.shrink, config.bits, config.group_size, config.sym)

    register_ptq_method("toy", config=ToyConfig, layer=toy_layer)   # data-free
    # calibrated: register_ptq_method("toy", config=ToyConfig, stage=toy_stage) with
    # toy_stage(stage, modules, config) filling stage.states (see sequential._gptq_stage_cfg)

Every entry states whether it needs calibration (``calibrated``), what it costs for ``lowbit plan``
(``cost``: a :class:`lowbit.model.plan.Cost`) and whether it yields a quantized model
(``quantized``: False for the fp32/fp16/bf16 baselines). The CLI, ``LowbitConfig``, ``plan``,
``compare`` and the reports read this table and nothing else.

A method registered without a config class receives the keyword arguments directly,
``fn(model, **kwargs)``, and its keyword parameters are the accepted keys. Either way a key the
method does not accept raises ``ValueError`` naming the accepted keys, and an unknown method
name raises ``ValueError`` listing the registered methods.

Built-in backends (this file): ``fp32`` (no change), ``fp16``, ``bf16`` (cast), ``int8``, ``int4``,
``int2``, ``fp8`` (weight-only quanto qtypes, frozen), ``int8-dynamic`` (Linear, LSTM, GRU),
``int8-static`` (calibrated Linear/Conv2d), ``bnb-int8`` (LLM.int8()), ``bnb-nf4``, ``bnb-fp4``,
and ``quanto`` (the ``weights=`` / ``activations=`` workflow). The weight-only PTQ algorithms
(``rtn``, ``awq``, ``gptq``, ``hqq``) register from ``lowbit.model.ptq_methods`` when it exists.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Optional, Type

import torch
from torch import nn

from lowbit._registry import Registry
from lowbit.config import (
    Bf16Config,
    BnbFp4Config,
    BnbInt8Config,
    BnbNf4Config,
    Fp8Config,
    Fp16Config,
    Fp32Config,
    Int2Config,
    Int4Config,
    Int8Config,
    Int8DynamicConfig,
    Int8StaticConfig,
    MethodConfig,
    QuantoConfig,
    WeightOnlyConfig,
)
from lowbit.model import plan as _plan


@dataclass(frozen=True)
class Method:
    """A registered quantization method."""

    name: str
    fn: Callable[..., Optional[nn.Module]]
    config_cls: Optional[Type[MethodConfig]] = None
    description: str = ""
    #: the method needs calibration data (the CLI supplies ``calib_dataset``)
    calibrated: bool = False
    #: the older dict form of ``cost`` (see :meth:`lowbit.model.plan.Cost.from_dict`)
    plan: Optional[dict] = None
    #: cost model for ``lowbit plan`` (:class:`lowbit.model.plan.Cost`); None: derived from ``plan``/``calibrated``
    cost: Any = None
    #: data-free PTQ: ``layer(weight [out, in], config) -> QuantState`` run by the block pipeline
    layer: Optional[Callable] = None
    #: calibrated PTQ: ``stage(stage, modules, config)`` run by the block pipeline on each stage's statistics
    stage: Optional[Callable] = None
    #: False for the float baselines (fp32, fp16, bf16): compare does not rank them
    quantized: bool = True

    def accepted_keys(self) -> tuple:
        if self.config_cls is not None:
            return self.config_cls.accepted_keys()
        params = list(inspect.signature(self.fn).parameters.values())[1:]
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))

    @property
    def takes_device(self) -> bool:
        """The method runs on a chosen device (``device=``/``progress=`` options)."""
        return "device" in self.accepted_keys()

    def make_config(self, **kwargs: Any) -> Optional[MethodConfig]:
        """The validated config object for ``kwargs`` (None for a method without a config class, whose
        keys are still checked)."""
        if self.config_cls is not None:
            return self.config_cls.create(**kwargs)
        accepted = self.accepted_keys()
        has_var_kw = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(self.fn).parameters.values())
        bad = sorted(set(kwargs) - set(accepted))
        if bad and not has_var_kw:
            raise ValueError(f"method {self.name!r} does not accept {', '.join(map(repr, bad))}; "
                             f"accepted keys: {', '.join(accepted) or '(none)'}")
        return None


_PLUGIN_MODULES = ("lowbit.model.ptq_methods", "lowbit.model.sparse_methods")
_plugins_loaded = False


def _load_plugins() -> None:
    """Import the modules that register more methods (the PTQ algorithms), once."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for mod in _PLUGIN_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)


class _MethodRegistry(Registry[Method]):
    def get(self, name: str) -> Method:
        if isinstance(name, str) and name.lower() not in self._items:
            _load_plugins()
        return super().get(name)

    def names(self) -> list:
        _load_plugins()
        return super().names()

    def __contains__(self, name: object) -> bool:
        _load_plugins()
        return super().__contains__(name)


METHODS: _MethodRegistry = _MethodRegistry("quantization method")


def register_method(name: str, *, config: Optional[Type[MethodConfig]] = None, aliases: tuple = (),
                    overwrite: bool = False, description: str = "", calibrated: bool = False,
                    plan: Optional[dict] = None, cost: Any = None, quantized: bool = True) -> Callable:
    """Decorator registering ``fn(model, config) -> model`` (or ``fn(model, **kwargs)``) under ``name``.

    ``calibrated``: the method needs ``calib_dataset`` (the CLI passes it, with ``device``/``progress``
    when the method accepts them); ``cost``: its :class:`lowbit.model.plan.Cost` for ``lowbit plan``
    (``plan``: the same as a dict); ``quantized=False``: a float baseline.
    """

    def deco(fn: Callable) -> Callable:
        doc = description or (inspect.getdoc(fn) or "").split("\n")[0]
        METHODS.add(name, Method(name, fn, config, doc, calibrated, plan, cost, quantized=quantized),
                    aliases=aliases, overwrite=overwrite)
        return fn

    return deco


def _run_ptq(model: nn.Module, config: WeightOnlyConfig) -> nn.Module:
    from lowbit.model.sequential import quantize_model_ptq

    return quantize_model_ptq(model, config=config)


def register_ptq_method(name: str, *, config: Type[WeightOnlyConfig], layer: Optional[Callable] = None,
                        stage: Optional[Callable] = None, cost: Any = None, aliases: tuple = (),
                        overwrite: bool = False, description: str = "") -> Method:
    """Register a weight-only PTQ method run by the block-by-block pipeline (one line per method).

    Give ``layer(weight, config) -> QuantState`` for a data-free method, or ``stage(stage, modules,
    config)`` for a calibrated one (it reads ``stage.stats`` and fills ``stage.states[name]``, see
    :func:`lowbit.model.sequential._gptq_stage_cfg`). ``config``: a :class:`WeightOnlyConfig` subclass
    whose ``method`` is ``name``; ``cost``: a :class:`lowbit.model.plan.Cost` (default: integer codes
    of ``bits`` with a scale and zero point per group; calibrated methods the GPTQ-like time).
    """
    if (layer is None) == (stage is None):
        raise TypeError(f"register_ptq_method({name!r}): give exactly one of layer= (data-free) or stage= "
                        f"(calibrated)")
    if not (isinstance(config, type) and issubclass(config, WeightOnlyConfig)):
        raise TypeError(f"register_ptq_method({name!r}): config must be a WeightOnlyConfig subclass, got {config!r}")
    if config.method != name:
        raise ValueError(f"register_ptq_method({name!r}): {config.__name__}.method is {config.method!r}")
    calibrated = stage is not None
    if cost is None:
        cost = _plan.Cost(calibrated=calibrated, storage=_plan.storage_affine)
    doc = description or (inspect.getdoc(config) or "").split("\n")[0]
    m = Method(name, _run_ptq, config, doc, calibrated, None, cost, layer=layer, stage=stage)
    METHODS.add(name, m, aliases=aliases, overwrite=overwrite)
    return m


def get_method(name: str) -> Method:
    """The table entry of ``name`` (an alias resolves to its method)."""
    return METHODS.get(name)


def list_methods() -> list:
    """Names of the registered methods (without aliases)."""
    return sorted({METHODS.get(n).name for n in METHODS.names()})


def run_method(model: nn.Module, method: str, config: Optional[MethodConfig] = None, **kwargs: Any) -> nn.Module:
    """Look ``method`` up, validate its configuration and apply it; returns the quantized model."""
    m = METHODS.get(method)
    if m.config_cls is not None:
        if config is not None:
            if kwargs:
                raise ValueError(f"pass either config= or keyword options to method {m.name!r}, not both "
                                 f"(got config and {', '.join(sorted(kwargs))})")
            if not isinstance(config, m.config_cls):
                raise TypeError(f"method {m.name!r} expects a {m.config_cls.__name__}, got {type(config).__name__}")
            cfg = config
        else:
            cfg = m.make_config(**kwargs)
        out = m.fn(model, cfg)
    else:
        if config is not None:
            raise TypeError(f"method {m.name!r} takes keyword options, not a config object")
        m.make_config(**kwargs)
        out = m.fn(model, **kwargs)
    return model if out is None else out


# ---------------------------------------------------------------------------------------------
# built-in backends


def _cast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.data = t.data.to(dtype)
    return model


_FLOAT16 = _plan.Cost(storage=_plan.storage_float(16))


@register_method("fp32", config=Fp32Config, aliases=("float", "none"), quantized=False,
                 cost=_plan.Cost(storage=_plan.storage_float(32)))
def fp32(model: nn.Module, config: Fp32Config) -> nn.Module:
    """The model as it is (the float baseline)."""
    return model


@register_method("fp16", config=Fp16Config, aliases=("float16",), quantized=False, cost=_FLOAT16)
def fp16(model: nn.Module, config: Fp16Config) -> nn.Module:
    """Cast floating parameters and buffers to float16 (lossless baseline for GPU inference)."""
    return _cast(model, torch.float16)


@register_method("bf16", config=Bf16Config, aliases=("bfloat16",), quantized=False, cost=_FLOAT16)
def bf16(model: nn.Module, config: Bf16Config) -> nn.Module:
    """Cast floating parameters and buffers to bfloat16."""
    return _cast(model, torch.bfloat16)


@register_method("quanto", config=QuantoConfig)
def quanto(model: nn.Module, config: QuantoConfig) -> nn.Module:
    """optimum-quanto workflow: Linear/Conv2d -> QLinear/QConv2d, fake-quantized until freeze."""
    from lowbit.model.api import replace_modules
    from lowbit.nn import QConv2d, QLinear

    opts = {"weights": config.weights, "activations": config.activations, "group_size": config.group_size,
            "act_dynamic": config.act_dynamic}

    def factory(name: str, m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, nn.Linear):
            return QLinear.from_module(m, **opts)
        if isinstance(m, nn.Conv2d):
            return QConv2d.from_module(m, **opts)
        return None

    return replace_modules(model, factory, config.include, config.exclude)


def _qtype_method(model: nn.Module, config) -> nn.Module:
    from lowbit.model.api import freeze

    model = quanto(model, config.quanto())
    freeze(model)
    return model


_QTYPE_COST = _plan.Cost(storage=_plan.storage_qtype)
_CHANNEL8_COST = _plan.Cost(storage=_plan.storage_int8_channel)
register_method("int8", config=Int8Config, cost=_CHANNEL8_COST,
                description="int8 weights (symmetric, per output channel), weight-only; frozen")(_qtype_method)
register_method("int4", config=Int4Config, cost=_QTYPE_COST,
                description="int4 weights (asymmetric, automatic groups of <=128), weight-only; frozen")(_qtype_method)
register_method("int2", config=Int2Config, cost=_QTYPE_COST,
                description="int2 weights (asymmetric, automatic groups of <=128), weight-only; frozen")(_qtype_method)
register_method("fp8", config=Fp8Config, cost=_CHANNEL8_COST,
                description="float8 e4m3 weights (per output channel), weight-only; frozen")(_qtype_method)


@register_method("int8-dynamic", config=Int8DynamicConfig)
def int8_dynamic(model: nn.Module, config: Int8DynamicConfig) -> nn.Module:
    """int8 per-channel weights, int8 per-token activations at run time (Linear, LSTM, GRU); frozen."""
    from lowbit.model.api import freeze, replace_modules
    from lowbit.nn import DynamicQuantGRU, DynamicQuantLSTM, QLinear

    def factory(name: str, m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, nn.Linear):
            return QLinear.from_module(m, weights="qint8", activations="qint8", act_dynamic=True)
        if isinstance(m, nn.LSTM):
            return DynamicQuantLSTM.from_module(m)
        if isinstance(m, nn.GRU):
            return DynamicQuantGRU.from_module(m)
        return None

    model = replace_modules(model, factory, config.include, config.exclude)
    freeze(model)
    return model


def _iterate_batches(model: nn.Module, loader) -> None:
    with torch.no_grad():
        for batch in loader:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)


@register_method("int8-static", config=Int8StaticConfig, cost=_CHANNEL8_COST)
def int8_static(model: nn.Module, config: Int8StaticConfig) -> nn.Module:
    """int8 weights and int8 activations with static scales calibrated on ``calib_loader``; frozen."""
    from lowbit.model.api import freeze, replace_modules
    from lowbit.model.calibration import Calibration
    from lowbit.nn import QConv2d, QLinear

    if config.calib_loader is None:
        raise ValueError("method 'int8-static' needs calib_loader= (an iterable of input batches) to record "
                         "activation ranges")
    opts = {"weights": "qint8", "activations": "qint8", "per_channel": config.per_channel}

    def factory(name: str, m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, nn.Linear):
            return QLinear.from_module(m, **opts)
        if isinstance(m, nn.Conv2d):
            return QConv2d.from_module(m, **opts)
        return None

    model = replace_modules(model, factory, config.include, config.exclude)
    was_training = model.training
    model.eval()
    with Calibration(observer=config.observer, momentum=config.momentum, percentile=config.percentile):
        _iterate_batches(model, config.calib_loader)
    model.train(was_training)
    freeze(model)
    return model


@register_method("bnb-int8", config=BnbInt8Config, aliases=("llm.int8", "llm-int8"), cost=_CHANNEL8_COST)
def bnb_int8(model: nn.Module, config: BnbInt8Config) -> nn.Module:
    """LLM.int8(): int8 row-wise weights, outlier input columns (|x| >= threshold) in float; frozen."""
    from lowbit.model.api import freeze, replace_modules
    from lowbit.nn import Linear8bitLt

    def factory(name: str, m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, nn.Linear):
            return Linear8bitLt.from_module(m, threshold=config.threshold)
        return None

    model = replace_modules(model, factory, config.include, config.exclude)
    freeze(model)
    return model


def _bnb_4bit(model: nn.Module, config) -> nn.Module:
    from lowbit.model.api import freeze, replace_modules
    from lowbit.nn import Linear4bit

    def factory(name: str, m: nn.Module) -> Optional[nn.Module]:
        if isinstance(m, nn.Linear):
            return Linear4bit.from_module(m, quant_type=config.quant_type, compute_dtype=config.compute_dtype,
                                          double_quant=config.double_quant, block_size=config.block_size)
        return None

    model = replace_modules(model, factory, config.include, config.exclude)
    freeze(model)
    return model


_BNB4_COST = _plan.Cost(storage=_plan.storage_bnb4)


@register_method("bnb-nf4", config=BnbNf4Config, aliases=("nf4",), cost=_BNB4_COST)
def bnb_nf4(model: nn.Module, config: BnbNf4Config) -> nn.Module:
    """bitsandbytes-style NF4 weights in blocks of 64 (QLoRA); ``double_quant=True`` for ~4.127 bits."""
    return _bnb_4bit(model, config)


@register_method("bnb-fp4", config=BnbFp4Config, aliases=("fp4",), cost=_BNB4_COST)
def bnb_fp4(model: nn.Module, config: BnbFp4Config) -> nn.Module:
    """bitsandbytes-style FP4 (e2m1) weights in blocks of 64."""
    return _bnb_4bit(model, config)
