"""Thin collectives that take their group explicitly and count the bytes they move.

Counts are logical payload bytes per rank (what this rank sends to / receives from other
ranks), so they can be checked exactly against closed forms. A group of None or of size 1
means "no communication": every op is the identity and counts nothing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class CommCounter:
    """Bytes sent/received by this rank, in total and per (tag, layer); collectives per (tag, layer)."""

    sent: int = 0
    received: int = 0
    by_key: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0]))
    calls: dict = field(default_factory=lambda: defaultdict(int))

    def add(self, tag: str, layer, sent: int, received: int):
        self.sent += sent
        self.received += received
        entry = self.by_key[(tag, layer)]
        entry[0] += sent
        entry[1] += received
        self.calls[(tag, layer)] += 1

    def reset(self):
        self.sent = self.received = 0
        self.by_key.clear()
        self.calls.clear()

    def per_layer(self, tag: str | None = None) -> dict:
        """{layer: [sent, received]} summed over tags (or for one tag)."""
        out = defaultdict(lambda: [0, 0])
        for (t, layer), (s, r) in self.by_key.items():
            if tag is None or t == tag:
                out[layer][0] += s
                out[layer][1] += r
        return dict(out)


class Comm:
    """Collectives used by the attention strategies; one per topology.

    `stage_through_host`: gloo sends only host memory, so ranks sharing one GPU over gloo
    (NCCL refuses two ranks on a device) copy ring messages to the host and back. The
    topology sets it; the bytes counted are the same either way.
    """

    def __init__(self, stage_through_host: bool = False):
        self.counter = CommCounter()
        self.stage_through_host = stage_through_host

    @staticmethod
    def size(group) -> int:
        return group_size(group)

    @staticmethod
    def rank(group) -> int:
        return group_rank(group)

    # all-to-all over the first dim, split evenly: x [P*m, ...] -> [P*m, ...]
    def all_to_all(self, x: torch.Tensor, group, tag: str = "all_to_all", layer=None) -> torch.Tensor:
        p = group_size(group)
        if p == 1:
            return x
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        moved = _nbytes(x) * (p - 1) // p
        self.counter.add(tag, layer, moved, moved)
        return out

    # x [...] on every rank -> [P, ...] stacked in group-rank order
    def all_gather(self, x: torch.Tensor, group, tag: str = "all_gather", layer=None) -> torch.Tensor:
        p = group_size(group)
        if p == 1:
            return x.unsqueeze(0)
        x = x.contiguous()
        out = torch.empty((p, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group) if x.is_cuda else dist.all_gather(list(out.unbind(0)), x, group=group)
        self.counter.add(tag, layer, _nbytes(x) * (p - 1), _nbytes(x) * (p - 1))
        return out

    def all_reduce(self, x: torch.Tensor, group, op: str = "sum", tag: str = "all_reduce") -> torch.Tensor:
        """x reduced in place over the group (op: sum, min or max)."""
        p = group_size(group)
        if p == 1:
            return x
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(x, op=ops[op], group=group)
        self.counter.add(tag, None, _nbytes(x), _nbytes(x))
        return x

    def broadcast(self, x: torch.Tensor, src_group_rank: int, group, tag: str = "broadcast", layer=None) -> torch.Tensor:
        p = group_size(group)
        if p == 1:
            return x
        x = x.contiguous()
        dist.broadcast(x, src=dist.get_global_rank(group, src_group_rank), group=group)
        me = group_rank(group)
        self.counter.add(tag, layer, _nbytes(x) * (p - 1) if me == src_group_rank else 0,
                         0 if me == src_group_rank else _nbytes(x))
        return x

    def ring_shift(self, tensors: list[torch.Tensor], group, tag: str = "ring", layer=None,
                   shift: int = 1, recv_shapes=None):
        """Start sending `tensors` to rank+shift and receiving from rank-shift.

        Received buffers have the shapes of `tensors` unless `recv_shapes` says otherwise
        (cache shards differ in length by a few tokens; the receiver knows by how much).
        Returns (handle, received buffers); call handle() to wait. Posting before compute is
        what lets the transfer hide under the current block's attention.
        """
        p = group_size(group)
        if p == 1:
            return (lambda: None), tensors
        me = group_rank(group)
        dst = dist.get_global_rank(group, (me + shift) % p)
        src = dist.get_global_rank(group, (me - shift) % p)
        sends = [t.contiguous() for t in tensors]
        shapes = recv_shapes or [t.shape for t in sends]
        recvs = [torch.empty(shape, dtype=t.dtype, device=t.device) for t, shape in zip(sends, shapes)]
        wire_sends, wire_recvs = sends, recvs
        if self.stage_through_host:
            wire_sends = [t.to("cpu", copy=True) for t in sends]
            wire_recvs = [torch.empty(t.shape, dtype=t.dtype) for t in recvs]
        ops = [dist.P2POp(dist.isend, t, dst, group) for t in wire_sends]
        ops += [dist.P2POp(dist.irecv, t, src, group) for t in wire_recvs]
        reqs = dist.batch_isend_irecv(ops)
        self.counter.add(tag, layer, sum(map(_nbytes, sends)), sum(map(_nbytes, recvs)))

        def wait():
            for r in reqs:
                r.wait()
            if wire_recvs is not recvs:
                for target, host in zip(recvs, wire_recvs):
                    target.copy_(host)

        return wait, recvs
