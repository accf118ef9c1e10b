"""The evaluation's settings, and which of them change the numbers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tasks.evaluate.metrics import DEFAULT_RERANK_K
from tasks.execution import require


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation settings; all but `batch_size` and `device` are semantic (they change the
    numbers). The run config's `evaluate:` block is this class (`flows.config.RunConfig`)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    rerank_k: int = DEFAULT_RERANK_K  # ITC top-k re-scored by ITM per query (BLIP: 256 on COCO)
    max_text_tokens: int = 35
    caption_strategy: str = "beam"  # BLIP evaluates captioning with 3-beam search
    num_beams: int = 3
    max_caption_tokens: int = 20
    min_caption_tokens: int = 5
    prompt: str = ""  # decoder prompt; "a picture of " for a finetuned captioner
    max_images: int | None = None  # evaluate only the first N test images (None: all)
    image_size: int | None = None  # None: the model's own
    batch_size: int = 64  # execution only: images per forward pass
    device: str = "auto"  # execution only: auto (cuda when available) | cpu | cuda[:N]
    progress: bool = True  # execution only: bars on a terminal, plain lines otherwise (blip_core.progress)

    def __post_init__(self) -> None:
        require(self.rerank_k >= 1 and self.batch_size >= 1, "rerank_k and batch_size must be >= 1")
        require(self.caption_strategy in ("beam", "greedy", "nucleus"),
                f"caption_strategy must be beam, greedy or nucleus, got {self.caption_strategy!r}")  # fmt: skip


_EXECUTION_FIELDS = ("batch_size", "device", "progress")


def semantic_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that change the numbers (recorded in the result and its fingerprint)."""
    d = dataclasses.asdict(cfg)
    for name in _EXECUTION_FIELDS:
        d.pop(name)
    return d
