"""Where the CLI's output goes: with --json, stdout carries the one object and nothing else,
whatever the libraries print on their first run (DeepSpeed's accelerator notice, a model
conversion), at the file-descriptor level as well as through Python's sys.stdout."""
import json
import subprocess
import sys

from helpers import REPO

NOISY_COMMAND = """
import json, os, sys
from toolkit.cli.support import command_output
with command_output(debug=False) as out:
    import deepspeed                      # logs "Setting accelerator to CPU" to stdout on import
    print("a stray print")                # Python-level stdout
    os.write(1, b"a C-level write\\n")     # straight to file descriptor 1
    out.write(json.dumps({"ok": True}) + "\\n")
print("after the block, stdout is stdout again")
"""


def test_json_output_is_the_only_thing_on_stdout():
    proc = subprocess.run([sys.executable, "-c", NOISY_COMMAND], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0]) == {"ok": True}
    assert lines[1:] == ["after the block, stdout is stdout again"]
    assert "a stray print" in proc.stderr and "a C-level write" in proc.stderr
