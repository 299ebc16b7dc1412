"""What the calibrated PTQ pipelines do to one stage: the GPTQ / AWQ solves (spread over the ranks of a
data-parallel run), the installation of the quantized linears and AWQ's scale folding."""
from __future__ import annotations

from typing import Any, Callable, Dict

import torch
from torch import nn

from lowbit.algorithms.awq import awq_search
from lowbit.algorithms.gptq import GPTQResult, gptq_factor, gptq_quantize

from lowbit.model._ptq_blocks import _Stage, _install


def _solve_owner(i: int) -> int:
    """The rank that solves unit ``i`` of a stage (round robin); 0 when not distributed."""
    from lowbit.model.distributed import rank_world

    return i % rank_world()[1]


def _on_owner(owner: int, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank ``owner``, its result broadcast to every rank (just ``fn()`` in one process)."""
    from lowbit.model.distributed import broadcast_object, is_active, rank_world

    if not is_active():
        return fn()
    res = fn() if rank_world()[0] == owner else None
    return broadcast_object(res, owner)


def _gptq_stage(stage: _Stage, modules: Dict[str, nn.Linear], bits, group_size, sym, opts) -> None:
    """GPTQ each linear of the stage on the stage's shared Hessian (one solve unit per linear, spread
    over the ranks of a data-parallel run)."""
    H = stage.stats.hessian().float().to(modules[stage.names[0]].weight.device)
    factor = gptq_factor(H, opts.get("percdamp", 0.01), opts.get("act_order", True))
    from lowbit.model.distributed import broadcast_tensors, is_active, rank_world

    for i, n in enumerate(stage.names):
        w = modules[n].weight.detach()
        owner = _solve_owner(i)
        if is_active() and opts.get("gguf_type") is None:  # plain tensors: broadcast them directly
            if rank_world()[0] == owner:
                res = gptq_quantize(w, H, bits, group_size, sym, factor=factor, **opts)
                tensors = [res.codes.contiguous(), res.scales.contiguous(), res.zeros.contiguous()]
            else:
                g = w.shape[1] if group_size in (-1, None) else group_size
                G = -(-w.shape[1] // g)
                res = GPTQResult(codes=torch.empty(w.shape, dtype=torch.uint8, device=w.device),
                                 scales=torch.empty(w.shape[0], G, device=w.device),
                                 zeros=torch.empty(w.shape[0], G, device=w.device), loss=0.0, damp=factor[4],
                                 bits=bits, group_size=g, sym=sym, dtype=w.dtype)
                tensors = [res.codes, res.scales, res.zeros]
            broadcast_tensors(tensors, owner)
            res.codes, res.scales, res.zeros = tensors
        else:
            res = _on_owner(owner, lambda w=w: gptq_quantize(w, H, bits, group_size, sym, factor=factor, **opts))
        dev = w.device
        res.codes, res.scales, res.zeros = res.codes.to(dev), res.scales.to(dev), res.zeros.to(dev)
        stage.states[n] = res.state
        with torch.no_grad():
            modules[n].weight.copy_(res.dequantize().to(w.dtype))


def _awq_stage(stage: _Stage, modules: Dict[str, nn.Linear], bits, group_size, sym, opts) -> None:
    opts = dict(opts)
    if not opts.pop("gqa_tie", False) and stage.tie is not None:  # o_proj under GQA: clip search only
        stage.fold, stage.tie = None, None
    H = stage.stats.hessian().float()
    mean = stage.stats.act_absmean().float()
    ws = [modules[n].weight.detach() for n in stage.names]
    res = _on_owner(_solve_owner(len(stage.names) - 1),
                    lambda: awq_search(ws, H, mean, bits, group_size, sym, scale_search=stage.fold is not None,
                                       tie=stage.tie, **opts))
    dev = ws[0].device
    if stage.fold is None:
        stage.input_scales = None
    else:
        stage.input_scales = (res.tied_scales if stage.tie is not None else res.input_scales).to(dev)
    for n, st, w_eff in zip(stage.names, res.states, res.effective_weights):
        stage.states[n] = st.to(dev)
        with torch.no_grad():  # mathematically the folded pair: (x / s) @ Q(W s)^T
            modules[n].weight.copy_(w_eff.to(dev).to(modules[n].weight.dtype))


def _fold_awq(root: nn.Module, stage: _Stage, installed: Dict[str, nn.Module]) -> None:
    """Divide the preceding op's output by ``s`` (norm weight, or a linear's rows / its state)."""
    s = stage.input_scales
    if s is None:
        return
    prev_name = stage.fold
    prev = installed.get(prev_name) or root.get_submodule(prev_name)
    with torch.no_grad():
        state = getattr(prev, "_lowbit_ptq_state", None)
        if state is not None and state.layout == "gguf":  # raw llama.cpp blocks: divide d (and m) per row
            from lowbit.formats.gguf import scale_rows

            state.data.copy_(scale_rows(state.data, state.scheme, s.to(state.data.device)))
            if hasattr(prev, "set_quant_state"):
                prev.set_quant_state("weight", state)
        elif state is not None:  # an already quantized linear: scale its per-row scales
            state.scales.div_(s.to(state.scales.device).unsqueeze(1))
            if hasattr(prev, "set_quant_state"):
                prev.set_quant_state("weight", state)
        else:
            prev.weight.div_(s.to(prev.weight.device).view(-1, *([1] * (prev.weight.dim() - 1))))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.div_(s.to(bias.device))


def _install_stages(model, stages, modules, states) -> None:
    installed: Dict[str, nn.Module] = {}
    for stage in stages:
        for n in stage.names:
            lin = modules[n]
            st = stage.states[n].to(lin.weight.device)
            new = _install(model, n, lin, st)
            new._lowbit_ptq_state = st
            installed[n] = new
            states[n] = st
    for stage in stages:
        if stage.input_scales is not None:
            _fold_awq(model, stage, installed)
