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
    ``seconds(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline=...) -> CPU seconds``
    (None: :func:`seconds_calibrated` for calibrated methods, else :func:`seconds_memory_bound`); ``gflops_cpu``
    is this machine's matmul rate per CPU second (:func:`matmul_gflops_cpu`).
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


def method_cost(method: str) -> Cost:
    """The cost model of ``method`` from the method table (an unknown name raises, listing the methods)."""
    from lowbit.model.methods import METHODS

    m = METHODS.get(method)
    if isinstance(m.cost, Cost):
        return m.cost
    if isinstance(m.cost, dict):
        return Cost.from_dict(m.cost)
    return Cost(calibrated=m.calibrated)


# Costs fitted on the 2-core AVX-512 CPU (bench/results/scale_plan.jsonl, bench/scale.md "plan against measured
# runs"): CPU seconds = work / (this machine's GFLOP per CPU second) x the method's factor; memory in bytes.
LOAD_FACTOR = {"gguf": 2.0, "safetensors": 1.0, None: 1.0}  # loader peak: float model copies while loading
# RTN / HQQ re-fitted in scale3 (bench/results/scale_plan_scale3.jsonl): the data-free layer loop runs in a worker
# thread since then (no OpenMP spin-waiting from the main thread), 0.8 CPU s for RTN and 5.7 for HQQ g64 on SmolLM2
RTN_FLOP_PER_WEIGHT = 310.0        # RTN's scale search per weight, in matmul-flop equivalents
NF4_FLOP_PER_WEIGHT = 7500.0       # bitsandbytes' blockwise nf4 quantization per weight
HQQ_FLOP_PER_WEIGHT_ITER = 110.0   # one HQQ iteration per weight
# calibration forward + Hessian flops -> CPU time (staged = threads since its triangular per-sample Hessians and
# tail replay: 1.006x the previous pipeline's CPU seconds, bench/scale.md "scale2")
FORWARD_EFFICIENCY = {"threads": 0.58, "staged": 0.58}
SOLVE_EFFICIENCY = {"gptq": 13.0, "awq": 0.31}      # the per-layer solves (GPTQ's column loop is latency bound)
THREADS_TOKEN_WIDTHS = 2.5         # previous pipeline: live floats per token, in units of one block's linear outputs


def _block_widths(counts: Dict[str, Any], n_blocks: int) -> Tuple[int, int]:
    """(sum of one block's linear output widths, largest input width)."""
    outs = sum(o for _, o in counts["layers"])
    return (outs // max(n_blocks, 1)), counts["largest_in"]


def calibration_ram_bytes(counts: Dict[str, Any], hidden: int, n_blocks: int, tokens: int, seq_len: int,
                          pipeline: str, micro_batch: int, budget: Optional[int], rest_bytes: float) -> float:
    """Calibration activations held at the peak. Previous pipeline ("threads"): every chunk alive at once through
    the block (the block inputs and outputs plus each chunk's intermediate tensors at the stage it waits on).
    Staged: block inputs + outputs + the replay records of every micro-batch, capped by ``max_memory``
    (the rest goes to files), plus one micro-batch's working tensors."""
    widths, k_max = _block_widths(counts, n_blocks)
    if pipeline == "threads":
        return tokens * 4 * (2 * hidden + THREADS_TOKEN_WIDTHS * widths)
    work = micro_batch * seq_len * 4 * (widths + 4 * k_max)
    store = staged_store_bytes(tokens, hidden, k_max)
    if budget is not None:
        store = min(store, max(budget - rest_bytes - work, 0))
    return store + work


def staged_store_bytes(tokens: int, hidden: int, k_max: int, act_bytes: int = 4) -> int:
    """Peak of the staged pipeline's activation store on the CPU: with tail replay it holds, at the pass that stops
    at a block's last linear, the block inputs, the record of the attention's output and that last linear's saved
    inputs (the MLP's ``k_max``-wide activations); SmolLM2 128 x 512: 700 MiB measured (``offload_peak_bytes``,
    bench/results/scale_rss.jsonl), 672 MiB by this formula. The outputs replace the inputs micro-batch by
    micro-batch in the last pass."""
    return tokens * act_bytes * (2 * hidden + k_max)


def statistics_ram_bytes(counts: Dict[str, Any], pipeline: str, n_chunks: int, hessian: bool) -> float:
    """Hessian sums and the solver's work matrices for the widest linear (the threads pipeline also holds one
    fp32 partial sum per chunk)."""
    k = counts["largest_in"]
    per = k * k * 4
    sums = per * (n_chunks if pipeline == "threads" else 2)  # float64 sums = 2 fp32 matrices
    return sums + (per * 4 if hessian else per)


def calibrated_cpu_seconds(counts: Dict[str, Any], hidden: int, n_blocks: int, tokens: int, seq_len: int,
                           method: str, pipeline: str, gflops_cpu: float) -> float:
    """Forward passes + Hessian products over the calibration tokens, plus the per-layer solves."""
    widths, _ = _block_widths(counts, n_blocks)
    fwd = 2 * counts["linear"] * tokens + 4 * tokens * seq_len * hidden * n_blocks
    hess = 2 * tokens * sum(i * i for i, _ in counts["layers"]) / 2  # layers sharing an input share one Hessian
    if method == "gptq":
        solve = sum(i ** 3 / 3 + o * i * i for i, o in counts["layers"])
    else:  # AWQ: the scale grid (20 points) and the clipping search over the group's outputs
        solve = sum(20 * 2 * o * i * min(tokens, 4096) for i, o in counts["layers"])
    eff = FORWARD_EFFICIENCY.get(pipeline, FORWARD_EFFICIENCY["threads"])
    return ((fwd + hess) * eff + solve * SOLVE_EFFICIENCY.get(method, 1.0)) / (gflops_cpu * 1e9)


def data_free_cpu_seconds(counts: Dict[str, Any], method: str, gflops_cpu: float, iters: int = 20) -> float:
    per = {"rtn": RTN_FLOP_PER_WEIGHT, "hqq": HQQ_FLOP_PER_WEIGHT_ITER * iters}.get(method, NF4_FLOP_PER_WEIGHT)
    return counts["linear"] * per / (gflops_cpu * 1e9)


# -- time formulas the method table points at (CPU seconds; lowbit.model.methods / ptq_methods) -------------


def seconds_calibrated(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline="threads") -> float:
    """Every block twice over the calibration tokens, the Hessian products, plus the per-layer solve."""
    return calibrated_cpu_seconds(counts, hidden, n_blocks, tokens, seq_len, "gptq" if hessian else "awq", pipeline,
                                  gflops_cpu)


def seconds_hqq(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline="threads") -> float:
    """HQQ's iterations over every weight."""
    return data_free_cpu_seconds(counts, "hqq", gflops_cpu)


def seconds_rtn(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline="threads") -> float:
    """RTN's scale search over every weight."""
    return data_free_cpu_seconds(counts, "rtn", gflops_cpu)


def seconds_memory_bound(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline="threads") -> float:
    """Other data-free methods (nf4, int8, ...): one blockwise pass over the weights."""
    return data_free_cpu_seconds(counts, "nf4", gflops_cpu)


def matmul_gflops_cpu(n: int = 768, repeats: int = 3) -> float:
    """This machine's fp32 matmul throughput per CPU second (GFLOP per process CPU second; load-independent)."""
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(4):
            a @ b
        best = min(best, (time.process_time() - t0) / 4)
    return 2 * n ** 3 / max(best, 1e-6) / 1e9


def _predict(counts: Dict[str, Any], hidden: int, n_blocks: int, method: str, bits: int, group_size: int,
             n_samples: int, seq_len: int, gflops: Optional[float], pipeline: str = "threads",
             micro_batch: int = 8, budget: Optional[int] = None, source: Optional[str] = None,
             gflops_cpu: Optional[float] = None, batch_size: int = 8) -> Dict[str, Any]:
    method = method.lower()
    cost = method_cost(method)
    calibrated, hessian = cost.calibrated, cost.hessian
    total = counts["linear"] + counts["other"]
    float_mb = total * 4 / 2 ** 20
    tokens = n_samples * seq_len
    mb = 2 ** 20
    base = PROCESS_BASELINE_MB * mb + total * 4
    load_ram = PROCESS_BASELINE_MB * mb + total * 4 * LOAD_FACTOR.get(source, 1.0)
    if calibrated:
        stats = statistics_ram_bytes(counts, pipeline, -(-n_samples // batch_size), hessian)
        calib = calibration_ram_bytes(counts, hidden, n_blocks, tokens, seq_len, pipeline, micro_batch, budget,
                                      base + stats)
    else:
        stats, calib = 0.0, 0.0
    qbits, gs, per_group = (cost.storage or storage_affine)(bits, group_size, hidden)
    out_mb = (counts["linear"] * (qbits / 8 + per_group / gs) + counts["other"] * 4) / 2 ** 20
    run_ram = base + out_mb * mb + calib + stats
    ram = max(load_ram, run_ram) / mb
    gflops = gflops or matmul_gflops()
    gflops_cpu = gflops_cpu or matmul_gflops_cpu()
    seconds_fn = cost.seconds or (seconds_calibrated if calibrated else seconds_memory_bound)
    cpu_s = seconds_fn(counts, tokens, seq_len, hidden, n_blocks, gflops_cpu, hessian, pipeline=pipeline)
    cores = max(1, min(torch.get_num_threads(), 2 if pipeline == "threads" else torch.get_num_threads()))
    seconds = cpu_s / cores + 1.0
    return {"method": method, "params": total, "quantized_params": counts["linear"],
            "float_mb": float_mb, "peak_ram_mb": ram, "load_ram_mb": load_ram / mb, "run_ram_mb": run_ram / mb,
            "calibration_mb": calib / mb, "statistics_mb": stats / mb, "accelerator_mb": 0.0, "disk_mb": out_mb,
            "output_mb": out_mb, "seconds": seconds, "cpu_seconds": cpu_s, "gflops": gflops,
            "gflops_cpu": gflops_cpu, "pipeline": pipeline if calibrated else None}


def plan(model: nn.Module, method: str, bits: int = 4, group_size: int = 128, n_samples: int = 128,
         seq_len: int = 512, device: str = "cpu", max_memory: Any = None, micro_batch: Optional[int] = None,
         pipeline: str = "auto", source: Optional[str] = None, n_gpus: int = 1) -> Dict[str, Any]:
    """Predict the cost of quantizing an already loaded ``model`` with ``method``. On ``device="cuda"`` the
    calibrated methods also get ``gpu_seconds`` (and its parts, ``gpu_time``) on ``n_gpus`` GPUs from
    :mod:`lowbit.model.plan_gpu` (rates measured when CUDA is present, else the H200's constants)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    n_blocks = getattr(cfg, "num_hidden_layers", 0) or 0
    from lowbit.model.offload import parse_bytes

    cuda = str(device).startswith("cuda")
    if pipeline == "auto":  # as quantize_model_ptq decides
        pipeline = "staged"
    p = _predict(_shape_counts(model), hidden, n_blocks, method, bits, group_size, n_samples, seq_len, None,
                 pipeline=pipeline, micro_batch=micro_batch or 8, budget=parse_bytes(max_memory), source=source)
    host_fraction = 0.0
    if cuda and pipeline == "staged" and method_cost(method.lower()).calibrated:
        dev = staged_device_bytes(model, n_samples, seq_len, micro_batch or 8, parse_bytes(max_memory), world=n_gpus,
                                  bits=bits, group_size=group_size, method=method)
        p["accelerator_mb"] = dev["total"] / 2 ** 20
        host_fraction = 1.0 - dev["store"] / max(dev["store_demand"], 1)
    elif cuda:
        p["accelerator_mb"] = p["float_mb"] / max(n_blocks, 1) * 2 + 2 * n_samples * seq_len * hidden * 4 / 2 ** 20
    if cuda and method.lower() in ("gptq", "awq"):  # the GPU time model (either pipeline)
        from lowbit.model import plan_gpu

        rates = plan_gpu.measure_rates(device) if torch.cuda.is_available() else None
        p["gpu_time"] = plan_gpu.gpu_seconds(model, method, n_samples, seq_len, world=n_gpus, rates=rates,
                                             host_fraction=host_fraction)
        p["gpu_seconds"] = p["gpu_time"]["seconds"]
    return p


def staged_device_bytes(model: nn.Module, n_samples: int, seq_len: int, micro_batch: int = 8,
                        budget: Optional[int] = None, device_free: Optional[int] = None, world: int = 1,
                        bits: int = 4, group_size: int = 128, outside_selected: bool = False,
                        prefetch: bool = True, method: str = "gptq", legacy_reserve: bool = False) -> Dict[str, float]:
    """Peak GPU bytes of one rank of the staged pipeline (``device="cuda"``, model at home on the CPU), as the
    pipeline places things (``lowbit.model._ptq_staged._run_calibrated``, run 8 on):

    * **capture**: the tensors outside the blocks on the device (an untied output head stays home) and the block-0
      inputs the activation store keeps there;
    * **blocks**: the block being calibrated and the next one (prefetched), both in the model's dtype, plus the
      finished block's quantized states (on their way home); the non-block tensors are home again unless a linear
      outside the blocks is quantized (``outside_selected``);
    * **activation store**: this rank's block inputs and outputs and the replay records (``tokens / world x
      6 hidden`` values, measured), on the device up to the budget the pipeline gives it:
      ``max_memory`` (``budget``; default ``device_free``, or everything) minus its own reserve (the work below
      and 15%, plus two blocks and a third of one);
    * **work** of the widest stage, the largest of: the float64 Hessian sums with one per-sample fp32 product and
      the micro-batch's input (accumulation), the factorisation (the fp32 Hessian, its permuted copy, the
      Cholesky factor, its inverse and a copy of a trailing block: five ``k x k`` fp32 matrices), and the solve
      (the Hessian, its factor and about five fp32 ``rows x k`` matrices of this rank's rows); plus one
      micro-batch's activations through the block during the accumulation. ``method="awq"``: the search's
      working set instead of the factorisation and solve (the Hessian and about six fp32 ``rows x k`` matrices).

    ``prefetch=False`` (a streamed model): one block on the device at a time, moved home before the next.
    ``legacy_reserve``: the pipeline of run 8 (``LOWBIT_GPU_RESERVE=cpu``: the CPU-era working reserve; the
    rank-ordered sum with three copies).

    Returns the parts and ``total`` (bytes). Checked against bench/results/scale_gpu_run8.json
    (bench/results/multi_gpu.md)."""
    from lowbit.model._ptq_blocks import _block_stages, _select_linears, find_blocks
    from lowbit.model._ptq_staged import _head_only

    name, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError("the staged pipeline's device estimate needs a list of decoder blocks")
    if world < 1:
        raise ValueError(f"world={world!r}: at least one rank")
    inside = {id(p) for p in blocks.parameters()}
    skip = set() if outside_selected else _head_only(model)
    seen = set()
    outside = 0
    for p in model.parameters():
        if id(p) not in inside and id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            outside += p.numel() * p.element_size()
    b0 = blocks[0]
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    lins = [m for m in b0.modules() if isinstance(m, nn.Linear)]
    act = next(model.parameters()).element_size()
    lin_params = sum(m.weight.numel() for m in lins)
    quantized = lin_params * (bits / 8 + 8 / group_size) + (block - lin_params * act)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or lins[0].in_features
    widths = sum(m.out_features for m in lins)
    samples = -(-n_samples // world)
    tokens = samples * seq_len
    micro = min(micro_batch, samples)
    # the pipeline's own reserve and the store's device budget (as _run_calibrated on CUDA)
    from lowbit.model._ptq_staged import DEVICE_WORK_MARGIN, _device_work, _stage_shapes

    prefix = f"{name}.0." if name else "0."
    sel = {n: m for n, m in _select_linears(model, None, ["lm_head"]).items() if n.startswith(prefix)}
    shapes = _stage_shapes(b0, sel, prefix)
    awq = method.lower() == "awq"
    reserve_work = _device_work(b0, shapes, micro_batch, seq_len, act, hidden, world, awq)
    work = _device_work(b0, shapes, micro_batch, seq_len, act, hidden, world, awq, accurate=True,
                        reduce_copies=3 if legacy_reserve else 2)
    if legacy_reserve:
        from lowbit.model._ptq_staged import _working_reserve

        base = _working_reserve(b0, micro_batch, seq_len, act)
    else:
        base = int(reserve_work * (1 + DEVICE_WORK_MARGIN))
    reserve = base + (2 * block + block // 3 if prefetch else block)
    cap = budget if budget is not None else device_free
    demand_inputs = tokens * act * hidden
    # inputs, outputs and the replay records that stay: about four more hidden-wide values per token (the 8B
    # shape's 2-GPU store peaked at 24,352 values per token, scale_gpu_run9.json; the widths of every linear,
    # the bound used before, were 51,200)
    demand = tokens * act * 6 * hidden
    if cap is None:
        store_capture, store, store_budget = demand_inputs, demand, None
    else:
        store_capture = min(demand_inputs, max(cap - outside - reserve, 0))
        # the budget is set with the non-block tensors on the device; they go home after the capture
        store_budget = max(cap - outside - reserve, 0) + (0 if outside_selected else outside)
        store = min(demand, store_budget)
    blocks_b = (2 * block if prefetch else block) + quantized + (outside if outside_selected else 0)
    capture = outside + store_capture + micro * seq_len * act * hidden * 2
    run = blocks_b + store + work
    return {"total": max(capture, run), "capture": capture, "outside": outside, "block": block,
            "blocks": blocks_b, "statistics": work, "work": work, "store": store, "reserve": reserve,
            "store_budget": store_budget, "store_demand": demand}


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
                     seq_len: int = 512, **kw: Any) -> Dict[str, Any]:
    """Predict from a model's config alone (the weights are never loaded: built on the meta device). ``kw``:
    :func:`plan`'s ``max_memory``, ``micro_batch``, ``pipeline``."""
    from lowbit._deps import require

    transformers = require("transformers", "lowbit plan")
    cfg = _load_config(spec, transformers)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    source = "gguf" if spec == "default" or spec.endswith(".gguf") else "safetensors"
    kw.setdefault("source", source)
    return plan(model, method, bits=bits, group_size=group_size, n_samples=n_samples, seq_len=seq_len, **kw)


def predict_streaming_peak(model: nn.Module, method: str, n_samples: int = 128, seq_len: int = 512,
                           micro_batch: int = 8, max_memory: Any = None, device: str = "cpu") -> Dict[str, float]:
    """Peak host memory (MB) of :func:`lowbit.model.streaming.quantize_streaming` on ``model`` (built on the meta
    device is enough): process baseline + the tensors outside the blocks + the largest block twice (its float
    weights and the quantized copy being built, plus one float weight matrix the solver copies) + the calibration
    state (the block inputs and outputs of every sample and the replay records, unless ``max_memory`` sends them to
    files) + the statistics of the widest linear (float64 sums and the solver's fp32 work matrices)."""
    from lowbit.model.offload import parse_bytes
    from lowbit.model.sequential import find_blocks

    _, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError("streaming needs a list of decoder blocks")
    inside = {id(p) for p in blocks.parameters()}
    outside = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    lins = [m for m in blocks[0].modules() if isinstance(m, nn.Linear)]
    k_max = max(m.in_features for m in lins)
    w_max = max(m.weight.numel() * m.weight.element_size() for m in lins)
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or lins[0].in_features
    tokens = n_samples * seq_len
    calibrated = method_cost(method.lower()).calibrated
    act = 4
    widths = sum(m.out_features for m in lins)
    calib = staged_store_bytes(tokens, hidden, k_max, act) if calibrated else 0
    work = micro_batch * seq_len * act * (widths + 4 * k_max) if calibrated else 0
    stats = k_max * k_max * (8 + 4 * 4) if calibrated else 0
    quantized = block // 4 + w_max
    mb = 2 ** 20
    budget = parse_bytes(max_memory)
    if str(device).startswith("cuda") and calibrated:
        # the statistics, the micro-batch's work and the activations within max_memory live on the GPU
        # (staged_device_bytes); the host holds the tensors outside the blocks while they are read, the block being
        # read and the quantized one being written, and the activations the GPU budget leaves over (pinned)
        dev = staged_device_bytes(model, n_samples, seq_len, micro_batch, budget, prefetch=False)
        host_store = max(tokens * (next(model.parameters()).element_size()) * 2 * hidden - dev["store"], 0)
        total = PROCESS_BASELINE_MB * mb + outside + block + quantized + host_store
        return {"peak_ram_mb": total / mb, "outside_mb": outside / mb, "block_mb": block / mb,
                "calibration_mb": host_store / mb, "statistics_mb": 0.0, "accelerator_mb": dev["total"] / mb}
    rest = PROCESS_BASELINE_MB * mb + outside + block + quantized + work + stats
    if budget is not None:  # the activation store keeps what fits under the budget, the rest goes to files
        calib = min(calib, max(budget - rest, 0))
    total = rest + calib
    return {"peak_ram_mb": total / mb, "outside_mb": outside / mb, "block_mb": block / mb,
            "calibration_mb": (calib + work) / mb, "statistics_mb": stats / mb}


def plan_streaming(directory: str, method: str, n_samples: int = 128, seq_len: int = 512, micro_batch: int = 8,
                   max_memory: Any = None) -> Dict[str, float]:
    """:func:`predict_streaming_peak` for the safetensors model in ``directory``, or the GGUF file ``directory``
    (its config only is read)."""
    from lowbit.model.streaming import _empty_model

    path = Path(directory)
    cfg = None
    if path.is_file() and path.suffix.lower() == ".gguf":
        from lowbit._deps import require

        cfg = require("transformers", "lowbit plan").AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        if hasattr(cfg, "quantization_config"):
            delattr(cfg, "quantization_config")
    model = _empty_model(path, None, cfg)
    if hasattr(model, "tie_weights"):  # as quantize_streaming does: a tied head is the embedding, counted once
        model.tie_weights()
    return predict_streaming_peak(model, method, n_samples, seq_len, micro_batch, max_memory)
