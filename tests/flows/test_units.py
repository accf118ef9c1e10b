"""Small pieces of the flow package: the Dask cluster's settings, stage rows, the demo's server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from flows.artifacts import artifact_key, stage_row
from flows.config import load_config
from flows.demo import demo_config
from flows.ingest import local_image_server


def test_local_cluster_workers_get_the_flows_api() -> None:
    from flows.runners import local_cluster_kwargs

    cfg = load_config({"preset": "gpu"}).runner
    kwargs = local_cluster_kwargs(cfg, "http://127.0.0.1:8123/api")
    assert kwargs["env"] == {"PREFECT_API_URL": "http://127.0.0.1:8123/api"}
    assert kwargs["n_workers"] == cfg.dask_workers and kwargs["resources"] == {"GPU": 1}
    assert "env" not in local_cluster_kwargs(cfg, None)


def test_stage_row_sums_and_rates() -> None:
    shards = [
        {"counts": {"input": 10, "kept": 6, "rejected": 3, "failed": 1}, "images": 10, "skipped": False},
        {"counts": {"input": 5, "kept": 5, "rejected": 0, "failed": 0}, "images": 0, "skipped": True},
    ]
    row = stage_row("filter", shards, wall_seconds=2.0)
    assert (row["input"], row["kept"], row["rejected"], row["failed"]) == (15, 11, 3, 1)
    assert row["shards"] == 2 and row["skipped_shards"] == 1 and row["images_per_s"] == 5.0
    workers = [  # one worker's sums (tasks.executor.WorkerResult): shards and skipped are counts
        {"counts": {"input": 30, "kept": 20, "rejected": 8, "failed": 2}, "images": 12, "shards": 7, "skipped": 4},
        {"counts": {"input": 3, "kept": 3, "rejected": 0, "failed": 0}, "images": 0, "shards": 2, "skipped": 2},
    ]
    row = stage_row("caption", workers, wall_seconds=4.0)
    assert (row["input"], row["kept"], row["shards"], row["skipped_shards"], row["images_per_s"]) == (33, 23, 9, 6, 3.0)
    assert artifact_key("capfilt", "Run_2", "filter") == "capfilt-run-2-filter"


def test_demo_config_and_local_server(tmp_path: Path) -> None:
    assert demo_config(quick=True).run_dir == "runs/demo-quick"
    assert demo_config(out=tmp_path / "r").run_dir == str(tmp_path / "r")
    (tmp_path / "img.png").write_bytes(b"png bytes")
    port_file = tmp_path / "www.port"
    with local_image_server(tmp_path, port_file) as base:
        assert base.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base}/img.png", timeout=5) as response:
            assert response.read() == b"png bytes"
    with local_image_server(tmp_path, port_file) as again:
        assert again == base  # same port on a rerun: the URL list stays identical


def test_report_step_writes_the_report_outside_a_run(tmp_path: Path) -> None:
    from flows.steps import report_task

    path = Path(report_task.fn(str(tmp_path)))  # no flow run: the artifact is skipped
    assert path == tmp_path / "report.md" and path.is_file() and (tmp_path / "report.html").is_file()


def test_loopback_api_is_told_apart_from_a_remote_scheduler() -> None:
    """The flow warns when a remote cluster's workers could not reach a 127.0.0.1 API."""
    from flows.runners import _is_loopback

    assert _is_loopback("http://127.0.0.1:4200/api") and _is_loopback("tcp://localhost:8786")
    assert not _is_loopback("tcp://10.0.0.2:8786") and not _is_loopback("tls://scheduler:8786")


def test_workers_spread_over_a_machines_gpus() -> None:
    from flows.runners import pin_device

    assert [pin_device("cuda", slot, 4) for slot in range(6)] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert pin_device("cuda", 3, 1) == "cuda" and pin_device("cuda:2", 1, 4) == "cuda:2" and pin_device("cpu", 1, 4) == "cpu"
