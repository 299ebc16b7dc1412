"""Data-parallel GPTQ solve split: the stage's rows cut into equal, chunk-aligned pieces per rank, and a
linear solved in such pieces gives the codes of the whole (the block update runs in fixed row chunks)."""
import torch
from torch import nn

from lowbit.algorithms import gptq
from lowbit.model.sequential import _row_pieces


class _Stage:
    def __init__(self, names):
        self.names = names


def test_row_pieces_balance_and_cover():
    mods = {"q": nn.Linear(8, 4096, bias=False), "k": nn.Linear(8, 1024, bias=False),
            "v": nn.Linear(8, 1024, bias=False)}
    st = _Stage(["q", "k", "v"])
    pieces = _row_pieces(st, mods, 2)
    assert pieces == [("q", 0, 3072, 0), ("q", 3072, 4096, 1), ("k", 0, 1024, 1), ("v", 0, 1024, 1)]
    for world in (1, 2, 3, 4):
        pieces = _row_pieces(st, mods, world)
        for n, m in mods.items():  # every row exactly once, in order
            rows = [(lo, hi) for nn_, lo, hi, _ in pieces if nn_ == n]
            assert rows[0][0] == 0 and rows[-1][1] == m.out_features
            assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))
        assert all(lo % gptq.ROW_CHUNK == 0 for _, lo, _, _ in pieces)
    down = _row_pieces(_Stage(["d"]), {"d": nn.Linear(8, 4096, bias=False)}, 2)
    assert down == [("d", 0, 2048, 0), ("d", 2048, 4096, 1)]


def test_gptq_pieces_on_chunk_boundaries_equal_the_whole(monkeypatch):
    monkeypatch.setattr(gptq, "ROW_CHUNK", 64)
    torch.manual_seed(0)
    K, R = 256, 200
    X = torch.randn(1024, K)
    X[:, : K // 3] *= 3
    H = X.T @ X / 1024
    w = torch.randn(R, K) * 0.02
    f = gptq.gptq_factor(H)
    whole = gptq.gptq_quantize(w, H, 4, 128, False, factor=f)
    parts = [gptq.gptq_quantize(w[lo:hi], H, 4, 128, False, factor=f) for lo, hi in ((0, 64), (64, 192), (192, R))]
    for k in ("codes", "scales", "zeros"):
        assert torch.equal(torch.cat([getattr(p, k) for p in parts]), getattr(whole, k))


def test_solve_batches_join_chunk_aligned_pieces(monkeypatch):
    from lowbit.model._ptq_solve import _solve_batches

    mods = {"q": nn.Linear(8, 4096, bias=False), "k": nn.Linear(8, 1024, bias=False),
            "v": nn.Linear(8, 1024, bias=False)}
    pieces = _row_pieces(_Stage(["q", "k", "v"]), mods, 2)
    mine = [(j, p) for j, p in enumerate(pieces) if p[3] == 1]
    assert [[j for j, _ in b] for b in _solve_batches(mine)] == [[1, 2, 3]]
    ragged = [(0, ("a", 0, 1000, 0)), (1, ("b", 0, 1024, 0)), (2, ("c", 0, 500, 0)), (3, ("d", 0, 1024, 0))]
    assert [[j for j, _ in b] for b in _solve_batches(ragged)] == [[0], [1, 2], [3]]
    monkeypatch.setenv("LOWBIT_DP_BATCH", "0")
    assert [[j for j, _ in b] for b in _solve_batches(mine)] == [[1], [2], [3]]


def test_gptq_stacked_pieces_equal_each_piece_alone(monkeypatch):
    """Pieces of several linears stacked into one solve (a rank's share of q/k/v) give each piece's codes."""
    monkeypatch.setattr(gptq, "ROW_CHUNK", 64)
    torch.manual_seed(1)
    K = 256
    X = torch.randn(1024, K)
    X[:, :50] *= 4
    H = X.T @ X / 1024
    f = gptq.gptq_factor(H)
    ws = [torch.randn(R, K) * 0.02 for R in (128, 64, 40)]  # the last one ragged (rows not a chunk multiple)
    alone = [gptq.gptq_quantize(w, H, 4, 128, False, factor=f) for w in ws]
    both = gptq.gptq_quantize(torch.cat(ws), H, 4, 128, False, factor=f)
    for k in ("codes", "scales", "zeros"):
        assert torch.equal(torch.cat([getattr(a, k) for a in alone]), getattr(both, k))


def test_flip_factor_matches_the_exact_inverse_factor():
    """One Cholesky of the reversed matrix and a chunked triangular inverse: the upper Cholesky factor of the
    damped inverse (within float32 rounding of the float64 one, like the reference recipe)."""
    torch.manual_seed(2)
    K = 700
    X = torch.randn(2 * K, K, dtype=torch.float64)
    X[:, : K // 4] *= 6
    H = X.T @ X / X.shape[0]
    U_ref, d_ref = gptq.damped_inverse_cholesky(H.float(), 0.01, method="inverse")
    U, d = gptq.damped_inverse_cholesky(H.float(), 0.01, method="flip")
    assert d == d_ref
    exact = torch.linalg.cholesky(torch.linalg.inv(H + d * torch.eye(K, dtype=torch.float64)), upper=True)
    err = lambda A: ((A.double() - exact).norm() / exact.norm()).item()
    assert torch.equal(U, torch.triu(U)) and err(U) < 1e-5 and err(U) <= 2 * err(U_ref)
    L = torch.linalg.cholesky(H + torch.eye(K, dtype=torch.float64))
    for chunk in (64, 300, 2048):
        inv = gptq.lower_triangular_inverse(L, chunk)
        assert torch.allclose(inv @ L, torch.eye(K, dtype=torch.float64), atol=1e-10)


def test_factor_method_choice(monkeypatch):
    import pytest

    assert gptq._factor_method(torch.device("cpu")) == "inverse"
    assert gptq._factor_method(torch.device("cuda")) == "flip"
    monkeypatch.setenv("LOWBIT_GPTQ_FACTOR", "flip")
    assert gptq._factor_method(torch.device("cpu")) == "flip"
    monkeypatch.setenv("LOWBIT_GPTQ_FACTOR", "lu")
    with pytest.raises(ValueError, match="LOWBIT_GPTQ_FACTOR='lu'"):
        gptq._factor_method(torch.device("cpu"))
    with pytest.raises(ValueError, match="method='lu'"):
        gptq.damped_inverse_cholesky(torch.eye(4), 0.01, method="lu")


def test_store_replace_first_moves_nothing():
    from lowbit.model.offload import ActivationStore

    for budget in (0, 10 ** 9):  # on disk / on the device
        st = ActivationStore(torch.device("cpu"), budget=budget)
        x, pe = torch.randn(3, 4), (torch.randn(2), torch.randn(2))
        k = st.put(((x, 5), {"pe": pe, "mask": None}))
        o = st.put(torch.randn(3, 4))
        out = st.get(o)
        k2 = st.replace_first(k, o)
        (a, b), kw = st.get(k2)
        assert torch.equal(a, out) and b == 5 and torch.equal(kw["pe"][1], pe[1]) and kw["mask"] is None
        assert k not in st and o not in st and sum(st.tier_bytes().values()) == (12 + 4) * 4
        k3 = st.put(((), {"hidden_states": x}))
        import pytest

        with pytest.raises(ValueError, match="replace_first"):
            st.replace_first(k3, k2)
        st.close()


def test_exchange_pieces_packs_and_unpacks_every_piece(monkeypatch):
    """The solved pieces travel in one byte payload per rank (scales and zeros, then the codes, two 4-bit codes a
    byte where bits <= 4 and K is even): what a rank unpacks is bit for bit what the owner solved (4-bit packed,
    8-bit and odd K unpacked; a rank without pieces sends nothing)."""
    from lowbit.algorithms.gptq import GPTQResult
    from lowbit.model import _ptq_solve, distributed

    g = torch.Generator().manual_seed(0)
    for bits, K in ((4, 96), (8, 96), (4, 95)):
        mods = {"q": nn.Linear(K, 40, bias=False), "k": nn.Linear(K, 24, bias=False),
                "v": nn.Linear(K, 24, bias=False)}
        pieces = _row_pieces(_Stage(["q", "k", "v"]), mods, 3, align=8)
        G = -(-K // 32)
        solved = {j: GPTQResult(codes=torch.randint(0, 2 ** bits, (hi - lo, K), generator=g).to(torch.uint8),
                                scales=torch.rand(hi - lo, G, generator=g), zeros=torch.rand(hi - lo, G, generator=g),
                                loss=0.0, damp=0.0, bits=bits, group_size=32, sym=False)
                  for j, (n, lo, hi, r) in enumerate(pieces)}
        shapes, sizes = _ptq_solve._piece_layout(pieces, mods, 32, bits)
        payloads = [_ptq_solve._pack_pieces(pieces, solved, shapes, r, "cpu") for r in range(3)]
        assert [p.numel() for p in payloads] == [sizes.get(r, 0) for r in range(3)]
        for rank in range(3):
            monkeypatch.setattr(distributed, "all_gather_bytes", lambda payload, sz: list(payloads))
            mine = {j: solved[j] for j, p in enumerate(pieces) if p[3] == rank}
            got = _ptq_solve._exchange_pieces(pieces, mine, mods, 32, bits, rank, 3)
            assert sorted(got) == list(range(len(pieces)))
            for j, (c, s, z) in got.items():
                assert c.dtype == torch.uint8 and torch.equal(c, solved[j].codes)
                assert torch.equal(s, solved[j].scales) and torch.equal(z, solved[j].zeros)


def test_all_gather_bytes_alone_and_bad_payload(monkeypatch):
    """Without a process group the payload comes back as the only one; under one, a payload that is not this rank's
    declared uint8 bytes is refused with the rank and the sizes."""
    import pytest

    from lowbit.model import distributed

    p = torch.arange(5, dtype=torch.uint8)
    assert distributed.all_gather_bytes(p, [5])[0] is p
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    monkeypatch.setattr(distributed, "rank_world", lambda: (1, 2))
    with pytest.raises(ValueError, match="rank 1 payload"):
        distributed.all_gather_bytes(p, [3, 4])
    with pytest.raises(ValueError, match="rank 1 payload"):
        distributed.all_gather_bytes(p.float(), [3, 5])


def test_chunk_owners_balance_the_triangular_solves_by_cost():
    """Who computes each triangular-inverse chunk: every chunk once, the same list for every rank, the cost
    ``(K - a)^2 (b - a)`` balanced where the chunks allow (round robin gave rank 0 60% at the 8B MLP width)."""
    from lowbit.model.distributed import chunk_owners

    def spans(K, c=2048):
        return [(a, min(a + c, K)) for a in range(0, K, c)]

    def shares(K, world, c=2048):
        sp = spans(K, c)
        own = chunk_owners(sp, K, world)
        assert len(own) == len(sp) and set(own) <= set(range(world))
        cost = [(K - a) ** 2 * (b - a) for a, b in sp]
        return [sum(x for x, r in zip(cost, own) if r == q) / sum(cost) for q in range(world)], max(cost) / sum(cost)

    s, _ = shares(14336, 2)
    assert max(s) == 0.5
    for K, world in ((28672, 2), (14336, 3), (14336, 4), (4096, 2), (96, 2)):
        s, biggest = shares(K, world, 2048 if K > 1000 else 16)
        assert max(s) <= max(1.0 / world + biggest, biggest) and abs(sum(s) - 1) < 1e-12
    assert chunk_owners(spans(4096), 4096, 1) == [0, 0]


def test_dp_sync_switch(monkeypatch):
    """The collectives' host waits on the current CUDA stream are skipped by default (session 9: NCCL orders them on
    the streams); ``LOWBIT_DP_SYNC=1`` waits (runs 10-12)."""
    from lowbit.model import distributed as D

    calls = []

    class _Stream:
        def synchronize(self):
            calls.append(1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.delenv("LOWBIT_DP_SYNC", raising=False)
    D._sync()
    assert calls == []
    monkeypatch.setenv("LOWBIT_DP_SYNC", "1")
    D._sync()
    assert calls == [1]
    monkeypatch.setenv("LOWBIT_DP_SYNC", "0")
    D._sync()
    assert calls == [1]


def test_host_group_made_once_per_default_group(monkeypatch):
    """Under NCCL the small host values (the pass agreement, the sample count) go over a gloo group made on first use
    and made again for a new default group; ``LOWBIT_DP_AGREE=device`` keeps the default group (a single-process
    gloo group stands in for NCCL here: ``get_backend`` reports nccl)."""
    import socket

    import torch.distributed as dist

    from lowbit.model import distributed as D

    def port():
        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            return s_.getsockname()[1]

    real = dist.get_backend
    fake = {"on": False}
    monkeypatch.setattr(dist, "get_backend", lambda *a: "nccl" if fake["on"] else real(*a))
    monkeypatch.setattr(D, "_HOST_GROUP", None)
    groups = []
    for _ in range(2):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port()}", rank=0, world_size=1)
        try:
            fake["on"] = False
            assert D._host_group() is None  # a gloo default group serves itself
            fake["on"] = True
            g = D._host_group()
            assert g is not None and D._host_group() is g  # made once
            assert D._reduce_host_int(7, dist.ReduceOp.MIN) == 7 and D._reduce_host_int(3, dist.ReduceOp.SUM) == 3
            monkeypatch.setenv("LOWBIT_DP_AGREE", "device")
            assert D._host_group() is None
            monkeypatch.delenv("LOWBIT_DP_AGREE")
            groups.append(g)
        finally:
            fake["on"] = False
            dist.destroy_process_group()
    assert groups[0] is not groups[1]  # the second default group got its own
