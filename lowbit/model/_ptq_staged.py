"""The micro-batched, memory-bounded calibrated pipeline (``pipeline="staged"``; see
:mod:`lowbit.model.sequential` and bench/scale.md)."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from lowbit.algorithms.stats import InputStats
from lowbit.config import WeightOnlyConfig

from lowbit.model._ptq_blocks import (_Stage, _block_stages, _capture_block0, _first_tensor, _install, _progress, _rtn_fallback,
                                     _restore_kept, _to_device_except, find_blocks)
from lowbit.model._ptq_solve import _install_stages

logger = logging.getLogger("lowbit.model.sequential")


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
    stream: Any = None  # lowbit.model.streaming.BlockStream: reads each block before its turn, writes it after
    tail_replays: int = 0  # parents rebuilt from a saved tail-linear input (_BlockRunner._tail), counted


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


def _device_work(block: nn.Module, stage_shapes: List[Tuple[int, int]], micro: int, seq: int, act_bytes: int,
                 hidden: int, world: int = 1, awq: bool = False, accurate: bool = False,
                 reduce_copies: int = 2) -> int:
    """Peak bytes of one rank's work on a GPU while ``block`` calibrates (run 8 on; the blocks and the activation
    store not included): the largest over its stages ``(k = input features, rows = output rows of the stage)`` of

    * the accumulation: the float64 sums, one per-sample fp32 product, the micro-batch's input (and its fp32 copy)
      and its activations through the block;
    * GPTQ's factorisation (five fp32 ``k x k`` matrices: the Hessian, its permuted copy, the Cholesky factor, its
      inverse, a trailing block of the factor) and solve (the Hessian, its factor, five fp32 ``rows / world x k``
      matrices), or AWQ's Hessian (the float64 sums and the fp32 matrix) and search (six ``rows x k``);
    * the rank-ordered sum of the float64 sums (two copies) in a data-parallel run;

    plus, for GPTQ, what the solve's CUDA graphs keep for the rest of the run (:func:`_graph_statics`).

    The pipeline reserves by this estimate as run 9 measured it, whose accumulation term counts the whole micro-batch
    in fp32 and its activations at the widest linear (conservative: 4.3 GiB for the 8B shape, where the measured
    work was 3.8); ``accurate=True`` (:func:`lowbit.model.plan.staged_device_bytes`' peak) counts what
    ``InputStats.add_samples`` holds (the samples of one product in fp32) and the residual stream beside the input.
    ``reduce_copies``: float64 copies of the sums during the rank-ordered sum (3 before run 9's in-place sum)."""
    lins = [m for m in block.modules() if isinstance(m, nn.Linear)]
    if not lins:
        return 0
    widest = max(m.out_features for m in lins)
    work = 0
    for k, rows_all in stage_shapes:
        rows = -(-rows_all // world)
        per = min(max(1, (64 * 2 ** 20) // (k * k * 4)), micro)  # samples per product (InputStats.add_samples)
        if accurate:
            acc = 8 * k * k + 4 * k * k * per + micro * seq * k * act_bytes + per * seq * k * 4 + \
                micro * seq * act_bytes * 2 * hidden
        else:
            acc = 8 * k * k + 4 * k * k * per + micro * seq * k * (act_bytes + 4) + \
                micro * seq * act_bytes * (2 * hidden + widest)
        if awq:
            fac, sol = 12 * k * k, 4 * k * k + 24 * rows_all * k
        else:
            fac, sol = 20 * k * k, 8 * k * k + 20 * rows * k
        red = 8 * reduce_copies * k * k if world > 1 else 0
        work = max(work, acc, fac, sol, red)
    return int(work) + (0 if awq else _graph_statics(stage_shapes, world))


def _graph_statics(stage_shapes: List[Tuple[int, int]], world: int) -> int:
    """Bytes the GPTQ solve's CUDA graphs keep on a rank's GPU for the rest of a run (session 11; ``_solve_graphs``: a
    data-parallel run on CUDA by default): per distinct stage shape (this rank's ``rows``, ``k``), fp32 copies of the
    permuted weight and of the codes (``rows x k`` each) and of ``U`` (``k x k``), the scales, zeros and group index;
    admitted in stage order while the total stays within ``GRAPH_BYTES``, as ``gptq._graphed_loop`` admits them (the
    8B shape on 2 GPUs: 1.9 GB, measured 12.7 GB peak against 10.9 without)."""
    import os

    from lowbit.algorithms.gptq import graph_bytes, graph_cap
    from lowbit.model._ptq_solve import _solve_graphs

    rows_split = world > 1 and os.environ.get("LOWBIT_DP_SPLIT", "rows") != "units"
    if not _solve_graphs(rows_split, torch.device("cuda")):
        return 0
    cap = graph_cap()
    seen, total = set(), 0
    for k, rows_all in stage_shapes:
        rows = -(-rows_all // world)
        if (rows, k) in seen:
            continue
        seen.add((rows, k))
        need = graph_bytes(rows, k, -(-k // 128))
        if total + need <= cap:
            total += need
    return total


def _stage_shapes(block: nn.Module, sel: Dict[str, nn.Linear], prefix: str) -> List[Tuple[int, int]]:
    """``[(input features, output rows)]`` of the block's stages (its selected linears grouped as calibrated)."""
    from lowbit.model import _ptq_blocks

    out = []
    for st in _ptq_blocks._block_stages(block, sel, prefix):
        mods = [sel[n] for n in st.names]
        out.append((mods[0].in_features, sum(m.out_features for m in mods)))
    return out


#: headroom over :func:`_device_work` in the GPU reserve (the allocator's rounding, short-lived copies)
DEVICE_WORK_MARGIN = 0.15


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
        # tail replay: a micro-batch stopped at linear L, a direct child of a wrapped module P whose other
        # stages are final, keeps L's input; in the next pass P's output is L(that input) (when P returns
        # L's output, checked once per (P, L) on the first micro-batch), so the part of P before L (the
        # attention core, the MLP's activation) is not computed a second time
        self.tail_parent: Dict[str, str] = {}  # linear name -> name (in root) of the wrapped module holding it
        self.tail_tmpl: Dict[Tuple[str, str], Any] = {}  # (P, L) -> None | "tensor" | ("tuple", n)
        self.stop_in: Dict[Tuple[int, str], int] = {}  # (micro-batch, L) -> store key, saved this pass
        self.prev_in: Dict[Tuple[int, str], int] = {}  # saved in the previous pass, used in this one
        self.tail_hits = 0

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
            self._save_tail_input(name, idx, x)
            raise _StopAtStage(idx)

        return hook

    def _save_tail_input(self, name: str, idx: int, x: torch.Tensor) -> None:
        parent = self.tail_parent.get(name)
        if parent is None or self.tail_tmpl.get((parent, name), "?") is None:
            return
        others = self.parent_stages[parent] - {idx}
        if not all(self.final[i] for i in others):
            return
        if self.store.device.type != "cpu" and not self.store.fits_device(x):
            return  # as for the records: on a GPU recomputing beats a round trip through host memory
        # the records of the parts of P this micro-batch computed are not needed once P is replayed from L
        pre = parent + "."
        for kk in [kk for kk in self.cache if kk[0] == self.mb and kk[1].startswith(pre)]:
            self.store.drop(self.cache.pop(kk))
        old = self.stop_in.pop((self.mb, name), None)
        if old is not None:
            self.store.drop(old)
        self.stop_in[(self.mb, name)] = self.store.put(x.detach())

    def _tail(self, name: str, orig: Callable[..., Any], args, kwargs):
        """``orig(*args, **kwargs)``, or its output rebuilt as ``L(saved input)`` (see ``tail_parent``)."""
        for (mb, lname) in [k for k in self.prev_in if k[0] == self.mb]:
            if self.tail_parent.get(lname) != name:
                continue
            lin = self.modules[lname]
            if not all(self.final[i] for i in self.parent_stages[name]):
                continue
            tmpl = self.tail_tmpl.get((name, lname), "?")
            if tmpl is None:
                continue
            key = self.prev_in.pop((mb, lname))
            if tmpl != "?":
                x = self.store.get(key, pop=True)
                y = lin(x)
                del x
                self.tail_hits += 1
                return y if tmpl == "tensor" else (y,) + (None,) * (tmpl[1] - 1)
            self.store.drop(key)
            seen = []
            h = lin.register_forward_hook(lambda m, a, o: seen.append(o))
            try:
                out = orig(*args, **kwargs)
            finally:
                h.remove()
            y = seen[-1] if len(seen) == 1 else None
            if y is not None and out is y:
                self.tail_tmpl[(name, lname)] = "tensor"
            elif y is not None and isinstance(out, tuple) and out and out[0] is y and \
                    all(o is None for o in out[1:]):
                self.tail_tmpl[(name, lname)] = ("tuple", len(out))
            else:  # P does more after L: no tail replay for this pair
                self.tail_tmpl[(name, lname)] = None
            return out
        return orig(*args, **kwargs)

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
            out = self._tail(name, orig, args, kwargs)
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
        self.parent_stages: Dict[str, set] = {}
        if self.replay:
            by_id = {id(m): n for n, m in self.modules.items() if n in self.stage_of}
            for name, (mod, st) in self._candidates().items():
                wrapped.append((mod, mod.__dict__.get("forward")))
                mod.forward = self._wrap(name, mod, st)
                self.parent_stages[name] = st
                for child in mod.children():
                    if id(child) in by_id:
                        self.tail_parent[by_id[id(child)]] = name
        never = len(self.stages)
        try:
            while True:
                for k in self.prev_in.values():  # saved two passes ago and not used
                    self.store.drop(k)
                self.prev_in, self.stop_in = self.stop_in, {}
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
                stage.stats = _reduce_stats(st, lambda t: sum_in_rank_order(t, inplace=True))  # st's sums given up
                self.acc = {}
                del st  # the stage holds the only reference: a method may let go of it once read (GPTQ does)
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
            for k in list(self.prev_in.values()) + list(self.stop_in.values()):
                self.store.drop(k)
            self.prev_in, self.stop_in = {}, {}

    def _rtn_unreached(self, stage: _Stage) -> None:
        stage.unreached = True
        stage.done = True


class _Worker:
    """One long-lived worker thread that runs the jobs :func:`_in_worker` hands it, one at a time."""

    def __init__(self) -> None:
        import queue

        self.jobs: "queue.Queue[Callable[[], None]]" = queue.Queue()
        self.busy = False
        self.thread = threading.Thread(target=self._loop, name="lowbit-calibration", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            self.busy = True
            try:
                job()
            finally:
                del job  # the job's closure holds the caller's objects (a block's replaced linears): not kept
                self.busy = False


_WORKER: Optional[_Worker] = None
_WORKER_LOCK = threading.Lock()


def _in_worker(fn: Callable[..., Any], *args: Any, device: Optional[torch.device] = None) -> Any:
    """``fn(*args)`` run in the worker thread, the caller waiting; its result returned, its error re-raised.

    Why: torch's OpenMP pool spin-waits between parallel regions when they are issued from the main thread
    (libgomp's default wait policy). GPTQ's column loop issues thousands of small parallel ops, and on the
    2-core CPU the spinning cost 3-10x the CPU seconds of the same solve issued from another thread (and far
    more wall time on a loaded machine; ``OMP_WAIT_POLICY=PASSIVE`` removes the difference but must be set
    before torch loads). The previous pipeline ran everything in worker threads, which is why it was faster
    (bench/scale.md, "Where the time went").

    The same thread serves every call (session 9): cuDNN's handles and its attention graphs are cached per thread,
    and a new thread per block rebuilt them at the block's first attention call, 45-70 ms of an idle GPU per 8B
    block (``bench/dp_trace.py``'s trace on the H200). A call from the worker itself runs in place; a worker still
    busy with an abandoned call (its caller interrupted) is replaced by a new one."""
    global _WORKER
    box: Dict[str, Any] = {}
    if device is not None and device.type == "cuda":  # "cuda" without an index: the caller's current device
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
    done = threading.Event()

    def work() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            box["out"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            box["err"] = e
        finally:
            done.set()

    inline = False
    with _WORKER_LOCK:
        if _WORKER is not None and threading.current_thread() is _WORKER.thread:
            inline = True
        else:
            if _WORKER is None or _WORKER.busy or not _WORKER.jobs.empty():
                _WORKER = _Worker()
            _WORKER.jobs.put(work)
    if inline:
        work()
    while not done.wait(0.5):  # a short wait, so that Ctrl-C reaches the caller (the daemon thread dies with the process)
        pass
    if "err" in box:
        raise box["err"]
    return box.get("out")


class _Subset(dict):
    """``states`` restricted to ``keys``; assignments go through to ``states``."""

    def __init__(self, states: Dict[str, Any], keys) -> None:
        super().__init__((k, states[k]) for k in keys)
        self._states = states

    def __setitem__(self, k, v) -> None:
        super().__setitem__(k, v)
        self._states[k] = v


def _data_free_streamed(model, entry, cfg, selected, device, stream, states, progress):
    """A data-free method (rtn, hqq, ...) on a streamed model: block by block (read, quantize each selected
    linear, write, drop)."""
    blocks_name, blocks = find_blocks(model)
    for bi in _progress(range(len(blocks)), desc=f"{entry.name} blocks", enabled=progress):
        prefix = f"{blocks_name}.{bi}."
        stream.load_block(bi, blocks[bi], prefix)
        sel = [n for n in selected if n.startswith(prefix)]
        for name in sel:
            lin = model.get_submodule(name)
            w = lin.weight.detach().to(device)
            st = entry.layer(w, cfg.for_layer(name))
            states[name] = st.to(lin.weight.device)
            _install(model, name, lin, states[name])
        stream.finish_block(bi, blocks[bi], prefix, _Subset(states, sel))


def _reduce_stats(st: InputStats, reduce) -> InputStats:
    from lowbit.model.distributed import is_active, sum_over_ranks

    if not is_active():
        return st
    if st.xtx is not None:
        st.xtx = reduce(st.xtx)
    if st.abs_sum is not None:
        st.abs_sum = reduce(st.abs_sum)
    # the count on the host (session 9; through the GPU its read-back waited for the pass's queued work)
    st.count = sum_over_ranks(st.count)
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
    store = ActivationStore(device, avail, host_budget=host, spill_dir=cfg.offload_dir)
    if device.type == "cpu" and cfg.budget is not None:  # the process's resident set counts, checked at every put
        # the working-set estimate leaves out the allocator's slack and short-lived copies: a quarter more and
        # 64 MiB (SmolLM2, 30 blocks, 128 x 512 at 1.5GB peaked at 1,517 MiB of the 1,536 without this margin)
        store.rss_limit = max(cfg.budget - reserve - reserve // 4 - 64 * 2 ** 20, 0)
    return store


def _states_follow(states: Dict[str, Any], names, model, home: torch.device) -> None:
    """Point ``states`` at the quantized modules' own states after their block went home: the states
    installed on the device stayed referenced there otherwise, so the device kept every finished block's
    codes (8B: about 0.12 GB per block; the 70B shape about 0.45 GB, over 80 blocks more than the budget)."""
    for n in names:
        st = states.get(n)
        if st is None or getattr(st, "device", home) == home:
            continue
        mod = model.get_submodule(n)
        own = mod.quant_states().get("weight") if hasattr(mod, "quant_states") else None
        states[n] = own if own is not None and own.device == home else st.to(home)


def _head_only(model: nn.Module) -> set:
    """Ids of the output embedding's tensors when it is not tied to the input embedding (the block-0 capture
    stops before it: it need not go to the device when nothing outside the blocks is quantized)."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out = get_out() if callable(get_out) else None
    inp = get_in() if callable(get_in) else None
    if out is None or not isinstance(out, nn.Module):
        return set()
    in_ids = {id(t) for t in inp.parameters()} if isinstance(inp, nn.Module) else set()
    own = [t for t in list(out.parameters()) + list(out.buffers())]
    if not own or any(id(t) in in_ids for t in own):
        return set()
    return {id(t) for t in own}


def _device_bytes(kept: list, model: nn.Module, blocks, device: torch.device) -> int:
    """Bytes of the device copies of the tensors :func:`_to_device_except` moved (``kept``)."""
    n = 0
    for p, mod, key, _ in kept:
        t = p if p is not None else mod._buffers.get(key)
        if t is not None and t.device.type == device.type:
            n += t.numel() * t.element_size()
    return n


def _drop_replaced(selected: Dict[str, nn.Linear], sel, model: nn.Module) -> None:
    """Forget the ``nn.Linear`` objects of ``sel`` that the block's quantized modules replaced: the pipeline's
    references were the last to their float weights, which stayed on the device with every finished block
    (the quantized module took over the weight's Parameter and dropped it; 8B: 0.44 GB per block, the 70B
    shape 1.6 GB: the GPU peak grew with the layers)."""
    for n in list(sel):
        lin = selected.get(n)
        if lin is not None and model.get_submodule(n) is not lin:
            del selected[n]


def _prefetching(device: torch.device, homes, cfg: _RunConfig) -> bool:
    """Whether the next block's weights are copied to the GPU while the current block calibrates: CUDA, blocks
    kept off the device, not streamed from files. ``LOWBIT_PREFETCH=0`` turns it off."""
    import os

    return (device.type == "cuda" and cfg.stream is None and len(homes) > 1
            and all(h != device for h in homes) and os.environ.get("LOWBIT_PREFETCH", "1") != "0")


#: bytes per pinned staging buffer of :func:`_staged_copy` (two per copy, used in turn)
STAGE_BYTES = 32 * 2 ** 20
#: tensors smaller than this go by plain ``.to`` (a short pageable copy; no pinned buffers for norms and biases)
STAGE_MIN_BYTES = 2 ** 20
_STAGE_POOL: Dict[Tuple[int, int], List[torch.Tensor]] = {}  # (stream, size) -> the two pinned buffers, reused


_STAGE_LOCK = threading.Lock()


def _stage_buffers(stream: "torch.cuda.Stream", size: int) -> List[torch.Tensor]:
    """The two pinned staging buffers of ``stream`` (one copying thread per stream), made once per process: the
    prefetch and the way home each hold 2 x :data:`STAGE_BYTES` of page-locked host memory from then on."""
    key = (id(stream), size)
    with _STAGE_LOCK:
        bufs = _STAGE_POOL.get(key)
        if bufs is None:
            bufs = _STAGE_POOL[key] = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    return bufs


def _staged_copy(t: torch.Tensor, dev: torch.device, stream: "torch.cuda.Stream") -> torch.Tensor:
    """``t.to(dev)`` between pageable host memory and a GPU through two pinned buffers of :data:`STAGE_BYTES` (the
    host side copied by the CPU, the device side queued asynchronously on ``stream``, one buffer filling while the
    other travels); the same bytes. A pageable ``cudaMemcpyAsync`` holds the CUDA driver for the whole copy: every
    other thread's CUDA call waited behind it (session 10's trace: the calibration thread blocked 61 ms per 8B block
    in one call while the next block came in and the last went home, the GPU idle meanwhile). Other tensors (pinned,
    non-contiguous, device to device, complex views): ``t.to(dev)``."""
    src_cuda, dst_cuda = t.is_cuda, dev.type == "cuda"
    if src_cuda == dst_cuda or not t.is_contiguous() or t.numel() * t.element_size() < STAGE_MIN_BYTES or \
            (not src_cuda and t.is_pinned()):
        return t.to(dev)
    out = torch.empty(t.shape, dtype=t.dtype, device=dev)
    src = t.reshape(-1).view(torch.uint8)
    dst = out.reshape(-1).view(torch.uint8)
    n = src.numel()
    size = min(STAGE_BYTES, n)
    # the stream's pool for every size (a tensor of one chunk had its own pinned buffer: one page-locking allocation per
    # size on first use, in block 0). Session 11 also tried making the pool and copying block 0 in the background during
    # the capture: 0.13 s slower to block 1 on 2 GPUs (run 23: single-threaded staging, 436 MB, beat by the plain copy)
    bufs = _stage_buffers(stream, STAGE_BYTES)
    if n <= size:
        bufs = bufs[:1]
    events: List[Optional[torch.cuda.Event]] = [None] * len(bufs)
    pending: List[Optional[Tuple[int, int]]] = [None] * len(bufs)  # device -> host: the span each buffer holds

    def drain(j: int) -> None:
        """Buffer ``j``'s previous trip over (waits this thread only), its device -> host span copied out."""
        if events[j] is not None:
            events[j].synchronize()
            if pending[j] is not None:
                pa, pb = pending[j]
                dst[pa:pb].copy_(bufs[j][:pb - pa])

    with torch.cuda.stream(stream):
        for i, a in enumerate(range(0, n, size)):
            b = min(a + size, n)
            j = i % len(bufs)
            drain(j)
            buf = bufs[j][:b - a]
            if dst_cuda:
                buf.copy_(src[a:b])
                dst[a:b].copy_(buf, non_blocking=True)
                pending[j] = None
            else:
                buf.copy_(src[a:b], non_blocking=True)
                pending[j] = (a, b)
            ev = torch.cuda.Event()
            ev.record(stream)
            events[j] = ev
        for j in range(len(bufs)):  # the last trips
            drain(j)
    return out


def _move_block(block: nn.Module, dev: torch.device, stream: "torch.cuda.Stream") -> None:
    """``block.to(dev)`` with host <-> GPU copies staged through pinned buffers (:func:`_staged_copy`): the module's
    own parameter and buffer objects get the moved data, as ``.to`` does. ``LOWBIT_PREFETCH_STAGED=0``: ``.to``."""
    import os

    if os.environ.get("LOWBIT_PREFETCH_STAGED", "1") == "0":
        block.to(dev)
        return

    def copy(t: torch.Tensor) -> torch.Tensor:
        return _staged_copy(t, dev, stream)

    # quantized linears keep their states outside the parameters and move them with QuantState.to (their _apply):
    # staged here first, so that _apply finds them in place (a quantized 8B block's codes went home through
    # pageable copies of 20 ms each, session 10's second trace)
    for m in block.modules():
        qs = getattr(m, "_qstates", None)
        if qs:
            for k, st in list(qs.items()):
                if st.device != dev:
                    qs[k] = st.to(dev, copy=copy)
    block._apply(copy)


class _Prefetch:
    """``block.to(device)`` in a background thread on a side CUDA stream (the copies overlap the current
    block's kernels on the main stream); :meth:`wait` joins it (the copy is complete on the device then: a
    blocking copy synchronises its stream) and re-raises its error. Same values as the plain move.

    Also the way home (``device`` the block's home, ``wait_main``: the side stream first waits for the work
    queued on the GPU's default stream, which computed the block's quantized states); ``after()`` runs in the
    thread once the block is there."""

    def __init__(self, block: nn.Module, device: torch.device, stream: "torch.cuda.Stream",
                 after: Optional[Callable[[], None]] = None, wait_main: bool = False) -> None:
        self.err: Optional[BaseException] = None
        import itertools
        import os

        gpu = stream.device
        dev = device if device.type != "cuda" else \
            torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        # the block's device tensors are allocated on the side stream, but the calibration reads and writes them on
        # the GPU's default stream; the caching allocator hands a freed block back to its own stream's next
        # allocation at once, so without this a replaced linear's float weight dropped while the default stream
        # still had that block's last forward pass queued was overwritten by the next prefetch's copy (run 10: the
        # codes changed from layer 2 on once nothing synchronised the whole device). ``record_stream``: the memory
        # is reused only after the default stream's work queued when it was freed. LOWBIT_PREFETCH_RECORD=0: off.
        consumer = torch.cuda.default_stream(gpu) if dev.type == "cuda" and \
            os.environ.get("LOWBIT_PREFETCH_RECORD", "1") != "0" else None

        def work() -> None:
            try:
                torch.cuda.set_device(gpu)
                with torch.cuda.stream(stream):
                    if wait_main:
                        stream.wait_stream(torch.cuda.default_stream(gpu))
                    _move_block(block, dev, stream)
                    stream.synchronize()
                if consumer is not None:
                    for t in itertools.chain(block.parameters(), block.buffers()):
                        if t.is_cuda:
                            t.record_stream(consumer)
                if after is not None:
                    after()
            except BaseException as e:  # re-raised by wait()
                self.err = e

        self.thread = threading.Thread(target=work, name="lowbit-prefetch", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        self.thread.join()
        if self.err is not None:
            raise self.err


def _run_calibrated(model, entry, qcfg: WeightOnlyConfig, selected, ids, device, home, cfg: _RunConfig, states,
                    extra) -> None:
    from lowbit.model import resume as ckpt
    from lowbit.model.offload import release_free_memory
    from lowbit.model.distributed import rank_world

    method, progress = entry.name, qcfg.progress
    blocks_name, blocks = find_blocks(model)
    quantize_fn = entry.stage
    need_h, need_abs = True, bool(getattr(entry.stage, "needs_absmean", False))
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
            _run_stages_mb(model, None, stages, selected, lambda x: model(x), items, store, quantize_fn, qcfg,
                           need_h, need_abs, states, "model", cfg)
        finally:
            store.close()
        model.to(home)
        return

    kept: list = []  # the non-block tensors left at home: put back at the end if the run changed none
    prefixes = tuple(f"{blocks_name}.{i}." if blocks_name else f"{i}." for i in range(len(blocks)))
    outside_sel = [n for n in selected if not n.startswith(prefixes)]
    # nothing to quantize outside the blocks: the non-block tensors are needed on the device only for the
    # block-0 capture, and go home (the originals put back, no copies) right after it; an output embedding not
    # tied to the input one is not needed there at all (the capture stops at block 0)
    import os

    early_home = not outside_sel and os.environ.get("LOWBIT_OUTSIDE_HOME", "1") != "0"
    skip = _head_only(model) if early_home else set()
    _to_device_except(model, blocks, device, keep=kept, skip=skip)
    dtype_bytes = next(model.parameters()).element_size()
    block_bytes = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    homes = [next(b.parameters()).device for b in blocks]
    prefetch = _prefetching(device, homes, cfg)
    homeward_async = prefetch and cfg.checkpoint_dir is None and os.environ.get("LOWBIT_HOME_ASYNC", "1") != "0"
    if device.type == "cuda" and os.environ.get("LOWBIT_GPU_RESERVE", "work") == "work":
        # on a GPU the reserve is the modelled working set of the widest stage (run 8: the CPU-era formula below
        # reserved 15 GB for the 8B shape's 4 GB, so the activations went through pinned host memory)
        from lowbit.model.distributed import rank_world

        sel0 = {n: m for n, m in selected.items() if n.startswith(prefixes[0])}
        hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
        work = _device_work(blocks[0], _stage_shapes(blocks[0], sel0, prefixes[0]), cfg.micro_batch, seq,
                            dtype_bytes, hidden, rank_world()[1], need_abs)
        base = int(work * (1 + DEVICE_WORK_MARGIN))
    else:
        base = max(_working_reserve(b, cfg.micro_batch, seq, dtype_bytes) for b in blocks[:1])
    reserve = base + \
        (block_bytes * (2 if prefetch else 1) + (block_bytes // 3 if homeward_async else 0) if device != home else 0)
    store = _make_store(device, cfg, reserve)
    extra["device_reserve_bytes"] = int(reserve)
    ahead: Optional[_Prefetch] = None
    behind: Optional[_Prefetch] = None  # the previous block on its way home
    side = side_home = None
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
        if early_home and kept:  # the non-block tensors' device copies are not needed any more
            freed = _device_bytes(kept, model, blocks, device)
            _restore_kept(kept)
            store.budget += freed  # room for activations (the budget was set with them on the device)
        extra["store_device_budget_bytes"] = store.budget if store.budget != float("inf") else None
        inside = set(n for n in selected if any(n.startswith(f"{blocks_name}.{i}.") for i in range(start_block)))
        bar = _progress(total=len(blocks), desc=f"{method} blocks", enabled=progress)
        bar.update(start_block)
        extra["offload_peak_bytes"] = {"device": 0, "host": 0, "disk": 0}
        extra["block_prefetch"] = prefetch
        for bi in range(start_block, len(blocks)):
            block = blocks[bi]
            prefix = f"{blocks_name}.{bi}." if blocks_name else f"{bi}."
            if cfg.stream is not None:
                cfg.stream.load_block(bi, block, prefix)
            block_home = homes[bi] if prefetch else next(block.parameters()).device
            if ahead is not None:
                ahead.wait()  # this block, copied to the device during the previous one
                ahead = None
            block.to(device)
            if prefetch and bi + 1 < len(blocks):
                if side is None:  # one stream for every copy: the freed blocks' memory is reused by the next
                    side = torch.cuda.Stream(device if device.index is not None else None)
                ahead = _Prefetch(blocks[bi + 1], device, side)
            sel = {n: m for n, m in selected.items() if n.startswith(prefix)}
            inside.update(sel)
            stages = _block_stages(block, sel, prefix)

            def run_block(item, block=block):
                args, kwargs = item
                return _first_tensor(block(*args, **kwargs))

            outs = _run_stages_mb(model, block, stages, sel, run_block, items, store, quantize_fn, qcfg,
                                  need_h, need_abs, states, f"block {bi}", cfg)
            # the outputs become the next block's inputs where they are stored (no copies)
            new_items = []
            for o, it in zip(outs, items):
                try:
                    new_items.append(store.replace_first(it, o))
                except ValueError:  # another layout of the inputs: through the device
                    args, kwargs = store.get(it, pop=True)
                    out = store.get(o, pop=True)
                    new_items.append(store.put(((out,) + tuple(args[1:]), kwargs)))
                    del args, kwargs, out
            items = new_items
            _drop_replaced(selected, sel, model)  # the replaced linears' float weights (on the device) freed
            sel = dict.fromkeys(sel)  # the names only: no reference to the replaced modules is left
            if behind is not None:
                behind.wait()
                behind = None
            if homeward_async and block_home != device:
                # the quantized block goes home in the background while the next one calibrates
                if side_home is None:
                    side_home = torch.cuda.Stream(device if device.index is not None else None)
                behind = _Prefetch(block, block_home, side_home,
                                   after=lambda names=list(sel), h=block_home: _states_follow(states, names, model, h),
                                   wait_main=True)
            else:
                block.to(block_home)
                _states_follow(states, sel, model, block_home)
            for k, v in store.peak.items():
                extra["offload_peak_bytes"][k] = max(extra["offload_peak_bytes"][k], v)
            if checkpoints is not None:
                checkpoints.save(bi, block, prefix, {n: states[n] for n in sel}, (store.get(k) for k in items))
            if cfg.stream is not None:
                cfg.stream.finish_block(bi, block, prefix, _Subset(states, sel))
            if device.type == "cpu":  # the block's freed tensors back to the system (the resident set counts)
                release_free_memory()
            bar.update(1)
        bar.close()
        for k in items:
            store.drop(k)
    finally:
        for job in (ahead, behind):
            if job is not None:
                job.wait()
        store.close()
        from lowbit.algorithms.gptq import clear_solve_graphs

        clear_solve_graphs()  # the solve graphs' copies of their inputs (GPTQ on CUDA) freed with the run
    rest = {n: m for n, m in selected.items() if n not in inside}
    if rest:  # selected linears outside the blocks (e.g. lm_head when included): whole-model pass
        stages = [_Stage([n]) for n in rest]
        store = _make_store(device, cfg, 0)
        try:
            items = [store.put(ids[a:b].to(device)) for a, b in mbs]
            _run_stages_mb(model, None, stages, rest, lambda x: model(input_ids=x, use_cache=False), items, store,
                           quantize_fn, qcfg, need_h, need_abs, states, "outside blocks", cfg)
        finally:
            store.close()
    if rest:  # the whole-model pass may have changed them (lm_head quantized, AWQ folds into the final norm)
        kept.clear()
        _to_device_except(model, blocks, home)
    else:  # untouched outside the blocks: the originals back, no copies from the device
        _restore_kept(kept)
        _to_device_except(model, blocks, home)  # anything the run added outside the blocks (none expected)
    extra["tail_replays"] = cfg.tail_replays
    if checkpoints is not None:
        checkpoints.finish()


def _run_stages_mb(model, root, stages, modules, fn, items, store, quantize_fn, qcfg: WeightOnlyConfig, need_h,
                   need_abs, states, desc, cfg: _RunConfig) -> List[int]:
    bar = _progress(total=sum(len(s.names) for s in stages), desc=f"  {desc} layers", enabled=qcfg.progress,
                    leave=False)

    def q(stage: _Stage) -> None:
        quantize_fn(stage, modules, qcfg)

    def done(stage: _Stage) -> None:
        bar.update(len(stage.names))

    runner = _BlockRunner(root, stages, modules, q, need_h, need_abs, store, cfg.replay, on_stage_done=done)
    outs = _in_worker(runner.run, fn, items, device=store.device)
    cfg.tail_replays += runner.tail_hits
    for stage in stages:  # layers no sample reached: quantize without data (RTN)
        if getattr(stage, "unreached", False) or not stage.states:
            for n in stage.names:
                stage.states[n] = _rtn_fallback(modules[n].weight.detach(), qcfg.for_layer(n))
            bar.update(len(stage.names))
    bar.close()
    _install_stages(model, stages, modules, states)
    return outs
