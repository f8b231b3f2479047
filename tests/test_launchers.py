"""Real launchers: torchrun with accelerate's PartialState creating the group first."""
import json
import os
import subprocess
from pathlib import Path

import tiny_models
from helpers import BIN, free_port
from helpers import ids as _ids

ROOT = Path(__file__).resolve().parents[1]


def test_api_under_torchrun_and_accelerate_partial_state(tiny_dirs, tmp_path):
    ids = _ids(40, seed=9)
    want = tiny_models.reference_generate(tiny_models.build("llama"), ids, 16)
    out = tmp_path / "tokens.json"
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tests" / "scripts" / "api_under_accelerate.py"), tiny_dirs("llama"), str(out),
           json.dumps(ids[0].tolist())]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["layout"] == {"tp": 1, "ulysses": 1, "ring": 2, "pp": 1}
    assert result["token_ids"] == want
