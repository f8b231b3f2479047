"""Run by torchrun in tests: accelerate's PartialState creates the process group first;
the toolkit must reuse it. Writes rank 0's token ids as JSON."""
import json
import sys

import torch
import torch.distributed as dist
from accelerate import PartialState

state = PartialState(cpu=True)
group_before = dist.group.WORLD

from toolkit import LongContextModel  # noqa: E402

model_dir, out_path = sys.argv[1], sys.argv[2]
ids = torch.tensor([json.loads(sys.argv[3])])
lcm = LongContextModel.from_pretrained(model_dir, ring=state.num_processes, chunk_size=16)
result = lcm.generate(ids, max_new_tokens=16)
assert dist.group.WORLD is group_before, "the toolkit replaced accelerate's process group"
assert lcm.topo.rank == state.process_index and lcm.topo.world == state.num_processes
if state.is_main_process:
    with open(out_path, "w") as f:
        json.dump({"token_ids": result.token_ids, "layout": lcm.layout}, f)
