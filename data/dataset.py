"""A streaming, deterministic, resumable training dataset over pair shards.

Order. The unit of work is one Parquet row group of one shard. For each epoch the
units are permuted by ``(seed, epoch)`` and dealt round-robin to DDP ranks, so ranks
partition the data without overlap or loss. A rank's *stream* is its units in that
order, the rows of each unit permuted by ``(seed, epoch, unit)``; with ``mix_units = k``
the rows of each k consecutive units are permuted together instead, so a batch mixes
shards (human and web shards, say) rather than coming from one row group. Only rows with
``status == "ok"`` (and a source in `include_sources`) get a stream position; that
filter reads just the small ``status`` / ``source`` columns.

Workers. DataLoader workers split the rank's stream (from the `start_at` position on)
in blocks of `block_size` positions, dealt round-robin: worker w takes blocks w, w+k, w+2k, ... Since a
DataLoader (``in_order=True``, the default) fetches batches from workers round-robin,
setting ``block_size`` to the DataLoader's ``batch_size`` makes the batches arrive in
exactly the rank's stream order whatever the number of workers; with another block
size the same samples arrive, in another interleaving. Each worker reads only the row
groups that hold one of its blocks, one window of `mix_units` row groups at a time
(bounded memory).

Resume. ``start_at(n)`` skips the first n positions of this rank's stream for the
current epoch (``set_epoch`` resets it), so after ``steps`` optimizer steps of batch B
a trainer resumes with ``start_at(steps * B)``. Each sample carries its ``position``.
Rows whose bytes fail to decode at this point (rare: ingestion already marks
undecodable rows failed) are skipped, counted and logged; they keep their position, so
the stream stays the same, but that worker's next batch takes one sample from its next
block, so exactness of resume holds as long as decoding succeeds.

Augmentation. The transform receives a ``random.Random`` seeded from
``(seed, epoch, key)``: a sample gets the same augmentation whatever rank, worker or
resume point delivers it. Do not use ``persistent_workers=True``: workers keep their
own copy of the epoch.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from data.images import DEFAULT_MAX_PIXELS, decode_image
from data.shards import read_row_group, read_table, row_group_sizes

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image, random.Random], torch.Tensor]

_FILTER_COLUMNS = ["status", "source"]
_SAMPLE_COLUMNS = ["key", "image_id", "caption", "source", "jpg"]
_OK = "ok"


@dataclass(frozen=True)
class _Unit:
    """One row group of one shard and the rows of it that pass the cheap filters."""

    shard: int  # index into the dataset's shard list
    row_group: int
    rows: tuple[int, ...]  # row indices within the row group, in file order


class PairDataset(IterableDataset):
    """Image-text pairs from shards as dicts ``{key, image_id, caption, source,
    pixel_values (3,H,W), position}`` in a deterministic, resumable order (see module doc).

    `stats` counts, in the process that iterates (each DataLoader worker has its own),
    ``undecodable`` rows skipped and ``yielded`` samples; `filtered_counts()` gives the
    rows that never get a position (``failed`` status, ``excluded_source``).
    """

    def __init__(
        self,
        shards: Sequence[Path],
        transform: Transform,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        include_sources: set[str] | None = None,
        block_size: int = 1,
        equalize: bool = False,
        kind: str = "pairs",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        mix_units: int = 1,
    ) -> None:
        """`equalize` truncates every rank's stream to the shortest rank's length, so
        DDP ranks run the same number of steps (drops at most one unit's worth of rows
        per rank); off by default so nothing is lost.

        `mix_units` shuffles the rows of that many consecutive units (of the rank's unit
        order) together, so one batch draws from several row groups, and so from several
        shards and sources, instead of one; a worker then holds up to that many row groups
        in memory. 1 keeps every unit's rows together (the order before this option)."""
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if mix_units < 1:
            raise ValueError(f"mix_units must be >= 1, got {mix_units}")
        self.shards = [Path(p) for p in shards]
        self.transform = transform
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.include_sources = set(include_sources) if include_sources is not None else None
        self.block_size = block_size
        self.equalize = equalize
        self.kind = kind
        self.max_pixels = max_pixels
        self.mix_units = mix_units
        self.stats: Counter[str] = Counter()
        self._epoch = 0
        self._start = 0
        self._units: list[_Unit] | None = None
        self._filtered: Counter[str] = Counter()

    # -- order -------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Use the order of `epoch` from the next iteration on; resets `start_at`."""
        self._epoch = epoch
        self._start = 0

    def start_at(self, position: int) -> None:
        """Skip the first `position` stream positions of this rank in the current epoch."""
        if position < 0:
            raise ValueError(f"start position must be >= 0, got {position}")
        self._start = position

    @property
    def epoch(self) -> int:
        return self._epoch

    def units(self) -> list[_Unit]:
        """All units of all shards (reads only footers and the status/source columns, once)."""
        if self._units is None:
            self._units = []
            for index, path in enumerate(self.shards):
                self._units.extend(self._shard_units(index, path))
        return self._units

    def _shard_units(self, index: int, path: Path) -> list[_Unit]:
        sizes = row_group_sizes(path, self.kind)
        table = read_table(path, self.kind, columns=_FILTER_COLUMNS)
        status = table.column("status").to_pylist()
        source = table.column("source").to_pylist()
        units, offset = [], 0
        for group, size in enumerate(sizes):
            rows = []
            for row in range(size):
                if status[offset + row] != _OK:
                    self._filtered["failed"] += 1
                elif self.include_sources is not None and source[offset + row] not in self.include_sources:
                    self._filtered["excluded_source"] += 1
                else:
                    rows.append(row)
            units.append(_Unit(shard=index, row_group=group, rows=tuple(rows)))
            offset += size
        return units

    def filtered_counts(self) -> dict[str, int]:
        """Rows never given a position, by reason (same for every rank and epoch)."""
        self.units()
        return dict(self._filtered)

    def _units_by_rank(self) -> list[list[_Unit]]:
        units = self.units()
        order = list(range(len(units)))
        if self.shuffle:
            random.Random(f"capfilt-units:{self.seed}:{self._epoch}").shuffle(order)
        return [[units[i] for i in order[r :: self.world_size]] for r in range(self.world_size)]

    def lengths_by_rank(self) -> list[int]:
        """Stream length (positions) of every rank in the current epoch."""
        return [sum(len(u.rows) for u in units) for units in self._units_by_rank()]

    def __len__(self) -> int:
        """This rank's stream length in the current epoch (after `equalize`, before `start_at`)."""
        lengths = self.lengths_by_rank()
        return min(lengths) if self.equalize else lengths[self.rank]

    def _rows_in_order(self, units: list[_Unit]) -> list[tuple[int, int]]:
        """The stream order of a window of units: ``(index in units, row)`` pairs."""
        if len(units) == 1:
            unit = units[0]
            rows = list(unit.rows)
            if self.shuffle:
                random.Random(f"capfilt-rows:{self.seed}:{self._epoch}:{unit.shard}:{unit.row_group}").shuffle(rows)
            return [(0, row) for row in rows]
        pairs = [(i, row) for i, unit in enumerate(units) for row in unit.rows]
        if self.shuffle:
            head = units[0]
            random.Random(f"capfilt-mix:{self.seed}:{self._epoch}:{head.shard}:{head.row_group}").shuffle(pairs)
        return pairs

    def stream(self, worker: int = 0, num_workers: int = 1) -> Iterator[tuple[int, list[_Unit], list[tuple[int, int, int]]]]:
        """Per window of `mix_units` units of this rank: ``(first position, units,
        [(position, index in units, row), ...])`` for the rows this worker takes, skipping
        windows where it takes none."""
        stop = len(self)
        position = 0
        units = self._units_by_rank()[self.rank]
        for start in range(0, len(units), self.mix_units):
            window = units[start : start + self.mix_units]
            first = position
            mine = []
            for index, row in self._rows_in_order(window):
                if position >= stop:
                    break
                if position >= self._start and ((position - self._start) // self.block_size) % num_workers == worker:
                    mine.append((position, index, row))
                position += 1
            if mine:
                yield first, window, mine
            if position >= stop:
                return

    # -- samples -----------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for _, window, mine in self.stream(worker, num_workers):
            # At most `mix_units` row groups in memory at a time: those this worker takes rows of.
            needed = sorted({index for _, index, _ in mine})
            columns = {}
            for index in needed:
                unit = window[index]
                table = read_row_group(self.shards[unit.shard], self.kind, unit.row_group, columns=_SAMPLE_COLUMNS)
                columns[index] = {name: table.column(name) for name in _SAMPLE_COLUMNS}
            for position, index, row in mine:
                sample = self._sample(columns[index], row, position, window[index])
                if sample is not None:
                    yield sample
            del columns

    def _sample(self, columns: dict, row: int, position: int, unit: _Unit) -> dict[str, Any] | None:
        key = columns["key"][row].as_py()
        decoded = decode_image(columns["jpg"][row].as_py(), self.max_pixels)
        if decoded.image is None:
            self.stats["undecodable"] += 1
            log.warning("skipping %s (%s row group %d): %s", key, self.shards[unit.shard], unit.row_group, decoded.error)
            return None
        rng = random.Random(f"capfilt-sample:{self.seed}:{self._epoch}:{key}")
        self.stats["yielded"] += 1
        return {
            "key": key,
            "image_id": columns["image_id"][row].as_py(),
            "caption": columns["caption"][row].as_py() or "",
            "source": columns["source"][row].as_py(),
            "pixel_values": self.transform(decoded.image, rng),  # (3, H, W)
            "position": position,
        }
