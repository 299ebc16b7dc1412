"""``lowbit inspect``: what a checkpoint holds (format, methods, bits, layers, size) and, given the
float model, its per-layer error report.

Understands a lowbit native directory, a GGUF file, and HF directories carrying a
``quantization_config`` (GPTQ, AWQ, compressed-tensors, lowbit). Reading never executes code:
safetensors headers and JSON only (the native checkpoint is loaded with safetensors for the
error report).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional


def _safetensors_summary(directory: Path) -> Dict[str, Any]:
    from lowbit.io._files import read_safetensors_header

    dtypes: Counter = Counter()
    n = 0
    for f in sorted(directory.glob("*.safetensors")):
        header, _ = read_safetensors_header(f)  # validated: a corrupt file is a one-line error naming it
        for info in header.values():
            dtypes[info["dtype"]] += 1
            n += 1
    return {"tensors": n, "tensor_dtypes": dict(dtypes)}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect_gguf(path: Path) -> Dict[str, Any]:
    from lowbit._deps import require

    from lowbit.io.gguf import check_gguf

    require("gguf", "reading GGUF files")
    reader = check_gguf(path)
    types: Counter = Counter()
    elems = 0
    nbytes = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        elems += int(t.n_elements)
        nbytes += int(t.n_bytes)
    arch = reader.fields.get("general.architecture")
    arch_name = bytes(arch.parts[arch.data[0]]).decode("utf-8", "replace") if arch is not None else "?"
    return {"format": "gguf", "architecture": arch_name, "tensors": len(reader.tensors),
            "tensor_types": dict(types), "bits_per_weight": 8 * nbytes / max(elems, 1),
            "size_mb": path.stat().st_size / 2 ** 20}


def inspect_checkpoint(path, reference: Optional[str] = None, plot: Optional[str] = None) -> Dict[str, Any]:
    """Describe the checkpoint at ``path``; with ``reference`` (a float model spec) add the per-layer
    error report (and write its PNG to ``plot`` when given)."""
    p = Path(path)
    if not p.exists():
        from lowbit.io._files import recover_interrupted

        recover_interrupted(p)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if p.is_file() and p.suffix == ".gguf":
        info = inspect_gguf(p)
    elif p.is_dir():
        from lowbit.io import native

        from lowbit.io._files import CheckpointError, read_json_object

        if native.has_marker(p):  # a damaged marker is a corrupt checkpoint, never "unquantized"
            info = _inspect_native(p, reference, plot)
        else:
            cfg_file = p / "config.json"
            if not cfg_file.is_file() and not any(p.glob("*.safetensors")) and not any(p.glob("*.gguf")):
                raise CheckpointError(f"{p}: no checkpoint here (no lowbit_index.json, config.json, .safetensors "
                                      "or .gguf file)")
            qcfg = read_json_object(cfg_file, "config").get("quantization_config") if cfg_file.exists() else None
            method = qcfg.get("quant_method") if isinstance(qcfg, dict) else None
            if method in ("gptq", "awq", "compressed-tensors"):  # the reader checks structure and checksums
                from lowbit.io.compressed_tensors import read_compressed_tensors
                from lowbit.io.gptq import read_awq, read_gptq

                {"gptq": read_gptq, "awq": read_awq, "compressed-tensors": read_compressed_tensors}[method](p)
            else:
                from lowbit.io._files import check_dir_checksums

                check_dir_checksums(p)
            info = {"format": (qcfg or {}).get("quant_method", "unquantized"), "quantization_config": qcfg,
                    **_safetensors_summary(p), "size_mb": _dir_size(p) / 2 ** 20}
            ggufs = sorted(p.glob("*.gguf"))
            if ggufs:
                info["gguf"] = {g.name: inspect_gguf(g) for g in ggufs}
    else:
        raise ValueError(f"{str(path)!r} is neither a directory nor a .gguf file")
    info["_text"] = _render(info)
    return info


def _inspect_native(p: Path, reference: Optional[str], plot: Optional[str]) -> Dict[str, Any]:
    schemes: Counter = Counter()
    layers = []
    qbytes = qelems = 0
    for lname, st in native_quant_states(p).items():
        schemes[st.scheme] += 1
        qbytes += st.nbytes
        qelems += st.numel
        layers.append({"layer": lname, "scheme": st.scheme, "shape": list(st.shape),
                       "bits_per_weight": round(st.bits_per_element, 4)})
    run = p / "lowbit_run.json"
    info: Dict[str, Any] = {"format": "lowbit-native", "schemes": dict(schemes), "quantized_layers": len(layers),
                            "bits_per_weight": 8 * qbytes / max(qelems, 1), "size_mb": _dir_size(p) / 2 ** 20,
                            "layers": layers}
    if run.exists():
        from lowbit.io._files import read_json_object

        meta = read_json_object(run, "run record")
        info["method"] = meta.get("method")
        info["quality_gate"] = meta.get("quality_gate")
    if reference:
        from lowbit.eval.layer_report import layer_error_report, plot_layer_report
        from lowbit.io.native import load

        model = load(p)
        from lowbit.model.loading import load_model

        ref, tok = load_model(reference)
        ids = None
        if tok is not None:
            from lowbit.data.calibration import get_calibration_data

            ids = get_calibration_data(tok, "default", n_samples=2, seq_len=256, seed=0)
        rows = layer_error_report(ref, model, ids)
        info["layer_errors"] = rows
        if plot:
            plot_layer_report(rows, plot)
            info["plot"] = plot
    return info


def native_quant_states(p: Path):
    """``{"<module>.<param>": QuantState}`` of a native checkpoint, read from its quantization map and
    tensors without building the model (so checkpoints of any ``nn.Module`` can be inspected).
    Everything :func:`lowbit.io.native.load` checks on the files is checked (index, sizes, sha256)."""
    from lowbit.io import native
    from lowbit.io._files import CheckpointError
    from lowbit.tensor.state import QuantState

    index = native.read_index(p)
    native._check_files(p, index, True)
    qmap = native.read_quantization_map(p)
    if not index["tensors"]:
        raise CheckpointError(f"{p / native.INDEX}: the index lists no tensor: corrupted checkpoint")
    tensors = native._read_tensors(p, index)
    out = {}
    for mod in sorted(qmap):
        prefix = f"{mod}." if mod else ""
        params = sorted({k[len(prefix):-len(".meta")] for k in tensors
                         if k.startswith(prefix) and k.endswith(".meta") and "." not in k[len(prefix):-len(".meta")]})
        for param in params:
            key = f"{prefix}{param}"
            sub = {k: v for k, v in tensors.items() if k.startswith(key + ".")}
            try:
                out[key] = QuantState.from_state_dict(sub, key + ".")
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                f = index["tensors"].get(key + ".meta", {}).get("file", native.INDEX)
                raise CheckpointError(f"{p / f}: quantized tensor {key!r}: {msg}") from None
    return out


def _render(info: Dict[str, Any]) -> str:
    lines = []
    for k, v in info.items():
        if k in ("layers", "layer_errors", "_text", "gguf"):
            continue
        lines.append(f"{k:>18}: {v:.3f}" if isinstance(v, float) else f"{k:>18}: {v}")
    for r in info.get("layer_errors", [])[:400]:
        out = f", output SQNR {r['output_sqnr_db']:6.2f} dB" if "output_sqnr_db" in r else ""
        lines.append(f"  {r['layer']:<48} {r['scheme']:<10} weight SQNR {r['weight_sqnr_db']:6.2f} dB, "
                     f"rel {r['weight_rel_error']:.4f}, max {r['weight_max_error']:.4f}{out}")
    for name, g in info.get("gguf", {}).items():
        lines.append(f"  {name}: {g['tensor_types']}, {g['bits_per_weight']:.3f} bits/weight, {g['size_mb']:.1f} MB")
    return "\n".join(lines)
