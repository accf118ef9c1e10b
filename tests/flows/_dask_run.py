"""Run the bootstrap as `capfilt run` does and read its shard task runs back from its API.

    python tests/flows/_dask_run.py CONFIG.json OUT.json

No `PREFECT_API_URL` is set (the caller makes sure), so the flow runs on its own
temporary Prefect server, as a new user's does; after the flow, still in this process,
the shard-stage task runs are read from that same server and written to
OUT.json with the flow's summary. `shard_task_runs` is also used in-process by the tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from uuid import UUID


def shard_task_runs(flow_run_id: UUID) -> dict[str, list[dict[str, Any]]]:
    """The task runs of the flow run `flow_run_id` named after the shard stages, as the
    flow's API holds them: ``{"caption": [{"name": "caption", "state": "COMPLETED"}], ...}``
    (one per stage run; a run with a task per shard would list ``caption-00000`` ...)."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    out: dict[str, list[dict[str, Any]]] = {}
    for stage in ("caption", "filter"):
        named = [r for r in runs if r.name == stage or r.name.startswith(f"{stage}-")]
        out[stage] = sorted(({"name": r.name, "state": r.state_type.value} for r in named), key=lambda r: r["name"])
    return out


def main(config_path: str, out_path: str) -> None:
    from flows.bootstrap import bootstrap
    from flows.config import load_config

    config = load_config(json.loads(Path(config_path).read_text()))
    state = bootstrap(config=config, return_state=True)
    summary = state.result()
    runs = shard_task_runs(state.state_details.flow_run_id)
    Path(out_path).write_text(json.dumps({"summary": summary, "task_runs": runs}, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:3])
