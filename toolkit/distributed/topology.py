"""Process layout, built once: world = pp x ring x ulysses x tp, tp innermost.

Rank order (outermost to innermost): pp, ring, ulysses, tp. TP ranks are consecutive and
Ulysses groups are their neighbours, so both stay inside a node; the ring spans nodes.
Everything else asks a Topology for its group; nothing reads the environment later.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import Comm
from .watchdog import start_heartbeat


@dataclass(frozen=True)
class ParallelDims:
    tp: int = 1
    ulysses: int = 1
    ring: int = 1
    pp: int = 1

    def __post_init__(self):
        for name in ("tp", "ulysses", "ring", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} degree must be >= 1, got {getattr(self, name)}")

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        return self.tp * self.ulysses * self.ring * self.pp

    def coords(self, rank: int) -> dict:
        tp_rank = rank % self.tp
        ulysses_rank = (rank // self.tp) % self.ulysses
        ring_rank = (rank // (self.tp * self.ulysses)) % self.ring
        pp_rank = rank // (self.tp * self.ulysses * self.ring)
        return dict(tp=tp_rank, ulysses=ulysses_rank, ring=ring_rank, pp=pp_rank)

    def rank_of(self, tp=0, ulysses=0, ring=0, pp=0) -> int:
        return ((pp * self.ring + ring) * self.ulysses + ulysses) * self.tp + tp

    def group_ranks(self, dim: str) -> list[list[int]]:
        """All rank lists of the groups along dim ('tp', 'ulysses', 'ring', 'sp', 'pp')."""
        sizes = dict(tp=self.tp, ulysses=self.ulysses, ring=self.ring, pp=self.pp)
        groups = {}
        for rank in range(self.world):
            c = self.coords(rank)
            if dim == "sp":
                key = (c["tp"], c["pp"])
            else:
                key = tuple(v for k, v in c.items() if k != dim)
            groups.setdefault(key, []).append(rank)
        result = list(groups.values())
        expected = self.sp if dim == "sp" else sizes[dim]
        assert all(len(g) == expected for g in result)
        return result

    def check_nodes(self, ranks_per_node: int):
        """TP and Ulysses groups must not cross a node boundary (slow inter-node links)."""
        if ranks_per_node <= 0 or self.world <= ranks_per_node:
            return
        for dim, size in (("tp", self.tp), ("ulysses", self.tp * self.ulysses)):
            if size > ranks_per_node or ranks_per_node % size:
                what = "TP" if dim == "tp" else "TP x Ulysses"
                raise ValueError(
                    f"{what}={size} spans nodes of {ranks_per_node} ranks: keep TP and Ulysses "
                    f"within a node (a divisor of {ranks_per_node}) and use ring across nodes"
                )


def launcher_env() -> dict:
    """Rank facts from whichever launcher started us (deepspeed, torchrun, accelerate, none)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", str(world))))
    return dict(world=world, rank=rank, local_rank=local_rank, local_world=local_world)


def init_process_group(timeout_s: float = 1800.0) -> None:
    """Create the default group from the launcher env unless someone (accelerate) already did."""
    if dist.is_available() and dist.is_initialized():
        return
    facts = launcher_env()
    if facts["world"] == 1:
        return
    # LCTK_DIST_BACKEND=gloo lets several ranks share one GPU (NCCL refuses that): tests only
    backend = os.environ.get("LCTK_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(facts["local_rank"] % torch.cuda.device_count())
    dist.init_process_group(
        backend=backend, rank=facts["rank"], world_size=facts["world"],
        timeout=datetime.timedelta(seconds=timeout_s),
    )


class Topology:
    """Groups of one run. Construct with `Topology.build(dims)` on every rank (collective)."""

    def __init__(self, dims: ParallelDims, rank: int, world: int, local_rank: int, ranks_per_node: int):
        self.dims, self.rank, self.world = dims, rank, world
        self.local_rank, self.ranks_per_node = local_rank, ranks_per_node
        self.coords = dims.coords(rank)
        if torch.cuda.is_available() and world > 1:
            self.device = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.groups: dict = {}
        self.comm = Comm()
        self.heartbeat = None

    @classmethod
    def build(cls, dims: ParallelDims, timeout_s: float = 1800.0) -> "Topology":
        init_process_group(timeout_s)
        distributed = dist.is_available() and dist.is_initialized()
        facts = launcher_env()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if dims.world != world:
            raise ValueError(
                f"layout tp={dims.tp} x ulysses={dims.ulysses} x ring={dims.ring} x pp={dims.pp} "
                f"= {dims.world} ranks, but the world has {world}; the degrees must multiply to {world}"
            )
        ranks_per_node = min(facts["local_world"], world) if distributed else 1
        dims.check_nodes(ranks_per_node)
        topo = cls(dims, rank, world, facts["local_rank"], ranks_per_node)
        if distributed:
            for dim in ("tp", "ulysses", "ring", "sp", "pp"):
                for ranks in dims.group_ranks(dim):
                    # new_group is collective: every rank creates every group, same order.
                    group = dist.new_group(ranks) if len(ranks) > 1 else None
                    if rank in ranks:
                        topo.groups[dim] = group
            topo.heartbeat = start_heartbeat(rank, world)
        return topo

    def group(self, dim: str):
        return self.groups.get(dim)

    @property
    def sp_rank(self) -> int:
        return self.coords["ring"] * self.dims.ulysses + self.coords["ulysses"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def world_group(self):
        return dist.group.WORLD if self.world > 1 else None
