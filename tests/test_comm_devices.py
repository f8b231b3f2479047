"""Collectives and their devices (issue 31, finding 1): Comm refuses, in one line and before
anything is sent, a tensor its group's backend cannot take; the pre-flight's and
memory_peaks' tensors are made on the topology's device; the control-plane helpers work on
2 gloo ranks. And the watchdog names a silent rank before the process group's timeout.

NCCL is not here, so a group whose backend takes only CUDA tensors is made from gloo with
torch's own backend registry: torch then refuses host tensors on it exactly as NCCL does
("No backend type associated with device type cpu"). A topology whose device is `meta`
stands for a GPU run: a tensor made anywhere but on the topology's device shows up.
"""
import time
import types

import pytest
import torch

from toolkit.distributed import watchdog
from toolkit.distributed.comm import Comm, CommDeviceError
from toolkit.distributed.timing import clock

CUDA_ONLY = "lctk_cuda_only"  # gloo underneath, registered as taking CUDA tensors only, like NCCL


def _topology():
    from toolkit.distributed.topology import ParallelDims, Topology

    return Topology.build(ParallelDims(ring=2))


def _refusal(call) -> str:
    try:
        call()
    except CommDeviceError as err:
        return str(err)
    raise AssertionError("Comm sent a tensor its backend cannot take")


# ---- bodies, run on every rank of a pool -----------------------------------------------------
def refusals() -> dict:
    """One line per refused call; the group still works afterwards (nothing was half sent)."""
    import torch.distributed as dist

    topo = _topology()
    comm, world, meta = topo.comm, topo.world_group(), torch.empty(4, device="meta")
    lines = {
        "all_reduce": _refusal(lambda: comm.all_reduce(meta, world, tag="probe")),
        "all_gather": _refusal(lambda: comm.all_gather(meta, world, tag="probe")),
        "all_to_all": _refusal(lambda: comm.all_to_all(meta, world, tag="probe")),
        "broadcast": _refusal(lambda: comm.broadcast(meta, 0, world, tag="probe")),
        "ring_shift": _refusal(lambda: comm.ring_shift([meta], world, tag="probe")),
        "send": _refusal(lambda: comm.send(meta, 1 - topo.rank, world, tag="probe")),
        "recv": _refusal(lambda: comm.recv(meta, 1 - topo.rank, world, tag="probe")),
    }
    if CUDA_ONLY not in dist.Backend.backend_capability:
        dist.Backend.register_backend(CUDA_ONLY, lambda store, rank, size, timeout: dist.ProcessGroupGloo(
            store, rank, size, timeout), devices=["cuda"])
    cuda_only = dist.new_group([0, 1], backend=CUDA_ONLY)
    host = torch.ones(2, dtype=torch.float64)
    try:
        dist.all_reduce(host, group=cuda_only)  # what NCCL does with a host tensor
        torch_says = "accepted"
    except RuntimeError as err:
        torch_says = str(err).splitlines()[0]
    lines["host_on_cuda_only"] = _refusal(lambda: comm.all_reduce(host, cuda_only, tag="preflight"))
    dist.destroy_process_group(cuda_only)
    after = comm.all_reduce(torch.full((1,), float(topo.rank + 1)), world).item()
    return dict(lines=lines, torch_says=torch_says, after=after, comm_device=str(comm.device),
                topo_device=str(topo.device))


def preflight_and_peaks(model_dir: str) -> dict:
    """Both collectives on the real device (they agree across ranks), then on a topology whose
    device is meta: refused, so their tensors are made on the topology's device."""
    from transformers import AutoConfig

    from toolkit.api import LongContextModel, run_config_for
    from toolkit.loading.preflight import check_memory

    config = AutoConfig.from_pretrained(model_dir)
    run = run_config_for(config, None, None, ring=2)
    topo = _topology()
    budget = 1e12 * (topo.rank + 1)  # bytes: the ranks differ, the tightest decides
    available = check_memory(config, run, topo, 64, budget)
    lcm = LongContextModel(types.SimpleNamespace(config=config), None, topo, run)
    peaks = lcm.memory_peaks()
    topo.device = topo.comm.device = torch.device("meta")  # a device no host tensor is on
    preflight = _refusal(lambda: check_memory(config, run, topo, 64, budget))
    memory = _refusal(lcm.memory_peaks)
    return dict(available=available, peaks=peaks, preflight=preflight, memory=memory)


def control_plane() -> dict:
    """Object broadcast (from either rank), all_gather_object, barrier, send/recv, staged too."""
    from toolkit.distributed.comm import broadcast_object, world_group

    topo = _topology()
    comm, world, me = topo.comm, topo.world_group(), topo.rank
    out = dict(
        from_0=comm.broadcast_object({"job": [1, 2]} if me == 0 else None, world),
        from_1=comm.broadcast_object("late" if me == 1 else None, world, src_group_rank=1),
        module_level=broadcast_object(("ok", "stdin") if me == 0 else None, world_group()),
        gathered=comm.all_gather_object({"rank": me}, world),
    )
    comm.barrier(world)  # aligned: the next barrier waits for rank 1's sleep
    t0 = time.monotonic()
    if me == 1:
        time.sleep(1.0)
    comm.barrier(world)
    out["waited_s"] = time.monotonic() - t0
    received = []
    for c in (comm, Comm("cpu", stage_through_host=True)):
        c.counter.reset()
        if me == 0:
            c.send(torch.arange(6.0).view(2, 3), 1, world, tag="p2p")()
            received.append(None)
        else:
            received.append(c.recv(torch.zeros(2, 3), 0, world, tag="p2p").tolist())
        out.setdefault("bytes", []).append(tuple(c.counter.by_key[("p2p", None)]))
    out["received"] = received
    return out


# ---- tests -----------------------------------------------------------------------------------
def test_comm_refuses_a_tensor_its_backend_cannot_take_in_one_line(pools):
    for rank, got in enumerate(pools(2).run(refusals)):
        assert got["comm_device"] == got["topo_device"] == "cpu"
        for call, line in got["lines"].items():
            assert "\n" not in line, line
        for call in ("all_reduce", "all_gather", "all_to_all", "broadcast", "ring_shift", "send", "recv"):
            assert got["lines"][call].startswith(f"Comm.{call}(tag=probe): tensor on meta but the group's backend "
                                                 "gloo takes only cpu, cuda tensors"), got["lines"][call]
        assert "No backend type associated with device type cpu" in got["torch_says"], got["torch_says"]
        assert got["lines"]["host_on_cuda_only"].startswith(
            f"Comm.all_reduce(tag=preflight): tensor on cpu but the group's backend {CUDA_ONLY} takes only cuda "
            "tensors"), got["lines"]["host_on_cuda_only"]
        assert got["after"] == 3.0  # 1 + 2: the refusals sent nothing, the group is intact


def test_preflight_and_memory_peaks_make_their_tensors_on_the_topology_device(pools, tiny_dirs):
    results = pools(2).run(preflight_and_peaks, tiny_dirs("llama"))
    for got in results:
        assert got["available"] == 1e12  # the smaller budget, on both ranks
        assert got["peaks"]["peak_device_bytes"] is None  # CPU ranks
        assert got["preflight"].startswith("Comm.all_reduce(tag=preflight): tensor on meta"), got["preflight"]
        assert got["memory"].startswith("Comm.all_reduce(tag=memory_peaks): tensor on meta"), got["memory"]
    rss = [got["peaks"]["peak_host_rss_bytes"] for got in results]
    assert rss[0] == rss[1] > 0  # the larger of the two, on both ranks


def test_object_collectives_barrier_and_point_to_point_on_2_gloo_ranks(pools):
    results = pools(2).run(control_plane)
    for got in results:
        assert got["from_0"] == {"job": [1, 2]} and got["from_1"] == "late"
        assert got["module_level"] == ("ok", "stdin")
        assert got["gathered"] == [{"rank": 0}, {"rank": 1}]
    assert results[0]["waited_s"] > 0.5, results[0]["waited_s"]  # rank 0 waited for rank 1's second
    assert results[1]["received"] == [[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]] * 2  # direct, and staged via the host
    assert results[0]["bytes"] == [(24, 0)] * 2 and results[1]["bytes"] == [(0, 24)] * 2


def test_a_lone_rank_communicates_nothing():
    comm, x = Comm("cpu"), torch.ones(3)
    assert comm.all_reduce(x, None) is x and comm.broadcast_object("a", None) == "a"
    assert comm.all_gather_object(1, None) == [1] and comm.recv(x, 0, None) is x
    comm.send(x, 0, None)()
    comm.barrier(None)
    assert comm.counter.sent == comm.counter.received == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the clock waits for CUDA work only")
def test_the_clock_waits_for_queued_device_work():
    device = torch.device("cuda", torch.cuda.current_device())
    t0 = clock(device)
    torch.cuda._sleep(200_000_000)  # queued: the host returns at once
    assert clock(device) - t0 > 0.02


# ---- the watchdog speaks before the process group gives up (finding 6) ------------------------
@pytest.mark.parametrize("timeout_s", [1, 10, 45, 60, 1800])
def test_the_process_group_timeout_leaves_the_watchdog_time_to_speak(timeout_s):
    """NCCL aborts the process at the group's timeout and nothing prints after: the watchdog's
    deadline (a neighbour silent SILENT_S, seen within a beat) must come first, with margin."""
    pg = watchdog.process_group_timeout(timeout_s)
    assert pg >= timeout_s
    assert watchdog.SILENT_S + watchdog.BEAT_S + watchdog.MARGIN_S <= pg
    assert watchdog.SILENT_S > 3 * 2  # far from a live rank's beat (BEAT_S) and the 3 s staleness


def _pair(silent_s: float):
    """Ranks 0 and 1 beating into one in-process store; rank 0's reports land in a list."""
    import torch.distributed as dist

    store, said = dist.HashStore(), []
    zero = watchdog.Heartbeat(0, 2, interval=0.05, silent_s=silent_s, store=store, on_silent=said.append)
    one = watchdog.Heartbeat(1, 2, interval=0.05, silent_s=silent_s, store=store, on_silent=lambda line: None)
    return zero.start(), one.start(), said


def _wait(predicate, seconds: float):
    deadline = time.monotonic() + seconds
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_the_watchdog_names_a_neighbour_that_stopped_beating():
    zero, one, said = _pair(silent_s=0.5)
    try:
        time.sleep(1.0)
        assert said == []  # both beat: no report
        one.stop()  # dies: no last beat
        t0 = time.monotonic()
        _wait(lambda: said, 5)
        assert said and said[0].startswith("rank 0: stopping because rank 1 stopped responding (no heartbeat for")
        assert 0.4 < time.monotonic() - t0 < 3.0
    finally:
        zero.close(), one.close()


def test_the_watchdog_leaves_a_rank_that_ended_normally_alone():
    zero, one, said = _pair(silent_s=0.3)
    try:
        one.close()  # ends normally: its last beat says so
        time.sleep(1.2)
        assert said == [] and zero._thread.is_alive()
        assert zero.silent_ranks() == []
    finally:
        zero.close()
    assert not zero._thread.is_alive()


_SILENT_HANG = """
import os, sys, time
import torch, torch.distributed as dist
from toolkit.distributed.launcher import init_process_group
from toolkit.distributed.watchdog import start_heartbeat
init_process_group(10)
backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
print("pg timeout", backend.options._timeout.total_seconds(), file=sys.stderr, flush=True)
start_heartbeat(dist.get_rank(), 2)
if dist.get_rank() == 1:
    time.sleep(1.0)
    os._exit(9)  # gone without a last beat, as after SIGKILL
time.sleep(120)  # stands for a wait inside NCCL: nothing raises, no Python runs on this thread
"""


def test_a_survivor_that_never_hears_of_the_death_names_the_dead_rank(tmp_path):
    """Under NCCL the survivor of a dead peer waits inside CUDA until NCCL aborts it, silently:
    the beating thread must print the line and end the rank, long before the group's timeout."""
    import os
    import subprocess
    import sys

    from helpers import REPO, free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", _SILENT_HANG], cwd=REPO, env={**env, "RANK": str(r),
                              "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True) for r in range(2)]
    t0 = time.monotonic()
    _out, err = procs[0].communicate(timeout=90)
    elapsed = time.monotonic() - t0
    procs[1].wait(timeout=30)
    assert procs[0].returncode == 1, err
    assert "rank 0: stopping because rank 1 stopped responding (no heartbeat for" in err, err
    assert f"pg timeout {watchdog.process_group_timeout(10)}" in err, err  # 10 s asked, room left for the line
    assert elapsed < watchdog.process_group_timeout(10) + 10, elapsed  # imports included
