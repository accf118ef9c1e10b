"""One typed run configuration for the bootstrap flow, with presets and YAML loading.

`RunConfig` is the flow's only parameter, so Prefect validates it (and shows it in the
UI); the CLI and YAML files build the same model. Sub-models hold one component each,
and a stage's block is that stage's own config class (`tasks.stage_config`: `CaptionConfig`,
`FilterConfig`, `AssembleConfig`), so a field added there is
settable here, from YAML and from `capfilt run --set caption.top_k=50`, with no copy.
A config may name a `preset` ("demo", "demo-quick", "gpu"): the preset fills in every
field the config does not set, so a YAML file or a deployment lists only what differs.

Semantic settings (what changes a stage's output) and execution settings (batch sizes,
workers, device) live side by side; the stages decide which of them enter their
settings hash, so changing a batch size never invalidates finished shards.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from data.storage import ENV_REFERENCE, StorageConfig, is_secret_value
from data.synth_video import VideoWorldConfig
from tasks.evaluate.config import EvalConfig
from tasks.stage_config import AssembleConfig, CaptionConfig, FilterConfig
from tasks.train import TrainStageConfig
from tasks.video_eval import VideoEvalConfig

# The bootstrap's stages in order; `stop_after` names one of them.
Stage = Literal["ingest", "pretrain", "finetune", "caption", "filter", "assemble", "final", "evaluate"]
STAGES: tuple[str, ...] = get_args(Stage)
PresetName = Literal["demo", "demo-quick", "gpu"]
PRESET_FOLDER = Path(__file__).resolve().parents[1] / "presets"  # YAML presets, named by stem (`--config NAME`)
_KEEP_REFERENCES = ("storage",)  # blocks whose ${VAR}s stay references, resolved when used (secrets)


class ConfigError(ValueError):
    """A run config that does not validate; the message names each bad field and the fix."""


class _Model(BaseModel):
    """Strict base: unknown fields are errors (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WorldConfig(_Model):
    """The synthetic world of coloured shapes (`capfilt synth`) the demo runs on."""

    seed: int = 0
    n_human: int = Field(1000, ge=1, description="human-annotated pairs")
    n_web: int = Field(4000, ge=1, description="web pairs (with noise)")
    n_test: int = Field(500, ge=1, description="held-out test images")
    shard_rows: int = Field(1000, ge=1, description="rows per web shard")


class DataConfig(_Model):
    """Where the pairs come from. Either a synthetic `world`, or paths."""

    world: WorldConfig | None = Field(None, description="generate the synthetic world into RUN/world")
    human: list[str] = Field(default_factory=list, description="human pair shards / folders")
    web: list[str] = Field(default_factory=list, description="web pair shards or img2dataset output folders (parquet or webdataset format, read in place)")
    web_urls: str | None = Field(None, description="URL list (csv/tsv/jsonl/parquet) to fetch with img2dataset")
    test: list[str] = Field(default_factory=list, description="held-out test pair shards / folders")
    truth: str | None = Field(None, description="synthetic-world truth folder (evaluation only)")
    serve_local: bool = Field(True, description="serve the world's web images on 127.0.0.1 for img2dataset")
    ingest_processes: int = Field(1, ge=1)
    ingest_threads: int = Field(4, ge=1)


class ModelConfig(_Model):
    """The MED size and any released checkpoints to start from instead of training."""

    preset: Literal["tiny", "base", "large"] = "tiny"
    vocab_size: int = Field(512, ge=16, description="WordPiece vocabulary built from the captions (scratch models)")
    pretrained: str | None = Field(None, description="start from this checkpoint (ours or HF BLIP); skips pretrain")
    filter: str | None = Field(None, description="use this filter checkpoint; skips the filter finetune")
    captioner: str | None = Field(None, description="use this captioner checkpoint; skips the captioner finetune")


class TrainStagesConfig(_Model):
    """The four training stages and how they are launched."""

    pretrain: TrainStageConfig = Field(default_factory=TrainStageConfig)
    finetune_filter: TrainStageConfig = Field(default_factory=lambda: TrainStageConfig(steps=200))
    finetune_captioner: TrainStageConfig = Field(default_factory=lambda: TrainStageConfig(steps=200))
    final: TrainStageConfig = Field(default_factory=TrainStageConfig)
    nproc_per_node: int = Field(1, ge=1, description=">1 launches torchrun with this many processes")


class VideoConfig(_Model):
    """Zero-shot video (BLIP's third claim): the final and pretrain models on synthetic clips
    of the shapes world, with no video training. Runs only on a `data.world` run."""

    world: VideoWorldConfig | None = Field(None, description="the clips to make; null: no video evaluation")
    evaluate: VideoEvalConfig = Field(default_factory=VideoEvalConfig)


class StagesConfig(_Model):
    """Which part of the bootstrap to run."""

    stop_after: Stage = Field("evaluate", description="the last stage to run")
    report: bool = Field(True, description="write RUN/report.md and .html after the evaluation")


class RunnerConfig(_Model):
    """Where shard stages' workers run: threads of the flow process (default) or Dask (one
    worker per thread of one cluster for all the run's shard stages, see `flows.runners`);
    how GPU stages share a GPU."""

    kind: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(1, ge=1, description="threads: stage workers in the flow process, each loading the "
                             "stage's model once and streaming its share of the shards (1: one model on all cores)")
    dask_address: str | None = Field(
        None, description="dask: scheduler address of a cluster you run (left running); None: the flow starts one "
        "LocalCluster for the whole run and closes it at the end"
    )
    dask_workers: int = Field(2, ge=1, description="dask LocalCluster: worker processes")
    dask_threads_per_worker: int = Field(1, ge=1)
    gpus_per_task: int = Field(0, ge=0, description="dask: GPU resources each GPU task claims")
    gpu_concurrency: str | None = Field(
        None, description="name of a Prefect global concurrency limit GPU stages occupy"
    )


class RunConfig(_Model):
    """Everything one bootstrap run needs; the Prefect flow's single parameter."""

    preset: PresetName | None = Field(None, description="fill unset fields from this preset")
    run_dir: str = Field("runs/demo", description="the run folder: all outputs and resume state")
    rounds: int = Field(1, ge=1, le=10, description="bootstrap rounds (the final model seeds the next)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
                        description="auto: cuda when this machine has one, else cpu (resolved before the run starts)")
    loader_workers: int = Field(-1, ge=-1, description="DataLoader processes decoding images for the model stages and "
                                "training; -1 = auto from this process's cores and the device (tasks.execution.resolve_workers)")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainStagesConfig = Field(default_factory=TrainStagesConfig)
    # the stages' own configs, as they are (one definition each, next to the code that reads it)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    assemble: AssembleConfig = Field(default_factory=AssembleConfig)
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    video: VideoConfig = Field(default_factory=VideoConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)  # fsspec options for URL inputs / outputs (data.storage)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, values: Any) -> Any:
        """Deep-merge the named preset under the given values (given values win; an unknown
        name is left to the Literal check, which lists the allowed ones), then check every
        ``${VAR}`` and literal secret (`_environment`)."""
        if not isinstance(values, dict):
            return values
        if values.get("preset") in PRESETS:
            values = _deep_merge(PRESETS[values["preset"]], values)
        return {key: _environment(value, key, keep=key in _KEEP_REFERENCES) for key, value in values.items()}

    @model_validator(mode="after")
    def _check_sources(self) -> RunConfig:
        """Each stage that will run must have its inputs: data for training, models otherwise."""
        last = STAGES.index(self.stages.stop_after)
        has_data = self.data.world is not None or bool(self.data.web or self.data.web_urls)
        if not has_data:
            raise ValueError("data: give data.world (synthetic), data.web or data.web_urls")
        needs_human = self.needs_finetune() or (last >= STAGES.index("final"))
        if needs_human and self.data.world is None and not self.data.human:
            raise ValueError(
                "data.human: training stages need human pairs; give data.human or data.world, or give "
                "model.filter + model.captioner and stop_after 'filter' or 'assemble' to skip training"
            )
        if last >= STAGES.index("evaluate") and self.data.world is None and not self.data.test:
            raise ValueError("data.test: evaluation needs a test set; give data.test or stop_after before 'evaluate'")
        return self

    def needs_finetune(self) -> bool:
        """True when a filter or captioner will be finetuned (so a pretrained model is needed)."""
        if not self.runs_stage("finetune"):
            return False
        return self.rounds > 1 or self.model.filter is None or self.model.captioner is None

    def needs_pretrain(self) -> bool:
        """True when the flow pretrains a MED first (no `model.pretrained`, and a finetune needs one)."""
        return self.model.pretrained is None and self.needs_finetune()

    @property
    def root(self) -> Path:
        """The run folder as a Path."""
        return Path(self.run_dir)

    def apply_storage(self) -> None:
        """Make this process use the config's storage options for URLs (`data.storage.configure`);
        called by the flow and by each shard step, which may run in another process."""
        from data.storage import configure

        configure(self.storage.resolved())

    def runs_stage(self, stage: str) -> bool:
        """True when `stage` is at or before `stages.stop_after`."""
        return STAGES.index(stage) <= STAGES.index(self.stages.stop_after)


def _environment(value: Any, where: str, keep: bool) -> Any:
    """`value` with each ``${VAR}`` in its text replaced by the variable's value (`keep`: left
    as a reference, for `storage`, whose secrets are resolved only when used). An unset
    variable, or a literal secret (an access key id, a URL with a password) outside
    `storage` (whose own check names them), is refused naming the field: the config is
    stored in Prefect's database and the run record."""
    if isinstance(value, dict):
        return {k: _environment(v, f"{where}.{k}", keep) for k, v in value.items()}
    if isinstance(value, list):
        return [_environment(v, f"{where}[{i}]", keep) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    for name in ENV_REFERENCE.findall(value):
        if name not in os.environ:
            raise ValueError(f"{where}: environment variable {name} is not set (set it, or write the value out)")
    if keep:
        return value
    if is_secret_value(value):
        raise ValueError(f"{where}: holds a secret (an access key id or a password in a URL); give credentials "
                         "through the environment (AWS_ACCESS_KEY_ID, ...) or storage.options as ${VAR}")  # fmt: skip
    return ENV_REFERENCE.sub(lambda m: os.environ[m.group(1)], value)


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`, recursing into nested dicts."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _tiny_train(steps: int, finetune_steps: int, batch: int) -> dict[str, Any]:
    # settings of the miniature prototype (shared/MINIATURE.md): AdamW 2e-3, 5% warmup, cosine
    pre = {"steps": steps, "batch_size": batch, "lr": 2e-3, "warmup_fraction": 0.05, "queue_size": 4 * batch,
           "checkpoint_every": max(1, steps // 3)}  # fmt: skip
    fin = {"steps": finetune_steps, "batch_size": batch, "lr": 5e-4, "warmup_fraction": 0.0, "queue_size": 4 * batch,
           "checkpoint_every": max(1, finetune_steps // 2)}  # fmt: skip
    return {"pretrain": pre, "finetune_filter": fin, "finetune_captioner": fin, "final": pre}


# Presets as plain dicts (merged under user values, then validated once).
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: the whole bootstrap on the synthetic world, tiny MED, CPU.
    "demo": {
        "run_dir": "runs/demo",
        "device": "cpu",  # the tiny MED: the same numbers on any machine
        "data": {"world": {"n_human": 1000, "n_web": 4000, "n_test": 500, "shard_rows": 1000}},
        "model": {"preset": "tiny"},
        "train": _tiny_train(steps=600, finetune_steps=200, batch=128),
        "caption": {"execution": {"batch_size": 256}},
        "filter": {"execution": {"batch_size": 256}},
        "video": {"world": {"clips": 40}},
    },
    # The same, small enough for tests: fewer images and steps.
    "demo-quick": {
        "run_dir": "runs/demo-quick",
        "device": "cpu",
        "data": {"world": {"n_human": 200, "n_web": 300, "n_test": 60, "shard_rows": 100}},
        "model": {"preset": "tiny"},
        "train": _tiny_train(steps=20, finetune_steps=10, batch=32),
        "caption": {"execution": {"batch_size": 128}},
        "filter": {"execution": {"batch_size": 128}},
        "assemble": {"rows_per_shard": 500},
        "video": {"world": {"clips": 40}},
    },
    # A real run: base MED at BLIP's settings, on GPUs, shard stages fanned out over Dask.
    # Its default data is a large synthetic world; point data.human / data.web / data.test
    # (or data.web_urls) at real shards to clean a real dataset.
    "gpu": {
        "run_dir": "runs/gpu",
        "device": "cuda",
        "loader_workers": -1,  # auto: a decoding process per core but one
        "data": {"world": {"n_human": 20_000, "n_web": 200_000, "n_test": 2_000, "shard_rows": 10_000},
                 "ingest_processes": 8, "ingest_threads": 32},
        "model": {"preset": "base"},
        "train": {
            "pretrain": {"steps": 100_000, "batch_size": 96, "lr": 3e-4, "image_size": 224, "checkpoint_every": 2000,
                         "schedule": "step", "augment": True},
            "finetune_filter": {"steps": 20_000, "batch_size": 32, "lr": 1e-5, "image_size": 384,
                                "checkpoint_every": 2000, "augment": True},
            "finetune_captioner": {"steps": 20_000, "batch_size": 32, "lr": 1e-5, "image_size": 384,
                                   "checkpoint_every": 2000, "augment": True},
            "final": {"steps": 100_000, "batch_size": 96, "lr": 3e-4, "image_size": 224, "checkpoint_every": 2000,
                      "schedule": "step", "augment": True},
            "nproc_per_node": 8,
        },
        "caption": {"repetition_penalty": 1.1, "execution": {"batch_size": 128}},
        "filter": {"execution": {"batch_size": 256}},
        "evaluate": {"rerank_k": 256},
        "runner": {"kind": "dask", "dask_workers": 8, "gpus_per_task": 1, "gpu_concurrency": "capfilt-gpu"},
    },
}


def _format_errors(exc: ValidationError, source: str) -> str:
    """One line per bad field: dotted path, what was wrong, and the allowed values."""
    lines = [f"invalid run config ({source}):"]
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        if not where or message.startswith(where + "."):  # the message starts with the field it is about
            where, _, message = message.partition(": ")
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown field (check the spelling; see `capfilt run --help` or flows/config.py)"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load_config(
    values: dict[str, Any] | None = None, *, source: str = "<dict>", **overrides: Any
) -> RunConfig:
    """Validate `values` (plus top-level `overrides`) into a RunConfig.

    Raises ConfigError whose message names every bad field and, for choices, the
    allowed values (pydantic's Literal messages list them).
    """
    merged = _deep_merge(values or {}, {k: v for k, v in overrides.items() if v is not None})
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def preset(name: str, **overrides: Any) -> RunConfig:
    """The RunConfig of preset `name` ("demo", "demo-quick", "gpu"), with overrides."""
    if name not in PRESETS:
        raise ConfigError(f"invalid run config: preset: unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return load_config({"preset": name}, source=f"preset {name}", **overrides)


def dotted_overrides(items: list[str]) -> dict[str, Any]:
    """``["caption.top_k=50", "filter.threshold=0.3"]`` -> nested values to merge over a
    config (each value read as YAML: numbers, booleans, null, lists)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set filter.threshold=0.3")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        *parents, last = key.strip().split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set to a value above; it cannot hold fields")
        node[last] = value
    return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (the plain loader
    keeps the last value silently: a second `run_dir` would redirect the run)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in lines and key != "<<":
                raise ConfigError(f"{self.name}: key {key!r} is given twice (lines {lines[key]} and {line}); "
                                  "keep one")  # fmt: skip
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML run config file as a mapping (ConfigError: unreadable, not a mapping, a key twice)."""
    try:
        loader = _UniqueKeys(path.read_text())
        loader.name = str(path)
        try:
            raw = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the run config ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a run config must be a YAML mapping, got {type(raw).__name__}")
    return raw


def config_source(name: str | Path) -> dict[str, Any]:
    """The values `--config NAME` stands for: a YAML file; else a preset's, by the stem of a
    file in `presets/` (``capfilt-on-img2dataset``) or a built-in name (``demo-quick``).
    ConfigError naming every choice when it is none of them."""
    path = Path(name)
    if path.is_file():
        return read_yaml(path)
    if str(name) in PRESETS:
        return {"preset": str(name)}
    shipped = PRESET_FOLDER / f"{name}.yaml"
    if path.name == str(name) and shipped.is_file():
        return read_yaml(shipped)
    choices = sorted(set(PRESETS) | {p.stem for p in PRESET_FOLDER.glob("*.yaml")})
    what = "is a folder, not a YAML file" if path.is_dir() else "no such file"
    raise ConfigError(f"{name}: {what}, and no preset has that name; presets: {', '.join(choices)}")


def load_yaml(path: str | Path, sets: list[str] | None = None, **overrides: Any) -> RunConfig:
    """Read a YAML run config, or the preset `path` names (`config_source`; a file may name a
    `preset` too), apply `sets` (``FIELD=VALUE``, see `dotted_overrides`) and top-level
    `overrides`, and validate it."""
    raw = config_source(path)
    return load_config(_deep_merge(raw, dotted_overrides(sets or [])), source=str(path), **overrides)
