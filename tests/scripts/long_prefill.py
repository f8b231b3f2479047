"""Run by fault tests under a real launcher: a long prefill that a test kills a rank of.
Each rank writes its pid; rank 0 reports chunk progress and writes the result file
atomically at the very end (so a killed job leaves no output)."""
import json
import os
import sys
from pathlib import Path

import torch

from toolkit import LongContextModel
from toolkit.documents import write_atomic
from toolkit.distributed.watchdog import fail_fast

args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher appends it
model_dir, work, n_tokens = args[0], Path(args[1]), int(args[2])
rank = int(os.environ.get("RANK", "0"))
(work / f"pid.{rank}").write_text(str(os.getpid()))
with fail_fast():
    lcm = LongContextModel.from_pretrained(model_dir, ring=int(os.environ["WORLD_SIZE"]), chunk_size=64, timeout_s=60)
    ids = torch.randint(0, 96, (1, n_tokens), generator=torch.Generator().manual_seed(0))

    def progress(done, total):
        if rank == 0:
            (work / "progress").write_text(f"{done}/{total}")

    logits = lcm.prefill(ids, on_chunk=progress)
    if rank == 0:
        write_atomic(str(work / "result.json"), json.dumps({"argmax": int(logits.argmax())}))
