"""The calibration's long-lived worker thread (``lowbit.model._ptq_staged._in_worker``, session 9): one thread serves
every call (cuDNN's per-thread caches survive from block to block), a call from that thread runs in place, errors
reach the caller, and a worker still busy with an abandoned call is replaced."""
import threading
import time

import pytest

from lowbit.model import _ptq_staged as S


def test_same_thread_across_calls_and_results():
    names = [S._in_worker(lambda: threading.get_ident()) for _ in range(3)]
    assert len(set(names)) == 1 and names[0] != threading.get_ident()
    assert S._in_worker(lambda a, b: a + b, 2, 3) == 5


def test_nested_call_runs_in_place():
    def outer():
        return threading.get_ident(), S._in_worker(lambda: threading.get_ident())

    a, b = S._in_worker(outer)
    assert a == b


def test_error_reaches_the_caller_and_worker_survives():
    def boom():
        raise KeyError("x")

    with pytest.raises(KeyError):
        S._in_worker(boom)
    assert S._in_worker(lambda: 7) == 7


def test_busy_worker_replaced():
    release = threading.Event()
    started = threading.Event()

    def stuck():
        started.set()
        release.wait(10)

    t = threading.Thread(target=lambda: S._in_worker(stuck), daemon=True)  # a caller that gives up waiting
    t.start()
    assert started.wait(5)
    busy = S._WORKER
    t0 = time.perf_counter()
    assert S._in_worker(lambda: 1) == 1  # not queued behind the stuck call
    assert time.perf_counter() - t0 < 5 and S._WORKER is not busy
    release.set()
    t.join(5)


def test_job_references_released():
    import gc
    import weakref

    class Big:
        pass

    obj = Big()
    ref = weakref.ref(obj)
    S._in_worker(lambda o: None, obj)
    del obj
    gc.collect()
    assert ref() is None
