"""`lctk summarize` for several documents in one launch: every rank runs the command once per
document, in this process, as `launch/run.py summarize DOC ...` would (the tests launch once
for many documents instead of paying a launcher, imports and a process group per document).

    deepspeed --num_gpus 2 tests/scripts/summarize_each.py RUNS_JSON -- COMMON_OPTIONS...

RUNS_JSON is a list of [document, [its own options...]]; rank 0 prints one line per run.
"""
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "launch")]

from run import strip_local_rank  # noqa: E402


def main():
    args, local_rank = strip_local_rank(sys.argv[1:])
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", local_rank)
    runs, common = json.loads(args[0]), args[args.index("--") + 1:]
    from toolkit.cli import cli

    for document, own in runs:
        cli.main(args=["summarize", document, *own, *common], prog_name="lctk", standalone_mode=False)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
