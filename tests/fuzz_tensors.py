"""Fuzz harness for ``lowbit.quantize`` / ``lowbit.dequantize`` at the tensor level.

Used by ``tests/test_fuzz_tensors.py`` (a seeded few hundred inputs per scheme in CI, >= 10,000 behind
``--long``) and by ``bench/reliability_fuzz.py`` (the full run and the report). It imports lowbit only
through ``lowbit.quantize``/``lowbit.dequantize``/``QuantState``, so it can also be pointed at an older
checkout (``PYTHONPATH=old_checkout``) to measure the "before" figures.

Every case is one seeded draw of: scheme, shape (0-D to 4-D, empty and size-1 dims, ragged against the
block), input dtype (float32/float16/bfloat16/float64, or an integer/bool tensor), value distribution
(normal, uniform, heavy-tailed up to 1e30, near the dtype's largest value, beyond float32 for float64,
all-zero, constant, subnormal, tiny), granularity (default blocks, any block size, per-tensor, groups incl.
ragged and -1, any axis, and invalid arguments), double quantization (any nested block size), scale dtype,
and NaN/+Inf/-Inf injected at a random element. Each call is classified:

* ``clean``: quantize + dequantize returned the input's shape and dtype, every element finite, no sign
  flip (for grids where 0 is exact and scales are positive), every element within the *derived* bound
  below, and the ``state_dict`` round trip (through safetensors bytes) is bit-identical;
* ``clear_error``: a ``ValueError``/``TypeError`` raised by lowbit's own code, for an input that
  deserves one (non-finite, integer, invalid argument, or a value the format cannot represent);
* ``defect``: anything else, with a cause (an unclear error from torch internals, NaN/Inf from finite
  input, an out-of-bound or sign-flipped result, an unexpected rejection of a benign input, an invalid
  input accepted, a round trip that is not bit-identical, a call slower than 10 s).

The error bound is derived per element from the *input* (never from the state under test), in float64:

* affine symmetric, b bits: ``s = A/qmax`` (A = block absmax), ``|x - x̂| <= (s + Δs)/2 + qmax·Δs``;
  asymmetric: ``s = (max(hi,0) - min(lo,0)) / (2^b - 1)``, ``(s + Δs)/2 + (2^b - 1)·Δs``;
* codebook: ``A·dist(x/A, code) + ΔA`` (+ ``2/65535·A`` for the bitsandbytes lookup-table path of dynamic8);
* fp8: ``|x|·2^-(m+1) + s'·sub/2 + fmax·Δs`` with ``s = A/fmax`` (m mantissa bits, sub the smallest fp8 subnormal);
* GGUF ``_0``: ``max(d/2, |x| - (2^(b-1) - 1)·d) + 2^(b-1)·Δd`` with ``d = A/2^(b-1)`` (the element of
  opposite sign to the block's extreme can be clamped one step, as in llama.cpp); Q8_0 ``d/2 + 127·Δd``;
  ``_1``: ``d/2 + qmax·Δd + Δm``, ``d = (hi - lo)/qmax``;

where the scale error ``Δs`` is the rounding of the stored scale (``2^-24`` relative for float32, ``2^-11``
float16, ``2^-8`` bfloat16, plus half the dtype's smallest subnormal; fp16 ``d``/``m`` for GGUF) or, with
double quantization, the nested 8-bit dynamic-map error ``absmax2·(maxgap/2 + 1/65535)`` of each nested block.
Then: the float32 rounding of a float64 input, the output dtype's rounding (half an ulp + half its smallest
subnormal) and float32 arithmetic slack (``2^-20`` relative, plus float32's smallest normal 1.2e-38 absolute:
lowbit computes in float32, so values below float32's normal range may flush to zero).
"""
from __future__ import annotations

import io
import math
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import torch

import lowbit
from lowbit.tensor.state import QuantState

SCHEMES = ["int8", "int4", "int3", "int2", "int8_asym", "int4_asym", "int3_asym", "int2_asym", "nf4", "fp4", "nf8",
           "dynamic8", "fp8_e4m3", "fp8_e5m2", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]
GGUF = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INTS = (torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool)
DIMS = (0, 1, 1, 2, 3, 5, 7, 8, 16, 31, 32, 33, 63, 64, 65, 100, 128, 257)
MAX_NUMEL = 2048
F32_MAX = float(torch.finfo(torch.float32).max)
F32_TINY = float(torch.finfo(torch.float32).tiny)
VALUE_KINDS = ("normal", "normal", "uniform", "heavy", "huge", "zero", "constant", "subnormal", "tiny", "mixed")
# (relative half-ulp, smallest subnormal) of each dtype
_ROUND = {torch.float32: (2.0 ** -24, 2.0 ** -149), torch.float16: (2.0 ** -11, 2.0 ** -24),
          torch.bfloat16: (2.0 ** -8, 2.0 ** -133), torch.float64: (0.0, 0.0)}


@dataclass
class Case:
    seed: str
    scheme: str
    shape: tuple
    dtype: torch.dtype
    values: str
    magnitude: float
    inject: Optional[str]
    kwargs: dict
    valid_args: bool = True

    def describe(self) -> str:
        kw = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        inj = f", {self.inject} injected" if self.inject else ""
        return (f"{self.scheme} {str(self.dtype).replace('torch.', '')}{list(self.shape)} {self.values}"
                f"(~{self.magnitude:.3g}){inj} [{kw}]")


@dataclass
class Outcome:
    cls: str                      # clean | clear_error | defect
    cause: str = ""               # defect cause / error kind
    detail: str = ""
    seconds: float = 0.0
    roundtrip_checked: bool = False


# ---------------------------------------------------------------------------------------------
# case generation


def _shape(r: random.Random) -> tuple:
    nd = r.choice((0, 1, 1, 2, 2, 2, 3, 4))
    dims = [r.choice(DIMS) for _ in range(nd)]
    if 0 not in dims:
        while math.prod(dims) > MAX_NUMEL:
            i = max(range(nd), key=lambda j: dims[j])
            dims[i] = max(1, dims[i] // 2)
    return tuple(dims)


def _granularity(r: random.Random, scheme: str, ndim: int):
    """(kwargs, valid) for a random granularity choice."""
    if scheme in GGUF:
        p = r.random()
        if p < 0.85:
            return {}, True
        if p < 0.9:
            return {"block_size": 32}, True
        return r.choice(({"group_size": 64}, {"axis": 0}, {"double_quant": True}, {"block_size": 16})), False
    p = r.random()
    if p < 0.25:
        kw, ok = {}, True
    elif p < 0.5:
        kw, ok = {"block_size": r.choice((1, 2, 3, 7, 16, 32, 63, 64, 65, 128, 256, 4096))}, True
    elif p < 0.6:
        kw, ok = {"block_size": None}, True
    elif p < 0.8:
        kw, ok = {"group_size": r.choice((1, 3, 16, 32, 64, 100, 128, -1))}, True
    elif p < 0.95:
        if ndim and r.random() < 0.9:
            kw, ok = {"axis": r.randrange(-ndim, ndim)}, True
        else:
            kw, ok = {"axis": ndim if ndim else 0}, False
    else:
        kw, ok = r.choice(({"block_size": 0}, {"group_size": 0}, {"group_size": 32, "axis": 0},
                           {"block_size": -5}, {"group_size": 2.5})), False
    if r.random() < 0.25:
        kw["double_quant"] = True
        kw["double_quant_block_size"] = r.choice((256, 256, 2, 7, 64))
    q = r.random()
    if q < 0.15:
        kw["scale_dtype"] = torch.float16
    elif q < 0.25:
        kw["scale_dtype"] = torch.bfloat16
    if kw.get("double_quant") and kw.get("scale_dtype", torch.float32) != torch.float32:
        ok = False
    return kw, ok


def gen_case(scheme: str, i: int) -> Case:
    seed = f"{scheme}:{i}"
    r = random.Random(seed)
    shape = _shape(r)
    if r.random() < 0.04:
        dtype = r.choice(INTS)
    else:
        dtype = r.choice(FLOATS)
    kind = r.choice(VALUE_KINDS)
    mag = 10 ** r.uniform(-3, 3)
    if kind == "constant":
        mag = 10 ** r.uniform(-30, 30)
    elif kind == "tiny":
        mag = 10 ** r.uniform(-38, -20)
    kw, ok = _granularity(r, scheme, len(shape))
    inject = r.choice(("nan", "inf", "-inf")) if r.random() < 0.08 else None
    if math.prod(shape) == 0 or dtype in INTS:
        inject = None  # nothing to inject into
    return Case(seed, scheme, shape, dtype, kind, mag, inject, kw, ok)


def make_tensor(case: Case) -> torch.Tensor:
    """The input tensor of ``case`` (generated in float64, saturated to the dtype's finite range, cast)."""
    g = torch.Generator().manual_seed(int.from_bytes(case.seed.encode(), "little") % (2 ** 61))
    n = math.prod(case.shape)
    if case.dtype in INTS:
        if case.dtype == torch.bool:
            return torch.rand(case.shape, generator=g) < 0.5
        return torch.randint(0, 100, case.shape, generator=g).to(case.dtype)
    dt = case.dtype
    fmax = float(torch.finfo(dt).max)
    tiny = float(torch.finfo(dt).tiny)
    sub = _ROUND[dt][1] or 4.9e-324
    z = torch.randn(n, generator=g, dtype=torch.float64)
    k = case.values
    if k == "normal":
        x = z * case.magnitude
    elif k == "uniform":
        x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * case.magnitude
    elif k == "heavy":  # log-uniform magnitudes up to 1e30, random signs
        x = z.sign() * 10 ** (torch.rand(n, generator=g, dtype=torch.float64) * 30)
    elif k == "huge":  # close to the dtype's largest value; float64 also beyond float32's range
        top = math.log10(fmax) if dt != torch.float64 or torch.rand(1, generator=g).item() < 0.5 else 300.0
        x = z.sign() * 10 ** (top - torch.rand(n, generator=g, dtype=torch.float64) * 2)
        if dt != torch.float64:
            x = x.clamp(-fmax, fmax)
    elif k == "zero":
        x = torch.zeros(n, dtype=torch.float64)
    elif k == "constant":
        x = torch.full((n,), case.magnitude * (1 if torch.rand(1, generator=g).item() < 0.5 else -1),
                       dtype=torch.float64)
    elif k == "subnormal":
        x = z.sign() * torch.rand(n, generator=g, dtype=torch.float64) * tiny
        x = torch.where(x.abs() < sub, torch.zeros_like(x), x)
    elif k == "tiny":
        x = z * case.magnitude
    else:  # mixed: normal values with a few huge and subnormal ones
        x = z * case.magnitude
        if n:
            m = torch.rand(n, generator=g) < 0.05
            x = torch.where(m, z.sign() * fmax * 0.9, x)
            m = torch.rand(n, generator=g) < 0.05
            x = torch.where(m, z.sign() * tiny * 0.3, x)
    x = x.clamp(-fmax, fmax).reshape(case.shape).to(dt)
    if case.inject and n:
        i = int(torch.randint(0, n, (1,), generator=g))
        x.view(-1)[i] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}[case.inject]
    return x


# ---------------------------------------------------------------------------------------------
# the derived bound


def _group_ids(shape: tuple, case: Case) -> torch.Tensor:
    """Group id of every element (flat, row-major), numbered in the order the state stores its scales."""
    n = math.prod(shape)
    idx = torch.arange(n)
    kw = case.kwargs
    nd = len(shape)
    if case.scheme in GGUF:
        k = shape[-1] if nd else 1
        nb = -(-k // 32)
        return (idx // k) * nb + (idx % k) // 32
    if "group_size" in kw:
        g = kw["group_size"]
        if g == -1:
            if nd == 0:
                return torch.zeros(n, dtype=torch.long)
            return _channel_ids(shape, 0)
        k = shape[-1] if nd else 1
        ng = -(-k // g)
        return (idx // k) * ng + (idx % k) // g
    if "axis" in kw:
        return _channel_ids(shape, kw["axis"] % nd)
    bs = kw.get("block_size", 64)
    if bs is None:
        return torch.zeros(n, dtype=torch.long)
    return idx // bs


def _channel_ids(shape, axis):
    stride = math.prod(shape[axis + 1:])
    return (torch.arange(math.prod(shape)) // stride) % shape[axis]


def _seg(values: torch.Tensor, gid: torch.Tensor, ng: int, how: str, init: float) -> torch.Tensor:
    out = torch.full((ng,), init, dtype=torch.float64)
    return out.scatter_reduce(0, gid, values, reduce=how, include_self=True)


_DYN = None


def _dyn_halfgap() -> float:
    global _DYN
    if _DYN is None:
        from lowbit.formats.codebook import dynamic_map

        c = dynamic_map().double()
        _DYN = float((c[1:] - c[:-1]).max()) / 2
    return _DYN


def _dq_error(sv: torch.Tensor, bs: int) -> torch.Tensor:
    """Bound of the nested (double-quant) error of each first-level scale in ``sv`` (float64 [G])."""
    off = sv.mean() if sv.numel() else torch.tensor(0.0, dtype=torch.float64)
    dev = (sv - off).abs()
    blk = torch.arange(sv.numel()) // bs
    a2 = _seg(dev, blk, int(blk.max()) + 1 if sv.numel() else 0, "amax", 0.0)[blk]
    return a2 * (_dyn_halfgap() + 2.0 / 65535) + 4 * 2.0 ** -24 * (sv.abs() + off.abs()) + 8 * 2.0 ** -149


def _codebook(scheme: str) -> torch.Tensor:
    from lowbit.formats import codebook

    return (codebook.dynamic_map() if scheme == "dynamic8" else codebook.get_code(scheme)).double().sort().values


def element_bound(x: torch.Tensor, case: Case) -> torch.Tensor:
    """Derived per-element bound of ``|x - dequantize(quantize(x))|`` (float64, ``x``'s shape)."""
    shape = tuple(x.shape)
    x64 = x.double().reshape(-1)
    x32 = x.float().double().reshape(-1)  # lowbit computes on the float32 value of the input
    n = x32.numel()
    sch = case.scheme
    sd = case.kwargs.get("scale_dtype", torch.float32)
    eps_sd, sub_sd = _ROUND[sd]
    dq = case.kwargs.get("double_quant", False)
    dqbs = case.kwargs.get("double_quant_block_size", 256)
    ax = x32.abs()
    gid = _group_ids(shape, case)
    if sch in GGUF:
        k = shape[-1] if shape else 1
        padded = k % 32 != 0
    ng = int(gid.max()) + 1 if n else 0
    A = _seg(ax, gid, ng, "amax", 0.0)
    lo = _seg(x32, gid, ng, "amin", math.inf)
    hi = _seg(x32, gid, ng, "amax", -math.inf)

    def scale_err(s):
        if dq:  # all-zero groups are exact whatever their scale and take part in double quant with 0
            return _dq_error(torch.where(A > 0, s, torch.zeros_like(s)), dqbs)
        return (eps_sd + 2.0 ** -24) * s + sub_sd / 2

    if sch in GGUF:
        if padded:  # the zero padding of the last block takes part in its statistics
            last = (torch.arange(ng) % (-(-k // 32))) == (-(-k // 32)) - 1
            lo = torch.where(last, lo.clamp(max=0), lo)
            hi = torch.where(last, hi.clamp(min=0), hi)
        bits = {"q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8}[sch]
        if sch.endswith("_1"):
            qmax = 2 ** bits - 1
            d = (hi - lo) / qmax
            dd = d * 2.0 ** -11 + 2.0 ** -25
            dm = lo.abs() * 2.0 ** -11 + 2.0 ** -25
            b = (d / 2 + qmax * dd + dm)[gid]
        elif sch == "q8_0":
            d = A / 127
            b = (d / 2 + 127 * (d * 2.0 ** -11 + 2.0 ** -25))[gid]
        else:
            hz = 2 ** (bits - 1)
            d = A / hz
            dd = d * 2.0 ** -11 + 2.0 ** -25
            b = torch.maximum(d[gid] / 2, ax - (hz - 1) * d[gid]) + (hz * dd)[gid]
    elif sch.startswith("fp8"):
        dt = torch.float8_e4m3fn if sch == "fp8_e4m3" else torch.float8_e5m2
        fmax = float(torch.finfo(dt).max)
        mbits, sub8 = (3, 2.0 ** -9) if sch == "fp8_e4m3" else (2, 2.0 ** -16)
        s = torch.where(A > 0, A / fmax, torch.ones_like(A))
        ds = scale_err(s)
        b = ax * 2.0 ** -(mbits + 1) + ((s + ds) * sub8 / 2 + fmax * ds)[gid]
    elif sch in ("nf4", "fp4", "nf8", "dynamic8"):
        code = _codebook(sch)
        safe = torch.where(A > 0, A, torch.ones_like(A))
        u = (x32 / safe[gid]).clamp(-1, 1)
        j = torch.searchsorted(code, u).clamp(1, code.numel() - 1)
        dist = torch.minimum((u - code[j - 1]).abs(), (u - code[j]).abs())
        lut = 2.0 / 65535 if sch == "dynamic8" else 2.0 ** -22
        b = A[gid] * (dist + lut) + scale_err(A)[gid] + 1e-38
    else:
        bits = int(sch[3])
        if sch.endswith("_asym"):
            levels = 2 ** bits - 1
            rng = hi.clamp(min=0) - lo.clamp(max=0)
            s = torch.where(rng > 0, rng / levels, torch.ones_like(rng))
        else:
            levels = 2 ** (bits - 1) - 1
            s = torch.where(A > 0, A / levels, torch.ones_like(A))
        ds = scale_err(s)
        b = ((s + ds) / 2 + levels * ds)[gid]
    b = b + 2.0 ** -20 * (ax + A[gid] if ng else ax)  # float32 arithmetic
    eps_out, sub_out = _ROUND[x.dtype]
    b = b + eps_out * (ax + b) + sub_out / 2 + 4 * F32_TINY + (x64 - x32).abs()
    return b.reshape(shape)


# ---------------------------------------------------------------------------------------------
# running one case


def _lowbit_frame(exc: BaseException) -> bool:
    tb = traceback.extract_tb(exc.__traceback__)
    return bool(tb) and ("/lowbit/" in tb[-1].filename.replace("\\", "/"))


def _benign(case: Case, x: torch.Tensor) -> bool:
    """Inputs every scheme must accept: finite floats of moderate magnitude, valid arguments, fp32 scales."""
    if case.dtype in INTS or case.inject or not case.valid_args:
        return False
    if case.kwargs.get("scale_dtype", torch.float32) != torch.float32:
        return False
    if case.values not in ("normal", "uniform", "zero", "constant"):
        return False
    return x.numel() == 0 or float(x.double().abs().max()) <= 1e4


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _roundtrip(state: QuantState, y: torch.Tensor) -> str:
    from safetensors.torch import load as st_load, save as st_save

    sd = state.state_dict()
    sd2 = st_load(st_save({k: v.contiguous() for k, v in sd.items()}))
    for k, v in sd.items():
        if v.dtype != sd2[k].dtype or v.shape != sd2[k].shape or not torch.equal(_bits(v), _bits(sd2[k])):
            return f"state_dict tensor {k} changed through safetensors"
    y2 = lowbit.dequantize(QuantState.from_state_dict(sd2))
    if y2.dtype != y.dtype or y2.shape != y.shape or not torch.equal(_bits(y2), _bits(y)):
        return "dequantize(from_state_dict(state_dict())) differs from dequantize(state)"
    return ""


def attribute(case: Case, x: torch.Tensor, what: str, exc: Optional[BaseException] = None) -> str:
    """Best-effort cause of a defect, named as in issue 17."""
    sch = case.scheme
    kw = case.kwargs
    floaty = case.dtype in FLOATS
    xa = x.double().abs() if floaty and x.numel() else torch.zeros(1, dtype=torch.float64)
    fin = xa[torch.isfinite(xa)]
    amax = float(fin.max()) if fin.numel() else 0.0
    if exc is not None and isinstance(exc, IndexError) and len(case.shape) == 0 and "axis" in kw:
        return "IndexError for a 0-d tensor with axis"
    if exc is not None and not isinstance(exc, (ValueError, TypeError)):
        return f"unclear error ({type(exc).__name__})"
    if what == "rejected benign input":
        return what
    if what == "invalid input accepted":
        return what
    if sch in GGUF:
        lim = {"q4_0": 65504 * 8, "q5_0": 65504 * 16, "q8_0": 65504 * 127, "q4_1": 65504, "q5_1": 65504}[sch]
        if amax > lim * 0.999:
            return "GGUF fp16 block scale/offset overflow"
    if case.dtype == torch.float64 and amax > F32_MAX:
        return "float64 beyond the float32 range"
    sd = kw.get("scale_dtype", torch.float32)
    if sd != torch.float32:
        if sch.startswith("fp8") and what.startswith("non-finite"):
            return "fp8 scale underflowing to 0 in float16 (NaN)"
        return "scale_dtype overflow/underflow"
    if kw.get("double_quant"):
        if what.startswith("sign flip") or (fin.numel() and 0 < float(fin[fin > 0].min() if (fin > 0).any() else 1) < 1e-37):
            return "double quant of subnormal scales flips signs"
        if amax > 1e37:
            return "double-quant offset overflow"
    if sch.endswith("_asym") and amax > F32_MAX / 2:
        return "asymmetric max - min overflow"
    if case.dtype in (torch.float16, torch.bfloat16) and what.startswith("non-finite"):
        return "float16/bfloat16 dequantized output not saturated"
    return f"other: {what}"


def run_case(case: Case, check_roundtrip: bool = True) -> Outcome:
    x = make_tensor(case)
    t0 = time.perf_counter()
    kw = dict(case.kwargs)
    try:
        state = lowbit.quantize(x, case.scheme, **kw)
        y = lowbit.dequantize(state)
    except (ValueError, TypeError) as e:
        dt = time.perf_counter() - t0
        msg = str(e).strip()
        if not _lowbit_frame(e) or not msg:
            return Outcome("defect", attribute(case, x, "unclear error", e), f"{type(e).__name__}: {msg[:200]}", dt)
        if _benign(case, x):
            return Outcome("defect", attribute(case, x, "rejected benign input"), f"{type(e).__name__}: {msg[:200]}", dt)
        return Outcome("clear_error", type(e).__name__, msg[:200], dt)
    except Exception as e:  # noqa: BLE001 -- the point is to classify anything
        dt = time.perf_counter() - t0
        return Outcome("defect", attribute(case, x, "unclear error", e), f"{type(e).__name__}: {str(e)[:200]}", dt)
    dt = time.perf_counter() - t0
    if dt > 10:
        return Outcome("defect", "slow call (> 10 s)", f"{dt:.1f} s", dt)
    if case.dtype in INTS or case.inject or not case.valid_args:
        return Outcome("defect", attribute(case, x, "invalid input accepted"), "", dt)
    if tuple(y.shape) != tuple(x.shape) or y.dtype != x.dtype:
        return Outcome("defect", "shape/dtype not kept", f"{tuple(y.shape)} {y.dtype}", dt)
    if y.numel():
        yd = y.double()
        xd = x.double()
        if not bool(torch.isfinite(yd).all()):
            return Outcome("defect", attribute(case, x, "non-finite output"),
                           f"{int((~torch.isfinite(yd)).sum())} non-finite of {y.numel()}", dt)
        # grids where 0 is exact and scales are positive keep signs; Q4_1/Q5_1 (x = q*d + m) do not, nor
        # does bitsandbytes' 8-bit lookup table (dynamic8), which maps |x/absmax| < 2^-25 to +-1/65535
        if case.scheme not in ("q4_1", "q5_1", "dynamic8") and bool((xd * yd < 0).any()):
            i = int(torch.nonzero((xd * yd < 0).reshape(-1))[0])
            return Outcome("defect", attribute(case, x, "sign flip"),
                           f"x={xd.reshape(-1)[i].item():.4g} -> {yd.reshape(-1)[i].item():.4g}", dt)
        err = (xd - yd).abs()
        bound = element_bound(x, case)
        over = err > bound
        if bool(over.any()):
            i = int(torch.nonzero(over.reshape(-1))[0])
            return Outcome("defect", attribute(case, x, "out of bound"),
                           f"x={xd.reshape(-1)[i].item():.6g} x^={yd.reshape(-1)[i].item():.6g} "
                           f"err={err.reshape(-1)[i].item():.4g} > bound {bound.reshape(-1)[i].item():.4g}", dt)
    if check_roundtrip:
        bad = _roundtrip(state, y)
        if bad:
            return Outcome("defect", "state_dict round trip not bit-identical", bad, dt, True)
    return Outcome("clean", "", "", dt, check_roundtrip)


@dataclass
class Summary:
    scheme: str
    n: int = 0
    classes: Counter = field(default_factory=Counter)
    causes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    roundtrips: int = 0
    max_seconds: float = 0.0


def fuzz_scheme(scheme: str, n: int, start: int = 0, check_roundtrip: bool = True, only=None) -> Summary:
    """Run seeds ``start .. start+n-1`` of ``scheme`` (``only``: a predicate on Case to run a subset of them)."""
    s = Summary(scheme)
    for i in range(start, start + n):
        case = gen_case(scheme, i)
        if only is not None and not only(case):
            continue
        o = run_case(case, check_roundtrip)
        s.n += 1
        s.classes[o.cls] += 1
        s.max_seconds = max(s.max_seconds, o.seconds)
        s.roundtrips += o.roundtrip_checked
        if o.cls == "defect":
            s.causes[o.cause] += 1
            s.examples.setdefault(o.cause, f"{case.describe()}: {o.detail}")
        elif o.cls == "clear_error":
            s.errors[o.cause] += 1
    return s
