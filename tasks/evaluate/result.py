"""What an evaluation measured, and its ``eval/metrics.json`` form."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class EvalResult:
    """What `evaluate` measured; `to_json()` is the ``eval/metrics.json`` content."""

    model_dir: str
    model_fingerprint: str
    n_images: int
    n_texts: int
    retrieval: dict[str, float]  # scene hits (id hits when no truth is given)
    retrieval_id: dict[str, float]  # same-image hits
    captioning: dict[str, float]  # BLEU-4 / CIDEr x 100, plus scene correctness with truth
    retrieval_itc: dict[str, float] = field(default_factory=dict)  # scene (or id) hits, ITC ranking alone
    filter_detection: dict[str, Any] | None = None
    captioner: dict[str, Any] | None = None
    fingerprint: str = ""  # of model + test shards + settings: a rerun with the same is skipped
    settings: dict[str, Any] = field(default_factory=dict)
    examples: list[dict[str, str]] = field(default_factory=list)  # a few test captions

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False, allow_nan=True)

    @classmethod
    def from_json(cls, text: str) -> EvalResult:
        return cls(**json.loads(text))
