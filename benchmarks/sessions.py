"""Document sessions on the demo model, ring=2 on 2 ranks, a document of ~8K tokens:

- ask_ttft_vs_fresh: time to first token of a question asked of the session over that of a
  fresh generate of document + question (the same ids), medians of interleaved runs;
- cache_load_vs_prefill: loading the saved cache (a new session) over prefilling the document;
- cache_load_checksum_vs_none: that load, every rank file's checksum (xxh3-128) checked, over the same load
  without the check (interleaved; the cache is ~0.37 GB at this size, in the page cache);
- cache_disk_vs_kv_bytes: the saved directory's size over the closed-form K/V bytes
  (2 x layers x KV heads x head dim x tokens x dtype bytes).
"""
from __future__ import annotations

QUESTION = "Which supply ship was the latest, and by how many hours?"


def _document(tokenizer, tokens: int) -> str:
    from toolkit.sessions.session import document_ids
    from toolkit.summarize.synthetic import station_logbook

    days = 10
    while len(document_ids(tokenizer, station_logbook(days=days + 10), True)) <= tokens:
        days += 10
    return station_logbook(days=days)


def on_rank(folder: str, tokens: int, repeats: int, work: str) -> dict:
    import shutil
    import time
    from pathlib import Path

    from toolkit import LongContextModel
    from toolkit.models import head_dim as model_head_dim


    lcm = LongContextModel.from_pretrained(folder, ring=2, preflight=False)
    text = _document(lcm.tokenizer, tokens)
    session = lcm.prefill_document(text)
    ids = session.ids + session.question_ids(QUESTION)
    fresh, asked = [], []
    for _ in range(repeats):  # interleaved: drift hits both alike
        fresh.append(lcm.generate(ids, max_new_tokens=1).timings["prefill_s"])
        asked.append(session.ask(QUESTION, max_new_tokens=1).timings["ttft_s"])
    path = Path(work) / "doc.kv"
    session.save(path)
    prefills, loads, unverified = [session.prefill_s], [], []
    lcm.load_document(path)  # the files into the page cache: both kinds of load then read memory
    for i in range(repeats):
        t0 = time.perf_counter()
        lcm.load_document(path)
        loads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        lcm.load_document(path, verify=False)
        unverified.append(time.perf_counter() - t0)
        if i < repeats - 1:
            prefills.append(lcm.prefill_document(text).prefill_s)
    # rank 0's figures are the ones reported, and rank 0 removes the folder: only it measures it
    disk = sum(p.stat().st_size for p in path.iterdir()) if lcm.topo.is_main else 0
    cfg = lcm.config
    head_dim = model_head_dim(cfg)
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * session.tokens * 4
    if lcm.topo.is_main:
        shutil.rmtree(path, ignore_errors=True)
    return {"tokens": session.tokens, "fresh_ttft_s": fresh, "ask_ttft_s": asked, "prefill_s": prefills,
            "load_s": loads, "unverified_load_s": unverified, "disk_bytes": disk, "kv_bytes": kv}


def sessions(ranks, folder: str, tokens: int, repeats: int) -> tuple[dict, list]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="lctk-bench-sessions-") as work:
        got = ranks.run(on_rank, folder, tokens, repeats, work, timeout=1800)[0]
    from .measure import median

    metrics = {"ask_ttft_vs_fresh": median(got["ask_ttft_s"]) / median(got["fresh_ttft_s"]),
               "cache_load_vs_prefill": median(got["load_s"]) / median(got["prefill_s"]),
               "cache_load_checksum_vs_none": median(got["load_s"]) / median(got["unverified_load_s"]),
               "cache_disk_vs_kv_bytes": got["disk_bytes"] / got["kv_bytes"]}
    return metrics, [dict(got, bench="sessions", layout="ring2", model="SmolLM2-135M-Instruct", **metrics)]
