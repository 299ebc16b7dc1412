"""2:4 semi-structured sparse matmuls on the sparse tensor cores (cuSPARSELt), with dense fallbacks.

A weight ``W [N, K]`` with at most 2 non-zeros in every group of 4 consecutive input columns is
compressed once (:func:`prepare_24`: ``torch._cslt_compress``, the same packing
``torch.sparse.to_sparse_semi_structured`` uses on its cuSPARSELt backend: the kept values plus
2-bit indices) and multiplied with ``torch._cslt_sparse_mm``:

* :func:`sparse24_linear`: fp16 / bf16 ``y = x W^T + b``;
* :func:`sparse24_int8_linear_dynamic`: W8A8, int8 weights with per-output-channel scales, int8
  activations quantized per token at run time by one Triton kernel straight into the padded int8
  operand cuSPARSELt reads (:func:`lowbit.kernels.triton.sparse24.quantize_rows_padded`); the weight
  scales are applied inside the sparse GEMM (cuSPARSELt's per-row alpha vector) and the output is
  written in the activation dtype; the per-token scale and the bias follow in one Triton pass that
  also writes the result row-major (:func:`lowbit.kernels.triton.sparse24.rescale_tokens`). Where this
  cuSPARSELt build refuses the alpha vector, an int32 product and a float32 rescale (the numerics of
  :func:`lowbit.kernels.reference.int8_linear_dynamic`) are used.

Dispatch by the number of rows ``M`` of the input (tokens): sparse kernels pay for the sparse
metadata, their tile shapes and PyTorch's per-call cuSPARSELt setup at small ``M``, where the dense
path (``F.linear`` / lowbit's dense int8 kernel) is as fast or faster. Under backend ``"auto"`` the
tuner (:data:`ALG_SEARCH`) measures both paths once per shape and M bucket and keeps the cheaper under
:data:`OBJECTIVE` (eager execution by default, or CUDA-graph replay); with tuning off :data:`MIN_M`
holds the crossover per kind, measured on the H200 (``bench/results/sparsity.md``);
``backend="sparse" | "dense"`` forces a path.
Off CUDA (or without cuSPARSELt, or with shapes cuSPARSELt does not take) the dense reference runs:
``F.linear`` on the pruned weight, :func:`lowbit.kernels.reference.int8_linear_dynamic` for int8.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from lowbit.kernels import reference

#: smallest M (tokens) for which the sparse kernel is used under backend "auto" when tuning is off, per kind
MIN_M: Dict[str, int] = {"fp": 256, "int8": 64}
BACKENDS = ("auto", "sparse", "dense", "reference")
# cuSPARSELt operand alignment: rows/cols of the compressed matrix, rows of the dense operand
_ALIGN = {torch.float16: (16, 16, 8), torch.bfloat16: (16, 16, 8), torch.int8: (32, 32, 16)}
_fused_alpha_ok: Dict[str, bool] = {}
#: tune each call shape once (default on; ``LOWBIT_CSLT_SEARCH=0`` or ``alg_search=False``: algorithm 0,
#: ``transpose_result=True`` and the :data:`MIN_M` crossover, the behaviour before tuning). The first call of
#: a (N, K, dtype, M bucket, operand layout) on CUDA, outside graph capture, asks cuSPARSELt's own search
#: (``torch._cslt_sparse_mm_search``) for the best algorithm with the result written row-major
#: (``transpose_result=True``) and column-major (a transposed view is returned), measures each candidate
#: and, under backend "auto", the dense path (see :func:`_measure`), and keeps the cheapest under the
#: tuning objective (:data:`OBJECTIVE`) for every later call of that key (all layers of one shape share it).
#: On the H200 algorithm 0 ran the bf16 2:4 GEMM at M=4096 no faster than dense bf16, the searched one
#: 1.5-1.7x faster (bench/results/sparsity.md).
ALG_SEARCH = os.environ.get("LOWBIT_CSLT_SEARCH", "1") != "0"
#: what the tuner minimises (``LOWBIT_CSLT_OBJECTIVE``, or ``objective=`` / ``SparseLinear.tune_for``):
#: ``"eager"`` (default): the cost of a call run eagerly, ``max(GPU time, host time per call)``: PyTorch's
#: ``_cslt_sparse_mm`` builds the cuSPARSELt descriptors and plan on every call, host work that a CUDA
#: graph does not repeat and that eager code pays wherever it exceeds the GPU time; ``"graph"``: the GPU
#: time alone (CUDA-graph replay), for code that is captured in CUDA graphs.
OBJECTIVES = ("eager", "graph")
OBJECTIVE = os.environ.get("LOWBIT_CSLT_OBJECTIVE", "eager")
#: the int8 path's glue: ``"fused"`` (default; the Triton kernels of :mod:`lowbit.kernels.triton.sparse24`)
#: or ``"previous"`` (lowbit's dense-path activation quantization, a padding copy and torch's in-place
#: rescale: what ran before, kept for the benchmark's comparison); ``LOWBIT_CSLT_GLUE``.
GLUE = os.environ.get("LOWBIT_CSLT_GLUE", "fused")


def _parse_modes(spec: str):
    """``"T0,F0,Fs@256"`` -> ``[("T0", 0), ("F0", 0), ("Fs", 256)]``: the candidates the tuner may time, each
    from a smallest M on. ``T0``/``F0``: algorithm 0 with the result row-major / column-major (a transposed
    view); ``Ts``/``Fs``: the algorithm cuSPARSELt's search picks for that layout; ``FsT``/``TsF``: the
    algorithm searched in one layout run in the other."""
    out = []
    for tok in filter(None, (t.strip() for t in spec.split(","))):
        mode, _, m = tok.partition("@")
        if mode not in ("T0", "F0", "Ts", "Fs", "FsT", "TsF"):
            raise ValueError(f"LOWBIT_CSLT_MODES: unknown mode {mode!r} in {spec!r}")
        out.append((mode, int(m or 0)))
    return out


#: the tuner's candidates (``LOWBIT_CSLT_MODES``). Only combinations checked on the H200 are on by default
#: (bench/sparse_diag.py, one process per dtype x mode x M = 1 ... 4096): searching with
#: ``transpose_result=True`` failed there for fp16 ("internal error" in cusparseLtMatmulSearch) and for int8
#: ran algorithm ids the other layout refused; in the first tuned run it left cuSPARSELt in an error state and
#: the process hit an illegal instruction (bench/results/sparsity.md).
MODES = _parse_modes(os.environ.get("LOWBIT_CSLT_MODES", "T0,F0,Fs,FsT"))
#: tuned choice per key (kernel key + (dense allowed, objective)): ("dense",) or ("sparse", transpose_result, alg_id)
_PLAN: Dict[tuple, tuple] = {}
#: what the tuner measured per key: {"candidates": [{"plan", "gpu_ms", "host_ms", "eager_ms", "cost_ms"}], "choice"}
_TUNE_LOG: Dict[tuple, dict] = {}
#: cuSPARSELt's searched algorithm per (kernel key, transpose_result): one search serves both objectives
_SEARCHED: Dict[tuple, int] = {}
_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


def _objective(objective: Optional[str]) -> str:
    obj = objective or OBJECTIVE
    if obj not in OBJECTIVES:
        raise ValueError(f"cuSPARSELt tuning objective {obj!r} (LOWBIT_CSLT_OBJECTIVE / objective= / "
                         f"SparseLinear.tune_for): expected one of {', '.join(OBJECTIVES)}")
    return obj


def _bucket(M: int) -> int:
    return 1 << max(M - 1, 0).bit_length()


def _search(packed: torch.Tensor, b: torch.Tensor, **kw) -> int:
    try:
        aid = torch._cslt_sparse_mm_search(packed, b, **kw)
        return int(aid[0] if isinstance(aid, (tuple, list)) else aid)
    except (RuntimeError, TypeError, AttributeError):
        return 0


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001
        return False


def _median(v):
    v = sorted(v)
    return v[len(v) // 2]


def _graph_ms(fn, burst: int = 4, reps: int = 3) -> Optional[float]:
    """GPU milliseconds per call of ``fn``: a burst of calls captured in a CUDA graph and replayed, so that
    no host work is counted; None where the capture fails."""
    dev = torch.cuda.current_device()
    s = _STREAMS.get(dev)
    if s is None:
        s = _STREAMS[dev] = torch.cuda.Stream()
    g = torch.cuda.CUDAGraph()
    s.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(s):
            g.capture_begin(capture_error_mode="thread_local")
            try:
                for _ in range(burst):
                    fn()
            finally:
                g.capture_end()
        torch.cuda.current_stream().wait_stream(s)
        g.replay()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / burst)
        return _median(times)
    except Exception:  # noqa: BLE001  (capture refused: the eager figures decide)
        try:
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001
            pass
        return None
    finally:
        del g


def _measure(fn, burst: int = 8, reps: int = 3, limit_ms: Optional[float] = None) -> Dict[str, Optional[float]]:
    """Milliseconds per call of ``fn``, three ways (after two warm-up calls; where the second, synchronised,
    takes longer than ``limit_ms`` the candidate is hopeless and that one figure is returned for all three):

    * ``host_ms``: the host's time to issue a burst of calls starting from an idle GPU (no synchronisation
      inside the burst): PyTorch's per-call cuSPARSELt setup, kernel launches, and any wait the call itself
      imposes (a call that synchronises shows its GPU time here too);
    * ``gpu_ms``: CUDA-graph replay (:func:`_graph_ms`), the GPU time alone;
    * ``eager_ms``: CUDA events around bursts of back-to-back eager calls (median of ``reps``), what an
      isolated eager loop sees (the tuner's only measurement before).
    """
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t0) * 1e3
    if limit_ms is not None and one > limit_ms:
        return {"host_ms": one, "gpu_ms": None, "eager_ms": one, "cut": True}
    t0 = time.perf_counter()
    for _ in range(burst):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / burst
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(burst):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / burst)
    return {"host_ms": host, "gpu_ms": _graph_ms(fn), "eager_ms": _median(times)}


def _cost(m: Dict[str, Optional[float]], objective: str) -> float:
    """The tuner's figure of merit: ``graph``: GPU time; ``eager``: ``max(GPU time, host time per call)``
    (a model's forward keeps the GPU busy only where the host issues work faster than the GPU runs it)."""
    gpu = m.get("gpu_ms")
    if gpu is None:
        gpu = m["eager_ms"]
    return gpu if objective == "graph" else max(gpu, m.get("host_ms") or 0.0)


def _tuned(key: tuple, packed: torch.Tensor, bT: torch.Tensor, allow_dense: bool, run_sparse, run_dense,
           objective: Optional[str] = None, row_major: bool = True, **kw):
    """The tuned choice for ``key`` (see :data:`ALG_SEARCH`, :data:`OBJECTIVE`); ``run_sparse(transpose_result,
    alg_id)`` and ``run_dense()`` compute the whole output (activation quantization and rescale included);
    ``row_major=False``: no candidate writes the result row-major (``transpose_result=True``)."""
    obj = _objective(objective)
    base = key
    key = key + (allow_dense, obj)
    plan = _PLAN.get(key)
    if plan is not None:
        return plan
    default = ("sparse", row_major, 0)
    if _capturing():  # no timing inside a CUDA graph capture: the untuned default
        return default
    cands = [default]
    M = bT.shape[1]
    for mode, min_m in MODES:
        if M < min_m or mode == "T0":
            continue
        if mode == "F0":
            cands.append(("sparse", False, 0))
            continue
        s_tr = mode.startswith("T")  # the layout the search runs with
        run_tr = s_tr if mode in ("Ts", "Fs") else not s_tr
        if not row_major and (s_tr or run_tr):
            continue
        if (base, s_tr) not in _SEARCHED:
            _SEARCHED[(base, s_tr)] = _search(packed, bT, transpose_result=s_tr, **kw)
        cands.append(("sparse", run_tr, _SEARCHED[(base, s_tr)]))
    cands = list(dict.fromkeys(cands))
    if allow_dense:
        cands.append(("dense",))
    best, best_t, log = None, float("inf"), []
    for c in cands:
        try:
            m = _measure(run_dense if c[0] == "dense" else (lambda c=c: run_sparse(c[1], c[2])),
                         limit_ms=max(2.0, 20 * best_t) if best_t < float("inf") else None)
        except RuntimeError as e:
            log.append({"plan": list(c), "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        t = _cost(m, obj)
        log.append({"plan": list(c), **m, "cost_ms": t})
        if t < best_t:
            best, best_t = c, t
    best = best or default
    _PLAN[key] = best
    _TUNE_LOG[key] = {"candidates": log, "choice": list(best)}
    return best


def cusparselt_available(device: Optional[torch.device] = None) -> bool:
    """Whether cuSPARSELt can run on ``device`` (a CUDA device with PyTorch's cuSPARSELt build)."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    if not torch.cuda.is_available():
        return False
    be = getattr(torch.backends, "cusparselt", None)
    return bool(be is not None and be.is_available())


def shape_ok(w: torch.Tensor) -> bool:
    """Whether cuSPARSELt takes ``w [N, K]`` (dtype and alignment)."""
    al = _ALIGN.get(w.dtype)
    return al is not None and w.dim() == 2 and w.shape[0] % al[0] == 0 and w.shape[1] % al[1] == 0


def prepare_24(w: torch.Tensor) -> Optional[torch.Tensor]:
    """Compress a 2:4-sparse CUDA weight ``[N, K]`` (fp16, bf16 or int8) for the sparse GEMM; None
    where cuSPARSELt cannot take it (CPU, no cuSPARSELt, shape or dtype)."""
    if not (w.is_cuda and cusparselt_available(w.device) and shape_ok(w)):
        return None
    return torch._cslt_compress(w.contiguous())


def _use_sparse(kind: str, M: int, packed: Optional[torch.Tensor], x: torch.Tensor, backend: Optional[str]) -> bool:
    b = backend or "auto"
    if b not in BACKENDS:
        raise ValueError(f"unknown sparse backend {b!r}; expected one of {', '.join(BACKENDS)}")
    if b in ("dense", "reference") or packed is None or not x.is_cuda:
        if b == "sparse" and (packed is None or not x.is_cuda):
            raise RuntimeError("backend='sparse' needs a CUDA input and a weight compressed by prepare_24 "
                               "(cuSPARSELt available, fp16/bf16/int8, aligned shape)")
        return False
    return b == "sparse" or M >= MIN_M[kind]


#: _ROW_MAJOR_FP16: fp16 products are never asked for a row-major result (``transpose_result=True``): on the
#: H200 (torch 2.11, cuSPARSELt 0.8) every such call took ~0.2 s of host time (0.5 ms for bf16 and int8),
#: searching in that layout failed outright (bench/results/sparsity.md); the column-major result is a
#: transposed view, as torch's own ``to_sparse_semi_structured`` returns it.


def _pad_rows(x2: torch.Tensor, mult: int) -> torch.Tensor:
    pad = (-x2.shape[0]) % mult
    return F.pad(x2, (0, 0, 0, pad)) if pad else x2


def sparse24_linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None,
                    packed: Optional[torch.Tensor] = None, backend: Optional[str] = None,
                    alg_search: Optional[bool] = None, objective: Optional[str] = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a 2:4-pruned fp16/bf16 ``w [N, K]``; ``packed`` = :func:`prepare_24` (w).

    With tuning on (:data:`ALG_SEARCH`), and for fp16 always, the output may be a transposed (column-major)
    view; ``objective``:
    see :data:`OBJECTIVE`."""
    K = x.shape[-1]
    M = x.numel() // K
    N = w.shape[0]
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)

    def dense():
        wd = w if w.dtype == x.dtype else w.to(x.dtype)
        return F.linear(x, wd, b)

    tune = ALG_SEARCH if alg_search is None else alg_search
    be = backend or "auto"
    if x.dtype != w.dtype or not _use_sparse("fp", M if not tune else 1 << 30, packed, x, backend):
        return dense()
    x2 = x.reshape(M, K)
    if not x2.is_contiguous():  # cuSPARSELt reads the operand as [M, K] row-major (a transposed view)
        x2 = x2.contiguous()
    bT = _pad_rows(x2, _ALIGN[w.dtype][2]).t()

    def sparse(tr, aid):
        y = torch._cslt_sparse_mm(packed, bT, bias=b, transpose_result=tr, alg_id=aid)
        y = y[:M] if tr else y[:, :M].t()
        return y.reshape(*x.shape[:-1], N)

    row_major = w.dtype != torch.float16  # see _ROW_MAJOR_FP16
    if not tune:
        return sparse(row_major, 0)
    key = ("fp", N, K, w.dtype, _bucket(M), bT.is_contiguous(), b is not None)
    plan = _tuned(key, packed, bT, be == "auto", sparse, dense, objective=objective, row_major=row_major, bias=b)
    return dense() if plan[0] == "dense" else sparse(plan[1], plan[2])


def _int8_linear_cpu(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`lowbit.kernels.reference.int8_linear_dynamic`, bit for bit, faster on the CPU: the integer
    products are summed in float32 over chunks of 1024 input columns (|sum| <= 1024 * 127 * 127 < 2**24,
    so every partial sum is exact), the chunks in float64 (exact), then rounded once to float32."""
    x2 = x.reshape(-1, x.shape[-1])
    q, sx = reference.quantize_rows(x2, fp8=False)
    K = q.shape[1]
    qf, wf = q.float(), w_int8.float()
    acc = None
    for a in range(0, K, 1024):
        part = (qf[:, a:a + 1024] @ wf[:, a:a + 1024].T).double()
        acc = part if acc is None else acc + part
    out = reference._rescale(acc.float(), sx, w_scale, bias, x.dtype)
    return out.reshape(*x.shape[:-1], w_int8.shape[0])


def _fused_glue(t: torch.Tensor) -> bool:
    """Whether the int8 path's glue runs as the Triton kernels of :mod:`lowbit.kernels.triton.sparse24`."""
    from lowbit import _deps

    return GLUE != "previous" and t.is_cuda and _deps.available("triton") and not torch.compiler.is_compiling()


def _quant_operand(x: torch.Tensor, M: int, K: int):
    """``(bT [K, Mp] int8, sx [M] float32)``: the per-token int8 activations as the transposed view of a
    row-major ``[Mp, K]`` tensor (``Mp`` = ``M`` padded to cuSPARSELt's alignment, pad rows zero)."""
    x2 = x.reshape(M, K)
    mp = M + (-M) % _ALIGN[torch.int8][2]
    if _fused_glue(x2):
        from lowbit.kernels.triton.sparse24 import quantize_rows_padded

        q, sx = quantize_rows_padded(x2, mp)
        return q.t(), sx
    from lowbit.kernels.native import _quantize_rows  # the previous glue

    q, sx = _quantize_rows(x2.contiguous(), fp8=False)
    return _pad_rows(q, _ALIGN[torch.int8][2]).t(), sx


def _rescale_out(y: torch.Tensor, tr: bool, M: int, sx: torch.Tensor, bias: Optional[torch.Tensor],
                 out_dtype: torch.dtype) -> torch.Tensor:
    """The sparse GEMM's output (weight scales applied) times the per-token scales, plus the bias, as
    ``[M, N]`` of ``out_dtype`` (row-major with the fused glue; the previous glue keeps a transposed view)."""
    yv = y[:M] if tr else y[:, :M].t()
    if _fused_glue(yv):
        from lowbit.kernels.triton.sparse24 import rescale_tokens

        return rescale_tokens(yv, sx, None if bias is None else bias.contiguous(), out_dtype)
    yv.mul_(sx.to(yv.dtype)[:, None])  # yv is the GEMM's own fresh output
    if bias is not None:
        yv.add_(bias.to(yv.dtype))
    return yv.to(out_dtype)


def sparse24_int8_linear_dynamic(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor,
                                 bias: Optional[torch.Tensor] = None, packed: Optional[torch.Tensor] = None,
                                 backend: Optional[str] = None, alg_search: Optional[bool] = None,
                                 objective: Optional[str] = None) -> torch.Tensor:
    """W8A8 with a 2:4-pruned int8 ``w_int8 [N, K]`` and per-channel ``w_scale [N]``; per-token
    dynamic int8 activations. ``packed`` = :func:`prepare_24` (w_int8); ``objective``: see :data:`OBJECTIVE`."""
    K = x.shape[-1]
    M = x.numel() // K
    if backend == "reference":
        return reference.int8_linear_dynamic(x, w_int8, w_scale, bias)
    if not x.is_cuda:
        return _int8_linear_cpu(x, w_int8, w_scale, bias)
    tune = ALG_SEARCH if alg_search is None else alg_search
    if not _use_sparse("int8", M if not tune else 1 << 30, packed, x, backend):
        from lowbit.kernels import api

        return api.int8_linear_dynamic(x, (w_int8, w_scale), bias)
    return _int8_sparse(x, w_int8, w_scale, bias, packed, backend or "auto", tune, objective)


def _int8_sparse(x, w_int8, w_scale, bias, packed, backend: str, tune: bool, objective: Optional[str]):
    """The sparse int8 path: algorithm 0 row-major untuned, else the tuned (transpose_result, algorithm)
    and, under backend "auto", the dense int8 kernel where it is cheaper for this shape and M bucket."""
    from lowbit.kernels import api

    K = x.shape[-1]
    M = x.numel() // K
    N = w_int8.shape[0]
    out_dtype = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    fused = out_dtype != torch.float32 and _fused_alpha_ok.get(f"{out_dtype}", True)
    alpha = w_scale if w_scale.dtype == torch.float32 and w_scale.is_contiguous() else w_scale.float().contiguous()

    def dense():
        return api.int8_linear_dynamic(x, (w_int8, w_scale), bias)

    def quant():
        return _quant_operand(x, M, K)

    def sparse(tr, aid, pre=None):
        bT, s_ = pre if pre is not None else quant()  # timed as a whole: the activation quantization included
        if fused:
            y = torch._cslt_sparse_mm(packed, bT, alpha=alpha, out_dtype=out_dtype, transpose_result=tr, alg_id=aid)
            return _rescale_out(y, tr, M, s_, bias, x.dtype).reshape(*x.shape[:-1], N)
        acc = torch._cslt_sparse_mm(packed, bT, out_dtype=torch.int32, transpose_result=tr, alg_id=aid)
        acc = acc[:M] if tr else acc[:, :M].t()
        out = acc.float().mul_(s_[:, None]).mul_(alpha[None, :])
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], N)

    def retry_unfused():
        _fused_alpha_ok[f"{out_dtype}"] = False  # this cuSPARSELt build: int32 product + float32 rescale
        return _int8_sparse(x, w_int8, w_scale, bias, packed, backend, tune, objective)

    if not tune:
        try:
            return sparse(True, 0)
        except RuntimeError:
            if not fused:
                raise
            return retry_unfused()
    obj = _objective(objective)
    kw = {"alpha": alpha, "out_dtype": out_dtype} if fused else {"out_dtype": torch.int32}
    key = ("int8", N, K, out_dtype, _bucket(M), fused, bias is not None)
    if backend == "auto" and _PLAN.get(key + (True, obj), ("",))[0] == "dense":
        return dense()
    pre = quant()
    try:
        plan = _tuned(key, packed, pre[0], backend == "auto", sparse, dense, objective=obj, **kw)
    except RuntimeError:
        if not fused:
            raise
        return retry_unfused()
    if plan[0] == "dense":
        return dense()
    try:
        return sparse(plan[1], plan[2], pre)
    except RuntimeError:
        if not fused:
            raise
        _PLAN.pop(key + (backend == "auto", obj), None)
        return retry_unfused()


__all__ = ["prepare_24", "sparse24_linear", "sparse24_int8_linear_dynamic", "cusparselt_available", "shape_ok",
           "MIN_M", "BACKENDS", "ALG_SEARCH", "OBJECTIVE", "OBJECTIVES"]
