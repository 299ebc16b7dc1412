"""Launch configurations of the Triton kernels, keyed by format and M bucket (importable without Triton).

The defaults were chosen by reasoning about bytes in flight per SM; ``bench/gpu.py --tune`` sweeps
alternatives on the GPU and writes the winners to ``TUNED`` below (H100 SXM, Triton 3.6).
A 4-bit config is ``(kernel, BN, BK, split_k, num_warps, num_stages)`` with kernel ``gemv`` (CUDA-core,
M <= 4), ``gemm`` (tensor cores) or ``dequant`` (dequantize + ``F.linear``).
"""
from __future__ import annotations

from typing import Dict, Tuple

DEFAULT_4BIT: Dict[int, tuple] = {
    1: ("gemv", 32, 256, 4, 4, 1),
    2: ("gemv", 32, 256, 4, 4, 1),
    4: ("gemv", 32, 256, 4, 4, 1),
    16: ("gemm", 64, 128, 4, 4, 3),
    32: ("gemm", 64, 128, 4, 4, 3),
    64: ("gemm", 64, 128, 2, 4, 3),
    128: ("gemm", 128, 128, 1, 8, 3),
    0: ("dequant",),
}
# (BM, BN, BK, GROUP_M, num_warps, num_stages) per kind; small M uses smaller tiles
DEFAULT_SCALED: Dict[str, tuple] = {"int8": (128, 256, 128, 8, 8, 3), "fp8": (128, 256, 128, 8, 8, 3)}
DEFAULT_SCALED_SMALL: Dict[str, tuple] = {"int8": (16, 64, 256, 8, 4, 4), "fp8": (16, 64, 256, 8, 4, 4)}

# from bench/gpu.py --tune on the H100 (bench/results/gpu.md); (fmt, group) -> {M bucket: config}, "int8"/"fp8"
# -> config. NF4 at M=16 uses dequantize + F.linear: the fused GEMM measured 245 µs there, the
# dequantize path ~115 µs (8192 x 8192).
TUNED: Dict[object, object] = {
    ("codebook", 64): {1: ("gemv", 64, 256, 4, 4, 1), 2: ("gemv", 32, 256, 4, 4, 1), 4: ("gemv", 32, 256, 4, 4, 1),
                       16: ("dequant",), 32: ("dequant",), 64: ("dequant",), 128: ("dequant",)},
    ("int4", 128): {1: ("gemv", 16, 256, 4, 4, 1), 2: ("gemm", 128, 128, 4, 4, 3), 4: ("gemm", 128, 128, 4, 4, 3),
                    16: ("gemm", 128, 128, 4, 4, 3), 32: ("gemm", 64, 128, 2, 4, 3), 64: ("gemm", 64, 128, 2, 4, 3),
                    128: ("dequant",)},
    ("int8", "large"): (128, 256, 128, 8, 8, 4, "tma"),
    ("fp8", "large"): (128, 256, 128, 8, 8, 4, "tma"),
}


def configs_4bit(fmt: str, group: int) -> Dict[int, tuple]:
    """Config per M bucket for a 4-bit format (``codebook`` or ``int4``) and scale group length."""
    out = dict(DEFAULT_4BIT)
    out.update(TUNED.get((fmt, group), {}))
    return out


def config_scaled(kind: str, M: int) -> Tuple[int, ...]:
    """GEMM tile config for the int8 / fp8 scaled GEMM at ``M`` rows."""
    if M <= 64:
        return TUNED.get((kind, "small"), DEFAULT_SCALED_SMALL[kind])
    return TUNED.get((kind, "large"), DEFAULT_SCALED[kind])


# Fused low-bit GEMV (lowbit/kernels/triton/gemv.py), M <= 4: (BN, BK, split_k, num_warps, num_stages, EW).
# BK is capped by the largest power of two dividing the scale group. TUNED_GEMV maps (bits, "codebook" | "int",
# group) -- group 0 = any -- to rows (n_max, k_max, m_max, config) tried in order: the first row with
# N <= n_max, K <= k_max and M <= m_max applies. ``bench/gemv_sweep.py`` writes such rows; a JSON file of them
# named by LOWBIT_GEMV_CONFIGS (keys "bits,class,group") overrides the table (used while tuning).
DEFAULT_GEMV: Tuple[int, ...] = (32, 128, 4, 4, 2, 1)
# from bench/gemv_sweep.py --quick on the H200 (bench/results/raw/gemv_sweep_v2.json): Llama-3-8B decode shapes;
# the last two rows of each list (any larger shape, M = 1 and M <= 4) repeat the largest shape's winners.
TUNED_GEMV: Dict[tuple, list] = {
    (4, 'codebook', 64): [
        (1024, 4096, 1, (8, 64, 8, 4, 2, 1)),
        (1024, 4096, 4, (32, 64, 16, 4, 2, 1)),
        (4096, 4096, 1, (128, 64, 16, 8, 2, 0)),
        (4096, 4096, 4, (32, 64, 4, 4, 2, 1)),
        (14336, 4096, 1, (64, 64, 16, 4, 2, 0)),
        (4096, 14336, 1, (64, 64, 16, 4, 2, 0)),
        (14336, 4096, 4, (64, 64, 8, 4, 2, 0)),
        (4096, 14336, 4, (32, 64, 4, 4, 2, 1)),
        (1073741824, 1073741824, 1, (64, 64, 16, 4, 2, 0)),
        (1073741824, 1073741824, 4, (64, 64, 8, 4, 2, 0)),
    ],
    (4, 'codebook', 0): [
        (1024, 4096, 1, (8, 64, 8, 4, 2, 1)),
        (1024, 4096, 4, (32, 64, 16, 4, 2, 1)),
        (4096, 4096, 1, (128, 64, 16, 8, 2, 0)),
        (4096, 4096, 4, (32, 64, 4, 4, 2, 1)),
        (14336, 4096, 1, (64, 64, 16, 4, 2, 0)),
        (4096, 14336, 1, (64, 64, 16, 4, 2, 0)),
        (14336, 4096, 4, (64, 64, 8, 4, 2, 0)),
        (4096, 14336, 4, (32, 64, 4, 4, 2, 1)),
        (1073741824, 1073741824, 1, (64, 64, 16, 4, 2, 0)),
        (1073741824, 1073741824, 4, (64, 64, 8, 4, 2, 0)),
    ],
    (4, 'int', 128): [
        (1024, 4096, 1, (8, 128, 4, 4, 2, 1)),
        (1024, 4096, 4, (16, 128, 4, 4, 2, 1)),
        (4096, 4096, 1, (128, 128, 8, 8, 2, 0)),
        (4096, 4096, 4, (8, 128, 4, 4, 2, 1)),
        (14336, 4096, 1, (128, 128, 8, 8, 2, 0)),
        (4096, 14336, 1, (128, 128, 8, 8, 2, 0)),
        (14336, 4096, 4, (8, 128, 2, 4, 2, 1)),
        (4096, 14336, 4, (8, 128, 8, 4, 2, 1)),
        (1073741824, 1073741824, 1, (128, 128, 8, 8, 2, 0)),
        (1073741824, 1073741824, 4, (8, 128, 2, 4, 2, 1)),
    ],
    (4, 'int', 0): [
        (1024, 4096, 1, (8, 128, 4, 4, 2, 1)),
        (1024, 4096, 4, (16, 128, 4, 4, 2, 1)),
        (4096, 4096, 1, (128, 128, 8, 8, 2, 0)),
        (4096, 4096, 4, (8, 128, 4, 4, 2, 1)),
        (14336, 4096, 1, (128, 128, 8, 8, 2, 0)),
        (4096, 14336, 1, (128, 128, 8, 8, 2, 0)),
        (14336, 4096, 4, (8, 128, 2, 4, 2, 1)),
        (4096, 14336, 4, (8, 128, 8, 4, 2, 1)),
        (1073741824, 1073741824, 1, (128, 128, 8, 8, 2, 0)),
        (1073741824, 1073741824, 4, (8, 128, 2, 4, 2, 1)),
    ],
    (4, 'int', 32): [
        (1024, 4096, 1, (8, 32, 8, 4, 2, 1)),
        (1024, 4096, 4, (16, 32, 8, 4, 2, 1)),
        (4096, 4096, 1, (64, 32, 16, 8, 2, 1)),
        (4096, 4096, 4, (16, 32, 4, 4, 2, 1)),
        (14336, 4096, 1, (32, 32, 8, 4, 1, 1)),
        (4096, 14336, 1, (32, 32, 16, 4, 2, 1)),
        (14336, 4096, 4, (32, 32, 4, 4, 1, 1)),
        (4096, 14336, 4, (16, 32, 8, 4, 2, 1)),
        (1073741824, 1073741824, 1, (32, 32, 8, 4, 1, 1)),
        (1073741824, 1073741824, 4, (32, 32, 4, 4, 1, 1)),
    ],
    (8, 'int', 0): [
        (1024, 4096, 1, (8, 256, 4, 4, 2, 1)),
        (1024, 4096, 4, (8, 256, 2, 4, 2, 1)),
        (4096, 4096, 1, (8, 256, 2, 4, 2, 1)),
        (4096, 4096, 4, (8, 256, 2, 4, 2, 1)),
        (14336, 4096, 1, (8, 256, 2, 4, 2, 1)),
        (4096, 14336, 1, (8, 256, 4, 4, 2, 1)),
        (14336, 4096, 4, (8, 256, 2, 4, 2, 1)),
        (4096, 14336, 4, (8, 256, 2, 4, 2, 1)),
        (1073741824, 1073741824, 1, (8, 256, 2, 4, 2, 1)),
        (1073741824, 1073741824, 4, (8, 256, 2, 4, 2, 1)),
    ],
}
_loaded_env = [False]


def _load_env_gemv() -> None:
    import json
    import os

    _loaded_env[0] = True
    path = os.environ.get("LOWBIT_GEMV_CONFIGS")
    if path:
        with open(path) as f:
            for key, rows in json.load(f).items():
                b, cls, g = key.split(",")
                TUNED_GEMV[(int(b), cls, int(g))] = [tuple(r[:3]) + (tuple(r[3]),) for r in rows]


def config_gemv(bits: int, kind: int, M: int, N: int, K: int, group: int = 0) -> Tuple[int, ...]:
    """GEMV launch config for a weight of ``bits`` and kernel ``kind`` at ``M`` rows of ``[N, K]``."""
    if not _loaded_env[0]:
        _load_env_gemv()
    cls = "codebook" if kind == 0 else "int"
    for key in ((bits, cls, group), (bits, cls, 0)):
        for n_max, k_max, m_max, cfg in TUNED_GEMV.get(key, ()):
            if N <= n_max and K <= k_max and M <= m_max:
                return tuple(cfg)
    if N * K <= 4096 * 4096 // 4:  # small weights: fewer rows per program, less split
        return (16, 128, 2, 4, 2, 1)
    return DEFAULT_GEMV


# ---------------------------------------------------------------------------------------------
# v2 fused kernels (lowbit/kernels/triton/lowbit_mm.py): GEMV at M <= 4, tensor-core GEMM above.
# GEMV config ("gemv", BN, BKW, split_k, num_warps, num_stages); GEMM ("gemm", BM, BN, BKW, split_k, num_warps,
# num_stages); ("dense",) = dequantize once + F.linear. BKW counts 32-bit words per row and step (8 4-bit or 4
# 8-bit weights each). split_k 0 = chosen from the SM count (enough programs for every multiprocessor).
# TUNED_MM maps (bits, "codebook" | "int") to rows (m_max, n_max, k_max, config) tried in order: the first row
# with M <= m_max, N <= n_max and K <= k_max applies. ``bench/gemv_sweep.py`` writes such rows; a JSON file of
# them named by LOWBIT_MM_CONFIGS (keys "bits,class") overrides the table (used while tuning).
SM_COUNT = 132  # H100 / H200 SXM; the split heuristic only needs the order of magnitude
# M = 1 rows (all but the 1024 x 4096 one): bench/gemv_sweep.py --run6 --round 2 on the H200 (run 7,
# bench/results/raw/mm_sweep_run7.json, helper gemv5; run 6 the same families first): the multi-group GEMV "gemvq*"
# (lowbit_mm._gemvq_kernel: exact integer decode at about one integer op per weight, 1-4 scale groups per step),
# int4 g128 asym 19.5 / 60.5 us at 8192^2 / 28672 x 8192 against 23.7 / 70.0 for run 5's rows and torchao int4
# 22.7 / 64.1 in the same run; NF4 b64 through "gemvqs" 1-5% faster than run 5's "gemvgsf"; int8 per channel through
# TMA ("gemvqm": 21.0 / 65.4 us against 29.7 / 100.7). A TMA launch costs ~15 us more host time (the tensor map is
# encoded per launch): where run 7's TMA winner dispatched eagerly slower than eager F.linear (int8 at 4096^2, 8192^2,
# 4096 x 14336: 36.3 / 44.5 / 36.8 us against 17.6 / 36.8 / 34.5) the row takes the fastest plain-load candidate of
# run 6 instead ("gemvq" 128 x 32: 10.5 / 29.7 / 25.1 us graph against the old rows' 12.2 / 31.6 / 32.3). The
# integer class's rows serve every group size: a "gemvqm" row reads groups under 16 words (int4 g32 / g64,
# Q4_0 / Q4_1, Q8_0) by register prefetch instead (see lowbit_mm.TMA_MIN_WORDS). Earlier M = 1 rows: runs 3-5.
# M = 4 rows from bench/gemv_sweep.py --gemvg on the H200 (bench/results/raw/mm_sweep_run2.json); M = 1 rows of
# every format from --run5 (bench/results/raw/mm_sweep_run5.json, helper kern3): NF4 / FP4 at M = 1 through the
# group-step GEMV with the codebook in registers read by warp shuffles ("gemvgs*", 1.12-1.82x F.linear where the v1
# GEMV gave 0.70-0.89x), int4 through the bit-trick GEMV ("gemvgf") or the shuffle table ("gemvgsf"); the shipped
# rows read the state's own scale / zero tensors (no "t": a transposed copy per weight measured 0-3% faster for int4
# and 3-13% for NF4 on 3 of 6 shapes at M = 1, not worth a second copy of the scales). M = 5..16 and 17..64 rows:
# bench/tc_sweep.py run 2 on the H200 (bench/results/raw/tc_sweep_run2.json, helper kern4; tc_sweep.tuned_rows):
# per shape the faster of the tensor-core GEMM "tc" ("tc", BM, BN, BKW, split_k, warps, stages) and dequantize +
# cuBLAS ("dense"; int4 asym g128 measured for the integer class, nf4 b64 for codebooks, int8 per channel for 8
# bits). 4-bit rows at M = 5..16 and 17..64 on the four Llama shapes (4096 x 14336, 14336 x 4096, 8192^2,
# 28672 x 8192): bench/tc_sweep.py --tc5 runs 1-2 on the H200 (bench/results/raw/tc_sweep_tc5_run*.json, helper tc5;
# tc_sweep.tuned_rows_tc5): "tcb" = the codes dequantized two weights per inline-PTX op in the activation dtype
# (runs 1-2, M = 16: int4 1.27-1.79x F.linear where tc gave 1.10-1.54x, NF4 1.06-1.43x where tc gave 0.47-0.56x;
# M = 64: int4 0.69-0.79x, about tc's, NF4 0.72-0.82x where tc / dense gave 0.44-0.50x). "tcbd" (one MMA per step)
# measured faster still (M = 16 int4 1.37-1.85x, NF4 1.22-1.62x, M = 64 0.85-1.05x, faster than dense at M = 256 on
# 2 shapes) but is NOT selected:
# one tcbd variant (int4 g32 sym, 28672 x 8192, M = 64) gave wrong results on the H200 under load for a cause not
# found (bench/results/tc_sweep.md); rows may name it explicitly. The 1024 x 4096 / 4096 x 4096 rows and the 8-bit
# rows are run 2's of kern4. Above M = 64 (and where no row applies) dequantize + cuBLAS (row blocks of <=
# LOWBIT_DENSE_CHUNK_MB, lowbit.kernels.linear.dense_linear; 16 / 32 MiB blocks measured 1.4-1.9x slower than whole
# weights at M = 256 / 512). The last row per M repeats the largest shape's winner for any larger shape.
TUNED_MM: Dict[tuple, list] = {
    (4, 'codebook'): [
        (1, 1024, 4096, ('gemvgs', 128, 8, 16, 4, 2)),
        (1, 4096, 4096, ('gemvqs', 128, 32, 8, 4, 1)),
        (1, 4096, 14336, ('gemvqs', 64, 32, 16, 4, 1)),
        (1, 14336, 4096, ('gemvqs', 64, 32, 4, 4, 1)),
        (1, 8192, 8192, ('gemvqs', 64, 32, 8, 4, 1)),
        (1, 28672, 8192, ('gemvqs', 64, 32, 8, 4, 1)),
        (1, 1073741824, 1073741824, ('gemvqs', 64, 32, 8, 4, 1)),
        (4, 4096, 4096, ('gemv', 16, 32, 2, 4, 2)),
        (4, 4096, 14336, ('gemvg', 64, 4, 0, 4, 2)),
        (4, 14336, 4096, ('gemvg', 64, 4, 8, 4, 2)),
        (4, 8192, 8192, ('gemvg', 64, 4, 8, 4, 2)),
        (4, 28672, 8192, ('gemvg', 64, 4, 8, 4, 2)),
        (4, 1073741824, 1073741824, ('gemvg', 64, 4, 8, 4, 2)),
        (16, 1024, 4096, ('dense',)),
        (16, 4096, 4096, ('dense',)),
        (16, 4096, 14336, ('tcb', 16, 128, 16, 8, 4, 3)),
        (16, 14336, 4096, ('tcb', 16, 128, 16, 2, 4, 3)),
        (16, 8192, 8192, ('tcb', 16, 128, 16, 4, 4, 3)),
        (16, 28672, 8192, ('tcb', 16, 128, 16, 4, 4, 3)),
        (16, 1073741824, 1073741824, ('tcb', 16, 128, 16, 4, 4, 3)),
        (64, 1024, 4096, ('dense',)),
        (64, 4096, 4096, ('dense',)),
        (64, 4096, 14336, ('tcb', 64, 128, 16, 4, 4, 3)),
        (64, 14336, 4096, ('tcb', 64, 128, 16, 2, 4, 3)),
        (64, 8192, 8192, ('tcb', 64, 128, 16, 2, 4, 4)),
        (64, 28672, 8192, ('tcb', 64, 128, 16, 2, 4, 3)),
        (64, 1073741824, 1073741824, ('tcb', 64, 128, 16, 2, 4, 3)),
    ],
    (4, 'int'): [
        (1, 1024, 4096, ('gemvgf', 128, 16, 16, 4, 3)),
        (1, 4096, 4096, ('gemvq', 64, 64, 8, 4, 1)),
        (1, 4096, 14336, ('gemvqf', 128, 16, 16, 4, 1)),
        (1, 14336, 4096, ('gemvqf', 128, 16, 4, 4, 1)),
        (1, 8192, 8192, ('gemvqf', 128, 16, 8, 4, 1)),
        (1, 28672, 8192, ('gemvqm', 128, 16, 4, 4, 3)),
        (1, 1073741824, 1073741824, ('gemvqm', 128, 16, 4, 4, 3)),
        (4, 4096, 4096, ('gemvg', 128, 16, 8, 4, 2)),
        (4, 4096, 14336, ('gemvg', 128, 16, 8, 4, 2)),
        (4, 14336, 4096, ('gemvg', 128, 16, 2, 4, 2)),
        (4, 8192, 8192, ('gemvg', 128, 16, 4, 4, 2)),
        (4, 28672, 8192, ('gemvg', 128, 16, 8, 4, 2)),
        (4, 1073741824, 1073741824, ('gemvg', 128, 16, 8, 4, 2)),
        (16, 1024, 4096, ('dense',)),
        (16, 4096, 4096, ('tc', 16, 128, 16, 8, 4, 3)),
        (16, 4096, 14336, ('tcb', 16, 128, 16, 8, 4, 3)),
        (16, 14336, 4096, ('tcb', 16, 128, 16, 2, 4, 3)),
        (16, 8192, 8192, ('tcb', 16, 128, 16, 8, 4, 3)),
        (16, 28672, 8192, ('tcb', 16, 128, 16, 2, 4, 3)),
        (16, 1073741824, 1073741824, ('tcb', 16, 128, 16, 2, 4, 3)),
        (64, 1024, 4096, ('dense',)),
        (64, 4096, 4096, ('dense',)),
        (64, 4096, 14336, ('tc', 64, 128, 16, 4, 4, 3)),
        (64, 14336, 4096, ('tcb', 64, 128, 16, 2, 4, 3)),
        (64, 8192, 8192, ('tcb', 64, 128, 16, 4, 4, 3)),
        (64, 28672, 8192, ('tcb', 64, 128, 16, 2, 4, 3)),
        (64, 1073741824, 1073741824, ('tcb', 64, 128, 16, 2, 4, 3)),
    ],
    (8, 'int'): [
        (1, 1024, 4096, ('gemvg', 128, 8, 66, 4, 2)),
        (1, 4096, 4096, ('gemvq', 128, 32, 8, 4, 1)),
        (1, 14336, 4096, ('gemvqm', 128, 32, 4, 4, 3)),
        (1, 4096, 14336, ('gemvq', 128, 32, 8, 4, 1)),
        (1, 8192, 8192, ('gemvq', 128, 32, 8, 4, 1)),
        (1, 28672, 8192, ('gemvqm', 128, 32, 8, 4, 4)),
        (1, 1073741824, 1073741824, ('gemvqm', 128, 32, 8, 4, 4)),
        (16, 1024, 4096, ('tc', 16, 64, 32, 8, 4, 4)),
        (16, 4096, 4096, ('tc', 16, 64, 32, 4, 4, 4)),
        (16, 4096, 14336, ('tc', 16, 128, 32, 8, 4, 3)),
        (16, 14336, 4096, ('tc', 16, 128, 32, 2, 4, 3)),
        (16, 8192, 8192, ('tc', 16, 128, 32, 4, 4, 3)),
        (16, 28672, 8192, ('tc', 16, 128, 32, 4, 4, 3)),
        (16, 1073741824, 1073741824, ('tc', 16, 128, 32, 4, 4, 3)),
        (64, 1024, 4096, ('dense',)),
        (64, 4096, 4096, ('tc', 64, 128, 32, 4, 8, 3)),
        (64, 4096, 14336, ('tc', 64, 128, 32, 4, 8, 3)),
        (64, 14336, 4096, ('tc', 64, 128, 32, 2, 8, 3)),
        (64, 8192, 8192, ('tc', 64, 128, 32, 4, 8, 3)),
        (64, 28672, 8192, ('tc', 64, 128, 32, 4, 8, 3)),
        (64, 1073741824, 1073741824, ('tc', 64, 128, 32, 4, 8, 3)),
    ],
}
_loaded_mm = [False]


def _load_env_mm() -> None:
    import json
    import os

    _loaded_mm[0] = True
    path = os.environ.get("LOWBIT_MM_CONFIGS")
    if path:
        with open(path) as f:
            for key, rows in json.load(f).items():
                b, cls = key.split(",")
                TUNED_MM[(int(b), cls)] = [tuple(r[:3]) + (tuple(r[3]),) for r in rows]


def _auto_split(tiles: int, k_steps: int, target: int) -> int:
    s = max(1, min(k_steps, -(-target // max(tiles, 1))))
    return s


def default_mm(bits: int, kind: int, M: int, N: int, K: int) -> Tuple:
    """The untuned v2 config: tile sizes by M, split-K so that about ``4 * SM_COUNT`` programs run."""
    kw = K * bits // 32
    if M <= 4:
        BN, BKW = 128, 8
        return ("gemvg", BN, BKW, _auto_split(-(-N // BN), max(1, kw // BKW), 4 * SM_COUNT), 4, 2)
    if M > 4:  # measured on the H200 (bench/results/gemv_sweep.md): dequantize + cuBLAS beat the v2 GEMM at every M
        return ("dense",)
    BM = 16 if M <= 16 else (32 if M <= 32 else 64)
    BN, BKW = 64, 32
    tiles = -(-M // BM) * -(-N // BN)
    return ("gemm", BM, BN, BKW, _auto_split(tiles, max(1, kw // BKW), 2 * SM_COUNT), 4, 2)


def config_mm(bits: int, kind: int, M: int, N: int, K: int, group: int = 0) -> Tuple:
    """v2 launch config for a ``bits`` weight of kernel ``kind`` at ``M`` rows of ``[N, K]``."""
    if not _loaded_mm[0]:
        _load_env_mm()
    cls = "codebook" if kind == 0 else "int"
    for m_max, n_max, k_max, cfg in TUNED_MM.get((bits, cls), ()):
        if M <= m_max and N <= n_max and K <= k_max:
            cfg = tuple(cfg)
            if cfg[0].startswith("gemv") and cfg[3] == 0:
                kw = K * bits // 32
                cfg = cfg[:3] + (_auto_split(-(-N // cfg[1]), max(1, kw // cfg[2]), 8 * SM_COUNT),) + cfg[4:]
            elif cfg[0] == "gemm" and cfg[4] == 0:
                kw = K * bits // 32
                tiles = -(-M // cfg[1]) * -(-N // cfg[2])
                cfg = cfg[:4] + (_auto_split(tiles, max(1, kw // cfg[3]), 2 * SM_COUNT),) + cfg[5:]
            return cfg
    return default_mm(bits, kind, M, N, K)
