"""A wheel (not only the checkout) carries the presets, models and hardware YAML files."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_carries_the_configs_and_finds_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("lctk-*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = {p.relative_to(site / "toolkit" / "_configs").as_posix()
               for p in (site / "toolkit" / "_configs").rglob("*.yaml")}
    in_repo = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped == in_repo
    code = ("from toolkit.planner.paths import config_dir, named_configs; "
            "print(config_dir()); print(sorted(named_configs('presets')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                         capture_output=True, text=True, timeout=120, check=True).stdout.splitlines()
    assert Path(out[0]) == site / "toolkit" / "_configs"
    assert "auto" in out[1]
