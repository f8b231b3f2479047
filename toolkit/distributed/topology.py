"""Process layout, built once: world = pp x ring x ulysses x tp, tp innermost.

Rank order (outermost to innermost): pp, ring, ulysses, tp. TP ranks are consecutive and
Ulysses groups are their neighbours, so both stay inside a node; the ring spans nodes.
Everything else asks a Topology for its group; nothing reads the environment later. The
layout was validated before (toolkit.config, by the planner's rules); this only builds it.

Process groups are made once per process: `dist.new_group` starts gloo threads and sockets
(NCCL communicators) that live until the group is destroyed, so a second model loaded in
the same process (a notebook, a server that reloads, a test rank) reuses the groups the
first one made for the same ranks instead of leaking another set.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .comm import Comm
from .dims import ParallelDims
from .launcher import init_process_group, launcher_env
from .placement import Placement, block_ranks, placements
from .watchdog import start_heartbeat

__all__ = ["ParallelDims", "Topology"]


_GROUPS: dict = {}  # "world" -> the default group they belong to; tuple(ranks) -> group


def _group_of(ranks: list[int]):
    """The process group of these global ranks, made on first use in this process group.

    new_group is collective: every rank asks for every group in the same order, and every
    rank has made the same groups before (all run the same program), so either all of them
    create it here or none does. A new default group (destroyed and initialised again)
    starts afresh: its subgroups died with the old one.
    """
    world = dist.group.WORLD
    if _GROUPS.get("world") is not world:
        _GROUPS.clear()
        _GROUPS["world"] = world  # held, so a later default group cannot reuse its id
    key = tuple(ranks)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]


def groups_made() -> int:
    """How many process groups this process has made for topologies (tests hold it flat)."""
    return len(_GROUPS) - ("world" in _GROUPS)


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
        self.comm = Comm(self.device, stage_through_host=gloo_on_gpu)
        self.heartbeat = None
        self.block = (dims.ulysses * dims.ring, 0)  # (SP ranks, first SP rank) requests here span: all

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
                    group = _group_of(ranks) if len(ranks) > 1 else None
                    if rank in ranks:
                        topo.groups[dim] = group
            topo.heartbeat = start_heartbeat(rank, world)
        return topo

    def group(self, dim: str):
        return self.groups.get(dim)

    def placed(self, placement: Placement) -> "Topology":
        """The topology a request placed on `placement` sees (toolkit.distributed.placement): its
        block's groups and this rank's coordinates in it; the whole SP group's is this one. Every
        block's groups are made at the first call, on every rank (collective, once per process)."""
        if placement.degree == self.dims.sp:
            return self
        if not hasattr(self, "_placed"):
            self._placed = {}
            if self.dims.pp != 1:
                raise ValueError(f"elastic placement splits sequence-parallel ranks of one stage; this layout has "
                                 f"pp={self.dims.pp}: run it with pp=1, or without elastic placement")
            for p in placements(self.dims.ulysses, self.dims.ring)[:-1]:
                self._placed[p] = self._view(p)
        return self._placed[placement]

    def _view(self, p: Placement) -> "Topology":
        dims = ParallelDims(self.dims.tp, p.ulysses, p.ring, 1)
        view = Topology.__new__(Topology)
        view.__dict__.update(self.__dict__)
        inner = self.sp_rank - p.first
        view.dims, view.groups, view.block = dims, {"tp": self.groups.get("tp")}, (p.degree, p.first)
        view.coords = dict(self.coords, ulysses=inner % p.ulysses, ring=inner // p.ulysses)
        for first in range(0, self.dims.sp, p.degree):  # every block's groups, on every rank alike
            block = Placement(p.ulysses, p.ring, first)
            for sp_rank in block.members:
                for t in range(self.dims.tp):
                    for dim in ("ulysses", "ring", "sp"):
                        ranks = block_ranks(block, dim, self.dims.tp, t, sp_rank)
                        group = _group_of(ranks) if len(ranks) > 1 else None
                        if first == p.first and t == self.coords["tp"] and sp_rank == self.sp_rank:
                            view.groups[dim] = group
        if not p.first <= self.sp_rank < p.first + p.degree:
            view.groups = {}  # not one of its ranks: it never runs there
        return view

    @property
    def sp_rank(self) -> int:
        return self.coords["ring"] * self.dims.ulysses + self.coords["ulysses"]

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def world_group(self):
        return dist.group.WORLD if self.world > 1 else None
