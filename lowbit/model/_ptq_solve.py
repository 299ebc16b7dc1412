"""What the calibrated PTQ pipelines do to one stage: the GPTQ / AWQ solves (spread over the ranks of a
data-parallel run), the installation of the quantized linears and AWQ's scale folding."""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from lowbit.algorithms.awq import awq_search
from lowbit.algorithms.gptq import GPTQResult, gptq_factor, gptq_quantize, gptq_static_groups
from lowbit.algorithms.grid import columns

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


def _row_pieces(stage: _Stage, modules: Dict[str, nn.Linear], world: int, align: Optional[int] = None):
    """The stage's output rows (its linears stacked in order) cut into ``world`` contiguous, about
    equal shares (cuts on multiples of ``align``, default :data:`lowbit.algorithms.gptq.ROW_CHUNK`):
    ``[(name, row_start, row_stop, owner)]``. GPTQ solves every row on its own (the shared Hessian
    factor, per-row groups and error propagation, the block update in fixed row chunks), so a linear
    solved in pieces gives the codes of the whole; the pieces only balance the ranks' solve work (one
    rank no longer solves down_proj while the others wait)."""
    from lowbit.algorithms.gptq import ROW_CHUNK

    align = align or ROW_CHUNK
    sizes = [modules[n].weight.shape[0] for n in stage.names]
    total = sum(sizes)
    cuts = [min(total, int(round(total * r / world / align)) * align) for r in range(world)] + [total]
    pieces, off = [], 0
    for n, R in zip(stage.names, sizes):
        for r in range(world):
            lo, hi = max(cuts[r], off), min(cuts[r + 1], off + R)
            if lo < hi:
                pieces.append((n, lo - off, hi - off, r))
        off += R
    return pieces


def _solve_batches(mine):
    """A rank's row pieces ``[(j, (name, lo, hi, owner))]`` grouped into runs solved by one
    :func:`gptq_quantize` call each (their rows stacked): the solve's cost is mostly per call (``K / 128``
    blocks of launches, whatever the rows), so a rank with three pieces took three times as long as one
    with one (``bench/results/multi_gpu.md``, run 6). Every piece but a run's last has a multiple of
    :data:`lowbit.algorithms.gptq.ROW_CHUNK` rows, so the block update's row chunks are the pieces' own
    and each row's codes are those of the piece solved alone. ``LOWBIT_DP_BATCH=0``: one call per piece."""
    from lowbit.algorithms.gptq import ROW_CHUNK

    if os.environ.get("LOWBIT_DP_BATCH", "1") == "0":
        return [[x] for x in mine]
    runs, cur = [], []
    for x in mine:
        cur.append(x)
        _, (_, lo, hi, _) = x
        if (hi - lo) % ROW_CHUNK:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def _piece_layout(pieces, modules: Dict[str, nn.Linear], group_size, bits: int):
    """Per piece ``(rows, K, G, packed)`` and per rank its payload's byte size for :func:`_exchange_pieces`: the
    owner's pieces' scales and zeros (fp32) first, then their codes, two 4-bit codes a byte where ``bits <= 4``
    and ``K`` is even."""
    shapes, sizes = [], {}
    for n, lo, hi, owner in pieces:
        K = modules[n].weight.shape[1]
        G = -(-K // columns(K, group_size).group)
        packed = bits <= 4 and K % 2 == 0
        rows = hi - lo
        shapes.append((rows, K, G, packed))
        sizes[owner] = sizes.get(owner, 0) + rows * G * 8 + rows * (K // 2 if packed else K)
    return shapes, sizes


def _pack_pieces(pieces, mine: Dict[int, GPTQResult], shapes, rank: int, device) -> torch.Tensor:
    """This rank's payload for :func:`_exchange_pieces` (the layout of :func:`_piece_layout`)."""
    own = [j for j, p in enumerate(pieces) if p[3] == rank]
    fl, cb = [], []
    for j in own:
        res = mine[j]
        fl += [res.scales.float().contiguous().reshape(-1), res.zeros.float().contiguous().reshape(-1)]
        c = res.codes.contiguous()
        if shapes[j][3]:
            c = c[:, 0::2] | (c[:, 1::2] << 4)
        cb.append(c.reshape(-1))
    if not own:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat([t.view(torch.uint8) for t in fl] + cb)


def _exchange_pieces(pieces, mine: Dict[int, GPTQResult], modules: Dict[str, nn.Linear], group_size, bits: int,
                     rank: int, world: int) -> Dict[int, list]:
    """Every piece's ``[codes uint8, scales, zeros]`` on every rank in one :func:`all_gather_bytes` (instead of three
    broadcasts per piece, each between two device synchronisations): each rank packs its solved pieces (``mine``)
    into one byte payload, the payloads are gathered and cut back into tensors. Pure data movement: the bits are
    the owner's."""
    from lowbit.model.distributed import all_gather_bytes

    shapes, sizes = _piece_layout(pieces, modules, group_size, bits)
    payload = _pack_pieces(pieces, mine, shapes, rank, modules[pieces[0][0]].weight.device)
    bufs = all_gather_bytes(payload, [sizes.get(r, 0) for r in range(world)])
    out: Dict[int, list] = {}
    for r in range(world):
        js = [j for j, p in enumerate(pieces) if p[3] == r]
        if r == rank:
            for j in js:
                res = mine.pop(j)
                out[j] = [res.codes.contiguous(), res.scales.contiguous(), res.zeros.contiguous()]
            continue
        buf, off = bufs[r], 0
        sz = {}
        for j in js:
            rows, K, G, _ = shapes[j]
            n = rows * G * 4
            sz[j] = (buf[off:off + n].view(torch.float32).view(rows, G), buf[off + n:off + 2 * n].view(
                torch.float32).view(rows, G))
            off += 2 * n
        for j in js:
            rows, K, G, packed = shapes[j]
            n = rows * (K // 2 if packed else K)
            c = buf[off:off + n].view(rows, K // 2 if packed else K)
            off += n
            c = torch.stack([c & 15, c >> 4], -1).reshape(rows, K) if packed else c.clone()
            out[j] = [c, sz[j][0].clone(), sz[j][1].clone()]
    return out


def _layer_opts(opts: Dict[str, Any], name: str) -> Dict[str, Any]:
    """``opts`` for one linear: a per-linear ``gguf_type`` mapping (``{linear name: GGUF type}``, e.g. a
    llama.cpp recipe or a budget plan resolved per weight) replaced by that linear's type."""
    t = opts.get("gguf_type")
    if not isinstance(t, dict):
        return opts
    if name not in t:
        raise ValueError(f"gguf_type mapping has no type for the linear {name!r} ({len(t)} linears mapped)")
    return {**opts, "gguf_type": t[name]}


#: the options of :func:`gptq_static_groups` (a subset of :func:`gptq_quantize`'s)
_FIT_KEYS = ("blocksize", "act_order", "group_objective", "n_grid", "max_shrink", "two_sided")


def _fits_while_factoring(opts: Dict[str, Any], device: torch.device) -> bool:
    """Whether the static groups are fitted while the Hessian is factored (:func:`_factor_and_fit`): affine grids
    with static groups (the default), on a GPU (on the CPU nothing runs beside the factorisation, and the fits
    would only move). ``LOWBIT_GPTQ_OVERLAP``: ``auto`` (default), ``1`` (also on the CPU, one after the other:
    tests), ``0`` (off: the fits inside each solve, as before)."""
    mode = os.environ.get("LOWBIT_GPTQ_OVERLAP", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"LOWBIT_GPTQ_OVERLAP={mode!r}: expected auto, 0 or 1")
    if mode == "0" or not opts.get("static_groups", True) or opts.get("gguf_type") is not None \
            or opts.get("grid") is not None:
        return False
    return mode == "1" or torch.device(device).type == "cuda"


_FIT_STREAMS: Dict[Any, Any] = {}


def _solve_graphs(rows_split: bool, device: torch.device) -> bool:
    """Whether the solves replay their column loop from CUDA graphs (``gptq_quantize(cuda_graph=True)``, the same
    bits): ``LOWBIT_GPTQ_GRAPH`` ``auto`` (default: on CUDA when a data-parallel run splits the rows, where a rank's
    solve was bound by the host's kernel launches), ``1`` (on CUDA always), ``0`` (never)."""
    mode = os.environ.get("LOWBIT_GPTQ_GRAPH", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"LOWBIT_GPTQ_GRAPH={mode!r}: expected auto, 0 or 1")
    return torch.device(device).type == "cuda" and (mode == "1" or (mode == "auto" and rows_split))


def _factor_and_fit(H: torch.Tensor, opts: Dict[str, Any], share, jobs, bits, group_size, sym):
    """:func:`gptq_factor` of ``H``, and the static groups of the weights ``jobs`` (``{key: weight}``) as
    :func:`gptq_static_groups` fits them, the fits queued while the Cholesky factorisation runs: on a GPU on a
    side stream (the factorisation is one latency-bound cuSOLVER call, the fits elementwise work that needs no
    factor: the two overlap), the caller's stream waiting for them afterwards. Returns ``(factor, {key: groups})``
    for :func:`gptq_quantize`'s ``factor=`` and ``groups=``; the same functions on the same inputs as without
    the overlap, so the same bits. A dampening raised by a failed Cholesky makes the fits stale:
    :func:`gptq_quantize` then fits again."""
    fits: Dict[Any, tuple] = {}
    fit_opts = {k: opts[k] for k in _FIT_KEYS if k in opts}
    state: Dict[str, Any] = {}

    def fit_all(Hf, dead, damp):
        for key, w in jobs.items():
            fits[key] = gptq_static_groups(w, Hf, dead, damp, bits, group_size, sym, **fit_opts)

    def during(Hf, dead, damp):  # called before the Cholesky is queued
        state["damp"] = damp
        if not jobs:
            return None
        if not Hf.is_cuda:
            fit_all(Hf, dead, damp)
            return None
        main = torch.cuda.current_stream(Hf.device)
        side = _FIT_STREAMS.get(Hf.device)
        if side is None:
            side = _FIT_STREAMS[Hf.device] = torch.cuda.Stream(Hf.device)
        side.wait_stream(main)  # H, dead and the weights: queued before the Cholesky, which the side does not wait for
        state["side"], state["main"] = side, main

        def then():  # the Cholesky is queued on the caller's stream: the fits beside it
            with torch.cuda.stream(side):
                fit_all(Hf, dead, damp)

        return then

    factor = gptq_factor(H, opts.get("percdamp", 0.01), opts.get("act_order", True), share=share, inplace=True,
                         during=during)
    if fits and isinstance(state.get("damp"), torch.Tensor):  # the first dampening kept on the device, read now
        first = float(state["damp"])
        fits = {key: (sc, z, first) for key, (sc, z, _) in fits.items()}
    if "side" in state:
        state["main"].wait_stream(state["side"])
        for sc, z, _ in fits.values():  # made on the side stream, read (and freed) on the caller's
            sc.record_stream(state["main"])
            z.record_stream(state["main"])
    return factor, fits


def _gptq_stage(stage: _Stage, modules: Dict[str, nn.Linear], bits, group_size, sym, opts) -> None:
    """GPTQ each linear of the stage on the stage's shared Hessian. In a data-parallel run the
    stage's rows are spread over the ranks (:func:`_row_pieces`; ``LOWBIT_DP_SPLIT=units``: whole
    linears, round robin), every rank solves all its pieces first, then the pieces are broadcast.
    On a GPU the static groups of this rank's weights are fitted while the Hessian is factored
    (:func:`_factor_and_fit`)."""
    dev = modules[stage.names[0]].weight.device
    H = stage.stats.hessian_as(torch.float32).to(dev)
    stage.stats = None  # the float64 sums are not needed any more (the pipelines hold no other reference)
    from lowbit.model.distributed import broadcast_tensors, is_active, rank_world, shared_chunks

    # a data-parallel run shares out the factorisation's triangular solves (LOWBIT_DP_FACTOR=every: each rank all)
    share = shared_chunks if is_active() and os.environ.get("LOWBIT_DP_FACTOR", "shared") != "every" else None
    overlap = _fits_while_factoring(opts, dev)
    rows_split = is_active() and opts.get("gguf_type") is None
    batches, jobs = [], {}
    if rows_split:
        rank, world = rank_world()
        if os.environ.get("LOWBIT_DP_SPLIT", "rows") == "units":
            pieces = [(n, 0, modules[n].weight.shape[0], _solve_owner(i)) for i, n in enumerate(stage.names)]
        else:
            pieces = _row_pieces(stage, modules, world)
        for batch in _solve_batches([(j, p) for j, p in enumerate(pieces) if p[3] == rank]):
            # a rank's pieces in one call where the rows allow
            ws = [modules[n].weight.detach()[lo:hi] for _, (n, lo, hi, _) in batch]
            batches.append((batch, ws, ws[0] if len(ws) == 1 else torch.cat(ws)))
        if overlap:
            jobs = {bi: b[2] for bi, b in enumerate(batches)}
    elif overlap:  # one process (a data-parallel run without the row split has a gguf_type: no overlap)
        jobs = {n: modules[n].weight.detach() for n in stage.names}
    factor, fits = _factor_and_fit(H, opts, share, jobs, bits, group_size, sym)
    H = factor[0]  # the same matrix (dead inputs set), handed to gptq_quantize for its shape checks

    graphs = _solve_graphs(rows_split, dev)
    if rows_split:  # plain tensors: broadcast them directly
        mine = {}
        for bi, (batch, ws, stacked) in enumerate(batches):
            # solve first: the ranks work at the same time, then exchange
            res = gptq_quantize(stacked, H, bits, group_size, sym, factor=factor, groups=fits.pop(bi, None),
                                compute_loss=False, cuda_graph=graphs, **opts)
            off = 0
            for (j, _), w in zip(batch, ws):
                r = w.shape[0]
                mine[j] = GPTQResult(codes=res.codes[off:off + r], scales=res.scales[off:off + r],
                                     zeros=res.zeros[off:off + r], loss=0.0, damp=res.damp, bits=res.bits,
                                     group_size=res.group_size, sym=res.sym, dtype=res.dtype)
                off += r
        parts: Dict[str, list] = {n: [] for n in stage.names}
        if os.environ.get("LOWBIT_DP_EXCHANGE", "gather") == "gather":
            got = _exchange_pieces(pieces, mine, modules, group_size, bits, rank, world)
            for j, (n, _, _, _) in enumerate(pieces):
                parts[n].append(got[j])
        else:  # one broadcast per piece and tensor (before run 10)
            for j, (n, lo, hi, owner) in enumerate(pieces):
                w = modules[n].weight.detach()
                if owner == rank:
                    res = mine.pop(j)
                    tensors = [res.codes.contiguous(), res.scales.contiguous(), res.zeros.contiguous()]
                else:
                    g = columns(w.shape[1], group_size).group
                    G = -(-w.shape[1] // g)
                    tensors = [torch.empty((hi - lo, w.shape[1]), dtype=torch.uint8, device=w.device),
                               torch.empty(hi - lo, G, device=w.device), torch.empty(hi - lo, G, device=w.device)]
                broadcast_tensors(tensors, owner)
                parts[n].append(tensors)
        for n in stage.names:
            w = modules[n].weight.detach()
            ps = parts[n]
            cat = [ps[0][k] if len(ps) == 1 else torch.cat([p[k] for p in ps]) for k in range(3)]
            res = GPTQResult(codes=cat[0], scales=cat[1], zeros=cat[2], loss=0.0, damp=factor[4], bits=bits,
                             group_size=columns(w.shape[1], group_size).group, sym=sym,
                             dtype=w.dtype)
            stage.states[n] = res.state
            with torch.no_grad():
                modules[n].weight.copy_(res.dequantize().to(w.dtype))
        return
    for i, n in enumerate(stage.names):
        w = modules[n].weight.detach()
        res = _on_owner(_solve_owner(i), lambda w=w, n=n: gptq_quantize(w, H, bits, group_size, sym, factor=factor,
                                                                        groups=fits.pop(n, None), compute_loss=False,
                                                                        cuda_graph=graphs, **_layer_opts(opts, n)))
        dev = w.device
        res.codes, res.scales, res.zeros = res.codes.to(dev), res.scales.to(dev), res.zeros.to(dev)
        stage.states[n] = res.state
        with torch.no_grad():
            modules[n].weight.copy_(res.dequantize().to(w.dtype))


def _awq_stage(stage: _Stage, modules: Dict[str, nn.Linear], bits, group_size, sym, opts) -> None:
    types = [_layer_opts(opts, n).get("gguf_type") for n in stage.names]
    opts = dict(_layer_opts(opts, stage.names[0]))
    if len(set(types)) > 1:  # one scale search, each linear scored and written on its own GGUF type
        opts["gguf_type"] = types
    if not opts.pop("gqa_tie", False) and stage.tie is not None:  # o_proj under GQA: clip search only
        stage.fold, stage.tie = None, None
    H = stage.stats.hessian_as(torch.float32)  # the values of hessian().float(), without the float64 quotient
    mean = stage.stats.act_absmean().float()
    stage.stats = None  # the float64 sums are not needed any more
    ws = [modules[n].weight.detach() for n in stage.names]

    def search(share=None):
        return awq_search(ws, H, mean, bits, group_size, sym, scale_search=stage.fold is not None, tie=stage.tie,
                          share=share, **opts)

    from lowbit.model.distributed import is_active, shared_values

    mode = os.environ.get("LOWBIT_DP_AWQ", "shared")
    if mode not in ("shared", "every", "owner"):
        raise ValueError(f"LOWBIT_DP_AWQ={mode!r}: expected shared, every or owner")
    if is_active() and mode in ("shared", "every"):
        # every rank searches (the same inputs give the same result): broadcasting a search's result (pickled states
        # and effective weights) cost more than the search (bench/results/multi_gpu.md: 12-13 s of broadcasts for 2
        # 8B layers). "shared" (session 10): the grid of scale exponents is shared out over the ranks, each point's
        # output error computed by one rank and summed exactly on the host (distributed.shared_values); the clip
        # search on the chosen scales still runs on every rank.
        res = search(shared_values if mode == "shared" else None)
    else:
        res = _on_owner(_solve_owner(len(stage.names) - 1), search)
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
        # an already quantized linear (installed in this run or resumed): its own QuantState
        state = prev.quant_states().get("weight") if hasattr(prev, "quant_states") else None
        if state is not None and state.layout == "gguf":  # raw llama.cpp blocks: divide d (and m) per row
            from lowbit.formats.gguf import scale_rows

            state.data.copy_(scale_rows(state.data, state.scheme, s.to(state.data.device)))
            if hasattr(prev, "set_quant_state"):
                prev.set_quant_state("weight", state)
        elif state is not None:  # an already quantized linear: scale its per-row scales
            sc = state.scales  # [out, G] (group layout) or [out] (channel: one group per row)
            sc.div_(s.to(sc.device).view(-1, *([1] * (sc.dim() - 1))))
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
            installed[n] = new
            states[n] = st
    for stage in stages:
        if stage.input_scales is not None:
            _fold_awq(model, stage, installed)
