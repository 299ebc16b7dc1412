"""Data-parallel calibration over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Launched with ``torchrun --nproc-per-node N`` (or ``lowbit quantize --nproc N``), every rank runs
its contiguous share of the calibration samples through each block; the statistics (float64 sums
over samples, :class:`lowbit.algorithms.stats.InputStats`) are gathered and added in rank order,
so every rank holds the same Hessian; each stage's output rows are shared out over the ranks (GPTQ
solves every row on its own), the solved pieces exchanged in one all-gather of packed bytes
(``LOWBIT_DP_SPLIT`` / ``LOWBIT_DP_EXCHANGE`` for the earlier whole-linear units and broadcasts);
rank 0 writes the files.

The codes equal the single-process run's: every sample's statistics are computed alone, the sums
are float64 (the fp32 Hessian handed to the solver is their rounding) and added in sample order
within a rank, ranks in rank order.

Example (two CPU processes)::

    torchrun --nproc-per-node 2 -m lowbit quantize --model tiny --method gptq --output out/
"""
from __future__ import annotations

import os
import time
from typing import Any, List, Optional, Tuple

import torch

#: environment every launched program of ours gets (NVLink multicast stays off)
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


#: seconds spent in collective calls by this process (statistics sums and solve broadcasts)
COMM_SECONDS = {"reduce": 0.0, "broadcast": 0.0}


def _sync() -> None:
    """Wait for the work queued on this thread's current CUDA stream (around the collectives, which it orders, and
    for their timing in :data:`COMM_SECONDS`). Not ``torch.cuda.synchronize()``: that also waits for the pipeline's
    background block copies on their side stream (the next block to the device, the last one home: about 0.1 s per
    8B block from pageable memory), which then no longer overlap the calibration (run 10).

    Off by default since session 9 (``LOWBIT_DP_SYNC=1`` turns it on: run 12 and before): NCCL's collectives are
    ordered on the streams by torch (the current stream waits for them without blocking the host, the tensors are
    kept until they finish), so the host queues work ahead of the GPU as in one process, and the host-only work
    between the collectives (a block's installs, a stage's set-up) runs while the GPU still computes;
    :data:`COMM_SECONDS` then counts the host's time in the calls only."""
    if os.environ.get("LOWBIT_DP_SYNC", "0") != "1":
        return
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.current_stream().synchronize()


def is_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> Tuple[int, int]:
    if not is_active():
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def init_from_env(device: Optional[torch.device] = None) -> bool:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``/``MASTER_ADDR``); False if
    not launched that way. NCCL when ``device`` is a GPU, gloo otherwise; sets the rank's GPU."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "RANK" not in os.environ:
        return False
    for k, v in SAFE_ENV.items():
        os.environ.setdefault(k, v)
    backend = "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        pin_cpus(local, int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))))
    dist.init_process_group(backend=backend)
    import atexit

    atexit.register(_leave)
    if backend == "nccl":
        _connect()
    return True


def _connect() -> None:
    """Make the connections the calibration uses before it starts (session 10): the gloo group for host values and,
    with two ranks, the send/recv pair of :func:`_pair_sum` (NCCL builds a communicator for a pair at its first
    point-to-point call), each with one tiny exchange. Made lazily they were set up inside the first block: its part
    of the 2-GPU run's first block that took 0.5 s more than a later block (0.3 s on 1 GPU, run 16).
    ``LOWBIT_DP_CONNECT=lazy``: at first use, as before."""
    if os.environ.get("LOWBIT_DP_CONNECT", "eager") == "lazy" or not is_active():
        return
    import torch.distributed as dist

    min_over_ranks(0)
    dev = torch.device("cuda", torch.cuda.current_device())
    if dist.get_world_size() == 2 and os.environ.get("LOWBIT_DP_REDUCE", "pair") == "pair":
        _pair_sum(torch.zeros(1, dtype=torch.float64, device=dev), inplace=True)
    all_gather_bytes(torch.zeros(1, dtype=torch.uint8, device=dev), [1] * dist.get_world_size())
    dist.broadcast(torch.zeros(1, dtype=torch.float32, device=dev), src=0)  # shared_chunks' collective
    torch.cuda.current_stream().synchronize()


def _gpu_numa_node(index: int) -> Optional[int]:
    """The NUMA node of CUDA device ``index`` from its PCI address (sysfs), or None where unknown."""
    try:
        p = torch.cuda.get_device_properties(index)
        addr = f"{p.pci_domain_id:04x}:{p.pci_bus_id:02x}:{p.pci_device_id:02x}.0"
        with open(f"/sys/bus/pci/devices/{addr}/numa_node") as f:
            node = int(f.read().strip())
    except Exception:  # no CUDA build, no such property in this torch, no sysfs entry: unknown
        return None
    return node if node >= 0 else None


def _node_cpus(node: Optional[int]) -> Optional[set]:
    if node is None:
        return None
    try:
        with open(f"/sys/devices/system/node/node{node}/cpulist") as f:
            return set(_parse_cpulist(f.read()))
    except (OSError, ValueError):
        return None


def _parse_cpulist(text: str) -> List[int]:
    """``"0-3,8,10-11"`` -> ``[0, 1, 2, 3, 8, 10, 11]`` (the sysfs list format)."""
    out: List[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def _core_of(cpu: int) -> Tuple[int, ...]:
    """A key shared by the hardware threads of one physical core (its sibling list; the cpu alone where unknown)."""
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
            return tuple(_parse_cpulist(f.read()))
    except (OSError, ValueError):
        return (cpu,)


def cpu_shares(allowed: List[int], nodes: List[Optional[set]], local_world: int, core_of=_core_of) -> List[List[int]]:
    """Each local rank's CPUs: the ranks whose GPUs sit on one NUMA node (``nodes[r]``: its CPUs, None where unknown:
    all ``allowed``) share that node's allowed CPUs in contiguous runs of whole physical cores (hardware threads of a
    core stay together), the first ranks getting the extra core. A rank whose node has no allowed CPU, or fewer
    cores than its ranks, gets every allowed CPU (no pinning)."""
    shares: List[List[int]] = []
    for r in range(local_world):
        pool = sorted(set(allowed) & nodes[r]) if nodes[r] is not None else sorted(allowed)
        peers = [q for q in range(local_world) if (nodes[q] is None) == (nodes[r] is None)
                 and (nodes[q] is None or nodes[q] == nodes[r])]
        cores: dict = {}
        for c in pool:
            cores.setdefault(core_of(c), []).append(c)
        keys = sorted(cores, key=lambda k: min(cores[k]))
        if len(keys) < len(peers) or not pool:
            shares.append(sorted(allowed))
            continue
        i, n = peers.index(r), len(peers)
        base, extra = divmod(len(keys), n)
        lo = i * base + min(i, extra)
        hi = lo + base + (1 if i < extra else 0)
        shares.append(sorted(c for k in keys[lo:hi] for c in cores[k]))
    return shares


def pin_cpus(local_rank: int, local_world: int) -> Optional[List[int]]:
    """Pin this process (every thread it starts after this) to its share of the host's CPUs (:func:`cpu_shares`): the
    cores of its GPU's NUMA node, split between the local ranks on that node. A data-parallel GPU run is bound by the
    host's kernel launches in stretches (the fits, the solve), and the rank whose host ran slower made the others wait
    at every collective (session 9's traces: rank 0's host ran the same Python 20% slower than rank 1's). Returns the
    CPUs set, or None where nothing was pinned. Opt-in, ``LOWBIT_DP_AFFINITY=1``: on the 2-GPU H200 host (one NUMA
    node, 32 CPUs) the 8B GPTQ run took 23.05 s pinned and 22.77 s not (run 17), so the default (``0``) pins nothing."""
    mode = os.environ.get("LOWBIT_DP_AFFINITY", "0")
    if mode not in ("0", "1"):
        raise ValueError(f"LOWBIT_DP_AFFINITY={mode!r}: expected 0 or 1")
    if mode == "0" or local_world <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))
    nodes = [_node_cpus(_gpu_numa_node(r)) for r in range(local_world)]
    cpus = cpu_shares(allowed, nodes, local_world)[local_rank]
    if cpus == allowed:
        return None
    os.sched_setaffinity(0, cpus)
    return cpus


def _leave() -> None:
    """At the exit of a process whose group :func:`init_from_env` created: wait for every rank, then destroy the
    group. Without it a rank that exits first closes its gloo connections while another still tears down, which
    aborted that one ("terminate called without an active exception", SIGABRT) after its work was done."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        barrier()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and is_active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Contiguous ``[start, stop)`` share of ``n`` samples for ``rank`` (the first ranks get one more)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def sum_in_rank_order(t: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """The sum over ranks of ``t``, added in rank order (the same bits on every rank). ``inplace``: ``t`` (which
    the caller gives up) may hold the result, so a rank holds two copies of the sums at most instead of three
    (the 70B class's MLP input: 6.6 GB each in float64)."""
    if not is_active():
        return t
    import torch.distributed as dist

    _sync()
    t0 = time.perf_counter()
    # two ranks exchange their sums in one send/recv, both directions of the link at once (session 9's trace: the two
    # broadcasts of the 8B MLP input's 1.64 GB sums took 4.5 ms each, one after the other, the GPU idle meanwhile;
    # run 11 measured no gain with the host waits around every collective). LOWBIT_DP_REDUCE=loop: the broadcasts.
    if dist.get_world_size() == 2 and os.environ.get("LOWBIT_DP_REDUCE", "pair") == "pair":
        out = _pair_sum(t, inplace)
        _sync()
        COMM_SECONDS["reduce"] += time.perf_counter() - t0
        return out
    out = None
    rank = dist.get_rank()
    own = t.contiguous() if inplace else None
    for r in range(dist.get_world_size()):  # one rank's tensor at a time: memory of two copies, not N
        if r == rank and own is not None:
            dist.broadcast(own, src=r)  # the sender's tensor is not changed by the broadcast
            buf = own
        else:
            buf = t.contiguous().clone() if r == rank else torch.empty_like(t)
            dist.broadcast(buf, src=r)
        if out is None:
            out = buf if buf is not own else own
        else:
            out += buf  # out is own only when rank 0 is this rank, after which own is not read again
        del buf
    _sync()
    COMM_SECONDS["reduce"] += time.perf_counter() - t0
    return out


def _pair_sum(t: torch.Tensor, inplace: bool) -> torch.Tensor:
    """:func:`sum_in_rank_order` of two ranks in one exchange: each rank sends its tensor to the other and receives
    the other's at the same time (both directions of the link at once, where two broadcasts sent one after the
    other), then both compute ``t_0 + t_1`` with rank 0's tensor as the left operand: the same operation on the same
    operands, so the same bits on both ranks and as the broadcast loop. Two copies per rank at most, as there."""
    import torch.distributed as dist

    rank = dist.get_rank()
    own = t.contiguous()
    if not inplace and own.data_ptr() == t.data_ptr():
        own = own.clone()  # the caller keeps t: the sum goes elsewhere
    other = torch.empty_like(own)
    reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, own, 1 - rank), dist.P2POp(dist.irecv, other, 1 - rank)])
    for r in reqs:
        r.wait()
    if rank == 0:
        own += other  # t_0 + t_1
        return own
    other += own  # t_0 + t_1 (rank 0's tensor on the left, as on rank 0)
    return other


_HOST_GROUP: Any = None  # (the default group it was made for, the gloo group)


def _host_group():
    """A gloo group over the same ranks for small host values (made on first use: every rank reaches it at the same
    call; made again for a new default group), or ``None`` for the default group when that is gloo already.
    ``LOWBIT_DP_AGREE=device``: none (the default group's NCCL, as before session 9)."""
    global _HOST_GROUP
    import torch.distributed as dist

    if dist.get_backend() == "gloo" or os.environ.get("LOWBIT_DP_AGREE", "host") == "device":
        return None
    world = dist.group.WORLD
    if _HOST_GROUP is None or _HOST_GROUP[0] is not world:
        _HOST_GROUP = (world, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def _reduce_host(t: torch.Tensor, op) -> torch.Tensor:
    """``op`` (a ``ReduceOp``) over the ranks of the host tensor ``t``, in place, returned: over the host group
    (:func:`_host_group`), or through the GPU when that is off under NCCL."""
    import torch.distributed as dist

    group = _host_group()
    if group is None and dist.get_backend() == "nccl":
        d = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(d, op=op)
        return t.copy_(d)
    dist.all_reduce(t, op=op, group=group)
    return t


def _reduce_host_int(x: int, op) -> int:
    """``op`` (a ``ReduceOp``) of the ranks' host integers ``x`` (:func:`_reduce_host`)."""
    return int(_reduce_host(torch.tensor([x], dtype=torch.int64), op).item())


def min_over_ranks(x: int) -> int:
    """The smallest of the ranks' ``x`` (host integers). Through a gloo group on the host (session 9): over NCCL the
    value went through the GPU, and reading it back waited for all the work queued on the rank's GPU (the pass's
    forwards and sums) before the host could queue the next, so the host-only work after it (a stage's set-up, a
    block's installs) ran on an idle GPU; now only the hosts wait for each other."""
    if not is_active():
        return x
    import torch.distributed as dist

    return _reduce_host_int(x, dist.ReduceOp.MIN)


def sum_over_ranks(x: int) -> int:
    """The sum of the ranks' host integers ``x`` (e.g. sample counts), on the host like :func:`min_over_ranks`."""
    if not is_active():
        return x
    import torch.distributed as dist

    return _reduce_host_int(x, dist.ReduceOp.SUM)


def shared_values(n: int, fn) -> List[float]:
    """``[fn(1), ..., fn(n)]`` (host floats) with the points shared out over the ranks: rank ``r`` computes the
    points ``i`` with ``(i - 1) % world == r``, and the ranks' vectors (each point filled by its one rank, zeros
    elsewhere) are summed on the host group, which adds only zeros to each value: every rank gets each ``fn(i)``
    exactly as its rank computed it. AWQ's scale search shares its grid of exponents this way (session 10)."""
    if not is_active():
        return [fn(i) for i in range(1, n + 1)]
    import torch.distributed as dist

    rank, world = rank_world()
    vals = torch.zeros(n, dtype=torch.float64)
    for i in range(1, n + 1):
        if (i - 1) % world == rank:
            vals[i - 1] = fn(i)
    return _reduce_host(vals, dist.ReduceOp.SUM).tolist()


def broadcast_object(obj: Any, src: int) -> Any:
    """``obj`` from rank ``src`` on every rank (tensors travel through the CPU)."""
    if not is_active():
        return obj
    import torch.distributed as dist

    _sync()
    t0 = time.perf_counter()
    box: List[Any] = [_to_cpu(obj) if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    COMM_SECONDS["broadcast"] += time.perf_counter() - t0
    return box[0]


def broadcast_tensors(tensors: List[torch.Tensor], src: int) -> None:
    """Broadcast ``tensors`` (allocated with the right shapes on every rank) from rank ``src``, in place."""
    if not is_active():
        return
    import torch.distributed as dist

    _sync()
    t0 = time.perf_counter()
    for t in tensors:
        dist.broadcast(t, src=src)
    _sync()
    COMM_SECONDS["broadcast"] += time.perf_counter() - t0


def all_gather_bytes(payload: torch.Tensor, sizes: List[int]) -> List[torch.Tensor]:
    """Every rank's byte payload on every rank, in one collective: ``payload`` is this rank's (uint8, 1-D,
    ``sizes[rank]`` bytes), ``sizes`` every rank's (known to all); returns the ``world`` payloads (this rank's
    own is ``payload`` itself). The payloads are padded to the largest for ``all_gather``; both directions of
    a link carry data at once, where one broadcast per owner sent one rank's pieces after the other's."""
    if not is_active():
        return [payload]
    import torch.distributed as dist

    rank, world = rank_world()
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != sizes[rank]:
        raise ValueError(f"all_gather_bytes: rank {rank} payload {tuple(payload.shape)} {payload.dtype}, "
                         f"expected uint8 [{sizes[rank]}]")
    n = max(sizes)
    mine = payload if payload.numel() == n else torch.cat([payload, payload.new_zeros(n - payload.numel())])
    outs = [torch.empty(n, dtype=torch.uint8, device=payload.device) for _ in range(world)]
    _sync()
    t0 = time.perf_counter()
    dist.all_gather(outs, mine)
    _sync()
    COMM_SECONDS["broadcast"] += time.perf_counter() - t0
    outs[rank] = payload
    return [o[:sizes[r]] for r, o in enumerate(outs)]


def chunk_owners(spans: List[Tuple[int, int]], K: int, world: int) -> List[int]:
    """The rank that computes each triangular-inverse chunk ``(a, b)`` of a ``K x K`` factor: the chunks by cost
    (a triangular solve of ``K - a`` rows for ``b - a`` columns: ``(K - a)^2 (b - a)``), the largest first, each to
    the rank with the least work so far (ties: the lower chunk, the lower rank). Round robin gave rank 0 the first
    chunk of every pair, the widest: 60% of the work at K = 14336 in 2048-column chunks (this: 50%). The same list
    on every rank; who computes a chunk does not change its bits."""
    load = [0] * world
    owners = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda j: (-(K - spans[j][0]) ** 2 * (spans[j][1] - spans[j][0]), j)):
        a, b = spans[i]
        r = min(range(world), key=lambda q: (load[q], q))
        owners[i] = r
        load[r] += (K - a) ** 2 * (b - a)
    return owners


#: the chunk buffers :func:`shared_chunks` keeps in flight at most (sent and received, ``LOWBIT_DP_CHUNKS=free``): the
#: whole triangular inverse's chunks at K = 14336 (470 MB), a third of them at the 70B class's K = 28672
CHUNKS_IN_FLIGHT_BYTES = 512 * 2 ** 20


def shared_chunks(L: torch.Tensor, out: torch.Tensor, spans: List[Tuple[int, int]]) -> None:
    """The ``share`` of :func:`lowbit.algorithms.gptq.lower_triangular_inverse` in a data-parallel run: each chunk
    of the triangular inverse is computed by one rank (:func:`chunk_owners`, balanced by cost; the same function as
    in one process, so the same bits) and broadcast from there. Every rank factors every stage's Hessian otherwise; this shares out
    the triangular solves, about half of the ``"flip"`` factorisation's work."""
    from lowbit.algorithms.gptq import triangular_inverse_chunk

    if not is_active():
        for a, b in spans:
            out[a:, a:b] = triangular_inverse_chunk(L, a, b)
        return
    import torch.distributed as dist

    rank, world = rank_world()
    owners = chunk_owners(spans, L.shape[0], world)
    mode = os.environ.get("LOWBIT_DP_CHUNKS", "free")
    if mode not in ("free", "overlap", "after"):
        raise ValueError(f"LOWBIT_DP_CHUNKS={mode!r}: expected free, overlap or after")
    if mode == "after":  # before session 9: solve all, then broadcast all
        for i, (a, b) in enumerate(spans):  # every rank solves its chunks first: the ranks work at the same time
            if owners[i] == rank:
                out[a:, a:b] = triangular_inverse_chunk(L, a, b)
        _sync()
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(spans):
            owner = owners[i]
            buf = out[a:, a:b].contiguous() if owner == rank else torch.empty(L.shape[0] - a, b - a, dtype=L.dtype,
                                                                               device=L.device)
            dist.broadcast(buf, src=owner)
            if owner != rank:
                out[a:, a:b] = buf
            del buf
        _sync()
        COMM_SECONDS["broadcast"] += time.perf_counter() - t0
        return
    # session 9: in chunk order, each chunk broadcast (asynchronously, on NCCL's stream) as soon as its owner queued
    # its solve, so a chunk travels while the ranks solve the next one; a received chunk is copied in once the next
    # broadcast is queued (two chunks in flight at most: the memory of the loop above). The owner broadcasts its
    # solve's output made contiguous instead of a contiguous copy of out's slice.
    # Session 10 (LOWBIT_DP_CHUNKS=free, the default): the caller's stream waits for a broadcast only when the chunks
    # in flight pass CHUNKS_IN_FLIGHT_BYTES (or at the end), not one chunk later: with that wait each rank's next solve
    # waited for the other rank's previous chunk, so the ranks took turns (K = 14336: 352 cost units where each
    # rank's share is 294); now each rank solves its chunks back to back while NCCL's stream carries them.
    free = mode == "free"
    t0 = time.perf_counter()

    def finish(job) -> None:
        work, x, a, b, received = job
        work.wait()  # the current stream waits for the broadcast (the host does not)
        if received:
            out[a:, a:b] = x

    prev = None
    pending: List[Any] = []
    for i, (a, b) in enumerate(spans):
        if owners[i] == rank:
            # a triangular solve's output may be column-major: the row-major bytes the receivers expect go out
            x = triangular_inverse_chunk(L, a, b).contiguous()
            out[a:, a:b] = x
        else:
            x = torch.empty(L.shape[0] - a, b - a, dtype=L.dtype, device=L.device)
        job = (dist.broadcast(x, src=owners[i], async_op=True), x, a, b, owners[i] != rank)
        del x
        if free:
            pending.append(job)
            while len(pending) > 1 and sum(j[1].numel() * j[1].element_size() for j in pending) > \
                    CHUNKS_IN_FLIGHT_BYTES:
                finish(pending.pop(0))
            continue
        if prev is not None:
            finish(prev)
        prev = job
    for job in pending + ([prev] if prev is not None else []):
        finish(job)
    del prev, job, pending
    _sync()
    COMM_SECONDS["broadcast"] += time.perf_counter() - t0


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(obj, **{f: _to_cpu(getattr(obj, f)) for f in obj.__dataclass_fields__
                                          if isinstance(getattr(obj, f), torch.Tensor)})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(o) for o in obj)
    return obj


def barrier() -> None:
    if is_active():
        import torch.distributed as dist

        dist.barrier()


__all__ = ["is_active", "rank_world", "init_from_env", "local_device", "shard", "sum_in_rank_order",
           "min_over_ranks", "sum_over_ranks", "broadcast_object", "barrier", "shared_chunks", "chunk_owners",
           "all_gather_bytes", "SAFE_ENV", "pin_cpus", "cpu_shares", "shared_values"]
