"""The CPU's few-row linear (toolkit.loading.cpu_linear), demo model, world 1, in one process:

- few_rows_linear_time_m{M}: the model's 211 linears, each called with M rows, W @ x^T (as
  FewRowsLinear computes it, here past its MAX_ROWS too: why the cap is where it is) over
  F.linear (time; medians of interleaved rounds), and the same on one thread (_1thread: a ring
  rank's share of a 2-core machine);
- few_rows_linear_decode_speedup: decode tokens/s of a question after a ~4K-token document with
  the model's linears as FewRowsLinear over the same with nn.Linear, interleaved rounds; the
  answers held equal, or the figure is not reported.
"""
from __future__ import annotations

import time


def _linear_seconds(linears, rows: int) -> float:
    """Each of the model's linears called once with `rows` rows, as the model's modules are now."""
    import torch

    inputs = {k: torch.randn(rows, k) for k in {m.in_features for m in linears}}
    with torch.no_grad():
        t0 = time.perf_counter()
        for m in linears:
            m(inputs[m.in_features])
        return time.perf_counter() - t0


def linear(folder: str, threads: int, rows: list[int], doc_tokens: int, new: int, repeats: int) -> tuple[dict, list]:
    import torch
    from torch import nn

    from toolkit import LongContextModel
    from toolkit.loading import cpu_linear
    from toolkit.loading.cpu_linear import use_few_rows_linear

    from .measure import median

    torch.set_num_threads(threads)
    lcm = LongContextModel.from_pretrained(folder, preflight=False, speculate="off")
    lcm.model.generation_config.eos_token_id = None
    linears = [m for m in lcm.model.modules() if isinstance(m, nn.Linear)]
    metrics, run = {}, {"bench": "linear", "model": "SmolLM2-135M-Instruct", "linears": len(linears), "kernel_s": {}}
    cap, cpu_linear.MAX_ROWS = cpu_linear.MAX_ROWS, max(rows)  # W @ x^T at every row count, past the cap too
    try:
        for n_threads, suffix in ((threads, ""), (1, "_1thread")):  # one thread: a ring rank's share of 2 cores
            torch.set_num_threads(n_threads)
            for m in rows:
                times = {True: [], False: []}
                for _ in range(repeats + 2):
                    for few in (False, True):
                        use_few_rows_linear(lcm.model, few)
                        times[few].append(_linear_seconds(linears, m))
                run["kernel_s"][f"{m}{suffix}"] = {"few_rows": times[True], "linear": times[False]}
                metrics[f"few_rows_linear_time_m{m}{suffix}"] = median(times[True]) / median(times[False])
    finally:
        cpu_linear.MAX_ROWS = cap
        torch.set_num_threads(threads)
    document = [int(t) for t in torch.randint(100, 20000, (doc_tokens,), generator=torch.Generator().manual_seed(0))]
    session = lcm.prefill_document(document)
    question = [int(t) for t in torch.randint(100, 20000, (20,), generator=torch.Generator().manual_seed(1))]
    session.ask(question, 4)  # warm-up
    rates, answers = {True: [], False: []}, set()
    for _ in range(repeats):
        for few in (False, True):
            use_few_rows_linear(lcm.model, few)
            result = session.ask(question, new)
            rates[few].append((len(result.token_ids) - 1) / result.timings["decode_s"])
            answers.add(tuple(result.token_ids))
    run.update(decode_tokens_per_s={"few_rows": rates[True], "linear": rates[False]}, same_tokens=len(answers) == 1,
               document_tokens=doc_tokens, new_tokens=new)
    if len(answers) == 1:
        metrics["few_rows_linear_decode_speedup"] = median(rates[True]) / median(rates[False])
    return metrics, [run]
