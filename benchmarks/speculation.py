"""Speculation (toolkit.engine.speculation) on the demo model, ratios measured in one run:

- speculate_quote_auto_vs_off: decode tokens/s with --speculate auto over off, for answers that
  quote a ~4K-token document and a summary of it (one document session: the document prefilled
  once, each question asked both ways, interleaved), world 1;
- speculate_quote_ring2_auto_vs_off: the same on 2 ranks at ring=2;
- speculate_vs_hf_prompt_lookup: ours (auto) over transformers' generate(prompt_lookup_num_tokens=K)
  on the same prompts and token counts (its decode time: a whole generate less a one-token one;
  K its best of 3 and 10), decode tokens/s, world 1;
- speculate_story_auto_vs_off: free text that copies nothing (a story), auto over off, world 1;
- speculate_acceptance (guesses kept / guesses checked) and speculate_tokens_per_step (tokens a
  decode step gave), for the quoting answers with auto: reported;
- speculate_quote_answer_auto_vs_off and speculate_summary_answer_auto_vs_off: the first figure
  for each of its two answers alone, and speculate_summary_tokens_per_step: reported (the
  summary the demo model writes copies little, which is what bounds the first figure).
Every answer's tokens are held equal both ways (greedy), or its figure is not reported.
"""
from __future__ import annotations

QUESTIONS = ["Copy the logbook's entries for the first three days exactly, word for word.",
             "Summarize the logbook in a few sentences."]
STORY = "Write a short story about a lighthouse keeper who finds a lost cat during a storm."
HF_K = (3, 10)


def _document(tokenizer, tokens: int) -> str:
    from toolkit.summarize.synthetic import station_logbook

    days = 10
    while len(tokenizer(station_logbook(days=days)).input_ids) < tokens:
        days += 5
    return station_logbook(days=days)


def _rate(results) -> float:
    """Decode tokens/s over answers: the tokens after each first one, over their decode time."""
    return sum(len(r.token_ids) - 1 for r in results) / sum(r.timings["decode_s"] for r in results)


def _guessing(results) -> tuple[int, int, int]:
    """(guesses checked, guesses kept, tokens) over answers made with auto."""
    stats = [r.timings.get("speculation", {}) for r in results]
    return (sum(s.get("drafted", 0) for s in stats), sum(s.get("accepted", 0) for s in stats),
            sum(len(r.token_ids) for r in results))


def tokens_per_step(results) -> float:
    """Tokens a decode step gave over these answers (each kept guess is a token without a step)."""
    _, kept, tokens = _guessing(results)
    return tokens / max(tokens - kept, 1)


def quote_on_rank(folder: str, layout: dict, threads: int, doc_tokens: int, new: int, repeats: int,
                  story: bool = False) -> dict:
    import torch

    from toolkit import LongContextModel

    from .measure import median

    torch.set_num_threads(threads)
    lcm = LongContextModel.from_pretrained(folder, preflight=False, **layout)
    session = lcm.prefill_document(_document(lcm.tokenizer, doc_tokens))
    got: dict = {"document_tokens": session.tokens, "off": [], "auto": [], "same_tokens": True}
    session.ask(QUESTIONS[0], 4)  # warm-up
    for _ in range(repeats):
        for mode in ("off", "auto"):
            got[mode].append([session.ask(q, new, speculate=mode) for q in QUESTIONS])
    answers = {mode: [[r.token_ids for r in run] for run in got[mode]] for mode in ("off", "auto")}
    got["same_tokens"] = all(a == answers["off"][0] for a in answers["off"] + answers["auto"])
    guessed = [r for run in got["auto"] for r in run]
    checked, kept, _ = _guessing(guessed)
    out = {"document_tokens": session.tokens, "same_tokens": got["same_tokens"],
           "off_tokens_per_s": [_rate(run) for run in got["off"]],
           "auto_tokens_per_s": [_rate(run) for run in got["auto"]],
           "by_answer": {mode: [[_rate([run[i]]) for run in got[mode]] for i in range(len(QUESTIONS))]
                         for mode in ("off", "auto")},
           "answer_tokens": [len(a) for a in answers["off"][0]], "guesses_checked": checked, "guesses_kept": kept,
           "acceptance": kept / checked if checked else 0.0,
           "tokens_per_step": tokens_per_step(guessed),
           "summary_tokens_per_step": median([tokens_per_step([run[1]]) for run in got["auto"]])}
    if story:
        runs = {"off": [], "auto": []}
        for _ in range(repeats):
            for mode in runs:
                runs[mode].append(lcm.generate(STORY, new, chat=True, speculate=mode))
        out["story_same_tokens"] = len({tuple(r.token_ids) for rs in runs.values() for r in rs}) == 1
        out["story_off_tokens_per_s"] = [_rate([r]) for r in runs["off"]]
        out["story_auto_tokens_per_s"] = [_rate([r]) for r in runs["auto"]]
        out["story_tokens"] = len(runs["off"][0].token_ids)
        out["hf"] = hf_prompt_lookup(folder, lcm, session, new)
    return out


def hf_prompt_lookup(folder: str, lcm, session, new: int) -> dict:
    """transformers' generate with prompt lookup on the same prompts (document and question), each
    question at each K: decode tokens/s, its time to the first token (a run of one new token, run
    just before) taken off; and whether its tokens are ours. (Handing generate a cache prefilled
    with the document gives wrong tokens with prompt lookup in this transformers, so it prefills.)"""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = {q: session.ask(q, new, speculate="auto") for q in QUESTIONS}
    rates, same = {}, True
    for k in HF_K:
        tokens = seconds = 0.0
        for q in QUESTIONS:
            ids = torch.tensor([session.ids + session.question_ids(q)])
            with torch.no_grad():
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=1, do_sample=False)
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = hf.generate(ids, max_new_tokens=new, do_sample=False, prompt_lookup_num_tokens=k)
                seconds += time.perf_counter() - t0 - first
            answer = out[0, ids.shape[1] :].tolist()
            same = same and answer == ours[q].token_ids
            tokens += len(answer) - 1
        rates[k] = tokens / seconds
    return {"tokens_per_s": rates, "same_tokens": same, "ours_tokens_per_s": _rate(list(ours.values()))}


def speculation(ranks, folder: str, threads: int, doc_tokens: int, new: int, repeats: int) -> tuple[dict, list]:
    from .measure import median

    world1 = quote_on_rank(folder, {}, threads, doc_tokens, new, repeats, story=True)
    ring2 = ranks.run(quote_on_rank, folder, {"ring": 2}, max(1, threads // 2), doc_tokens, new, repeats,
                      timeout=3600)[0]
    metrics, runs = {}, []
    for name, got in (("speculate_quote_auto_vs_off", world1), ("speculate_quote_ring2_auto_vs_off", ring2)):
        if got["same_tokens"]:
            metrics[name] = median(got["auto_tokens_per_s"]) / median(got["off_tokens_per_s"])
        runs.append(dict({k: v for k, v in got.items() if k != "hf"}, bench="speculation", figure=name,
                         model="SmolLM2-135M-Instruct"))
    hf = world1["hf"]
    if hf["same_tokens"]:
        metrics["speculate_vs_hf_prompt_lookup"] = hf["ours_tokens_per_s"] / max(hf["tokens_per_s"].values())
    if world1["story_same_tokens"]:
        metrics["speculate_story_auto_vs_off"] = (median(world1["story_auto_tokens_per_s"])
                                                  / median(world1["story_off_tokens_per_s"]))
    if world1["same_tokens"]:
        for i, name in enumerate(("speculate_quote_answer_auto_vs_off", "speculate_summary_answer_auto_vs_off")):
            metrics[name] = median(world1["by_answer"]["auto"][i]) / median(world1["by_answer"]["off"][i])
    metrics["speculate_summary_tokens_per_step"] = world1["summary_tokens_per_step"]
    metrics["speculate_acceptance"] = world1["acceptance"]
    metrics["speculate_tokens_per_step"] = world1["tokens_per_step"]
    runs.append(dict(hf, tokens_per_s={str(k): v for k, v in hf["tokens_per_s"].items()}, bench="speculation",
                     figure="speculate_vs_hf_prompt_lookup", model="SmolLM2-135M-Instruct"))
    return metrics, runs
