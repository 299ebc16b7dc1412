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
    from safetensors import safe_open

    dtypes: Counter = Counter()
    n = 0
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                dtypes[str(sl.get_dtype())] += 1
                n += 1
    return {"tensors": n, "tensor_dtypes": dict(dtypes)}


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def inspect_gguf(path: Path) -> Dict[str, Any]:
    from lowbit._deps import require

    gguf = require("gguf", "reading GGUF files")
    reader = gguf.GGUFReader(str(path))
    types: Counter = Counter()
    elems = 0
    nbytes = 0
    for t in reader.tensors:
        types[t.tensor_type.name] += 1
        elems += int(t.n_elements)
        nbytes += int(t.n_bytes)
    arch = reader.fields.get("general.architecture")
    arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "?"
    return {"format": "gguf", "architecture": arch_name, "tensors": len(reader.tensors),
            "tensor_types": dict(types), "bits_per_weight": 8 * nbytes / max(elems, 1),
            "size_mb": path.stat().st_size / 2 ** 20}


def inspect_checkpoint(path, reference: Optional[str] = None, plot: Optional[str] = None) -> Dict[str, Any]:
    """Describe the checkpoint at ``path``; with ``reference`` (a float model spec) add the per-layer
    error report (and write its PNG to ``plot`` when given)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if p.is_file() and p.suffix == ".gguf":
        info = inspect_gguf(p)
    elif p.is_dir():
        from lowbit.io import native

        if native.is_checkpoint(p):
            info = _inspect_native(p, reference, plot)
        else:
            cfg_file = p / "config.json"
            qcfg = json.loads(cfg_file.read_text()).get("quantization_config") if cfg_file.exists() else None
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
    from lowbit.io.native import load
    from lowbit.nn.base import QModuleMixin

    model = load(p)
    schemes: Counter = Counter()
    layers = []
    qbytes = qelems = 0
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            for pname, st in m.quant_states().items():
                schemes[st.scheme] += 1
                qbytes += st.nbytes
                qelems += st.numel
                layers.append({"layer": f"{name}.{pname}", "scheme": st.scheme, "shape": list(st.shape),
                               "bits_per_weight": round(st.bits_per_element, 4)})
    run = p / "lowbit_run.json"
    info: Dict[str, Any] = {"format": "lowbit-native", "schemes": dict(schemes), "quantized_layers": len(layers),
                            "bits_per_weight": 8 * qbytes / max(qelems, 1), "size_mb": _dir_size(p) / 2 ** 20,
                            "layers": layers}
    if run.exists():
        meta = json.loads(run.read_text())
        info["method"] = meta.get("method")
        info["quality_gate"] = meta.get("quality_gate")
    if reference:
        from lowbit.eval.layer_report import layer_error_report, plot_layer_report
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
