"""Model-level weight-only PTQ (RTN, AWQ, GPTQ, HQQ) on a memory-bounded, block-by-block pipeline.

Calibrated methods (GPTQ, AWQ) run the decoder one block at a time, as in GPTQ's reference
``llama.py`` sequential loop:

1. the inputs of block 0 are captured by a hook that stops the forward (``_StopForward``);
2. the block runs over all calibration chunks **once**. Every chunk runs in its own thread; a
   pre-hook on each selected linear adds the chunk's input to the layer's statistics (sums:
   ``X^T X``, ``sum |x|``, token count; :class:`lowbit.algorithms.stats.InputStats`) and waits
   until every chunk has reached that layer. The layer (or the group of layers that share its
   input: q/k/v, gate/up) is then quantized, and all chunks go on through the *quantized* layer.
   This is true-sequential quantization (o_proj sees the outputs of the quantized q/k/v, down_proj
   those of the quantized gate/up) at the cost of a single pass over the block, and the block's
   outputs, computed through the quantized layers, are the next block's inputs;
3. only the block being worked on (and the calibration activations) needs to sit on ``device``;
   the other blocks stay where they are (e.g. on the CPU).

That is the previous pipeline (``pipeline="threads"``, :mod:`lowbit.model._ptq_threads`). The default
(``pipeline="auto"``, since issue 18) is the staged one (:mod:`lowbit.model._ptq_staged`): the same
true-sequential order, but the samples go through the block in micro-batches, pass by pass (each pass stops at
the next stage to quantize), the statistics are float64 sums in a fixed order (codes independent of the
micro-batch size, the number of processes and ``max_memory``), and the activations kept between passes live in
an :class:`lowbit.model.offload.ActivationStore` within ``max_memory``.

Models without a list of decoder blocks are handled the same way with the whole model as one
block (whole-model statistics). Data-free methods (RTN, HQQ) quantize layer by layer directly.

AWQ's input scales are folded into the preceding RMSNorm/LayerNorm (q/k/v, gate/up) or the
preceding linear's rows (o_proj from v_proj when the shapes agree, down_proj from up_proj);
layers with no such predecessor get the clipping search only.

Example::

    >>> model = quantize_model_ptq(model, method="gptq", bits=4, group_size=128, sym=False,
    ...                            calib_dataset="valid.txt", tokenizer=tok, n_samples=128, seq_len=512)
    >>> model.ptq_summary["bits_per_weight"]                                  # doctest: +SKIP
    4.25
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from lowbit.algorithms.hqq import hqq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.config import AWQConfig, GPTQConfig, HQQConfig, RTNConfig, WeightOnlyConfig

logger = logging.getLogger(__name__)

# The built-in methods' names and options, as the method table (lowbit.model.methods) holds them: each
# method's config class (lowbit.config.RTNConfig ...) owns its options and their defaults.
PTQ_METHODS = ("rtn", "awq", "gptq", "hqq")
CALIBRATED = ("awq", "gptq")
METHOD_OPTIONS = {c.method: c.option_names() for c in (GPTQConfig, AWQConfig, HQQConfig, RTNConfig)}

# the pipelines' parts live in their own modules (issue 16: files <= 600 lines); re-exported here, where they were
from lowbit.model._ptq_blocks import (_FOLDS, _StopForward, _Stage, _block_stages, _calibration_tokens,  # noqa: E402,F401
                                     _capture_block0, _first_tensor, _foldable, _gqa_tie, _install, _peak_memory,
                                     _progress, _rtn_fallback, _select_linears, _set_submodule, _to_device_except,
                                     find_blocks)
from lowbit.model._ptq_solve import (_awq_stage, _fold_awq, _gptq_stage, _install_stages, _on_owner,  # noqa: E402,F401
                                    _layer_opts, _row_pieces, _solve_owner)
from lowbit.model._ptq_staged import (_BlockRunner, _RunConfig, _StopAtStage, _Subset, _data_free_streamed,  # noqa: E402,F401
                                     _fingerprint, _in_worker, _make_store, _micro_batches, _reduce_stats,
                                     _run_calibrated, _run_stages_mb, _working_reserve)
from lowbit.model._ptq_threads import _Staged, _run_calibrated_threads, _run_stages  # noqa: E402,F401





# ---------------------------------------------------------------------------------------------
# selection, installation, structure


from lowbit.model.api import _selected  # noqa: E402  (the one module-name matcher)



















# ---------------------------------------------------------------------------------------------
# methods applied to one stage


# the functions the method table (lowbit.model.ptq_methods) points to: each takes the method's config object


def _rtn_layer(weight: torch.Tensor, cfg: RTNConfig):
    """rtn, one layer."""
    return rtn_quantize(weight, cfg.bits, cfg.group_size, cfg.sym, **cfg.options())


def _hqq_layer(weight: torch.Tensor, cfg: HQQConfig):
    """hqq, one layer."""
    return hqq_quantize(weight, cfg.bits, cfg.group_size, cfg.sym, **cfg.options())


def _gptq_stage_cfg(stage: "_Stage", modules: Dict[str, nn.Linear], cfg: GPTQConfig) -> None:
    """gptq, one stage of layers sharing their input (:func:`_gptq_stage`)."""
    _gptq_stage(stage, modules, cfg.bits, cfg.group_size, cfg.sym, cfg.options())


def _awq_stage_cfg(stage: "_Stage", modules: Dict[str, nn.Linear], cfg: AWQConfig) -> None:
    """awq, one stage of layers sharing their input (:func:`_awq_stage`)."""
    _awq_stage(stage, modules, cfg.bits, cfg.group_size, cfg.sym, cfg.options())


_awq_stage_cfg.needs_absmean = True  # the stage reads stats.act_absmean() (the pipeline collects it)














# ---------------------------------------------------------------------------------------------
# driver












def quantize_model_ptq(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int = 128, sym: bool = True,
                       include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = ("lm_head",),
                       calib_dataset: Any = None, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                       device: Any = None, progress: bool = True, tokenizer: Any = None, batch_size: int = 8,
                       micro_batch: Optional[int] = None, max_memory: Any = None, offload_dir: Optional[str] = None,
                       checkpoint_dir: Optional[str] = None, resume: bool = False, pipeline: str = "auto",
                       config: Optional[WeightOnlyConfig] = None, **method_options: Any) -> nn.Module:
    """Weight-only PTQ of every selected ``nn.Linear`` of ``model`` (in place); returns ``model``.

    ``method``: ``"rtn"``, ``"hqq"`` (data-free) or ``"gptq"``, ``"awq"`` (calibrated on
    ``calib_dataset``: a token tensor ``[n, seq_len]``, or anything
    :func:`lowbit.data.calibration.get_calibration_data` accepts, tokenized with ``tokenizer``), or any
    method registered with :func:`lowbit.model.methods.register_ptq_method`.
    ``include``/``exclude``: fnmatch patterns on module names (a bare name also matches as a
    suffix, so ``"lm_head"`` excludes ``model.lm_head``). ``method_options`` are the method's own
    options, fields of its config class (e.g. ``percdamp``, ``act_order``, ``group_objective`` of
    :class:`lowbit.config.GPTQConfig`; ``n_grid``, ``clip`` of :class:`lowbit.config.AWQConfig`);
    ``config=`` passes that config object instead of every keyword.

    Calibration memory (see the module doc): samples go through each block ``micro_batch`` at a time
    (default ``batch_size``); the activations kept between passes stay on ``device`` within
    ``max_memory`` (bytes or ``"1.5GB"``: the peak the run may reach on the device, default what the
    device has free) and are offloaded beyond it (pinned host memory, then files under
    ``offload_dir``, default the system temp dir). The codes do not depend on ``micro_batch`` nor on
    ``max_memory``.

    ``checkpoint_dir``: after every block, its quantized states and the next block's inputs are
    written there atomically; ``resume=True`` restarts from the last finished block found there
    (bit-identical result). Under ``torchrun`` (``torch.distributed`` initialised) the samples are
    shared between the ranks (:mod:`lowbit.model.distributed`).

    The summary (time, bits per weight, sizes, peak memory) is logged and stored as
    ``model.ptq_summary``.
    """
    from lowbit.model.methods import METHODS
    from lowbit.model.offload import parse_bytes

    stream = method_options.pop("_stream", None)  # lowbit.model.streaming: blocks read and written one by one
    if config is None:
        entry = METHODS.get(method) if isinstance(method, str) and method.lower() in METHODS else None
        if entry is None or (entry.layer is None and entry.stage is None):
            ptq = sorted(n for n in METHODS.names() if METHODS.get(n).layer or METHODS.get(n).stage)
            raise ValueError(f"method={method!r}: expected one of {tuple(ptq)}")
        config = entry.config_cls.create(
            bits=bits, group_size=group_size, sym=sym, include=include, exclude=exclude, calib_dataset=calib_dataset,
            n_samples=n_samples, seq_len=seq_len, seed=seed, device=device, progress=progress, tokenizer=tokenizer,
            batch_size=batch_size, micro_batch=micro_batch, max_memory=max_memory, offload_dir=offload_dir,
            checkpoint_dir=checkpoint_dir, resume=resume, pipeline=pipeline, **method_options)
    else:
        if method_options:
            raise ValueError(f"pass either config= or the method's options, not both (got config and "
                             f"{', '.join(sorted(method_options))})")
        entry = METHODS.get(config.method)
    return _quantize_ptq(model, entry, config, parse_bytes(config.max_memory), stream=stream)


def _quantize_ptq(model: nn.Module, entry, cfg: WeightOnlyConfig, budget: Optional[int], stream=None) -> nn.Module:
    """The pipeline for one validated config: ``entry`` is its method-table entry (layer or stage)."""
    method = entry.name
    bits, group_size, sym = cfg.bits, cfg.group_size, cfg.sym
    include, exclude, device, progress = cfg.include, cfg.exclude, cfg.device, cfg.progress
    pipeline, micro_batch = cfg.pipeline, cfg.micro_batch
    calibrated = entry.stage is not None
    if pipeline == "auto":
        # the micro-batched pipeline (bounded memory, micro-batch-invariant codes) on every device; the previous
        # all-samples-at-once pipeline runs only when asked for (pipeline="threads"): on the CPU the staged one takes
        # about its CPU time (bench/scale.md, "scale3") at a fraction of its memory. Its codes differ from the
        # previous pipeline's in the last bits (float64 per-sample Hessian sums): the switch re-recorded the GPTQ/AWQ
        # digests of tests/test_byte_identity.py (CHANGELOG.md)
        pipeline = "staged"
    opts = cfg.options()
    t0 = time.perf_counter()
    param = next(model.parameters())
    home = param.device
    device = torch.device(device) if device is not None else home
    from lowbit.model.distributed import init_from_env, local_device

    if calibrated and pipeline == "staged":
        init_from_env(device)  # launched by torchrun: join the process group
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    selected = _select_linears(model, include, exclude)
    if not selected:
        raise ValueError(f"no nn.Linear selected (include={include!r}, exclude={exclude!r})")
    if opts.get("gguf_type") is not None:
        bad = [n for n, lin in selected.items() if lin.in_features % 32]
        if bad:
            raise ValueError(f"gguf_type={opts['gguf_type']!r}: GGUF blocks hold 32 input columns, but "
                             f"{bad[0]!r} has in_features={selected[bad[0]].in_features} (and {len(bad) - 1} more); "
                             f"exclude such layers (exclude=[...]) or use a group-wise method without gguf_type")
    states: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}

    # data-free methods run in a worker thread, as the calibration does (_in_worker's doc: torch's OpenMP pool
    # spin-waits between the many small parallel ops HQQ's iterations issue from the main thread; whole SmolLM2
    # HQQ g64 on the 2-core CPU: 6.6-16.6 s wall in a worker against 39-70 s from the main thread, bench/scale.md
    # "scale3")
    if not calibrated and stream is not None:
        _in_worker(_data_free_streamed, model, entry, cfg, selected, device, stream, states, progress, device=device)
    elif not calibrated:
        def data_free() -> None:
            for name in _progress(list(selected), desc=f"{method} layers", enabled=progress):
                lin = selected[name]
                w = lin.weight.detach().to(device)
                st = entry.layer(w, cfg.for_layer(name))
                states[name] = st.to(lin.weight.device)
                _install(model, name, lin, states[name])

        _in_worker(data_free, device=device)
    else:
        ids = _calibration_tokens(model, cfg.calib_dataset, cfg.tokenizer, cfg.n_samples, cfg.seq_len, cfg.seed)
        extra["calib_tokens"] = int(ids.numel())
        if pipeline == "threads":  # the previous all-samples-at-once pipeline (kept for comparisons)
            _run_calibrated_threads(model, entry, cfg, selected, ids, device, home, states, extra)
        else:
            micro = micro_batch or cfg.batch_size
            run = _RunConfig(micro_batch=micro, budget=budget, offload_dir=cfg.offload_dir,
                             checkpoint_dir=cfg.checkpoint_dir, resume=cfg.resume,
                             fingerprint=_fingerprint(model, method, bits, group_size, sym, opts, ids, include,
                                                      exclude, micro))
            run.stream = stream
            _run_calibrated(model, entry, cfg, selected, ids, device, home, run, states, extra)

    elapsed = time.perf_counter() - t0
    q_bytes = sum(st.nbytes for st in states.values())
    q_numel = sum(st.numel for st in states.values())
    quantized = set(states)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if n.rsplit(".", 1)[0] not in quantized)
    peak, kind = _peak_memory(device)
    summary = {
        "method": method, "bits": bits, "group_size": group_size, "sym": sym, "time_s": elapsed,
        "n_layers": len(states), "bits_per_weight": 8.0 * q_bytes / max(q_numel, 1),
        "quantized_bytes": q_bytes, "model_bytes": q_bytes + other, "peak_memory_bytes": peak,
        "peak_memory_kind": kind, **extra,
    }
    model.ptq_summary = summary
    logger.info("lowbit %s: %d layers in %.1f s, %.3f bits/weight, model %.1f MB, peak memory %.1f MB (%s)",
                method, len(states), elapsed, summary["bits_per_weight"], summary["model_bytes"] / 2**20,
                peak / 2**20, kind)
    return model



