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
from pathlib import Path
from typing import Any, Dict, List, Optional

EXIT_OK, EXIT_BAD_INPUT, EXIT_GATE = 0, 2, 3

from lowbit.workflow import GGUF_TYPES  # noqa: E402  (parser choices)


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
    """``(model, tokenizer)`` (see :func:`lowbit.workflow.load`)."""
    from lowbit.workflow import load

    model, tok, _ = load(spec, device=_device(args) if args is not None else "cpu", dtype=dtype,
                         gguf_types=gguf_types)
    return model, tok


def _eval_text(args) -> Any:
    return args.dataset if getattr(args, "dataset", None) else "default"


def _evaluation(args):
    from lowbit.workflow import Evaluation

    return Evaluation(text=_eval_text(args), seq_len=args.seq_len, max_windows=args.max_windows,
                      progress=not (args.quiet or args.json))


def _ppl(model, tok, args) -> float:
    return _evaluation(args).ppl(model, tok)


#: method options the command line sets: flag -> (config key, how the value is read from args)
FLAGS = {"bits": "--bits", "group_size": "--group-size", "sym": "--asym", "double_quant": "--double-quant",
         "calib_dataset": "--calib-dataset", "n_samples": "--n-samples", "seq_len": "--calib-seq-len",
         "seed": "--seed", "max_memory": "--max-memory", "micro_batch": "--micro-batch", "checkpoint": "--checkpoint",
         "resume": "--resume", "no_checkpoint": "--no-checkpoint", "zero_rounding": "--zero-rounding"}


def _given_options(args) -> Dict[str, Any]:
    """The method options the user gave on the command line (flags left out are the method's defaults)."""
    opts: Dict[str, Any] = {}
    for key, attr in (("bits", "bits"), ("group_size", "group_size"), ("calib_dataset", "calib_dataset"),
                      ("n_samples", "n_samples"), ("seq_len", "calib_seq_len"), ("seed", "seed"),
                      ("max_memory", "max_memory"), ("micro_batch", "micro_batch"),
                      ("zero_rounding", "zero_rounding")):
        v = getattr(args, attr, None)
        if v is not None:
            opts[key] = v
    if getattr(args, "asym", False):
        opts["sym"] = False
    for key in ("double_quant", "checkpoint", "resume", "no_checkpoint"):
        if getattr(args, key, False):
            opts[key] = True
    return opts


def _check_method(method: str, args):
    """The method-table entry of ``method`` and the options for it (an unused option is an error)."""
    from lowbit.workflow import WorkflowError, check_options

    _check_group_size(args)
    try:
        return check_options(method, _given_options(args), spelling=FLAGS)
    except WorkflowError as e:
        msg = str(e)
        raise CLIError("--" + msg if msg.startswith("method ") else msg) from None


def _check_group_size(args) -> None:
    """``--group-size``: -1 (per output channel) or a positive size, for every method."""
    gs = getattr(args, "group_size", None)
    if gs is not None and (gs == 0 or gs < -1):
        raise CLIError(f"--group-size {gs}: expected -1 (one group per output channel) or a positive size "
                       f"such as 32, 64 or 128")


def _warn(msg: str) -> None:
    print(f"lowbit: warning: {msg}", file=sys.stderr, flush=True)


def _apply_method(model, tok, method: str, args, options: Optional[Dict[str, Any]] = None):
    """Quantize ``model`` in place with the CLI method; returns (model, seconds)."""
    from lowbit.workflow import apply_method

    model, seconds, _ = apply_method(model, tok, method, _given_options(args) if options is None else options,
                                     device=_device(args), progress=not (args.quiet or args.json),
                                     log=lambda s: _log(args, s))
    return model, seconds


def _size_report(model) -> Dict[str, float]:
    from lowbit.workflow import size_report

    return size_report(model)


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
    from lowbit.workflow import WorkflowError, check_formats

    if getattr(args, "nproc", None) and args.nproc > 1 and "RANK" not in os.environ:
        return _relaunch_nproc(args)
    try:
        formats = check_formats(args.format.split(","))
    except WorkflowError as e:
        raise CLIError(str(e)) from None
    if getattr(args, "bits_budget", None) is not None or getattr(args, "size_budget", None) is not None:
        return _cmd_budget(args, formats)
    extra = [f for f, k in (("--budget-method", "budget_method"), ("--budget-types", "budget_types"))
             if getattr(args, k, None) is not None]
    if extra:
        raise CLIError(f"{', '.join(extra)} only apply with --bits-budget or --size-budget")
    out = Path(args.output)
    _check_method(args.method, args)  # validates early
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
    from lowbit.workflow import WorkflowError, quantize_run

    try:
        rep = quantize_run(args.model, out, method=args.method, formats=formats, options=_given_options(args),
                           gguf_type=args.gguf_type, max_ppl_increase=args.max_ppl_increase, max_kld=args.max_kld,
                           evaluation=_evaluation(args), device=_device(args), progress=not (args.quiet or args.json),
                           log=lambda s: _log(args, s), write=int(os.environ.get("RANK", "0")) == 0)
    except WorkflowError as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) != 0:  # data-parallel run: rank 0 writes the files
        return EXIT_OK
    for w in rep.warnings:
        _warn(w)
    meta, prediction = rep.meta, rep.prediction
    lines = [f"wrote {', '.join(rep.formats)} to {out}",
             f"  quantize time   {rep.seconds:8.1f} s   (predicted {prediction['seconds']:.1f} s)",
             f"  peak CPU RSS    {meta['measured']['peak_rss_mb']:8.0f} MB  (predicted {prediction['peak_ram_mb']:.0f} MB)",
             f"  output size     {meta['output_size_mb']:8.1f} MB  (predicted {prediction['output_mb']:.1f} MB)",
             f"  bits per weight {meta['bits_per_weight']:8.3f}"]
    if "ppl" in meta:
        lines.append(f"  perplexity      {meta['ppl']:8.3f}  (float {meta['ppl_float']:.3f}); quality gate "
                     f"{meta['quality_gate']}")
    _emit(args, meta, "\n".join(lines))
    if rep.gate_failed:
        print(f"lowbit: quality gate failed: {'; '.join(rep.gate_failed)}", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


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
    from lowbit.workflow import WorkflowError, check_options, method_entry

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise CLIError(f"--methods {args.methods!r} names no method; e.g. --methods fp32,rtn,gptq,nf4")
    _check_group_size(args)
    try:
        entries = [method_entry(m) for m in methods]
    except WorkflowError as e:
        raise CLIError(str(e)) from None
    if not any(e.quantized for e in entries):
        raise CLIError(f"--methods {args.methods!r} names no quantization method, only the float baseline; "
                       f"e.g. --methods fp32,rtn,gptq,nf4")
    # the shared flags go to the methods that use them: an error when none does, announced for the others
    given = _given_options(args)
    per_method: Dict[str, Dict[str, Any]] = {}
    users: Dict[str, List[str]] = {k: [] for k in given}
    for m in methods:
        opts = {}
        for k, v in given.items():
            try:
                check_options(m, {k: v})
            except WorkflowError:
                continue
            opts[k] = v
            users[k].append(m)
        per_method[m] = opts
    unused = [k for k, ms in users.items() if not ms]
    if unused:
        raise CLIError(f"{', '.join(FLAGS.get(k, k) for k in unused)}: used by none of --methods {args.methods}")
    for k, ms in users.items():
        rest = [m for m in methods if m not in ms and m not in ("fp32", "float", "none")]
        if rest:
            _log(args, f"{FLAGS.get(k, k)} applies to {', '.join(ms)}; not to {', '.join(rest)} (they do not use it)")
    if not args.output_dir:
        import tempfile

        args.output_dir = tempfile.mkdtemp(prefix="lowbit-compare-")
        _log(args, f"compare.md and compare.png go to {args.output_dir} (pass --output-dir to choose)")
    rows, md = compare_methods(args, methods, load=lambda: _load(args.model, args),
                               apply=lambda model, tok, m, a: _apply_method(model, tok, m, a, per_method.get(m, {})),
                               ppl=_ppl, size=_size_report, log=lambda s: _log(args, s))
    _emit(args, {"rows": rows}, md)
    return EXIT_OK


def cmd_plan(args) -> int:
    from lowbit.model.plan import plan_from_config
    from lowbit.workflow import WorkflowError, plan_options

    _check_method(args.method, args)  # an unknown method or an unused option is an error, not a plan
    p_opts = plan_options(args.method, _given_options(args))
    gpus = getattr(args, "gpus", 0) or 0
    if gpus < 0:
        raise WorkflowError(f"--gpus {gpus}: expected 0 (no GPU prediction) or a number of GPUs")
    p = plan_from_config(args.model, args.method, bits=p_opts["bits"], group_size=p_opts["group_size"],
                         n_samples=p_opts["n_samples"], seq_len=p_opts["seq_len"],
                         **({"device": "cuda", "n_gpus": gpus} if gpus else {}))
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
    from lowbit.workflow import export_model

    out = Path(args.output)
    written = export_model(args.input, out, [f.strip() for f in args.format.split(",")], gguf_type=args.gguf_type,
                           device=_device(args), log=lambda s: _log(args, s))
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
    # None: the method's own default (its config class); a flag the method does not use is an error
    p.add_argument("--bits", type=int, default=None, choices=[2, 3, 4, 8],
                   help="code width of rtn/awq/gptq/hqq (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="weights per scale (default: the method's, 128 for rtn/awq/gptq/hqq/int4); -1 = per output "
                        "channel")
    p.add_argument("--asym", action="store_true", help="asymmetric (zero point) grid for rtn/awq/gptq/hqq")
    p.add_argument("--double-quant", action="store_true", help="double-quantize nf4/fp4 scales")
    p.add_argument("--calib-dataset", default=None,
                   help="calibrated methods: calibration text (default: the built-in corpus)")
    p.add_argument("--n-samples", type=int, default=None, help="calibrated methods: windows (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="calibrated methods: tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="calibrated methods: window sampling seed (default 0)")
    p.add_argument("--zero-rounding", default=None, choices=["float", "round", "cover", "refit", "best"],
                   help="hqq --asym: 'float' keeps the solver's fractional zero points (the default, the hqq "
                        "package's quality; no GPTQ/AWQ/compressed-tensors export), 'round' stores integer ones")


def _cmd_budget(args, formats: List[str]) -> int:
    """``quantize --bits-budget/--size-budget``: per-weight types by knapsack (lowbit.model.budget)."""
    from lowbit.workflow import WorkflowError, quantize_budget

    unused = [FLAGS[k] for k in _given_options(args) if k not in ("calib_dataset", "n_samples", "seq_len", "seed")]
    if unused:
        raise CLIError(f"--bits-budget/--size-budget choose each weight's type themselves: {', '.join(unused)} "
                       f"not used (--budget-types sets the candidates)")
    try:
        res = quantize_budget(args.model, args.output, formats, bits_budget=args.bits_budget,
                              size_budget=args.size_budget, budget_types=args.budget_types,
                              calib_dataset=args.calib_dataset, n_samples=args.n_samples or 128,
                              seq_len=args.calib_seq_len or 512, seed=args.seed or 0, device=_device(args),
                              budget_method=getattr(args, "budget_method", None) or "rtn",
                              log=lambda s: _log(args, s))
    except WorkflowError as e:
        raise CLIError(str(e)) from None
    bplan = res["plan"]
    lines = [f"budget plan: {bplan.summary()}", f"  plan saved to {res['plan_path']}",
             f"  wrote {formats[0]} to {res['output']} in {res['seconds']:.1f} s"]
    for n, t in bplan.types.items():
        lines.append(f"  {n}: {t}")
    _emit(args, {"budget_plan": bplan.to_json(), "output": str(res["output"])}, "\n".join(lines))
    return EXIT_OK


def _format_names() -> List[str]:
    """The registered export formats (lowbit.io.registry), for --format."""
    from lowbit.io.registry import EXPORTERS, format_names

    format_names()
    return sorted({EXPORTERS.get(n).name for n in EXPORTERS.names()})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lowbit", description="Quantize, evaluate, compare and export models.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="quantize a model and write it")
    p.add_argument("--model", default="default", help="'default', a local HF dir, a .gguf file or a hub id")
    p.add_argument("--method", default="gptq",
                   help="a method of the method table: rtn|awq|gptq|hqq|nf4|fp4|int8|int4|int2|fp8|fp16|bf16|fp32|"
                        "sparse-2:4[-int8|-int4]|<registered> (lowbit.model.methods.list_methods())")
    p.add_argument("--output", required=True)
    p.add_argument("--format", default="native",
                   help=f"{','.join(_format_names())} (comma-separated); gguf makes rtn/gptq/awq use the "
                        "--gguf-type block grid (its bits, groups of 32, symmetry: announced and recorded)")
    p.add_argument("--gguf-type", default="Q4_0", type=str.upper, choices=list(GGUF_TYPES))
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
    p.add_argument("--budget-method", default=None, choices=["rtn", "gptq"],
                   help="--bits/--size-budget: rtn (llama.cpp's reference rounding per type, the default) or gptq "
                        "(each weight GPTQ-solved onto its planned type on its input Hessian; --format gguf)")
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
    p.add_argument("--gpus", type=int, default=0, help="also predict the GPU time of gptq/awq on this many GPUs "
                   "of one host (gpu_seconds; rates measured when CUDA is present, else the H200's)")
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
    p.add_argument("--format", required=True, help=f"{','.join(_format_names())} (comma-separated)")
    p.add_argument("--gguf-type", default="Q4_0", type=str.upper, choices=list(GGUF_TYPES))
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
