"""Configurations of the weight-only PTQ methods (rtn, gptq, awq, hqq: the block-by-block pipeline of
:mod:`lowbit.model.sequential`) and of 2:4 sparsity (:mod:`lowbit.model.sparse_methods`); split from
:mod:`lowbit.config`, which re-exports every name here (``from lowbit.config import GPTQConfig`` keeps working).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional, Tuple, Union

from lowbit.config import _Filtered, _set, check_bits, check_group_size


# ---------------------------------------------------------------------------------------------
# weight-only PTQ on the block-by-block pipeline (lowbit.model.sequential)

def _runtime(default: Any = None) -> Any:
    return field(default=default, metadata={"runtime": True})


@dataclass(frozen=True)
class WeightOnlyConfig(_Filtered):
    """Common options of the weight-only PTQ methods (rtn, gptq, awq, hqq and registered ones).

    ``bits``/``group_size``/``sym``: the integer grid (validated here, once); ``include``/``exclude``:
    module-name patterns (a bare name also matches as a suffix). Calibrated methods read
    ``calib_dataset`` (token ids ``[n, seq_len]``, a text file, ``"default"``...; with ``tokenizer``),
    ``n_samples``, ``seq_len``, ``seed`` and the pipeline's memory options (``batch_size``,
    ``micro_batch``, ``max_memory``, ``offload_dir``, ``checkpoint_dir``, ``resume``, ``pipeline``);
    data-free ones ignore them. A subclass adds its algorithm's own options as fields; their defaults
    are the algorithm's, and :meth:`options` hands the algorithm those that differ from them.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    calib_dataset: Any = _runtime()
    tokenizer: Any = _runtime()
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: Any = _runtime()
    progress: bool = _runtime(True)
    batch_size: int = 8
    micro_batch: Optional[int] = None
    max_memory: Any = _runtime()
    offload_dir: Optional[str] = _runtime()
    checkpoint_dir: Optional[str] = _runtime()
    resume: bool = _runtime(False)
    pipeline: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bits(self.bits)
        check_group_size(self.group_size)
        if not isinstance(self.sym, bool):
            raise TypeError(f"sym must be a bool, got {self.sym!r}")
        for key in ("n_samples", "seq_len", "batch_size"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{key}={v!r}: must be a positive integer")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch <= 0):
            raise ValueError(f"micro_batch={self.micro_batch!r}: must be a positive integer")
        if self.pipeline not in ("auto", "staged", "threads"):
            raise ValueError(f"pipeline={self.pipeline!r}: expected 'auto', 'staged' or 'threads'")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume=True needs checkpoint_dir= (where the per-block checkpoints are)")

    @classmethod
    def option_fields(cls) -> Tuple[dataclasses.Field, ...]:
        """The algorithm's own options: the fields a subclass adds to :class:`WeightOnlyConfig`."""
        common = {f.name for f in dataclasses.fields(WeightOnlyConfig)}
        return tuple(f for f in dataclasses.fields(cls) if f.name not in common)

    @classmethod
    def option_names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in cls.option_fields())

    def options(self) -> Dict[str, Any]:
        """The algorithm options that differ from their defaults (the keyword arguments of its function)."""
        return {f.name: getattr(self, f.name) for f in self.option_fields() if getattr(self, f.name) != f.default}

    def for_layer(self, name: str) -> "WeightOnlyConfig":
        """The config of one linear: an option given as a ``{linear name: value}`` mapping (a per-linear
        ``gguf_type``) is replaced by that linear's value."""
        per_layer = {f.name: getattr(self, f.name) for f in self.option_fields() if isinstance(getattr(self, f.name), dict)}
        if not per_layer:
            return self
        missing = [k for k, m in per_layer.items() if name not in m]
        if missing:
            raise ValueError(f"{missing[0]} mapping has no value for the linear {name!r} "
                             f"({len(per_layer[missing[0]])} linears mapped)")
        return dataclasses.replace(self, **{k: m[name] for k, m in per_layer.items()})


def _check_gguf_type(cfg) -> None:
    """``gguf_type``: one GGUF block type ("Q4_0" ...) or a ``{linear name: type}`` mapping (per-linear types)."""
    g = getattr(cfg, "gguf_type", None)
    if g is None:
        return
    if isinstance(g, str):
        _set(cfg, "gguf_type", g.upper())
    elif isinstance(g, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in g.items()):
        _set(cfg, "gguf_type", {k: v.upper() for k, v in g.items()})
    else:
        raise TypeError(f"gguf_type must be a GGUF type such as 'Q4_0' or a {{linear name: type}} mapping, got {g!r}")


@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """``rtn``: round-to-nearest (no data). ``search``: ``"minmax"`` or ``"mse"`` (shrink search over
    ``n_grid`` candidates down to ``1 - max_shrink``, ``refine`` least-squares scale passes);
    ``gguf_type``: llama.cpp's reference rounding into that block type instead."""

    method: ClassVar[str] = "rtn"
    search: str = "minmax"
    n_grid: int = 20
    max_shrink: float = 0.5
    refine: int = 1
    gguf_type: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.search not in ("minmax", "mse"):
            raise ValueError(f"search={self.search!r}: expected 'minmax' or 'mse'")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink={self.max_shrink!r}: expected a value in [0, 1)")
        _check_gguf_type(self)


#: GPTQ's group-grid objectives (lowbit.algorithms.gptq.GROUP_OBJECTIVES; a test keeps them equal)
GPTQ_GROUP_OBJECTIVES = ("minmax", "mse", "hessian", "sweep")


@dataclass(frozen=True)
class GPTQConfig(WeightOnlyConfig):
    """``gptq`` (calibrated): ``percdamp`` Hessian damping, ``blocksize`` columns per lazy update,
    ``act_order``, ``static_groups``, ``group_objective`` (how group scales are fitted), ``refit``,
    ``n_grid``/``max_shrink``/``two_sided`` (grid search), ``gguf_type`` (llama.cpp block grid)."""

    method: ClassVar[str] = "gptq"
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = True
    static_groups: bool = True
    group_objective: str = "hessian"
    refit: bool = False
    n_grid: Optional[int] = None
    max_shrink: Optional[float] = None
    gguf_type: Optional[str] = None
    two_sided: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.percdamp, (int, float)) or not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp={self.percdamp!r}: expected a value in [0, 1)")
        if not isinstance(self.blocksize, int) or self.blocksize <= 0:
            raise ValueError(f"blocksize={self.blocksize!r}: must be a positive integer")
        if self.group_objective not in GPTQ_GROUP_OBJECTIVES:
            raise ValueError(f"group_objective={self.group_objective!r}: expected one of {GPTQ_GROUP_OBJECTIVES}")
        _check_gguf_type(self)


@dataclass(frozen=True)
class AWQConfig(WeightOnlyConfig):
    """``awq`` (calibrated): ``n_grid`` scale candidates, ``duo_scaling``, ``clip`` (clipping search over
    ``clip_grid`` shrinks down to ``1 - max_shrink``), ``gqa_tie`` (scale o_proj under GQA too),
    ``two_sided``, ``joint``, ``refine``, ``gguf_type`` (llama.cpp block grid)."""

    method: ClassVar[str] = "awq"
    n_grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    max_shrink: float = 0.5
    clip_grid: int = 20
    gqa_tie: bool = False
    two_sided: int = 1
    joint: bool = False
    refine: int = 0
    gguf_type: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink={self.max_shrink!r}: expected a value in [0, 1)")
        _check_gguf_type(self)


@dataclass(frozen=True)
class HQQConfig(WeightOnlyConfig):
    """``hqq`` (no data): half-quadratic solver with ``lp_norm``, ``beta``, ``kappa``, ``iters``,
    ``optimize_scale``, ``init`` (``"minmax"`` or ``"mse"``), ``early_stop`` (True: the hqq package's rule;
    a relative-improvement threshold; False/0: always ``iters``), ``zero_rounding`` (asymmetric grids: what is
    stored of the solver's float zero: ``"float"``, the default since issue 18 (scale3), keeps it as the hqq
    package does, as float32 zero points, the hqq package's quality; ``"round"``, ``"cover"``, ``"refit"``, ``"best"``
    store an integer zero, the form GPTQ / AWQ / compressed-tensors exports and the fused integer kernels need;
    see :func:`lowbit.algorithms.hqq.hqq_quantize`)."""

    method: ClassVar[str] = "hqq"
    lp_norm: float = 0.7
    beta: float = 10.0
    kappa: float = 1.0
    iters: int = 20
    optimize_scale: bool = False
    init: str = "minmax"
    early_stop: Union[bool, float] = True
    zero_rounding: str = "float"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init not in ("minmax", "mse"):
            raise ValueError(f"init={self.init!r}: expected 'minmax' or 'mse'")
        if self.zero_rounding not in ("round", "cover", "refit", "best", "float"):
            raise ValueError(f"zero_rounding={self.zero_rounding!r}: expected 'round', 'cover', 'refit', 'best' "
                             f"or 'float'")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters={self.iters!r}: must be a non-negative integer")


# ---------------------------------------------------------------------------------------------
# 2:4 semi-structured sparsity (lowbit.model.sparse_methods)

SPARSE_ALGORITHMS = ("sparsegpt", "magnitude")


@dataclass(frozen=True)
class _Sparse24Base(_Filtered):
    """Options of the 2:4 methods: ``algorithm`` (``"sparsegpt"``: Hessian-aware, calibrated on
    ``calib_dataset``; ``"magnitude"``: no data), calibration (``n_samples``, ``seq_len``, ``seed``,
    ``batch_size``) and SparseGPT's ``percdamp``/``blocksize``."""

    algorithm: str = "sparsegpt"
    calib_dataset: Any = _runtime()
    tokenizer: Any = _runtime()
    n_samples: int = 128
    seq_len: int = 512
    seed: int = 0
    device: Any = _runtime()
    progress: bool = _runtime(True)
    batch_size: int = 8
    percdamp: float = 0.01
    blocksize: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        if str(self.algorithm).lower() not in SPARSE_ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r}: expected one of {SPARSE_ALGORITHMS}")
        _set(self, "algorithm", str(self.algorithm).lower())

    def prune_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments of :func:`lowbit.model.sparse_methods.prune_model_24`."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class Sparse24Config(_Sparse24Base):
    """``sparse-2:4``: float weights pruned to 2:4 (``bits=8``/``4``: jointly quantized)."""

    method: ClassVar[str] = "sparse-2:4"
    bits: Optional[int] = None
    group_size: int = -1
    sym: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bits is not None:
            check_bits(self.bits, (2, 3, 4, 8))
        check_group_size(self.group_size, allow_none=True)


@dataclass(frozen=True)
class Sparse24Int8Config(_Sparse24Base):
    """``sparse-2:4-int8``: 2:4 with symmetric int8 per-channel weights (W8A8)."""

    method: ClassVar[str] = "sparse-2:4-int8"

    def prune_kwargs(self) -> Dict[str, Any]:
        return {**super().prune_kwargs(), "bits": 8, "group_size": -1, "sym": True}


@dataclass(frozen=True)
class Sparse24Int4Config(_Sparse24Base):
    """``sparse-2:4-int4``: 2:4 with int4 group-wise weights (weight-only, dense 4-bit execution)."""

    method: ClassVar[str] = "sparse-2:4-int4"
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_group_size(self.group_size)

    def prune_kwargs(self) -> Dict[str, Any]:
        return {**super().prune_kwargs(), "bits": 4}
