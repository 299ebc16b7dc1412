"""Data-parallel calibration over torch.distributed (gloo, 2 CPU processes): the codes are bit-identical
to the single-process run on the same samples."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent('''
    import hashlib, os, sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_sequential import _tiny_llama, _ids
    from lowbit.model.sequential import quantize_model_ptq
    import lowbit.algorithms.gptq as G
    G.ROW_CHUNK = int(os.environ.get("TEST_ROW_CHUNK", G.ROW_CHUNK))
    G.FACTOR_CHUNK = int(os.environ.get("TEST_FACTOR_CHUNK", G.FACTOR_CHUNK))
    if os.environ.get("TEST_CHUNK_BYTES"):  # the chunks shared_chunks keeps in flight (LOWBIT_DP_CHUNKS=free)
        import lowbit.model.distributed as D
        D.CHUNKS_IN_FLIGHT_BYTES = int(os.environ["TEST_CHUNK_BYTES"])
    if os.environ.get("TEST_COUNT_CHUNKS"):  # which triangular-inverse chunks this process computed itself
        import lowbit.model.distributed as D
        _chunk = G.triangular_inverse_chunk
        COUNT = [0, 0]
        def counted(L, a, b):
            COUNT[0] += 1
            COUNT[1] += (L.shape[0] - a) ** 2 * (b - a)  # the chunk's cost (rows squared x columns)
            return _chunk(L, a, b)
        G.triangular_inverse_chunk = counted
    if os.environ.get("TEST_COUNT_AWQ"):  # AWQ grid points this rank scored itself, of how many shared
        import lowbit.model.distributed as D
        AWQ = [0, 0]
        _sv = D.shared_values
        def sv(n, fn):
            AWQ[1] += n
            def counted(i):
                AWQ[0] += 1
                return fn(i)
            return _sv(n, counted)
        D.shared_values = sv
    if os.environ.get("TEST_COUNT_FITS"):
        import lowbit.model._ptq_solve as S
        FITS = [0, 0]
        _sg, _fit = S.gptq_static_groups, G._fit_static_groups
        def sg(*a, **k):
            FITS[0] += 1
            return _sg(*a, **k)
        def fit(*a, **k):
            FITS[1] += 1
            return _fit(*a, **k)
        S.gptq_static_groups, G._fit_static_groups = sg, fit
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    lines = []
    for method in os.environ.get("TEST_METHODS", "gptq,awq").split(","):
        m = quantize_model_ptq(_tiny_llama(), method=method, bits=4, group_size=32, sym=False,
                               calib_dataset=_ids(10, 32), micro_batch=3, progress=False)
        h = hashlib.sha256()
        for n, mod in sorted(m.named_modules(), key=lambda x: x[0]):
            st = getattr(mod, "qstate", None)
            if st is not None:
                for t in (st.data, st.scales, st.zeros):
                    h.update(t.contiguous().numpy().tobytes())
        for n, p in sorted(m.state_dict().items()):
            if p.is_floating_point():
                h.update(p.contiguous().numpy().tobytes())
        lines.append("%s %s %s" % (method, m.ptq_summary["world_size"], h.hexdigest()))
    if os.environ.get("TEST_COUNT_CHUNKS"):
        lines.append("chunks %d %d" % (COUNT[0], COUNT[1]))
    if os.environ.get("TEST_FACTOR_DIGEST"):  # the factor of one Hessian, its triangular inverse shared out
        import lowbit.model.distributed as D
        g = torch.Generator().manual_seed(7)
        X = torch.randn(300, 90, generator=g)
        X[:, :20] *= 5
        seen = []
        f = G.gptq_factor(X.T @ X / 300, 0.01, True, share=D.shared_chunks if D.is_active() else None,
                          during=lambda H, dead, d: seen.append(d))
        h = hashlib.sha256()
        for t in f[:4]:
            h.update(t.contiguous().numpy().tobytes())
        lines.append("factor %s %r %r" % (h.hexdigest(), f[4], seen))
    if os.environ.get("TEST_COUNT_AWQ"):
        lines.append("awqpoints %d %d" % (AWQ[0], AWQ[1]))
    if os.environ.get("TEST_COUNT_FITS"):  # static-group fits outside the solves (the overlap) and inside
        lines.append("fits %d %d" % (FITS[0], FITS[1]))
    with open(os.path.join(sys.argv[1], "digest_%d_%s.txt" % (rank, os.environ.get("WORLD_SIZE", "1"))), "w") as f:
        f.write(" ; ".join(lines))
''')


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(script, out, nproc, **extra):
    Path(out).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **extra)
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(script), str(out)]
    for attempt in range(3):  # another process on the box may take the free port before torchrun binds it
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or nproc == 1 or "ddress already in use" not in proc.stderr:
            break
        cmd[cmd.index("--master-port") + 1] = str(_free_port())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {p.name: p.read_text().split(" ; ") for p in sorted(Path(out).glob(f"digest_*_{nproc}.txt"))}


def test_gloo_two_processes_bit_identical(tmp_path):
    """GPTQ and AWQ with 2 gloo processes give the single-process codes (and every float tensor) exactly."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    single = _run(script, tmp_path, 1)
    multi = _run(script, tmp_path, 2)
    assert list(single) == ["digest_0_1.txt"] and sorted(multi) == ["digest_0_2.txt", "digest_1_2.txt"]
    ref = single["digest_0_1.txt"]
    assert [r.split()[1] for r in ref] == ["1", "1"]
    for lines in multi.values():
        assert [r.split()[1] for r in lines] == ["2", "2"]
        assert [r.split()[2] for r in lines] == [r.split()[2] for r in ref]  # identical model on every rank


def test_gloo_batched_pieces_and_flip_factor_bit_identical(tmp_path):
    """Row chunks of 16 rows (so a rank's k/v pieces are solved stacked in one call) and the flip
    factorisation (the CUDA default): 2 gloo processes still give the single-process GPTQ codes."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = dict(TEST_ROW_CHUNK="16", TEST_METHODS="gptq", LOWBIT_GPTQ_FACTOR="flip")
    single = _run(script, tmp_path, 1, **env)
    multi = _run(script, tmp_path, 2, **env)
    ref = single["digest_0_1.txt"]
    assert len(multi) == 2 and [r.split()[0] for r in ref] == ["gptq"]
    for lines in multi.values():
        assert [r.split()[2] for r in lines] == [r.split()[2] for r in ref]


def test_gloo_shared_factor_chunks_bit_identical(tmp_path):
    """The flip factorisation's triangular solves in chunks of 16 columns (the tiny model's k = 64 and 128: 4 and 8
    chunks per stage) shared out over 2 gloo ranks (each computes its chunks, balanced by cost, and broadcasts
    them): the single-process GPTQ codes, and each rank computed only its share of the chunks, about half the cost
    (round robin gave rank 0 two thirds at k = 64)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = dict(TEST_FACTOR_CHUNK="16", TEST_METHODS="gptq", LOWBIT_GPTQ_FACTOR="flip", TEST_COUNT_CHUNKS="1")
    single = _run(script, tmp_path, 1, **env)
    ref = single["digest_0_1.txt"]
    n_single = int(ref[-1].split()[1])
    assert n_single > 8
    cost_single = int(ref[-1].split()[2])
    # session 10's default (each rank's chunks back to back, the waits at the end; with a cap of two chunks' bytes in
    # flight, waits on the way), session 9's (each broadcast waited for one chunk later) and the one before
    for mode, extra in (("free", {}), ("free", {"TEST_CHUNK_BYTES": str(2 * 128 * 16 * 4)}), ("overlap", {}),
                        ("after", {})):
        multi = _run(script, tmp_path / f"{mode}{len(extra)}", 2, LOWBIT_DP_CHUNKS=mode, **env, **extra)
        counts, costs = [], []
        for lines in multi.values():
            assert lines[0].split()[2] == ref[0].split()[2], mode
            counts.append(int(lines[-1].split()[1]))
            costs.append(int(lines[-1].split()[2]))
        assert sum(counts) == n_single and sum(costs) == cost_single and min(counts) > 0
        assert max(costs) <= 0.55 * cost_single


def test_gloo_fits_beside_the_factor_pair_sum_and_shared_factor_1_2_3_ranks(tmp_path):
    """Issue 20: the static groups fitted while the Hessian is factored (``LOWBIT_GPTQ_OVERLAP=1``: on the CPU one
    after the other, the plumbing of the GPU's side stream), the 2-rank sums in one send/recv exchange, the flip
    factorisation's chunks shared out: 1, 2 and 3 gloo ranks give the codes of one process without the overlap; the
    factor of one Hessian is the same with its triangular inverse shared over 2 or 3 ranks as computed alone, and
    the 2-rank sums by exchange (3 ranks: the broadcast loop) give the one-process codes."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = dict(TEST_ROW_CHUNK="16", TEST_FACTOR_CHUNK="16", TEST_METHODS="gptq", LOWBIT_GPTQ_FACTOR="flip",
               TEST_FACTOR_DIGEST="1", TEST_COUNT_FITS="1")
    ref = _run(script, tmp_path / "off", 1, LOWBIT_GPTQ_OVERLAP="0", **env)["digest_0_1.txt"]
    assert ref[0].startswith("gptq 1 ") and ref[2].startswith("fits 0 ")
    n_fit = int(ref[2].split()[2])
    assert n_fit > 0
    for nproc, extra in ((1, {}), (2, {"LOWBIT_DP_REDUCE": "pair"}), (3, {})):
        out = tmp_path / f"on{nproc}{len(extra)}"
        got = _run(script, out, nproc, LOWBIT_GPTQ_OVERLAP="1", **env, **extra)
        assert len(got) == nproc
        for lines in got.values():
            assert lines[0].split()[1:] == [str(nproc), ref[0].split()[2]]  # the same codes
            assert lines[1] == ref[1]  # the same factor, damp and first dampening
            n_sg, n_in = map(int, lines[2].split()[1:])
            assert n_sg == n_in and n_sg > 0  # every fit made beside the factor, none inside a solve
            if nproc == 1:
                assert n_sg == n_fit


def test_gloo_awq_grid_shared_over_3_ranks_and_every_rank_searching(tmp_path):
    """AWQ's grid of scale exponents shared out over the ranks (session 10's default, ``LOWBIT_DP_AWQ=shared``) over
    3 gloo ranks, and every rank searching the whole grid (``every``) over 2: the single-process model exactly."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    ref = _run(script, tmp_path / "one", 1, TEST_METHODS="awq")["digest_0_1.txt"]
    assert ref[0].startswith("awq 1 ")
    for nproc, mode in ((3, "shared"), (2, "every")):
        got = _run(script, tmp_path / f"{mode}{nproc}", nproc, TEST_METHODS="awq", LOWBIT_DP_AWQ=mode,
                   TEST_COUNT_AWQ="1")
        assert len(got) == nproc
        points = []
        for lines in got.values():
            assert lines[0].split()[1:] == [str(nproc), ref[0].split()[2]], mode
            points.append([int(x) for x in lines[-1].split()[1:]])
        if mode == "shared":  # each rank scored its third of the points (19 per searched stage, round robin)
            total = points[0][1]
            assert total > 0 and all(p[1] == total for p in points) and sum(p[0] for p in points) == total
            assert max(p[0] for p in points) - min(p[0] for p in points) <= total // 19
        else:
            assert all(p == [0, 0] for p in points)
