"""Seeded SIGKILL sweeps over real capfilt commands, shared by tests/reliability and
bench/faults.py.

A `StageCase` is one command (run as its own process through `kill_hook.py`) and the
folder it writes. `sweep` runs it once uninterrupted (counting its renames: the kill
points), then for each seeded (rename index, phase) runs it in a fresh folder, kills it
there (optionally again on the rerun), reruns it to the end and compares every output
with the uninterrupted run: same files, same tables, same completion records, keys
unique, no ``.tmp`` left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "tests" / "tasks"))  # stage_helpers: tiny models and web shards

from stage_helpers import tiny_model, web_rows, web_shards, write_pairs  # noqa: E402

from data.shards import shard_name  # noqa: E402

HOOK = HERE / "kill_hook.py"
COMMAND_TIMEOUT_S = 300
KILLED = -signal.SIGKILL


@dataclass
class StageCase:
    """One command to kill: `argv(out)` is ``[module, args...]`` writing into `out`;
    `resume_argv(out)` the rerun (default: the same); `outputs` limits the comparison to
    these subfolders of `out` (default: all of it)."""

    name: str
    argv: Callable[[Path], list[str]]
    resume_argv: Callable[[Path], list[str]] | None = None
    outputs: tuple[str, ...] = ()
    # JSON files whose named fields legitimately differ in a resumed run (file name -> fields)
    json_ignore: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class SweepResult:
    """What a sweep did; `problems` must be empty and `rows_lost` 0."""

    stage: str
    kill_points: int = 0
    faults: int = 0  # SIGKILLs that landed (the process died of it)
    reruns: int = 0
    rows_checked: int = 0
    rows_lost: int = 0
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- processes


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("KILL_AT", "KILL_PHASE")}
    return {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1", **extra}


def run_command(argv: list[str], **extra_env: str) -> subprocess.CompletedProcess:
    """Run `argv` (module + args) under the kill hook; returns the finished process."""
    return subprocess.run(
        [sys.executable, str(HOOK), *argv], cwd=ROOT, env=env(**extra_env), capture_output=True, text=True,
        timeout=COMMAND_TIMEOUT_S,
    )  # fmt: skip


def count_renames(argv: list[str]) -> int:
    """Run `argv` to the end in this process (no start-up cost) and return how many
    renames it made: the kill points of a sweep."""
    done = [0]
    real = {"replace": os.replace, "rename": os.rename}

    def counted(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            done[0] += 1
            return real[name](*args, **kwargs)

        return call

    import torch

    saved_argv, saved_threads = sys.argv, torch.get_num_threads()
    torch.set_num_threads(1)  # as in the killed processes (OMP_NUM_THREADS=1): float sums in the same order
    os.replace, os.rename = counted("replace"), counted("rename")
    try:
        sys.argv = list(argv)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module was imported before
            runpy.run_module(argv[0], run_name="__main__", alter_sys=False)
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise AssertionError(f"uninterrupted run of {argv} exited {exc.code}") from exc
    finally:
        os.replace, os.rename = real["replace"], real["rename"]
        sys.argv = saved_argv
        torch.set_num_threads(saved_threads)
    return done[0]


def kill_at(argv: list[str], index: int, phase: str) -> int:
    """Run `argv` and SIGKILL it at rename `index` (`phase`); returns its exit code."""
    return run_command(argv, KILL_AT=str(index), KILL_PHASE=phase).returncode


_HOLD = "import sys, time\nfrom data.run_lock import run_lock\nwith run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(300)\n"


def hold_lock(folder: Path) -> subprocess.Popen:
    """A process holding `folder`'s run lock until killed (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], cwd=ROOT, env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# ----------------------------------------------------------------------------- comparison


def _files(folder: Path, outputs: tuple[str, ...]) -> dict[str, Path]:
    roots = [folder / o for o in outputs] if outputs else [folder]
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name != ".lock":
                found[str(path.relative_to(folder))] = path
    return found


def _read(path: Path) -> object:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return path.read_bytes()


def _keys(table: pa.Table) -> list[str]:
    return table.column("key").to_pylist() if "key" in table.column_names else []


def _without(data: object, fields: tuple[str, ...]) -> object:
    """`data` with the named keys dropped at any depth."""
    if isinstance(data, dict):
        return {k: _without(v, fields) for k, v in data.items() if k not in fields}
    return data


def compare(reference: Path, got: Path, case: StageCase, result: SweepResult, label: str) -> None:
    """Add to `result` every difference between two output folders, lost rows included."""
    ref_files, got_files = _files(reference, case.outputs), _files(got, case.outputs)
    tmp = [name for name in got_files if ".tmp" in name]
    if tmp:
        result.problems.append(f"{label}: temporary files left: {tmp[:3]}")
    missing = sorted(set(ref_files) - set(got_files))
    extra = sorted(set(got_files) - set(ref_files) - set(tmp))
    if missing or extra:
        result.problems.append(f"{label}: missing files {missing[:3]}, extra files {extra[:3]}")
    keys_by_group: dict[str, list[str]] = {}
    for name, path in ref_files.items():
        want = _read(path)
        if isinstance(want, pa.Table):
            result.rows_checked += want.num_rows
        if name not in got_files:
            result.rows_lost += want.num_rows if isinstance(want, pa.Table) else 0
            continue
        have = _read(got_files[name])
        if isinstance(want, pa.Table):
            keys_by_group.setdefault(Path(name).parts[0], []).extend(_keys(have))
            if not (isinstance(have, pa.Table) and have.equals(want)):
                lost = set(_keys(want)) - set(_keys(have)) if isinstance(have, pa.Table) else set(_keys(want))
                result.rows_lost += len(lost)
                result.problems.append(f"{label}: {name} differs from the uninterrupted run ({len(lost)} keys lost)")
        elif _without(have, case.json_ignore.get(path.name, ())) != _without(want, case.json_ignore.get(path.name, ())):
            result.problems.append(f"{label}: {name} differs from the uninterrupted run")
    for group, keys in keys_by_group.items():
        if len(keys) != len(set(keys)):
            result.problems.append(f"{label}: duplicate keys in {group}")


# ----------------------------------------------------------------------------- sweeps


def plan_faults(kill_points: int, faults: int, seed: int, phases: tuple[str, ...] = ("before", "after", "torn")) -> list[tuple[int, str]]:
    """`faults` seeded (rename index, phase) pairs spread over 1..kill_points."""
    rng = random.Random(seed)
    return [(rng.randint(1, kill_points), rng.choice(phases)) for _ in range(faults)]


def sweep(case: StageCase, root: Path, faults: int, seed: int, kills_per_fault: int = 1) -> SweepResult:
    """Kill `case` at `faults` seeded points (each time `kills_per_fault` kills in a row,
    the later ones during the reruns), rerun it to the end, compare with an uninterrupted run."""
    result = SweepResult(stage=case.name)
    reference = root / f"{case.name}-reference"
    shutil.rmtree(reference, ignore_errors=True)
    reference.mkdir(parents=True)
    result.kill_points = count_renames(case.argv(reference))
    resume = case.resume_argv or case.argv
    rng = random.Random(seed)
    for number in range(faults):
        out = root / f"{case.name}-fault-{number}"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        points = plan_faults(result.kill_points, kills_per_fault, rng.randrange(2**31))
        for attempt, (index, phase) in enumerate(points):
            argv = case.argv(out) if attempt == 0 else resume(out)
            code = kill_at(argv, index, phase)
            if code == KILLED:
                result.faults += 1
            elif code != 0:
                result.problems.append(f"{case.name}: run with a kill at rename {index} ({phase}) exited {code}")
        final = run_command(resume(out))
        result.reruns += 1
        if final.returncode != 0:
            result.problems.append(f"{case.name}: rerun after faults {points} failed: {final.stderr[-2000:]}")
            continue
        compare(reference, out, case, result, f"{case.name} after kills {points}")
    return result


# ----------------------------------------------------------------------------- a small world


def build_world(root: Path, web_sizes: tuple[int, ...] = (6, 6, 6, 6)) -> dict[str, Path]:
    """A tiny random captioner/filter model, web shards (a failed and an undecodable row
    each), human shards, and the caption + filter outputs the later stages read."""
    from tasks.caption import CaptionConfig, run_caption
    from tasks.execution import ExecutionConfig
    from tasks.filter import FilterConfig, run_filter

    root.mkdir(parents=True, exist_ok=True)
    model = tiny_model(root / "model")
    (root / "web").mkdir(exist_ok=True)
    web_shards(root / "web", web_sizes, failed=(2,), garbage=(4,))
    human = root / "human"
    human.mkdir(exist_ok=True)
    for index in range(2):
        rows = [dict(r, source="human", key=f"h{r['key']}") for r in web_rows(500 + 8 * index, 8)]
        write_pairs(human / shard_name(index), rows)
    execution = ExecutionConfig(num_workers=0, progress=False, batch_size=4)
    captions = run_caption([root / "web"], root / "caption", model, CaptionConfig(max_length=10, min_length=3, execution=execution))
    filtered = run_filter([root / "web"], root / "filter", model, FilterConfig(threshold=0.5, execution=execution), captions.output)
    images = root / "images"
    images.mkdir(exist_ok=True)
    listing = []
    for index in range(10):
        path = images / f"{index}.png"
        from PIL import Image

        Image.frombytes("RGB", (12, 12), bytes((index * 7 + j) % 256 for j in range(12 * 12 * 3))).save(path)
        listing.append({"image": str(path) if index != 3 else str(images / "missing.png"), "caption": f"picture {index}"})
    listing_path = root / "human_list.jsonl"
    listing_path.write_text("".join(json.dumps(row) + "\n" for row in listing))
    return {
        "root": root, "model": model, "web": root / "web", "human": human, "captions": captions.output,
        "kept": filtered.output / "kept", "human_list": listing_path,
    }  # fmt: skip


_TOKENIZER_DEFAULTS = ("max_length", "pad_to_multiple_of", "pad_token_type_id", "padding_side", "stride",
                       "truncation_side", "truncation_strategy")  # fmt: skip
STAGE_ARGS = ["--batch-size", "3", "--workers", "0", "--no-progress"]


def stage_cases(world: dict[str, Path]) -> dict[str, StageCase]:
    """The commands a sweep kills: ingestion (synthetic world, human list), caption,
    filter, assemble and training."""
    model, web = str(world["model"]), str(world["web"])
    stages = "flows.commands.stages"
    train = ["flows.cli", "train", "--mode", "finetune-filter", "--data", str(world["human"]), "--init", model,
             "--steps", "6", "--batch-size", "4", "--checkpoint-every", "2", "--keep-last", "2", "--no-augment",
             "--warmup-steps", "1", "--no-progress", "--log-every", "1", "--device", "cpu"]  # fmt: skip
    return {
        "synth": StageCase("synth", lambda out: ["flows.cli", "synth", str(out), "--seed", "3", "--human", "6", "--web", "12",
                                                 "--test", "3", "--rows-per-shard", "4", "--image-size", "16"]),  # fmt: skip
        "ingest-human": StageCase(
            "ingest-human", lambda out: ["flows.cli", "ingest", "human", str(world["human_list"]), str(out), "--rows-per-shard", "3"]
        ),
        "caption": StageCase("caption", lambda out: [stages, "caption", "--model", model, "--input", web, "--output", str(out),
                                                     *STAGE_ARGS, "--max-length", "10", "--min-length", "3", "--num-captions", "2"]),  # fmt: skip
        "filter": StageCase("filter", lambda out: [stages, "filter", "--model", model, "--input", web, "--output", str(out),
                                                   "--captions", str(world["captions"]), *STAGE_ARGS]),  # fmt: skip
        "assemble": StageCase("assemble", lambda out: [stages, "assemble", "--input", str(world["human"]), str(world["kept"]),
                                                       "--output", str(out), "--rows-per-shard", "7", "--no-progress"]),  # fmt: skip
        "train": StageCase(
            "train", lambda out: [*train, "--out", str(out)], resume_argv=lambda out: [*train, "--out", str(out), "--resume"],
            outputs=("final",),
            # the run's own folder and resume flag; transformers writes its tokenizer defaults
            # into tokenizer_config.json when it re-saves a loaded tokenizer (same vocabulary
            # and ids: tokenizer.json and vocab.txt are compared byte for byte)
            json_ignore={"training.json": ("out_dir", "resume"), "tokenizer_config.json": _TOKENIZER_DEFAULTS},
        ),
    }


def summary_line(result: SweepResult) -> str:
    buffer = io.StringIO()
    buffer.write(f"{result.stage:<13} kill points {result.kill_points:>4}  faults {result.faults:>3}  reruns {result.reruns:>3}  ")
    buffer.write(f"rows checked {result.rows_checked:>6}  rows lost {result.rows_lost}  problems {len(result.problems)}")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- hostile input


def run_hostile_pipeline(root: Path, model: Path) -> dict:
    """The hostile corpus (hostile_corpus.py) through real img2dataset ingestion from a
    local HTTP server, then caption, filter and assemble with `model`, in a run folder
    ``root/run`` laid out as the flow lays it out (so `capfilt query` reads it)."""
    from data.ingest_web import WebIngestConfig, ingest_web, serve_folder
    from hostile_corpus import write_corpus
    from tasks.assemble import AssembleConfig, run_assemble
    from tasks.caption import CaptionConfig, run_caption
    from tasks.execution import ExecutionConfig
    from tasks.filter import FilterConfig, run_filter

    execution = ExecutionConfig(num_workers=0, progress=False, batch_size=8)
    run = root / "run"
    (root / "corpus" / "www").mkdir(parents=True, exist_ok=True)
    with serve_folder(root / "corpus" / "www") as base_url:
        url_list, cases = write_corpus(root / "corpus", base_url)
        ingest = ingest_web(url_list, run / "ingest" / "web", WebIngestConfig(rows_per_shard=12, processes=1, threads=4, timeout_s=5))
    web = run / "ingest" / "web"
    captions = run_caption([web], run / "caption", model, CaptionConfig(max_length=12, min_length=3, execution=execution))
    filtered = run_filter([web], run / "filter", model, FilterConfig(execution=execution), captions.output)
    assembled = run_assemble([filtered.output / "kept"], run / "assemble", AssembleConfig(rows_per_shard=16, execution=execution))
    return {"root": root, "run": run, "cases": cases, "ingest": ingest, "captions": captions, "filter": filtered,
            "assemble": assembled}  # fmt: skip
