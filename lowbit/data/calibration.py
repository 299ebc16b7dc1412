"""Calibration data: text from many sources, tokenized once, cut into reproducible random windows.

The same ``calib_dataset`` names work for every calibrated method (GPTQ, AWQ, ...) and for
evaluation (:func:`load_text` is shared with :mod:`lowbit.eval.perplexity`):

* ``None`` or ``"default"``: the built-in offline corpus (:mod:`lowbit.data.corpus`; its ``"train"``
  split for calibration, its ``"test"`` split for evaluation);
* a path to a ``.txt`` file (read as UTF-8) or a ``.jsonl`` file (the ``"text"`` field of each line,
  joined by blank lines; ``.json`` holding a list of such objects or strings works too);
* a list of strings (joined by blank lines);
* a tensor of token ids (1-D stream, or 2-D ``[rows, seq_len]`` samples used as they are);
* a Hugging Face dataset name, ``"name"``, ``"name:config"`` or ``"name:config:split"`` (split
  defaults to ``train``), which needs the ``datasets`` package and the network: a clear
  ``RuntimeError`` otherwise.

Sampling follows GPTQ's reference code (random windows of ``seq_len`` tokens from the
tokenized text), made reproducible by ``seed`` and, when the text is long enough, free of
overlap: ``n_samples`` distinct aligned chunks are drawn without replacement.

Example::

    >>> from lowbit.model.loading import tiny_tokenizer
    >>> ids = get_calibration_data(tiny_tokenizer(), ["some text " * 500], n_samples=4, seq_len=64)
    >>> ids.shape
    torch.Size([4, 64])
"""
from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, List, Sequence, Union

import torch

from lowbit._deps import available

logger = logging.getLogger(__name__)

TextSource = Union[None, str, os.PathLike, Sequence[str]]
CalibSource = Union[TextSource, torch.Tensor]

DEFAULT_NAMES = ("default", "builtin", "built-in")
_TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")


# ---- text --------------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> str:
    texts: List[str] = []
    with path.open(encoding="utf-8") as f:
        if path.suffix.lower() == ".json":
            data = json.load(f)
            rows = data if isinstance(data, list) else [data]
        else:
            rows = []
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON ({e.msg}); "
                                     f"expected one object per line") from None
    for i, row in enumerate(rows, 1):
        if isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and isinstance(row.get("text"), str):
            texts.append(row["text"])
        else:
            raise ValueError(f"{path}: record {i} has no string field 'text' (got {type(row).__name__}"
                             f"{' with keys ' + str(sorted(row)[:5]) if isinstance(row, dict) else ''})")
    return "\n\n".join(texts)


def _is_hf_name(s: str) -> bool:
    return not s.endswith(_TEXT_SUFFIXES + _JSON_SUFFIXES) and not s.startswith((".", "/", "~"))


def _load_hf_text(spec: str) -> str:
    """``name[:config[:split]]`` through ``datasets`` (network needed unless cached)."""
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"dataset {spec!r}: expected 'name', 'name:config' or 'name:config:split'")
    name, config, split = (parts + [None, None])[:3]
    split = split or "train"
    if not available("datasets"):
        raise RuntimeError(
            f"{spec!r} is neither 'default' nor an existing file, so it was taken for a Hugging Face dataset "
            f"name, "
            f"which needs the 'datasets' package (pip install datasets) and network access; "
            f"otherwise pass a local .txt/.jsonl file or 'default'"
        )
    offline = any(os.environ.get(k, "").lower() in ("1", "true")
                  for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    offline_note = " (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE is set)" if offline else ""
    import datasets  # noqa: PLC0415  (optional dependency, checked above)

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001  network, hub and cache failures have many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(
            f"could not load the Hugging Face dataset {spec!r}{offline_note}: {first}; "
            f"pass a local .txt/.jsonl file or 'default' when offline"
        ) from e
    column = "text" if "text" in ds.column_names else next(
        (c for c in ds.column_names if isinstance(ds[0][c], str)), None)
    if column is None:
        raise ValueError(f"dataset {spec!r} has no text column (columns: {ds.column_names})")
    return "\n\n".join(t for t in ds[column] if t)


def load_text(source: TextSource = None, *, split: str = "test") -> str:
    """Text from ``source`` (see the module doc); ``split`` picks the built-in corpus's part.

    Example::

        >>> load_text(["first document", "second"])
        'first document\\n\\nsecond'
    """
    if source is None or (isinstance(source, str) and source.strip().lower() in DEFAULT_NAMES):
        from lowbit.data.corpus import default_corpus_text

        return default_corpus_text(split)
    if isinstance(source, (list, tuple)):
        bad = [type(s).__name__ for s in source if not isinstance(s, str)]
        if bad:
            raise TypeError(f"a list source must hold strings only, got {bad[0]}")
        return "\n\n".join(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(os.path.expanduser(os.fspath(source)))
        if path.is_file():
            if path.suffix.lower() in _JSON_SUFFIXES:
                return _read_jsonl(path)
            return path.read_text(encoding="utf-8")
        if path.is_dir():
            raise IsADirectoryError(f"text source {str(source)!r} is a folder; "
                                    f"expected a .txt or .jsonl file")
        if isinstance(source, os.PathLike) or not _is_hf_name(str(source)):
            raise FileNotFoundError(f"text file {str(source)!r} does not exist")
        return _load_hf_text(str(source))
    raise TypeError(
        f"text source of type {type(source).__name__}: expected None, 'default', a file path, "
        f"a list of strings or a Hugging Face dataset name"
    )


# ---- tokens ------------------------------------------------------------------------------------

def encode_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids of ``text`` as a 1-D ``LongTensor``.

    Accepts a transformers tokenizer (called with its default special-token handling, as
    Hugging Face's perplexity guide does), a ``tokenizers.Tokenizer`` (``.encode(text).ids``) or
    any callable returning a list of ids.
    """
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn text into token ids (or pass token ids directly)")
    if hasattr(tokenizer, "encode") and type(tokenizer).__module__.startswith("tokenizers"):
        ids = tokenizer.encode(text).ids
    elif callable(tokenizer):
        try:
            out = tokenizer(text, verbose=False)
        except TypeError:
            out = tokenizer(text)
        ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
    else:
        raise TypeError(f"tokenizer of type {type(tokenizer).__name__} is not callable and has no .encode")
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"the tokenizer returned ids of shape {tuple(ids.shape)}; expected a 1-D sequence")
    return ids


def _sample_windows(stream: torch.Tensor, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    n_tokens = stream.numel()
    if n_tokens < seq_len:
        raise ValueError(f"calibration text has {n_tokens} tokens, fewer than seq_len={seq_len}; "
                         f"give more text or a smaller seq_len")
    g = torch.Generator().manual_seed(seed)
    n_chunks = n_tokens // seq_len
    if n_chunks >= n_samples:
        # distinct aligned chunks, shifted by one common random offset so every token can be picked
        offset = int(torch.randint(0, n_tokens - n_chunks * seq_len + 1, (1,), generator=g))
        chunks = torch.randperm(n_chunks, generator=g)[:n_samples]
        starts = offset + chunks * seq_len
    else:
        warnings.warn(
            f"calibration text has {n_tokens} tokens, fewer than n_samples*seq_len={n_samples * seq_len}: "
            f"windows will overlap",
            stacklevel=3,
        )
        starts = torch.randint(0, n_tokens - seq_len + 1, (n_samples,), generator=g)
    idx = starts[:, None] + torch.arange(seq_len)[None, :]
    return stream[idx]


def get_calibration_data(
    tokenizer: Any = None,
    calib_dataset: CalibSource = None,
    n_samples: int = 128,
    seq_len: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """``LongTensor [n_samples, seq_len]`` of calibration token ids, reproducible with ``seed``.

    ``calib_dataset``: see the module doc (``None`` = the built-in corpus's ``"train"`` split).
    A 2-D tensor with ``seq_len`` columns is taken as ready samples (the first ``n_samples`` rows).

    Example::

        >>> from lowbit.model.loading import tiny_tokenizer
        >>> a = get_calibration_data(tiny_tokenizer(), ["abc " * 1000], n_samples=8, seq_len=32, seed=1)
        >>> b = get_calibration_data(tiny_tokenizer(), ["abc " * 1000], n_samples=8, seq_len=32, seed=1)
        >>> bool((a == b).all())
        True
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples={n_samples!r}: must be a positive integer")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r}: must be an integer >= 2")
    if isinstance(calib_dataset, torch.Tensor):
        ids = calib_dataset.detach().to("cpu")
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"token id tensor has dtype {ids.dtype}; expected an integer dtype")
        ids = ids.long()
        if ids.dim() == 2 and ids.shape[1] == seq_len:
            if ids.shape[0] < n_samples:
                raise ValueError(f"token id tensor has {ids.shape[0]} rows of seq_len={seq_len}, fewer than "
                                 f"n_samples={n_samples}")
            return ids[:n_samples].clone()
        if ids.dim() not in (1, 2):
            raise ValueError(f"token id tensor of shape {tuple(ids.shape)}: expected 1-D or 2-D")
        stream = ids.reshape(-1)
    else:
        text = load_text(calib_dataset, split="train")
        stream = encode_text(tokenizer, text)
    logger.info("calibration: %d samples x %d tokens from a stream of %d tokens (seed %d)",
                n_samples, seq_len, stream.numel(), seed)
    return _sample_windows(stream, n_samples, seq_len, seed)
