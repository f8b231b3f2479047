#!/usr/bin/env python
"""The Python API: load a model once, generate, summarise. Runs as written on one process,
and unchanged under a launcher (every rank runs this file; rank 0 prints):

    python examples/python_api.py [MODEL]              # default: the demo model smollm2-135m
    torchrun --nproc_per_node 2 examples/python_api.py
    accelerate launch --num_processes 2 examples/python_api.py      (GPU machines)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402

from toolkit import LongContextModel  # noqa: E402
from toolkit.summarize.synthetic import station_logbook  # noqa: E402

# Under a launcher accelerate creates the process group (gloo on CPU) and the toolkit reuses it;
# on one process this does nothing distributed.
state = PartialState(cpu=not torch.cuda.is_available())
model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"

# Degrees left out are chosen from the world size and the heads (SmolLM2: 9 heads, so ring on 2 ranks).
lcm = LongContextModel.from_pretrained(model, chunk_size=512)

result = lcm.generate("The three most useful tools on a remote island research station are", max_new_tokens=16)
if lcm.topo.is_main:
    print(f"layout {lcm.layout}: {result.prompt_tokens} prompt tokens -> {result.text!r} "
          f"({result.timings['tokens_per_s']:.1f} tokens/s)")

document = station_logbook(days=12)  # a document the project writes itself
summary = lcm.summarize(document, max_new_tokens=48, on_progress=None)
if lcm.topo.is_main:
    print(f"summary ({summary.mode}, {summary.document_tokens} document tokens): {summary.summary}")

# Tear the group down before the interpreter does: gloo threads still alive during interpreter
# teardown can abort a rank after its work is done.
state.wait_for_everyone()
state.destroy_process_group()
