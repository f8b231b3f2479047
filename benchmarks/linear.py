"""The CPU's linear kernels (toolkit.loading.cpu_linear), demo model, world 1, in one process:

- cpu_linear_time_m{M}: the model's 211 linears, each called with M rows, by the kernel CpuLinear
  picks for M rows (W @ x^T up to MAX_ROWS, oneDNN's GEMM past it) over F.linear (time; medians
  of interleaved rounds), and the same on one thread (_1thread: a ring rank's share of a 2-core
  machine);
- cpu_linear_few_rows_vs_onednn_m{M}: W @ x^T over oneDNN's GEMM at M rows, on either side of
  MAX_ROWS (why the cap is where it is), two threads and one;
- cpu_linear_decode_speedup: decode tokens/s of a question after a ~4K-token document with the
  model's linears as CpuLinear over the same with nn.Linear, interleaved rounds; the answers held
  equal, or the figure is not reported.
"""
from __future__ import annotations

import time


def _kernel_seconds(weights: list, rows: int, kernel) -> float:
    """kernel(x, W) once for each of the model's weights with `rows` rows."""
    import torch

    inputs = {k: torch.randn(rows, k) for k in {w.shape[1] for w in weights}}
    with torch.no_grad():
        t0 = time.perf_counter()
        for w in weights:
            kernel(inputs[w.shape[1]], w)
        return time.perf_counter() - t0


def linear(folder: str, threads: int, rows: list[int], doc_tokens: int, new: int, repeats: int) -> tuple[dict, list]:
    import torch
    from torch import nn
    from torch.nn import functional as F

    from toolkit import LongContextModel
    from toolkit.loading.cpu_linear import MAX_ROWS, ONEDNN, few_rows, onednn, use_cpu_linear

    from .measure import median

    if not ONEDNN:
        raise RuntimeError("this torch build has no oneDNN: the linear benchmark times its GEMM")
    torch.set_num_threads(threads)
    lcm = LongContextModel.from_pretrained(folder, preflight=False, speculate="off")
    lcm.model.generation_config.eos_token_id = None
    weights = [m.weight for m in lcm.model.modules() if isinstance(m, nn.Linear)]
    kernels = {"linear": lambda x, w: F.linear(x, w), "few_rows": few_rows, "onednn": onednn}
    metrics, run = {}, {"bench": "linear", "model": "SmolLM2-135M-Instruct", "linears": len(weights), "kernel_s": {}}
    try:
        for n_threads, suffix in ((threads, ""), (1, "_1thread")):  # one thread: a ring rank's share of 2 cores
            torch.set_num_threads(n_threads)
            for m in rows if not suffix else [m for m in rows if m <= 2 * MAX_ROWS]:
                names = ["linear", "onednn"] + (["few_rows"] if m <= 2 * MAX_ROWS else [])
                times = {name: [] for name in names}
                for _ in range(repeats + 2):
                    for name in names:
                        times[name].append(_kernel_seconds(weights, m, kernels[name]))
                run["kernel_s"][f"{m}{suffix}"] = times
                chosen = "few_rows" if m <= MAX_ROWS else "onednn"
                metrics[f"cpu_linear_time_m{m}{suffix}"] = median(times[chosen]) / median(times["linear"])
                if MAX_ROWS <= m <= 2 * MAX_ROWS:
                    metrics[f"cpu_linear_few_rows_vs_onednn_m{m}{suffix}"] = \
                        median(times["few_rows"]) / median(times["onednn"])
    finally:
        torch.set_num_threads(threads)
    document = [int(t) for t in torch.randint(100, 20000, (doc_tokens,), generator=torch.Generator().manual_seed(0))]
    session = lcm.prefill_document(document)
    question = [int(t) for t in torch.randint(100, 20000, (20,), generator=torch.Generator().manual_seed(1))]
    session.ask(question, 4)  # warm-up
    rates, answers = {True: [], False: []}, set()
    for _ in range(repeats):
        for on in (False, True):
            use_cpu_linear(lcm.model, on)
            result = session.ask(question, new)
            rates[on].append((len(result.token_ids) - 1) / result.timings["decode_s"])
            answers.add(tuple(result.token_ids))
    run.update(decode_tokens_per_s={"cpu_linear": rates[True], "linear": rates[False]}, same_tokens=len(answers) == 1,
               document_tokens=doc_tokens, new_tokens=new)
    if len(answers) == 1:
        metrics["cpu_linear_decode_speedup"] = median(rates[True]) / median(rates[False])
    return metrics, [run]
