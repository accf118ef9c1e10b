"""Cache keys agree with the run folder: stable across runs, sensitive to inputs, settings and lost outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from data.shards import CompletionRecord, write_completion, write_shard
from flows.caching import StepJob, job_cache_key, output_complete, read_list, record_outputs, results_dir, step_cache_key, write_list
from flows.faults import InjectedFault, maybe_fault


def _shard(path: Path, caption: str = "a red circle") -> Path:
    table = pa.table({"key": ["k0"], "image_id": ["i0"], "source": ["web"], "caption": [caption], "status": ["ok"]})
    write_shard(table, path, kind="pairs")
    write_completion(path, CompletionRecord(shard=path.name, kind="pairs", counts={"input": 1}, input_fingerprint="x",
                                            settings_hash="y"))
    return path


def _job(run: Path, src: Path, **settings: object) -> StepJob:
    return StepJob(step="caption", index=3, run_dir=str(run), inputs=[str(src)], settings={"top_p": 0.9, **settings})


def test_key_is_stable_and_free_of_run_ids(tmp_path: Path) -> None:
    src = _shard(tmp_path / "in" / "part-00003.parquet")
    first, second = job_cache_key(_job(tmp_path, src)), job_cache_key(_job(tmp_path, src))
    assert first == second and first.startswith("caption-00003-")
    assert job_cache_key(_job(tmp_path, src, top_p=0.8)) != first  # a semantic setting
    _shard(src, caption="a blue square")  # new input bytes
    assert job_cache_key(_job(tmp_path, src)) != first


def test_key_of_a_webdataset_shard_changes_with_its_sidecar(tmp_path: Path) -> None:
    from webdataset_shards import samples, write_webdataset_format

    tar = write_webdataset_format(tmp_path / "wds", 3, samples(0, 3))
    first = job_cache_key(_job(tmp_path, tar))
    write_webdataset_format(tmp_path / "wds", 3, samples(0, 3), sidecar_rows=samples(0, 2))  # the same tar bytes
    assert job_cache_key(_job(tmp_path, tar)) != first


def test_a_list_file_keeps_parameters_small_and_keys_on_its_shards(tmp_path: Path) -> None:
    """10,000 shards travel as one list file: the job's parameters stay the size of a path
    (Prefect refuses parameters over 512 KiB), and its key still follows every shard's bytes."""
    shards = [_shard(tmp_path / "in" / f"part-{i:05d}.parquet") for i in range(3)]
    many = [str(tmp_path / "in" / f"part-{i:05d}.parquet") for i in range(10_000)]
    listed = write_list(tmp_path, many)
    assert write_list(tmp_path, many) == listed and read_list(listed) == many  # named by its content
    assert write_list(tmp_path, many[:-1]) != listed
    job = StepJob(step="train", run_dir=str(tmp_path), inputs=[listed], params={"data": listed})
    assert len(job.model_dump_json()) < 1000
    small = write_list(tmp_path, [str(p) for p in shards])
    first = job_cache_key(StepJob(step="train", run_dir=str(tmp_path), inputs=[small]))
    _shard(shards[1], caption="a blue square")
    assert job_cache_key(StepJob(step="train", run_dir=str(tmp_path), inputs=[small])) != first


def test_cached_result_is_dropped_when_outputs_are_gone(tmp_path: Path) -> None:
    src = _shard(tmp_path / "in" / "part-00000.parquet")
    out = _shard(tmp_path / "caption" / "h" / "part-00000.parquet")
    job = _job(tmp_path, src)
    key = job_cache_key(job)
    stored = results_dir(tmp_path) / key
    stored.parent.mkdir(parents=True)
    stored.write_text("{}")  # what Prefect persisted for this key
    record_outputs(job, [str(out)])
    assert step_cache_key(None, {"job": job}) == key and stored.exists()  # outputs complete: keep
    out.unlink()
    assert not output_complete(out)
    assert step_cache_key(None, {"job": job}) == key and not stored.exists()  # output lost: recompute


def test_output_complete_needs_record_with_matching_size(tmp_path: Path) -> None:
    out = _shard(tmp_path / "part-00000.parquet")
    assert output_complete(out)
    out.write_bytes(out.read_bytes()[:-10])  # truncated after its record was written
    assert not output_complete(out)
    model = tmp_path / "model"
    model.mkdir()
    assert not output_complete(model)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"0")
    assert output_complete(model)


def test_fault_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAPFILT_FAULT", "caption:2, pretrain")
    maybe_fault("caption", 1)
    maybe_fault("filter", 2)
    with pytest.raises(InjectedFault, match="caption shard 2"):
        maybe_fault("caption", 2)
    with pytest.raises(InjectedFault, match="pretrain"):
        maybe_fault("pretrain")
    monkeypatch.delenv("CAPFILT_FAULT")
    maybe_fault("caption", 2)


def test_cached_result_is_dropped_when_another_run_rewrote_its_output(tmp_path: Path) -> None:
    """A step whose output path is shared across settings (eval/metrics.json): once a run
    with other settings rewrote it, the first settings' cached result no longer describes it."""
    src = _shard(tmp_path / "in" / "part-00000.parquet")
    metrics = tmp_path / "eval" / "metrics.json"
    metrics.parent.mkdir()
    metrics.write_text('{"threshold": 0.5}')
    job = _job(tmp_path, src)
    stored = results_dir(tmp_path) / job_cache_key(job)
    stored.parent.mkdir(parents=True)
    stored.write_text("{}")
    record_outputs(job, [str(metrics)])
    assert step_cache_key(None, {"job": job}) and stored.exists()
    os.utime(metrics, ns=(1, 1))  # rewritten by a run with other settings (same size, other time)
    step_cache_key(None, {"job": job})
    assert not stored.exists()
