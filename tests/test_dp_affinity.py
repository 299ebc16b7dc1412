"""Session 10: each rank of a data-parallel GPU run pinned to its share of the host's CPUs (the cores of its GPU's NUMA
node, split between the ranks on that node, whole physical cores each), and the connections made before the run."""
import os

import pytest

from lowbit.model import distributed as D


def _smt(n_cores):
    """cpu -> core key of a host whose cpus i and i + n_cores are the two threads of core i."""
    return lambda c: tuple(sorted({c % n_cores, c % n_cores + n_cores}))


def test_ranks_on_one_node_split_its_cores_whole():
    allowed = list(range(16))  # 8 cores x 2 threads
    shares = D.cpu_shares(allowed, [None, None], 2, core_of=_smt(8))
    assert shares == [[0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]]
    three = D.cpu_shares(allowed, [None] * 3, 3, core_of=_smt(8))
    assert [len(s) for s in three] == [6, 6, 4] and sorted(sum(three, [])) == allowed  # the first ranks: the extra core


def test_ranks_take_their_gpus_node():
    allowed = list(range(8))
    nodes = [set(range(4)), set(range(4, 8)), set(range(4)), set(range(4, 8))]
    shares = D.cpu_shares(allowed, nodes, 4, core_of=lambda c: (c,))
    assert shares == [[0, 1], [4, 5], [2, 3], [6, 7]]
    # a node whose cpus this process may not use, or with fewer cores than its ranks: every allowed cpu (no pin)
    assert D.cpu_shares([0, 1, 2, 3], [set(range(4, 8)), set(range(4))], 2, core_of=lambda c: (c,)) == \
        [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert D.cpu_shares([0, 1, 2], [None] * 4, 4, core_of=lambda c: (c,)) == [[0, 1, 2]] * 4


def test_pin_cpus_switch_and_single_process(monkeypatch):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    before = os.sched_getaffinity(0)
    monkeypatch.delenv("LOWBIT_DP_AFFINITY", raising=False)
    assert D.pin_cpus(0, 2) is None and os.sched_getaffinity(0) == before  # off by default (run 17)
    monkeypatch.setenv("LOWBIT_DP_AFFINITY", "1")
    assert D.pin_cpus(0, 1) is None and os.sched_getaffinity(0) == before  # one rank: nothing to share
    monkeypatch.setenv("LOWBIT_DP_AFFINITY", "0")
    assert D.pin_cpus(0, 2) is None and os.sched_getaffinity(0) == before
    monkeypatch.setenv("LOWBIT_DP_AFFINITY", "numa")
    with pytest.raises(ValueError, match="LOWBIT_DP_AFFINITY='numa'"):
        D.pin_cpus(0, 2)


def test_pin_cpus_sets_the_share_in_a_child(tmp_path):
    """In a child process (the affinity is per process): rank 1 of 2 on a host of unknown NUMA layout gets the second
    half of the allowed cpus' cores, or nothing is pinned where there is one core."""
    import subprocess
    import sys

    import json

    code = ("import json, os; os.environ['LOWBIT_DP_AFFINITY'] = '1'; from lowbit.model import distributed as D; "
            "a = sorted(os.sched_getaffinity(0)); "
            "r = D.pin_cpus(1, 2); print(json.dumps([a, r, sorted(os.sched_getaffinity(0))]))")
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no sched_setaffinity on this platform")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.strip().splitlines()[-1]
    allowed, pinned, now = json.loads(out)
    if pinned is None:
        assert now == allowed
    else:
        assert now == pinned and set(pinned) < set(allowed)
        assert pinned == D.cpu_shares(allowed, [D._node_cpus(D._gpu_numa_node(r)) for r in range(2)], 2)[1]


def test_parse_cpulist():
    assert D._parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert D._parse_cpulist("5") == [5]
