"""PairDataset: exact partition over ranks and workers, deterministic order, exact resume."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.dataset import PairDataset
from data.shards import shard_name, write_shard

# Rows per shard; row groups of 3 rows, so units are uneven in size.
SHARD_ROWS = (7, 5, 9, 4)
ROW_GROUP = 3
BATCH = 2


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 255 - value, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pairs")
    paths, index = [], 0
    for s, n in enumerate(SHARD_ROWS):
        rows = []
        for _ in range(n):
            key = f"k{index:03d}"
            status, jpg = "ok", _png(index)
            if index % 10 == 3:
                status, jpg = "failed", None  # a failed download
            elif index == 11:
                jpg = b"<html>not found</html>"  # marked ok but undecodable
            rows.append(
                {"key": key, "image_id": f"i{index}", "source": "human" if index % 4 == 0 else "web",
                 "caption": f"caption {index}", "jpg": jpg, "status": status}
            )
            index += 1
        path = folder / shard_name(s)
        write_shard(pa.Table.from_pylist(rows, schema=_input_schema()), path, "pairs", row_group_size=ROW_GROUP)
        paths.append(path)
    return paths


def _input_schema() -> pa.Schema:
    return pa.schema([("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()),
                      ("caption", pa.string()), ("jpg", pa.binary()), ("status", pa.string())])


ALL = [f"k{i:03d}" for i in range(sum(SHARD_ROWS))]
GOOD = [k for i, k in enumerate(ALL) if i % 10 != 3 and i != 11]


def transform(image: Image.Image, rng: random.Random) -> torch.Tensor:
    """Red channel of the image plus a random draw: shows both content and augmentation."""
    red = float(image.getpixel((0, 0))[0])
    return torch.tensor([red, rng.random(), 0.0]).view(3, 1, 1)  # (3, 1, 1)


def _make(shards: list[Path], **kwargs) -> PairDataset:
    kwargs.setdefault("seed", 17)
    return PairDataset(shards, transform, **kwargs)


def _keys(ds: PairDataset, workers: int = 0, batch: int = BATCH) -> list[str]:
    if workers == 0:
        return [s["key"] for s in ds]
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, multiprocessing_context="forkserver")
    return [k for b in loader for k in b["key"]]


def test_yields_every_good_row_once_and_counts_the_rest(shards: list[Path]) -> None:
    ds = _make(shards)
    samples = list(ds)
    assert sorted(s["key"] for s in samples) == GOOD
    assert ds.filtered_counts() == {"failed": 3}
    assert ds.stats == Counter(undecodable=1, yielded=len(GOOD))
    sample = samples[0]
    assert set(sample) == {"key", "image_id", "caption", "source", "pixel_values", "position"}
    assert sample["pixel_values"].shape == (3, 1, 1)
    assert sample["pixel_values"][0, 0, 0] == int(sample["key"][1:])  # the right image for the key
    assert sample["image_id"] == "i" + str(int(sample["key"][1:])) and sample["caption"].startswith("caption")


def test_order_depends_on_seed_and_epoch_only(shards: list[Path]) -> None:
    a, b = _keys(_make(shards)), _keys(_make(shards))
    assert a == b
    ds = _make(shards)
    ds.set_epoch(1)
    assert _keys(ds) != a and sorted(_keys(ds)) == sorted(a)
    assert _keys(_make(shards, seed=18)) != a
    assert _keys(_make(shards, shuffle=False)) == GOOD


@pytest.mark.parametrize("mix", [1, 3])
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_partition_without_overlap_or_loss(shards: list[Path], world_size: int, mix: int) -> None:
    parts = [_keys(_make(shards, rank=r, world_size=world_size, mix_units=mix)) for r in range(world_size)]
    flat = [k for part in parts for k in part]
    assert sorted(flat) == GOOD and len(set(flat)) == len(flat)
    lengths = _make(shards, world_size=world_size).lengths_by_rank()
    assert sum(lengths) == len(GOOD) + 1  # the undecodable row has a position


def test_equalize_truncates_to_shortest_rank(shards: list[Path]) -> None:
    datasets = [_make(shards, rank=r, world_size=3, equalize=True) for r in range(3)]
    lengths = datasets[0].lengths_by_rank()
    assert {len(d) for d in datasets} == {min(lengths)}
    for d in datasets:
        assert max(s["position"] for s in d) < min(lengths)


@pytest.mark.parametrize("mix", [1, 3])
def test_workers_give_the_same_stream_as_one_process(shards: list[Path], mix: int) -> None:
    exact_ranks = 0
    for rank in range(2):
        single = _make(shards, rank=rank, world_size=2, block_size=BATCH, mix_units=mix)
        one = _keys(single)
        two = _keys(_make(shards, rank=rank, world_size=2, block_size=BATCH, mix_units=mix), workers=2)
        # block_size == batch_size: the same order (unless a row failed to decode, which
        # shifts that worker's batches by one); any block size: the same multiset.
        assert sorted(two) == sorted(one)
        if single.stats["undecodable"] == 0:
            assert two == one
            exact_ranks += 1
        other = _keys(_make(shards, rank=rank, world_size=2, block_size=1, mix_units=mix), workers=2)
        assert sorted(other) == sorted(one)
    assert exact_ranks == 1


def test_augmentation_is_independent_of_workers(shards: list[Path]) -> None:
    def draws(workers: int) -> dict[str, float]:
        ds = _make(shards, block_size=3)
        if workers == 0:
            return {s["key"]: float(s["pixel_values"][1]) for s in ds}
        loader = DataLoader(ds, batch_size=3, num_workers=workers, multiprocessing_context="forkserver")
        return {k: float(v) for b in loader for k, v in zip(b["key"], b["pixel_values"][:, 1, 0, 0])}

    single = draws(0)
    assert draws(2) == single
    ds = _make(shards)
    ds.set_epoch(1)
    assert {s["key"]: float(s["pixel_values"][1]) for s in ds} != single  # a new epoch, new draws


@pytest.mark.parametrize("mix", [1, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_start_at_resumes_exactly(shards: list[Path], workers: int, mix: int) -> None:
    shards = [shards[0], shards[2], shards[3]]  # exact batches need every row to decode
    full = list(_make(shards, block_size=BATCH, mix_units=mix))
    positions = [s["position"] for s in full]
    assert positions == sorted(positions)
    for start in (0, 1, 4, 9, len(full) + 5):
        ds = _make(shards, block_size=BATCH, mix_units=mix)
        ds.start_at(start)
        expected = [s["key"] for s in full if s["position"] >= start]
        assert _keys(ds, workers=workers) == expected
    ds = _make(shards)
    ds.start_at(4)
    ds.set_epoch(2)  # a new epoch starts from the beginning
    assert len(list(ds)) == len(full)


def test_mix_units_shuffles_consecutive_units_together(shards: list[Path]) -> None:
    plain = _make(shards)
    assert _keys(_make(shards, mix_units=1)) == _keys(plain)  # 1: the unit-by-unit order
    mixed = list(_make(shards, mix_units=3))
    assert sorted(s["key"] for s in mixed) == GOOD and [s["key"] for s in mixed] != _keys(plain)

    def key(shard: int, row_group: int, row: int) -> str:
        return f"k{sum(SHARD_ROWS[:shard]) + row_group * ROW_GROUP + row:03d}"

    # the positions of each window of 3 units hold exactly that window's rows, interleaved
    units = plain._units_by_rank()[0]
    start, shards_per_window = 0, []
    for i in range(0, len(units), 3):
        window = units[i : i + 3]
        end = start + sum(len(u.rows) for u in window)
        inside = {s["key"] for s in mixed if start <= s["position"] < end}
        assert inside == {key(u.shard, u.row_group, r) for u in window for r in u.rows} & set(GOOD)
        shards_per_window.append(len({u.shard for u in window}))
        start = end
    assert max(shards_per_window) > 1  # so a batch can draw from several shards
    with pytest.raises(ValueError, match="mix_units"):
        _make(shards, mix_units=0)


def test_include_sources(shards: list[Path]) -> None:
    ds = _make(shards, include_sources={"human"})
    keys = _keys(ds)
    assert keys and all(int(k[1:]) % 4 == 0 for k in keys)
    assert ds.filtered_counts()["excluded_source"] == sum(1 for i in range(len(ALL)) if i % 4 and i % 10 != 3)


def test_bad_arguments(shards: list[Path]) -> None:
    with pytest.raises(ValueError, match="rank"):
        _make(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match="start"):
        _make(shards).start_at(-1)
