"""lowbit's native checkpoint: safetensors shards + quantization map + model config, written atomically.

Modelled on optimum-quanto's serialization (``quanto_qmap.json`` beside the safetensors, then
``requantize`` on an empty model; ``shared/docs/formats-checkpoints.md`` section 4), with lowbit's
QuantState tensors (``<module>.<param>.data/.scales/.zeros/.meta``) as the payload.

A checkpoint directory holds:

* ``lowbit_model-*.safetensors``: every tensor of ``model.state_dict()`` (tied tensors once), plus
  the non-persistent buffers (rotary tables ...), so that a round trip is bit-exact even for models
  cast to another dtype. No pickle anywhere; loading never executes code.
* ``lowbit_quantization.json``: ``lowbit.quantization_map(model)``: which module is quantized, by
  which class, with which constructor arguments.
* ``config.json`` (the Hugging Face config, when the model has one) or ``lowbit_model_config.json``
  (the ``config=`` dict given to :func:`save`, for non-HF models rebuilt by a ``model_factory``).
* ``lowbit_index.json``: the marker, written last. It lists every tensor (file, dtype, shape,
  sha256 of its bytes) and every file (size, sha256), and carries its own digest (``index_sha256``).

:func:`save` writes the checkpoint into a temporary sibling directory and swaps it with the target
atomically (:func:`lowbit.io._files.atomic_directory`): a save killed at any moment leaves the
target absent, the previous checkpoint intact, or the complete new one; other files in the directory
(a tokenizer, exports) are kept. :func:`load` checks the index (and its digest), the size and sha256
of every file (a mismatch is traced to the corrupted tensor through the per-tensor digests), every
tensor's dtype and shape against the index, the quantization map (its version: a newer one is
refused) against the tensors and the model, naming the offending file, tensor or module.
Checkpoints written before the per-tensor and index digests existed load as before.

Example::

    >>> lowbit.save(model, "ckpt")                       # doctest: +SKIP
    >>> model2 = lowbit.load("ckpt")                     # doctest: +SKIP
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch
from torch import nn

from lowbit.io._files import (
    DEFAULT_MAX_SHARD_SIZE,
    CheckpointError,
    PathLike,
    atomic_directory,
    atomic_write_json,
    dedupe_tensors,
    empty_hf_model,
    hf_config_dict,
    read_json_object,
    read_safetensors,
    read_safetensors_header,
    recover_interrupted,
    sha256_bytes,
    sha256_file,
    tensor_sha256,
    write_sharded,
)

__all__ = ["save", "load", "is_checkpoint", "has_marker", "read_index", "read_quantization_map", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "lowbit-native"
FORMAT_VERSION = 1
INDEX = "lowbit_index.json"
QMAP = "lowbit_quantization.json"
HF_CONFIG = "config.json"
USER_CONFIG = "lowbit_model_config.json"
SHARD_PREFIX = "lowbit_model"

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _nonpersistent_buffers(model: nn.Module) -> Dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            t = mod._buffers.get(b)
            if t is not None:
                out[f"{mod_name}.{b}" if mod_name else b] = t
    return out


# ---------------------------------------------------------------------------------------------
# save


def save(model: nn.Module, directory: PathLike, config: Optional[Mapping[str, Any]] = None, *,
         max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write ``model`` (quantized with lowbit, frozen or not) as a native checkpoint in ``directory``.

    Args:
        model: any ``nn.Module``; Hugging Face models get their ``config.json`` saved.
        directory: created if needed, replaced atomically; other files in it are kept.
        config: JSON-able description of a non-HF model, handed back to ``model_factory`` by
            :func:`load` (ignored for HF models unless given explicitly).
        max_shard_size: bytes per safetensors shard.

    Returns:
        The directory.

    Example::

        >>> lowbit.quantize(model, weights="qint4"); lowbit.freeze(model)   # doctest: +SKIP
        >>> lowbit.save(model, "out/ckpt")                                   # doctest: +SKIP
    """
    from lowbit.model.api import quantization_map

    if not isinstance(model, nn.Module):
        raise TypeError(f"save expects an nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    qmap = quantization_map(model)
    hf_cfg = hf_config_dict(model)
    if config is not None:
        try:
            json.dumps(config)
        except TypeError as e:
            raise TypeError(f"config must be JSON-serialisable: {e}") from None

    sd = dict(model.state_dict())
    buffers = {k: v for k, v in _nonpersistent_buffers(model).items() if k not in sd}
    tensors, aliases = dedupe_tensors({**sd, **buffers})
    import lowbit

    with atomic_directory(directory, owned=_owned_names(directory)) as tmp:
        weight_map = write_sharded(tmp, tensors, prefix=SHARD_PREFIX, max_shard_size=max_shard_size,
                                   metadata={"format": "pt", "producer": FORMAT_NAME}, hf_index=False)
        files = sorted(set(weight_map.values()))
        atomic_write_json(tmp / QMAP, {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                       "quantization_map": qmap})
        files.append(QMAP)
        if hf_cfg is not None and config is None:
            atomic_write_json(tmp / HF_CONFIG, hf_cfg)
            files.append(HF_CONFIG)
            model_config = HF_CONFIG
        elif config is not None:
            atomic_write_json(tmp / USER_CONFIG, dict(config))
            files.append(USER_CONFIG)
            model_config = USER_CONFIG
        else:
            model_config = None
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "lowbit_version": lowbit.__version__,
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_config": model_config,
            "tensors": {k: {"file": weight_map[k], "dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                            "buffer": k in buffers, "sha256": tensor_sha256(t)} for k, t in tensors.items()},
            "aliases": aliases,
            "files": {f: {"size": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files},
        }
        index["index_sha256"] = _index_digest(index)
        atomic_write_json(tmp / INDEX, index)  # the marker: written last
    return directory


def _index_digest(index: Mapping[str, Any]) -> str:
    """sha256 of the index without its own digest (canonical JSON), so that a damaged index is detected."""
    body = {k: v for k, v in index.items() if k != "index_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _owned_names(directory: Path):
    """Names in an existing checkpoint directory that belong to the checkpoint (replaced, not carried over)."""
    listed = set()
    p = Path(directory) / INDEX
    if p.is_file():
        try:
            listed = set(json.loads(p.read_text()).get("files", {}))
        except (OSError, ValueError, AttributeError, TypeError):
            listed = set()

    def owned(name: str) -> bool:
        return (name in (INDEX, QMAP, USER_CONFIG) or name in listed
                or (name.startswith(SHARD_PREFIX) and name.endswith(".safetensors")))

    return owned


# ---------------------------------------------------------------------------------------------
# load


def is_checkpoint(directory: PathLike) -> bool:
    """True when ``directory`` holds a complete native checkpoint (its marker is present and readable)."""
    p = Path(directory) / INDEX
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def has_marker(directory: PathLike) -> bool:
    """True when ``directory`` holds a native checkpoint marker, readable or not (then it is corrupt)."""
    return (Path(directory) / INDEX).is_file()


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_index(directory: PathLike) -> Dict[str, Any]:
    """The parsed marker (``lowbit_index.json``) of a checkpoint; raises :class:`CheckpointError` if absent.

    The index is validated: its own digest (checkpoints written since lowbit 0.x carry one), the
    format version, and the type of every entry, so a damaged index is reported, never half used.
    """
    directory = Path(directory)
    p = directory / INDEX
    if not directory.is_dir():
        if recover_interrupted(directory) is None:
            raise CheckpointError(f"{directory}: not a directory")
    if not p.is_file():
        raise CheckpointError(f"{directory} is not a complete lowbit checkpoint: {INDEX} is missing "
                              "(the save was interrupted, or this is not a lowbit native checkpoint)")
    index = read_json_object(p, "checkpoint index")
    if index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{p}: format {index.get('format')!r}, expected {FORMAT_NAME!r} (corrupted index?)")
    version = index.get("version", 0)
    if not _is_int(version):
        raise CheckpointError(f"{p}: corrupted index: version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {version} was written by a newer lowbit "
                              f"(this one reads up to {FORMAT_VERSION}); upgrade lowbit")
    if "index_sha256" in index and index["index_sha256"] != _index_digest(index):
        raise CheckpointError(f"{p}: the index does not match its own checksum: corrupted index")
    for key in ("tensors", "files"):
        if not isinstance(index.get(key), dict):
            raise CheckpointError(f"{p}: corrupted index (no {key!r} table)")
    for fname, info in index["files"].items():
        if (not isinstance(info, dict) or not _is_int(info.get("size")) or not isinstance(info.get("sha256"), str)
                or "/" in fname or "\\" in fname or fname in ("", ".", "..")):
            raise CheckpointError(f"{p}: corrupted index: entry of file {fname!r}")
    for name, info in index["tensors"].items():
        if (not isinstance(info, dict) or not isinstance(info.get("file"), str) or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list) or not all(_is_int(d) and d >= 0 for d in info["shape"])
                or ("sha256" in info and not isinstance(info["sha256"], str))):
            raise CheckpointError(f"{p}: corrupted index: entry of tensor {name!r}")
        if info["file"] not in index["files"]:
            raise CheckpointError(f"{p}: tensor {name!r} is in {info['file']!r}, which is not a listed file")
    aliases = index.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CheckpointError(f"{p}: corrupted index (aliases)")
    cfg = index.get("model_config")
    if cfg is not None and cfg not in index["files"]:
        raise CheckpointError(f"{p}: model_config {cfg!r} is not a listed file (corrupted index)")
    if not index["tensors"] and not index.get("aliases") and index["files"]:
        shards = [f for f in index["files"] if f.endswith(".safetensors")]
        if shards:
            raise CheckpointError(f"{p}: corrupted index: it lists no tensor but the files {shards}")
    return index


def _diagnose(path: Path, fname: str, index: Dict[str, Any]) -> str:
    """Why a file's sha256 does not match: which tensor's bytes changed (per-tensor digests), or the header."""
    names = [k for k, info in index["tensors"].items() if info["file"] == fname and "sha256" in info]
    if not fname.endswith(".safetensors") or not names:
        return ""
    named = _header_vs_index(path, fname, index)
    if named:
        return named
    header, start = read_safetensors_header(path)
    bad = []
    with open(path, "rb") as f:
        for k in names:
            h = header.get(k)
            if h is None:
                return f" (tensor {k!r} missing from the header)"
            a, b = h["data_offsets"]
            f.seek(start + a)
            if sha256_bytes(f.read(b - a)) != index["tensors"][k]["sha256"]:
                bad.append(k)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        return f": tensor {bad[0]!r}{more} corrupted (per-tensor sha256 mismatch)"
    return " (the tensor data is intact: the header is corrupted)"


def _header_vs_index(path: Path, fname: str, index: Dict[str, Any]) -> str:
    """The first tensor whose header entry disagrees with the index (missing, extra, dtype, shape), or ""."""
    if not fname.endswith(".safetensors"):
        return ""
    try:
        header, _ = read_safetensors_header(path)
    except CheckpointError as e:
        return f" ({str(e)[len(str(path)) + 2:]})"
    listed = {k: info for k, info in index["tensors"].items() if info["file"] == fname}
    for k, info in listed.items():
        h = header.get(k)
        if h is None:
            return f": tensor {k!r} missing"
        got_dt = _dtype_name(_DTYPES[h["dtype"]]) if h["dtype"] in _DTYPES else h["dtype"]
        if got_dt != info["dtype"] or list(h["shape"]) != list(info["shape"]):
            return f": tensor {k!r} is {got_dt} {h['shape']}, the index says {info['dtype']} {info['shape']}"
    extra = sorted(set(header) - set(listed))
    if extra:
        return f": tensor {extra[0]!r} is not listed in {INDEX}"
    return ""


def _check_files(directory: Path, index: Dict[str, Any], verify_hash: bool) -> None:
    for fname, info in index["files"].items():
        f = directory / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {INDEX} but missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f}: {size} bytes, expected {info['size']} (truncated or overwritten)"
                                  f"{_header_vs_index(f, fname, index)}")
        if verify_hash and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch, the file is corrupted{_diagnose(f, fname, index)}")


def _read_json(directory: Path, name: str) -> Any:
    return read_json_object(directory / name)


def read_quantization_map(directory: PathLike) -> Dict[str, Any]:
    """The quantization map of a checkpoint (version checked: a newer one is refused with a clear error)."""
    path = Path(directory) / QMAP
    qdoc = read_json_object(path, "quantization map")
    if "quantization_map" not in qdoc:
        raise CheckpointError(f"{path}: no 'quantization_map'")
    version = qdoc.get("version", FORMAT_VERSION)
    if not _is_int(version):
        raise CheckpointError(f"{path}: corrupted quantization map: version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: quantization_map version {version} was written by a newer lowbit "
                              f"(this one reads up to {FORMAT_VERSION}); upgrade lowbit")
    if qdoc.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise CheckpointError(f"{path}: format {qdoc.get('format')!r}, expected {FORMAT_NAME!r}")
    qmap = qdoc["quantization_map"]
    if not isinstance(qmap, dict):
        raise CheckpointError(f"{path}: quantization_map must be an object, got {type(qmap).__name__}")
    for name, entry in qmap.items():
        if not isinstance(entry, dict):
            raise CheckpointError(f"{path}: module {name!r}: corrupted entry ({type(entry).__name__})")
    return qmap


def _read_tensors(directory: Path, index: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    by_file: Dict[str, list] = {}
    for name, info in index["tensors"].items():
        by_file.setdefault(info["file"], []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        path = directory / fname
        header, _ = read_safetensors_header(path)
        extra = sorted(set(header) - set(names))
        if extra:
            raise CheckpointError(f"{path}: tensor {extra[0]!r} is not listed in {INDEX}")
        for name in names:
            info = index["tensors"][name]
            if name not in header:
                raise CheckpointError(f"{path}: tensor {name!r} missing")
            dt, shape = header[name]["dtype"], header[name]["shape"]
            want_dt = info["dtype"]
            got_dt = _dtype_name(_DTYPES[dt]) if dt in _DTYPES else dt
            if got_dt != want_dt or list(shape) != list(info["shape"]):
                raise CheckpointError(f"{path}: tensor {name!r} is {got_dt} {list(shape)}, the index says "
                                      f"{want_dt} {list(info['shape'])}")
        out.update(read_safetensors(path, names))
    return out


def _validate_map(model: nn.Module, qmap: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Every map entry names a module of the model, and its QuantStates are present and consistent."""
    from lowbit.model.api import MODULE_CLASSES, _register_optional_classes
    from lowbit.tensor.state import QuantState

    _register_optional_classes()
    if not isinstance(qmap, dict):
        raise CheckpointError(f"{QMAP}: quantization_map must be an object, got {type(qmap).__name__}")
    for name, entry in qmap.items():
        try:
            mod = model.get_submodule(name) if name else model
        except AttributeError:
            raise CheckpointError(f"{QMAP}: module {name!r} is not in the model") from None
        cls_name = entry.get("class") if isinstance(entry, dict) else None
        if cls_name is not None and cls_name.lower() not in MODULE_CLASSES:
            raise CheckpointError(f"{QMAP}: module {name!r} has unknown class {cls_name!r}; "
                                  f"known: {', '.join(MODULE_CLASSES.names())}")
        prefix = f"{name}." if name else ""
        metas = sorted({k[len(prefix):-len(".meta")] for k in tensors
                        if k.startswith(prefix) and k.endswith(".meta") and "." not in k[len(prefix):-len(".meta")]})
        for p in metas:
            key = f"{prefix}{p}"
            sub = {k: v for k, v in tensors.items() if k.startswith(key + ".")}
            try:
                state = QuantState.from_state_dict(sub, key + ".")
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise CheckpointError(f"quantized tensor {key!r}: {msg}") from None
            expected = None
            if hasattr(mod, "param_shape") and p in getattr(mod, "quantized_param_names", lambda: ())():
                expected = tuple(mod.param_shape(p))
            else:
                float_p = getattr(mod, "_parameters", {}).get(p)
                if float_p is not None:
                    expected = tuple(float_p.shape)
                    if isinstance(mod, nn.Conv2d):
                        expected = (expected[0], int(torch.tensor(expected[1:]).prod()))
            if expected is not None and tuple(state.shape) != expected:
                err = CheckpointError(f"quantized tensor {key!r} has shape {tuple(state.shape)}, but module "
                                      f"{name!r} expects {expected}")
                err.tensor = key + ".meta"
                raise err


def load(directory: PathLike, model_factory: Optional[Callable[..., nn.Module]] = None, *,
         device: Union[str, torch.device] = "cpu", verify: bool = True) -> nn.Module:
    """Load a native checkpoint written by :func:`save`.

    Args:
        directory: the checkpoint directory.
        model_factory: builds the float architecture for non-HF models; called with the saved
            ``config`` dict (or with no argument if it takes none), inside
            ``accelerate.init_empty_weights()`` when accelerate is installed, so parameters are not
            allocated twice. HF models are rebuilt from ``config.json`` without it.
        device: where the tensors go.
        verify: check each file's sha256 (sizes are always checked).

    Returns:
        The model in eval mode, with lowbit modules holding the saved QuantStates.

    Raises:
        CheckpointError: incomplete (no marker), truncated or corrupted files, tensors whose dtype or
            shape disagrees with the index, a quantization map naming modules the model lacks or
            whose QuantStates are inconsistent.

    Example::

        >>> model = lowbit.load("out/ckpt")                                          # doctest: +SKIP
        >>> model = lowbit.load("ckpt", model_factory=lambda cfg: MyNet(**cfg))      # doctest: +SKIP
    """
    from lowbit.model.api import requantize

    directory = Path(directory)
    index = read_index(directory)
    _check_files(directory, index, verify)
    qmap = read_quantization_map(directory)
    cfg_file = index.get("model_config")
    cfg = _read_json(directory, cfg_file) if cfg_file else None

    if model_factory is not None:
        model = _call_factory(model_factory, cfg)
    elif cfg_file == HF_CONFIG:
        try:
            model = empty_hf_model(cfg)
        except CheckpointError as e:
            raise CheckpointError(f"{directory / HF_CONFIG}: {e}") from None
        except Exception as e:  # transformers rejecting a damaged config, in any of its ways
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{directory / HF_CONFIG}: cannot build the model from this config "
                                  f"(corrupted?): {msg[:300]}") from None
    else:
        raise CheckpointError(f"{directory}: the checkpoint has no Hugging Face config.json; pass "
                              "model_factory= to build the model (it was saved from "
                              f"{index.get('model_class', 'an unknown class')})")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_factory returned {type(model).__name__}, expected an nn.Module")

    tensors = _read_tensors(directory, index)
    buffer_names = {k for k, info in index["tensors"].items() if info.get("buffer")}
    aliases = index.get("aliases", {})
    for alias, target in aliases.items():
        if target not in tensors:
            raise CheckpointError(f"{INDEX}: alias {alias!r} points to {target!r}, which is not stored")
        tensors[alias] = tensors[target]
    buffers = {k: tensors.pop(k) for k in list(tensors) if k in buffer_names}

    qpath = directory / QMAP
    try:
        _validate_map(model, qmap, tensors)
    except CheckpointError as e:
        msg = str(e)
        if msg.startswith(QMAP + ": "):
            msg = msg[len(QMAP) + 2:]
        tensor = getattr(e, "tensor", None)
        where = directory / index["tensors"][tensor]["file"] if tensor in index["tensors"] else qpath
        raise CheckpointError(f"{where}: {msg}") from None
    _check_float_shapes(directory, index, model, qmap, tensors)
    try:
        model = requantize(model, tensors, qmap, device=device, strict=True)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory}: the tensors do not match the model: {msg}") from None
    for name, t in buffers.items():
        mod_name, _, bname = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise CheckpointError(f"buffer {name!r} belongs to no module of the model") from None
        mod._buffers[bname] = t.to(device)
    _retie(model, aliases)
    return model.eval()


def _check_float_shapes(directory: Path, index: Mapping[str, Any], model: nn.Module, qmap: Mapping[str, Any],
                        tensors: Mapping[str, torch.Tensor]) -> None:
    """Tensors of unquantized modules must have the model's shapes (named with their file, never a
    multi-line ``load_state_dict`` error)."""
    quantized = sorted(qmap, key=len, reverse=True)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    for k, t in tensors.items():
        if any(k.startswith(q + ".") or not q for q in quantized):
            continue
        shape = expected.get(k)
        if shape is not None and tuple(t.shape) != shape:
            f = index["tensors"].get(k, {}).get("file", "?")
            raise CheckpointError(f"{directory / f}: tensor {k!r} has shape {tuple(t.shape)}, but the model "
                                  f"expects {shape}")


def _retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make tied parameters (saved once) the same Parameter object again."""
    for alias, target in aliases.items():
        a_mod, _, a_name = alias.rpartition(".")
        t_mod, _, t_name = target.rpartition(".")
        try:
            am = model.get_submodule(a_mod) if a_mod else model
            tm = model.get_submodule(t_mod) if t_mod else model
        except AttributeError:
            continue
        tp = tm._parameters.get(t_name)
        if tp is not None and a_name in am._parameters:
            am._parameters[a_name] = tp


def _call_factory(factory: Callable[..., nn.Module], cfg: Any) -> nn.Module:
    try:
        n_params = len(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        n_params = 1
    args = (cfg,) if n_params else ()
    from lowbit._deps import available

    if available("accelerate"):
        import accelerate

        with accelerate.init_empty_weights():
            return factory(*args)
    return factory(*args)


# ---------------------------------------------------------------------------------------------
# the export format registry (lowbit.io.registry)


def _write_format(model: nn.Module, path: Path, options) -> Dict[str, Any]:
    p = save(model, path)
    if options.tokenizer is not None:
        options.tokenizer.save_pretrained(str(p))
    from lowbit.io.registry import directory_size

    return {"path": str(p), "bytes": directory_size(p)}


def _detect_format(path: Path) -> bool:
    return Path(path).is_dir() and has_marker(path)


from lowbit.io.registry import register_format  # noqa: E402

register_format("native", write=_write_format, read=load, detect=_detect_format, target="native",
                description="lowbit's own safetensors checkpoint (bit-exact, every scheme)")
