"""Security: nothing on a load path unpickles (a malicious pickle in every place a file
is read is refused, not run), one writer per run folder, and a run writes only inside
its run folder. The SQL surface's escapes are tested in tests/data/test_catalog.py
(`test_each_escape_is_refused`, `test_raw_connection_is_confined_too`,
`test_cli_refusals_exit_2`)."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from reliability_harness import ROOT, env, hold_lock

import blip_core
from data.run_lock import RunLockedError

PACKAGES = ("blip_core", "data", "tasks", "flows", "bench")
# what may never appear on a load path (comments and docstrings are not code: see _code_lines)
FORBIDDEN = {
    "pickle module": re.compile(r"\b(import\s+(c?pickle|dill|cloudpickle)|from\s+(c?pickle|dill|cloudpickle)\s+import|pickle\.loads?\()"),
    "torch.load without weights_only=True": re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"),
    "numpy pickles": re.compile(r"allow_pickle\s*=\s*True"),
    "pandas pickles": re.compile(r"read_pickle\("),
    "joblib": re.compile(r"joblib\.load\("),
    "unsafe YAML": re.compile(r"yaml\.(unsafe_)?load\((?![^)]*(SafeLoader|CSafeLoader))"),
    "eval / exec": re.compile(r"(?<![\w.])(eval|exec)\("),
    "pickle serializer": re.compile(r"serializer\s*=\s*['\"](pickle|compressed/pickle)"),
}


class _Payload:
    """Unpickling this creates `marker` (a stand-in for any code an attacker would run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """Lines of `path` outside docstrings, with comments stripped."""
    lines, in_doc = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        quotes = stripped.count('"""') + stripped.count("'''")
        if in_doc or stripped.startswith(('"""', "'''")):
            in_doc = in_doc != (quotes % 2 == 1)
            continue
        lines.append((number, line.split("#", 1)[0]))
    return lines


def test_no_pickle_on_any_load_path() -> None:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for number, code in _code_lines(path):
                offenders += [f"{path.relative_to(ROOT)}:{number}: {what}: {code.strip()}"
                              for what, pattern in FORBIDDEN.items() if pattern.search(code)]  # fmt: skip
    assert offenders == []
    # the checker itself would catch each forbidden form
    for sample in ("import pickle", "torch.load(path)", "np.load(p, allow_pickle=True)", "yaml.load(text)", "eval(x)"):
        assert any(p.search(sample) for p in FORBIDDEN.values()), sample
    for fine in ("torch.load(p, weights_only=True)", "yaml.safe_load(t)", "model.eval()", "yaml.load(t, Loader=yaml.SafeLoader)"):
        assert not any(p.search(fine) for p in FORBIDDEN.values()), fine


def _pickle_file(path: Path, marker: Path, torch_format: bool = False) -> None:
    if torch_format:
        torch.save({"state_dict": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(_Payload(marker)))


def test_the_payload_runs_when_unpickled(tmp_path: Path) -> None:
    """The control: the same bytes do create the marker when something does unpickle them."""
    marker = tmp_path / "pwned"
    _pickle_file(tmp_path / "payload.pkl", marker)
    pickle.loads((tmp_path / "payload.pkl").read_bytes())
    assert marker.exists()


def test_a_pickle_as_model_weights_is_refused_not_run(world: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ours = tmp_path / "ours"
    shutil.copytree(world["model"], ours)
    _pickle_file(ours / "model.safetensors", marker)
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        blip_core.load(ours)
    assert str(ours / "model.safetensors") in str(info.value)
    loaded = blip_core.load(world["model"])
    hf = tmp_path / "hf"
    blip_core.export_hf(loaded.model, loaded.tokenizer, hf, kind="retrieval")
    for weights in hf.glob("model*.safetensors"):
        weights.unlink()
    _pickle_file(hf / "pytorch_model.bin", marker, torch_format=True)
    with pytest.raises(FileNotFoundError, match="never unpickle"):
        blip_core.load(hf)
    assert not marker.exists()


def test_a_pickle_in_a_training_checkpoint_is_refused_not_run(world: dict[str, Path], tmp_path: Path) -> None:
    from blip_core.train.checkpoint import latest_checkpoint
    from tasks.train import train_stage

    out = tmp_path / "train"
    options = {"max_steps": 2, "batch_size": 4, "checkpoint_every": 2, "warmup_steps": 1, "progress": False, "device": "cpu"}
    train_stage(out, [world["human"]], "finetune-filter", init=world["model"], augment=False, **options)
    checkpoint = latest_checkpoint(out / "checkpoints")
    marker = tmp_path / "pwned"
    for name in sorted(p.name for p in checkpoint.glob("*.safetensors")):
        _pickle_file(checkpoint / name, marker, torch_format=True)
        (checkpoint / (Path(name).stem + ".pt")).write_bytes((checkpoint / name).read_bytes())
    shutil.rmtree(out / "final")
    with pytest.raises(Exception, match="not a readable safetensors file") as info:
        train_stage(out, [world["human"]], "finetune-filter", init=world["model"], augment=False, **options)
    assert str(checkpoint) in str(info.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- run folder


def test_a_second_bootstrap_on_a_locked_run_folder_is_refused(tmp_path: Path) -> None:
    from flows.bootstrap import bootstrap
    from flows.config import preset

    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with pytest.raises(RunLockedError, match=f"in use by another capfilt process \\(pid {holder.pid}"):
            bootstrap.fn(preset("demo-quick", run_dir=str(run_dir)))
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the refused run wrote nothing


def _config(tmp_path: Path, run_dir: str) -> Path:
    config = {
        "preset": "demo-quick", "run_dir": run_dir,
        "data": {"world": {"n_human": 4, "n_web": 6, "n_test": 2, "shard_rows": 4}, "serve_local": False},
        "stages": {"stop_after": "ingest"},
    }  # fmt: skip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _files_since(root: Path, start: float, skip: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_mtime >= start and skip not in p.parents]


@pytest.mark.slow
def test_capfilt_run_refuses_a_locked_folder_and_writes_only_inside_its_run_folder(tmp_path: Path) -> None:
    home = tmp_path / "prefect-home"
    cli_env = env(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", COLUMNS="500",
                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # fmt: skip
    (tmp_path / "elsewhere").mkdir()
    config = _config(tmp_path, str(tmp_path / "elsewhere" / ".." / "run"))  # a path with '..' in it
    run_dir = (tmp_path / "run").resolve()
    command = [sys.executable, "-m", "flows.cli", "run", "--config", str(config)]

    holder = hold_lock(run_dir)
    try:
        refused = subprocess.run(command, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode != 0  # refused in one line, before Prefect starts (issue 23)
    assert "is in use by another capfilt process" in refused.stderr and f"pid {holder.pid}" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr

    start = time.time() - 1
    done = subprocess.run(command, cwd=tmp_path, env=cli_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    written = _files_since(tmp_path, start, home)
    outside = [p for p in written if run_dir not in p.parents]
    assert written and outside == [], outside
    assert list((run_dir / "ingest" / "web").glob("part-*.parquet"))
    assert not list((tmp_path / "elsewhere").iterdir())
    assert os.listdir(tmp_path) and not (tmp_path / "runs").exists()  # nothing under the working folder
