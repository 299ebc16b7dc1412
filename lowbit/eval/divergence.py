"""KL divergence of a quantized model's next-token distribution from the float model's.

The statistics llama.cpp's ``perplexity --kl-divergence`` reports: per scored token
``KL(P_ref || P_q) = sum_v p_ref(v) * (log p_ref(v) - log p_q(v))``, summarised by its mean,
median, 99th percentile and maximum, plus how often both models put the same token first
("same top p" in llama.cpp). Perplexity alone hides accuracy cliffs: a model can keep its
average loss while flipping its top choice on a few percent of tokens.

Windows and scored tokens are the same as in :func:`lowbit.eval.perplexity.perplexity`
(non-overlapping windows of ``seq_len`` by default; every token with context in its window is
scored), so both models' perplexities come out of the same pass (``ppl_ref``, ``ppl``).
llama.cpp scores only the second half of each window; pass ``stride=seq_len // 2`` for the
same "enough context" effect here.

Example::

    >>> from lowbit.model.loading import tiny_llama, tiny_tokenizer
    >>> ref, tok = tiny_llama(seed=0), tiny_tokenizer()
    >>> d = kl_divergence(ref, tiny_llama(seed=0), tok, text=["abc " * 100], seq_len=64, progress=False)
    >>> d["kld_mean"], d["top1_agreement"]
    (0.0, 1.0)
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.calibration import TextSource
from lowbit.eval.perplexity import (
    _progress,
    batched,
    forward_logits,
    iter_windows,
    model_device,
    resolve_input_ids,
    window_batches,
)


def _percentile(sorted_values: torch.Tensor, q: float) -> float:
    """``numpy.percentile(x, q)`` (linear interpolation) of an ascending 1-D tensor of any length."""
    pos = (sorted_values.numel() - 1) * q / 100.0
    lo = int(math.floor(pos))
    hi = min(lo + 1, sorted_values.numel() - 1)
    frac = pos - lo
    return float(sorted_values[lo] * (1 - frac) + sorted_values[hi] * frac)


@torch.inference_mode()
def kl_divergence(
    ref_model: nn.Module,
    model: nn.Module,
    tokenizer: Any = None,
    text: Union[TextSource, torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
    seq_len: int = 512,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    device: Union[None, str, torch.device] = None,
    ref_device: Union[None, str, torch.device] = None,
    progress: bool = True,
) -> Dict[str, float]:
    """Per-token ``KL(P_ref || P_model)`` statistics and top-1 agreement on the same windows.

    Returns ``{"kld_mean", "kld_median", "kld_p99", "kld_max", "top1_agreement", "n_tokens",
    "n_windows", "ppl_ref", "ppl"}`` (KL in nats; ``kld_p99`` by linear interpolation, as
    ``numpy.percentile``). ``device``/``ref_device`` default to each model's own device.

    Example::

        >>> d = kl_divergence(float_model, q_model, tok, "test.txt", max_windows=48)  # doctest: +SKIP
        >>> d["kld_mean"], d["kld_p99"], d["top1_agreement"]                            # doctest: +SKIP
    """
    ids = resolve_input_ids(tokenizer, text, input_ids)
    windows = iter_windows(ids.numel(), seq_len, stride, max_windows)
    if not windows:
        raise ValueError(f"the text has {ids.numel()} token(s): nothing to score (need at least 2)")
    dev = torch.device(device) if device is not None else model_device(model)
    ref_dev = torch.device(ref_device) if ref_device is not None else model_device(ref_model)
    modes = (ref_model.training, model.training)
    ref_model.eval()
    model.eval()
    klds: List[torch.Tensor] = []
    same_top1 = 0
    nll_ref = 0.0
    nll_q = 0.0
    n_batches = sum(1 for _ in batched(windows, batch_size))
    try:
        for _, inp, mask, tgt in _progress(window_batches(ids, windows, batch_size, dev), n_batches,
                                           "kl-divergence", progress):
            logp_q = F.log_softmax(forward_logits(model, inp)[:, :-1].float(), dim=-1)[mask]
            logp_r = F.log_softmax(forward_logits(ref_model, inp.to(ref_dev))[:, :-1].float(), dim=-1)
            logp_r = logp_r.to(dev)[mask]
            t = tgt[mask]
            # KL(P_ref || P_q) per token; terms with p_ref == 0 contribute 0 (xlogy convention)
            kl = (logp_r.exp() * (logp_r - logp_q)).sum(-1).clamp_min(0.0)
            klds.append(kl.double().cpu())
            same_top1 += int((logp_r.argmax(-1) == logp_q.argmax(-1)).sum())
            nll_ref -= float(logp_r.gather(-1, t[:, None]).double().sum())
            nll_q -= float(logp_q.gather(-1, t[:, None]).double().sum())
    finally:
        ref_model.train(modes[0])
        model.train(modes[1])
    kld = torch.cat(klds).sort().values
    n = kld.numel()
    return {
        "kld_mean": float(kld.mean()),
        "kld_median": _percentile(kld, 50.0),
        "kld_p99": _percentile(kld, 99.0),
        "kld_max": float(kld[-1]),
        "top1_agreement": same_top1 / n,
        "n_tokens": n,
        "n_windows": len(windows),
        "ppl_ref": math.exp(nll_ref / n),
        "ppl": math.exp(nll_q / n),
    }
