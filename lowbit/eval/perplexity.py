"""Perplexity of a causal LM with a sliding window.

Follows Hugging Face's "Perplexity of fixed-length models" guide: windows of ``seq_len`` tokens
start every ``stride`` tokens; in each window only the tokens not scored by the previous window
are scored, so ``stride < seq_len`` gives every scored token more context, and
``stride == seq_len`` (the default) gives non-overlapping windows. The first token of the text
has no context and is never scored; with non-overlapping windows neither is the first token of
each window (it would need the previous window as context), so each full window scores
``seq_len - 1`` tokens.

``ppl = exp(total NLL / scored tokens)``, NLL accumulated in float64 over tokens whose
log-probabilities are computed in float32 (also for half-precision models).

The issue-5/10 protocol for SmolLM2-135M: ``perplexity(model, tok, "wikitext-2/test.txt",
seq_len=512, max_windows=48)`` (the first 48 non-overlapping windows of 512 tokens).

Example::

    >>> from lowbit.model.loading import tiny_llama, tiny_tokenizer
    >>> r = perplexity(tiny_llama(), tiny_tokenizer(), text=["hello world " * 50], seq_len=64, progress=False)
    >>> r.n_windows, r.n_tokens
    (10, 590)
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.data.calibration import TextSource, encode_text, load_text


@dataclass
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood (nats) over ``n_tokens``."""

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int

    def as_dict(self) -> dict:
        return asdict(self)


# ---- shared helpers (also used by lowbit.eval.divergence) --------------------------------------

def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter or buffer (CPU for a module without either)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_input_ids(
    tokenizer: Any = None,
    text: Union[TextSource, torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """1-D ``LongTensor`` of evaluation ids from ``input_ids``, or ``text`` + ``tokenizer``.

    ``text`` ``None``/``"default"`` means the built-in corpus's ``"test"`` split.
    """
    if input_ids is None and isinstance(text, torch.Tensor):
        input_ids = text
    if input_ids is not None:
        ids = torch.as_tensor(input_ids)
        if ids.is_floating_point():
            raise TypeError(f"input_ids has dtype {ids.dtype}; expected integer token ids")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"input_ids of shape {tuple(ids.shape)}: "
                             f"expected one 1-D token stream (or [1, n])")
        return ids.long().cpu()
    return encode_text(tokenizer, load_text(text, split="test"))


def iter_windows(n_tokens: int, seq_len: int, stride: Optional[int] = None,
                 max_windows: Optional[int] = None) -> List[Tuple[int, int, int]]:
    """``[(begin, end, first_scored)]``: window ``ids[begin:end]`` scores targets ``first_scored..end-1``.

    ``first_scored`` is at least ``begin + 1`` (a window's first token has no context in it).
    Windows that would score nothing are dropped.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 2")
    stride = seq_len if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= seq_len:
        raise ValueError(f"stride={stride!r}: must be an integer in [1, seq_len={seq_len}]")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows={max_windows!r}: must be a positive integer or None")
    out: List[Tuple[int, int, int]] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + seq_len, n_tokens)
        first = max(prev_end, begin + 1)
        if end > first:
            out.append((begin, end, first))
            if max_windows is not None and len(out) >= max_windows:
                break
        prev_end = end
        if end == n_tokens:
            break
    return out


def batched(windows: List[Tuple[int, int, int]], batch_size: int) -> Iterator[List[Tuple[int, int, int]]]:
    """Consecutive groups of up to ``batch_size`` windows of equal length."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer")
    group: List[Tuple[int, int, int]] = []
    for w in windows:
        if group and (len(group) == batch_size or (w[1] - w[0]) != (group[0][1] - group[0][0])):
            yield group
            group = []
        group.append(w)
    if group:
        yield group


def forward_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of a transformers model, or of a module returning a tensor."""
    kwargs = {"use_cache": False} if hasattr(model, "config") else {}
    out = model(input_ids=ids, **kwargs) if kwargs else model(ids)
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, (tuple, list)) else out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise TypeError(f"model output {type(out).__name__} has no [batch, seq, vocab] logits")
    return logits


def window_batches(ids: torch.Tensor, windows, batch_size: int, device: torch.device):
    """Yield ``(input [B, L] on device, scored-target mask [B, L-1], targets [B, L-1])`` per batch."""
    for group in batched(windows, batch_size):
        inp = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
        L = inp.shape[1]
        pos = torch.arange(1, L)  # target positions inside the window
        mask = torch.stack([(pos + b) >= f for b, _, f in group]).to(device)
        yield group, inp, mask, inp[:, 1:]


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="batch")


# ---- perplexity --------------------------------------------------------------------------------

@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer: Any = None,
    text: Union[TextSource, torch.Tensor] = None,
    input_ids: Optional[torch.Tensor] = None,
    seq_len: int = 512,
    stride: Optional[int] = None,
    max_windows: Optional[int] = None,
    batch_size: int = 1,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
) -> PerplexityResult:
    """Sliding-window perplexity of ``model`` on ``input_ids`` or ``text`` (tokenized with ``tokenizer``).

    ``text``: ``None``/``"default"`` (the built-in corpus's test split), a ``.txt``/``.jsonl`` path,
    a list of strings or a Hugging Face dataset name (see :func:`lowbit.data.calibration.load_text`).
    ``stride`` defaults to ``seq_len`` (non-overlapping windows). ``max_windows`` keeps the first
    windows only. ``device`` defaults to the model's device (inputs are moved there; the model is not).

    Example::

        >>> test_txt = "../shared/data/wikitext-2/test.txt"
        >>> r = perplexity(model, tok, test_txt, seq_len=512, max_windows=48)  # doctest: +SKIP
        >>> r.n_windows, r.n_tokens                                             # doctest: +SKIP
        (48, 24528)
    """
    ids = resolve_input_ids(tokenizer, text, input_ids)
    windows = iter_windows(ids.numel(), seq_len, stride, max_windows)
    if not windows:
        raise ValueError(f"the text has {ids.numel()} token(s): nothing to score (need at least 2)")
    dev = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    total_nll = 0.0
    n_tokens = 0
    n_batches = sum(1 for _ in batched(windows, batch_size))
    try:
        for _, inp, mask, tgt in _progress(window_batches(ids, windows, batch_size, dev), n_batches,
                                           "perplexity", progress):
            logits = forward_logits(model, inp)[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
            nll = nll.view(tgt.shape)[mask]
            total_nll += float(nll.double().sum())
            n_tokens += int(mask.sum())
    finally:
        model.train(was_training)
    mean = total_nll / n_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, n_tokens=n_tokens, n_windows=len(windows))
