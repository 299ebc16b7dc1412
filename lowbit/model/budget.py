"""Mixed precision under a size budget: one quantization type per weight, chosen by a knapsack.

1. **Sensitivity, measured once.** For every 2-D weight ``W [out, in]`` and every candidate type ``t``
   the layer-output error of quantizing that weight alone, ``err(W, t) = tr(E H E^T)`` with
   ``E = deq(quant(W, t)) - W`` and ``H = X^T X / n`` the Gram matrix of the weight's calibration
   inputs (GPTQ's Hessian up to a factor; :func:`input_hessians`), and its size in bytes.
2. **Allocation.** Minimise ``sum err(W, t_W)`` subject to ``sum bytes(W, t_W) <= budget`` (a
   multiple-choice knapsack), solved by Lagrangian relaxation (for a multiplier ``lam`` every weight
   independently takes ``argmin err + lam * bytes``; bisection on ``lam`` finds the largest feasible
   plan on the lower convex hull), then greedy upgrades by best error decrease per extra byte while
   the budget allows (:func:`allocate`).

Candidates are GGUF block types (``Q2_K`` ... ``Q8_0``; K-quants only where the row is a multiple of
256, legacy types where it is a multiple of 32) or lowbit's native integer groups (``int2``,
``int3``, ``int4``, ``int8``, asymmetric groups of 128). The tied embedding is scored with the
``lm_head`` input Gram matrix (its use as the output projection).

Example::

    >>> plan = budget_plan(model, calib, bits_budget=4.5)             # doctest: +SKIP
    >>> states = plan_quant_states(model, plan)                       # doctest: +SKIP
    >>> export_gguf(model, "m.gguf", "Q8_0", quant_states=states)     # doctest: +SKIP
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch
from torch import nn

__all__ = ["GGUF_CANDIDATES", "NATIVE_CANDIDATES", "BudgetPlan", "input_hessians", "sensitivities", "allocate",
           "budget_plan", "plan_quant_states", "gptq_plan_states", "quantize_plan", "parse_size"]

GGUF_CANDIDATES = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
NATIVE_CANDIDATES = ("int2", "int3", "int4", "int8")
NATIVE_GROUP = 128


def parse_size(text) -> int:
    """Bytes of ``"90MB"``, ``"90 MB"``, ``"85.5MiB"``, ``"1.2GB"`` or a plain number of bytes.

    >>> parse_size("90MB"), parse_size("1MiB"), parse_size(1000)
    (90000000, 1048576, 1000)
    """
    if isinstance(text, (int, float)):
        return int(text)
    s = str(text).strip().upper().replace(" ", "")
    units = {"KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            return int(float(s[: -len(u)]) * f)
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(f"size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")


@dataclass
class BudgetPlan:
    """The chosen type per weight, with the figures that chose it."""

    types: Dict[str, str]
    bytes: Dict[str, int]
    errors: Dict[str, float]
    budget_bytes: int
    numel: Dict[str, int] = field(default_factory=dict)
    candidates: Sequence[str] = ()
    method: str = "rtn"

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def bits_per_weight(self) -> float:
        n = sum(self.numel.values())
        return 8 * self.total_bytes / n if n else float("nan")

    def summary(self) -> str:
        from collections import Counter

        c = Counter(self.types.values())
        mix = ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
        return (f"{len(self.types)} weights, {self.total_bytes / 1e6:.2f} MB of weights "
                f"({self.bits_per_weight:.3f} bits/weight, budget {self.budget_bytes / 1e6:.2f} MB): {mix}; "
                f"summed sensitivity {sum(self.errors.values()):.4g}")

    def to_json(self) -> dict:
        out = {"budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes,
               "bits_per_weight": self.bits_per_weight, "candidates": list(self.candidates),
               "weights": {k: {"type": self.types[k], "bytes": self.bytes[k], "sensitivity": self.errors[k],
                               "numel": self.numel.get(k)} for k in self.types}}
        if self.method != "rtn":  # (RTN plans keep their earlier bytes)
            out["method"] = self.method
        return out

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return path


# ---------------------------------------------------------------------------------------------
# statistics


def _weight_modules(model: nn.Module) -> Dict[str, nn.Linear]:
    """``{weight name: Linear}`` for every Linear (lm_head included, as the tied embedding's user)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[f"{name}.weight"] = mod
    return out


@torch.no_grad()
def input_hessians(model: nn.Module, calib: torch.Tensor, batch_size: int = 1) -> Dict[str, torch.Tensor]:
    """``{weight name: X^T X / n}`` (float32) of every Linear's inputs over the token batches ``calib [n, seq]``.

    Linears reading the very same input tensor (q/k/v, gate/up) share one matrix.
    """
    mods = _weight_modules(model)
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    alias: Dict[str, str] = {}
    seen: Dict[int, tuple] = {}

    def hook(name):
        def f(mod, inp, out):
            x0 = inp[0]
            prev = seen.get(id(x0))
            if prev is not None and prev[0] is x0:
                alias[name] = prev[1]
                return
            seen[id(x0)] = (x0, name)
            x = x0.detach().reshape(-1, x0.shape[-1]).float()
            g = x.t() @ x
            sums[name] = g if name not in sums else sums[name] + g
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    hooks = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    try:
        model.eval()
        dev = next(model.parameters()).device
        for i in range(0, calib.shape[0], batch_size):
            seen.clear()
            model(calib[i:i + batch_size].to(dev))
    finally:
        for h in hooks:
            h.remove()
        seen.clear()
    out = {n: (sums[n] / counts[n]).cpu() for n in sums}
    for n, src in alias.items():
        if n not in out:
            out[n] = out[src]
    return out


def _gguf_ok(t: str, k: int) -> bool:
    from lowbit.formats.kquants import is_kquant

    return k % (256 if is_kquant(t) else 32) == 0


def _quant_state(w: torch.Tensor, t: str):
    import lowbit

    if t.startswith("int"):
        return lowbit.quantize(w, f"{t}_asym", group_size=NATIVE_GROUP)
    return lowbit.quantize(w, t.lower())


def _state_bytes(st) -> int:
    n = 0
    for attr in ("data", "scales", "zeros"):
        v = getattr(st, attr, None)
        if isinstance(v, torch.Tensor):
            n += v.numel() * v.element_size()
    return n


@torch.no_grad()
def sensitivities(model: nn.Module, hessians: Dict[str, torch.Tensor], candidates: Sequence[str] = GGUF_CANDIDATES,
                  names: Optional[Iterable[str]] = None, progress: bool = False, method: str = "rtn",
                  keep_states: Optional[dict] = None):
    """``{weight: {type: (error, bytes)}}``: ``tr(E H E^T)`` of quantizing each weight alone, and its size.

    ``method="gptq"``: the error left by GPTQ onto each GGUF type (``gptq_quantize(W, H, gguf_type=t)``
    on the weight's own Hessian; the tied embedding stays RTN); ``keep_states`` (a dict) then receives
    ``{weight: {type: QuantState}}`` so that a plan's file is assembled without solving again
    (:func:`plan_quant_states` ``states=``).
    """
    import lowbit

    if method not in ("rtn", "gptq"):
        raise ValueError(f"method={method!r}: expected 'rtn' or 'gptq'")

    params = dict(model.named_parameters(remove_duplicate=False))
    tied_emb = "model.embed_tokens.weight" in params and "lm_head.weight" in params and \
        params["lm_head.weight"] is params["model.embed_tokens.weight"]
    names = list(names) if names is not None else [n for n in hessians if n in params]
    out = {}
    for i, name in enumerate(names):
        H = hessians[name]
        target = "model.embed_tokens.weight" if (name == "lm_head.weight" and tied_emb) else name
        w = params[target].detach().float().cpu()
        k = w.shape[1]
        res = {}
        for t in candidates:
            if not t.startswith("int") and not _gguf_ok(t, k):
                continue
            if method == "gptq" and not t.startswith("int") and target == name:
                from lowbit.algorithms.gptq import gptq_quantize

                st = gptq_quantize(w, H, gguf_type=t).state
            else:
                st = _quant_state(w, t)
            if keep_states is not None:
                keep_states.setdefault(target, {})[t] = st
            e = lowbit.dequantize(st).float() - w
            err = float(((e @ H) * e).sum())
            res[t] = (err, _state_bytes(st))
        out[target] = res
        if progress:
            print(f"  sensitivity {i + 1}/{len(names)} {target}: " +
                  ", ".join(f"{t} {v[0]:.3g}" for t, v in res.items()), flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# allocation


def allocate(sens: Dict[str, Dict[str, tuple]], budget_bytes: int) -> Dict[str, str]:
    """Types minimising the summed error with total bytes <= ``budget_bytes`` (Lagrangian + greedy upgrades).

    >>> s = {"a": {"x": (4.0, 1), "y": (1.0, 2)}, "b": {"x": (9.0, 1), "y": (0.0, 2)}}
    >>> allocate(s, 3)
    {'a': 'x', 'b': 'y'}
    """
    names = list(sens)
    smallest = sum(min(b for _, b in sens[n].values()) for n in names)
    if budget_bytes < smallest:
        raise ValueError(f"budget {budget_bytes / 1e6:.3f} MB is below the smallest possible plan "
                         f"({smallest / 1e6:.3f} MB with the smallest candidate everywhere)")

    def pick(lam):
        return {n: min(sens[n], key=lambda t: (sens[n][t][0] + lam * sens[n][t][1], sens[n][t][1])) for n in names}

    def size(ch):
        return sum(sens[n][ch[n]][1] for n in names)

    lo, hi = 0.0, 1.0
    while size(pick(hi)) > budget_bytes:
        hi *= 4
        if hi > 1e30:
            break
    if size(pick(lo)) <= budget_bytes:
        choice = pick(lo)
    else:
        for _ in range(100):
            mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
            if size(pick(mid)) <= budget_bytes:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        choice = pick(hi)
    # greedy upgrades with the leftover bytes
    used = size(choice)
    while True:
        best = None
        for n in names:
            e0, b0 = sens[n][choice[n]]
            for t, (e, b) in sens[n].items():
                if e < e0 and used - b0 + b <= budget_bytes:
                    gain = (e0 - e) / max(b - b0, 1)
                    if best is None or gain > best[0]:
                        best = (gain, n, t, b - b0)
        if best is None:
            break
        _, n, t, db = best
        choice[n] = t
        used += db
    return choice


def budget_plan(model: nn.Module, calib: torch.Tensor, *, bits_budget: Optional[float] = None,
                size_budget=None, candidates: Sequence[str] = GGUF_CANDIDATES, hessians=None,
                sens=None, progress: bool = False, method: str = "rtn",
                keep_states: Optional[dict] = None) -> BudgetPlan:
    """Measure sensitivities (unless given) and allocate types under ``bits_budget`` (bits per weight
    over the quantized weights, scales included) or ``size_budget`` (bytes of the quantized weights,
    e.g. ``"90MB"``). ``method``/``keep_states``: see :func:`sensitivities` (``"gptq"``: errors after
    GPTQ onto each type, and the solved states for :func:`plan_quant_states`)."""
    if (bits_budget is None) == (size_budget is None):
        raise ValueError("give exactly one of bits_budget (e.g. 4.5) or size_budget (e.g. '90MB')")
    if sens is None:
        if hessians is None:
            hessians = input_hessians(model, calib)
        sens = sensitivities(model, hessians, candidates, progress=progress, method=method, keep_states=keep_states)
    params = dict(model.named_parameters())
    numel = {n: params[n].numel() for n in sens}
    total = sum(numel.values())
    if bits_budget is not None:
        if not bits_budget > 0:
            raise ValueError(f"bits_budget={bits_budget!r}: must be positive")
        budget = int(bits_budget * total / 8)
    else:
        budget = parse_size(size_budget)
    types = allocate(sens, budget)
    return BudgetPlan(types=types, bytes={n: sens[n][t][1] for n, t in types.items()},
                      errors={n: sens[n][t][0] for n, t in types.items()}, budget_bytes=budget, numel=numel,
                      candidates=tuple(candidates), method=method)


def plan_quant_states(model: nn.Module, plan: BudgetPlan, states: Optional[dict] = None) -> dict:
    """``{weight: QuantState}`` of the plan (GGUF-layout states for GGUF types), for ``export_gguf``;
    ``states`` (from :func:`sensitivities` ``keep_states=``) supplies already solved ones."""
    params = dict(model.named_parameters())
    states = states or {}
    return {n: states[n][t] if t in states.get(n, {}) else _quant_state(params[n].detach().float().cpu(), t)
            for n, t in plan.types.items()}


def quantize_plan(model: nn.Module, plan: BudgetPlan, method: str = "gptq", calib=None, **method_options) -> dict:
    """Quantize ``model``'s Linears in place with a calibrated ``method`` (``"gptq"``) onto each weight's
    GGUF type of ``plan`` (K-quants included), in one sequential pass over ``calib``; returns the
    ``quant_states`` (RTN, llama.cpp's reference rounding) of the plan's other weights (the tied
    embedding, ``lm_head``) for ``export_gguf(model, path, "Q8_0", quant_states=...)``.

    Example::

        >>> states = quantize_plan(model, plan, "gptq", calib)                 # doctest: +SKIP
        >>> export_gguf(model, "m.gguf", "Q8_0", quant_states=states)          # doctest: +SKIP
    """
    from lowbit.model.sequential import quantize_model_ptq

    bad = [t for t in plan.types.values() if t.startswith("int")]
    if bad:
        raise ValueError(f"quantize_plan: method={method!r} onto native integer types ({sorted(set(bad))}) is not "
                         f"supported; GGUF plans only (or plan_quant_states for RTN)")
    mods = dict(model.named_modules())
    linears = {n[: -len(".weight")]: t for n, t in plan.types.items()
               if isinstance(mods.get(n[: -len(".weight")]), nn.Linear) and not n.startswith("lm_head")}
    params = dict(model.named_parameters())
    rest = {n: t for n, t in plan.types.items() if n[: -len(".weight")] not in linears}
    states = {n: _quant_state(params[n].detach().float().cpu(), t) for n, t in rest.items()}
    method_options.setdefault("progress", False)
    quantize_model_ptq(model, method=method, calib_dataset=calib, include=list(linears), gguf_type=linears,
                       **method_options)
    return states


def gptq_plan_states(model: nn.Module, plan: BudgetPlan, hessians: Dict[str, torch.Tensor],
                     cache: Optional[dict] = None, progress: bool = False) -> dict:
    """``{weight: QuantState}`` of the plan with every Linear weight GPTQ-solved onto its planned GGUF type
    on its own input Hessian (``hessians`` from :func:`input_hessians`, the float model's inputs: one
    solve per weight, no sequential pass); the tied embedding is rounded (llama.cpp's reference).
    ``cache`` (a dict, ``{weight: {type: QuantState}}``) keeps the solves for further plans.
    """
    from lowbit.algorithms.gptq import gptq_quantize

    params = dict(model.named_parameters())
    cache = {} if cache is None else cache
    out = {}
    for i, (n, t) in enumerate(plan.types.items()):
        hit = cache.get(n, {}).get(t)
        if hit is None:
            w = params[n].detach().float().cpu()
            if t.startswith("int"):
                raise ValueError(f"gptq_plan_states: {n} planned as {t}; GPTQ here targets GGUF types only")
            if n in hessians:
                hit = gptq_quantize(w, hessians[n].float(), gguf_type=t).state
            else:  # the tied embedding (its Hessian is lm_head's: GPTQ would trade its rows' use as embeddings)
                hit = _quant_state(w, t)
            cache.setdefault(n, {})[t] = hit
            if progress:
                print(f"  gptq {i + 1}/{len(plan.types)} {n}: {t}", flush=True)
        out[n] = hit
    return out
