"""The shipped presets run as shipped on a CPU-only machine: `capfilt run --config
presets/capfilt-on-img2dataset.yaml` with only its paths pointed at real files (an
img2dataset webdataset folder and a model) runs caption + filter on its Dask runner, the
image loader's decoding processes inside the Dask workers (`loader_workers: 4`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "capfilt-on-img2dataset.yaml"


def test_img2dataset_preset_runs_as_shipped(tmp_path: Path) -> None:
    from stage_helpers import tiny_model
    from webdataset_shards import samples, write_webdataset_format

    web = tmp_path / "img2dataset"
    for index in range(3):
        write_webdataset_format(web, index, samples(4 * index, 4, failed=(1,)))
    model = tiny_model(tmp_path / "model")
    shipped = yaml.safe_load(PRESET.read_text())
    assert shipped["runner"]["kind"] == "dask" and shipped["loader_workers"] > 0  # what the test is about
    sets = [f"run_dir={tmp_path / 'run'}", f"data.web=[{web}]", f"model.captioner={model}", f"model.filter={model}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(tmp_path / "prefect-home"), CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-m", "flows.entry", "run", "--config", str(PRESET),
                           *[arg for item in sets for arg in ("--set", item)]],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert "daemonic" not in done.stderr
    rows = {r["stage"]: r for r in map(json.loads, (tmp_path / "run" / "stages.jsonl").read_text().splitlines())}
    for stage in ("caption", "filter"):
        row = rows[stage]
        assert row["runner"] == "dask" and row["shards"] == 3 and row["kept"] + row["rejected"] + row["failed"] == row["input"]
        assert "num_workers 4" in row["execution"], row  # the preset's loader processes, inside Dask workers
    assert rows["caption"]["input"] == 12 and rows["caption"]["failed"] == 3  # one failed download per shard
    assert not (tmp_path / "run" / "assemble").exists()  # the preset stops after the filter
