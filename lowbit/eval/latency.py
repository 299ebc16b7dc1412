"""Latency of a causal LM: prefill time, decode throughput and peak memory.

Protocol (as in llama.cpp's ``llama-bench`` pp/tg tests and optimum-benchmark): a random prompt
of ``prompt_len`` tokens per sequence is run through the model once (prefill, timed in
milliseconds), then ``gen_len`` tokens are generated greedily one at a time through the KV cache
(decode, reported as generated tokens per second over the whole batch). ``warmup`` untimed runs
precede ``repeats`` timed ones; the medians are reported. CUDA work is synchronised before every
clock read.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` (reset before the timed runs; tensors
allocated by PyTorch on that device only). On CPU, the process's resident-set high-water mark
``VmHWM`` from ``/proc/self/status``; it is process-wide (everything the process ever held,
the model included), and is reset before the timed runs where the kernel allows it (writing
``5`` to ``/proc/self/clear_refs``); ``peak_memory_reset`` says whether that worked. Elsewhere
``resource.getrusage`` gives the never-reset maximum.

Example::

    >>> from lowbit.model.loading import tiny_llama
    >>> r = measure_latency(tiny_llama(), prompt_len=16, gen_len=4, repeats=1)
    >>> r["prefill_ms"] > 0 and r["decode_tokens_per_s"] > 0
    True
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Any, Dict, Optional, Union

import torch
from torch import nn

from lowbit.eval.perplexity import model_device


# ---- memory ------------------------------------------------------------------------------------

def _read_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def cpu_peak_rss_bytes() -> Optional[int]:
    """Process-wide peak resident set size in bytes (``VmHWM``; ``getrusage`` where /proc is absent)."""
    kb = _read_status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_cpu_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ``clear_refs`` 5); False when not permitted."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call(model: nn.Module, ids: torch.Tensor, past: Any):
    if hasattr(model, "config"):
        return model(input_ids=ids, past_key_values=past, use_cache=True)
    return model(ids)


def _logits_and_cache(out) -> tuple:
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    return logits, getattr(out, "past_key_values", None)


def _one_run(model: nn.Module, prompt: torch.Tensor, gen_len: int, device: torch.device) -> tuple:
    """``(prefill seconds, decode seconds)`` for one prompt batch."""
    _sync(device)
    t0 = time.perf_counter()
    logits, past = _logits_and_cache(_call(model, prompt, None))
    nxt = logits[:, -1:].argmax(-1)
    _sync(device)
    t1 = time.perf_counter()
    seq = prompt
    for _ in range(gen_len):
        if past is not None:
            logits, past = _logits_and_cache(_call(model, nxt, past))
        else:  # no KV cache: recompute the whole sequence (plain modules)
            seq = torch.cat([seq, nxt], dim=1)
            logits, _ = _logits_and_cache(_call(model, seq, None))
        nxt = logits[:, -1:].argmax(-1)
    _sync(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    batch_size: int = 1,
    prompt_len: int = 128,
    gen_len: int = 32,
    warmup: int = 1,
    repeats: int = 3,
    device: Union[None, str, torch.device] = None,
    vocab_size: Optional[int] = None,
    seed: int = 0,
) -> Dict[str, Any]:
    """Median prefill milliseconds, decode tokens/s and peak memory of ``model``.

    Returns ``{"prefill_ms", "decode_tokens_per_s", "decode_ms_per_token", "peak_memory_bytes",
    "peak_memory_kind", "peak_memory_reset", "batch_size", "prompt_len", "gen_len", "repeats",
    "device"}``. ``decode_tokens_per_s`` counts the tokens of all ``batch_size`` sequences;
    ``decode_ms_per_token`` is the time of one decode step. ``device`` defaults to the model's.

    Example::

        >>> r = measure_latency(model, batch_size=1, prompt_len=128, gen_len=32)   # doctest: +SKIP
        >>> r["prefill_ms"], r["decode_tokens_per_s"], r["peak_memory_bytes"]      # doctest: +SKIP
    """
    for name, v, lo in (("batch_size", batch_size, 1), ("prompt_len", prompt_len, 1), ("gen_len", gen_len, 0),
                        ("warmup", warmup, 0), ("repeats", repeats, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}={v!r}: must be an integer >= {lo}")
    dev = torch.device(device) if device is not None else model_device(model)
    if vocab_size is None:
        cfg = getattr(model, "config", None)
        vocab_size = getattr(cfg, "vocab_size", None)
        if vocab_size is None:
            raise ValueError("the model has no config.vocab_size; pass vocab_size=")
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=g).to(dev)
    was_training = model.training
    model.eval()
    try:
        for _ in range(warmup):
            _one_run(model, prompt, gen_len, dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            reset_ok = True
        else:
            reset_ok = reset_cpu_peak_rss()
        prefill, decode = [], []
        for _ in range(repeats):
            p, d = _one_run(model, prompt, gen_len, dev)
            prefill.append(p)
            decode.append(d)
        if dev.type == "cuda":
            peak, kind = int(torch.cuda.max_memory_allocated(dev)), "cuda_max_allocated"
        else:
            peak, kind = cpu_peak_rss_bytes(), "cpu_vmhwm_process" if os.path.exists("/proc/self/status") \
                else "cpu_maxrss_process"
    finally:
        model.train(was_training)
    dec = statistics.median(decode)
    return {
        "prefill_ms": 1000.0 * statistics.median(prefill),
        "decode_tokens_per_s": (batch_size * gen_len / dec) if gen_len and dec > 0 else float("nan"),
        "decode_ms_per_token": (1000.0 * dec / gen_len) if gen_len else float("nan"),
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "peak_memory_reset": reset_ok,
        "batch_size": batch_size,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": repeats,
        "device": str(dev),
    }
