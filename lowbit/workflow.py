"""The quantize-run workflow behind ``lowbit quantize`` / ``compare`` / ``plan``, as a library.

``quantize_run(model, output, method=..., formats=[...], options={...})`` loads the model, resolves
the method through the method table (:mod:`lowbit.model.methods`: the method's config class checks
every option, an option the method does not use is an error naming the options it takes), applies
the GGUF policy (a ``gguf`` output makes the grid methods target llama.cpp's block grid: the bits,
group size and symmetry actually used are the block type's, announced and recorded), runs the
quality gate, writes the formats (:func:`_write_outputs`) and ``lowbit_run.json``, and returns a
:class:`QuantizeReport` (the CLI only prints it).

Example::

    >>> from lowbit.workflow import quantize_run
    >>> rep = quantize_run("default", "out", method="rtn", options={"bits": 4, "group_size": 64},
    ...                    formats=["native", "gguf"], gguf_type="Q4_0")          # doctest: +SKIP
    >>> rep.used["group_size"], rep.notes                                          # doctest: +SKIP
    (32, ['--format gguf: rtn quantizes onto Q4_0 blocks (4-bit, groups of 32, symmetric); ...'])
"""
from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# K-quant types and llama.cpp's mixtures (lowbit.formats.kquants, lowbit.io.gguf_recipes)
GGUF_K_TARGETS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                  "Q5_K_S", "Q5_K_M")
GGUF_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *GGUF_K_TARGETS)
_GGUF_INT_EXACT = ("Q4_0", "Q8_0")  # block types with an exact integer (GPTQ / compressed-tensors) form
#: (bits, group size, symmetric) of each GGUF block type: what a method targeting it actually uses
#: (K-quants: the sub-block; the mixtures mix several types, recorded as None)
GGUF_GRIDS = {"Q4_0": (4, 32, True), "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
              "Q8_0": (8, 32, True), "Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False),
              "Q5_K": (5, 32, False), "Q6_K": (6, 16, True)}
#: the calibration / calibrated-pipeline options (used by calibrated methods only)
CALIBRATION_KEYS = ("calib_dataset", "n_samples", "seq_len", "seed")
PIPELINE_KEYS = ("max_memory", "micro_batch", "checkpoint", "resume", "no_checkpoint")
#: config fields that are inputs of the run, not options a user picks
_NOT_OPTIONS = ("include", "exclude", "device", "progress", "tokenizer", "calib_loader", "offload_dir",
                "checkpoint_dir", "pipeline", "batch_size") + CALIBRATION_KEYS + PIPELINE_KEYS


class WorkflowError(ValueError):
    """A user error in a workflow request (the CLI prints it as one line, exit code 2)."""


@dataclass
class QuantizeReport:
    """What one quantize run did (also written to ``lowbit_run.json``, see :attr:`meta`)."""

    output: Path
    method: str
    formats: List[str]
    #: bits / group_size / sym actually used (the GGUF block type's when the method targeted it)
    used: Dict[str, Any]
    seconds: float
    prediction: Dict[str, Any]
    meta: Dict[str, Any]
    #: announcements: options overridden by the format, weights kept as GGUF blocks, unusual group sizes
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    gate_failed: List[str] = field(default_factory=list)
    gguf_summary: Optional[str] = None
    gguf_kept: List[str] = field(default_factory=list)

    @property
    def gate_passed(self) -> bool:
        return not self.gate_failed


# ---------------------------------------------------------------------------------------------
# the method table, read once


def method_entry(method: str):
    """The method-table entry of ``method`` (an unknown name is a :class:`WorkflowError` listing them)."""
    from lowbit.model.methods import METHODS, list_methods

    if not isinstance(method, str) or method.lower() not in METHODS:
        raise WorkflowError(f"unknown method {method!r}; available: {', '.join(list_methods())}")
    return METHODS.get(method)


def _accepted(entry) -> Tuple[str, ...]:
    return tuple(entry.accepted_keys())


def _fixed(entry, key: str) -> Any:
    """A grid value a method fixes (nf4's 4 bits, int4's asymmetry), or None."""
    if entry.config_cls is None or key in entry.accepted_keys():
        return None
    try:
        default = entry.config_cls()
    except (TypeError, ValueError):
        return None
    return grid_of(default).get(key)


def grid_of(cfg: Any) -> Dict[str, Any]:
    """``{"bits", "group_size", "sym"}`` a method config quantizes with (None where it has none)."""
    from lowbit.config import Bnb4bitConfig, CastConfig, Fp32Config, _QTypeConfig

    if cfg is None:
        return {"bits": None, "group_size": None, "sym": None}
    if isinstance(cfg, Bnb4bitConfig):
        return {"bits": 4, "group_size": cfg.block_size, "sym": True}
    if isinstance(cfg, _QTypeConfig):
        return {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.bits == 8}
    if isinstance(cfg, Fp32Config):
        return {"bits": 32, "group_size": None, "sym": None}
    if isinstance(cfg, CastConfig):
        return {"bits": 16, "group_size": None, "sym": None}
    return {k: getattr(cfg, k, None) for k in ("bits", "group_size", "sym")}


def _spell(keys: Sequence[str], spelling: Optional[Dict[str, str]]) -> str:
    return ", ".join((spelling or {}).get(k, k) for k in keys)


def check_options(method: str, options: Dict[str, Any], spelling: Optional[Dict[str, str]] = None):
    """Validate ``options`` (only those the user gave) against ``method``'s table entry.

    Returns ``(entry, config_kwargs)``. An option the method does not use raises
    :class:`WorkflowError` naming the method and the options it takes; an option equal to a value
    the method fixes (``bits=4`` for nf4) is accepted. ``spelling`` maps option keys to the names
    the user wrote them with (CLI flags) for the messages.
    """
    entry = method_entry(method)
    accepted = _accepted(entry)
    kwargs: Dict[str, Any] = {}
    bad = []
    for key, value in options.items():
        if key in CALIBRATION_KEYS + PIPELINE_KEYS and not entry.calibrated:
            bad.append(key)
        elif key in PIPELINE_KEYS and "micro_batch" not in accepted:
            bad.append(key)
        elif key in PIPELINE_KEYS or (key in CALIBRATION_KEYS and entry.calibrated):
            kwargs[key] = value  # the workflow turns them into the method's inputs
        elif key in accepted:
            kwargs[key] = value
        elif key in ("bits", "group_size", "sym") and _fixed(entry, key) is not None and _fixed(entry, key) == value:
            continue  # the value the method fixes anyway
        else:
            bad.append(key)
    if bad:
        takes = [k for k in accepted if k not in _NOT_OPTIONS]
        if entry.calibrated:
            takes += [k for k in CALIBRATION_KEYS if k not in takes]
            if "micro_batch" in accepted:
                takes += [k for k in PIPELINE_KEYS if k not in takes]
        if spelling:
            takes = [k for k in takes if k in spelling]
        fixed = {k: _fixed(entry, k) for k in ("bits", "group_size", "sym") if _fixed(entry, k) is not None}
        why = f" (it fixes {', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else ""
        if not entry.calibrated and any(k in CALIBRATION_KEYS + PIPELINE_KEYS for k in bad):
            why += " (it needs no calibration data)"
        shown = repr(method) if method.lower() == entry.name else f"{method!r} ({entry.name})"
        raise WorkflowError(f"method {shown} does not use {_spell(bad, spelling)}{why}; "
                            f"it takes: {_spell(takes, spelling) or 'no options'}")
    return entry, kwargs


# ---------------------------------------------------------------------------------------------
# loading


def load(spec: str, device: str = "cpu", dtype=None, gguf_types: Optional[Sequence[str]] = None):
    """``(model, tokenizer, kept)``: whatever a registered format recognises (:func:`lowbit.io.registry.detect`:
    a lowbit native directory, a ``.gguf`` file -- with ``gguf_types``, those tensors are kept as the file's own
    blocks, listed in ``kept`` --, a GPTQ / AWQ / compressed-tensors folder), or anything
    :func:`lowbit.model.loading.load_model` takes."""
    import torch

    from lowbit.io.registry import detect, get_format
    from lowbit.model.loading import load_model

    path = Path(spec)
    fmt = detect(path)  # by content (a damaged native marker too: its reader says what is wrong), not suffix
    if fmt == "gguf" and not gguf_types:  # a GGUF as a float model (the converted-model cache)
        fmt = None
    if fmt is not None:
        exp = get_format(fmt)
        if exp.returns_tokenizer:
            model, tok = exp.read(path, types=gguf_types, dtype=dtype or torch.float32, device=device)
            kept = list(getattr(model, "_lowbit_gguf_kept", None) or [])
            if hasattr(model, "_lowbit_gguf_kept"):
                del model._lowbit_gguf_kept  # carried in the report from here on
            return model, tok, kept
        return exp.read(path).to(device), _tokenizer_for(path), []
    model, tok = load_model(spec, dtype=dtype or torch.float32, device=device)
    return model, tok, []


def _tokenizer_for(path: Path):
    from lowbit._deps import require

    transformers = require("transformers", "tokenizers for evaluation")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the GGUF policy


def gguf_target(method: str, formats: Sequence[str], gguf_type: str) -> Optional[str]:
    """The GGUF block type the quantizer must target (``formats`` includes gguf), else None.

    With gguf and an integer format (compressed-tensors, gptq) in one run, the weights must be
    exact in both: only Q4_0 / Q8_0 blocks (symmetric groups of 32, fp16 scales) are.
    """
    if "gguf" not in formats:
        return None
    t = gguf_type.upper()
    others = [f for f in formats if f in ("compressed-tensors", "gptq")]
    if others and t not in _GGUF_INT_EXACT and targets_gguf_grid(method):
        raise WorkflowError(f"--format {','.join(formats)} with --gguf-type {t}: {t} blocks have no exact "
                            f"{'/'.join(others)} form (fractional zero point or 5-bit codes); use --gguf-type "
                            f"Q4_0 or Q8_0 to write them from the same weights, or write {t} in a separate run")
    return t


def targets_gguf_grid(method: str) -> bool:
    """The method can optimise for a GGUF block grid (its config takes ``gguf_type``)."""
    from lowbit.model.methods import METHODS

    return method.lower() in METHODS and "gguf_type" in METHODS.get(method).accepted_keys()


def gguf_linear_types(model, gguf_type: str) -> Dict[str, str]:
    """``{linear name: GGUF type}`` that ``export_gguf(model, ..., gguf_type)`` writes (llama.cpp's recipe
    and per-tensor fallbacks), for the quantizer's per-linear ``gguf_type``."""
    from torch import nn

    from lowbit.io.gguf import FLOAT_TYPES, gguf_tensor_plan

    mods = dict(model.named_modules())
    return {n[: -len(".weight")]: t for n, (_, t) in gguf_tensor_plan(model, gguf_type).items()
            if n.endswith(".weight") and isinstance(mods.get(n[: -len(".weight")]), nn.Linear) and t not in FLOAT_TYPES}


def _gguf_override(name: str, target: str, given: Dict[str, Any], entry) -> Tuple[Dict[str, Any], List[str]]:
    """The grid a method targeting GGUF ``target`` uses, and the announcement of what it replaces."""
    bits, group, sym = GGUF_GRIDS.get(target, (None, None, None))
    used = {"bits": bits, "group_size": group, "sym": sym}
    replaced = [k for k in ("bits", "group_size", "sym") if k in given and given[k] != used[k]]
    what = (f"{bits}-bit, groups of {group}, {'symmetric' if sym else 'with a zero point'}" if bits
            else "llama.cpp's mixture of K-quant types")
    note = f"--format gguf: {name} quantizes onto {target} blocks ({what})"
    if replaced:
        note += f"; replaces {', '.join(f'{k}={given[k]}' for k in replaced)}"
    return used, [note]


# ---------------------------------------------------------------------------------------------
# applying a method


def apply_method(model, tok, method: str, options: Optional[Dict[str, Any]] = None, *, device: str = "cpu",
                 progress: bool = True, formats: Sequence[str] = (), gguf_type: str = "Q4_0",
                 output: Optional[Path] = None, gguf_kept: Sequence[str] = (),
                 log: Callable[[str], None] = lambda s: None) -> Tuple[Any, float, Dict[str, Any]]:
    """Quantize ``model`` in place with ``method`` and the user's ``options``; ``(model, seconds, info)``.

    ``info``: ``used`` (bits / group size / sym actually used), ``config`` (the method config as a
    dict), ``notes`` (announcements). Calibrated methods get their calibration tokens from
    ``options["calib_dataset"]`` (default ``"default"``), tokenized with ``tok``.
    """
    import lowbit
    from lowbit.model.api import freeze

    options = dict(options or {})
    entry, kwargs = check_options(method, options)
    name = entry.name
    notes: List[str] = []
    t0 = time.perf_counter()
    if not entry.quantized and name == "fp32":
        return model, 0.0, {"used": grid_of(entry.make_config()), "config": {"method": name}, "notes": notes}
    if gguf_kept:
        from torch import nn

        notes.append(f"{len(gguf_kept)} weights kept as the GGUF file's own blocks (no float round trip)")
        log(notes[-1])
        if name == "rtn" and not any(type(m) is nn.Linear for n, m in model.named_modules()
                                     if not n.endswith("lm_head")):
            freeze(model)
            cfg = entry.make_config(**{k: v for k, v in kwargs.items() if k not in PIPELINE_KEYS})
            return model, time.perf_counter() - t0, {"used": grid_of(cfg), "config": _cfg_dict(cfg), "notes": notes}
    call = {k: v for k, v in kwargs.items() if k not in CALIBRATION_KEYS + PIPELINE_KEYS}
    if entry.calibrated:
        from lowbit.data.calibration import get_calibration_data

        defaults = entry.config_cls() if entry.config_cls is not None else None
        dflt = (lambda k, v: getattr(defaults, k, v)) if defaults is not None else (lambda k, v: v)
        call["calib_dataset"] = get_calibration_data(
            tok, kwargs.get("calib_dataset") or "default", n_samples=kwargs.get("n_samples", dflt("n_samples", 128)),
            seq_len=kwargs.get("seq_len", dflt("seq_len", 512)), seed=kwargs.get("seed", dflt("seed", 0)))
    if entry.takes_device:
        call["progress"] = progress
        call["device"] = device
    used_override = None
    target = gguf_target(name, formats, gguf_type)
    if target is not None and targets_gguf_grid(name):
        used_override, override_notes = _gguf_override(name, target, options, entry)
        if target in GGUF_K_TARGETS and name == "rtn":
            notes.extend(override_notes)
            log(f"rtn: {target} is written with llama.cpp's reference K-quant rounding at export")
            cfg = entry.make_config(**call)
            return model, time.perf_counter() - t0, {"used": used_override, "config": _cfg_dict(cfg),
                                                     "notes": notes, "requested": _requested(options)}
        if target in GGUF_K_TARGETS and name not in ("gptq", "awq"):
            raise WorkflowError(f"--method {name} with --gguf-type {target}: {name.upper()} onto K-quant grids is not "
                                f"available; use --method gptq or awq (error-compensated K-quants), --method rtn "
                                f"(llama.cpp's reference rounding) or a legacy type (Q4_0 ... Q8_0)")
        if target in GGUF_K_TARGETS:  # GPTQ / AWQ onto each linear's type in llama.cpp's per-tensor choice
            call["gguf_type"] = gguf_linear_types(model, target)
            notes.extend(override_notes)
            log(f"{name}: optimising for the GGUF {target} per-tensor types "
                f"({', '.join(sorted(set(call['gguf_type'].values())))})")
        else:  # error-compensated GGUF: the method optimises for the exact llama.cpp block grid
            call["gguf_type"] = target
            notes.extend(override_notes)
            log(f"{name}: optimising for the GGUF {target} block grid (blocks of 32)")
    if "micro_batch" in entry.accepted_keys():  # calibration memory and resume
        if kwargs.get("max_memory") is not None:
            call["max_memory"] = kwargs["max_memory"]
        if kwargs.get("micro_batch") is not None:
            call["micro_batch"] = kwargs["micro_batch"]
        staged = any(kwargs.get(k) for k in ("max_memory", "micro_batch", "resume", "checkpoint"))
        if staged and output is not None and not kwargs.get("no_checkpoint"):
            call["checkpoint_dir"] = str(Path(output) / ".lowbit-checkpoint")
            call["resume"] = bool(kwargs.get("resume"))
    try:
        cfg = entry.make_config(**call)
    except (TypeError, ValueError) as e:
        raise WorkflowError(str(e)) from None
    model = lowbit.quantize(model, method=name, **({"config": cfg} if cfg is not None else call))
    freeze(model)
    info = {"used": used_override or grid_of(cfg), "config": _cfg_dict(cfg), "notes": notes}
    if used_override is not None:
        info["requested"] = _requested(options)
    return model, time.perf_counter() - t0, info


def _requested(options: Dict[str, Any]) -> Dict[str, Any]:
    return {k: options[k] for k in ("bits", "group_size", "sym") if k in options}


def _cfg_dict(cfg) -> Dict[str, Any]:
    return cfg.to_dict() if cfg is not None else {}


def group_size_notes(method: str, used: Dict[str, Any], options: Dict[str, Any]) -> List[str]:
    """A group size much smaller than 32, or not a multiple of 8, is announced (scales cost bits)."""
    gs = options.get("group_size")
    if gs is None or gs <= 0 or not (gs % 8 or gs < 16) or used.get("group_size") != gs:
        return []
    bits = used.get("bits") or 4
    zero = "" if used.get("sym", True) else " and zero point"
    return [f"--group-size {gs} for {method}: every group of {gs} weights stores its own scale{zero}, so the "
            f"{bits}-bit model takes several more bits per weight, and sizes that are not a multiple of 8 have no "
            f"packed kernels; usual sizes: 32, 64, 128"]


def plan_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """Arguments of :func:`lowbit.model.plan.plan` for ``method`` with ``options`` (the config's defaults
    for the ones not given)."""
    entry, kwargs = check_options(method, options)
    cfg_kwargs = {k: v for k, v in kwargs.items() if k not in CALIBRATION_KEYS + PIPELINE_KEYS}
    try:
        cfg = entry.make_config(**cfg_kwargs)
    except (TypeError, ValueError) as e:
        raise WorkflowError(str(e)) from None
    used = grid_of(cfg)
    defaults = entry.config_cls() if entry.config_cls is not None else None
    return {"bits": used["bits"] or 4, "group_size": used["group_size"],
            "n_samples": kwargs.get("n_samples", getattr(defaults, "n_samples", 128)),
            "seq_len": kwargs.get("seq_len", getattr(defaults, "seq_len", 512))}


# ---------------------------------------------------------------------------------------------
# writing


def _write_outputs(model, tok, out: Path, formats: Sequence[str], gguf_type: str = "Q4_0",
                   log: Callable[[str], None] = lambda s: None) -> Tuple[List[str], Optional[str]]:
    """Write ``model`` in ``formats`` under ``out`` through the format registry
    (:func:`lowbit.io.registry.write_formats`; the native checkpoint goes into ``out`` itself);
    ``(formats written, GGUF treatment summary or None)``."""
    from lowbit.io._affine import quantized_linears
    from lowbit.io.registry import ExportOptions, write_formats

    # a quantized model: every format from the same QuantStates
    options = ExportOptions(tokenizer=tok, from_states=bool(quantized_linears(model)), gguf_type="auto",
                            gguf_fallback="requantize", gguf_requantize_type=gguf_type, unsupported="error")
    report = write_formats(model, out, formats, options=options, root_format="native")
    summary = None
    if "gguf" in report and "summary" in report["gguf"]:
        summary = report["gguf"]["summary"]
        log(f"gguf: {summary} (how each quantized weight was written)")
    return list(formats), summary


def export_model(spec: str, out: Path, formats: Sequence[str], gguf_type: str = "Q4_0", device: str = "cpu",
                 log: Callable[[str], None] = lambda s: None) -> List[str]:
    """``lowbit export``: re-write a checkpoint in ``formats``."""
    model, tok, _ = load(spec, device=device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, _ = _write_outputs(model, tok, out, formats, gguf_type, log)
    return written


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Evaluation:
    """How the quality gate measures: text (``"default"``, a path, a dataset name), windows."""

    text: Any = "default"
    seq_len: int = 512
    max_windows: int = 48
    progress: bool = True

    def ppl(self, model, tok) -> float:
        from lowbit.eval.perplexity import perplexity

        res = perplexity(model, tok, text=self.text, seq_len=self.seq_len, max_windows=self.max_windows,
                         progress=self.progress)
        return float(res.ppl)


def size_report(model) -> Dict[str, float]:
    from lowbit.eval.size import bits_per_weight, model_size_bytes

    return {"size_mb": model_size_bytes(model) / 2 ** 20, "bits_per_weight": bits_per_weight(model)}


def check_formats(formats: Sequence[str]) -> List[str]:
    """The format names, each checked against the registry (:func:`lowbit.io.registry.parse_formats`)."""
    from lowbit.io.registry import parse_formats

    try:
        return parse_formats(list(formats))
    except ValueError as e:
        raise WorkflowError(str(e)) from None


def quantize_run(model: str, output, method: str = "gptq", formats: Sequence[str] = ("native",),
                 options: Optional[Dict[str, Any]] = None, *, gguf_type: str = "Q4_0",
                 max_ppl_increase: Optional[float] = None, max_kld: Optional[float] = None,
                 evaluation: Optional[Evaluation] = None, device: str = "cpu", progress: bool = True,
                 log: Callable[[str], None] = lambda s: None, write: bool = True) -> QuantizeReport:
    """Load ``model``, quantize it with ``method`` and the user's ``options``, gate, write ``formats``
    and ``lowbit_run.json`` under ``output``; returns the :class:`QuantizeReport`.

    ``options``: only the options the user gave (config keys of the method, plus ``calib_dataset``,
    ``n_samples``, ``seq_len``, ``seed`` for calibrated methods and ``max_memory``, ``micro_batch``,
    ``checkpoint``, ``resume``, ``no_checkpoint`` for the calibrated pipeline); the method's config
    supplies the rest. ``write=False``: quantize only (a non-zero rank of a data-parallel run).
    """
    from lowbit.io.gguf import BLOCK_IMPORT_TYPES
    from lowbit.model.plan import measure_peak_rss, plan

    options = dict(options or {})
    formats = check_formats(formats)
    out = Path(output)
    evaluation = evaluation or Evaluation(progress=progress)
    entry, _ = check_options(method, options)
    target = gguf_target(method, formats, gguf_type)
    # RTN onto the GGUF type a .gguf input already holds: keep those blocks as they are
    keep = (target,) if target in BLOCK_IMPORT_TYPES and entry.name == "rtn" else None
    qmodel, tok, kept = load(model, device=device, gguf_types=keep)
    popts = plan_options(method, options)
    prediction = plan(qmodel, method, bits=popts["bits"], group_size=popts["group_size"],
                      n_samples=popts["n_samples"], seq_len=popts["seq_len"],
                      max_memory=options.get("max_memory"), micro_batch=options.get("micro_batch"),
                      source="gguf" if str(model) == "default" or str(model).endswith(".gguf") else None)
    need_gate = max_ppl_increase is not None or max_kld is not None
    ref_ppl = None
    ref_model = None
    if need_gate:
        ref_ppl = evaluation.ppl(qmodel, tok)
        if max_kld is not None:
            ref_model = copy.deepcopy(qmodel)
    log(f"quantizing {model} with {method} ...")
    qmodel, seconds, info = apply_method(qmodel, tok, method, options, device=device, progress=progress,
                                         formats=formats, gguf_type=gguf_type, output=out, gguf_kept=kept, log=log)
    notes = list(info["notes"])
    for n in notes:
        if n.startswith("--format gguf"):
            log(n)
    warnings = group_size_notes(method, info["used"], options)
    used = info["used"]
    meta: Dict[str, Any] = {"model": model, "method": method, "bits": used["bits"], "group_size": used["group_size"],
                            "sym": used["sym"], "quantize_seconds": seconds, **size_report(qmodel),
                            "predicted": prediction,
                            "measured": {"peak_rss_mb": measure_peak_rss() / 2 ** 20, "seconds": seconds}}
    if "requested" in info and info["requested"]:
        meta["requested"] = info["requested"]
    if info["config"]:
        meta["config"] = info["config"]
    if notes:
        meta["notes"] = notes
    report = QuantizeReport(output=out, method=method, formats=[], used=used, seconds=seconds,
                            prediction=prediction, meta=meta, notes=notes, warnings=warnings, gguf_kept=kept)
    if not write:
        return report
    gate_failed = report.gate_failed
    if need_gate:
        q_ppl = evaluation.ppl(qmodel, tok)
        meta.update({"ppl_float": ref_ppl, "ppl": q_ppl, "ppl_increase": q_ppl - ref_ppl})
        if max_ppl_increase is not None and q_ppl - ref_ppl > max_ppl_increase:
            gate_failed.append(f"perplexity increase {q_ppl - ref_ppl:.3f} > {max_ppl_increase}")
        if max_kld is not None:
            from lowbit.eval.divergence import kl_divergence

            kl = kl_divergence(ref_model, qmodel, tokenizer=tok, text=evaluation.text, seq_len=evaluation.seq_len,
                               max_windows=evaluation.max_windows)
            meta.update({"kld_mean": kl["kld_mean"], "kld_p99": kl["kld_p99"], "top1_agreement": kl["top1_agreement"]})
            if kl["kld_mean"] > max_kld:
                gate_failed.append(f"mean KL divergence {kl['kld_mean']:.4f} > {max_kld}")
    meta["quality_gate"] = "failed: " + "; ".join(gate_failed) if gate_failed else ("passed" if need_gate else "not run")
    written, summary = _write_outputs(qmodel, tok, out, formats, gguf_type, log)
    report.formats = written
    report.gguf_summary = summary
    meta["formats"] = written
    if "gguf" in written:
        meta["gguf_type"] = gguf_type
        meta["gguf_weights"] = summary or "requantized from float"
    from lowbit.eval.size import dir_size_bytes

    if warnings:
        gs = options["group_size"]
        report.warnings.append(f"--group-size {gs}: the model takes {meta['bits_per_weight']:.2f} bits/weight")
    meta["output_size_mb"] = dir_size_bytes(out) / 2 ** 20
    tmp = out / "lowbit_run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, out / "lowbit_run.json")
    return report


# ---------------------------------------------------------------------------------------------
# mixed precision by budget


def quantize_budget(model: str, output, formats: Sequence[str], *, bits_budget: Optional[float] = None,
                    size_budget: Any = None, budget_types: Optional[str] = None, calib_dataset: Any = None,
                    n_samples: int = 128, seq_len: int = 512, seed: int = 0, device: str = "cpu",
                    budget_method: str = "rtn", log: Callable[[str], None] = lambda s: None) -> Dict[str, Any]:
    """``quantize --bits-budget/--size-budget``: per-weight types by knapsack (lowbit.model.budget);
    ``budget_method``: ``"rtn"`` (llama.cpp's reference rounding per type) or ``"gptq"`` (each weight
    GPTQ-solved onto its planned type on its input Hessian; GGUF only)."""
    import torch

    from lowbit.model import budget as bud

    formats = list(formats)
    if bits_budget is not None and size_budget is not None:
        raise WorkflowError("give one of --bits-budget and --size-budget, not both")
    if formats not in (["gguf"], ["native"]):
        raise WorkflowError(f"--bits-budget/--size-budget write one format: --format gguf or --format native "
                            f"(got {formats})")
    if budget_types:
        cands = tuple(t.strip() for t in budget_types.split(",") if t.strip())
        cands = tuple(t.lower() if t.lower().startswith("int") else t.upper() for t in cands)
    else:
        cands = bud.GGUF_CANDIDATES if formats == ["gguf"] else bud.NATIVE_CANDIDATES
    if formats == ["gguf"] and any(t.startswith("int") for t in cands):
        raise WorkflowError(f"--budget-types {','.join(cands)}: GGUF files hold GGUF block types (Q2_K ... Q8_0)")
    if formats == ["native"] and not all(t.startswith("int") for t in cands):
        raise WorkflowError(f"--budget-types {','.join(cands)}: the native format takes int2,int3,int4,int8")
    if budget_method not in ("rtn", "gptq"):
        raise WorkflowError(f"--budget-method {budget_method!r}: expected rtn or gptq")
    if budget_method == "gptq" and formats != ["gguf"]:
        raise WorkflowError("--budget-method gptq writes GGUF block types: use --format gguf")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    from lowbit.data.calibration import get_calibration_data

    t0 = time.perf_counter()
    qmodel, tok, _ = load(model, device=device)
    calib = get_calibration_data(tok, calib_dataset or "default", n_samples=n_samples, seq_len=seq_len, seed=seed)
    log(f"budget: measuring the sensitivity of every weight to {', '.join(cands)} on {calib.shape[0]} windows")
    try:
        H = bud.input_hessians(qmodel, calib)
        bplan = bud.budget_plan(qmodel, calib, bits_budget=bits_budget, size_budget=size_budget, candidates=cands,
                                hessians=H)
    except ValueError as e:
        raise WorkflowError(str(e)) from None
    if budget_method == "gptq":  # each weight GPTQ-solved onto its planned type on the same input Hessians
        bplan.method = "gptq"
        states = bud.gptq_plan_states(qmodel, bplan, H)
    else:
        states = bud.plan_quant_states(qmodel, bplan)
    del H
    plan_path = bplan.save(out / "budget_plan.json")
    if formats == ["gguf"]:
        from lowbit.io.gguf import export_gguf

        export_gguf(qmodel, out / "model.gguf", gguf_type="Q8_0", tokenizer=tok, quant_states=states)
    else:
        from lowbit.io.native import save
        from lowbit.nn import QLinear

        for name, st in states.items():
            mod_name = name[: -len(".weight")]
            mod = qmodel.get_submodule(mod_name) if not name.startswith("model.embed_tokens") else None
            if mod is None or type(mod) is not torch.nn.Linear:
                continue
            parent, _, child = mod_name.rpartition(".")
            setattr(qmodel.get_submodule(parent) if parent else qmodel, child, QLinear.from_quant_state(mod, st))
        save(qmodel, out)
        if tok is not None:
            tok.save_pretrained(str(out))
    return {"plan": bplan, "plan_path": plan_path, "output": out, "seconds": time.perf_counter() - t0,
            "formats": formats}


__all__ = ["quantize_run", "quantize_budget", "apply_method", "check_options", "load", "QuantizeReport",
           "Evaluation", "WorkflowError", "GGUF_TYPES", "GGUF_GRIDS", "export_model"]
