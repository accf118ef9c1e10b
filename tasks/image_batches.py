"""Image batches for the model stages: one DataLoader per stage streams the decoded,
transformed images of all its shards, in each shard's own batch order.

A stage plans its shards one at a time (`ImageStream(plans=...)`: each plan returns the
shard's state and its `ShardImages`, the image bytes and the row batches in model order).
The loader's sampler walks those plans lazily and in order, so its workers decode the
next shard's first batches while the model finishes this one; the stage's per-shard work
takes its batches back with `ImageStream.take(i)`. Per shard the model sees exactly the
batches a loader of its own would give (outputs are byte for byte those of a per-shard
loader and of ``num_workers=0``).

- workers: started once per stage (one pass over every shard's batches), by
  ``forkserver`` (``spawn`` where there is none), never ``fork``: forking a process that
  has started OpenMP threads or CUDA can hang or crash the child.
- prefetch: at most 2 batches per worker in flight; batches travel as uint8, pinned on
  CUDA and copied with ``non_blocking``, and are normalised once on the device.
- a shard whose plan raises, or whose work stops early, costs only that shard: its error
  is raised from `take`, and its batches still in the stream are dropped by the next shard.

`decode="reduced"` lets libjpeg decode a large JPEG at 1/2-1/8 scale (never below the
model's size) before the exact resize; ``"exact"`` decodes every pixel first.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from blip_core.image import ImageTransform, normalise
from data.images import decode_image
from tasks.execution import ExecutionConfig, resolve_workers
from tasks.stage_config import DECODE_MODES

Decode = Literal["reduced", "exact"]
log = logging.getLogger(__name__)
PREFETCH_PER_WORKER = 2  # batches decoded ahead per worker: bounded memory, the model never waits on a batch boundary

Tag = tuple[int, int]  # (shard position in the stage, batch number in the shard)


@dataclass
class ShardImages:
    """What the stream decodes for one shard: a binary column and its row batches, in model order."""

    jpg: pa.Array
    batches: list[list[int]]


@dataclass
class Planned:
    """A shard's plan: the stage's own state for its work, and the images the model needs."""

    state: Any
    images: ShardImages


class _BatchImages(Dataset):
    """(tag, [image bytes]) -> (tag, uint8 pixels (B,3,S,S), errors); an error is "" for a good
    image, else its reason (its pixels are zeros). Never raises: a batch always comes back
    tagged, so the stream can tell which shard it belongs to."""

    def __init__(self, transform: ImageTransform, reduce_to: int | None) -> None:
        self.transform = transform
        self.reduce_to = reduce_to

    def __len__(self) -> int:  # a sampler of tags drives it; the length is never used
        return 0

    def __getitem__(self, item: tuple[Tag, list[bytes | None]]) -> tuple[Tag, torch.Tensor, list[str]]:
        tag, blobs = item
        size = self.transform.image_size
        pixels = torch.zeros(len(blobs), 3, size, size, dtype=torch.uint8)  # (B, 3, S, S)
        errors = []
        for i, data in enumerate(blobs):
            try:
                decoded = decode_image(data, reduce_to=self.reduce_to)
                if decoded.image is None:
                    errors.append(decoded.error or "undecodable")
                    continue
                pixels[i] = self.transform.pixels(decoded.image)
                errors.append("")
            except Exception as exc:  # noqa: BLE001 - the image's reason; the batch must come back tagged
                errors.append(f"decode: {type(exc).__name__}: {exc}")
        return tag, pixels, errors


def _as_is(item: Any) -> Any:
    """The loader's collate: a dataset item is a whole batch already."""
    return item


class _Tags:
    """The loader's sampler: one pass over the stream's plans, yielding each batch's tag and bytes."""

    def __init__(self, stream: ImageStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[Tag, list[bytes | None]]]:
        for i in range(len(self.stream.plans)):
            planned = self.stream.plan(i)
            if not isinstance(planned, Planned):  # skipped, or its plan failed: take(i) reports it
                continue
            jpg = planned.images.jpg
            for b, rows in enumerate(planned.images.batches):
                yield (i, b), [jpg[r].as_py() for r in rows]


def start_method() -> str:
    """How decoding workers start: ``forkserver`` (a clean process forks them), else ``spawn``."""
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def sockets_fit(temp_dir: str | None = None) -> bool:
    """Whether decoding processes can talk to this one: the fork server and torch's tensor
    passing listen on AF_UNIX sockets under the temporary folder (`temp_dir`: the process's),
    whose paths may be 107 bytes at most. A longer TMPDIR (a Dask worker's or a test's can
    be) fails every shard, or worse, drops a batch without a word and the loader waits forever."""
    folder = tempfile.gettempdir() if temp_dir is None else temp_dir
    return len(os.fsencode(folder)) + _SOCKET_NAME_BYTES <= _AF_UNIX_PATH_BYTES


_AF_UNIX_PATH_BYTES = 107
_SOCKET_NAME_BYTES = len("/pymp-12345678/listener-12345678")  # multiprocessing's folder and socket names under it


def _context() -> Any:
    """The workers' multiprocessing context; the fork server imports this module (torch, PIL)
    once, so each worker it forks starts warm. As with any spawn-started worker, a script
    that runs a stage with workers must guard its entry point with ``if __name__ == "__main__":``."""
    context = multiprocessing.get_context(start_method())
    if start_method() == "forkserver":
        context.set_forkserver_preload([__name__])
    return context


def loader_options(workers: int, device: torch.device) -> dict[str, Any]:
    """The DataLoader settings for `workers` decoding processes feeding `device`."""
    options: dict[str, Any] = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers:
        options.update(prefetch_factor=PREFETCH_PER_WORKER, multiprocessing_context=_context())
    return options


class ImageStream:
    """One DataLoader over the image batches of every shard of a stage; see the module docstring.

    `plans[i]()` plans shard i (reads it, orders its rows); `workers` decoding processes
    (0: in-process, no overlap with the model); `pending(i)` says whether shard
    i has work (a complete shard is never planned nor decoded). Use as a context manager:
    the workers stop on exit.
    """

    def __init__(
        self,
        plans: Sequence[Callable[[], Planned]],
        transform: ImageTransform,
        workers: int,
        device: torch.device,
        decode: Decode = "exact",
        pending: Callable[[int], bool] = lambda i: True,
    ) -> None:
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {DECODE_MODES}, got {decode!r}")
        self.plans = plans
        self.pending = pending
        self.device = device
        # a training crop may want every pixel of a small region: only eval resizes reduce
        reduce_to = transform.image_size if decode == "reduced" and not transform.train else None
        if workers and not sockets_fit():
            log.warning("the temporary folder %s is too long a path for the image loader's sockets (AF_UNIX, 107 bytes): "
                        "decoding in this process; set TMPDIR to a shorter folder to decode in %d processes",
                        tempfile.gettempdir(), workers)  # fmt: skip
            workers = 0
        self.workers = workers
        self._loader = DataLoader(_BatchImages(transform, reduce_to), sampler=_Tags(self), batch_size=None,
                                  collate_fn=_as_is, **loader_options(self.workers, device))  # fmt: skip
        self._planned: dict[int, Planned | BaseException | None] = {}
        self._iterator: Iterator[Any] | None = None
        self._held: tuple[Tag, torch.Tensor, list[str]] | None = None  # a batch read ahead of its shard

    def __enter__(self) -> ImageStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (also safe when they never started)."""
        self._iterator = None  # the loader's iterator shuts its workers down when released
        self._planned.clear()

    def plan(self, i: int) -> Planned | BaseException | None:
        """Shard i's plan, made once: None when it has no work, the exception when planning failed."""
        if i not in self._planned:
            try:
                self._planned[i] = self.plans[i]() if self.pending(i) else None
            except Exception as exc:  # noqa: BLE001 - raised from take(i), for shard i only
                self._planned[i] = exc
        return self._planned[i]

    def take(self, i: int) -> tuple[Any, Iterator[tuple[torch.Tensor, list[str]]]]:
        """Shard i's state and its batches: (pixel_values (B,3,S,S) float on the device, errors)."""
        planned = self.plan(i)
        if isinstance(planned, BaseException):
            self._planned.pop(i)
            raise planned
        if planned is None:
            raise RuntimeError(f"shard {i} was found complete when the stream planned it; rerun the stage")
        return planned.state, self._batches(i, len(planned.images.batches))

    def _batches(self, i: int, count: int) -> Iterator[tuple[torch.Tensor, list[str]]]:
        got = 0
        while got < count:
            tag, pixels, errors = self._next()
            if tag[0] < i:  # left by a shard that stopped early
                continue
            if tag != (i, got):
                self._held = (tag, pixels, errors)
                raise RuntimeError(f"image stream out of order: expected batch {(i, got)}, got {tag}")
            got += 1
            yield normalise(pixels.to(self.device, non_blocking=True)), list(errors)  # (B, 3, S, S) float
        self._planned.pop(i, None)

    def _next(self) -> tuple[Tag, torch.Tensor, list[str]]:
        if self._held is not None:
            held, self._held = self._held, None
            return held
        if self._iterator is None:
            self._iterator = iter(self._loader)
        try:
            return next(self._iterator)
        except StopIteration:
            raise RuntimeError("image stream ended before every planned batch was read") from None


def image_batches(
    jpg: pa.Array,
    batches: list[list[int]],
    transform: ImageTransform,
    execution: ExecutionConfig,
    device: torch.device,
    decode: Decode = "exact",
) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """One shard's batches through its own `ImageStream`: (pixel_values (B,3,S,S) float on
    `device`, errors) in batch order; an error is "" for a good image, else the reason."""
    if not batches:
        return
    workers = resolve_workers(execution.num_workers, device)
    with ImageStream([lambda: Planned(None, ShardImages(jpg, batches))], transform, workers, device, decode) as stream:
        _, out = stream.take(0)
        yield from out


def index_batches(indices: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive chunks of at most `batch_size` row indices."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
