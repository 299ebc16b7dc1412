"""The export formats: one registry of ``write`` / ``read`` / ``detect`` per format name.

Every format module registers itself at its end with one call::

    register_format("gptq", write=_write, read=load_gptq, detect=_detect, target="gptq")

``lowbit quantize --format`` / ``lowbit export --format`` accept every registered name, :func:`write_formats`
writes a model in several of them from the same QuantStates, and :func:`read` loads a checkpoint by asking
each format whether it recognises the path (:func:`detect`), not by its suffix.

A format from outside the package registers the same way (``tests/test_extending.py``)::

    from lowbit.io.registry import register_format
    register_format("my-format", write=my_write, read=my_read, detect=my_detect, target="my-format")

``write(model, path, options)`` writes ``model`` at ``path`` (``directory / target``) and returns a dict for the
report (it may be empty); ``options`` is an :class:`ExportOptions`. ``read(path, **kw)`` returns a model (or
``(model, tokenizer)`` where ``returns_tokenizer``); ``detect(path)`` says True for a path it can read (it must
be cheap and must not raise for foreign paths).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from lowbit._registry import Registry

__all__ = ["Exporter", "ExportOptions", "register_format", "get_format", "format_names", "parse_formats",
           "detect", "read", "write_formats", "EXPORTERS"]

PathLike = Union[str, Path]

#: the modules of the built-in formats; each registers its formats when imported
BUILTIN_MODULES = ("lowbit.io.native", "lowbit.io.gguf", "lowbit.io.compressed_tensors", "lowbit.io.gptq",
                   "lowbit.io.compressed_tensors_sparse")


@dataclass
class ExportOptions:
    """What the writers of one export run share.

    ``from_states``: the model holds lowbit-quantized Linears, so every format is written from the same
    QuantStates (GGUF: the exact blocks where the grid allows, see :func:`lowbit.io.multi.gguf_quant_states`);
    False for a float (or otherwise unquantized) model, which GGUF re-quantizes to ``gguf_requantize_type``.
    """

    tokenizer: Any = None
    from_states: bool = True
    gguf_type: str = "auto"
    gguf_fallback: str = "round_scales"
    gguf_requantize_type: str = "Q4_0"
    tokenizer_pre: Optional[str] = None
    unsupported: str = "error"
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Exporter:
    """A registered format: where it goes in an output directory and how to write, read and recognise it."""

    name: str
    write: Callable[..., Optional[Dict[str, Any]]]
    read: Optional[Callable[..., Any]] = None
    detect: Optional[Callable[[Path], bool]] = None
    target: str = ""
    description: str = ""
    returns_tokenizer: bool = False

    def path(self, directory: PathLike) -> Path:
        return Path(directory) / self.target if self.target else Path(directory)


EXPORTERS: Registry[Exporter] = Registry("export format")
_loaded = False


def _load_builtin() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in BUILTIN_MODULES:
            importlib.import_module(mod)


def register_format(name: str, *, write: Callable, read: Optional[Callable] = None,
                    detect: Optional[Callable[[Path], bool]] = None, target: Optional[str] = None,
                    description: str = "", aliases: tuple = (), overwrite: bool = False,
                    returns_tokenizer: bool = False) -> Exporter:
    """Register an export format under ``name`` (see the module docstring); returns the :class:`Exporter`.

    ``target``: the file or folder name of this format inside an output directory (default: ``name``).
    """
    if not callable(write):
        raise TypeError(f"format {name!r}: write must be callable")
    exp = Exporter(name=name.lower(), write=write, read=read, detect=detect,
                   target=name.lower() if target is None else target, description=description,
                   returns_tokenizer=returns_tokenizer)
    return EXPORTERS.add(name, exp, aliases=aliases, overwrite=overwrite)


def get_format(name: str) -> Exporter:
    _load_builtin()
    return EXPORTERS.get(name)


def format_names() -> List[str]:
    """The registered format names (aliases included), sorted."""
    _load_builtin()
    return EXPORTERS.names()


def parse_formats(spec: Union[str, Sequence[str]]) -> List[str]:
    """``"native,gguf"`` or a list -> the format names, each checked against the registry (the error lists them)."""
    _load_builtin()
    names = [f.strip() for f in spec.split(",")] if isinstance(spec, str) else [str(f).strip() for f in spec]
    names = [f for f in names if f]
    for f in names:
        if f not in EXPORTERS:
            raise ValueError(f"unknown format {f!r}; expected one of {', '.join(EXPORTERS.names())} (comma-separated)")
    return names


def detect(path: PathLike) -> Optional[str]:
    """The name of the registered format that recognises ``path``, or None (a plain Hugging Face folder, a hub
    id, ...). Formats are asked in registration order; the first that says yes wins."""
    _load_builtin()
    p = Path(path)
    seen = set()
    for name in list(EXPORTERS._items):
        exp = EXPORTERS._items[name]
        if id(exp) in seen or exp.detect is None:
            continue
        seen.add(id(exp))
        if exp.detect(p):
            return exp.name
    return None


def read(path: PathLike, **kwargs):
    """Load the checkpoint at ``path`` with the reader of the format :func:`detect` finds."""
    name = detect(path)
    if name is None:
        raise ValueError(f"{str(path)!r} is not a checkpoint of a registered format "
                         f"({', '.join(format_names())})")
    exp = get_format(name)
    if exp.read is None:
        raise ValueError(f"{str(path)!r} is a {name} checkpoint, which lowbit writes but does not read")
    return exp.read(path, **kwargs)


def write_formats(model, directory: PathLike, formats: Union[str, Sequence[str]], *,
                  options: Optional[ExportOptions] = None, root_format: Optional[str] = None) -> Dict[str, Any]:
    """Write ``model`` in every format of ``formats`` under ``directory``; ``{format: report entry}``.

    ``root_format`` (e.g. ``"native"``) is written into ``directory`` itself instead of its target there, and
    first (its writer owns the folder; the others then add their files and folders to it).
    """
    formats = parse_formats(formats)
    if root_format is not None and root_format in formats:
        formats = [root_format] + [f for f in formats if f != root_format]
    options = options or ExportOptions()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {}
    for f in formats:
        exp = get_format(f)
        path = directory if f == root_format else exp.path(directory)
        entry = exp.write(model, path, options) or {}
        report[exp.name] = {"path": str(path), **entry}
    return report


def hf_quantization_config(path: PathLike) -> Optional[Dict[str, Any]]:
    """The ``quantization_config`` of a Hugging Face folder (or its ``quantize_config.json``, GPTQ's older
    place, as ``quant_method: gptq``); None when there is none or it cannot be read (detection never raises)."""
    import json

    p = Path(path)
    cfg_path = p / "config.json"
    if not p.is_dir() or not cfg_path.is_file():
        return None
    try:
        cfg = json.loads(cfg_path.read_text())
        qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
        if qc is None and (p / "quantize_config.json").is_file():
            qc = json.loads((p / "quantize_config.json").read_text())
            if isinstance(qc, dict):
                qc.setdefault("quant_method", "gptq")
    except (OSError, ValueError):
        return None
    return qc if isinstance(qc, dict) else None


def directory_size(p: PathLike) -> int:
    p = Path(p)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
