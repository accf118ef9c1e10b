"""`TrainConfig`: one dataclass for the trainer, with BLIP's defaults per mode.

Modes and their objectives:
- ``pretrain``: ITC + ITM + LM, 224 px, warmup then step decay x0.9 per epoch, lr 3e-4.
- ``finetune-filter``: ITC + ITM with retrieval positives (shared image id), 384 px, cosine, lr 1e-5.
- ``finetune-captioner``: LM with the prompt "a picture of ", 384 px, cosine, lr 1e-5.

Build one with `TrainConfig.for_mode(mode, out_dir=..., **overrides)`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from blip_core.config import preset as model_preset
from blip_core.tokenizer import DEFAULT_PROMPT

Mode = Literal["pretrain", "finetune-filter", "finetune-captioner"]
MODES: tuple[str, ...] = ("pretrain", "finetune-filter", "finetune-captioner")

OBJECTIVES: dict[str, tuple[str, ...]] = {
    "pretrain": ("itc", "itm", "lm"),
    "finetune-filter": ("itc", "itm"),
    "finetune-captioner": ("lm",),
}

# BLIP's input sizes: pretraining at 224 px, finetuning (and CapFilt) at 384 px.
_MODE_IMAGE_SIZE = {"pretrain": 224, "finetune-filter": 384, "finetune-captioner": 384}
# Per-mode recipe defaults (BLIP's released configs, scaled to one process).
_MODE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": dict(lr=3e-4, schedule="step", warmup_steps=3000, epochs=20, max_words=30, text_max_length=30, min_scale=0.2),
    "finetune-filter": dict(lr=1e-5, schedule="cosine", warmup_steps=0, epochs=6, max_words=30, text_max_length=35, min_scale=0.5),
    "finetune-captioner": dict(lr=1e-5, schedule="cosine", warmup_steps=0, epochs=5, max_words=30, text_max_length=40, min_scale=0.5),
}

# Fields that may change between a run and its resume (bookkeeping only). Everything
# else, the run length included (a cosine schedule spans it), must match the checkpoint.
# `init` is where the initial weights lie; `init_weights` (their fingerprint) is what counts,
# so a run folder moved elsewhere resumes.
OPERATIONAL_FIELDS = frozenset(
    {"out_dir", "resume", "progress", "log_every", "checkpoint_every", "keep_last", "num_workers", "device", "compile",
     "init"}
)


@dataclass
class TrainConfig:
    """Everything the trainer needs besides the data; see `for_mode` for per-mode defaults."""

    mode: str = "pretrain"
    out_dir: str = "runs/train"
    preset: str = "tiny"  # model preset when training from scratch (tiny | base | large)
    init: str | None = None  # checkpoint folder to start from (ours or a Hugging Face BLIP folder)
    init_weights: str | None = None  # fingerprint of init's weights: the identity a resume checks
    data: str | None = None  # identity of the training shards (their fingerprints), set by the caller
    image_size: int = 0  # 0: the mode's BLIP size (224 / 384); the tiny preset keeps its own size
    # -- optimisation --
    epochs: int = 20
    max_steps: int | None = None  # stop (and end the schedule) after this many optimizer steps
    batch_size: int = 32  # per rank, per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr: float = 1e-6  # floor of the step decay; cosine ends here
    warmup_lr: float = 1e-6  # lr at step 0 of the warmup
    warmup_steps: int = 3000
    schedule: str = "step"  # "step": lr * decay_rate ** epoch after warmup; "cosine": per step to min_lr
    decay_rate: float = 0.9
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global grad norm (None: no clipping)
    # -- objectives --
    momentum: float = 0.995  # EMA decay of the momentum encoders
    queue_size: int = 57_600  # momentum features kept per modality; multiple of the global batch
    alpha: float = 0.4  # weight of the momentum-distilled targets
    alpha_ramp_steps: int = 0  # alpha rises linearly from 0 over these steps (0: the first epoch)
    label_smoothing: float = 0.1
    prompt: str = ""  # decoder prompt, masked out of the LM loss (captioner: "a picture of ")
    max_words: int = 30  # captions are cut to this many words
    text_max_length: int = 35  # tokens per text, special tokens included
    min_scale: float = 0.2  # random resized crop area range starts here
    # -- system --
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    bf16: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    activation_checkpointing: bool = False  # recompute ViT blocks in backward to save memory
    compile: bool = False  # torch.compile the ViT
    num_workers: int = 0  # DataLoader workers per rank
    # row groups whose rows are shuffled together (data.dataset.PairDataset): batches then mix
    # shards and sources (human and web shards) instead of coming from one row group
    mix_units: int = 8
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_last: int = 3  # complete checkpoints kept
    resume: bool = False  # continue from the newest complete checkpoint in out_dir
    progress: bool = True  # rank 0: a bar on a terminal, plain lines otherwise (blip_core.progress)
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, saved with checkpoints

    @classmethod
    def for_mode(cls, mode: str, **overrides: Any) -> TrainConfig:
        """BLIP's defaults for `mode`, then `overrides` (unknown names raise)."""
        if mode not in MODES:
            raise ValueError(f"unknown training mode {mode!r}; choose one of {list(MODES)}")
        values: dict[str, Any] = {"mode": mode, **_MODE_DEFAULTS[mode]}
        if mode == "finetune-captioner":
            values["prompt"] = DEFAULT_PROMPT
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown TrainConfig fields {unknown}")
        values.update(overrides)
        cfg = cls(**values)
        cfg.validate()
        return cfg

    @property
    def objectives(self) -> tuple[str, ...]:
        return OBJECTIVES[self.mode]

    @property
    def retrieval(self) -> bool:
        """Filter finetuning treats all pairs sharing an image id as positives."""
        return self.mode == "finetune-filter"

    def resolved_image_size(self) -> int:
        """The input size: explicit, else the tiny preset's own, else the mode's BLIP size."""
        if self.image_size:
            return self.image_size
        if self.preset == "tiny" and self.init is None:
            return model_preset("tiny").vision.image_size
        return _MODE_IMAGE_SIZE[self.mode]

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        for name in ("batch_size", "grad_accum", "epochs", "queue_size", "log_every", "checkpoint_every", "keep_last", "mix_units"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if not 0.0 < self.min_scale <= 1.0:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)

    def semantic_diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """Fields (other than OPERATIONAL_FIELDS) whose values differ: name -> (self, other)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            k: (mine[k], theirs.get(k))
            for k in mine
            if k not in OPERATIONAL_FIELDS and _norm(mine[k]) != _norm(theirs.get(k))
        }


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
