"""The GPU check's command-line rows: the real `lctk` commands under torchrun on the GPU.

Run as a script under torchrun, this file is launch/run.py with a process group made first,
as accelerate makes one: on a CUDA machine an NCCL group of the launcher's world (one rank
here), after one NCCL all-reduce of a device tensor that must give the world size. With one
rank every collective of the toolkit is an identity (a group of one moves nothing), so these
rows show the commands work on a GPU with an NCCL group present, not that our collectives
work on NCCL: no single-GPU machine can show that (NCCL refuses two ranks on one device).

    python -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_cli.py ask ...

Imported (by gpu_check.py), `run_step` makes the rows; it starts processes and reads their
JSON, and imports no torch, so the check's driver cannot hang on a GPU.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _nccl_group_then_cli(argv: list[str]) -> None:
    import os

    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    if not os.environ.get("LCTK_DIST_BACKEND") and not dist.is_initialized():
        cuda = torch.cuda.is_available()  # a dry run on CPU makes a gloo group of the same world
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": device} if cuda else {}))
        ones = torch.ones(4, device=device)
        dist.all_reduce(ones)
        if float(ones[0]) != dist.get_world_size():
            raise SystemExit(f"gpu_cli: an all-reduce of ones gave {float(ones[0])}, not {dist.get_world_size()}")
        print(f"gpu_cli: {dist.get_backend()} group of {dist.get_world_size()} made; an all-reduce on {device} "
              "checked out", file=sys.stderr)
    from toolkit.cli import main as lctk_main

    try:
        lctk_main(argv)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- the rows ---------------------------------------------------------------------------------
def _last_json(path) -> dict | None:
    for line in reversed(Path(path).read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


def _launch(name, argv, ranks, work, timeout, env=None, wrapper=True):
    """One torchrun launch -> (JSON of rank 0's stdout or None, why not, seconds)."""
    from benchmarks.gpu_rows import run_child, tail

    script = str(HERE / "gpu_cli.py") if wrapper else str(REPO / "launch" / "run.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", script, *argv]
    out, log = work / f"{name}.out", work / f"{name}.log"
    out.unlink(missing_ok=True)
    code, seconds = run_child(cmd, timeout, log, env=env, cwd=REPO, stdout=out)
    if code is None:
        return None, f"timed out after {timeout:.0f} s (log {log.name}: {tail(log)})", seconds
    if code != 0:
        return None, f"exit code {code}: {tail(log)}", seconds
    payload = _last_json(out)
    return payload, None if payload else f"no JSON on stdout ({tail(log)})", seconds


def _answers(payload) -> list:
    return [a["token_ids"] for a in payload["answers"]]


def _mib(n) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def run_step(rows, models: dict, work: Path, deadline, dry: bool, api_tokens=None) -> None:
    """The CLI rows. `deadline()` -> seconds left; `api_tokens`: the world-1 API's eager tokens for
    gpu_models.PROMPT (from the world1 step), which `generate --cuda-graph` must give."""
    from benchmarks import gpu_models

    work.mkdir(parents=True, exist_ok=True)
    doc = work / "lease.txt"
    doc.write_text(gpu_models.document(), encoding="utf-8")
    kv = work / "lease.kv"
    common = ["--model", models["chat-llama"], "--chunk-size", "256", "--max-new-tokens", "8", "--json"]
    asks = [str(doc)] + [a for q in gpu_models.QUESTIONS for a in ("-q", q)]
    backend = "gloo (dry run on CPU)" if dry else "NCCL"

    def budget(cap):
        return max(1.0, min(cap, deadline() - 5))

    first, why, s = _launch("ask-save", ["ask", *asks, *common, "--save-cache", str(kv)], 1, work, budget(120))
    if first is None:
        rows.add(f"CLI ask, torchrun 1 rank on {backend}, pre-flight on, --save-cache", "fail", why)
    else:
        ok = (first["cache"]["saved"] and all(len(t) == 8 for t in _answers(first))
              and (dry or (first.get("peak_device_bytes") or 0) > 0))
        rows.add(f"CLI ask, torchrun 1 rank on {backend}, pre-flight on, --save-cache", ok,
                 f"{first['document_tokens']} tokens prefilled in {first['prefill_s']:.2f} s; --json peaks: device "
                 f"{_mib(first.get('peak_device_bytes'))}, host {_mib(first.get('peak_host_rss_bytes'))}; {s:.0f} s",
                 layout=first.get("layout"))
    second, why, s = _launch("ask-load", ["ask", *asks, *common, "--cache", str(kv)], 1, work, budget(90))
    if second is None or first is None:
        rows.add("CLI ask --cache: the saved session loaded, same answers", "fail", why or "nothing saved to load")
    else:
        same = _answers(second) == _answers(first)
        rows.add("CLI ask --cache: the saved session loaded, same answers", bool(second["cache"]["loaded"] and same),
                 f"loaded {second['cache']['loaded']} in {second['cache_load_s']:.2f} s, answers equal: {same}; "
                 f"{s:.0f} s", why=second["cache"].get("why"))
    tp, why, s = _launch("ask-tp2", ["ask", *asks, *common, "--tp", "2"], 2, work, budget(120),
                         env={"LCTK_DIST_BACKEND": "gloo"}, wrapper=False)
    check = "CLI ask --tp 2: DeepSpeed AutoTP, 2 ranks sharing the device over gloo, answers of world 1"
    if tp is None or first is None:
        rows.add(check, "fail", why or "no world-1 answers to compare")
    else:
        same = _answers(tp) == _answers(first)
        rows.add(check, bool(same and tp["layout"]["tp"] == 2),
                 f"layout tp={tp['layout']['tp']}, answers equal: {same}; {s:.0f} s")
    graph = [] if dry else ["--cuda-graph"]
    gen, why, s = _launch("generate-graph", ["generate", "--prompt", gpu_models.PROMPT, *common[:2], "--max-new-tokens",
                                             "12", "--json", *graph], 1, work, budget(90))
    check = "CLI generate --cuda-graph on " + backend + ": the API's eager tokens"
    if dry:
        check = "CLI generate (dry run: no CUDA graph on CPU): the API's eager tokens"
    if gen is None:
        rows.add(check, "fail", why)
    elif api_tokens is None:
        rows.add(check, "fail", "the world1 step left no eager tokens to compare with")
    else:
        same = gen["token_ids"] == api_tokens
        rows.add(check, same, f"{len(gen['token_ids'])} tokens, equal: {same}; {s:.0f} s")


if __name__ == "__main__":
    _nccl_group_then_cli(sys.argv[1:])
