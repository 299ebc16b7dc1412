"""GPTQ's static groups fitted while the Hessian is factored (issue 20): the fits need no factor, so on a GPU they
run on a side stream beside the Cholesky factorisation. These CPU tests check the plumbing gives the bits of the
fits inside the solve: the same function on the same inputs (``gptq_static_groups``), stale fits refitted."""
import os
import warnings

import pytest
import torch

from lowbit.algorithms import gptq


def _problem(seed=0, K=192, R=96, dead=(5,)):
    torch.manual_seed(seed)
    X = torch.randn(4 * K, K)
    X[:, : K // 3] *= 3
    for d in dead:
        X[:, d] = 0.0  # a dead input (zero diagonal): fixed by gptq_factor, zeroed in the weights
    return torch.randn(R, K) * 0.02, X.T @ X / X.shape[0]


def _same(a, b):
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("codes", "scales", "zeros"))


@pytest.mark.parametrize("kw", [dict(), dict(act_order=False), dict(group_objective="mse"),
                                dict(act_order=False, group_objective="sweep", blocksize=64), dict(bits=3, sym=True)])
def test_static_groups_fitted_apart_give_the_solve_bits(kw):
    w, H = _problem()
    kw = dict(kw)
    bits, sym = kw.pop("bits", 4), kw.pop("sym", False)
    f = gptq.gptq_factor(H, 0.01, kw.get("act_order", True))
    ref = gptq.gptq_quantize(w, H, bits, 32, sym, factor=f, **kw)
    groups = gptq.gptq_static_groups(w, f[0], f[1], f[4], bits, 32, sym, **kw)
    assert groups[2] == f[4] and torch.equal(groups[0], ref.scales) and torch.equal(groups[1], ref.zeros)
    got = gptq.gptq_quantize(w, H, bits, 32, sym, factor=f, groups=groups, **kw)
    assert _same(got, ref)


def test_groups_with_another_dampening_are_refitted_and_bad_shapes_rejected():
    w, H = _problem(1)
    f = gptq.gptq_factor(H)
    ref = gptq.gptq_quantize(w, H, 4, 32, False, factor=f)
    junk = (torch.ones_like(ref.scales), torch.zeros_like(ref.zeros), f[4] * 10)
    assert _same(gptq.gptq_quantize(w, H, 4, 32, False, factor=f, groups=junk), ref)
    with pytest.raises(ValueError, match="groups: scales"):
        gptq.gptq_quantize(w, H, 4, 32, False, factor=f, groups=(ref.scales[:, :2], ref.zeros[:, :2], f[4]))
    with pytest.raises(ValueError, match="H has shape"):
        gptq.gptq_static_groups(w, H[:10, :10], f[1], f[4])


def test_during_runs_once_with_the_first_dampening_and_a_retry_refits():
    """A Hessian with a negative eigenvalue: the first Cholesky fails and the dampening grows; ``during`` saw only
    the first dampening, so the fits made there are stale and the solve fits again (the result equals the plain
    solve's)."""
    K = 64
    e = torch.ones(K, 1) / K ** 0.5
    H = torch.eye(K) - 3.0 * (e @ e.T)  # eigenvalue -2 along e, mean diagonal 1 - 3/K > 0
    w = torch.randn(16, K) * 0.02
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        f = gptq.gptq_factor(H, 0.01, during=lambda Hf, dead, d: seen.append((Hf, d)))
        f0 = gptq.gptq_factor(H, 0.01)
    assert len(seen) == 1 and seen[0][1] == 0.01 * float(torch.diag(H).mean()) and f[4] > 2.0
    assert seen[0][0] is f[0] and all(torch.equal(a, b) for a, b in zip(f[:4], f0[:4])) and f[4] == f0[4]
    stale = gptq.gptq_static_groups(w, f[0], f[1], seen[0][1], 4, 32, False)
    ref = gptq.gptq_quantize(w, H, 4, 32, False, factor=f)
    assert _same(gptq.gptq_quantize(w, H, 4, 32, False, factor=f, groups=stale), ref)


def test_factor_and_fit_gives_the_stage_the_solve_bits(monkeypatch):
    from lowbit.model import _ptq_solve as S

    w1, H = _problem(2)
    w2 = torch.randn(40, H.shape[0]) * 0.02
    calls = []
    real = gptq._fit_static_groups
    monkeypatch.setattr(gptq, "_fit_static_groups", lambda *a: calls.append(1) or real(*a))
    for method in ("inverse", "flip"):
        monkeypatch.setenv("LOWBIT_GPTQ_FACTOR", method)
        ref_f = gptq.gptq_factor(H.clone())
        refs = [gptq.gptq_quantize(w, H, 4, 32, False, factor=ref_f) for w in (w1, w2)]
        calls.clear()
        f, fits = S._factor_and_fit(H.clone(), {"percdamp": 0.01}, None, {"a": w1, "b": w2}, 4, 32, False)
        assert len(calls) == 2 and sorted(fits) == ["a", "b"]
        assert all(torch.equal(a, b) for a, b in zip(f[:4], ref_f[:4]))
        got = [gptq.gptq_quantize(w, f[0], 4, 32, False, factor=f, groups=fits[k]) for k, w in (("a", w1), ("b", w2))]
        assert len(calls) == 2  # no fit inside the solves
        assert all(_same(g, r) for g, r in zip(got, refs))


def test_fits_while_factoring_choice(monkeypatch):
    from lowbit.model._ptq_solve import _fits_while_factoring as fw

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not fw({}, cpu) and fw({}, cuda) and fw({"static_groups": True}, cuda)
    assert not fw({"static_groups": False}, cuda) and not fw({"gguf_type": "Q4_0"}, cuda)
    monkeypatch.setenv("LOWBIT_GPTQ_OVERLAP", "1")
    assert fw({}, cpu)
    monkeypatch.setenv("LOWBIT_GPTQ_OVERLAP", "0")
    assert not fw({}, cuda)
    monkeypatch.setenv("LOWBIT_GPTQ_OVERLAP", "yes")
    with pytest.raises(ValueError, match="LOWBIT_GPTQ_OVERLAP='yes'"):
        fw({}, cuda)


@pytest.mark.cuda
def test_fits_on_the_side_stream_give_the_solve_bits_on_the_gpu():
    """On the GPU: the fits queued on the side stream during the Cholesky, the solve after the caller's stream
    waited for them: the bits of the fits inside the solve (a K = 4096 Hessian: the factorisation long enough for
    the two to overlap)."""
    from lowbit.model import _ptq_solve as S

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    K = 4096
    X = torch.randn(2 * K, K, device=dev, generator=g)
    H = X.T @ X / X.shape[0]
    ws = {i: torch.randn(R, K, device=dev, generator=g) * 0.02 for i, R in enumerate((1024, 3072))}
    f0 = gptq.gptq_factor(H.clone())
    refs = {i: gptq.gptq_quantize(w, H, 4, 128, False, factor=f0) for i, w in ws.items()}
    f, fits = S._factor_and_fit(H.clone(), {"percdamp": 0.01}, None, ws, 4, 128, False)
    got = {i: gptq.gptq_quantize(w, f[0], 4, 128, False, factor=f, groups=fits.pop(i)) for i, w in ws.items()}
    torch.cuda.synchronize()
    assert all(_same(got[i], refs[i]) for i in ws)


@pytest.mark.parametrize("method", ["inverse", "flip"])
def test_during_before_the_cholesky_and_its_callable_right_after(monkeypatch, method):
    """The order the GPU overlap relies on: ``during`` before the first Cholesky is queued (the side stream waits for
    the work queued so far, not the factorisation), what it returns right after (the fits queued beside it)."""
    order = []
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda *a, **k: order.append("cholesky") or real(*a, **k))
    _, H = _problem(3, K=64, R=8, dead=())
    gptq.damped_inverse_cholesky(H, 0.01, method=method,
                                 during=lambda d: order.append("during") or (lambda: order.append("then")))
    assert order[:3] == ["during", "cholesky", "then"] and order.count("then") == 1


def _device_damp_everywhere(monkeypatch):
    """The device-kept dampening of the ``"flip"`` factorisation (CUDA's default) forced on the CPU: the code path
    runs here too, a scalar tensor in place of the float."""
    real = gptq._damp_on_device
    monkeypatch.setattr(gptq, "_damp_on_device", lambda dev: os.environ.get("LOWBIT_GPTQ_DAMP", "device") == "device"
                        or real(dev))


def test_dampening_kept_on_the_device_gives_the_host_bits(monkeypatch):
    """Session 10: the first dampening is not read before the factorisation (a host wait) but kept as a float64 scalar
    tensor and read with the outcome: the same factor, dampening and codes as the float, a retry too; the fits of the
    overlap get the tensor and hand the solve its value."""
    from lowbit.model import _ptq_solve as S

    _device_damp_everywhere(monkeypatch)
    w, H = _problem(4)
    monkeypatch.setenv("LOWBIT_GPTQ_DAMP", "host")
    ref = gptq.damped_inverse_cholesky(H, 0.01, method="flip")
    ref_f = gptq.gptq_factor(H.clone(), 0.01)
    ref_q = gptq.gptq_quantize(w, H, 4, 32, False, factor=ref_f)
    monkeypatch.setenv("LOWBIT_GPTQ_DAMP", "device")
    seen = []
    U, d = gptq.damped_inverse_cholesky(H, 0.01, method="flip", during=lambda x: seen.append(x))
    assert isinstance(seen[0], torch.Tensor) and seen[0].dtype == torch.float64 and float(seen[0]) == ref[1]
    assert type(d) is float and d == ref[1] and torch.equal(U, ref[0])
    monkeypatch.setenv("LOWBIT_GPTQ_FACTOR", "flip")
    f, fits = S._factor_and_fit(H.clone(), {"percdamp": 0.01}, None, {"a": w}, 4, 32, False)
    assert type(fits["a"][2]) is float and fits["a"][2] == f[4] == ref_f[4]
    assert _same(gptq.gptq_quantize(w, f[0], 4, 32, False, factor=f, groups=fits["a"]), ref_q)
    bad = torch.diag(torch.linspace(-1.0, 1.0, 64))  # indefinite: retries, the dampening read for them
    for mode in ("host", "device"):
        monkeypatch.setenv("LOWBIT_GPTQ_DAMP", mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = gptq.damped_inverse_cholesky(bad, 0.01, method="flip", max_tries=12)
        if mode == "host":
            first = got
        else:
            assert type(got[1]) is float and got[1] == first[1] and torch.equal(got[0], first[0])
    monkeypatch.setenv("LOWBIT_GPTQ_DAMP", "later")
    with pytest.raises(ValueError, match="LOWBIT_GPTQ_DAMP='later'"):
        gptq._damp_on_device(torch.device("cuda"))


def test_group_objectives_are_the_damped_slices():
    """The groups' objectives made run by run from strided views of ``H``: each equals ``_damped`` of its slice bit for
    bit (signed zeros included), a ragged last group and a non-contiguous ``H`` too."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(400, 200, generator=g)
    H = X.T @ X / 400
    H[H.abs() < 0.02] = -0.0
    for bounds, Hx in (([(0, 64), (64, 128), (128, 192), (192, 200)], H), ([(0, 100), (100, 200)], H),
                       ([(0, 50), (50, 100)], H[::2, ::2]), ([(0, 200)], H)):
        for damp in (0.0, 0.25, torch.tensor(0.25, dtype=torch.float64)):
            before = Hx.clone()
            got = gptq._group_objectives(Hx, damp, bounds)
            assert torch.equal(Hx, before) and sorted(got) == [a for a, _ in bounds]  # H itself never changed
            for a, b in bounds:
                ref = gptq._damped(Hx[a:b, a:b], damp)
                assert got[a].shape == (b - a, b - a) and got[a].is_contiguous()
                assert torch.equal(got[a].view(torch.int32), ref.view(torch.int32))


@pytest.mark.cuda
def test_dampening_on_the_device_gives_the_host_bits_on_the_gpu(monkeypatch):
    """On the GPU (where the device-kept dampening is the default): the factor and dampening of the host path, bit
    for bit, at the 8B shapes' widths."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    for K in (4096, 14336):
        X = torch.randn(K + 512, K, device=dev, generator=g)
        H = X.T @ X / X.shape[0]
        out = {}
        for mode in ("host", "device"):
            monkeypatch.setenv("LOWBIT_GPTQ_DAMP", mode)
            out[mode] = gptq.damped_inverse_cholesky(H, 0.01, method="flip")
        assert out["device"][1] == out["host"][1] and torch.equal(out["device"][0], out["host"][0])
        del X, H, out
