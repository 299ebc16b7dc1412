"""Model-level weight-only PTQ (RTN, AWQ, GPTQ, HQQ) on a memory-bounded, block-by-block pipeline.

Calibrated methods (GPTQ, AWQ) run the decoder one block at a time, as in GPTQ's reference
``llama.py`` sequential loop:

1. the inputs of block 0 are captured by a hook that stops the forward (``_StopForward``);
2. the block runs over all calibration chunks **once**. Every chunk runs in its own thread; a
   pre-hook on each selected linear adds the chunk's input to the layer's statistics (sums:
   ``X^T X``, ``sum |x|``, token count; :class:`lowbit.algorithms.stats.InputStats`) and waits
   until every chunk has reached that layer. The layer (or the group of layers that share its
   input: q/k/v, gate/up) is then quantized, and all chunks go on through the *quantized* layer.
   This is true-sequential quantization (o_proj sees the outputs of the quantized q/k/v, down_proj
   those of the quantized gate/up) at the cost of a single pass over the block, and the block's
   outputs, computed through the quantized layers, are the next block's inputs;
3. only the block being worked on (and the calibration activations) needs to sit on ``device``;
   the other blocks stay where they are (e.g. on the CPU).

Models without a list of decoder blocks are handled the same way with the whole model as one
block (whole-model statistics). Data-free methods (RTN, HQQ) quantize layer by layer directly.

AWQ's input scales are folded into the preceding RMSNorm/LayerNorm (q/k/v, gate/up) or the
preceding linear's rows (o_proj from v_proj when the shapes agree, down_proj from up_proj);
layers with no such predecessor get the clipping search only.

Example::

    >>> model = quantize_model_ptq(model, method="gptq", bits=4, group_size=128, sym=False,
    ...                            calib_dataset="valid.txt", tokenizer=tok, n_samples=128, seq_len=512)
    >>> model.ptq_summary["bits_per_weight"]                                  # doctest: +SKIP
    4.25
"""
from __future__ import annotations

import fnmatch
import logging
import resource
import threading
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.awq import awq_search
from lowbit.algorithms.gptq import GPTQResult, gptq_factor, gptq_quantize
from lowbit.algorithms.hqq import hqq_quantize
from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.stats import InputStats, gram

logger = logging.getLogger(__name__)

PTQ_METHODS = ("rtn", "awq", "gptq", "hqq")
CALIBRATED = ("awq", "gptq")

_GPTQ_KEYS = ("percdamp", "blocksize", "act_order", "static_groups", "group_objective", "refit", "n_grid",
              "max_shrink", "gguf_type", "two_sided")
_AWQ_KEYS = ("n_grid", "duo_scaling", "clip", "max_shrink", "clip_grid", "gqa_tie", "two_sided", "joint", "refine",
             "gguf_type")
_HQQ_KEYS = ("lp_norm", "beta", "kappa", "iters", "optimize_scale", "init", "early_stop")
_RTN_KEYS = ("search", "n_grid", "max_shrink", "refine", "gguf_type")
METHOD_OPTIONS = {"gptq": _GPTQ_KEYS, "awq": _AWQ_KEYS, "hqq": _HQQ_KEYS, "rtn": _RTN_KEYS}

# (preceding module, layers reading its output) inside a Llama/Mistral/Qwen-style decoder block
_FOLDS = (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("mlp.up_proj", ("mlp.down_proj",)),
)


class _StopForward(Exception):
    """Raised by the capture hook on block 0 to end the model's forward early."""


# ---------------------------------------------------------------------------------------------
# selection, installation, structure


def _selected(name: str, include: Optional[Sequence[str]], exclude: Optional[Sequence[str]]) -> bool:
    def match(p: str) -> bool:
        return fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*.{p}") or name == p

    if include is not None and not any(match(p) for p in include):
        return False
    if exclude and any(match(p) for p in exclude):
        return False
    return True


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


# ---------------------------------------------------------------------------------------------
# the staged, one-pass runner


class _Staged:
    """Runs ``fn(chunk)`` for every chunk in its own thread; the pre-hooks of the stages' linears
    gather statistics and quantize a stage once every live chunk waits on it (see module doc)."""

    def __init__(self, stages: List[_Stage], modules: Dict[str, nn.Linear], quantize_stage: Callable[[_Stage], None],
                 need_hessian: bool, need_absmean: bool, on_stage_done: Optional[Callable[[_Stage], None]] = None):
        self.stages = stages
        self.modules = modules
        self.quantize_stage = quantize_stage
        self.need_hessian, self.need_absmean = need_hessian, need_absmean
        self.on_stage_done = on_stage_done
        self.cond = threading.Condition()
        self.live = 0
        self.waiting: Dict[int, int] = {}
        self.n_waiting = 0
        self.error: Optional[BaseException] = None
        self.stage_of: Dict[str, int] = {n: i for i, st in enumerate(stages) for n in st.names}
        self.local = threading.local()

    def _reduce(self, stage: _Stage) -> None:
        """Sum the per-chunk statistics in chunk order into ``stage.stats``."""
        stats = None
        for chunk in sorted(stage.partials):
            xtx, asum, count, k, dev = stage.partials[chunk]
            if stats is None:
                stats = InputStats(k, hessian=self.need_hessian, absmean=self.need_absmean, device=dev)
            if xtx is not None:
                stats.xtx += xtx
            if asum is not None:
                stats.abs_sum += asum
            stats.count += count
        stage.stats = stats
        stage.partials = {}

    def _hook(self, name: str):
        idx = self.stage_of[name]
        stage = self.stages[idx]

        def pre_hook(module, args, kwargs):
            if stage.done:
                return None
            x = args[0] if args else kwargs["input"]
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            xtx = gram(x2) if self.need_hessian else None
            asum = x2.abs().sum(0) if self.need_absmean else None
            with self.cond:
                if stage.done:
                    return None
                if self.error is not None:
                    raise RuntimeError("calibration aborted") from self.error
                # per-chunk partial sums, added in chunk order at quantization time: deterministic
                chunk = getattr(self.local, "chunk", 0)
                prev = stage.partials.get(chunk)
                if prev is not None:
                    xtx = None if xtx is None else xtx + prev[0]
                    asum = None if asum is None else asum + prev[1]
                stage.partials[chunk] = (xtx, asum, x2.shape[0] + (prev[2] if prev else 0), x.shape[-1], x.device)
                self.waiting[idx] = self.waiting.get(idx, 0) + 1
                self.n_waiting += 1
                self._release_locked()
                while not stage.done and self.error is None:
                    self.cond.wait()
                if self.error is not None:
                    raise RuntimeError("calibration aborted") from self.error
            return None

        return pre_hook

    def _release_locked(self) -> None:
        # every live chunk is blocked: quantize the earliest stage someone waits on
        while self.n_waiting and self.n_waiting == self.live and self.error is None:
            idx = min(self.waiting)
            stage = self.stages[idx]
            try:
                self._reduce(stage)
                self.quantize_stage(stage)
            except BaseException as e:  # propagate to every worker, re-raised in run()
                self.error = e
                self.cond.notify_all()
                return
            stage.done = True
            stage.stats = None
            self.n_waiting -= self.waiting.pop(idx)
            if self.on_stage_done is not None:
                self.on_stage_done(stage)
            self.cond.notify_all()

    def run(self, fn: Callable[[Any], Any], chunks: List[Any]) -> List[Any]:
        handles = [self.modules[n].register_forward_pre_hook(self._hook(n), with_kwargs=True) for n in self.stage_of]
        outs: List[Any] = [None] * len(chunks)
        self.live = len(chunks)

        def worker(i: int) -> None:
            self.local.chunk = i
            try:
                with torch.no_grad():
                    outs[i] = fn(chunks[i])
            except BaseException as e:
                with self.cond:
                    if self.error is None:
                        self.error = e
                    self.cond.notify_all()
            finally:
                with self.cond:
                    self.live -= 1
                    self._release_locked()

        try:
            threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(chunks))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for h in handles:
                h.remove()
        if self.error is not None:
            raise self.error
        # stages never reached by any chunk (conditional layers): quantize them without data
        return outs


# ---------------------------------------------------------------------------------------------
# methods applied to one stage


def _split_options(method: str, options: Dict[str, Any]) -> Dict[str, Any]:
    allowed = METHOD_OPTIONS[method]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"method {method!r} does not accept option(s) {', '.join(map(repr, bad))}; "
                         f"accepted: {', '.join(allowed)}")
    return dict(options)


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


def _layer_opts(opts: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``opts`` for one linear: a per-linear ``gguf_type`` mapping (``{linear name: GGUF type}``, e.g. a
    llama.cpp recipe or a budget plan resolved per weight) replaced by that linear's type."""
    t = opts.get("gguf_type")
    if not isinstance(t, dict):
        return opts
    if name not in t:
        raise ValueError(f"gguf_type mapping has no type for the linear {name!r} ({len(t)} linears mapped)")
    return {**opts, "gguf_type": t[name]}


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
                res = gptq_quantize(w, H, bits, group_size, sym, factor=factor, **_layer_opts(opts, n))
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
            res = _on_owner(owner, lambda w=w, n=n: gptq_quantize(w, H, bits, group_size, sym, factor=factor,
                                                                  **_layer_opts(opts, n)))
        dev = w.device
        res.codes, res.scales, res.zeros = res.codes.to(dev), res.scales.to(dev), res.zeros.to(dev)
        stage.states[n] = res.state
        with torch.no_grad():
            modules[n].weight.copy_(res.dequantize().to(w.dtype))


def _awq_stage(stage: _Stage, modules: Dict[str, nn.Linear], bits, group_size, sym, opts) -> None:
    types = {str(_layer_opts(opts, n).get("gguf_type")) for n in stage.names}
    if len(types) > 1:  # one scale search per stage: its linears share one grid
        raise ValueError(f"AWQ: the linears {stage.names} share an input-scale search but map to GGUF types {types}")
    opts = dict(_layer_opts(opts, stage.names[0]))
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


# ---------------------------------------------------------------------------------------------
# driver


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


def quantize_model_ptq(model: nn.Module, method: str = "rtn", bits: int = 4, group_size: int = 128, sym: bool = True,
                       include: Optional[Sequence[str]] = None, exclude: Optional[Sequence[str]] = ("lm_head",),
                       calib_dataset: Any = None, n_samples: int = 128, seq_len: int = 512, seed: int = 0,
                       device: Any = None, progress: bool = True, tokenizer: Any = None, batch_size: int = 8,
                       micro_batch: Optional[int] = None, max_memory: Any = None, offload_dir: Optional[str] = None,
                       checkpoint_dir: Optional[str] = None, resume: bool = False, pipeline: str = "auto",
                       **method_options: Any) -> nn.Module:
    """Weight-only PTQ of every selected ``nn.Linear`` of ``model`` (in place); returns ``model``.

    ``method``: ``"rtn"``, ``"hqq"`` (data-free) or ``"gptq"``, ``"awq"`` (calibrated on
    ``calib_dataset``: a token tensor ``[n, seq_len]``, or anything
    :func:`lowbit.data.calibration.get_calibration_data` accepts, tokenized with ``tokenizer``).
    ``include``/``exclude``: fnmatch patterns on module names (a bare name also matches as a
    suffix, so ``"lm_head"`` excludes ``model.lm_head``). ``method_options`` go to the algorithm
    (e.g. ``percdamp``, ``act_order``, ``group_objective`` for GPTQ; ``n_grid``, ``clip`` for AWQ).

    Calibration memory (see the module doc): samples go through each block ``micro_batch`` at a time
    (default ``batch_size``); the activations kept between passes stay on ``device`` within
    ``max_memory`` (bytes or ``"1.5GB"``: the peak the run may reach on the device, default what the
    device has free) and are offloaded beyond it (pinned host memory, then files under
    ``offload_dir``, default the system temp dir). The codes do not depend on ``micro_batch`` nor on
    ``max_memory``.

    ``checkpoint_dir``: after every block, its quantized states and the next block's inputs are
    written there atomically; ``resume=True`` restarts from the last finished block found there
    (bit-identical result). Under ``torchrun`` (``torch.distributed`` initialised) the samples are
    shared between the ranks (:mod:`lowbit.model.distributed`).

    The summary (time, bits per weight, sizes, peak memory) is logged and stored as
    ``model.ptq_summary``.
    """
    from lowbit.model.offload import parse_bytes

    method = method.lower()
    if method not in PTQ_METHODS:
        raise ValueError(f"method={method!r}: expected one of {PTQ_METHODS}")
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"bits={bits!r}: expected 2, 3, 4 or 8 (any integer 2..8 works)")
    if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0)):
        raise ValueError(f"group_size={group_size!r}: must be a positive integer or -1")
    if micro_batch is not None and (not isinstance(micro_batch, int) or micro_batch <= 0):
        raise ValueError(f"micro_batch={micro_batch!r}: must be a positive integer")
    if pipeline not in ("auto", "staged", "threads"):
        raise ValueError(f"pipeline={pipeline!r}: expected 'auto', 'staged' or 'threads'")
    if pipeline == "auto":
        # the micro-batched pipeline bounds memory but costs more time (bench/scale.md): it runs when asked
        # for (a budget, a micro-batch, checkpoints, torchrun); otherwise the all-samples-at-once one
        launched = "RANK" in os.environ or (torch.distributed.is_available() and torch.distributed.is_initialized())
        wanted = micro_batch is not None or max_memory is not None or checkpoint_dir is not None or resume
        pipeline = "staged" if wanted or launched else "threads"
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs checkpoint_dir= (where the per-block checkpoints are)")
    budget = parse_bytes(max_memory)
    opts = _split_options(method, method_options)
    t0 = time.perf_counter()
    param = next(model.parameters())
    home = param.device
    device = torch.device(device) if device is not None else home
    from lowbit.model.distributed import init_from_env, local_device

    if method in CALIBRATED and pipeline == "staged":
        init_from_env(device)  # launched by torchrun: join the process group
    device = local_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    selected = _select_linears(model, include, exclude)
    if not selected:
        raise ValueError(f"no nn.Linear selected (include={include!r}, exclude={exclude!r})")
    if opts.get("gguf_type") is not None:
        bad = [n for n, lin in selected.items() if lin.in_features % 32]
        if bad:
            raise ValueError(f"gguf_type={opts['gguf_type']!r}: GGUF blocks hold 32 input columns, but "
                             f"{bad[0]!r} has in_features={selected[bad[0]].in_features} (and {len(bad) - 1} more); "
                             f"exclude such layers (exclude=[...]) or use a group-wise method without gguf_type")
    states: Dict[str, Any] = {}
    extra: Dict[str, Any] = {}

    if method in ("rtn", "hqq"):
        for name in _progress(list(selected), desc=f"{method} layers", enabled=progress):
            lin = selected[name]
            w = lin.weight.detach().to(device)
            if method == "rtn":
                st = rtn_quantize(w, bits, group_size, sym, **_layer_opts(opts, name))
            else:
                st = hqq_quantize(w, bits, group_size, sym, **opts)
            states[name] = st.to(lin.weight.device)
            _install(model, name, lin, states[name])
    else:
        ids = _calibration_tokens(model, calib_dataset, tokenizer, n_samples, seq_len, seed)
        extra["calib_tokens"] = int(ids.numel())
        if pipeline == "threads":  # the previous all-samples-at-once pipeline (kept for comparisons)
            _run_calibrated_threads(model, method, selected, ids, bits, group_size, sym, opts, device, home,
                                    batch_size, progress, states, extra)
        else:
            cfg = _RunConfig(micro_batch=micro_batch or batch_size, budget=budget, offload_dir=offload_dir,
                             checkpoint_dir=checkpoint_dir, resume=resume,
                             fingerprint=_fingerprint(model, method, bits, group_size, sym, opts, ids, include,
                                                      exclude, micro_batch or batch_size))
            _run_calibrated(model, method, selected, ids, bits, group_size, sym, opts, device, home, cfg, progress,
                            states, extra)

    elapsed = time.perf_counter() - t0
    q_bytes = sum(st.nbytes for st in states.values())
    q_numel = sum(st.numel for st in states.values())
    quantized = set(states)
    other = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                if n.rsplit(".", 1)[0] not in quantized)
    peak, kind = _peak_memory(device)
    summary = {
        "method": method, "bits": bits, "group_size": group_size, "sym": sym, "time_s": elapsed,
        "n_layers": len(states), "bits_per_weight": 8.0 * q_bytes / max(q_numel, 1),
        "quantized_bytes": q_bytes, "model_bytes": q_bytes + other, "peak_memory_bytes": peak,
        "peak_memory_kind": kind, **extra,
    }
    model.ptq_summary = summary
    logger.info("lowbit %s: %d layers in %.1f s, %.3f bits/weight, model %.1f MB, peak memory %.1f MB (%s)",
                method, len(states), elapsed, summary["bits_per_weight"], summary["model_bytes"] / 2**20,
                peak / 2**20, kind)
    return model


# ---------------------------------------------------------------------------------------------
# the micro-batched, memory-bounded pipeline


class _StopAtStage(Exception):
    """Raised by a stage's pre-hook: this micro-batch reached the stage being calibrated."""

    def __init__(self, idx: int) -> None:
        super().__init__(idx)
        self.idx = idx


@dataclass
class _RunConfig:
    micro_batch: int = 8
    budget: Optional[int] = None
    offload_dir: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    resume: bool = False
    fingerprint: str = ""
    replay: bool = True


def _fingerprint(model, method, bits, group_size, sym, opts, ids, include, exclude, micro_batch) -> str:
    import hashlib

    from lowbit.model.distributed import rank_world

    h = hashlib.sha256()
    h.update(repr((method, bits, group_size, sym, sorted((k, repr(v)) for k, v in opts.items()), include, exclude,
                   micro_batch, rank_world()[1], tuple(ids.shape))).encode())
    h.update(ids.contiguous().cpu().numpy().tobytes())
    for n, p in model.named_parameters():
        h.update(f"{n}{tuple(p.shape)}{p.dtype}".encode())
    return h.hexdigest()[:24]


def _working_reserve(block: nn.Module, micro: int, seq: int, act_bytes: int) -> int:
    """Bytes one micro-batch needs while it goes through ``block`` (activations, Hessian sums, solve)."""
    lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not lins:
        return 0
    k_max = max(m.in_features for m in lins)
    width = sum(m.out_features for m in lins)
    acts = micro * seq * (width + 4 * k_max) * max(act_bytes, 4)
    stats = k_max * k_max * (8 + 4 * 6)  # float64 sums + the solver's fp32 work matrices
    w = max(m.weight.numel() for m in lins) * 4 * 4
    return int(acts + stats + w)


class _BlockRunner:
    """Calibrates one block (or the whole model) pass by pass over micro-batches (see module doc).

    Pass ``k`` runs every micro-batch until it reaches the first linear of a stage not yet quantized,
    adds that input to the stage's sums and stops there; the earliest such stage (over all ranks) is
    then quantized. When no micro-batch stops any more, the pass's outputs are the block's outputs.
    Sub-modules whose linears are all final are recorded the first time they complete and replayed
    afterwards, so each part of the block is computed about once overall.
    """

    def __init__(self, root: Optional[nn.Module], stages: List[_Stage], modules: Dict[str, nn.Linear],
                 quantize_stage: Callable[[_Stage], None], need_h: bool, need_abs: bool, store, replay: bool,
                 on_stage_done: Optional[Callable[[_Stage], None]] = None) -> None:
        self.root, self.stages, self.modules = root, stages, modules
        self.quantize_stage, self.on_stage_done = quantize_stage, on_stage_done
        self.need_h, self.need_abs = need_h, need_abs
        self.store = store
        self.final = [False] * len(stages)
        self.stage_of = {n: i for i, st in enumerate(stages) for n in st.names}
        self.acc: Dict[int, InputStats] = {}
        self.replay = replay and root is not None
        self.cache: Dict[tuple, int] = {}
        self.recording = False
        self.mb = 0
        self.counts: Dict[str, int] = {}

    # -- hooks --------------------------------------------------------------------------------
    def _pre_hook(self, name: str):
        idx = self.stage_of[name]

        def hook(module, args, kwargs):
            if self.final[idx]:
                return None
            x = args[0] if args else kwargs["input"]
            st = self.acc.get(idx)
            if st is None:
                st = self.acc[idx] = InputStats(x.shape[-1], hessian=self.need_h, absmean=self.need_abs,
                                                device=x.device, dtype=torch.float64)
            st.add_samples(x)
            raise _StopAtStage(idx)

        return hook

    def _candidates(self) -> Dict[str, Tuple[nn.Module, set]]:
        """Sub-modules worth replaying (they hold a linear), with the stages of the linears inside."""
        out = {}
        for name, mod in self.root.named_modules():
            if not name or isinstance(mod, (nn.ModuleList, nn.ModuleDict)):
                continue
            inner = [n for n, m in mod.named_modules() if isinstance(m, nn.Linear)]
            if not inner:
                continue
            ids = {id(m) for m in mod.modules()}
            st = {self.stage_of[n] for n, m in self.modules.items() if id(m) in ids and n in self.stage_of}
            out[name] = (mod, st)
        return out

    def _wrap(self, name: str, mod: nn.Module, stage_ids: set):
        orig = mod.forward

        def forward(*args, **kwargs):
            c = self.counts.get(name, 0)
            self.counts[name] = c + 1
            key = (self.mb, name, c)
            k = self.cache.get(key)
            if k is not None:
                return self.store.get(k)
            out = orig(*args, **kwargs)
            # on a GPU recomputing is cheaper than a round trip through host memory: record only what
            # stays on the device (on the CPU a record spilled to a file still beats recomputing)
            if self.recording and all(self.final[i] for i in stage_ids) and (
                    self.store.device.type == "cpu" or self.store.fits_device(out)):
                prefix = name + "."
                for other in [kk for kk in self.cache if kk[0] == self.mb and kk[1].startswith(prefix)]:
                    self.store.drop(self.cache.pop(other))
                self.cache[key] = self.store.put(out)
            return out

        return forward

    # -- driver -------------------------------------------------------------------------------
    def run(self, fn: Callable[[Any], Any], items: List[int]) -> List[int]:
        """Run the stages over the stored micro-batches ``items``; returns the keys of their outputs."""
        from lowbit.model.distributed import min_over_ranks, sum_in_rank_order

        handles = [self.modules[n].register_forward_pre_hook(self._pre_hook(n), with_kwargs=True)
                   for n in self.stage_of]
        wrapped = []
        if self.replay:
            for name, (mod, st) in self._candidates().items():
                wrapped.append((mod, mod.__dict__.get("forward")))
                mod.forward = self._wrap(name, mod, st)
        never = len(self.stages)
        try:
            while True:
                all_final = all(self.final)
                self.recording = self.replay and not all_final
                self.acc = {}
                stopped: Dict[int, int] = {}
                outs: Dict[int, int] = {}
                for j, key in enumerate(items):
                    self.mb, self.counts = j, {}
                    obj = self.store.get(key)
                    try:
                        with torch.no_grad():
                            out = fn(obj)
                    except _StopAtStage as e:
                        stopped[j] = e.idx
                        continue
                    finally:
                        del obj
                    outs[j] = self.store.put(out)
                    del out
                target = min_over_ranks(min(stopped.values(), default=never))
                if target == never:  # every micro-batch went through: the outputs are final
                    for i, st in enumerate(self.stages):
                        if not self.final[i]:  # layers no sample reached: quantized without data
                            self._rtn_unreached(st)
                            self.final[i] = True
                    return [outs[j] for j in range(len(items))]
                for k in outs.values():
                    self.store.drop(k)
                stage = self.stages[target]
                st = self.acc.get(target)
                if st is None:  # this rank's samples never reached it: zero sums
                    ref = self.modules[stage.names[0]]
                    st = InputStats(ref.in_features, hessian=self.need_h, absmean=self.need_abs,
                                    device=ref.weight.device, dtype=torch.float64)
                st = _reduce_stats(st, sum_in_rank_order)
                self.acc = {}
                stage.stats = st
                self.quantize_stage(stage)
                stage.stats = None
                stage.done = True
                self.final[target] = True
                if self.on_stage_done is not None:
                    self.on_stage_done(stage)
        finally:
            for h in handles:
                h.remove()
            for mod, prev in wrapped:
                if prev is None:
                    mod.__dict__.pop("forward", None)
                else:
                    mod.forward = prev
            for k in self.cache.values():
                self.store.drop(k)
            self.cache = {}

    def _rtn_unreached(self, stage: _Stage) -> None:
        stage.unreached = True
        stage.done = True


def _reduce_stats(st: InputStats, reduce) -> InputStats:
    from lowbit.model.distributed import is_active

    if not is_active():
        return st
    if st.xtx is not None:
        st.xtx = reduce(st.xtx)
    if st.abs_sum is not None:
        st.abs_sum = reduce(st.abs_sum)
    n = reduce(torch.tensor([float(st.count)], dtype=torch.float64,
                            device=(st.xtx if st.xtx is not None else st.abs_sum).device))
    st.count = int(n.item())
    return st


def _micro_batches(n: int, micro: int) -> List[Tuple[int, int]]:
    """This rank's micro-batches ``[(start, stop)]`` of the ``n`` samples."""
    from lowbit.model.distributed import rank_world, shard

    rank, world = rank_world()
    a, b = shard(n, rank, world)
    return [(i, min(i + micro, b)) for i in range(a, b, micro)]


def _make_store(device: torch.device, cfg: _RunConfig, reserve: int):
    """The activation store, its device budget derived from ``max_memory`` (the run's peak target)."""
    from lowbit.model.offload import ActivationStore, device_in_use, device_total_free, host_available

    total = cfg.budget if cfg.budget is not None else device_total_free(device)
    avail = max(total - device_in_use(device) - reserve, 0)
    host = None
    if device.type == "cuda":
        host = int(host_available() * 0.5)
    return ActivationStore(device, avail, host_budget=host, spill_dir=cfg.offload_dir)


def _run_calibrated(model, method, selected, ids, bits, group_size, sym, opts, device, home, cfg: _RunConfig,
                    progress, states, extra) -> None:
    from lowbit.model import resume as ckpt
    from lowbit.model.distributed import rank_world

    blocks_name, blocks = find_blocks(model)
    quantize_fn = {"gptq": _gptq_stage, "awq": _awq_stage}[method]
    need_h, need_abs = True, method == "awq"
    mbs = _micro_batches(ids.shape[0], cfg.micro_batch)
    seq = ids.shape[1]
    extra["micro_batch"] = cfg.micro_batch
    extra["world_size"] = rank_world()[1]

    if blocks is None:  # whole-model statistics: the model is one block
        logger.info("no decoder block list found: quantizing with whole-model statistics")
        model.to(device)
        store = _make_store(device, cfg, 0)
        try:
            items = [store.put(ids[a:b].to(device)) for a, b in mbs]
            stages = [_Stage([n]) for n in selected]
            _run_stages_mb(model, None, stages, selected, lambda x: model(x), items, store, quantize_fn, bits,
                           group_size, sym, opts, need_h, need_abs, states, progress, "model", cfg)
        finally:
            store.close()
        model.to(home)
        return

    _to_device_except(model, blocks, device)
    dtype_bytes = next(model.parameters()).element_size()
    reserve = max(_working_reserve(b, cfg.micro_batch, seq, dtype_bytes) for b in blocks[:1]) + \
        (sum(p.numel() * p.element_size() for p in blocks[0].parameters()) if device != home else 0)
    store = _make_store(device, cfg, reserve)
    checkpoints = ckpt.BlockCheckpoints(cfg.checkpoint_dir, cfg.fingerprint) if cfg.checkpoint_dir else None
    start_block = 0
    try:
        items = None
        if checkpoints is not None and cfg.resume:
            got = checkpoints.load(model, blocks, blocks_name, selected, states)
            if got is not None:
                start_block, acts = got
                items = [store.put(a) for a in acts]
                logger.info("resuming after block %d from %s", start_block - 1, cfg.checkpoint_dir)
        if items is None:
            items = []
            for a, b in mbs:
                items.append(store.put(_capture_block0(model, blocks[0], ids[a:b], b - a, device)[0]))
        inside = set(n for n in selected if any(n.startswith(f"{blocks_name}.{i}.") for i in range(start_block)))
        bar = _progress(total=len(blocks), desc=f"{method} blocks", enabled=progress)
        bar.update(start_block)
        extra["offload_peak_bytes"] = {"device": 0, "host": 0, "disk": 0}
        for bi in range(start_block, len(blocks)):
            block = blocks[bi]
            prefix = f"{blocks_name}.{bi}." if blocks_name else f"{bi}."
            block_home = next(block.parameters()).device
            block.to(device)
            sel = {n: m for n, m in selected.items() if n.startswith(prefix)}
            inside.update(sel)
            stages = _block_stages(block, sel, prefix)

            def run_block(item, block=block):
                args, kwargs = item
                return _first_tensor(block(*args, **kwargs))

            outs = _run_stages_mb(model, block, stages, sel, run_block, items, store, quantize_fn, bits, group_size,
                                  sym, opts, need_h, need_abs, states, progress, f"block {bi}", cfg)
            new_items = []
            for o, it in zip(outs, items):
                args, kwargs = store.get(it, pop=True)
                out = store.get(o, pop=True)
                new_items.append(store.put(((out,) + tuple(args[1:]), kwargs)))
                del args, kwargs, out
            items = new_items
            block.to(block_home)
            for k, v in store.peak.items():
                extra["offload_peak_bytes"][k] = max(extra["offload_peak_bytes"][k], v)
            if checkpoints is not None:
                checkpoints.save(bi, block, prefix, {n: states[n] for n in sel}, (store.get(k) for k in items))
            bar.update(1)
        bar.close()
        for k in items:
            store.drop(k)
    finally:
        store.close()
    rest = {n: m for n, m in selected.items() if n not in inside}
    if rest:  # selected linears outside the blocks (e.g. lm_head when included): whole-model pass
        stages = [_Stage([n]) for n in rest]
        store = _make_store(device, cfg, 0)
        try:
            items = [store.put(ids[a:b].to(device)) for a, b in mbs]
            _run_stages_mb(model, None, stages, rest, lambda x: model(input_ids=x, use_cache=False), items, store,
                           quantize_fn, bits, group_size, sym, opts, need_h, need_abs, states, progress,
                           "outside blocks", cfg)
        finally:
            store.close()
    _to_device_except(model, blocks, home)
    if checkpoints is not None:
        checkpoints.finish()


def _run_stages_mb(model, root, stages, modules, fn, items, store, quantize_fn, bits, group_size, sym, opts, need_h,
                   need_abs, states, progress, desc, cfg: _RunConfig) -> List[int]:
    bar = _progress(total=sum(len(s.names) for s in stages), desc=f"  {desc} layers", enabled=progress, leave=False)

    def q(stage: _Stage) -> None:
        quantize_fn(stage, modules, bits, group_size, sym, opts)

    def done(stage: _Stage) -> None:
        bar.update(len(stage.names))

    runner = _BlockRunner(root, stages, modules, q, need_h, need_abs, store, cfg.replay, on_stage_done=done)
    outs = runner.run(fn, items)
    for stage in stages:  # layers no sample reached: quantize without data (RTN)
        if getattr(stage, "unreached", False) or not stage.states:
            for n in stage.names:
                stage.states[n] = rtn_quantize(modules[n].weight.detach(), bits, group_size, sym,
                                               gguf_type=_layer_opts(opts, n).get("gguf_type"))
            bar.update(len(stage.names))
    bar.close()
    _install_stages(model, stages, modules, states)
    return outs


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


# ---------------------------------------------------------------------------------------------
# the previous pipeline: every calibration chunk through the block at once, one thread each


def _run_calibrated_threads(model, method, selected, ids, bits, group_size, sym, opts, device, home, batch_size,
                            progress, states, extra) -> None:
    blocks_name, blocks = find_blocks(model)
    quantize_fn = {"gptq": _gptq_stage, "awq": _awq_stage}[method]
    need_h, need_abs = True, method == "awq"

    if blocks is None:  # whole-model statistics: the model is one block
        stages = [_Stage([n]) for n in selected]
        chunks = [ids[i:i + batch_size].to(device) for i in range(0, ids.shape[0], batch_size)]
        model.to(device)
        _run_stages(model, stages, selected, lambda x: model(x), chunks, quantize_fn, bits, group_size, sym, opts,
                    need_h, need_abs, states, progress, "model")
        model.to(home)
        return

    _to_device_except(model, blocks, device)
    captured = _capture_block0(model, blocks[0], ids, batch_size, device)
    extra["calib_activation_bytes"] = sum(a[0].numel() * a[0].element_size() for a, _ in captured)
    inside = set()
    bar = _progress(total=len(blocks), desc=f"{method} blocks", enabled=progress)
    for bi, block in enumerate(blocks):
        prefix = f"{blocks_name}.{bi}." if blocks_name else f"{bi}."
        block_home = next(block.parameters()).device
        block.to(device)
        sel = {n: m for n, m in selected.items() if n.startswith(prefix)}
        inside.update(sel)
        stages = _block_stages(block, sel, prefix)

        def run_block(item, block=block):
            args, kwargs = item
            return _first_tensor(block(*args, **kwargs))

        outs = _run_stages(model, stages, sel, run_block, captured, quantize_fn, bits, group_size, sym, opts,
                           need_h, need_abs, states, progress, f"block {bi}")
        captured = [((o,) + tuple(a[1:]), kw) for o, (a, kw) in zip(outs, captured)]
        block.to(block_home)
        bar.update(1)
    bar.close()
    rest = {n: m for n, m in selected.items() if n not in inside}
    if rest:
        stages = [_Stage([n]) for n in rest]
        chunks = [ids[i:i + batch_size].to(device) for i in range(0, ids.shape[0], batch_size)]
        _run_stages(model, stages, rest, lambda x: model(input_ids=x, use_cache=False), chunks, quantize_fn, bits,
                    group_size, sym, opts, need_h, need_abs, states, progress, "outside blocks")
    _to_device_except(model, blocks, home)


def _to_device_except(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer outside ``blocks`` to ``device``."""
    inside = set()
    for b in blocks:
        inside.update(id(t) for t in b.parameters())
        inside.update(id(t) for t in b.buffers())
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None and id(p) not in inside and p.device != device:
                p.data = p.data.to(device)  # same Parameter object: tied weights stay tied
        for key, b in list(mod._buffers.items()):
            if b is not None and id(b) not in inside and b.device != device:
                mod._buffers[key] = b.to(device)


def _run_stages(model, stages, modules, fn, chunks, quantize_fn, bits, group_size, sym, opts, need_h, need_abs,
                states, progress, desc) -> List[Any]:
    bar = _progress(total=sum(len(s.names) for s in stages), desc=f"  {desc} layers", enabled=progress, leave=False)

    def q(stage: _Stage) -> None:
        quantize_fn(stage, modules, bits, group_size, sym, opts)

    def done(stage: _Stage) -> None:
        bar.update(len(stage.names))

    runner = _Staged(stages, modules, q, need_h, need_abs, on_stage_done=done)
    outs = runner.run(fn, chunks)
    for stage in stages:  # layers no chunk reached: quantize without data (RTN)
        if not stage.done:
            for n in stage.names:
                stage.states[n] = rtn_quantize(modules[n].weight.detach(), bits, group_size, sym,
                                               gguf_type=_layer_opts(opts, n).get("gguf_type"))
            stage.done = True
            bar.update(len(stage.names))
    bar.close()
    _install_stages(model, stages, modules, states)
    return outs
