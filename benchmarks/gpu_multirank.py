"""The GPU check's multi-rank rows: W ranks sharing the one device, started by torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node W benchmarks/gpu_multirank.py \
        --rows FILE --root DIR [--dry-run]

NCCL refuses two ranks on one device, so the process group is gloo, with the ranks' tensors
on cuda:0 (gloo moves CUDA tensors in its collectives; the toolkit stages ring sends through
host memory on such a group). The toolkit makes the group itself, through its own launcher
code; what it asks for is recorded and "nccl" is swapped for "gloo", so each group's intended
backend is known. Every collective the toolkit (or DeepSpeed) issues is then audited: a host
tensor in a collective over a group meant to be NCCL is what stops every multi-GPU run at
load (NCCL takes device tensors only), and fails the audit row with its caller. Ring
send/recv is staged through host here by design and is not audited.

Rows, each held to the single-process transformers model on the same device (logits within
LOGITS_ATOL, the same greedy tokens): world 2: AutoTP tp=2 (DeepSpeed), Ulysses 2, ring 2
pass-KV zigzag and pass-Q contiguous, a sliding-window model on ring 2, and a wide Mixtral's
loading at tp=2: its largest CUDA allocation over its expert share (every expert whole on
every rank: 2; each rank's share only: 1); world 4: Ulysses 2 x ring 2, ring 4, Ulysses 4
(KV heads replicated), tp 2 x ring 2. Then the audit.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LOGITS_ATOL = {"cpu": 1e-4, "cuda": 1e-3}  # fp32; GPU kernels reorder sums (~1e-4); a bug moves ~1e-1
NEW_TOKENS = 6
CASES = {
    2: [("chat-llama", dict(tp=2)), ("chat-llama", dict(ulysses=2)),
        ("chat-llama", dict(ring=2, ring_mode="pass-kv", sequence_layout="zigzag")),
        ("chat-llama", dict(ring=2, ring_mode="pass-q", sequence_layout="contiguous")),
        ("swa-mistral", dict(ring=2, ring_mode="pass-kv"))],
    4: [("chat-llama", dict(ulysses=2, ring=2, ring_mode="pass-kv")), ("chat-llama", dict(ring=4)),
        ("chat-llama", dict(ulysses=4)), ("chat-llama", dict(tp=2, ring=2))],
}
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_to_all_single", "all_to_all", "broadcast",
               "reduce", "reduce_scatter_tensor", "gather", "scatter")


def _as_gloo(backend) -> str:
    return "gloo" if backend is None else str(backend).replace("nccl", "gloo")


class Audit:
    """Records what each process group was asked to be, makes it gloo, and watches collectives."""

    def __init__(self):
        import torch
        import torch.distributed as dist

        self.asked, self.calls, self.findings = {}, 0, {}
        real_init, real_new = dist.init_process_group, dist.new_group

        def init_process_group(backend=None, *args, **kwargs):
            self.asked["world"] = "cpu:gloo,cuda:nccl" if backend is None else str(backend)
            kwargs.pop("device_id", None)  # NCCL's eager init: not for the gloo group made instead
            return real_init(_as_gloo(backend), *args, **kwargs)

        def new_group(*args, **kwargs):
            asked = kwargs.get("backend", args[2] if len(args) > 2 else None)
            if asked is not None:
                kwargs["backend"] = _as_gloo(asked)
                args = args[:2]
            group = real_new(*args, **kwargs)
            self.asked[id(group)] = str(asked) if asked is not None else self.asked.get("world", "")
            return group

        def watch(name, real):
            def collective(*args, **kwargs):
                self.see(name, args, kwargs, torch)
                return real(*args, **kwargs)
            return collective

        dist.init_process_group, dist.new_group = init_process_group, new_group
        for name in COLLECTIVES:
            setattr(dist, name, watch(name, getattr(dist, name)))

    def see(self, name, args, kwargs, torch):
        caller = _caller()
        if caller is None:  # this harness's own collectives
            return
        self.calls += 1
        tensors = [x for x in list(args) + list(kwargs.values()) for x in (x if isinstance(x, (list, tuple)) else [x])
                   if torch.is_tensor(x)]
        group = kwargs.get("group")
        world = group is None or group is torch.distributed.group.WORLD
        asked = self.asked.get("world" if world else id(group), self.asked.get("world", ""))
        takes_host = asked in ("", "gloo") or "cpu:gloo" in asked
        if any(t.device.type == "cpu" for t in tensors) and not takes_host:
            self.findings[caller] = f"{name} of a host tensor on a group asked to be {asked}"


def _caller() -> str | None:
    """Where a collective came from: the innermost frame of the toolkit or DeepSpeed, and when
    that is the toolkit's Comm, the toolkit code that called it (the place to fix)."""
    found = []
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename.replace(os.sep, "/")
        for root in ("/toolkit/", "/deepspeed/"):
            if root in path:
                found.append(f"{root.strip('/')}/{path.split(root, 1)[1]}:{frame.lineno} {frame.name}")
                break
        if found and not found[-1].startswith("toolkit/distributed/comm.py"):
            break
    if not found:
        return None  # this harness's own collectives
    return found[-1] if len(found) == 1 else f"{found[-1]} (through {found[0]})"


def _free():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reference(folder: str, device, cache={}):  # noqa: B006 - per-process cache of the truth
    import torch

    from benchmarks import gpu_models
    from benchmarks.models import load

    if folder not in cache:
        model = load(folder, "sdpa").to(device)
        ids = gpu_models.prompt_ids().to(device)
        with torch.no_grad():
            logits = model(ids, logits_to_keep=1).logits[0, -1].float().cpu()
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        cache[folder] = (logits, out[0, ids.shape[1]:].tolist())
        del model
        _free()
    return cache[folder]


def layout_case(folder: str, case: dict, device) -> dict:
    from benchmarks import gpu_models
    from toolkit import LongContextModel

    want_logits, want_tokens = reference(folder, device)
    lcm = LongContextModel.from_pretrained(folder, chunk_size=64, timeout_s=120, **case)  # pre-flight on
    ids = gpu_models.prompt_ids()
    err = float((lcm.prefill(ids).float().cpu() - want_logits).abs().max())
    same = lcm.generate(ids, NEW_TOKENS).token_ids == want_tokens
    lcm.memory_peaks()  # what every --json report calls: collective
    on = str(lcm.topo.device)
    del lcm
    _free()
    return {"err": err, "same": same, "device": on}


def mixtral_loading(folder: str, device) -> dict:
    """Largest CUDA allocation while loading at tp=2 over this rank's largest expert tensor."""
    import torch

    from toolkit import LongContextModel

    if device.type != "cuda":
        return {"skip": "CPU dry run: the CUDA allocator's records exist on a GPU only"}
    torch.cuda.synchronize()
    _free()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        torch.cuda.memory._record_memory_history(max_entries=200000)
        recording = True
    except Exception:  # noqa: BLE001 - an allocator without the recorder: the peak ratio alone
        recording = False
    lcm = LongContextModel.from_pretrained(folder, tp=2, timeout_s=120)
    torch.cuda.synchronize()
    largest = None
    if recording:
        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        sizes = [e["size"] for trace in snap.get("device_traces", []) for e in trace if e.get("action") == "alloc"]
        largest = max(sizes) if sizes else None
    experts = [p for n, p in lcm.model.named_parameters() if "experts" in n]
    share = max(p.numel() * p.element_size() for p in experts)
    c = lcm.config  # the fused gate_up_proj of one layer, whole: [E, 2I, H]
    whole = c.num_local_experts * 2 * c.intermediate_size * c.hidden_size * experts[0].element_size()
    result = {"largest": largest, "share": share, "whole": whole, "peak": torch.cuda.max_memory_allocated() - base,
              "final": torch.cuda.memory_allocated() - base}
    del lcm
    _free()
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", required=True)
    ap.add_argument("--root", required=True)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    audit = Audit()  # before the toolkit makes any group
    import torch
    import torch.distributed as dist

    from benchmarks.gpu_rows import Rows, one_line
    from toolkit.distributed.launcher import init_process_group

    init_process_group(120.0)  # the toolkit's own: what it asks for is what a launch on GPUs asks for
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    rows = Rows(args.rows, f"ranks{world}") if rank == 0 else None
    models = {name: str(Path(args.root) / name) for name in ("chat-llama", "swa-mistral", "wide-mixtral")}
    bodies = [(f"{name} {case}", lambda n=name, c=case: layout_case(models[n], c, device)) for name, case in CASES[world]]
    if world == 2:
        bodies.append(("mixtral loading", lambda: mixtral_loading(models["wide-mixtral"], device)))
    for label, body in bodies:
        try:
            found, why = body(), None
        except Exception as err:  # noqa: BLE001 - a row, then the next body
            traceback.print_exc()
            found, why = None, one_line(err)
        every = [None] * world
        dist.all_gather_object(every, (found, why))
        if rank == 0:
            _row(rows, label, every, device)
    findings = [None] * world
    dist.all_gather_object(findings, (audit.calls, audit.findings, audit.asked.get("world")))
    if rank == 0:
        bad = {k: v for _, f, _ in findings for k, v in f.items()}
        calls = sum(c for c, _, _ in findings)
        rows.add(f"collectives of {world} ranks carry tensors their group's backend takes (asked: {findings[0][2]})",
                 not bad, f"{calls} collectives audited; " + ("; ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
                                                             if bad else "no host tensor on an NCCL group"))
    dist.destroy_process_group()


def _row(rows, label: str, every: list, device):
    errors = [why for _, why in every if why]
    name = label.replace("{", "").replace("}", "").replace("'", "")
    if errors:
        rows.add(name, "fail", errors[0])
        return
    found = [f for f, _ in every]
    if label == "mixtral loading":
        check = "wide Mixtral loaded at tp=2: largest CUDA allocation over the rank's expert share"
        if "skip" in found[0]:
            rows.add(check, "skip", found[0]["skip"])
            return
        ratio_peak = max(f["peak"] / f["final"] for f in found)
        if found[0]["largest"] is None:
            rows.add(check, ratio_peak <= 1.25, f"no allocation records; peak while loading over the loaded share "
                     f"{ratio_peak:.2f}")
            return
        ratio = max(f["largest"] / f["share"] for f in found)
        halved = all(f["share"] <= f["whole"] / 2 * 1.01 for f in found)  # else a rank kept experts whole
        rows.add(check, ratio <= 1.01 and halved, f"{ratio:.2f} (largest {max(f['largest'] for f in found) / 2**20:.0f} "
                 f"MiB; share {found[0]['share'] / 2**20:.0f} MiB of {found[0]['whole'] / 2**20:.0f}); peak while "
                 f"loading over what stays {ratio_peak:.2f}")
        return
    err = max(f["err"] for f in found)
    same = all(f["same"] for f in found)
    tol = LOGITS_ATOL[device.type]
    rows.add(f"{name}: the single-process model's logits and tokens", err <= tol and same,
             f"largest logit difference {err:.1e} (tolerance {tol:.0e}), {NEW_TOKENS} tokens equal: {same}, "
             f"on {found[0]['device']}")


if __name__ == "__main__":
    main()
