"""The linear every frozen lowbit module calls: ``x @ dequantize(state).T + bias``, through the fastest kernel.

:func:`state_linear` is the single entry point of :class:`~lowbit.nn.QLinear`, :class:`~lowbit.nn.Linear4bit`,
the GGUF / GPTQ / AWQ / compressed-tensors modules (all of them ``QLinear`` s) and the PTQ methods. It
picks an implementation by device, input dtype, weight format and the number of rows ``M``:

CUDA (fp16 / bf16 input)
    * 4-bit weights (``nf4`` / ``fp4`` / ``int4`` / ``int4_asym`` groups or blocks tiling the rows, GGUF
      ``q4_0`` / ``q4_1``) and int8 per-channel / GGUF ``q8_0`` weights: :func:`prepared_linear` on a layout
      derived once (:class:`PreparedLinear`: the codes viewed as 32-bit words, the state's own float32 scales
      and uint8 zero points, 16-entry tables): at M <= 4 the fused GEMV of
      :mod:`lowbit.kernels.triton.lowbit_mm` (NF4/FP4 with the codebook in registers), at 4 < M <= 64 (rows may
      reach 256) its tensor-core GEMM ("tc" / "tcb" / "tcbd": the packed weight dequantized in registers as the
      MMA's A operand, "tcb"/"tcbd" two weights per inline-PTX op, "tcbd" one MMA per step, not selected by
      default) where it measured faster, else the weight dequantized by one Triton pass + cuBLAS
      (:func:`dense_linear`, in row
      blocks of at most ``LOWBIT_DENSE_CHUNK_MB``), per ``TUNED_MM`` in :mod:`lowbit.kernels.triton_configs`
      (a launch plan per M is cached on the layout).
    * int8 / fp8 weights with dynamic per-token int8 / fp8 activations:
      :func:`lowbit.kernels.int8_linear_dynamic` / :func:`lowbit.kernels.fp8_linear_dynamic`.
    * anything else: :func:`lowbit.kernels.dequantize` (Triton where it applies) + ``F.linear``.

CPU
    * int8 per-channel weights with dynamic per-token int8 activations on a CPU with VNNI (exact integer
      products): the codes ``round(x / s)`` of the reference, then FBGEMM's prepacked int8 GEMM (the op
      ``quantize_dynamic`` runs; it streams weights from memory fastest, decode) up to 32 rows and
      ``torch._int_mm`` above (faster once the weight is reused across rows, prefill); ``* sw * s + bias``
      in float32. The codes of an input are computed once for the linears that take the same tensor (q / k /
      v, gate / up), and at one row (decode) such linears, learned on the first step, run as one FBGEMM GEMM
      on their stacked weights (:class:`_CpuInt8Group`; an extra packed int8 copy of those weights). Equal to
      the reference up to float32 rounding of the rescale, grouped or not (``bench/results/cpu_ops.md`` and
      ``cpu_infer.md`` have the timings).
    * every other weight: the **dequantize-once cache**: the dequantized weight in the input's dtype is kept
      beside the packed state (not saved, dropped when the module moves) while the process-wide total of
      cached bytes stays within :func:`cache_budget` (``LOWBIT_DEQUANT_CACHE_MB``, default a quarter of
      the machine's RAM; ``0`` disables it). Results are bit-identical to the reference; memory grows
      by the float weight, so a model larger than the budget dequantizes the remaining layers per call.

Derived layouts are prepared once per state (first call, or :func:`prepare` ahead of a CUDA graph or
``torch.compile``), cached on the state object and invalidated when its data is replaced; nothing derived
is ever written to a file. On the GPU none of them copies the weight's codes, except GGUF blocks (18-, 20- and
34-byte blocks are not word aligned): there the repacked layout *replaces* the blocks (:class:`ResidentState`,
exact and checked invertible when made), and reading ``state.data`` gives the blocks back bit for bit.
Dynamic int8 activations read the stored uint8 codes directly (the weight is ``code - 128``).
"""
from __future__ import annotations

import dataclasses
import os
import threading
import weakref
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from lowbit.kernels import select
from lowbit.kernels.api import _CACHE_ATTR, _cached, _store, _versions  # noqa: F401
from lowbit.tensor.state import QuantState

_HALF = (torch.float16, torch.bfloat16)

# per-state cache: the one lowbit.kernels.api keeps (keyed by data pointer and in-place versions of the state)


_NOT_APPLICABLE = object()


# ---------------------------------------------------------------------------------------------
# dequantize-once cache (CPU)

_lock = threading.Lock()
_cached_bytes = [0]


def _env_mib(name: str) -> Optional[int]:
    """Bytes from the environment variable ``name`` given in MiB (negative -> 0), or None when unset or empty."""
    env = os.environ.get(name)
    if env is None or env.strip() == "":
        return None
    try:
        return max(0, int(float(env) * (1 << 20)))
    except ValueError:
        raise ValueError(f"{name}={env!r}: expected a number of MiB") from None


def cache_budget() -> int:
    """Bytes the dequantize-once cache may hold in this process (``LOWBIT_DEQUANT_CACHE_MB``)."""
    got = _env_mib("LOWBIT_DEQUANT_CACHE_MB")
    return _ram_bytes() // 4 if got is None else got


@lru_cache(maxsize=None)
def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def cached_bytes() -> int:
    """Bytes now held by dequantize-once caches of live states."""
    return _cached_bytes[0]


def _release(n: int) -> None:
    with _lock:
        _cached_bytes[0] -= n


def dequantize_state(state: QuantState) -> torch.Tensor:
    """``lowbit.dequantize(state)``, double-quantized scales decoded with the state's own stored code
    (the same computation as :func:`lowbit.nn.functional.dequantize_state`)."""
    from lowbit.tensor.functional import dequantize

    n = state.nested
    if n is not None and n.code is not None and n.layout == "block":
        from lowbit.formats.codebook import dequantize_blockwise

        base = dequantize_blockwise(n.data, n.scales, n.code, n.block_size, torch.float32)
        scales = base + torch.tensor(state.offset, dtype=torch.float32, device=base.device)
        state = dataclasses.replace(state, scales=scales.reshape(n.shape), nested=None, offset=None)
    return dequantize(state)


def _dense(state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """``lowbit.dequantize(state)`` in ``dtype``: from the cache when it fits the budget."""
    key = ("dense", dtype)
    w = _cached(state, key)
    if w is not None:
        return w
    w = dequantize_state(state)
    if w.dtype != dtype:
        w = w.to(dtype)
    n = w.numel() * w.element_size()
    with _lock:
        fits = _cached_bytes[0] + n <= cache_budget()
        if fits:
            _cached_bytes[0] += n
    if fits:
        old = _cached(state, key)
        _store(state, key, w)
        weakref.finalize(w, _release, n)
        del old
    return w


# ---------------------------------------------------------------------------------------------
# CPU int8 x int8 (dynamic per-token activations)


@lru_cache(maxsize=None)
def cpu_has_vnni() -> bool:
    """Whether this CPU multiplies int8 without 16-bit saturation (AVX512-VNNI / AVX-VNNI / AMX)."""
    if os.environ.get("LOWBIT_CPU_INT8", "").strip() == "0":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    except OSError:
        pass
    return False


def _prepack_int8(w: torch.Tensor, sw: torch.Tensor):
    """FBGEMM's packed form of int8 ``w`` [N, K] with per-channel scales ``sw`` (float32 [N])."""
    import warnings

    with warnings.catch_warnings():  # PyTorch marks quantized tensors deprecated; absent ops fall back
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(w, sw.double(), torch.zeros(w.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None)


class _CpuInt8:
    __slots__ = ("w", "wt", "sw", "packed", "n", "k", "group", "misses", "__weakref__")

    def __init__(self, w: torch.Tensor, sw: torch.Tensor):
        self.w = w  # int8 [N, K] (derived once from the canonical uint8 codes, never saved)
        self.wt = w.t()  # the [K, N] view torch._int_mm takes
        self.sw = sw  # float32 [N]
        self.n, self.k = w.shape
        self.packed = _prepack_int8(w, sw)
        self.group = None  # the _CpuInt8Group this layout heads (learned at decode), or None
        self.misses = 0  # groups of this head dropped because a member was not called


class _CpuInt8Group:
    """Layouts called one after another on the same one-row input (q / k / v projections, gate / up): their
    weights packed as one ``[sum N, K]`` FBGEMM matrix, so the first call computes every member's output in one
    GEMM and the others return their slice. Members are weak references (a re-derived layout is a new
    object, so a changed weight never matches)."""

    __slots__ = ("members", "packed", "sizes")

    def __init__(self, members):
        self.members = [weakref.ref(m) for m in members]
        self.packed = _prepack_int8(torch.cat([m.w for m in members]), torch.cat([m.sw for m in members]))
        self.sizes = [m.n for m in members]


def _prepare_cpu_int8(state: QuantState):
    got = _cached(state, "cpu_int8")
    if got is not None:
        return got
    if (state.scheme != "int8" or state.layout != "channel" or state.axis != 0 or len(state.shape) != 2
            or state.nested is not None):
        return _store(state, "cpu_int8", _NOT_APPLICABLE)
    N, K = state.shape
    w = (state.data.view(N, K).to(torch.int16) - 128).to(torch.int8).contiguous()
    sw = state.scales.reshape(-1).float().contiguous()
    if sw.numel() != N:
        return _store(state, "cpu_int8", _NOT_APPLICABLE)
    try:
        p = _CpuInt8(w, sw)
    except (RuntimeError, AttributeError):  # no FBGEMM in this build
        return _store(state, "cpu_int8", _NOT_APPLICABLE)
    return _store(state, "cpu_int8", p)


def _int8_rows(xf: torch.Tensor):
    """Per-token symmetric int8 exactly as :func:`lowbit.nn.functional.fake_quantize_activation`:
    ``s = absmax / 127`` (1 for an all-zero row), ``v = x / s``; returns ``(v, s)`` (v unrounded; s NaN on
    non-finite rows). The absmax is ``max(row max, -row min)``: two reading passes, no ``|x|`` temporary
    (256 x 1536: 47 us against 58 us; the same value, NaN included; ``torch.linalg.vector_norm(x, inf, dim=-1)``
    and ``aminmax(dim=-1)`` measured 18x slower, their row reductions are not vectorized)."""
    amax = torch.maximum(xf.amax(dim=-1, keepdim=True), xf.amin(dim=-1, keepdim=True).neg_())
    s = amax / 127.0
    s = torch.where(s > 0, s, 1.0)
    # the scale returned for the rescale is NaN on rows with a NaN or an inf: the reference's outputs there are
    # NaN (a NaN code, or inf / inf), which integer codes cannot carry
    return xf / s, torch.where(amax < _INF, s, _NAN)


_INF = float("inf")
_NAN = float("nan")


# FBGEMM's prepacked GEMM up to this many rows (it streams cold weights faster: decode), torch._int_mm above
CPU_INT8_FBGEMM_MAX_M = 32


def _fbgemm(v: torch.Tensor, p: _CpuInt8) -> torch.Tensor:
    """``(v @ w.T) * sw`` for integer-valued float ``v`` in [-127, 127]: FBGEMM adds the zero point 128 (exact
    for integers) and multiplies u8 x s8 exactly (VNNI), the per-channel scale fused into its output."""
    return (_FBGEMM_OP or _fbgemm_op())(v, 1.0, 128, p.packed)


_FBGEMM_OP = None


def _fbgemm_op():
    """The op's C++ entry itself: ``torch.ops.quantized.<op>(...)`` first scans the arguments in Python for fake
    script objects (a torchbind op, for export), 2-3 us per call that eager inference never needs."""
    global _FBGEMM_OP
    packet = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    _FBGEMM_OP = getattr(packet, "_op", packet)
    return _FBGEMM_OP


# The last input quantized: q_proj / k_proj / v_proj (and gate_proj / up_proj) take the same tensor, so k / v /
# up reuse q's codes (and, once the sequence is learned, q's call computes their one-row outputs in the same
# GEMM). Keyed on the tensor object (a weak reference: nothing is kept alive) and its in-place version;
# inference tensors (no version counter) are never reused. One entry per process: [wref, version, codes,
# layouts called on it, {layout: output computed ahead}].
_LAST_INPUT = [None]
_C127 = torch.tensor(127.0)
_CM127 = torch.tensor(-127.0)
# a one-row absmax from which s = absmax / 127 is surely a normal float32 (smaller ones take the general path)
_AMAX_LO = 2.0 ** -119
_REUSE_MAX_NUMEL = 1 << 22
_GROUP_MAX_MISSES = 3


def _quantize_input(x: torch.Tensor):
    """``(None, None, v, s)`` of ``x`` (the general path; one row with a normal scale is quantized inline by
    :func:`_cpu_int8_dynamic`): ``v`` the codes per row (float up to ``CPU_INT8_FBGEMM_MAX_M`` rows, int8 above)
    and ``s`` the float32 scales ``[M, 1]``."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    v, s = _int8_rows(x2)
    v = v.round_()  # |v| <= 127 by construction
    if x2.shape[0] > CPU_INT8_FBGEMM_MAX_M:
        v = v.to(torch.int8)
    return None, None, v, s


def _learn_group(entry) -> None:
    """After the last call on an input: the layouts called on one row in a row become a group of their head
    (a group whose outputs went unused is dropped; after a few, the head stops grouping)."""
    calls, ahead = entry[3], entry[4]
    head = calls[0]
    if ahead:  # outputs computed for members that were not called: the sequence changed
        head.group = None
        head.misses += 1
    if (head.group is None and len(calls) > 1 and head.misses < _GROUP_MAX_MISSES and entry[2][0] is not None
            and len(set(map(id, calls))) == len(calls)):
        try:
            head.group = _CpuInt8Group(calls)
        except (RuntimeError, AttributeError):
            head.misses = _GROUP_MAX_MISSES


def _cpu_int8_dynamic(x: torch.Tensor, p: _CpuInt8, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x`` quantized per token (codes ``round(x / s)``, the reference's), exact integer products, then
    ``* sw * s + bias`` in float32: equal to the reference up to float rounding of the rescale.

    Up to ``CPU_INT8_FBGEMM_MAX_M`` rows FBGEMM's prepacked GEMM (given codes, so its own quantization is
    exact, ``* sw`` in its epilogue); above, ``torch._int_mm``. One row (decode): the scale stays a 0-d tensor
    and the input keeps its shape (six small ops in all). The codes of the last input are reused when the next
    linear takes the same tensor (k / v after q), and at one row a learned group (:class:`_CpuInt8Group`)
    computes those linears' outputs in the first one's GEMM. Every output is ``(acc * sw) * s (+ bias)`` in
    float32, grouped or not."""
    c = _LAST_INPUT[0]
    try:
        ver = x._version
    except RuntimeError:  # an inference tensor: no version counter, never reused
        ver = None
    op = _FBGEMM_OP or _fbgemm_op()
    if c is not None and ver is not None and c[1] == ver and c[0]() is x:
        c[3].append(p)
        ahead = c[4]
        if ahead:
            out = ahead.pop(p, None)
            if out is not None:  # computed by the head's GEMM, already in x's shape
                return out.add_(bias) if bias is not None else out
        vs, sc, v, s = c[2]
    else:
        # the previous input's calls may form (or break) a group: only when outputs went unused, or when its
        # head has no group yet (a learned, used group costs nothing here)
        if c is not None and (c[4] or (len(c[3]) > 1 and c[3][0].group is None)):
            _learn_group(c)
        # one row (decode), inline (every call and tuple on this path counts): absmax = max(max, -min) from one
        # aminmax (NaN in both); s = absmax / 127 as a 0-d float32 tensor, the reference's value (-min / 127 ==
        # min / -127 exactly), no scalar-to-tensor conversions; all-zero, tiny, inf and NaN rows (NaN fails both
        # range tests) take the general path
        vs = None
        if x.numel() == p.k:
            mn, mx = torch.aminmax(x)
            a, b = mx.item(), -mn.item()
            if a >= b:
                if _AMAX_LO <= a < _INF:
                    sc = torch.div(mx, _C127)
                    vs = torch.div(x, sc).round_()
            elif _AMAX_LO <= b < _INF:
                sc = torch.div(mn, _CM127)
                vs = torch.div(x, sc).round_()
        if vs is not None:
            q = (vs, sc, None, None)
            v = s = None
        else:
            q = _quantize_input(x)
            vs, sc, v, s = q
        g = p.group
        if g is not None and vs is not None and ver is not None:
            members = [m() for m in g.members]
            if None not in members:
                outs = op(vs, 1.0, 128, g.packed).mul_(sc).split_with_sizes(g.sizes, -1)
                _LAST_INPUT[0] = (weakref.ref(x), ver, q, [p], dict(zip(members[1:], outs[1:])))
                return outs[0].add_(bias) if bias is not None else outs[0]
            p.group = None
        if ver is not None and x.numel() <= _REUSE_MAX_NUMEL:
            _LAST_INPUT[0] = (weakref.ref(x), ver, q, [p], None)
    if vs is not None:
        out = op(vs, 1.0, 128, p.packed).mul_(sc)
        if bias is not None:
            out = out.add_(bias)
        return out
    if v.dtype == torch.int8:
        # in place: one output allocation (a mixed int32 x float32 torch.mul measured 1.4x slower)
        out = torch._int_mm(v, p.wt).float().mul_(p.sw)
    else:
        out = op(v, 1.0, 128, p.packed)
    out = out.mul_(s)
    if bias is not None:
        out = out.add_(bias)
    return out.view(*x.shape[:-1], p.n)


# ---------------------------------------------------------------------------------------------
# CUDA: prepared layouts for the fused GEMV (lowbit.kernels.triton.gemv) and the 4-bit GEMM


@dataclasses.dataclass
class PreparedLinear:
    """Kernel layout of a 2-D weight for :func:`prepared_linear` (derived once, never saved).

    ``words`` int32 ``[N, K * bits / 32]`` (a view of the canonical codes where they are 4-byte aligned,
    a repacked copy for GGUF blocks), ``scales`` float32 ``[N, K / G]`` (the state's own tensor where it is
    float32; double-quantized scales decoded once), ``zeros`` ``[N, K / G]`` (kind 2: the state's uint8 zero
    points, no copy; kind 3: float32 additive minimums) or None, ``table`` float32 ``[16]`` for codebooks.
    ``p4`` is the :class:`~lowbit.kernels.api.Prepared4bit` of the tensor-core GEMM (4-bit kinds 0-2).
    """

    words: torch.Tensor
    scales: torch.Tensor
    zeros: Optional[torch.Tensor]
    table: Optional[torch.Tensor]
    bits: int
    group: int
    kind: int
    zero: float
    n: int
    k: int
    p4: object = None
    launch_cache: dict = dataclasses.field(default_factory=dict)
    table2: Optional[torch.Tensor] = None
    plans: dict = dataclasses.field(default_factory=dict)
    sT: Optional[torch.Tensor] = None
    zT: Optional[torch.Tensor] = None
    itable: Optional[torch.Tensor] = None

    def __post_init__(self):
        if self.table is not None and self.table2 is None and self.bits == 4:
            self.table2 = byte_pair_table(self.table).to(self.words.device)
        if self.table is None and self.bits == 4 and self.itable is None:
            # exact code values for the shuffle-table GEMV with integer codes (kind 1: q - zero; 2 / 3: q)
            q = torch.arange(16, dtype=torch.float32)
            self.itable = (q - self.zero if self.kind == 1 else q).to(self.words.device)

    def transposed(self) -> None:
        """Derive (once) ``sT`` / ``zT``: scales / zeros as ``[K / G, N]`` copies, for the group-step GEMV configs
        that read them coalesced along N (suffix "t"). The default configs read the state's own ``[N, K / G]``
        tensors instead (no copy on the device)."""
        if self.sT is None:
            self.sT = self.scales.reshape(self.n, -1).t().contiguous()
            self.zT = self.zeros.reshape(self.n, -1).t().contiguous() if self.zeros is not None else None

    def dense(self, dtype: torch.dtype, n0: int = 0, n1: Optional[int] = None) -> torch.Tensor:
        """The weight (rows ``n0:n1``, default all) in ``dtype`` (one Triton pass over the codes; large M: then
        cuBLAS): the blockwise dequantize for the 4-bit kinds 0-2 (nf4 / fp4 / int4), the row-contiguous pass of
        ``lowbit_mm.dequantize_rows`` for 8-bit weights and GGUF blocks (measured on the H200,
        ``bench/results/user_decode.md``: 1.4-2.5 TB/s for int8 against 0.16-0.2 TB/s for the plane-order pass;
        for 4 bits it read slower than the blockwise one)."""
        n1 = self.n if n1 is None else n1
        part = (n0, n1) != (0, self.n)
        if self.p4 is not None and self.kind != 3:
            from lowbit.kernels import api

            if not part:
                return api._dequant_prepared(self.p4, dtype)
            from lowbit.kernels.triton import blockwise as bw

            q = self.p4
            rows = n1 - n0
            z = q.zeros[n0:n1].reshape(-1) if q.zeros is not None else None
            flat = bw.dequantize(q.qweight[n0:n1], q.scales[n0:n1], z, q.values if z is None else None,
                                 rows * self.k, q.group, 4, bw.CODEBOOK if z is None else bw.ASYM, 0, dtype)
            return flat.view(rows, self.k)
        from lowbit.kernels.triton import lowbit_mm as lm

        wb = self.words.view(torch.uint8)
        return lm.dequantize_rows(wb[n0:n1], self.scales[n0:n1],
                                  self.zeros[n0:n1] if self.zeros is not None else None, self.table, n1 - n0,
                                  self.k, self.k // self.group, self.bits, self.group, self.kind, self.zero, dtype,
                                  None if part else self.launch_cache)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight from this layout (plain torch), equal to ``lowbit.dequantize`` up to float rounding."""
        N, K, b = self.n, self.k, self.bits
        if b == 8:  # bytes in element order: no shifts
            q = self.words.view(torch.uint8).view(N, K // self.group, self.group)
        else:
            sh = _shifts(b, str(self.words.device))
            q = ((self.words.unsqueeze(-1) >> sh) & ((1 << b) - 1)).reshape(N, K // self.group, self.group)
        s = self.scales.reshape(N, -1, 1)
        if self.kind == 0:
            w = self.table[q.long()] * s
        elif self.kind == 1:
            w = (q.float() - self.zero) * s
        elif self.kind == 2:
            w = (q.float() - self.zeros.reshape(N, -1, 1)) * s
        else:
            w = q.float() * s + self.zeros.reshape(N, -1, 1)
        return w.reshape(N, K).to(dtype)


def byte_pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[256]`` for the v2 kernels: for a byte ``b`` the float32 bits of ``code[b >> 4]`` (low half) and
    ``code[b & 15]`` (high half), i.e. the values of the even and the odd element of a canonical 4-bit byte."""
    bits = code.detach().float().cpu().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256)
    return (bits[b >> 4] | (bits[b & 15] << 32)).contiguous()


@lru_cache(maxsize=None)
def _shifts(bits: int, device: str) -> torch.Tensor:
    vals = [4, 0, 12, 8, 20, 16, 28, 24] if bits == 4 else [0, 8, 16, 24]
    return torch.tensor(vals, dtype=torch.int32).to(device)


def _words(data: torch.Tensor, n: int, k: int, bits: int) -> Optional[torch.Tensor]:
    nbytes = n * k * bits // 8
    flat = data.reshape(-1)
    if flat.numel() != nbytes or (k * bits) % 32 or flat.dtype != torch.uint8:
        return None
    if flat.storage_offset() % 4 or not flat.is_contiguous():
        flat = flat.clone()
    return flat.view(torch.int32).view(n, k * bits // 32)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[N, K]`` (0..15) -> canonical 4-bit bytes ``[N, K/2]`` (even element in the high nibble)."""
    c = codes.reshape(codes.shape[0], -1, 2)
    return ((c[..., 0] << 4) | c[..., 1]).contiguous()


def _prepare_gguf(state: QuantState) -> Optional[PreparedLinear]:
    from lowbit.formats import gguf

    name = state.scheme.lower()
    if name not in ("q4_0", "q4_1", "q8_0"):
        return None
    N, K = state.shape
    if K % 32 or state.data.numel() != N * (K // 32) * gguf.GGUF_TYPES[name].type_size:
        return None
    codes, d, m = gguf.unpack_blocks(state.data.reshape(N, -1), name)
    scales = d.float().contiguous()
    if name == "q8_0":
        words = codes.contiguous().view(torch.int32).view(N, K // 4)
        return PreparedLinear(words, scales, None, None, 8, 32, 1, 128.0, N, K)
    words = _pack_nibbles(codes).view(torch.int32).view(N, K // 8)
    if name == "q4_0":
        return PreparedLinear(words, scales, None, None, 4, 32, 1, 8.0, N, K)
    return PreparedLinear(words, scales, m.float().contiguous(), None, 4, 32, 3, 0.0, N, K)


def _prepare_cuda(state: QuantState) -> Optional[PreparedLinear]:
    from lowbit.kernels import api

    if len(state.shape) != 2:
        return None
    if state.zeros is not None and state.zeros.is_floating_point():  # float zero points (HQQ): no fused kernel
        return None
    N, K = state.shape
    if state.layout == "gguf":
        return _prepare_gguf(state)
    if state.scheme in ("nf4", "fp4", "int4", "int4_asym"):
        p4 = api.prepare_4bit(state)
        if p4 is None:
            return None
        words = _words(state.data, N, K, 4)
        if words is None:
            return None
        table = p4.values.float().contiguous() if p4.kind == 0 else None
        zeros = p4.zeros.contiguous() if p4.zeros is not None else None
        return PreparedLinear(words, p4.scales, zeros, table, 4, p4.group, p4.kind, 8.0, N, K, p4=p4)
    if state.scheme == "int8" and state.layout == "channel" and state.axis == 0 and state.nested is None:
        words = _words(state.data, N, K, 8)
        if words is None:
            return None
        return PreparedLinear(words, state.scales.reshape(N, 1).float().contiguous(), None, None, 8, K, 1, 128.0, N, K)
    return None


def prepare_linear(state: QuantState) -> Optional[PreparedLinear]:
    """The :class:`PreparedLinear` of a CUDA state (cached on it), or None where no fused kernel applies.

    GGUF blocks (Q4_0 / Q4_1 / Q8_0) are repacked for the kernels (18-, 20- and 34-byte blocks are not word
    aligned); the repacked layout then *replaces* the blocks on the device (:class:`ResidentState`): the GPU holds
    one copy of the weight, not two. Reading ``state.data`` (``state_dict``, saving, ``.to()``, dequantize) gives
    the blocks back, bit for bit, and keeps them beside the layout until the next call of this function (or
    :func:`prepare`) makes the layout the only copy again."""
    got = _cached(state, "linear")
    if got is not None:
        if got is _NOT_APPLICABLE:
            return None
        if state.layout == "gguf" and type(state) is QuantState and resident_enabled():
            _make_resident(state, got)  # the blocks were read back (e.g. saved) since: one copy again
        return got
    p = _prepare_cuda(state) if state.device.type == "cuda" else None
    _store(state, "linear", _NOT_APPLICABLE if p is None else p)
    if p is not None and state.layout == "gguf" and resident_enabled():
        _make_resident(state, p)
    return p


# ---------------------------------------------------------------------------------------------
# GGUF blocks held only in the kernel layout on the device


def resident_enabled() -> bool:
    """Whether prepared GGUF layouts replace the blocks on the device (``LOWBIT_GGUF_RESIDENT``, default on;
    ``0`` keeps both: the blocks and the kernel layout)."""
    return os.environ.get("LOWBIT_GGUF_RESIDENT", "1").strip() != "0"


def _gguf_blocks(scheme: str, p: PreparedLinear) -> torch.Tensor:
    """The GGUF block bytes ``[N, K / 32 * type_size]`` the layout ``p`` was derived from (exact inverse of
    :func:`_prepare_gguf` for blocks whose fp16 scales survive float32 and back, i.e. every non-NaN scale)."""
    from lowbit.formats import gguf

    b = p.words.view(torch.uint8)
    if p.bits == 4:  # canonical bytes (even element in the high nibble) -> codes
        codes = torch.stack((b >> 4, b & 15), dim=-1).reshape(p.n, p.k)
    else:
        codes = b.reshape(p.n, p.k)
    m = p.zeros.to(torch.float16) if p.kind == 3 else None
    return gguf.pack_blocks(codes, p.scales.to(torch.float16), m, scheme)


class ResidentState(QuantState):
    """A CUDA GGUF state whose blocks live only in their kernel layout (:class:`PreparedLinear`: canonical nibbles /
    bytes as 32-bit words and float32 scales, made by :func:`prepare_linear`). The kernels read the layout; reading
    ``data`` rebuilds the blocks (bit for bit: checked when the layout replaced them) and turns the state back into
    a plain :class:`~lowbit.tensor.state.QuantState` holding them, so ``state_dict``, saving, pickling, ``.to()``
    and in-place edits of ``data`` see exactly the state that was loaded. The layout itself stays cached and valid
    (a captured CUDA graph may hold its pointers: it is never freed under a live state): the blocks and the layout
    are then both held, as without this class, until :func:`prepare_linear` / :func:`prepare` drops the blocks
    again. ``device`` and ``nbytes`` are answered without rebuilding."""

    @property
    def data(self):
        return _restore(self).__dict__["data"]

    @data.setter
    def data(self, value):
        _restore(self).__dict__["data"] = value

    @property
    def device(self) -> torch.device:
        return self._lowbit_device

    @property
    def nbytes(self) -> int:
        return self.__dict__["_lowbit_blocks_nbytes"]

    def __reduce_ex__(self, protocol):
        return _restore(self).__reduce_ex__(protocol)


def _make_resident(state: QuantState, p: PreparedLinear) -> None:
    d = state.__dict__
    if type(state) is not QuantState or d.get("_lowbit_not_invertible") is d["data"]:
        return
    blocks = d["data"]
    rebuilt = _gguf_blocks(state.scheme, p)
    if rebuilt.shape != blocks.shape or not torch.equal(rebuilt, blocks):  # e.g. a NaN scale's payload: keep both
        d["_lowbit_not_invertible"] = blocks  # (not tried again for these blocks)
        return
    del rebuilt
    d["_lowbit_blocks_nbytes"] = state.nbytes
    d["_lowbit_blocks_shape"] = tuple(blocks.shape)
    d["_lowbit_device"] = blocks.device
    d["data"] = p.words  # what the kernel caches key on (pointer, in-place version) from now on
    _store(state, "linear", p)
    state.__class__ = ResidentState


def _restore(state: QuantState) -> QuantState:
    """A :class:`ResidentState` back to a plain state holding its GGUF blocks (rebuilt from the layout)."""
    d = state.__dict__
    if type(state) is ResidentState and "_lowbit_blocks_shape" in d:
        entry = d[_CACHE_ATTR]["linear"]
        p = entry[2]
        blocks = _gguf_blocks(state.scheme, p).reshape(d["_lowbit_blocks_shape"])
        d["data"] = blocks
        for k in ("_lowbit_blocks_nbytes", "_lowbit_blocks_shape", "_lowbit_device"):
            d.pop(k, None)
        state.__class__ = QuantState
        _store(state, "linear", p)  # still the layout of these blocks (and possibly captured in a CUDA graph)
    return state


def _pow2_divisor(g: int) -> int:
    return g & -g


# rows up to which the fused kernels of lowbit.kernels.triton.lowbit_mm run (dequantize + cuBLAS above)
FUSED_MAX_M = 256
_DENSE = ("dense",)
_V1 = ("v1",)


class _V1Gemm:
    """Plan: the v1 tensor-core 4-bit GEMM (:mod:`lowbit.kernels.triton.gemm_4bit`) with an explicit config
    ``("gemm", BN, kstep, split_k, warps, stages)`` (TUNED_MM rows ``("v1gemm", ...)``, small M > 4)."""

    __slots__ = ("cfg",)

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, x2, p, bias):
        from lowbit.kernels.triton import gemm_4bit as gk

        q = p.p4
        return gk.launch(x2 if x2.is_contiguous() else x2.contiguous(), q.qweight, q.scales, q.zeros, q.values, bias,
                         q.n, q.k, q.group, q.kind, self.cfg, q.launch_cache)


def _plan(p: PreparedLinear, M: int, x2: torch.Tensor, bias, key=None):
    """The launch plan of ``p`` for this call (computed once per M / dtype / alignment, then a dict hit)."""
    if key is None:
        key = (M, x2.dtype, bias is not None, x2.data_ptr() % 16 == 0 and x2.stride(0) % 16 == 0)
    plan = p.plans.get(key)
    if plan is None:
        from lowbit.kernels.triton_configs import config_mm

        cfg = config_mm(p.bits, p.kind, M, p.n, p.k, p.group)
        if cfg[0] == "dense" or M > FUSED_MAX_M or p.group % (32 // p.bits):
            plan = _DENSE
        elif cfg[0] == "v1" and M <= 4 and _pow2_divisor(p.group) >= 32 // p.bits:
            # the v1 GEMV through a cached plan (thin host path; same kernel and config as prepared_linear_v1)
            from lowbit.kernels.triton import gemv as gv
            from lowbit.kernels.triton_configs import config_gemv

            c = config_gemv(p.bits, p.kind, M, p.n, p.k, p.group)
            c = (c[0], min(c[1], _pow2_divisor(p.group)), *c[2:])
            plan = gv.GemvPlan(M, p.n, p.k, p.bits, p.group, p.kind, p.zero, bias is not None, c)
        elif cfg[0] == "v1":
            plan = _V1 if M <= 4 or (p.p4 is not None and p.kind != 3) else _DENSE  # v1 above M = 4: its 4-bit GEMM
        elif cfg[0] == "v1gemm":
            plan = _V1Gemm(("gemm",) + tuple(cfg[1:])) if p.p4 is not None and p.kind != 3 else _DENSE
        elif cfg[0] in ("tc", "tcb", "tcbd"):
            from lowbit.kernels.triton import lowbit_mm as lm

            if cfg[0] != "tc" and p.bits == 4 and not lm.packed_ok(p.group, cfg[3], p.bits):
                # a packed-pair row for scale groups it does not take (lowbit_mm.packed_ok): the tc kernel in the
                # tile shape of the earlier shipped rows (4 warps, BN 128) up to 64 rows, dequantize + cuBLAS above
                cfg = ("tc", cfg[1], 128, cfg[3], cfg[4], 4, 3) if cfg[1] <= 64 else _DENSE
            if cfg is _DENSE or not lm.tc_fits(p.k, p.bits, p.group):
                plan = _DENSE
            else:
                plan = lm.make_tc_plan(M, p.n, p.k, p.bits, p.group, p.kind, p.zero, bias is not None, cfg, p.table,
                                       x2.dtype)
        else:
            from lowbit.kernels.triton import lowbit_mm as lm

            plan = lm.make_plan(M, p.n, p.k, p.bits, p.group, p.kind, p.zero, x2.dtype, bias is not None, cfg)
            if plan.tsc:
                p.transposed()
        p.plans[key] = plan
    return plan


def dense_chunk_bytes() -> int:
    """Largest dequantized weight (bytes) made at once by the dequantize + cuBLAS path (``LOWBIT_DENSE_CHUNK_MB``,
    default 128; 0 = whole weights): larger weights are dequantized and multiplied in row blocks, so that the
    transient float copy stays bounded (peak memory during prefill). 128 MiB keeps every linear of a Llama-3-8B
    whole (the largest, 14336 x 4096, is 112 MiB in bf16): on the H200 the 1 x 512 prefill of 8 such layers took
    11.0-13.1 ms whole against 17.0-18.7 ms in 32 MiB blocks (nf4, GPTQ int4, GGUF Q4_0, int8), for +28 MB of
    peak memory (bench/results/user_decode.md); a 70B-class 28672 x 8192 weight (448 MiB) still goes in 4 blocks."""
    got = _env_mib("LOWBIT_DENSE_CHUNK_MB")
    return 128 << 20 if got is None else got


def dense_linear(x: torch.Tensor, p: PreparedLinear, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` by dequantize + cuBLAS: the whole weight at once, or row blocks of a multiple of 128 rows
    (at most :func:`dense_chunk_bytes` of dequantized weight each; the outputs concatenated) for a large weight
    whose N is a multiple of 128."""
    cap = dense_chunk_bytes()
    es = torch.finfo(x.dtype).bits // 8
    if not cap or p.n * p.k * es <= cap or p.n % 128:
        return F.linear(x, p.dense(x.dtype), bias)
    rows = max(128, (cap // (p.k * es)) // 128 * 128)
    outs = [F.linear(x, p.dense(x.dtype, n0, min(n0 + rows, p.n)),
                     bias[n0:n0 + rows] if bias is not None else None) for n0 in range(0, p.n, rows)]
    return torch.cat(outs, -1)


def prepared_linear(x: torch.Tensor, p: PreparedLinear, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ W.T + bias`` for a prepared CUDA weight: the fused v2 GEMV (M <= 4) / GEMM (M <= FUSED_MAX_M) of
    :mod:`lowbit.kernels.triton.lowbit_mm`, else the weight dequantized once per call + cuBLAS."""
    x2 = x.reshape(-1, p.k)
    s0, s1 = x2.stride()
    ptr = x2.data_ptr()
    if s1 != 1 or s0 % 2 or ptr % 4:
        x2 = x2.contiguous()
        s0, ptr = x2.stride(0), x2.data_ptr()
    M = x2.shape[0]
    key = (M, x2.dtype, bias is not None, ptr % 16 == 0 and s0 % 16 == 0)
    plan = p.plans.get(key)
    if plan is None:
        plan = _plan(p, M, x2, bias, key)
    if plan is _DENSE:
        return dense_linear(x, p, bias)
    if plan is _V1:
        return prepared_linear_v1(x, p, bias)
    run = plan.run  # the v1 plans (GEMV at M <= 4, tensor-core GEMM above); None on lm.Plan
    if run is not None:
        return run(x2, p, bias).view(*x.shape[:-1], p.n)
    if plan.tc:
        from lowbit.kernels.triton.lowbit_mm import run_tc

        try:
            y = run_tc(plan, x2, p.words, p.scales, p.zeros, p.table, bias, p.n, p.k, p.k // p.group, 32 // p.bits)
        except Exception as e:  # noqa: BLE001 - only the first launch's (compile) resource errors are absorbed
            if plan.compiled is not None or type(e).__name__ != "OutOfResources":
                raise
            p.plans[key] = _DENSE  # a config this GPU cannot hold: dequantize + cuBLAS from now on
            return dense_linear(x, p, bias)
        return y.view(*x.shape[:-1], p.n)
    run_plan = _RUN_PLAN[0]
    if run_plan is None:  # imported once (an import statement per call costs ~0.5 us)
        from lowbit.kernels.triton.lowbit_mm import run_plan

        _RUN_PLAN[0] = run_plan
    if plan.tr:
        t = p.table2 if plan.pair else (p.table if p.table is not None else p.itable)
        if plan.tsc:
            y = run_plan(plan, x2, p.words, p.sT, p.zT, t, bias, p.n, p.k, p.k // p.group, 32 // p.bits)
        else:
            y = run_plan(plan, x2, p.words, p.scales, p.zeros, t, bias, p.n, p.k, p.k // p.group, 32 // p.bits)
    else:
        y = run_plan(plan, x2, p.words, p.scales, p.zeros, p.table2, bias, p.n, p.k, p.k // p.group, 32 // p.bits)
    return y.view(*x.shape[:-1], p.n)


_RUN_PLAN = [None]


def prepared_linear_v1(x: torch.Tensor, p: PreparedLinear, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The previous dispatch (v1 GEMV of lowbit.kernels.triton.gemv at M <= 4, the v1 4-bit GEMM table above),
    kept for the benchmarks' comparison."""
    x2 = x.reshape(-1, p.k)
    M = x2.shape[0]
    if M <= 4 and _pow2_divisor(p.group) >= 32 // p.bits:
        from lowbit.kernels.triton import gemv as gv
        from lowbit.kernels.triton_configs import config_gemv

        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        cfg = config_gemv(p.bits, p.kind, M, p.n, p.k, p.group)
        cfg = (cfg[0], min(cfg[1], _pow2_divisor(p.group)), *cfg[2:])
        y = gv.gemv(x2, p.words, p.scales, p.zeros, p.table, bias, p.n, p.k, p.bits, p.group, p.kind, p.zero,
                    cfg, p.launch_cache)
        return y.reshape(*x.shape[:-1], p.n)
    if p.p4 is not None:
        from lowbit.kernels import api

        return api._gemm_4bit_triton(x, p.p4, bias)
    return F.linear(x, p.dequantize(x.dtype), bias)


def _cuda_linear(x: torch.Tensor, state: QuantState, bias, act: Optional[str]) -> torch.Tensor:
    if act is None:
        p = prepare_linear(state)
        if p is not None:
            return prepared_linear(x, p, bias)
    from lowbit.kernels import api, ops  # noqa: F401  (ops registers torch.ops.lowbit.*)

    if act == "int8":
        w = _cuda_int8_weights(state)
        if w is not None:
            _prepare_dyn(state, act, w)
            return api.int8_linear_dynamic(x, w, bias)
        return None
    if act == "fp8":
        if state.scheme == "fp8_e4m3" and state.layout == "channel" and state.axis == 0 and len(state.shape) == 2:
            _prepare_dyn(state, act, api.prepare_fp8(state))
            return api.fp8_linear_dynamic(x, state, bias)
        return None
    p = prepare_linear(state)
    if p is not None:
        return prepared_linear(x, p, bias)
    if state.layout == "gguf" or state.nested is not None:
        w = dequantize_state(state).to(x.dtype)
    else:
        w = api.dequantize(state, x.dtype)
    return F.linear(x, w, bias)


class _DynLinear:
    """What the eager hot path of a dynamic-activation linear (int8 / fp8 per-token activations) needs, derived once
    per state (views of the state's tensors: no copy): the weight as stored (int8: the uint8 codes; fp8: the e4m3
    bytes), its ``[K, N]`` view and ``[1, N]`` scales for ``torch._scaled_mm``, and the GEMM config per M."""

    __slots__ = ("act", "fp8", "w", "wt", "sw", "swrow", "n", "k", "cfgs")

    def __init__(self, act, w, sw):
        self.act, self.fp8 = act, act == "fp8"
        self.w, self.sw = w, sw
        self.wt = w.t()
        self.swrow = sw.float().view(1, -1)
        self.n, self.k = w.shape
        self.cfgs = {}


_SCALED_MM = getattr(torch, "_scaled_mm", None)


def _prepare_dyn(state: QuantState, act: str, pair) -> None:
    from lowbit import _deps

    if not _deps.available("triton"):  # the activation quantization of the hot path is a Triton kernel
        return
    got = _cached(state, "dyn")
    if got is None or got is _NOT_APPLICABLE or got.act != act:
        _store(state, "dyn", _DynLinear(act, *pair))


def _dyn_linear(x: torch.Tensor, d: _DynLinear, bias) -> torch.Tensor:
    """:func:`lowbit.kernels.int8_linear_dynamic` / :func:`~lowbit.kernels.fp8_linear_dynamic` under the default
    selection (int8: the Triton scaled GEMM at every M; fp8: ``torch._scaled_mm`` for bf16, the Triton GEMM for
    fp16), the same launches with the per-call Python trimmed (no selection, preparation or config lookups, no view
    or dtype conversions of the weight or its scales)."""
    from lowbit.kernels.triton import scaled_gemm as sg

    x2 = x.reshape(-1, d.k)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    M = x2.shape[0]
    q, sx = sg.quantize_rows(x2, d.fp8)
    if d.fp8 and x.dtype == torch.bfloat16:
        y = _SCALED_MM(q, d.wt, scale_a=sx.view(M, 1), scale_b=d.swrow, bias=bias, out_dtype=x.dtype,
                       use_fast_accum=True)
    else:
        cfg = d.cfgs.get(M)
        if cfg is None:
            from lowbit.kernels.triton_configs import config_scaled

            cfg = d.cfgs[M] = config_scaled(d.act, M)
        y = sg.scaled_gemm(q, d.w, sx, d.sw, bias, x.dtype, cfg)
    return y.view(*x.shape[:-1], d.n)


def _cuda_linear_traced(x: torch.Tensor, state: QuantState, bias, act: Optional[str]):
    """Under ``torch.compile``: custom ops on layouts prepared before tracing (eager warm-up or :func:`prepare`)."""
    from lowbit.kernels import ops  # noqa: F401  (registers torch.ops.lowbit.*)

    if act is not None:
        return _cuda_linear(x, state, bias, act)  # lowbit.kernels.api routes through torch.ops.lowbit
    p = _cached(state, "linear")
    if p is None or p is _NOT_APPLICABLE:
        return None
    y = torch.ops.lowbit.mm_lowbit(x.reshape(-1, p.k), p.words, p.scales, p.zeros, p.table, bias, p.n, p.k, p.bits,
                                   p.group, p.kind, p.zero)
    return y.reshape(*x.shape[:-1], p.n)


def _cuda_int8_weights(state: QuantState):
    from lowbit.kernels import api

    if state.scheme == "int8" and state.layout == "channel" and state.axis == 0 and len(state.shape) == 2:
        return api.int8_codes(state)  # the stored codes (no signed copy on the device)
    return None


# ---------------------------------------------------------------------------------------------
# entry point


def state_linear(x: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                 act: Optional[str] = None) -> Optional[torch.Tensor]:
    """``F.linear(quant_act(x), dequantize(state).to(x.dtype), bias)`` through the fastest kernel, or None.

    ``act`` is None (weight-only; ``x`` is used as given), ``"int8"`` or ``"fp8"`` (dynamic per-token
    activation quantization, symmetric). None is returned where no kernel applies (the caller then runs
    the reference). No autograd: callers use it under ``no_grad`` or when nothing needs a gradient.

    Example::

        >>> st = lowbit.quantize(torch.randn(64, 128), "int4", group_size=32)
        >>> state_linear(torch.randn(2, 128), st).shape
        torch.Size([2, 64])
    """
    # the default selection (nothing chosen, LOWBIT_KERNELS unset), read inline for the hot paths below (every call
    # and frame on them counts)
    default = not select._preference and select._ENV_DATA is not None and select._ENV_KEY not in select._ENV_DATA
    if act is None and x.is_cuda and not torch.compiler.is_compiling():
        # hot path (eager decode): a prepared weight-only layout of this state, found with one dict lookup
        entry = state.__dict__.get(_CACHE_ATTR)
        entry = entry.get("linear") if entry else None
        if entry is not None and entry[0] == state.__dict__["data"].data_ptr():
            p = entry[2]
            if (p is not _NOT_APPLICABLE and entry[1] == _versions(state) and x.dtype in _HALF
                    and x.device == state.device and x.shape[-1] == p.k and x.numel()
                    and (default or select.get_backend("gemm_4bit") != "reference")):
                if bias is not None and bias.dtype != x.dtype:
                    bias = bias.to(x.dtype)
                return prepared_linear(x, p, bias)
    elif x.is_cpu and act in _CPU_ACTS and not _is_compiling():
        # hot path (CPU decode): the dense weight / int8 layout derived for this state, one dict lookup (an int8
        # layout exists only where cpu_has_vnni(), fixed per process)
        entry = state.__dict__.get(_CACHE_ATTR)
        entry = entry.get(_CPU_KEYS.get((act, x.dtype))) if entry else None
        if (entry is not None and entry[0] == state.__dict__["data"].data_ptr() and entry[2] is not _NOT_APPLICABLE
                and entry[1] == _versions(state) and x.shape[-1] == state.shape[1] and x.numel()
                and (default or _cpu_backend_ok(act))):
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            if act is None:
                return F.linear(x, entry[2], bias)
            return _cpu_int8_dynamic(x, entry[2], bias)
    elif act is not None and x.is_cuda and not _is_compiling():
        # hot path (eager decode, dynamic int8 / fp8 activations): the views derived for this state, under the
        # default selection only (nothing chosen, LOWBIT_KERNELS unset; anything else takes the general path)
        entry = state.__dict__.get(_CACHE_ATTR)
        entry = entry.get("dyn") if entry else None
        if (entry is not None and entry[0] == state.__dict__["data"].data_ptr() and entry[2].act == act
                and entry[1] == _versions(state) and x.dtype in _HALF and x.device == state.device
                and x.shape[-1] == entry[2].k and x.numel() and default):
            if bias is not None and bias.dtype != x.dtype:
                bias = bias.to(x.dtype)
            return _dyn_linear(x, entry[2], bias)
    if x.device != state.device or x.numel() == 0 or len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        return None
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if x.is_cuda:
        if x.dtype not in _HALF or select.get_backend("gemm_4bit") == "reference":
            return None
        if torch.compiler.is_compiling():
            return _cuda_linear_traced(x, state, bias, act)
        return _cuda_linear(x, state, bias, act)
    if torch.compiler.is_compiling():
        return None  # CPU graphs trace the reference ops
    if x.device.type != "cpu" or act not in _CPU_ACTS or not _cpu_backend_ok(act):
        return None
    if act == "int8":
        if x.dtype == torch.float32:
            p = _prepare_cpu_int8(state)
            if p is not _NOT_APPLICABLE:
                return _cpu_int8_dynamic(x, p, bias)
        return None
    return F.linear(x, _dense(state, x.dtype), bias)


_CPU_ACTS = (None, "int8")
# torch.compiler.is_compiling itself (dynamo folds it while tracing), without two attribute lookups per call
_is_compiling = torch.compiler.is_compiling
# cache keys of the CPU hot path by (act, input dtype): the int8 layout needs float32 input
_CPU_KEYS = {(None, dt): ("dense", dt) for dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
_CPU_KEYS[("int8", torch.float32)] = "cpu_int8"


def _cpu_backend_ok(act: Optional[str]) -> bool:
    """Whether the selection lets the CPU kernels run: ``gemm_4bit`` ``auto`` / ``reference`` (the dense
    cache is bit-identical to the reference), and for int8 activations ``int8_linear`` ``auto`` on a CPU
    with VNNI (exact int8 products)."""
    pref = select._preference
    env = select.env_backend()
    if (pref.get("gemm_4bit") or env) not in ("auto", "reference"):
        return False
    return act is None or ((pref.get("int8_linear") or env) == "auto" and cpu_has_vnni())


def prepare(state: QuantState, dtype: torch.dtype = None, act: Optional[str] = None) -> None:
    """Derive (and cache) the kernel layout of ``state`` now, e.g. before capturing a CUDA graph."""
    if state.device.type == "cuda":
        from lowbit.kernels import api

        if act == "int8":
            _cuda_int8_weights(state)
        elif act == "fp8":
            pass
        else:
            prepare_linear(state)
    elif state.device.type == "cpu":
        if act == "int8" and cpu_has_vnni():
            _prepare_cpu_int8(state)
        elif act is None and dtype is not None:
            _dense(state, dtype)
