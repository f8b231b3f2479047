"""Process layout, built once: world = pp x ring x ulysses x tp, tp innermost.

Rank order (outermost to innermost): pp, ring, ulysses, tp. TP ranks are consecutive and
Ulysses groups are their neighbours, so both stay inside a node; the ring spans nodes.
Everything else asks a Topology for its group; nothing reads the environment later. The
layout was validated before (toolkit.config, by the planner's rules); this only builds it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..planner.rules import ParallelDims
from .comm import Comm
from .launcher import init_process_group, launcher_env
from .watchdog import start_heartbeat

__all__ = ["ParallelDims", "Topology"]


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
        gloo_on_gpu = self.device.type == "cuda" and world > 1 and dist.get_backend() == "gloo"
        self.comm = Comm(stage_through_host=gloo_on_gpu)
        self.heartbeat = None

    @classmethod
    def build(cls, dims: ParallelDims, timeout_s: float = 1800.0) -> "Topology":
        init_process_group(timeout_s)
        distributed = dist.is_available() and dist.is_initialized()
        facts = launcher_env()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        if dims.world != world:  # toolkit.config validated the layout for this world
            raise RuntimeError(f"layout {dims.label()} was made for {dims.world} ranks, but the world has {world}")
        ranks_per_node = min(facts["local_world"], world) if distributed else 1
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
