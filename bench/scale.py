"""Orchestration at scale: the same rows cut into more and more shards, through the stage
commands, the flow on threads and the flow on Dask (issue 22).

Written against the user-facing interfaces only (`capfilt caption`, `capfilt filter`,
`capfilt run --config X.yaml`), so the same script measures the code before and after a
change of how the flow runs its shard stages. For each shard count it writes `--rows` web
pairs (tiny 32 px JPEGs) as that many shards, saves the random-weight tiny MED (the flow
tests' `save_tiny_model`), and runs each configuration in fresh processes with
`OMP_NUM_THREADS=1`, each on a fresh copy of one initialised PREFECT_HOME (no
`PREFECT_API_URL`: every `capfilt run` starts its own temporary server, as for a new user):

- stage cmds: `capfilt caption` then `capfilt filter --captions` on the shards; then both
  again (the cached rerun: every shard skipped by its completion record);
- flow threads: `capfilt run` with `data.web` = the shards, given filter and captioner,
  `stages.stop_after: filter` (no training), `runner.kind: threads`; then the same command
  again (answered by `RUN/run.json`), then again with `RUN/run.json` removed (a rerun
  that goes through the flow and finds every shard done);
- flow dask: the same config with `runner: {kind: dask, dask_workers: 2}` (cold only).

Per configuration: wall seconds, seconds from process start to the first caption shard's
completion record (`part-*.done.json`), and the peak resident memory of the process tree
(the command and all its children, summed, sampled every 0.1 s with psutil). A command
that fails or passes `--timeout` becomes a row with its error (e.g. Prefect's HTTP 422),
and the bench goes on. Prints one Markdown table; writes it as JSON to `bench/out/`.

    .venv/bin/python bench/scale.py --shards 10,100,1000
    .venv/bin/python bench/scale.py --shards 10,100,500,1000 --dask-up-to 500 --rows 2000
    .venv/bin/python bench/scale.py --shards 1000,5000 --rows 5000 --runners stages,threads
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CAPFILT = Path(sys.executable).parent / "capfilt"
RUNNERS = ("stages", "threads", "dask")
SAMPLE_S = 0.1
ERROR_MARKERS = ("Unprocessable", "422", "Error:", "Error", "error")


@dataclass
class Measured:
    """One command's wall time, first completion record, peak tree RSS, and how it ended."""

    seconds: float
    first_shard_s: float | None
    peak_rss_mib: float
    rc: int | None  # None: killed at the timeout
    error: str | None = None
    stdout: str = field(default="", repr=False)

    def row(self) -> dict:
        """The figures, without the captured output."""
        return {k: v for k, v in asdict(self).items() if k != "stdout"}


def _tree_rss_mib(proc) -> float:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total / 2**20


def _first_record(folder: Path) -> bool:
    """True once any caption shard under `folder` (OUT/<hash>/) has its completion record."""
    return folder.is_dir() and any(folder.glob("*/part-*.done.json"))


def _kill_tree(proc) -> None:
    import psutil

    for p in [*proc.children(recursive=True), proc]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _error_line(log: str) -> str:
    """The most telling line of a failed command's output (a 422 first, else the last error)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for marker in ERROR_MARKERS:
        hits = [ln for ln in lines if marker in ln]
        if hits:
            hit = hits[0] if marker == ERROR_MARKERS[0] else hits[-1]  # the flow's own log line says it whole
            return hit.split("during execution: ")[-1].split(" - Response:")[0][:300]
    return (lines[-1] if lines else "no output")[:300]


def measure(argv: list[str], env: dict, log: Path, timeout: float, watch: Path | None = None) -> Measured:
    """Run `argv` as a fresh process; sample its tree's RSS and watch for a first caption record."""
    import psutil

    start = time.perf_counter()
    with open(log, "w") as err, tempfile.TemporaryFile("w+") as out:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=err, cwd=ROOT)
        proc = psutil.Process(popen.pid)
        peak, first, rc = 0.0, None, None
        while True:
            peak = max(peak, _tree_rss_mib(proc))
            if watch is not None and first is None and _first_record(watch):
                first = time.perf_counter() - start
            try:
                rc = popen.wait(SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                if time.perf_counter() - start > timeout:
                    _kill_tree(proc)
                    popen.wait()
                    break
        seconds = time.perf_counter() - start
        out.seek(0)
        stdout = out.read()
    if watch is not None and first is None and _first_record(watch):
        first = seconds  # finished between two samples
    error = None
    if rc is None:
        error = f"timeout after {timeout:.0f} s"
    elif rc != 0:
        error = f"rc {rc}: {_error_line(log.read_text() + stdout)}"
    return Measured(seconds, first, peak, rc, error, stdout)


def _json_out(stdout: str) -> dict:
    """The JSON object a capfilt command prints last on stdout."""
    start = 0 if stdout.startswith("{") else stdout.rfind("\n{\n") + 1
    return json.loads(stdout[start:])


def _combine(*parts: Measured) -> Measured:
    """Commands run one after another: seconds add up, peaks take the max, the first error wins."""
    error = next((p.error for p in parts if p.error), None)
    first = parts[0].first_shard_s
    return Measured(sum(p.seconds for p in parts), first, max(p.peak_rss_mib for p in parts),
                    next((p.rc for p in parts if p.rc != 0), 0), error)  # fmt: skip


# ----------------------------------------------------------------------------- configurations


def run_stage_commands(world: Path, env: dict, timeout: float) -> dict:
    """`capfilt caption` then `capfilt filter`, cold, then both again (every shard skipped)."""
    out = world / "stages"
    logs = world / "logs"

    def both(tag: str) -> Measured:
        cap = measure([str(CAPFILT), "caption", "--input", str(world / "web"), "--model", str(world / "model"),
                       "--output", str(out / "caption")], env, logs / f"stages-caption-{tag}.log", timeout,
                      watch=out / "caption")  # fmt: skip
        if cap.error:
            return cap
        captions = _json_out(cap.stdout)["output"]
        filt = measure([str(CAPFILT), "filter", "--input", str(world / "web"), "--model", str(world / "model"),
                        "--captions", captions, "--output", str(out / "filter")], env,
                       logs / f"stages-filter-{tag}.log", timeout)  # fmt: skip
        if not filt.error:
            totals = _json_out(filt.stdout)["totals"]
            if totals["kept"] + totals["rejected"] + totals["failed"] != totals["input"]:
                filt.error = f"rows not accounted for: {totals}"
        return _combine(cap, filt)

    cold = both("cold")
    rerun = both("rerun") if not cold.error else None
    return {"cold": cold.row(), "rerun_s": rerun.seconds if rerun and not rerun.error else None}


def _write_config(world: Path, runner: str) -> Path:
    import yaml

    run_dir = world / f"flow-{runner}"
    config = {
        "run_dir": str(run_dir),
        "data": {"web": [str(world / "web")]},
        "model": {"filter": str(world / "model"), "captioner": str(world / "model")},
        "stages": {"stop_after": "filter"},
        "runner": {"kind": runner, "dask_workers": 2},  # threads: the default worker count
    }
    path = world / f"{runner}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_flow(world: Path, runner: str, env: dict, timeout: float, reruns: bool) -> dict:
    """`capfilt run --config` on `runner`; then (threads) the rerun from the run record and
    the rerun through the flow (`RUN/run.json` removed first)."""
    config = _write_config(world, runner)
    run_dir = world / f"flow-{runner}"
    argv = [str(CAPFILT), "run", "--config", str(config)]
    logs = world / "logs"
    cold = measure(argv, env, logs / f"flow-{runner}-cold.log", timeout, watch=run_dir / "caption")
    result: dict = {"cold": cold.row(), "rerun_record_s": None, "rerun_flow_s": None}
    if cold.error or not reruns:
        return result
    record = measure(argv, env, logs / f"flow-{runner}-rerun-record.log", timeout)
    result["rerun_record_s"] = record.seconds if not record.error else None
    (run_dir / "run.json").unlink(missing_ok=True)
    again = measure(argv, env, logs / f"flow-{runner}-rerun-flow.log", timeout)
    result["rerun_flow_s"] = again.seconds if not again.error else None
    result["rerun_flow_error"] = again.error
    return result


# ----------------------------------------------------------------------------- world and env


def _env(prefect_home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", NO_ALBUMENTATIONS_UPDATE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # fmt: skip
    return env


def _init_prefect_home(folder: Path) -> None:
    """Create Prefect's database once (the first temporary server in an empty home costs
    ~14 s); each configuration then starts on a copy of it."""
    code = "from prefect import get_client\nwith get_client(sync_client=True) as c: c.hello()"
    subprocess.run([sys.executable, "-c", code], env=_env(folder), check=True, capture_output=True)


def _fresh_env(world: Path, template: Path, name: str) -> dict:
    home = world / "prefect" / name
    shutil.copytree(template, home)
    return _env(home)


def bench_shards(root: Path, shards: int, rows: int, runners: list[str], timeout: float, template: Path) -> dict:
    from tests.flows.conftest import save_tiny_model, write_tiny_web_shards

    world = root / f"shards-{shards}"
    (world / "logs").mkdir(parents=True)
    write_tiny_web_shards(world / "web", rows, shards)
    save_tiny_model(world / "model")
    row: dict = {"shards": shards, "rows": rows}
    if "stages" in runners:
        row["stages"] = run_stage_commands(world, _fresh_env(world, template, "stages"), timeout)
    for runner in ("threads", "dask"):
        if runner in runners:
            env = _fresh_env(world, template, runner)
            row[runner] = run_flow(world, runner, env, timeout, reruns=runner == "threads")
    return row


# ----------------------------------------------------------------------------- table


def _s(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cold(row: dict, runner: str) -> dict | None:
    return row.get(runner, {}).get("cold")


def _ok_s(row: dict, runner: str) -> float | None:
    cold = _cold(row, runner)
    return cold["seconds"] if cold and not cold["error"] else None


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}"


def table(rows: list[dict]) -> str:
    head = ("| shards | rows/shard | stage cmds s | flow threads s | threads / stage cmds | flow dask s | dask / threads "
            "| first shard s (stage / threads / dask) | cached rerun s: stage cmds | flow, run record | flow, no record "
            "| peak RSS MiB (stage / threads / dask) | errors |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        stage, threads, dask = (_ok_s(r, k) for k in RUNNERS)
        colds = {k: _cold(r, k) for k in RUNNERS}
        first = " / ".join(_s(c["first_shard_s"]) if c else "-" for c in colds.values())
        rss = " / ".join(f"{c['peak_rss_mib']:.0f}" if c else "-" for c in colds.values())
        errors = "; ".join(f"{k}: after {c['seconds']:.0f} s, {c['error']}" for k, c in colds.items() if c and c["error"])
        flow_rerun_error = r.get("threads", {}).get("rerun_flow_error")
        if flow_rerun_error:
            errors += f"; threads rerun: {flow_rerun_error}"
        per_shard = r["rows"] / r["shards"]
        lines.append(
            f"| {r['shards']} | {per_shard:g} | {_s(stage)} | {_s(threads)} | {_ratio(threads, stage)} | {_s(dask)} "
            f"| {_ratio(dask, threads)} | {first} | {_s(r.get('stages', {}).get('rerun_s'))} "
            f"| {_s(r.get('threads', {}).get('rerun_record_s'))} | {_s(r.get('threads', {}).get('rerun_flow_s'))} "
            f"| {rss} | {errors.replace('|', '/') or '-'} |"
        )  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", default="10,100,1000", help="comma-separated shard counts")
    parser.add_argument("--rows", type=int, default=2000, help="web rows in all (the same at every shard count)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="which of stages,threads,dask to run")
    parser.add_argument("--dask-up-to", type=int, default=None, help="run dask only at shard counts up to this")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per command before it is a failed row")
    parser.add_argument("--keep", action="store_true", help="keep the bench's temporary folder (logs, outputs)")
    parser.add_argument("--table", help="print the table of a saved bench/out JSON and exit")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return
    counts = [int(n) for n in args.shards.split(",")]
    runners = args.runners.split(",")
    root = Path(tempfile.mkdtemp(prefix="capfilt-scale-"))
    template = root / "prefect-home"
    _init_prefect_home(template)
    rows = []
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for shards in counts:
        use = [r for r in runners if r != "dask" or args.dask_up_to is None or shards <= args.dask_up_to]
        rows.append(bench_shards(root, shards, args.rows, use, args.timeout, template))
        print(f"{shards} shards done ({time.strftime('%H:%M:%S')})", file=sys.stderr, flush=True)
    print(f"\n{args.rows} web rows, tiny random-weight MED, OMP_NUM_THREADS=1, load {os.getloadavg()[0]:.1f}\n")
    print(table(rows))
    out = ROOT / "bench" / "out" / f"scale-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"started": started, "argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"\nJSON: {out}" + (f"\nlogs: {root}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
