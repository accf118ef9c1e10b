"""bench/gpu.sh: the GPU benchmark runs end to end on CPU (--quick) and needs nothing the GPU image lacks.

The GPU machine has no Prefect, duckdb, av, datasets or img2dataset: the driver and every
module its sections import must load with those blocked. The slow test runs the whole
script as the GPU run would (with the blocker installed through sitecustomize), so the
first GPU run is not spent on a typo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ABSENT_ON_GPU = ("prefect", "duckdb", "av", "datasets", "img2dataset")
SECTIONS = ("filter_itm", "caption", "pipeline", "decode", "pretrain_mfu", "ddp")
BLOCKER = f"""
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT_ON_GPU!r}:
            raise ImportError(f"{{name}} is not on the GPU image")
        return None

sys.meta_path.insert(0, _Absent())
"""


def _env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "TOKENIZERS_PARALLELISM": "false",
            "NO_ALBUMENTATIONS_UPDATE": "1"}  # fmt: skip


def test_blocker_blocks(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import duckdb"], env=_env(tmp_path), capture_output=True, text=True)
    assert done.returncode != 0 and "not on the GPU image" in done.stderr


def test_driver_imports_nothing_the_gpu_image_lacks(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "bench/gpu_bench.py", "--check-imports"], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "imported" in done.stdout


def test_unknown_argument_is_refused(tmp_path: Path) -> None:
    done = subprocess.run(["bash", "bench/gpu.sh", "--devcie", "cpu"], cwd=ROOT, env={**_env(tmp_path), "PY": sys.executable},
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and "unknown argument" in done.stderr


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_quick(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**_env(tmp_path), "PY": sys.executable, "OUT": str(out)}
    done = subprocess.run(["bash", "bench/gpu.sh", "--device", "cpu", "--quick"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads((out / "gpu.json").read_text())
    table = (out / "gpu.md").read_text()
    assert done.stdout.strip().endswith(table.strip().splitlines()[-1])  # the table is printed last
    assert set(report["sections"]) == set(SECTIONS)
    for name, section in report["sections"].items():
        assert section["status"] == "ok", f"{name}: {section.get('error')}\n{section.get('traceback')}"
        assert isinstance(section["peak_gib"], float) and section["peak_gib"] > 0
        assert f"| {name} |" in table
    for name in ("filter_itm", "caption", "pretrain_mfu"):
        rows = report["sections"][name]["rows"]
        assert rows and all(not r.get("oom") for r in rows)
    for r in report["sections"]["filter_itm"]["rows"]:
        assert r["ours_img_s"] > 0 and r["hf_img_s"] > 0 and r["max_abs_dp"] < 1e-4
    assert all(r["tokens"] == 20 for r in report["sections"]["caption"]["rows"])
    assert 0 < report["sections"]["pipeline"]["efficiency"]
    decode = report["sections"]["decode"]
    assert decode["pil_full_img_s_per_core"] > 0 and decode["nvjpeg_img_s"].startswith("n/a")
    mfu = report["sections"]["pretrain_mfu"]["rows"][0]
    assert mfu["mfu"].startswith("n/a") and mfu["achieved_tflop_s"] > 0 and mfu["tflop_step_counted"] > 0
    assert report["sections"]["ddp"]["backend"] == "gloo"
