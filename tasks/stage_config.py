"""The stages' settings (caption, filter, assemble, and how each runs), free of torch and
pyarrow, so the command line builds its options from them and a run config validates them
without loading a model library. Each stage's module re-exports its class
(`tasks.caption.CaptionConfig` is this module's); the code that reads a field lives there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

DECODE_MODES = ("reduced", "exact")
STRATEGIES = ("nucleus", "beam", "greedy")


@dataclass
class ExecutionConfig:
    """How a stage runs; never part of the settings hash (results do not depend on it).

    In a run config, a stage's `device` left at ``auto`` and `num_workers` left at -1
    follow the run's own `device` and `loader_workers` (see `flows.steps.stage_config`).
    """

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    batch_size: int = 0  # images per model call; 0 = auto: 32 on CPU, from free device memory on CUDA (see `resolve_batch_size`)
    num_workers: int = -1  # DataLoader processes decoding images; 0 = in-process, -1 = auto from this process's cores (see `resolve_workers`)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere) | fp32 | bf16; enters the hash resolved
    progress: bool = True  # a bar with images/s on a terminal, plain lines every ~10 s or 5 % otherwise

    def __post_init__(self) -> None:
        require(self.batch_size >= 0, f"batch_size must be 0 (auto) or more, got {self.batch_size}")
        require(self.num_workers >= -1, f"num_workers must be -1 (auto), 0 (in-process) or more, got {self.num_workers}")


def require(condition: bool, message: str) -> None:
    """Raise ValueError(`message`) unless `condition`: a stage config's field check (pydantic
    reports it against the config's block in a run config)."""
    if not condition:
        raise ValueError(message)


@dataclass
class CaptionConfig:
    """Caption stage settings; all but `execution` enter the output folder's hash. The run
    config's `caption:` block is this class (`flows.config.RunConfig`)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    strategy: Literal["nucleus", "beam", "greedy"] = "nucleus"
    num_captions: int = 1  # synthetic captions per image (the paper: 1)
    top_p: float = 0.9  # nucleus mass (BLIP: 0.9)
    top_k: int = 0  # 0 = off (BLIP's released code ran with transformers' default 50)
    temperature: float = 1.0
    num_beams: int = 3  # beam search only (BLIP: 3)
    repetition_penalty: float = 1.0  # BLIP's released sampling code uses 1.1
    max_length: int = 20  # decoder tokens including [DEC] and the prompt (BLIP: 20)
    min_length: int = 5  # (BLIP: 5)
    prompt: str = "a picture of "  # fed to the decoder after [DEC], stripped from the output
    seed: int = 0  # run seed; each image's seed derives from (seed, web key)
    decode: Literal["reduced", "exact"] = "reduced"  # reduced: large JPEGs decoded by libjpeg at 1/2-1/8 scale (>= model size) before the resize; exact: every pixel
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        require(self.num_captions >= 1, f"num_captions must be >= 1, got {self.num_captions}")
        require(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        require(self.temperature > 0 and self.repetition_penalty > 0, "temperature and repetition_penalty must be > 0")
        require(self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        require(self.decode in DECODE_MODES, f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        require(0 <= self.min_length <= self.max_length and self.max_length >= 2,
                f"need 0 <= min_length <= max_length and max_length >= 2, got {self.min_length}, {self.max_length}")
        if self.strategy == "greedy" and self.num_captions > 1:
            raise ValueError("greedy decoding gives one caption per image; use nucleus for num_captions > 1")


@dataclass
class FilterConfig:
    """Filter stage settings; all but `execution` enter the output folder's hash. The run
    config's `filter:` block is this class (`flows.config.RunConfig`).

    `itm_first_token` decides which scores `threshold` is compared with. The default,
    ``enc``, is BLIP's convention: the ITM head was trained on the `[ENC]` token, so the
    caption starts with `[ENC]`. transformers' `BlipForImageTextRetrieval` (and tools built
    on it, such as Data-Juicer) scores the same caption with `[CLS]` first instead
    (transformers#25629, #22732); on the same weights the two match probabilities differ
    (docs/BENCHMARKS.md, "ITM first token"). Set ``cls`` only when a threshold was
    calibrated on those tools' scores; left at ``enc`` it is not in the folder's hash.
    """

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    threshold: float = 0.5  # keep when softmax ITM P(match) >= threshold (BLIP: 0.5)
    top_k: int | None = None  # keep at most this many synthetic captions per image (best first)
    max_text_tokens: int = 35  # ITM text length, [ENC] and [SEP] included (BLIP: 35)
    decode: Literal["reduced", "exact"] = "reduced"  # reduced: large JPEGs decoded by libjpeg at 1/2-1/8 scale (>= model size) before the resize; exact: every pixel
    itm_first_token: Literal["enc", "cls"] = "enc"  # enc: [ENC] first, as BLIP trained its ITM head; cls: [CLS] first, as transformers' BlipForImageTextRetrieval scores
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        require(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold}")
        require(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or null (no limit), got {self.top_k}")
        require(self.max_text_tokens >= 3, f"max_text_tokens must be >= 3 ([ENC], a word, [SEP]), got {self.max_text_tokens}")
        require(self.decode in DECODE_MODES, f"decode must be one of {DECODE_MODES}, got {self.decode!r}")
        require(self.itm_first_token in ("enc", "cls"), f"itm_first_token must be 'enc' or 'cls', got {self.itm_first_token!r}")


@dataclass
class AssembleConfig:
    """Assemble settings; all but `execution` enter the output folder's hash. The run
    config's `assemble:` block is this class (`flows.config.RunConfig`)."""

    __pydantic_config__ = {"extra": "forbid"}  # a misspelt field in a run config is an error

    rows_per_shard: int = 10_000  # rows per output shard of D'
    dedupe: bool = True  # drop exact duplicate (image sha256, normalised caption) pairs
    sources: tuple[str, ...] = ()  # only these row sources, one after another (see module doc); () = all, in input order
    threshold: float | None = None  # re-decide scored rows at this ITM threshold from their stored scores (no rescoring); null = the filter's verdicts
    top_k: int | None = None  # in a re-decision, at most this many synthetic captions per image; null = no limit (a filter's top_k is not inherited)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        require(self.rows_per_shard >= 1, f"rows_per_shard must be >= 1, got {self.rows_per_shard}")
        require(self.threshold is None or 0 <= self.threshold <= 1, f"threshold must be in [0, 1] or null, got {self.threshold}")
        require(self.top_k is None or self.top_k >= 1, f"top_k must be >= 1 or null (no limit), got {self.top_k}")

    @property
    def redecides(self) -> bool:
        """Whether the scored inputs' verdicts are decided anew (threshold or top_k set)."""
        return self.threshold is not None or self.top_k is not None
