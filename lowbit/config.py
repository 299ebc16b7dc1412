"""Quantization types and validated method configurations.

Two things live here because both the modules (:mod:`lowbit.nn`) and the model API
(:mod:`lowbit.model`) need them, and neither may import the other:

* ``QType`` constants ``qint2, qint4, qint8, qfloat8`` (optimum-quanto's names, see
  ``optimum/quanto/tensor/qtype.py``): what a weight or an activation is quantized to.
* ``MethodConfig``: one frozen dataclass per quantization method (torchao ``AOBaseConfig`` style),
  validated on construction, with ``to_dict`` / ``from_dict`` carrying a version. A key a method
  does not accept raises an error naming the accepted keys, never silence.

Example::

    >>> from lowbit.config import Bnb4bitConfig, get_qtype
    >>> get_qtype("qint4").bits
    4
    >>> Bnb4bitConfig(quant_type="nf4", double_quant=True).to_dict()["double_quant"]
    True
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Union

import torch

CONFIG_VERSION = 1

# ---------------------------------------------------------------------------------------------
# quantization types


@dataclass(frozen=True)
class QType:
    """A quantized data type for weights or activations.

    ``bits`` is the code width; ``fp8_dtype`` is set for the float8 types. Compare by name:
    ``get_qtype("qfloat8") == qfloat8_e4m3fn``.
    """

    name: str
    bits: int
    is_floating: bool = False
    fp8_dtype: Optional[torch.dtype] = None

    def __str__(self) -> str:
        return self.name

    @property
    def qmax(self) -> float:
        """Largest representable magnitude of the codes (127 for qint8, 448 for qfloat8 e4m3)."""
        if self.fp8_dtype is not None:
            return float(torch.finfo(self.fp8_dtype).max)
        return float((1 << (self.bits - 1)) - 1)

    @property
    def scheme(self) -> str:
        """The lowbit tensor scheme of a symmetric quantization with this type (activations)."""
        if self.fp8_dtype is not None:
            return "fp8_e4m3" if self.fp8_dtype == torch.float8_e4m3fn else "fp8_e5m2"
        return f"int{self.bits}"


qint2 = QType("qint2", 2)
qint4 = QType("qint4", 4)
qint8 = QType("qint8", 8)
qfloat8_e4m3fn = QType("qfloat8_e4m3fn", 8, True, torch.float8_e4m3fn)
qfloat8_e5m2 = QType("qfloat8_e5m2", 8, True, torch.float8_e5m2)
qfloat8 = qfloat8_e4m3fn

QTYPES: Dict[str, QType] = {
    "qint2": qint2,
    "qint4": qint4,
    "qint8": qint8,
    "qfloat8": qfloat8,
    "qfloat8_e4m3fn": qfloat8_e4m3fn,
    "qfloat8_e5m2": qfloat8_e5m2,
}
ACTIVATION_QTYPES = ("qint8", "qfloat8", "qfloat8_e4m3fn", "qfloat8_e5m2")


def get_qtype(value: Union[str, QType, None]) -> Optional[QType]:
    """Resolve a qtype given as a constant, a name (``"qint4"``) or None."""
    if value is None or isinstance(value, QType):
        return value
    if isinstance(value, str):
        key = value.lower()
        if key in ("none", ""):
            return None
        if key in QTYPES:
            return QTYPES[key]
        raise ValueError(f"unknown qtype {value!r}; expected one of {', '.join(QTYPES)}")
    raise TypeError(f"qtype must be a QType, a string or None, got {type(value).__name__}")


def _weights_type(value: Union[str, QType, None]) -> Union[QType, str, None]:
    """Weights may be a qtype or, for weight-only use, any lowbit tensor scheme name (``"nf4"``, ``"int3_asym"``)."""
    if isinstance(value, str) and value.lower() not in QTYPES and value.lower() not in ("none", ""):
        from lowbit.tensor.functional import SCHEMES

        if value in SCHEMES:
            return SCHEMES.get(value).name
        raise ValueError(f"unknown weights type {value!r}; expected one of {', '.join(QTYPES)} or a lowbit scheme "
                         f"({', '.join(SCHEMES.names())})")
    return get_qtype(value)


# ---------------------------------------------------------------------------------------------
# method configurations

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_to_str(d: Optional[torch.dtype]) -> Optional[str]:
    return None if d is None else str(d).replace("torch.", "")


def parse_dtype(value: Union[str, torch.dtype, None], what: str = "dtype") -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``torch.bfloat16`` / None -> torch dtype (float16, bfloat16 or float32)."""
    if value is None or isinstance(value, torch.dtype):
        if value is not None and value not in _DTYPE_NAMES.values():
            raise ValueError(f"{what}={value}: expected one of torch.float32, torch.float16, torch.bfloat16")
        return value
    if isinstance(value, str):
        key = value.replace("torch.", "").lower()
        if key in _DTYPE_NAMES:
            return _DTYPE_NAMES[key]
    raise ValueError(f"{what}={value!r}: expected one of {', '.join(_DTYPE_NAMES)} (or a torch dtype)")


def _patterns(value: Union[str, Sequence[str], None], what: str) -> Optional[Tuple[str, ...]]:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"{what} must be a string or a sequence of strings, got {type(value).__name__}") from None
    for p in out:
        if not isinstance(p, str):
            raise TypeError(f"{what} entries must be strings (fnmatch patterns), got {p!r}")
    return out


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method configuration.

    Subclasses are frozen dataclasses; ``__post_init__`` validates and normalises the fields.
    Fields marked ``metadata={"runtime": True}`` (a calibration data loader, for instance) are
    inputs of one call and are left out of ``to_dict``.
    """

    method: ClassVar[str] = ""

    @classmethod
    def accepted_keys(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def create(cls, **kwargs: Any) -> "MethodConfig":
        """Construct from keyword arguments, rejecting keys this method does not accept."""
        bad = sorted(set(kwargs) - set(cls.accepted_keys()))
        if bad:
            accepted = ", ".join(cls.accepted_keys()) or "(none)"
            raise ValueError(
                f"method {cls.method!r} does not accept {', '.join(map(repr, bad))}; accepted keys: {accepted}"
            )
        return cls(**kwargs)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able dict with ``method`` and ``version`` (runtime-only fields are omitted)."""
        out: Dict[str, Any] = {"method": self.method, "version": CONFIG_VERSION}
        for f in dataclasses.fields(self):
            if f.metadata.get("runtime"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, torch.dtype):
                v = _dtype_to_str(v)
            elif isinstance(v, QType):
                v = v.name
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "MethodConfig":
        d = dict(d)
        method = d.pop("method", cls.method)
        version = d.pop("version", CONFIG_VERSION)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        if version > CONFIG_VERSION:
            raise ValueError(f"config version {version} is newer than this lowbit ({CONFIG_VERSION})")
        return cls.create(**d)


def _set(obj, name, value):
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class _Filtered(MethodConfig):
    """Common ``include`` / ``exclude`` module-name filters (fnmatch patterns)."""

    include: Optional[Tuple[str, ...]] = None
    exclude: Optional[Tuple[str, ...]] = ("lm_head",)

    def __post_init__(self) -> None:
        _set(self, "include", _patterns(self.include, "include"))
        _set(self, "exclude", _patterns(self.exclude, "exclude"))


@dataclass(frozen=True)
class QuantoConfig(_Filtered):
    """optimum-quanto workflow: swap Linear/Conv2d for QLinear/QConv2d (fake-quantized until freeze).

    ``weights``: qint2 | qint4 | qint8 | qfloat8, a lowbit scheme name for weight-only use
    (``"nf4"``, ``"int3_asym"`` ...) or None; ``activations``: qint8 | qfloat8 | None
    (static scales recorded by ``Calibration``, or ``act_dynamic=True`` for per-token dynamic
    scales); ``group_size``: for qint2/qint4 weights (default: 128, reduced by 32 until it divides
    the input features, else per output channel).
    """

    method: ClassVar[str] = "quanto"
    weights: Optional[Union[str, QType]] = "qint8"
    activations: Optional[Union[str, QType]] = None
    group_size: Optional[int] = None
    act_dynamic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        w = _weights_type(self.weights)
        a = get_qtype(self.activations)
        if a is not None and a.name not in ACTIVATION_QTYPES:
            raise ValueError(f"activations={a.name!r}: expected one of {', '.join(ACTIVATION_QTYPES)} or None")
        if w is None and a is None:
            raise ValueError("weights=None and activations=None: nothing to quantize")
        if self.group_size is not None and (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                                            or (self.group_size <= 0 and self.group_size != -1)):
            raise ValueError(f"group_size={self.group_size!r}: must be a positive integer, -1 (one group per "
                             f"output channel) or None (automatic)")
        _set(self, "weights", w)
        _set(self, "activations", a)


@dataclass(frozen=True)
class CastConfig(MethodConfig):
    """fp16 / bf16: cast floating parameters and buffers (no options)."""

    method: ClassVar[str] = "cast"


@dataclass(frozen=True)
class Fp16Config(CastConfig):
    method: ClassVar[str] = "fp16"


@dataclass(frozen=True)
class Bf16Config(CastConfig):
    method: ClassVar[str] = "bf16"


@dataclass(frozen=True)
class Int8DynamicConfig(_Filtered):
    """int8 weights (per output channel) and int8 activations quantized per token at run time,
    for Linear, LSTM and GRU (torch.ao ``quantize_dynamic`` semantics)."""

    method: ClassVar[str] = "int8-dynamic"


OBSERVER_NAMES = ("minmax", "moving_average", "percentile", "histogram")


@dataclass(frozen=True)
class Int8StaticConfig(_Filtered):
    """int8 weights and int8 activations with static per-tensor scales from calibration.

    ``calib_loader``: an iterable of batches (tensor, tuple of positional inputs, or dict of
    keyword inputs); ``observer``: minmax | moving_average | percentile | histogram;
    ``per_channel``: per-output-channel weight scales (else one per tensor).
    """

    method: ClassVar[str] = "int8-static"
    calib_loader: Any = field(default=None, metadata={"runtime": True})
    observer: str = "minmax"
    per_channel: bool = True
    momentum: float = 0.9
    percentile: float = 99.99

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.observer not in OBSERVER_NAMES:
            raise ValueError(f"observer={self.observer!r}: expected one of {', '.join(OBSERVER_NAMES)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum={self.momentum!r}: must be in [0, 1)")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile!r}: must be in (50, 100]")


@dataclass(frozen=True)
class BnbInt8Config(_Filtered):
    """LLM.int8(): int8 row-wise weights, outlier activation columns (|x| >= threshold) in float."""

    method: ClassVar[str] = "bnb-int8"
    threshold: float = 6.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.threshold, (int, float)) or self.threshold < 0:
            raise ValueError(f"threshold={self.threshold!r}: must be a non-negative number")


@dataclass(frozen=True)
class Bnb4bitConfig(_Filtered):
    """bitsandbytes-style 4-bit weights (QLoRA): nf4 / fp4 codebooks over flat blocks.

    Effective bits per weight: ``4 + 32/block_size`` (4.5 for 64), and with ``double_quant=True``
    ``4 + 8/block_size + 32/(block_size*256)`` (4.127 for 64), as in the QLoRA paper.
    """

    method: ClassVar[str] = "bnb-4bit"
    quant_type: str = "nf4"
    block_size: int = 64
    double_quant: bool = False
    compute_dtype: Optional[Union[str, torch.dtype]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type not in ("nf4", "fp4", "int4"):
            raise ValueError(f"quant_type={self.quant_type!r}: expected 'nf4', 'fp4' or 'int4'")
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size!r}: must be a positive integer")
        _set(self, "compute_dtype", parse_dtype(self.compute_dtype, "compute_dtype"))


@dataclass(frozen=True)
class BnbNf4Config(Bnb4bitConfig):
    method: ClassVar[str] = "bnb-nf4"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type != "nf4":
            raise ValueError(f"method 'bnb-nf4' fixes quant_type='nf4', got {self.quant_type!r}")


@dataclass(frozen=True)
class BnbFp4Config(Bnb4bitConfig):
    method: ClassVar[str] = "bnb-fp4"
    quant_type: str = "fp4"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quant_type != "fp4":
            raise ValueError(f"method 'bnb-fp4' fixes quant_type='fp4', got {self.quant_type!r}")


# ---------------------------------------------------------------------------------------------
# the CLI's data-free integer / float8 methods: optimum-quanto qtypes, weights only


@dataclass(frozen=True)
class _QTypeConfig(_Filtered):
    """Weight-only ``QLinear``/``QConv2d`` with a fixed quanto qtype (the quanto workflow, frozen after).

    ``group_size``: None (the qtype's rule: int4/int2 groups of 128 reduced by 32 until they divide
    the input features, else one per output channel; int8/fp8 one scale per output channel), -1 (one
    group per output channel) or a positive group size along the input features.
    """

    weights: ClassVar[str] = ""
    group_size: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size(self.group_size, allow_none=True)

    @property
    def bits(self) -> int:
        return QTYPES[self.weights].bits

    def quanto(self) -> "QuantoConfig":
        """The equivalent ``method="quanto"`` configuration (what this method runs)."""
        return QuantoConfig(weights=self.weights, group_size=self.group_size, include=self.include,
                            exclude=self.exclude)


@dataclass(frozen=True)
class Int8Config(_QTypeConfig):
    """``int8``: symmetric int8 weights (quanto qint8), one scale per output channel by default."""

    method: ClassVar[str] = "int8"
    weights: ClassVar[str] = "qint8"


@dataclass(frozen=True)
class Int4Config(_QTypeConfig):
    """``int4``: asymmetric int4 weights (quanto qint4: a zero point per group), groups of 128
    (``group_size=None``: 128 reduced by 32 until it divides the input features)."""

    method: ClassVar[str] = "int4"
    weights: ClassVar[str] = "qint4"
    group_size: Optional[int] = 128


@dataclass(frozen=True)
class Int2Config(_QTypeConfig):
    """``int2``: asymmetric int2 weights (quanto qint2), groups of 128 (None: the automatic rule)."""

    method: ClassVar[str] = "int2"
    weights: ClassVar[str] = "qint2"
    group_size: Optional[int] = 128


@dataclass(frozen=True)
class Fp8Config(_QTypeConfig):
    """``fp8``: float8 e4m3 weights (quanto qfloat8), one scale per output channel by default."""

    method: ClassVar[str] = "fp8"
    weights: ClassVar[str] = "qfloat8"


@dataclass(frozen=True)
class Fp32Config(MethodConfig):
    """``fp32`` (aliases ``float``, ``none``): the model as it is (the float baseline of compare)."""

    method: ClassVar[str] = "fp32"


# ---------------------------------------------------------------------------------------------
# code widths and group sizes (one validation each)

PTQ_BITS = (2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: Any, allowed: Sequence[int] = PTQ_BITS) -> None:
    """The one validation of a code width."""
    if isinstance(bits, bool) or bits not in allowed:
        raise ValueError(f"bits={bits!r}: expected 2, 3, 4 or 8 (any integer {min(allowed)}..{max(allowed)} works)"
                         if tuple(allowed) == PTQ_BITS else f"bits={bits!r}: expected one of {tuple(allowed)}")


def check_group_size(group_size: Any, allow_none: bool = False) -> None:
    """The one validation of a group size: -1 (one group per output channel) or a positive integer."""
    if group_size is None and allow_none:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or -1 (one group per output "
                         f"channel){' or None (automatic)' if allow_none else ''}")


# The PTQ and 2:4 configurations live in lowbit.config_ptq (this file's size); their names stay importable from
# here, resolved on first use (a module-level __getattr__: lowbit.config_ptq imports this module).
_PTQ_NAMES = frozenset((
    "_runtime",
    "WeightOnlyConfig",
    "_check_gguf_type",
    "RTNConfig",
    "GPTQ_GROUP_OBJECTIVES",
    "GPTQConfig",
    "AWQConfig",
    "HQQConfig",
    "SPARSE_ALGORITHMS",
    "_Sparse24Base",
    "Sparse24Config",
    "Sparse24Int8Config",
    "Sparse24Int4Config",
))


def __getattr__(name: str):
    if name in _PTQ_NAMES:
        from lowbit import config_ptq

        return getattr(config_ptq, name)
    raise AttributeError(f"module 'lowbit.config' has no attribute {name!r}")


def effective_bits_4bit(block_size: int = 64, double_quant: bool = False, nested_block: int = 256) -> float:
    """Documented bits per weight of bitsandbytes 4-bit storage (codebook tables not counted)."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * nested_block)
    return 4 + 32 / block_size
