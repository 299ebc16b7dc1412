"""``lowbit plan``: predict peak memory, disk, output size and time before quantizing.

The prediction is arithmetic on the model's shape (parameter counts per kind of tensor, hidden
size, number of decoder blocks) plus one short measurement of this machine's matmul throughput;
the real run reports its measured figures next to it (``lowbit quantize`` prints both).

Model of the costs (CPU, fp32 master weights):
* RAM: process baseline (torch + transformers) + the float model + calibration activations
  (inputs and outputs of one block for every sample, the pipeline keeps two such buffers)
  + per-layer statistics (GPTQ Hessians ``in²`` fp32 for the largest layer).
* output: quantized linear weights at ``bits`` plus one fp32 scale (and a uint8 zero point) per
  group, other tensors at their float size.
* time: calibrated methods run every block twice over the calibration tokens (collect, then
  feed forward quantized): ``2 · 2 · params · tokens`` flops at the measured GFLOP/s, plus the
  per-layer solve (GPTQ: ``in³/3`` + ``out·in²`` flops); data-free methods are memory bound.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import nn

PROCESS_BASELINE_MB = 450.0


def measure_peak_rss() -> int:
    """Process high-water RSS in bytes (``VmHWM``), 0 where /proc is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def matmul_gflops(n: int = 512, repeats: int = 3) -> float:
    """This machine's fp32 matmul throughput (GFLOP/s), measured in about 0.1 s."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _shape_counts(model: nn.Module, exclude=("lm_head",)) -> Dict[str, Any]:
    linear, other, largest_in, outs = 0, 0, 0, []
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not any(name.endswith(e) for e in exclude):
            linear += m.weight.numel()
            largest_in = max(largest_in, m.in_features)
            outs.append((m.in_features, m.out_features))
            seen.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in seen:
            other += p.numel()
    return {"linear": linear, "other": other, "largest_in": largest_in, "layers": outs}


@dataclass(frozen=True)
class Cost:
    """What a method costs, as the method table states it (``register_method(cost=...)``).

    ``calibrated``: runs the calibration pipeline (activations in memory, two passes per block);
    ``hessian``: a GPTQ-like per-layer solve (``in²`` statistics, ``in³/3`` flops);
    ``storage(bits, group_size, hidden) -> (bits per weight code, group, bytes per group)``;
    ``seconds(counts, tokens, seq_len, hidden, n_blocks, gflops, hessian) -> seconds`` (None: the
    calibrated formula for calibrated methods, else :func:`seconds_memory_bound`).
    """

    calibrated: bool = False
    hessian: bool = False
    storage: Optional[Callable[[int, int, int], Tuple[float, int, float]]] = None
    seconds: Optional[Callable[..., float]] = None

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Cost":
        """The older dict form: ``calibrated``, ``hessian``, ``weight_bits`` (None: float weights kept),
        ``scale_bytes`` per group, ``group`` (-1: per output channel)."""
        d = dict(d)
        wbits, g, per_group = d.get("weight_bits"), d.get("group", -1), d.get("scale_bytes", 0)

        def storage(bits, group_size, hidden):
            return (wbits or 32), (hidden if g in (-1, None) else g) or 1, per_group

        return cls(calibrated=bool(d.get("calibrated")), hessian=bool(d.get("hessian")), storage=storage)


# -- storage formulas (bits per code, group, bytes per group) ------------------------------------


def storage_affine(bits: int, group_size: int, hidden: int) -> Tuple[float, int, float]:
    """Integer codes plus one fp32 scale and a uint8 zero point per group (PTQ methods)."""
    return bits, (group_size if group_size and group_size > 0 else hidden), 5


def storage_qtype(bits: int, group_size: Optional[int], hidden: int) -> Tuple[float, int, float]:
    """int4/int2 (quanto qtypes): groups of ``group_size`` (None: the automatic rule, 128), -1 per channel."""
    return bits, (group_size if group_size and group_size > 0 else (128 if group_size is None else hidden)), 5


def storage_bnb4(bits: int, group_size: int, hidden: int) -> Tuple[float, int, float]:
    """nf4/fp4: 4-bit codes, one fp32 absmax per block of 64."""
    return 4, 64, 4


def storage_int8_channel(bits: int, group_size: int, hidden: int) -> Tuple[float, int, float]:
    """int8 / fp8 weights with one fp32 scale per output channel."""
    return 8, max(hidden, 1), 4


def storage_float(width: int) -> Callable[[int, int, int], Tuple[float, int, float]]:
    """Float weights of ``width`` bits, no scales."""

    def storage(bits: int, group_size: int, hidden: int) -> Tuple[float, int, float]:
        return width, 1, 0

    storage.__name__ = f"storage_float{width}"
    return storage


# -- time formulas -------------------------------------------------------------------------------


def seconds_calibrated(counts, tokens, seq_len, hidden, n_blocks, gflops, hessian) -> float:
    """Every block twice over the calibration tokens, plus the per-layer solve."""
    flops = 2 * 2 * (counts["linear"]) * tokens + 2 * tokens * seq_len * hidden * n_blocks * 2
    solve = sum(i ** 3 / 3 + o * i * i for i, o in counts["layers"]) if hessian else \
        sum(20 * 2 * o * i * min(tokens, 4096) for i, o in counts["layers"])
    return (flops + solve) / (gflops * 1e9) * 1.5


def seconds_hqq(counts, tokens, seq_len, hidden, n_blocks, gflops, hessian) -> float:
    """HQQ's iterations over every weight."""
    return counts["linear"] * 20 * 10 / (gflops * 1e9) + 2.0


def seconds_memory_bound(counts, tokens, seq_len, hidden, n_blocks, gflops, hessian) -> float:
    """Data-free methods: one pass over the weights."""
    return counts["linear"] * 60 / 1e9 + 1.0


def method_cost(method: str) -> Cost:
    """The cost model of ``method`` from the method table (an unknown name raises, listing the methods)."""
    from lowbit.model.methods import METHODS

    m = METHODS.get(method)
    if isinstance(m.cost, Cost):
        return m.cost
    if isinstance(m.cost, dict):
        return Cost.from_dict(m.cost)
    return Cost(calibrated=m.calibrated)


def _predict(counts: Dict[str, Any], hidden: int, n_blocks: int, method: str, bits: int, group_size: int,
             n_samples: int, seq_len: int, gflops: Optional[float]) -> Dict[str, Any]:
    method = method.lower()
    cost = method_cost(method)
    calibrated, hessian = cost.calibrated, cost.hessian
    total = counts["linear"] + counts["other"]
    float_mb = total * 4 / 2 ** 20
    tokens = n_samples * seq_len
    calib_mb = 2 * tokens * hidden * 4 / 2 ** 20 if calibrated else 0.0
    hess_mb = counts["largest_in"] ** 2 * 4 * 8 / 2 ** 20 if hessian else 0.0
    ram = PROCESS_BASELINE_MB + float_mb * 1.1 + calib_mb + hess_mb
    qbits, gs, per_group = (cost.storage or storage_affine)(bits, group_size, hidden)
    out_mb = (counts["linear"] * (qbits / 8 + per_group / gs) + counts["other"] * 4) / 2 ** 20
    gflops = gflops or matmul_gflops()
    seconds_fn = cost.seconds or (seconds_calibrated if calibrated else seconds_memory_bound)
    seconds = seconds_fn(counts, tokens, seq_len, hidden, n_blocks, gflops, hessian)
    return {"method": method, "params": total, "quantized_params": counts["linear"],
            "float_mb": float_mb, "peak_ram_mb": ram, "accelerator_mb": 0.0, "disk_mb": out_mb,
            "output_mb": out_mb, "seconds": seconds, "gflops": gflops}


def plan(model: nn.Module, method: str, bits: int = 4, group_size: int = 128, n_samples: int = 128,
         seq_len: int = 512, device: str = "cpu") -> Dict[str, Any]:
    """Predict the cost of quantizing an already loaded ``model`` with ``method``."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    n_blocks = getattr(cfg, "num_hidden_layers", 0) or 0
    p = _predict(_shape_counts(model), hidden, n_blocks, method, bits, group_size, n_samples, seq_len, None)
    if str(device).startswith("cuda"):
        p["accelerator_mb"] = p["float_mb"] / max(n_blocks, 1) * 2 + 2 * n_samples * seq_len * hidden * 4 / 2 ** 20
    return p


def _load_config(spec: str, transformers):
    from lowbit.model.loading import default_model_path

    path = Path(spec)
    if spec == "default":
        directory, fname = default_model_path()
        return transformers.AutoConfig.from_pretrained(str(directory), gguf_file=fname)
    if path.suffix == ".gguf" and path.is_file():
        return transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        return transformers.AutoConfig.from_pretrained(str(path))
    from lowbit.model.loading import hub_reachable

    if not hub_reachable():
        raise RuntimeError(f"model {spec!r} is not a local path and the model hub is unreachable (offline)")
    return transformers.AutoConfig.from_pretrained(spec)


def plan_from_config(spec: str, method: str, bits: int = 4, group_size: int = 128, n_samples: int = 128,
                     seq_len: int = 512) -> Dict[str, Any]:
    """Predict from a model's config alone (the weights are never loaded: built on the meta device)."""
    from lowbit._deps import require

    transformers = require("transformers", "lowbit plan")
    cfg = _load_config(spec, transformers)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return plan(model, method, bits=bits, group_size=group_size, n_samples=n_samples, seq_len=seq_len)
