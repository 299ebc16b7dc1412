"""The ``lowbit`` command line: argument parsing only; every subcommand calls the public API.

Subcommands: quantize, eval, compare, plan, inspect, verify, export, convert, bench, cache. Exit codes: 0 ok,
2 bad input (one-line reason on stderr), 3 a quality gate (--max-ppl-increase / --max-kld) failed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE = 0, 2, 3

# CLI method names -> (dispatcher method, how bits/group map onto its config)
WEIGHT_ONLY_PTQ = ("rtn", "awq", "gptq", "hqq")
CALIBRATED = ("awq", "gptq")


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


def _log(args, msg: str) -> None:
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# shared helpers (thin wrappers over the API)


def _device(args) -> str:
    """The ``--device`` option: ``cpu``, ``cuda``/``cuda:N``, or ``auto`` (CUDA when available)."""
    import torch

    dev = getattr(args, "device", None) or "cpu"
    if dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(dev)
    except RuntimeError as e:
        raise CLIError(f"--device {dev!r}: {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {dev!r}: CUDA is not available on this machine (use --device cpu)")
    if d.type not in ("cpu", "cuda"):
        raise CLIError(f"--device {dev!r}: expected cpu, cuda, cuda:N or auto")
    return dev


def _load(spec: str, args=None, dtype=None, gguf_types=None):
    """``(model, tokenizer)``; a ``.gguf`` file with ``gguf_types`` keeps those tensors as the file's
    blocks in lowbit modules (no float round trip), see :func:`lowbit.io.gguf.load_gguf_model`."""
    import torch

    from lowbit.model.loading import load_model

    device = _device(args) if args is not None else "cpu"
    path = Path(spec)
    if gguf_types and path.is_file() and path.suffix.lower() == ".gguf":
        from lowbit.io.gguf import load_gguf_model

        return load_gguf_model(path, types=gguf_types, dtype=dtype or torch.float32, device=device)
    if path.is_dir() and _is_native(path):  # a damaged marker too: load() says what is wrong
        from lowbit.io.native import load

        model = load(path).to(device)
        tok = _tokenizer_for(path)
        return model, tok
    return load_model(spec, dtype=dtype or torch.float32, device=device)


def _is_native(path: Path) -> bool:
    from lowbit.io import native

    return native.has_marker(path)


def _tokenizer_for(path: Path):
    from lowbit._deps import require

    transformers = require("transformers", "tokenizers for evaluation")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError):
        return None


def _eval_text(args) -> Any:
    return args.dataset if getattr(args, "dataset", None) else "default"


def _ppl(model, tok, args) -> float:
    from lowbit.eval.perplexity import perplexity

    res = perplexity(model, tok, text=_eval_text(args), seq_len=args.seq_len, max_windows=args.max_windows,
                     progress=not (args.quiet or args.json))
    return float(res.ppl)


def _method_call(method: str, args) -> Dict[str, Any]:
    """Dispatcher name and keyword config for a CLI method."""
    m = method.lower()
    bits = getattr(args, "bits", 4)
    gs = getattr(args, "group_size", 128)
    if m in ("fp32", "float", "none"):
        return {"method": None}
    if m in ("fp16", "bf16"):
        return {"method": m}
    if m in ("nf4", "fp4", "bnb-nf4", "bnb-fp4"):
        return {"method": "bnb-" + m.replace("bnb-", ""), "block_size": getattr(args, "block_size", None) or 64,
                "double_quant": getattr(args, "double_quant", False)}
    if m in ("int8", "int4", "int2", "fp8"):
        qt = {"int8": "qint8", "int4": "qint4", "int2": "qint2", "fp8": "qfloat8"}[m]
        cfg = {"method": "quanto", "weights": qt}
        if m in ("int4", "int2"):
            cfg["group_size"] = gs if gs and gs > 0 else None
        return cfg
    if m in WEIGHT_ONLY_PTQ:
        cfg = {"method": m, "bits": bits, "group_size": gs, "sym": not getattr(args, "asym", False)}
        return cfg
    from lowbit.model.methods import METHODS

    if m not in METHODS:
        names = sorted({"fp32", "int8", "int4", "int2", "fp8", *METHODS.names()})
        raise CLIError(f"unknown method {method!r}; available: {', '.join(names)}")
    return {"method": m}


def _check_group_size(args, methods: List[str]) -> None:
    """``--group-size``: -1 (per output channel) or a positive size; an unusual size is announced.

    A group stores its own scale (and zero point): groups much smaller than 32, or sizes that are not
    a multiple of 8, cost many bits per weight and have no packed form in GPTQ/GGUF runtimes.
    """
    gs = getattr(args, "group_size", None)
    if gs is None:
        return
    uses = [m for m in methods if m.lower() in (*WEIGHT_ONLY_PTQ, "int4", "int2")]
    if gs == 0 or gs < -1:
        raise CLIError(f"--group-size {gs}: expected -1 (one group per output channel) or a positive size "
                       f"such as 32, 64 or 128")
    if uses and gs > 0 and (gs % 8 or gs < 16):
        bits = 8 if any(m.lower() == "int8" for m in uses) else getattr(args, "bits", 4)
        print(f"lowbit: warning: --group-size {gs} for {','.join(uses)}: every group of {gs} weights stores "
              f"its own scale{'' if not getattr(args, 'asym', False) else ' and zero point'}, so the {bits}-bit "
              f"model takes several more bits per weight, and sizes that are not a multiple of 8 have no packed "
              f"kernels; usual sizes: 32, 64, 128", file=sys.stderr, flush=True)


def _apply_method(model, tok, method: str, args):
    """Quantize ``model`` in place with the CLI method; returns (model, seconds)."""
    import lowbit
    from lowbit.model.api import freeze

    call = _method_call(method, args)
    name = call.pop("method")
    t0 = time.perf_counter()
    if name is None:
        return model, 0.0
    kept = getattr(model, "_lowbit_gguf_kept", None)
    if kept:
        from torch import nn

        _log(args, f"{len(kept)} weights kept as the GGUF file's own blocks (no float round trip)")
        if name == "rtn" and not any(type(m) is nn.Linear for n, m in model.named_modules()
                                     if not n.endswith("lm_head")):
            freeze(model)
            return model, time.perf_counter() - t0
    from lowbit.model.methods import METHODS

    table_calibrated = name not in WEIGHT_ONLY_PTQ and name in METHODS and METHODS.get(name).calibrated
    if name in CALIBRATED or table_calibrated:
        from lowbit.data.calibration import get_calibration_data

        call["calib_dataset"] = get_calibration_data(tok, args.calib_dataset or "default",
                                                     n_samples=args.n_samples, seq_len=args.calib_seq_len,
                                                     seed=args.seed)
    if name in WEIGHT_ONLY_PTQ or table_calibrated:
        call["progress"] = not (args.quiet or args.json)
        call["device"] = _device(args)
        gguf_type = _gguf_target(args)
        if gguf_type is not None and gguf_type in GGUF_K_TARGETS and name in GGUF_GRID_METHODS:
            if name == "awq":
                raise CLIError(f"--method awq with --gguf-type {gguf_type}: AWQ onto K-quant grids is not "
                               f"available; use --method gptq (error-compensated K-quants), --method rtn "
                               f"(llama.cpp's reference rounding) or a legacy type (Q4_0 ... Q8_0)")
            if name == "rtn":
                _log(args, f"rtn: {gguf_type} is written with llama.cpp's reference K-quant rounding at export")
                return model, time.perf_counter() - t0
            # GPTQ onto each linear's type in llama.cpp's per-tensor choice (recipe and fallbacks)
            call["gguf_type"] = _gguf_linear_types(model, gguf_type)
            _log(args, f"{name}: optimising for the GGUF {gguf_type} per-tensor types "
                       f"({', '.join(sorted(set(call['gguf_type'].values())))})")
        elif gguf_type is not None and name in GGUF_GRID_METHODS:
            # error-compensated GGUF: the method optimises for the exact llama.cpp block grid
            call["gguf_type"] = gguf_type
            _log(args, f"{name}: optimising for the GGUF {gguf_type} block grid (blocks of 32)")
    if name in CALIBRATED:  # calibration memory and resume (quantize's --max-memory/--micro-batch/--resume)
        if getattr(args, "max_memory", None) is not None:
            call["max_memory"] = args.max_memory
        if getattr(args, "micro_batch", None) is not None:
            call["micro_batch"] = args.micro_batch
        staged = any(getattr(args, k, None) for k in ("max_memory", "micro_batch", "resume", "checkpoint"))
        if staged and getattr(args, "output", None) and not getattr(args, "no_checkpoint", False):
            call["checkpoint_dir"] = str(Path(args.output) / ".lowbit-checkpoint")
            call["resume"] = bool(args.resume)
    model = lowbit.quantize(model, method=name, **call)
    freeze(model)
    return model, time.perf_counter() - t0


GGUF_GRID_METHODS = ("rtn", "gptq", "awq")


def _gguf_linear_types(model, gguf_type: str) -> Dict[str, str]:
    """``{linear name: GGUF type}`` that ``export_gguf(model, ..., gguf_type)`` writes (llama.cpp's recipe
    and per-tensor fallbacks), for the quantizer's per-linear ``gguf_type``."""
    from torch import nn

    from lowbit.io.gguf import FLOAT_TYPES, gguf_tensor_plan

    mods = dict(model.named_modules())
    return {n[: -len(".weight")]: t for n, (_, t) in gguf_tensor_plan(model, gguf_type).items()
            if n.endswith(".weight") and isinstance(mods.get(n[: -len(".weight")]), nn.Linear) and t not in FLOAT_TYPES}
# K-quant types and llama.cpp's mixtures (lowbit.formats.kquants, lowbit.io.gguf_recipes)
GGUF_K_TARGETS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M",
                  "Q5_K_S", "Q5_K_M")
_GGUF_INT_EXACT = ("Q4_0", "Q8_0")  # block types with an exact integer (GPTQ / compressed-tensors) form


def _formats(args) -> List[str]:
    return [f.strip() for f in (getattr(args, "format", None) or "").split(",") if f.strip()]


def _gguf_target(args) -> Optional[str]:
    """The GGUF block type the quantizer must target (``--format`` includes gguf), else None.

    With gguf and an integer format (compressed-tensors, gptq) in one run, the weights must be
    exact in both: only Q4_0 / Q8_0 blocks (symmetric groups of 32, fp16 scales) are.
    """
    formats = _formats(args)
    if "gguf" not in formats:
        return None
    t = args.gguf_type.upper()
    others = [f for f in formats if f in ("compressed-tensors", "gptq")]
    if others and t not in _GGUF_INT_EXACT and args.method.lower() in GGUF_GRID_METHODS:
        raise CLIError(f"--format {','.join(formats)} with --gguf-type {t}: {t} blocks have no exact "
                       f"{'/'.join(others)} form (fractional zero point or 5-bit codes); use --gguf-type "
                       f"Q4_0 or Q8_0 to write them from the same weights, or write {t} in a separate run")
    return t


def _size_report(model) -> Dict[str, float]:
    from lowbit.eval.size import bits_per_weight, model_size_bytes

    return {"size_mb": model_size_bytes(model) / 2 ** 20, "bits_per_weight": bits_per_weight(model)}


def _emit(args, payload: Dict[str, Any], text: Optional[str] = None) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif text is not None:
        print(text)


# ---------------------------------------------------------------------------------------------
# subcommands


def _relaunch_nproc(args) -> int:
    """``--nproc N``: run this same command as N torch.distributed processes (rank 0 writes)."""
    import subprocess

    from lowbit.model.distributed import SAFE_ENV

    argv = list(sys.argv[1:])
    i = argv.index("--nproc") if "--nproc" in argv else None
    if i is not None:
        del argv[i:i + 2]
    else:
        argv = [a for a in argv if not a.startswith("--nproc=")]
    env = dict(os.environ, **SAFE_ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc), "-m", "lowbit", *argv]
    return subprocess.call(cmd, env=env)


def cmd_quantize(args) -> int:
    if getattr(args, "nproc", None) and args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_nproc(args)

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    known = ("native", "gguf", "compressed-tensors", "gptq")
    bad = [f for f in formats if f not in known]
    if bad:
        raise CLIError(f"unknown format {bad[0]!r}; expected one of {', '.join(known)} (comma-separated)")
    if getattr(args, "bits_budget", None) is not None or getattr(args, "size_budget", None) is not None:
        return _cmd_budget(args, formats)
    out = Path(args.output)
    _method_call(args.method, args)  # validates early
    _check_group_size(args, [args.method])
    created = _created_dirs(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".lowbit_write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        _remove_created(created)
        raise CLIError(f"output directory {str(out)!r} is not writable: {e.strerror or e}") from None
    try:
        return _quantize_into(args, out, formats)
    except BaseException:
        _remove_created(created)  # a failed run leaves nothing behind (an existing directory is left as it was)
        raise


def _created_dirs(out: Path) -> List[Path]:
    """The folders ``out.mkdir(parents=True)`` would create, outermost first."""
    missing = []
    p = out.absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return list(reversed(missing))


def _remove_created(created: List[Path]) -> None:
    import shutil

    if created:
        shutil.rmtree(created[0], ignore_errors=True)


def _quantize_into(args, out: Path, formats: List[str]) -> int:
    from lowbit.model.plan import measure_peak_rss, plan
    from lowbit.io.gguf import BLOCK_IMPORT_TYPES

    target = _gguf_target(args)
    # RTN onto the GGUF type a .gguf input already holds: keep those blocks as they are
    keep = (target,) if target in BLOCK_IMPORT_TYPES and args.method.lower() == "rtn" else None
    model, tok = _load(args.model, args, gguf_types=keep)
    prediction = plan(model, args.method, bits=args.bits, group_size=args.group_size,
                      n_samples=args.n_samples, seq_len=args.calib_seq_len)
    need_gate = args.max_ppl_increase is not None or args.max_kld is not None
    ref_ppl = None
    ref_model = None
    if need_gate:
        ref_ppl = _ppl(model, tok, args)
        if args.max_kld is not None:
            import copy

            ref_model = copy.deepcopy(model)
    _log(args, f"quantizing {args.model} with {args.method} ...")
    model, seconds = _apply_method(model, tok, args.method, args)
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel run: rank 0 writes the files
        return EXIT_OK
    meta: Dict[str, Any] = {"model": args.model, "method": args.method, "bits": args.bits,
                            "group_size": args.group_size, "sym": not args.asym, "quantize_seconds": seconds,
                            **_size_report(model), "predicted": prediction,
                            "measured": {"peak_rss_mb": measure_peak_rss() / 2 ** 20, "seconds": seconds}}
    gate_failed = []
    if need_gate:
        q_ppl = _ppl(model, tok, args)
        meta.update({"ppl_float": ref_ppl, "ppl": q_ppl, "ppl_increase": q_ppl - ref_ppl})
        if args.max_ppl_increase is not None and q_ppl - ref_ppl > args.max_ppl_increase:
            gate_failed.append(f"perplexity increase {q_ppl - ref_ppl:.3f} > {args.max_ppl_increase}")
        if args.max_kld is not None:
            from lowbit.eval.divergence import kl_divergence

            kl = kl_divergence(ref_model, model, tokenizer=tok, text=_eval_text(args), seq_len=args.seq_len,
                               max_windows=args.max_windows)
            meta.update({"kld_mean": kl["kld_mean"], "kld_p99": kl["kld_p99"], "top1_agreement": kl["top1_agreement"]})
            if kl["kld_mean"] > args.max_kld:
                gate_failed.append(f"mean KL divergence {kl['kld_mean']:.4f} > {args.max_kld}")
    meta["quality_gate"] = "failed: " + "; ".join(gate_failed) if gate_failed else ("passed" if need_gate else "not run")
    written = _write_formats(model, tok, out, formats, args)
    meta["formats"] = written
    if "gguf" in written:
        meta["gguf_type"] = args.gguf_type
        meta["gguf_weights"] = getattr(args, "_gguf_treatment", "requantized from float")
    from lowbit.eval.size import dir_size_bytes

    if args.group_size is not None and 0 < args.group_size and (args.group_size % 8 or args.group_size < 16) \
            and args.method.lower() in (*WEIGHT_ONLY_PTQ, "int4", "int2"):
        print(f"lowbit: warning: --group-size {args.group_size}: the model takes {meta['bits_per_weight']:.2f} "
              f"bits/weight", file=sys.stderr, flush=True)
    meta["output_size_mb"] = dir_size_bytes(out) / 2 ** 20
    tmp = out / "lowbit_run.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, out / "lowbit_run.json")
    lines = [f"wrote {', '.join(written)} to {out}",
             f"  quantize time   {seconds:8.1f} s   (predicted {prediction['seconds']:.1f} s)",
             f"  peak CPU RSS    {meta['measured']['peak_rss_mb']:8.0f} MB  (predicted {prediction['peak_ram_mb']:.0f} MB)",
             f"  output size     {meta['output_size_mb']:8.1f} MB  (predicted {prediction['output_mb']:.1f} MB)",
             f"  bits per weight {meta['bits_per_weight']:8.3f}"]
    if need_gate:
        lines.append(f"  perplexity      {meta['ppl']:8.3f}  (float {ref_ppl:.3f}); quality gate {meta['quality_gate']}")
    _emit(args, meta, "\n".join(lines))
    if gate_failed:
        print(f"lowbit: quality gate failed: {'; '.join(gate_failed)}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _write_formats(model, tok, out: Path, formats: List[str], args) -> List[str]:
    from lowbit.io._affine import quantized_linears

    if quantized_linears(model):  # a quantized model: every format from the same QuantStates
        from lowbit.io.multi import export_all

        if "native" in formats:
            from lowbit.io.native import save

            save(model, out)
            if tok is not None:
                tok.save_pretrained(str(out))
        rest = [f for f in formats if f != "native"]
        if rest:
            report = export_all(model, out, rest, tokenizer=tok, gguf_type="auto", gguf_fallback="requantize",
                                gguf_requantize_type=args.gguf_type, unsupported="error")
            if "gguf" in report:
                _log(args, f"gguf: {report['gguf']['summary']} (how each quantized weight was written)")
                args._gguf_treatment = report["gguf"]["summary"]
        return list(formats)
    written = []
    for fmt in formats:
        if fmt == "native":
            from lowbit.io.native import save

            save(model, out)
        elif fmt == "gguf":
            from lowbit.io.gguf import export_gguf

            export_gguf(model, out / "model.gguf", gguf_type=args.gguf_type, tokenizer=tok)
        elif fmt == "compressed-tensors":
            from lowbit.io.compressed_tensors import export_compressed_tensors

            export_compressed_tensors(model, out / "compressed-tensors")
        elif fmt == "gptq":
            from lowbit.io.gptq import export_gptq

            export_gptq(model, out / "gptq")
        written.append(fmt)
    if tok is not None and "native" in formats:
        tok.save_pretrained(str(out))
    return written


def cmd_eval(args) -> int:
    from lowbit.io.gguf import BLOCK_IMPORT_TYPES

    # a .gguf file is evaluated on its own blocks (Q4_0..Q8_0 held by lowbit modules, not dequantized copies)
    model, tok = _load(args.model, args, gguf_types=BLOCK_IMPORT_TYPES)
    res: Dict[str, Any] = {"model": args.model}
    if args.metric in ("ppl", "all"):
        res["ppl"] = _ppl(model, tok, args)
    if args.metric in ("kld", "all") and args.reference:
        from lowbit.eval.divergence import kl_divergence

        ref, _ = _load(args.reference, args)
        res.update(kl_divergence(ref, model, tokenizer=tok, text=_eval_text(args), seq_len=args.seq_len,
                                 max_windows=args.max_windows))
    elif args.metric == "kld":
        raise CLIError("--metric kld needs --reference MODEL (the float model to compare against)")
    if args.metric in ("latency", "all"):
        from lowbit.eval.latency import measure_latency

        res.update(measure_latency(model, batch_size=args.batch_size, prompt_len=args.prompt_len,
                                   gen_len=args.gen_len))
    res.update(_size_report(model))
    text = "\n".join(f"{k:>22}: {v:.4f}" if isinstance(v, float) else f"{k:>22}: {v}" for k, v in res.items())
    _emit(args, res, text)
    return EXIT_OK


def cmd_compare(args) -> int:
    from lowbit.eval.report import compare_methods

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CLIError(f"--methods {args.methods!r} names no method; e.g. --methods fp32,rtn,gptq,nf4")
    if not any(_method_call(m, args)["method"] is not None for m in methods):
        raise CLIError(f"--methods {args.methods!r} names no quantization method, only the float baseline; "
                       f"e.g. --methods fp32,rtn,gptq,nf4")
    _check_group_size(args, methods)
    if not args.output_dir:
        import tempfile

        args.output_dir = tempfile.mkdtemp(prefix="lowbit-compare-")
        _log(args, f"compare.md and compare.png go to {args.output_dir} (pass --output-dir to choose)")
    rows, md = compare_methods(args, methods, load=lambda: _load(args.model, args), apply=_apply_method,
                               ppl=_ppl, size=_size_report, log=lambda s: _log(args, s))
    _emit(args, {"rows": rows}, md)
    return EXIT_OK


def cmd_plan(args) -> int:
    from lowbit.model.plan import plan_from_config

    _method_call(args.method, args)  # an unknown method is an error, not a plan
    _check_group_size(args, [args.method])
    p = plan_from_config(args.model, args.method, bits=args.bits, group_size=args.group_size,
                         n_samples=args.n_samples, seq_len=args.calib_seq_len)
    text = "\n".join(f"{k:>20}: {v:.1f}" if isinstance(v, float) else f"{k:>20}: {v}" for k, v in p.items())
    _emit(args, p, text)
    return EXIT_OK


def cmd_inspect(args) -> int:
    from lowbit.io.inspect import inspect_checkpoint

    info = inspect_checkpoint(args.path, reference=args.reference, plot=args.plot)
    _emit(args, info, info.pop("_text", json.dumps(info, indent=2, default=str)))
    return EXIT_OK


def cmd_verify(args) -> int:
    from lowbit.io.verify import verify_all

    results = verify_all(args.path)
    bad = [r for r in results if "error" in r]
    for r in results:
        if "error" in r:
            print(f"lowbit: error: {r['error']}", file=sys.stderr)
        elif not args.json:
            how = "checksums ok" if r.get("checksum") else "structure ok (no lowbit checksum to check)"
            print(f"ok  {r['path']}  [{r['kind']}] {how}")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    return EXIT_BAD_INPUT if bad else EXIT_OK


def cmd_export(args) -> int:
    model, tok = _load(args.input, args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_formats(model, tok, out, [f.strip() for f in args.format.split(",")], args)
    _emit(args, {"formats": written, "output": str(out)}, f"wrote {', '.join(written)} to {out}")
    return EXIT_OK


def cmd_convert(args) -> int:
    from lowbit.io.convert import convert_to_gguf

    if args.format != "gguf":
        raise CLIError(f"convert supports --format gguf only (got {args.format!r})")
    from lowbit.io.convert import NotLossless

    out = Path(args.output) if args.output else Path(args.input) / "model.gguf"
    try:
        report = convert_to_gguf(args.input, out)
    except NotLossless as e:
        raise CLIError(_one_line(str(e))) from None
    _emit(args, report if isinstance(report, dict) else {"output": str(out)}, f"wrote {out}")
    return EXIT_OK


#: how each bench script is told where to write: (flag, file name or None for a folder)
_BENCH_OUT = {"model_api": ("--out", "model_api.md"), "qlora": ("--out", "qlora.md"),
              "formats": ("--results", None), "gguf_export": ("--results", None)}


def _one_line(msg: str) -> str:
    """A multi-line reason as one line: ``"N weights cannot ...: first reason (and N-1 more)"``."""
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else msg
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return f"{lines[0].rstrip(':')}: {lines[1]}{more}"


def cmd_cache(args) -> int:
    from lowbit.model.cache import cache_entries, clear_cache, max_cache_bytes
    from lowbit.model.loading import cache_dir

    if args.clear:
        res = clear_cache()
        _emit(args, {"cache_dir": str(cache_dir()), "removed_entries": res["entries"], "freed_bytes": res["bytes"]},
              f"removed {res['entries']} entries ({res['bytes'] / 2 ** 20:.1f} MB) from {cache_dir()}")
        return EXIT_OK
    entries = cache_entries()
    total = sum(int(e["bytes"]) for e in entries)
    lines = [f"{cache_dir()}: {len(entries)} entries, {total / 2 ** 20:.1f} MB "
             f"(cap {max_cache_bytes() / 2 ** 30:.2f} GB, LOWBIT_CACHE_MAX_GB)"]
    lines += [f"  {int(e['bytes']) / 2 ** 20:9.1f} MB  {e['path']}" for e in entries]
    _emit(args, {"cache_dir": str(cache_dir()), "bytes": total, "max_bytes": max_cache_bytes(), "entries": entries},
          "\n".join(lines))
    return EXIT_OK


def cmd_bench(args) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "bench"
    script = root / f"{args.which}.py"
    if not script.exists():
        raise CLIError(f"benchmark {args.which!r} not found (expected {script}); run from a source checkout")
    rest = list(args.rest)
    flag, target = _BENCH_OUT.get(args.which, ("--out", None))
    if not any(a == flag or a.startswith(flag + "=") for a in rest):
        # never the repository's tracked bench/results: --output-dir, else a fresh temporary folder
        import tempfile

        d = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix=f"lowbit-bench-{args.which}-"))
        d.mkdir(parents=True, exist_ok=True)
        rest += [flag, str(d / target) if target else str(d)]
        print(f"lowbit: bench {args.which}: results go to {d}", file=sys.stderr, flush=True)
    sys.argv = [str(script)] + rest
    runpy.run_path(str(script), run_name="__main__")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")


def _eval_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    p.add_argument("--dataset", default=None,
                   help="evaluation text: 'default' (built-in corpus), a .txt/.jsonl path, or an HF dataset name")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=48)


def _quant_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bits", type=int, default=4, choices=[2, 3, 4, 8])
    p.add_argument("--group-size", type=int, default=128, help="-1 = per output channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point) grid for rtn/awq/gptq/hqq")
    p.add_argument("--double-quant", action="store_true", help="double-quantize nf4/fp4 scales")
    p.add_argument("--calib-dataset", default=None, help="calibration text (default: the built-in corpus)")
    p.add_argument("--n-samples", type=int, default=128)
    p.add_argument("--calib-seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)


def _cmd_budget(args, formats: List[str]) -> int:
    """``quantize --bits-budget/--size-budget``: per-weight types by knapsack (lowbit.model.budget)."""
    import torch

    from lowbit.model import budget as bud

    if args.bits_budget is not None and args.size_budget is not None:
        raise CLIError("give one of --bits-budget and --size-budget, not both")
    if formats not in (["gguf"], ["native"]):
        raise CLIError(f"--bits-budget/--size-budget write one format: --format gguf or --format native (got {formats})")
    if args.budget_types:
        cands = tuple(t.strip() for t in args.budget_types.split(",") if t.strip())
        cands = tuple(t.lower() if t.lower().startswith("int") else t.upper() for t in cands)
    else:
        cands = bud.GGUF_CANDIDATES if formats == ["gguf"] else bud.NATIVE_CANDIDATES
    if formats == ["gguf"] and any(t.startswith("int") for t in cands):
        raise CLIError(f"--budget-types {','.join(cands)}: GGUF files hold GGUF block types (Q2_K ... Q8_0)")
    if formats == ["native"] and not all(t.startswith("int") for t in cands):
        raise CLIError(f"--budget-types {','.join(cands)}: the native format takes int2,int3,int4,int8")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    from lowbit.data.calibration import get_calibration_data

    t0 = time.perf_counter()
    model, tok = _load(args.model, args)
    calib = get_calibration_data(tok, args.calib_dataset or "default", n_samples=args.n_samples,
                                 seq_len=args.calib_seq_len, seed=args.seed)
    bmethod = getattr(args, "budget_method", None) or "rtn"
    if bmethod == "gptq" and formats != ["gguf"]:
        raise CLIError("--budget-method gptq writes GGUF block types: use --format gguf")
    _log(args, f"budget: measuring the sensitivity of every weight to {', '.join(cands)} on {calib.shape[0]} windows")
    try:
        H = bud.input_hessians(model, calib)
        bplan = bud.budget_plan(model, calib, bits_budget=args.bits_budget, size_budget=args.size_budget,
                                candidates=cands, hessians=H)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if bmethod == "gptq":  # each weight GPTQ-solved onto its planned type on the same input Hessians
        bplan.method = "gptq"
        states = bud.gptq_plan_states(model, bplan, H)
    else:
        states = bud.plan_quant_states(model, bplan)
    del H
    plan_path = bplan.save(out / "budget_plan.json")
    if formats == ["gguf"]:
        from lowbit.io.gguf import export_gguf

        export_gguf(model, out / "model.gguf", gguf_type="Q8_0", tokenizer=tok, quant_states=states)
    else:
        from lowbit.io.native import save
        from lowbit.nn import QLinear

        for name, st in states.items():
            mod_name = name[: -len(".weight")]
            mod = model.get_submodule(mod_name) if not name.startswith("model.embed_tokens") else None
            if mod is None or type(mod) is not torch.nn.Linear:
                continue
            parent, _, child = mod_name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, QLinear.from_quant_state(mod, st))
        save(model, out)
        if tok is not None:
            tok.save_pretrained(str(out))
    lines = [f"budget plan: {bplan.summary()}", f"  plan saved to {plan_path}",
             f"  wrote {formats[0]} to {out} in {time.perf_counter() - t0:.1f} s"]
    for n, t in bplan.types.items():
        lines.append(f"  {n}: {t}")
    _emit(args, {"budget_plan": bplan.to_json(), "output": str(out)}, "\n".join(lines))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize, evaluate, compare and export models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="quantize a model and write it")
    p.add_argument("--model", default="default", help="'default', a local HF dir, a .gguf file or a hub id")
    p.add_argument("--method", default="gptq", help="rtn|awq|gptq|hqq|nf4|fp4|int8|int4|fp8|fp16|bf16|<registered>")
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="native", help="native,gguf,compressed-tensors,gptq (comma-separated)")
    p.add_argument("--gguf-type", default="Q4_0", type=str.upper,
                   choices=["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *GGUF_K_TARGETS])
    p.add_argument("--max-ppl-increase", type=float, default=None, help="quality gate on perplexity")
    p.add_argument("--max-kld", type=float, default=None, help="quality gate on mean KL divergence")
    p.add_argument("--max-memory", default=None,
                   help="gptq/awq: peak memory the calibration may use on the device, e.g. 1.5GB (default: what "
                        "the device has free); activations beyond it are offloaded to host memory or disk")
    p.add_argument("--micro-batch", type=int, default=None, help="gptq/awq: calibration samples per forward")
    p.add_argument("--resume", action="store_true",
                   help="gptq/awq: restart an interrupted run from its last finished block "
                        "(checkpoints in OUTPUT/.lowbit-checkpoint, written by runs with --checkpoint, "
                        "--max-memory, --micro-batch or --resume)")
    p.add_argument("--checkpoint", action="store_true",
                   help="gptq/awq: write per-block checkpoints so that an interrupted run can --resume "
                        "(runs the micro-batched pipeline)")
    p.add_argument("--no-checkpoint", action="store_true", help="gptq/awq: write no per-block checkpoints")
    p.add_argument("--nproc", type=int, default=None,
                   help="gptq/awq: data-parallel calibration over N processes (torch.distributed; gloo on CPU, "
                        "NCCL on GPUs)")
    p.add_argument("--bits-budget", type=float, default=None,
                   help="mixed precision: bits per weight over the quantized weights (scales included), e.g. 4.5")
    p.add_argument("--size-budget", default=None, help="mixed precision: bytes of the quantized weights, e.g. 90MB")
    p.add_argument("--budget-method", default="rtn", choices=["rtn", "gptq"],
                   help="--bits/--size-budget: rtn (llama.cpp's reference rounding per type) or gptq (each weight "
                        "GPTQ-solved onto its planned type on its input Hessian)")
    p.add_argument("--budget-types", default=None,
                   help="candidate types for --bits/--size-budget (default: GGUF Q2_K..Q8_0 for --format gguf, "
                        "int2,int3,int4,int8 groups of 128 for native)")
    _quant_opts(p)
    _eval_opts(p)
    _common(p)
    p.set_defaults(fn=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity / KL divergence / latency of a model")
    p.add_argument("--model", default="default")
    p.add_argument("--metric", default="ppl", choices=["ppl", "kld", "latency", "all"])
    p.add_argument("--reference", default=None, help="float model for --metric kld")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    _eval_opts(p)
    _common(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("compare", help="one table: perplexity, delta, size, bits/weight, time per method")
    p.add_argument("--model", default="default")
    p.add_argument("--methods", default="fp32,rtn,awq,gptq,hqq,nf4")
    p.add_argument("--output-dir", default=None, help="where compare.md and compare.png go (default: a new temporary folder, announced)")
    p.add_argument("--save", default=None, help="save the best quantized model (lowest perplexity) here, native format")
    _quant_opts(p)
    _eval_opts(p)
    _common(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("plan", help="predict memory, disk, output size and time before quantizing")
    p.add_argument("--model", default="default")
    p.add_argument("--method", default="gptq")
    _quant_opts(p)
    _common(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("inspect", help="what a checkpoint holds; with --reference, its per-layer error")
    p.add_argument("path")
    p.add_argument("--reference", default=None, help="the float model, for the per-layer error report")
    p.add_argument("--plot", default=None, help="write the per-layer error plot (PNG) here")
    _common(p)
    p.set_defaults(fn=cmd_inspect)

    p = sub.add_parser("verify", help="check a checkpoint / export (or a folder of them) against lowbit's checksums")
    p.add_argument("path")
    _common(p)
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("export", help="re-export a lowbit checkpoint to other formats")
    p.add_argument("--input", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--format", required=True, help="gguf,compressed-tensors,gptq")
    p.add_argument("--gguf-type", default="Q4_0", type=str.upper,
                   choices=["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *GGUF_K_TARGETS])
    _common(p)
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("convert", help="lossless conversion of GPTQ/AWQ/compressed-tensors checkpoints to GGUF")
    p.add_argument("--input", required=True)
    p.add_argument("--format", default="gguf")
    p.add_argument("--output", default=None)
    _common(p)
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("cache", help="show lowbit's cache (converted GGUF models) and its size; --clear empties it")
    p.add_argument("--clear", action="store_true", help="remove every cached entry")
    _common(p)
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("bench", help="run a benchmark script from bench/ (schemes, ptq, model_api, ...)")
    p.add_argument("--output-dir", default=None,
                   help="where the results go (default: a new temporary folder; never the tracked bench/results)")
    p.add_argument("which", nargs="?", default="schemes")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench, quiet=False, json=False)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet or args.json:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 (ours and transformers' bars)
    logging.basicConfig(level=logging.WARNING if (args.quiet or args.json) else logging.INFO,
                        format="%(message)s")
    try:
        return args.fn(args)
    except CLIError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # every error is one line on stderr (LOWBIT_DEBUG=1 shows the traceback)
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        known = (FileNotFoundError, ImportError, ValueError, RuntimeError, TypeError, KeyError, OSError)
        if not isinstance(e, known):
            msg = f"{type(e).__name__}: {msg}"
        if isinstance(e, KeyError) and msg.startswith("'"):
            msg = f"missing key {msg}"
        print(f"lowbit: error: {msg}", file=sys.stderr)
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
