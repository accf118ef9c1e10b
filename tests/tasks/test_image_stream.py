"""One image loader per stage (`tasks.image_batches.ImageStream`): the same parquet bytes as
a loader per shard and as in-process decoding; a shard that fails to read or stops early
costs only itself; complete shards are never decoded; the CUDA options' CPU fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from stage_helpers import jpeg, tiny_model, web_shards

import blip_core
from blip_core.image import ImageTransform
from data.shards import read_completion, shard_name
from tasks.caption import CaptionConfig, caption_shard, run_caption
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, filter_shard, run_filter
from tasks.image_batches import ImageStream, Planned, ShardImages, image_batches, loader_options
from tasks.lifecycle import StageIncompleteError

SIZES = (5, 4, 7, 3)


def _exec(workers: int) -> ExecutionConfig:
    return ExecutionConfig(batch_size=3, num_workers=workers, progress=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    (root / "web").mkdir()
    web_shards(root / "web", SIZES, failed=(1,), garbage=(2,))
    return {"root": root, "model": tiny_model(root / "model"), "web": root / "web"}


@pytest.fixture(scope="module")
def loaded(world: dict[str, Path]) -> blip_core.LoadedModel:
    return blip_core.load(world["model"])


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file (data and records) under `folder`, by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _caption_cfg(workers: int) -> CaptionConfig:
    return CaptionConfig(num_captions=2, max_length=10, min_length=3, execution=_exec(workers))


def test_caption_one_loader_equals_per_shard_and_in_process(tmp_path: Path, world, loaded) -> None:
    shards = sorted(world["web"].glob("*.parquet"))
    one = run_caption([world["web"]], tmp_path / "one", loaded, _caption_cfg(0))
    two = run_caption([world["web"]], tmp_path / "two", loaded, _caption_cfg(2))
    per_shard = tmp_path / "per" / one.settings_hash
    for src in shards:
        caption_shard(src, per_shard, loaded, _caption_cfg(0), one.settings_hash)
    shutil.copy(one.output / "stage.json", per_shard / "stage.json")
    reference = _files(one.output)
    assert len(reference) == 2 * len(SIZES) + 1 and two.settings_hash == one.settings_hash
    assert _files(two.output) == reference
    assert _files(per_shard) == reference
    assert one.totals["captions"] == 2 * one.totals["kept"] > 0


def test_filter_one_loader_equals_per_shard_and_in_process(tmp_path: Path, world, loaded) -> None:
    caps = run_caption([world["web"]], tmp_path / "cap", loaded, _caption_cfg(0)).output
    one = run_filter([world["web"]], tmp_path / "one", loaded, FilterConfig(execution=_exec(0)), caption_dir=caps)
    two = run_filter([world["web"]], tmp_path / "two", loaded, FilterConfig(execution=_exec(2)), caption_dir=caps)
    per_shard = tmp_path / "per" / one.settings_hash
    for src in sorted(world["web"].glob("*.parquet")):
        filter_shard(src, caps / src.name, per_shard, loaded, FilterConfig(execution=_exec(0)), one.settings_hash)
    shutil.copy(one.output / "stage.json", per_shard / "stage.json")
    reference = _files(one.output)
    assert len(reference) == 3 * 2 * len(SIZES) + 1
    assert _files(two.output) == reference
    assert _files(per_shard) == reference
    assert one.totals["failed"] == 2 * len(SIZES)  # per shard: an HTTP failure and an undecodable image (neither captioned)


def test_a_bad_shard_between_good_ones_costs_only_itself(tmp_path: Path, world, loaded) -> None:
    web = tmp_path / "web"
    shutil.copytree(world["web"], web)
    (web / shard_name(1)).write_bytes(b"not parquet")
    cfg = _caption_cfg(2)
    with pytest.raises(StageIncompleteError) as failure:
        run_caption([web], tmp_path / "out", loaded, cfg)
    assert list(failure.value.failures) == [str(web / shard_name(1))]
    clean = run_caption([world["web"]], tmp_path / "clean", loaded, cfg)
    for i in (0, 2, 3):
        name = shard_name(i)
        assert (failure.value.stats.output / name).read_bytes() == (clean.output / name).read_bytes()


def test_complete_shards_are_skipped_without_decoding(tmp_path: Path, world, loaded) -> None:
    first = run_caption([world["web"]], tmp_path, loaded, _caption_cfg(0))
    (first.output / shard_name(2)).unlink()
    decoded: list[int] = []
    handle = loaded.model.vision.register_forward_hook(lambda m, args, out: decoded.append(args[0].shape[0]))
    try:
        again = run_caption([world["web"]], tmp_path, loaded, _caption_cfg(0))
    finally:
        handle.remove()
    assert [s.skipped for s in again.shards] == [True, True, False, True]
    assert sum(decoded) == read_completion(first.output / shard_name(2)).counts["kept"]


def _plans(blobs: list[list[bytes]], batch: int) -> list:
    def plan(i: int) -> Planned:
        jpg = pa.array(blobs[i], pa.binary())
        rows = list(range(len(blobs[i])))
        return Planned(i, ShardImages(jpg, [rows[j : j + batch] for j in range(0, len(rows), batch)]))

    return [lambda i=i: plan(i) for i in range(len(blobs))]


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_that_stops_early_leaves_the_next_its_own_batches(workers: int) -> None:
    blobs = [[jpeg(10 * s + r) for r in range(5)] for s in range(3)]
    transform = ImageTransform(16)
    expected = [torch.cat([p for p, _ in image_batches(pa.array(b, pa.binary()), [list(range(5))], transform,
                                                        _exec(0), torch.device("cpu"))]) for b in blobs]  # fmt: skip
    with ImageStream(_plans(blobs, 2), transform, workers, torch.device("cpu")) as stream:
        state, batches = stream.take(0)
        assert state == 0
        next(batches)  # shard 0 stops after one of its three batches
        state, batches = stream.take(1)
        got = torch.cat([p for p, _ in batches])
        assert state == 1 and torch.equal(got, expected[1])
        assert torch.equal(torch.cat([p for p, _ in stream.take(2)[1]]), expected[2])


def test_a_plan_that_raises_is_raised_for_its_shard_only() -> None:
    blobs = [[jpeg(r) for r in range(4)], [], [jpeg(7)]]
    plans = _plans(blobs, 3)
    plans[1] = lambda: (_ for _ in ()).throw(ValueError("shard 1 is broken"))
    with ImageStream(plans, ImageTransform(16), 0, torch.device("cpu")) as stream:
        assert sum(len(e) for _, e in stream.take(0)[1]) == 4
        with pytest.raises(ValueError, match="shard 1 is broken"):
            stream.take(1)
        pixels, errors = next(stream.take(2)[1])
        assert pixels.shape == (1, 3, 16, 16) and errors == [""]


def test_undecodable_bytes_come_back_as_reasons() -> None:
    jpg = pa.array([jpeg(1), b"<html>", None], pa.binary())
    (pixels, errors), = image_batches(jpg, [[0, 1, 2]], ImageTransform(16), _exec(0), torch.device("cpu"))
    assert errors[0] == "" and errors[1] and errors[2]
    assert pixels.shape == (3, 3, 16, 16) and np.isfinite(pixels.numpy()).all()


def test_cuda_options_pin_and_start_workers_safely_and_cpu_falls_back() -> None:
    cuda = loader_options(4, torch.device("cuda"))
    assert cuda["pin_memory"] is True and cuda["prefetch_factor"] == 2
    assert cuda["multiprocessing_context"].get_start_method() in ("forkserver", "spawn")
    assert loader_options(0, torch.device("cpu")) == {"num_workers": 0, "pin_memory": False}
    cpu = loader_options(2, torch.device("cpu"))
    assert cpu["pin_memory"] is False and cpu["multiprocessing_context"].get_start_method() != "fork"


def test_a_temporary_folder_too_long_for_the_loaders_sockets_decodes_in_process(tmp_path, monkeypatch, caplog) -> None:
    """The loader's processes talk over AF_UNIX sockets under the temporary folder (107 bytes
    at most): with a longer TMPDIR (a Dask worker's or a test's can be) a batch was dropped
    and the stream waited forever; it decodes in its own process instead, and says so."""
    import tempfile

    from tasks.image_batches import sockets_fit

    assert sockets_fit("/tmp") and not sockets_fit("/tmp/" + "x" * 90)
    long_dir = tmp_path / ("x" * 90)
    long_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_dir))
    jpg = pa.array([jpeg(i) for i in range(4)], pa.binary())
    stream = ImageStream([lambda: Planned(None, ShardImages(jpg, [[0, 1], [2, 3]]))], ImageTransform(16), 2, torch.device("cpu"))
    with caplog.at_level("WARNING"), stream:
        assert stream.workers == 0 and "too long a path" in caplog.text
        _, batches = stream.take(0)
        assert [len(errors) for _, errors in batches] == [2, 2]
