"""A tiny in-memory pairs dataset for trainer tests (blip_core must not import `data`).

Images are coloured squares on noise; captions name the colour and the size, so all
three objectives have something to learn. Order and noise are functions of
(seed, epoch, index): `set_epoch` / `start_at` give exact resume. Ranks take blocks of
`block` consecutive positions round-robin, so 2 ranks with batch B see exactly the
samples a single process with batch 2B sees in each step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

COLOURS = {"red": (1.5, -1.0, -1.0), "green": (-1.0, 1.5, -1.0), "blue": (-1.0, -1.0, 1.5), "white": (1.5, 1.5, 1.5)}
SIZES = ("small", "big")
PLACES = ("top left", "top right", "bottom left", "bottom right")
N_CLASSES = len(COLOURS) * len(SIZES) * len(PLACES)


def caption_of(index: int) -> tuple[str, int]:
    colour = list(COLOURS)[index % len(COLOURS)]
    size = SIZES[(index // len(COLOURS)) % len(SIZES)]
    place = PLACES[(index // (len(COLOURS) * len(SIZES))) % len(PLACES)]
    return f"a {size} {colour} square at the {place}", index % N_CLASSES


def all_captions() -> list[str]:
    return [caption_of(i)[0] for i in range(N_CLASSES)]


class ToyPairs(IterableDataset):
    def __init__(self, n: int, image_size: int = 32, seed: int = 0, rank: int = 0, world_size: int = 1,
                 block: int = 1, nan_at: int | None = None) -> None:
        super().__init__()
        self.n, self.image_size, self.seed = n, image_size, seed
        self.rank, self.world_size, self.block = rank, world_size, block
        self.nan_at = nan_at  # global position whose pixels are NaN (to test the NaN guard)
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def start_at(self, position: int) -> None:
        self.start = position

    def _mine(self) -> list[int]:
        order = list(range(self.n))
        random.Random(f"toy:{self.seed}:{self.epoch}").shuffle(order)
        return [p for i, p in enumerate(order) if (i // self.block) % self.world_size == self.rank]

    def __len__(self) -> int:
        return len(self._mine())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for position, index in enumerate(self._mine()):
            if position >= self.start:
                yield self.sample(index)

    def sample(self, index: int) -> dict[str, Any]:
        caption, cls = caption_of(index)
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2**31)
        s = self.image_size
        img = 0.3 * torch.randn(3, s, s, generator=g)
        colour = torch.tensor(list(COLOURS.values())[index % len(COLOURS)]).view(3, 1, 1)
        half = s // 2 if "big" in caption else s // 4
        place = PLACES[(index // (len(COLOURS) * len(SIZES))) % len(PLACES)]
        top = int(torch.randint(0, s // 2 - half + 1, (1,), generator=g)) + (s // 2 if "bottom" in place else 0)
        left = int(torch.randint(0, s // 2 - half + 1, (1,), generator=g)) + (s // 2 if "right" in place else 0)
        img[:, top : top + half, left : left + half] = colour
        if self.nan_at is not None and index == self.nan_at:
            img[:] = float("nan")
        return {"pixel_values": img, "caption": caption, "image_id": f"img-{index}", "key": f"k-{index}"}
