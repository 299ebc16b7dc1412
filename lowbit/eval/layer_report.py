"""Per-layer error report: for each quantized layer, weight SQNR, relative and max weight error,
and the output error on calibration activations; with a PNG plot.

``layer_error_report(float_model, quant_model, inputs=None)`` pairs modules by qualified name.
When ``inputs`` (token ids for a causal LM, or any tensor the model accepts) are given, the
inputs of every quantized layer are captured from the *float* model with forward hooks and
both weights are applied to them, so the output error isolates that one layer.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from lowbit.eval.metrics import sqnr_db
from lowbit.tensor.functional import dequantize


def _quantized_layers(model: nn.Module) -> Dict[str, nn.Module]:
    from lowbit.nn.base import QModuleMixin

    return {n: m for n, m in model.named_modules() if isinstance(m, QModuleMixin)}


def _float_weight(m: nn.Module) -> torch.Tensor:
    return m.weight.detach().float()


def _quant_weight(m: nn.Module) -> torch.Tensor:
    if getattr(m, "qstate", None) is not None:
        return dequantize(m.qstate).float().reshape(m.qstate.shape)
    return m.dequantized_weight().detach().float()


@torch.no_grad()
def layer_error_report(float_model: nn.Module, quant_model: nn.Module, inputs: Optional[torch.Tensor] = None,
                       max_rows: int = 2048) -> List[Dict[str, float]]:
    """One row per quantized layer: name, scheme, bits/weight, weight SQNR (dB), relative weight
    error, max weight error, and (with ``inputs``) relative output error and output SQNR."""
    qlayers = _quantized_layers(quant_model)
    fmods = dict(float_model.named_modules())
    captured: Dict[str, torch.Tensor] = {}
    if inputs is not None:
        hooks = []
        for name in qlayers:
            if name in fmods:
                def hook(mod, args, _name=name):
                    x = args[0].detach()
                    x = x.reshape(-1, x.shape[-1])
                    captured[_name] = x[:max_rows].float()
                hooks.append(fmods[name].register_forward_pre_hook(hook))
        try:
            float_model(inputs)
        finally:
            for h in hooks:
                h.remove()
    rows = []
    for name, qm in qlayers.items():
        fm = fmods.get(name)
        if fm is None or not hasattr(fm, "weight"):
            continue
        w = _float_weight(fm)
        wq = _quant_weight(qm).reshape(w.shape)
        err = (wq - w)
        st = getattr(qm, "qstate", None)
        row = {
            "layer": name,
            "scheme": st.scheme if st is not None else str(getattr(qm, "weights", "")),
            "bits_per_weight": st.bits_per_element if st is not None else float("nan"),
            "weight_sqnr_db": sqnr_db(w, wq),
            "weight_rel_error": float(err.norm() / w.norm()) if w.norm() > 0 else 0.0,
            "weight_max_error": float(err.abs().max()),
        }
        x = captured.get(name)
        if x is not None and w.dim() == 2:
            y = x @ w.t()
            yq = x @ wq.t()
            row["output_rel_error"] = float((yq - y).norm() / y.norm()) if y.norm() > 0 else 0.0
            row["output_sqnr_db"] = sqnr_db(y, yq)
        rows.append(row)
    return rows


def plot_layer_report(rows: List[Dict[str, float]], path, title: str = "per-layer quantization error") -> bool:
    """Weight SQNR (and output SQNR when measured) per layer as a PNG; False without matplotlib."""
    from lowbit._deps import available

    if not available("matplotlib") or not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.06), 4))
    ax.plot(xs, [r["weight_sqnr_db"] for r in rows], ".-", lw=0.8, label="weight SQNR")
    if "output_sqnr_db" in rows[0]:
        ax.plot(xs, [r.get("output_sqnr_db", math.nan) for r in rows], ".-", lw=0.8, label="output SQNR")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("dB")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(path), dpi=110)
    plt.close(fig)
    return True
