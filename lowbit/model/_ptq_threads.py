"""The previous calibrated pipeline (``pipeline="threads"``): every calibration chunk through the block at
once, one thread per chunk, a stage quantized once every live chunk waits on it (see
:mod:`lowbit.model.sequential`)."""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from lowbit.algorithms.rtn import rtn_quantize
from lowbit.algorithms.stats import InputStats, gram

from lowbit.model._ptq_blocks import (_Stage, _block_stages, _capture_block0, _first_tensor, _progress,
                                     _to_device_except, find_blocks)
from lowbit.model._ptq_solve import _awq_stage, _gptq_stage, _install_stages


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
                                               gguf_type=opts.get("gguf_type"))
            stage.done = True
            bar.update(len(stage.names))
    bar.close()
    _install_stages(model, stages, modules, states)
    return outs
