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
* ``lowbit_index.json``: the marker, written last. It lists every tensor (file, dtype, shape) and
  every file (size, sha256). :func:`save` deletes it before writing anything else, and each file is
  written to a temporary name and renamed, so an interrupted save leaves a directory without a
  marker, which :func:`load` refuses.

:func:`load` checks the marker, the size and sha256 of every file (truncation, corruption), every
tensor's dtype and shape against the index, and the quantization map against the tensors and the
model, naming the offending file, tensor or module.

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
    atomic_write_json,
    dedupe_tensors,
    empty_hf_model,
    hf_config_dict,
    read_safetensors,
    read_safetensors_metadata,
    remove_marker,
    sha256_file,
    write_sharded,
)

__all__ = ["save", "load", "is_checkpoint", "read_index", "CheckpointError", "FORMAT_NAME", "FORMAT_VERSION"]

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
        directory: created if needed; other files in it are left alone.
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
    directory.mkdir(parents=True, exist_ok=True)
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

    remove_marker(directory / INDEX)  # from here on the directory is not a valid checkpoint
    weight_map = write_sharded(directory, tensors, prefix=SHARD_PREFIX, max_shard_size=max_shard_size,
                               metadata={"format": "pt", "producer": FORMAT_NAME}, hf_index=False)
    files = sorted(set(weight_map.values()))
    atomic_write_json(directory / QMAP, {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                         "quantization_map": qmap})
    files.append(QMAP)
    if hf_cfg is not None and config is None:
        atomic_write_json(directory / HF_CONFIG, hf_cfg)
        files.append(HF_CONFIG)
        model_config = HF_CONFIG
    elif config is not None:
        atomic_write_json(directory / USER_CONFIG, dict(config))
        files.append(USER_CONFIG)
        model_config = USER_CONFIG
    else:
        model_config = None
    import lowbit

    index = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "lowbit_version": lowbit.__version__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_config": model_config,
        "tensors": {k: {"file": weight_map[k], "dtype": _dtype_name(t.dtype), "shape": list(t.shape),
                        "buffer": k in buffers} for k, t in tensors.items()},
        "aliases": aliases,
        "files": {f: {"size": (directory / f).stat().st_size, "sha256": sha256_file(directory / f)} for f in files},
    }
    atomic_write_json(directory / INDEX, index)  # the marker: written last
    return directory


# ---------------------------------------------------------------------------------------------
# load


def is_checkpoint(directory: PathLike) -> bool:
    """True when ``directory`` holds a complete native checkpoint (its marker is present and readable)."""
    p = Path(directory) / INDEX
    if not p.is_file():
        return False
    try:
        return json.loads(p.read_text()).get("format") == FORMAT_NAME
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def read_index(directory: PathLike) -> Dict[str, Any]:
    """The parsed marker (``lowbit_index.json``) of a checkpoint; raises :class:`CheckpointError` if absent."""
    directory = Path(directory)
    p = directory / INDEX
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not p.is_file():
        raise CheckpointError(f"{directory} is not a complete lowbit checkpoint: {INDEX} is missing "
                              "(the save was interrupted, or this is not a lowbit native checkpoint)")
    try:
        index = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: corrupted marker ({e})") from None
    if index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{p}: format {index.get('format')!r}, expected {FORMAT_NAME!r}")
    if int(index.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{p}: format version {index['version']} is newer than this lowbit "
                              f"({FORMAT_VERSION}); upgrade lowbit")
    for key in ("tensors", "files"):
        if not isinstance(index.get(key), dict):
            raise CheckpointError(f"{p}: corrupted marker (no {key!r} table)")
    return index


def _check_files(directory: Path, index: Dict[str, Any], verify_hash: bool) -> None:
    for fname, info in index["files"].items():
        f = directory / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in {INDEX} but missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{f}: {size} bytes, expected {info['size']} (truncated or overwritten)")
        if verify_hash and sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: sha256 mismatch, the file is corrupted")


def _read_json(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{directory / name}: unreadable ({e})") from None


def _read_tensors(directory: Path, index: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    by_file: Dict[str, list] = {}
    for name, info in index["tensors"].items():
        by_file.setdefault(info["file"], []).append(name)
    out: Dict[str, torch.Tensor] = {}
    for fname, names in by_file.items():
        if fname not in index["files"]:
            raise CheckpointError(f"{INDEX}: tensor {names[0]!r} is in {fname!r}, which is not a listed file")
        path = directory / fname
        header = read_safetensors_metadata(path)
        for name in names:
            info = index["tensors"][name]
            if name not in header:
                raise CheckpointError(f"{path}: tensor {name!r} missing")
            dt, shape = header[name]
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
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"quantized tensor {key!r}: {e}") from None
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
                raise CheckpointError(f"quantized tensor {key!r} has shape {tuple(state.shape)}, but module "
                                      f"{name!r} expects {expected}")


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
    qdoc = _read_json(directory, QMAP)
    if not isinstance(qdoc, dict) or "quantization_map" not in qdoc:
        raise CheckpointError(f"{directory / QMAP}: no 'quantization_map'")
    qmap = qdoc["quantization_map"]
    cfg_file = index.get("model_config")
    cfg = _read_json(directory, cfg_file) if cfg_file else None

    if model_factory is not None:
        model = _call_factory(model_factory, cfg)
    elif cfg_file == HF_CONFIG:
        model = empty_hf_model(cfg)
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

    _validate_map(model, qmap, tensors)
    try:
        model = requantize(model, tensors, qmap, device=device, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{directory}: the tensors do not match the model: {e}") from None
    for name, t in buffers.items():
        mod_name, _, bname = name.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            raise CheckpointError(f"buffer {name!r} belongs to no module of the model") from None
        mod._buffers[bname] = t.to(device)
    _retie(model, aliases)
    return model.eval()


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
