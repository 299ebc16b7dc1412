"""2:4 semi-structured sparsity as dispatcher methods: ``sparse-2:4``, ``sparse-2:4-int8``, ``sparse-2:4-int4``.

``lowbit.quantize(model, method="sparse-2:4-int8", calib_dataset="valid.txt", tokenizer=tok)``
prunes every selected ``nn.Linear`` (``lm_head`` excluded by default) to 2 non-zeros in every 4
consecutive input columns and installs:

* ``sparse-2:4``: :class:`lowbit.nn.sparse.SparseLinear` with the float weight (fp16/bf16 sparse
  tensor cores on CUDA);
* ``sparse-2:4-int8``: ``SparseLinear`` W8A8 (int8 per-channel weights, int8 per-token dynamic
  activations, sparse int8 tensor cores);
* ``sparse-2:4-int4`` (or ``sparse-2:4`` with ``bits=4``): a weight-only int4 ``QLinear``
  (group-wise) whose dequantized weight is 2:4 sparse (storage 4 bits; the matmul is the dense 4-bit one).

``algorithm="sparsegpt"`` (default) is Hessian-aware (:func:`lowbit.algorithms.sparsegpt.sparsegpt_prune`)
on the same block-by-block pipeline and calibration statistics as GPTQ
(:mod:`lowbit.model.sequential`: one pass per decoder block, q/k/v and gate/up sharing one Hessian,
later layers seeing the outputs of the pruned earlier ones); quantization, when asked for, is joint
(the OBS update compensates the rounding too). ``algorithm="magnitude"`` needs no data (then int8 /
int4 is round-to-nearest of the kept weights).

The summary is stored as ``model.sparsity_summary`` (and ``model.ptq_summary`` for the reports).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Dict, Optional, Sequence

import torch
from torch import nn

from lowbit.algorithms.grid import columns
from lowbit.algorithms.sparsegpt import magnitude_prune, quantize_kept, sparsegpt_prune
from lowbit.config import Sparse24Config, Sparse24Int4Config, Sparse24Int8Config
from lowbit.model.methods import register_method
from lowbit.model.plan import Cost

logger = logging.getLogger(__name__)

ALGORITHMS = ("sparsegpt", "magnitude")


@dataclasses.dataclass
class _Pruned:
    """What one layer became: the pruned (and quantized) float weight, and the integer form."""

    weight: torch.Tensor
    bits: Optional[int] = None
    codes: Optional[torch.Tensor] = None
    scales: Optional[torch.Tensor] = None
    zeros: Optional[torch.Tensor] = None
    group_size: int = -1
    sym: bool = True


def _int8_channel_state(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
    """Symmetric int8 per-output-channel QuantState (codes ``q + 128``) from grid codes and ``[N, 1]`` scales."""
    from lowbit.tensor.functional import quantize_tensor

    N, K = codes.shape
    proto = quantize_tensor(torch.zeros(1, 4, dtype=dtype), scheme="int8", axis=0)
    return dataclasses.replace(proto, shape=(N, K), data=codes.to(torch.uint8).reshape(-1).contiguous(),
                               scales=scales.reshape(N).float().contiguous().clone())


def _install(model: nn.Module, name: str, lin: nn.Linear, pr: _Pruned) -> nn.Module:
    from lowbit.model.sequential import _set_submodule
    from lowbit.nn.sparse import SparseLinear

    with torch.no_grad():
        lin.weight.copy_(pr.weight.to(lin.weight.device, lin.weight.dtype))
    if pr.bits is None:
        new = SparseLinear.from_pruned(lin)
    elif pr.bits == 8 and pr.group_size == lin.in_features and pr.sym:
        st = _int8_channel_state(pr.codes, pr.scales, lin.weight.dtype).to(lin.weight.device)
        new = SparseLinear.from_pruned(lin, state=st)
    else:
        from lowbit.algorithms.grid import to_state
        from lowbit.nn import QLinear

        st = to_state(pr.codes, pr.scales, pr.zeros, pr.bits, pr.group_size, pr.sym, lin.weight.dtype)
        new = QLinear.from_quant_state(lin, st.to(lin.weight.device))
    _set_submodule(model, name, new)
    return new


def _magnitude(w: torch.Tensor, bits, group_size, sym) -> _Pruned:
    pw, mask = magnitude_prune(w.float())
    if bits is None:
        return _Pruned(pw)
    w_hat, codes, scales, zeros = quantize_kept(pw, mask, bits, group_size, sym)
    g = columns(w.shape[1], group_size).group
    return _Pruned(w_hat, bits, codes, scales, zeros, g, sym)


def _split(res, names, ws) -> Dict[str, _Pruned]:
    out, start = {}, 0
    for n, w in zip(names, ws):
        sl = slice(start, start + w.shape[0])
        start += w.shape[0]
        if res.bits is None:
            out[n] = _Pruned(res.weight[sl])
        else:
            out[n] = _Pruned(res.weight[sl], res.bits, res.codes[sl], res.scales[sl], res.zeros[sl], res.group_size,
                             res.sym)
    return out


def prune_model_24(model: nn.Module, *, algorithm: str = "sparsegpt", bits: Optional[int] = None,
                   group_size: int = -1, sym: bool = True, include: Optional[Sequence[str]] = None,
                   exclude: Optional[Sequence[str]] = ("lm_head",), calib_dataset: Any = None, tokenizer: Any = None,
                   n_samples: int = 128, seq_len: int = 512, seed: int = 0, device: Any = None, progress: bool = True,
                   batch_size: int = 8, percdamp: float = 0.01, blocksize: int = 128) -> nn.Module:
    """Prune the selected linears of ``model`` to 2:4 (in place) and install the sparse modules."""
    from lowbit.model import sequential as seq

    algorithm = str(algorithm).lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm={algorithm!r}: expected one of {ALGORITHMS}")
    if bits is not None and bits not in (2, 3, 4, 8):
        raise ValueError(f"bits={bits!r}: expected None (float), 8 or 4 (2 and 3 also work)")
    if bits == 8 and (group_size not in (-1, None) or not sym):
        raise ValueError("2:4 int8 is W8A8 with symmetric per-channel weights: group_size=-1, sym=True")
    if algorithm == "sparsegpt" and calib_dataset is None:
        raise ValueError("algorithm='sparsegpt' needs calib_dataset= (token ids [n, seq_len], a text file or "
                         "'default'; with tokenizer=) for its Hessians; use algorithm='magnitude' for no data")
    t0 = time.perf_counter()
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    selected = seq._select_linears(model, include, exclude)
    if not selected:
        raise ValueError(f"no nn.Linear selected (include={include!r}, exclude={exclude!r})")
    bad = [n for n, lin in selected.items() if lin.in_features % 4]
    if bad:
        raise ValueError(f"2:4 sparsity groups 4 input columns, but {bad[0]!r} has in_features="
                         f"{selected[bad[0]].in_features} (and {len(bad) - 1} more); exclude such layers (exclude=[...])")
    if bits is not None and group_size not in (-1, None):
        bad = [n for n, lin in selected.items() if lin.in_features % group_size]
        if bad:
            raise ValueError(f"group_size={group_size} does not divide in_features={selected[bad[0]].in_features} "
                             f"of {bad[0]!r}")
    pruned: Dict[str, _Pruned] = {}
    extra: Dict[str, Any] = {}
    if algorithm == "magnitude":
        for name, lin in selected.items():
            pruned[name] = _magnitude(lin.weight.detach().to(device), bits, group_size, sym)
            _install(model, name, lin, pruned[name])
    else:
        ids = seq._calibration_tokens(model, calib_dataset, tokenizer, n_samples, seq_len, seed)
        extra["calib_tokens"] = int(ids.numel())
        opts = {"bits": bits, "group_size": group_size, "sym": sym, "percdamp": percdamp, "blocksize": blocksize}
        _run_sparsegpt(model, selected, ids, opts, device, home, batch_size, progress, pruned)
    n_total = sum(lin.weight.numel() for lin in selected.values())
    nz = sum(int((p.weight != 0).sum()) for p in pruned.values())
    summary = {"method": f"sparse-2:4{'' if bits is None else f'-int{bits}'}", "algorithm": algorithm, "bits": bits,
               "group_size": group_size, "n_layers": len(pruned), "time_s": time.perf_counter() - t0,
               "sparsity": 1.0 - nz / max(n_total, 1),
               "bits_per_weight": float(bits) if bits is not None else float(torch.finfo(
                   next(iter(selected.values())).weight.dtype).bits), **extra}
    model.sparsity_summary = summary
    model.ptq_summary = summary
    logger.info("lowbit 2:4 (%s): %d layers in %.1f s, sparsity %.3f", algorithm, len(pruned), summary["time_s"],
                summary["sparsity"])
    return model


def _run_sparsegpt(model, selected, ids, opts, device, home, batch_size, progress, pruned) -> None:
    """GPTQ's block-by-block pipeline (:mod:`lowbit.model.sequential`) with the SparseGPT solve per stage."""
    from lowbit.model import sequential as seq

    def stage_fn(stage, modules) -> None:
        H = stage.stats.hessian()
        ws = [modules[n].weight.detach() for n in stage.names]
        res = sparsegpt_prune(torch.cat(ws, 0).float(), H, **opts)
        for n, pr in _split(res, stage.names, ws).items():
            stage.states[n] = pr
            with torch.no_grad():  # the rest of the block sees the pruned layer
                modules[n].weight.copy_(pr.weight.to(modules[n].weight.dtype))

    def run(stages, modules, fn, chunks, desc):
        bar = seq._progress(total=sum(len(s.names) for s in stages), desc=f"  {desc} layers", enabled=progress,
                            leave=False)
        runner = seq._Staged(stages, modules, lambda st: stage_fn(st, modules), True, False,
                             on_stage_done=lambda st: bar.update(len(st.names)))
        outs = runner.run(fn, chunks)
        bar.close()
        for stage in stages:
            for n in stage.names:
                if not stage.done:  # no chunk reached this layer: magnitude pruning
                    stage.states[n] = _magnitude(modules[n].weight.detach(), opts["bits"], opts["group_size"],
                                                 opts["sym"])
                pruned[n] = stage.states[n]
        return outs

    blocks_name, blocks = seq.find_blocks(model)
    if blocks is None:
        stages = [seq._Stage([n]) for n in selected]
        chunks = [ids[i:i + batch_size].to(device) for i in range(0, ids.shape[0], batch_size)]
        model.to(device)
        run(stages, selected, lambda x: model(x), chunks, "model")
        model.to(home)
    else:
        seq._to_device_except(model, blocks, device)
        captured = seq._capture_block0(model, blocks[0], ids, batch_size, device)
        inside = set()
        bar = seq._progress(total=len(blocks), desc="sparsegpt blocks", enabled=progress)
        for bi, block in enumerate(blocks):
            prefix = f"{blocks_name}.{bi}." if blocks_name else f"{bi}."
            block_home = next(block.parameters()).device
            block.to(device)
            sel = {n: m for n, m in selected.items() if n.startswith(prefix)}
            inside.update(sel)

            def run_block(item, block=block):
                args, kwargs = item
                return seq._first_tensor(block(*args, **kwargs))

            outs = run(seq._block_stages(block, sel, prefix), sel, run_block, captured, f"block {bi}")
            captured = [((o,) + tuple(a[1:]), kw) for o, (a, kw) in zip(outs, captured)]
            block.to(block_home)
            bar.update(1)
        bar.close()
        rest = {n: m for n, m in selected.items() if n not in inside}
        if rest:
            chunks = [ids[i:i + batch_size].to(device) for i in range(0, ids.shape[0], batch_size)]
            run([seq._Stage([n]) for n in rest], rest, lambda x: model(input_ids=x, use_cache=False), chunks,
                "outside blocks")
        seq._to_device_except(model, blocks, home)
    for name, lin in selected.items():
        _install(model, name, lin, pruned[name])


_PLAN_FP = {"calibrated": True, "hessian": True, "weight_bits": None, "scale_bytes": 0}
_PLAN_INT8 = {"calibrated": True, "hessian": True, "weight_bits": 8, "scale_bytes": 4, "group": -1}
_PLAN_INT4 = {"calibrated": True, "hessian": True, "weight_bits": 4, "scale_bytes": 4, "group": 128}


def _sparse(model: nn.Module, config) -> nn.Module:
    """2:4 pruning of every selected Linear (the config says float, int8 W8A8 or int4 weight-only)."""
    return prune_model_24(model, **config.prune_kwargs())


register_method("sparse-2:4", config=Sparse24Config, calibrated=True, cost=Cost.from_dict(_PLAN_FP),
                description="2:4 semi-structured sparsity (SparseGPT or magnitude), sparse tensor cores")(_sparse)
register_method("sparse-2:4-int8", config=Sparse24Int8Config, calibrated=True, cost=Cost.from_dict(_PLAN_INT8),
                description="2:4 sparsity + W8A8 int8 (per-channel weights, per-token activations)")(_sparse)
register_method("sparse-2:4-int4", config=Sparse24Int4Config, calibrated=True, cost=Cost.from_dict(_PLAN_INT4),
                description="2:4 sparsity + int4 weight-only (groups of 128), dense 4-bit execution")(_sparse)


__all__ = ["prune_model_24", "ALGORITHMS"]
