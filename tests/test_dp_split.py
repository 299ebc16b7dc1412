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
