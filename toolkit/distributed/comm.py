"""Thin collectives that take their group explicitly and count the bytes they move: the only
module of the package that calls a torch.distributed collective (tests/test_architecture.py).

Counts are logical payload bytes per rank (what this rank sends to / receives from other
ranks), so they can be checked exactly against closed forms. A group of None or of size 1
means "no communication": every op is the identity and counts nothing.

Control messages (pre-flight and memory figures, requests, documents, barriers) use the same
groups as the data, tensors on the run's device, not a second gloo group: the toolkit reuses
the group a launcher or accelerate made (often plain NCCL), gloo on a GPU cluster is one more
network to configure, and these messages are a few bytes. Before anything is sent, a tensor
on a device its group's backend cannot take is refused in one line naming the call. Object
collectives and barriers are not counted.
"""
from __future__ import annotations

import contextlib
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


class CommDeviceError(TypeError):
    """A tensor on a device its group's backend cannot take: a bug of the caller, found
    before anything is sent (NCCL would say "No backend type associated with device type cpu")."""


def backend_devices(group) -> tuple[str, set[str] | None]:
    """(backend name, device types it takes) of a process group: "nccl" -> {cuda}; a
    "cpu:gloo,cuda:nccl" group -> {cpu, cuda}; a backend torch does not list -> None (any)."""
    name = str(dist.get_backend(group))
    if ":" in name:
        return name, {pair.split(":")[0] for pair in name.split(",")}
    return name, set(dist.Backend.backend_capability.get(name, ())) or None


def check_devices(call: str, tag: str, group, tensors) -> None:
    """Refuse, in one line, a tensor the group's backend cannot take (meta: none can)."""
    name, takes = backend_devices(group)
    for t in tensors:
        kind = t.device.type
        if kind == "meta" or (takes is not None and kind not in takes):
            allowed = ", ".join(sorted(takes)) if takes else "real"
            raise CommDeviceError(f"Comm.{call}(tag={tag}): tensor on {kind} but the group's backend {name} takes "
                                  f"only {allowed} tensors: make it on the topology's device")


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


def world_group():
    """The default group when a multi-rank one exists, else None (no communication): for the
    control messages sent before a model, and its topology, exist."""
    initialised = dist.is_available() and dist.is_initialized()
    return dist.group.WORLD if initialised and dist.get_world_size() > 1 else None


def object_device(group, device: torch.device | None = None) -> torch.device:
    """Where an object collective's pickled bytes travel: the host if the backend takes host
    tensors, else this rank's CUDA device (the launcher made it current)."""
    _name, takes = backend_devices(group)
    if takes is None or "cpu" in takes:
        return torch.device("cpu")
    if device is not None and device.type != "cpu":
        return device
    return torch.device("cuda", torch.cuda.current_device())


def _current(device: torch.device):
    """torch's object collectives and NCCL barriers use the current CUDA device: make it ours."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def broadcast_object(obj, group, src_group_rank: int = 0, device: torch.device | None = None):
    """The group rank `src_group_rank`'s `obj` on every rank (pickled; None group: `obj`)."""
    if group_size(group) == 1:
        return obj
    box, where = [obj], object_device(group, device)
    with _current(where):
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, src_group_rank), group=group, device=where)
    return box[0]


def all_gather_object(obj, group, device: torch.device | None = None) -> list:
    """Every rank's `obj`, in group-rank order (pickled; None group: [obj])."""
    if group_size(group) == 1:
        return [obj]
    out = [None] * group_size(group)
    with _current(object_device(group, device)):
        dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group, device: torch.device | None = None) -> None:
    """Return when every rank of the group has called it (None group: at once)."""
    if group_size(group) == 1:
        return
    where = object_device(group, device)
    with _current(where):  # NCCL's barrier is an all-reduce on a device it would otherwise guess
        dist.barrier(group=group, **({"device_ids": [where.index]} if where.type == "cuda" else {}))


class Comm:
    """Collectives used by the attention strategies and the engine; one per topology.

    `device`: the run's device, where control messages travel when the backend takes no host
    tensors. `stage_through_host`: gloo sends only host memory, so ranks sharing one GPU over
    gloo (NCCL refuses two ranks on a device) copy ring and pipeline messages to the host and
    back. The topology sets both; the bytes counted are the same either way.
    """

    def __init__(self, device: torch.device | str = "cpu", stage_through_host: bool = False):
        self.device = torch.device(device)
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
        check_devices("all_to_all", tag, group, [x])
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
        check_devices("all_gather", tag, group, [x])
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
        check_devices("all_reduce", tag, group, [x])
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(x, op=ops[op], group=group)
        self.counter.add(tag, None, _nbytes(x), _nbytes(x))
        return x

    def broadcast(self, x: torch.Tensor, src_group_rank: int, group, tag: str = "broadcast", layer=None) -> torch.Tensor:
        p = group_size(group)
        if p == 1:
            return x
        check_devices("broadcast", tag, group, [x])
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
        check_devices("ring_shift", tag, group, tensors)
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

    # point to point (the pipeline's activations): x [...] to / from one rank of the group
    def send(self, x: torch.Tensor, dst_group_rank: int, group, tag: str = "send", layer=None):
        """Start sending x; -> wait(), to call before x may change (x is kept alive until then)."""
        if group_size(group) == 1:
            return lambda: None
        check_devices("send", tag, group, [x])
        wire = x.to("cpu", copy=True) if self.stage_through_host else x.contiguous()
        work = dist.isend(wire, dst=dist.get_global_rank(group, dst_group_rank), group=group)
        self.counter.add(tag, layer, _nbytes(x), 0)
        return lambda: (work.wait(), wire)[0]

    def recv(self, x: torch.Tensor, src_group_rank: int, group, tag: str = "recv", layer=None) -> torch.Tensor:
        """Fill x (its shape and dtype say what arrives) from one rank; returns when it has."""
        if group_size(group) == 1:
            return x
        check_devices("recv", tag, group, [x])
        wire = torch.empty(x.shape, dtype=x.dtype) if self.stage_through_host else x
        dist.recv(wire, src=dist.get_global_rank(group, src_group_rank), group=group)
        if wire is not x:
            x.copy_(wire)
        self.counter.add(tag, layer, 0, _nbytes(x))
        return x

    # control plane: pickled objects and barriers (not counted)
    def broadcast_object(self, obj, group, src_group_rank: int = 0):
        return broadcast_object(obj, group, src_group_rank, self.device)

    def all_gather_object(self, obj, group) -> list:
        return all_gather_object(obj, group, self.device)

    def barrier(self, group) -> None:
        barrier(group, self.device)
