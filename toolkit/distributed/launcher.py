"""What the launcher (deepspeed, torchrun, accelerate, or none) told this process, and the
default process group made from it. The only module that reads launcher variables."""
from __future__ import annotations

import datetime
import os
import signal
import sys
import time

from ..settings import backend_override
from .watchdog import process_group_timeout


def launcher_env() -> dict:
    """Rank facts from whichever launcher started us. `deepspeed_local_size` is the deepspeed
    launcher's LOCAL_SIZE (its CPU all-reduce kernel is set up only when that is the world)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", str(world))))
    local_size = env.get("LOCAL_SIZE")
    return dict(world=world, rank=rank, local_rank=local_rank, local_world=local_world,
                deepspeed_local_size=int(local_size) if local_size else None)


def is_main() -> bool:
    """Rank 0 of the job: the process group's rank once it exists, else the launcher's RANK.
    torch is not imported for this: `lctk --help` stays fast."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    return launcher_env()["rank"] == 0


def init_process_group(timeout_s: float = 1800.0) -> None:
    """Create the default group from the launcher env unless someone (accelerate) already did.
    Either way this rank's GPU becomes the current CUDA device: NCCL's object collectives and
    barriers use it. The group's timeout leaves the watchdog time to name a silent rank first."""
    import torch
    import torch.distributed as dist

    facts = launcher_env()
    if "LOCAL_RANK" in os.environ:  # a launcher started us (torchrun, deepspeed, accelerate)
        end_with_launcher()
    if facts["world"] > 1 and torch.cuda.is_available():
        torch.cuda.set_device(facts["local_rank"] % torch.cuda.device_count())
    if (dist.is_available() and dist.is_initialized()) or facts["world"] == 1:
        return
    backend = backend_override() or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend=backend, rank=facts["rank"], world_size=facts["world"],
                            timeout=datetime.timedelta(seconds=process_group_timeout(timeout_s)))


def end_with_launcher() -> bool:
    """This rank is killed when the process that started it ends, however it ends: a launcher
    killed with SIGKILL (the OOM killer, a scheduler) cannot stop its ranks, which run in
    sessions of their own, and a served model's rank 0 would go on answering on its port.
    Linux's parent-death signal does it; SIGKILL, since a serving rank ignores SIGTERM.
    -> whether it is set (Linux only; elsewhere the launcher's own clean-up is all there is)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(1, int(signal.SIGKILL), 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
        return False
    if os.getppid() != parent:  # the launcher died between the two reads
        os._exit(1)
    _watch_deepspeed_runner(parent)
    return True


def _watch_deepspeed_runner(parent: int) -> None:
    """Under the deepspeed launcher a rank's parent is its per-node `deepspeed.launcher.launch`
    process, which outlives a SIGKILLed `deepspeed` runner: watch the runner too, once a second."""
    import threading

    import psutil

    try:
        launch = psutil.Process(parent)
        if "deepspeed.launcher.launch" not in " ".join(launch.cmdline()):
            return
        runner = launch.parent()
    except psutil.Error:
        return
    if runner is None or runner.pid == 1:
        return

    def alive() -> bool:  # is_running compares the start time too (a reused pid is not the runner)
        try:
            return runner.is_running() and runner.status() != psutil.STATUS_ZOMBIE  # dead, not yet reaped
        except psutil.Error:
            return False

    def watch():
        while alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="lctk-runner-watch", daemon=True).start()
