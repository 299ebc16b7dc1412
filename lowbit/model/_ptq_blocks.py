"""Decoder blocks and their stages for the PTQ pipelines: selection of the linears, installation of the
quantized modules, the block list, the stages (linears sharing an input) and AWQ's fold targets, block-0 capture."""
from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.stats import InputStats
from lowbit.config import WeightOnlyConfig
from lowbit.model.api import _selected  # the one module-name matcher



# (preceding module, layers reading its output) inside a Llama/Mistral/Qwen-style decoder block
_FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


class _StopForward(Exception):
    """Raised by the capture hook on block 0 to end the model's forward early."""


def _select_linears(model: nn.Module, include, exclude) -> Dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear and _selected(n, include, exclude)}


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _install(module_parent: nn.Module, name: str, linear: nn.Linear, state) -> nn.Module:
    """Replace ``module_parent.<name>`` by a weight-only ``QLinear`` holding ``state``.

    Falls back to writing the dequantized weight into the ``nn.Linear`` (fake quantization) when
    the quantized module class is unavailable.
    """
    from lowbit.tensor.functional import dequantize

    try:
        from lowbit.nn import QLinear
    except ImportError:  # pragma: no cover - module glue not present
        QLinear = None
    if QLinear is not None and hasattr(QLinear, "from_quant_state"):
        new = QLinear.from_quant_state(linear, state)
    else:  # pragma: no cover
        with torch.no_grad():
            linear.weight.copy_(dequantize(state).to(linear.weight.dtype))
        new = linear
    _set_submodule(module_parent, name, new)
    return new


def find_blocks(model: nn.Module) -> Tuple[Optional[str], Optional[nn.ModuleList]]:
    """The decoder block list: the ``nn.ModuleList`` holding the most parameters whose blocks
    contain linear layers (``model.layers`` in Llama-style models). ``(None, None)`` if none."""
    best, best_name, best_n = None, None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if not all(any(isinstance(m, nn.Linear) for m in blk.modules()) for blk in mod):
                continue
            n = sum(p.numel() for p in mod.parameters())
            if n > best_n:
                best, best_name, best_n = mod, name, n
    return best_name, best


@dataclass
class _Stage:
    """Linears quantized together because they read the same input (q/k/v; gate/up)."""

    names: List[str]
    fold: Optional[str] = None  # module whose output these layers read, for AWQ scale folding
    stats: Optional[InputStats] = None
    partials: Dict[int, tuple] = field(default_factory=dict)
    done: bool = False
    states: Dict[str, Any] = field(default_factory=dict)
    input_scales: Optional[torch.Tensor] = None
    tie: Optional[torch.Tensor] = None  # GQA: o_proj input channel -> v_proj output row


def _block_stages(block: nn.Module, selected: Dict[str, nn.Linear], prefix: str) -> List[_Stage]:
    """Group the block's selected linears into stages (shared inputs) with their fold targets."""
    local = {n[len(prefix):]: n for n in selected if n.startswith(prefix)}
    mods = dict(block.named_modules())
    stages, used = [], set()
    for prev, consumers in _FOLDS:
        present = [c for c in consumers if c in local]
        if not present or any(c in used for c in present):
            continue
        fold = prev if prev in mods and _foldable(mods[prev], [mods[c] for c in consumers if c in mods]) else None
        if fold is not None and any(c not in mods for c in consumers):
            fold = None
        tie = None
        if fold is None and prev.endswith("v_proj") and prev in mods and consumers[0] in mods:
            tie = _gqa_tie(mods.get(prev.rsplit(".", 1)[0]), mods[prev], mods[consumers[0]])
            fold = prev if tie is not None else None
        stages.append(_Stage([local[c] for c in present], fold=None if fold is None else prefix + fold, tie=tie))
        used.update(present)
    for short, full in local.items():
        if short not in used:
            stages.append(_Stage([full]))
    return stages


def _gqa_tie(attn: Optional[nn.Module], v: nn.Module, o: nn.Module) -> Optional[torch.Tensor]:
    """For grouped-query attention, the v_proj row feeding each o_proj input channel (else None)."""
    hd = getattr(attn, "head_dim", None)
    groups = getattr(attn, "num_key_value_groups", None)
    if not (isinstance(v, nn.Linear) and isinstance(o, nn.Linear) and isinstance(hd, int) and isinstance(groups, int)):
        return None
    if v.out_features * groups != o.in_features or v.out_features % hd:
        return None
    j = torch.arange(o.in_features)
    return (j // hd) // groups * hd + j % hd


def _foldable(prev: nn.Module, consumers: List[nn.Module]) -> bool:
    if not consumers or not all(isinstance(c, nn.Linear) for c in consumers):
        return False
    k = consumers[0].in_features
    if any(c.in_features != k for c in consumers):
        return False
    if isinstance(prev, nn.Linear):
        return prev.out_features == k
    w = getattr(prev, "weight", None)
    # norms with a plain multiplicative weight (RMSNorm/LayerNorm); Gemma-style (1 + w) norms are not
    if w is None or w.dim() != 1 or w.numel() != k or "gemma" in type(prev).__name__.lower():
        return False
    return True


def _calibration_tokens(model, calib_dataset, tokenizer, n_samples, seq_len, seed) -> torch.Tensor:
    if isinstance(calib_dataset, torch.Tensor):
        ids = calib_dataset
        if ids.dim() == 1:
            n = ids.numel() // seq_len
            ids = ids[: n * seq_len].reshape(n, seq_len)
        return ids[:n_samples].long()
    from lowbit.data.calibration import get_calibration_data

    return get_calibration_data(tokenizer, calib_dataset, n_samples=n_samples, seq_len=seq_len, seed=seed)


def _peak_memory(device: torch.device) -> Tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process peak RSS"


def _progress(iterable=None, total=None, desc="", enabled=True, leave=True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, dynamic_ncols=True)


def _capture_block0(model: nn.Module, block0: nn.Module, ids: torch.Tensor, batch_size: int,
                    device: torch.device) -> List[Tuple[tuple, dict]]:
    captured: List[Tuple[tuple, dict]] = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    h = block0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[i:i + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        h.remove()
    if not captured:
        raise RuntimeError("the calibration forward never reached the first decoder block")
    return captured


def _first_tensor(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _rtn_fallback(weight: torch.Tensor, qcfg: WeightOnlyConfig):
    """A layer no calibration sample reached: round to nearest on the method's grid."""
    return rtn_quantize(weight, qcfg.bits, qcfg.group_size, qcfg.sym, gguf_type=getattr(qcfg, "gguf_type", None))


def _to_device_except(model: nn.Module, blocks: nn.ModuleList, device: torch.device,
                      keep: Optional[list] = None, skip: Optional[set] = None) -> None:
    """Move every parameter and buffer outside ``blocks`` to ``device``. ``keep`` (a list): the tensors left
    behind are appended to it, for :func:`_restore_kept`. ``skip``: ids of tensors left where they are."""
    inside = set(skip or ())
    for b in blocks:
        inside.update(id(t) for t in b.parameters())
        inside.update(id(t) for t in b.buffers())
    seen = set()  # a tied parameter is met once per module holding it: keep its first (home) tensor only
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in inside and p.device != device:
                if keep is not None and id(p) not in seen:
                    seen.add(id(p))
                    keep.append((p, None, None, p.data))
                p.data = p.data.to(device)  # same Parameter object: tied weights stay tied
        for key, b in list(mod._buffers.items()):
            if b is not None and id(b) not in inside and b.device != device:
                if keep is not None:
                    keep.append((None, mod, key, b))
                mod._buffers[key] = b.to(device)


def _restore_kept(keep: list) -> None:
    """Put back the tensors :func:`_to_device_except` left behind (``keep``), instead of copying the device
    copies back: for parameters and buffers the run did not change (the 8B embedding is 1 GB each way)."""
    for p, mod, key, t in reversed(keep):
        if p is not None:
            p.data = t
        else:
            mod._buffers[key] = t
    keep.clear()
