"""What the Dask task runner costs against threads, on the bootstrap's own shard stages.

Runs the real bootstrap flow (`flows.bootstrap.bootstrap`) on a small synthetic world with a
random-weight tiny MED as filter and captioner (no training), stopping after the filter:
world + ingest, then caption and filter, one task per web shard. Each runner runs in a
fresh process on its own temporary Prefect server, as `capfilt run` does for a new user
(no `PREFECT_API_URL`; the server is started before the timing). The table shows per runner the flow's wall time, each shard
stage's time (as the flow records it in `stages.jsonl`; on Dask it includes waiting for
the run's cluster to be ready, shown apart where the flow records it), the temporary Prefect servers
started (log lines) and tracebacks in the log, then dask / threads as ratios and

    overhead per stage = dask stage s - threads stage s
    overhead per task  = that / shards.

    .venv/bin/python bench/dask_runner.py                       # 150 web images, 5 shards
    .venv/bin/python bench/dask_runner.py --web 300 --shard-rows 30 --workers 2

It uses only what main had before the one-cluster change (the bootstrap flow, the tests'
`small_world_config`), so the same script measures an older checkout too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("caption", "filter")


def _tiny_model(folder: Path) -> Path:
    """A random-weight tiny MED with a WordPiece vocabulary of the shapes world."""
    import torch

    import blip_core
    from blip_core.config import preset
    from blip_core.med import MED
    from data.synth_world import all_scenes, correct_captions, weak_captions

    captions = [c for scene in all_scenes() for c in correct_captions(scene) + weak_captions(scene)]
    tokenizer = blip_core.build_tokenizer(captions + ["a picture of"], vocab_size=256)
    torch.manual_seed(0)
    blip_core.save(MED(preset("tiny").with_tokenizer(tokenizer)), tokenizer, folder)
    return folder


def _child(runner: str, root: Path, model: Path, web: int, shard_rows: int, workers: int) -> dict:
    """In a fresh process: one bootstrap run (world -> caption -> filter) on `runner`."""
    from flows.bootstrap import bootstrap
    from tests.flows.conftest import small_world_config

    config = small_world_config(
        root / runner, model, stages={"stop_after": "filter"},
        data={"world": {"n_human": 60, "n_web": web, "n_test": 20, "shard_rows": shard_rows}, "serve_local": False},
        runner={"kind": runner, "dask_workers": workers, "max_workers": workers},
    )  # fmt: skip
    from prefect import get_client

    with get_client(sync_client=True) as client:  # start the temporary server outside the timing
        client.hello()
    start = time.perf_counter()
    summary = bootstrap(config=config)
    flow_s = time.perf_counter() - start
    rows = {r["stage"]: r for r in summary["stages"]}
    return {"runner": runner, "flow_s": flow_s, **{f"{s}_s": rows[s]["seconds"] for s in STAGES},
            "shards": rows["caption"]["shards"],
            "wait_s": sum(rows[s].get("dask_wait_s", 0.0) for s in STAGES)}  # fmt: skip


def _run(runner: str, root: Path, model: Path, args: argparse.Namespace) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update(PYTHONPATH=str(ROOT), PREFECT_HOME=str(root / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", NO_ALBUMENTATIONS_UPDATE="1",
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    cmd = [sys.executable, __file__, "--child", runner, "--root", str(root), "--model", str(model),
           "--web", str(args.web), "--shard-rows", str(args.shard_rows), "--workers", str(args.workers)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    (root / f"{runner}.log").write_text(log)  # kept for a look at what the counts count
    if done.returncode != 0:
        raise SystemExit(f"{runner} run failed:\n{log[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["servers"] = log.count("Starting temporary server")
    result["tracebacks"] = log.count("Traceback") + log.count("CommClosedError")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--web", type=int, default=150, help="web images in the world")
    parser.add_argument("--shard-rows", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2, help="threads, or Dask LocalCluster worker processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _child(args.child, Path(args.root), Path(args.model), args.web, args.shard_rows, args.workers)
        print(json.dumps(result))
        return
    root = Path(tempfile.mkdtemp(prefix="capfilt-dask-bench-"))
    model = _tiny_model(root / "model")
    threads, dask = (_run(runner, root, model, args) for runner in ("threads", "dask"))
    print("| runner | flow s | caption s | filter s | of which waiting for the cluster s | temporary Prefect servers | "
          "tracebacks in log |")
    print("|---|---|---|---|---|---|---|")
    for r in (threads, dask):
        print(f"| {r['runner']} | {r['flow_s']:.1f} | {r['caption_s']:.1f} | {r['filter_s']:.1f} | {r['wait_s']:.1f} | "
              f"{r['servers']} | {r['tracebacks']} |")  # fmt: skip
    ratio = {k: dask[k] / threads[k] for k in ("flow_s", "caption_s", "filter_s")}
    print(f"| dask / threads | {ratio['flow_s']:.2f} | {ratio['caption_s']:.2f} | {ratio['filter_s']:.2f} | | | |")
    shards = dask["shards"]
    for stage in STAGES:
        extra = dask[f"{stage}_s"] - threads[f"{stage}_s"]
        print(f"{stage}: dask overhead {extra:+.1f} s per stage, {1000 * extra / shards:+.0f} ms per shard task ({shards} shards)")
    print(f"logs: {root}/threads.log, {root}/dask.log")


if __name__ == "__main__":
    main()
