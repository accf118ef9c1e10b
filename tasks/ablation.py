"""BLIP's Table 1 in miniature: does captioner + filter make the data, and the model, better?

From ONE synthetic world (`data.synth`), run CapFilt once (pretrain on human + raw web,
finetune a filter and a captioner on the human pairs, caption every web image, filter
web + synthetic captions), then build five training sets:

- ``no_cf``      human + raw web                       (paper: no captioner, no filter)
- ``filter``     human + kept web                      (filter only)
- ``captioner``  human + raw web + all synthetic       (captioner only)
- ``cf``         human + kept web + kept synthetic     (captioner + filter: D')
- ``human``      human only                            (control; not in the paper)

and pretrain a fresh MED on each with the same budget (steps x batch), for several
seeds, and evaluate each on the held-out test set (`tasks.evaluate`). The table puts the
mean and spread over seeds next to the paper's Table 1.

The experiment composes the pipeline's own stages: `tasks.train.train_stage` for every
model, `run_caption` / `run_filter` for CapFilt and `run_assemble` for every training set.
Each of them skips what it finds complete (a finished model with the same settings, a
complete shard), so a rerun after a crash, or with more seeds or rounds, continues where
it stopped. Everything lands under one output folder laid out like a run folder (so
`capfilt report` works on it too):

```
OUT/world/                      the synthetic world (with truth/)
OUT/ingest/{human,web,test}     links to the world's splits
OUT/tokenizer/                  WordPiece vocabulary of the world's human and web captions
OUT/models/<row>-s<seed>/       final pretraining runs (no_cf-s<capfilt_seed> is also CapFilt's base)
OUT/models/filter/ models/captioner/
OUT/caption/<hash>/ OUT/filter/<hash>/   the CapFilt stage outputs
OUT/datasets/<row>/<hash>/      each row's training shards (the assemble stage's output)
OUT/eval/<row>-s<seed>.json     evaluation of each model; OUT/eval/capfilt.json
OUT/table.md  OUT/table.json    the result
OUT/round-<r>/                  with --rounds r > 1: round r's models/filter, models/captioner,
                                caption/, filter/, datasets/ and eval/ (and the models of its F,
                                C, C+F rows); its base is round r - 1's models/cf-s<capfilt_seed>
```

The synthetic world gives every position and relation a meaning ("on the left"), so
training here uses no crop and no flip: a flipped image would contradict its caption.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from blip_core.atomic import replace_folder
from blip_core.train.config import TrainConfig
from data.shards import list_shards, read_table, write_atomic
from data.synth import SynthConfig, generate_world, load_truth
from tasks.assemble import AssembleConfig, run_assemble
from tasks.caption import CaptionConfig, run_caption
from tasks.evaluate.config import EvalConfig
from tasks.evaluate.metrics import roc_auc
from tasks.evaluate.result import EvalResult
from tasks.evaluate.retrieval import pair_itc_scores
from tasks.evaluate.run import evaluate_to_file
from tasks.evaluate.truth_checks import captioner_correctness, filter_noise_detection, read_scored_rows
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter
from tasks.train import TrainStageResult, init_image_size, stage_tokenizer, train_stage

ROWS: tuple[str, ...] = ("no_cf", "filter", "captioner", "cf", "human")
# rows whose data CapFilt makes: with several rounds, they train on the last round's
BOOTSTRAPPED: frozenset[str] = frozenset({"filter", "captioner", "cf"})
ROW_LABELS = {
    "no_cf": "human + raw web (no C, no F)",
    "filter": "human + filtered web (F)",
    "captioner": "human + raw web + synthetic (C)",
    "cf": "human + filtered web + filtered synthetic (C+F)",
    "human": "human only (control)",
}
# BLIP paper, Table 1 (14M images, ViT-B/16): COCO retrieval after finetuning and COCO
# captioning; see ../shared/BLIP_FACTS.md. The human-only control has no paper row.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "no_cf": {"TR@1": 78.4, "IR@1": 60.7, "BLEU-4": 38.0, "CIDEr": 127.8},
    "filter": {"TR@1": 79.1, "IR@1": 61.5, "BLEU-4": 38.1, "CIDEr": 128.2},
    "captioner": {"TR@1": 79.7, "IR@1": 62.0, "BLEU-4": 38.4, "CIDEr": 128.9},
    "cf": {"TR@1": 80.6, "IR@1": 63.1, "BLEU-4": 38.6, "CIDEr": 129.7},
}
# Columns of the table: (label, where in the EvalResult, key).
METRICS: tuple[tuple[str, str, str], ...] = (
    ("TR@1", "retrieval", "TR@1"),
    ("IR@1", "retrieval", "IR@1"),
    ("TR@5", "retrieval", "TR@5"),
    ("IR@5", "retrieval", "IR@5"),
    ("ITC TR@1", "retrieval_itc", "TR@1"),  # before the ITM re-rank
    ("ITC IR@1", "retrieval_itc", "IR@1"),
    ("B@4", "captioning", "BLEU-4"),
    ("CIDEr", "captioning", "CIDEr"),
    ("exact caps %", "captioning", "scene_exact"),
)
SETTINGS_FILE = "ablation.json"
# a rerun may change these: more rounds reuse every piece of the earlier ones
_RERUN_SETTINGS = ("out_dir", "seeds", "rows", "rounds", "threads")
# Settings added after folders were made whose default is not what those folders used:
# an ablation.json without the key was made with this value.
_MADE_BEFORE: dict[str, Any] = {"mix_units": 1}


@dataclass(frozen=True)
class AblationConfig:
    """The experiment. Defaults: the tiny preset on a 2-core CPU (see docs/BENCHMARKS.md)."""

    out_dir: str = "runs/ablation"
    preset: str = "tiny"
    seeds: tuple[int, ...] = (0, 1)  # seeds of the final pretraining runs
    # seed of CapFilt's base pretraining (models/no_cf-s<capfilt_seed>) and of the filter and
    # captioner finetunes; fixed per folder, so a rerun with other seeds reuses its CapFilt
    capfilt_seed: int = 0
    rows: tuple[str, ...] = ROWS
    # the world (one for every row and seed)
    world_seed: int = 0
    human_images: int = 1000
    web_images: int = 4000
    test_images: int = 500
    test_captions: int = 5
    web_rates: tuple[float, float, float, float] = (0.25, 0.35, 0.20, 0.20)  # correct, weak, swapped, junk
    human_vague_rate: float = 0.0  # share of human captions that are true but vague (SynthConfig)
    # pretraining (every row, same budget)
    pretrain_steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    warmup_steps: int = 40
    queue_size: int = 128  # momentum features per modality (a multiple of batch_size)
    # BLIP's momentum distillation (EMA 0.995, alpha 0.4) is tuned for 20 epochs of 14M
    # images; a few hundred steps need a faster EMA and a smaller distillation weight.
    momentum: float = 0.99
    alpha: float = 0.0
    # CapFilt: finetune filter and captioner on the human pairs
    # the filter and captioner must become accurate on 1,000 human pairs even when the
    # base model learned little from the noisy web: give them a longer finetune
    finetune_steps: int = 1000
    finetune_lr: float = 1e-3
    # Bootstrap rounds (BLIP's loop iterated, as `capfilt run --rounds`): round r > 1 finetunes
    # its filter and captioner from round r - 1's C+F model (seed capfilt_seed), and the F, C
    # and C+F rows train on round `rounds`' data. That base already knows the web's text, and
    # the long finetune above unlearns it (vague true captions fall back towards the noise),
    # so later rounds finetune as BLIP does: 6 epochs of the human pairs at the pretraining
    # lr x 1e-5 / 3e-4 (BLIP's retrieval finetune against its pretraining peak).
    rounds: int = 1
    later_finetune_epochs: float = 6.0
    later_finetune_lr_ratio: float = 1e-5 / 3e-4
    threshold: float = 0.5
    caption_strategy: str = "nucleus"
    top_p: float = 0.9
    num_captions: int = 1
    # evaluation
    rerank_k: int = 16
    eval_caption_strategy: str = "beam"
    vocab_size: int = 256
    # row groups shuffled together in training (PairDataset.mix_units), the trainer's default;
    # 1 takes each batch from one 256-row group of one shard, as folders made before this
    # setting were (see _MADE_BEFORE)
    mix_units: int = TrainConfig.mix_units
    threads: int = 2  # torch intra-op threads

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rows) - set(ROWS))
        if unknown:
            raise ValueError(f"unknown ablation rows {unknown}; choose from {list(ROWS)}")
        if not self.seeds:
            raise ValueError("give at least one seed")
        if self.queue_size % self.batch_size:
            raise ValueError(f"queue_size {self.queue_size} must be a multiple of batch_size {self.batch_size}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.caption_strategy not in ("nucleus", "beam", "greedy"):
            raise ValueError(f"caption_strategy must be nucleus, beam or greedy, got {self.caption_strategy!r}")

    def semantic(self) -> dict[str, Any]:
        """The settings every piece of an output folder was made with (all but seeds, rows,
        rounds, threads and the folder itself, which a rerun may change)."""
        data = dataclasses.asdict(self)
        for name in _RERUN_SETTINGS:
            data.pop(name)
        return json.loads(json.dumps(data))  # tuples as lists, as read back from JSON


def quick_config(out_dir: str, threads: int = 2) -> AblationConfig:
    """A minutes-long version for `capfilt demo --quick --ablation`: one seed, a world of
    200 human / 400 web / 50 test images, 60 steps per model. It checks the experiment end
    to end; its table is far too small to show CapFilt's effect."""
    return AblationConfig(
        out_dir=out_dir, seeds=(0,), human_images=200, web_images=400, test_images=50, test_captions=2,
        pretrain_steps=60, finetune_steps=60, batch_size=32, queue_size=64, warmup_steps=6,
        eval_caption_strategy="greedy", threads=threads,
    )


@dataclass
class AblationResult:
    """Per row: metric -> values over seeds; plus the CapFilt diagnostics and sizes."""

    config: dict[str, Any]
    values: dict[str, dict[str, list[float]]]
    dataset_rows: dict[str, dict[str, int]]
    capfilt: dict[str, Any]  # the last round's CapFilt diagnostics
    seconds: dict[str, float] = field(default_factory=dict)
    capfilt_rounds: list[dict[str, Any]] = field(default_factory=list)  # those of the earlier rounds

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, allow_nan=True)


# --------------------------------------------------------------------------- pieces
# Public so that experiments beside the table (bench/filter_base_probe.py) build on the same
# world, tokenizer, training recipe and evaluation; each skips work whose output is complete.

_EXECUTION = ExecutionConfig(batch_size=256, num_workers=0, device="cpu")  # progress on (blip_core.progress)


def make_world(cfg: AblationConfig, out: Path) -> Path:
    """Generate the experiment's world into ``out/world`` (kept when complete) and link its
    splits under ``out/ingest``, as a run folder has them; returns the world folder."""
    world = out / "world"
    synth = SynthConfig(
        seed=cfg.world_seed, human_images=cfg.human_images, web_images=cfg.web_images,
        test_images=cfg.test_images, test_captions=cfg.test_captions, web_rates=cfg.web_rates,
        human_vague_rate=cfg.human_vague_rate,
    )
    generate_world(world, synth)
    ingest = out / "ingest"
    ingest.mkdir(parents=True, exist_ok=True)
    for split in ("human", "web", "test"):
        link = ingest / split
        if not link.exists():
            link.symlink_to(Path("..") / "world" / split, target_is_directory=True)
    return world


def make_tokenizer(cfg: AblationConfig, world: Path, out: Path) -> Any:
    """The WordPiece tokenizer of the world's human and web captions (the training stage's
    own helper), built once into ``out/tokenizer``, where every pretraining reads it."""
    return stage_tokenizer(out / "tokenizer", list_shards(world / "human") + list_shards(world / "web"), cfg.vocab_size)


def train_or_resume(
    cfg: AblationConfig, mode: str, shards: list[Path], out_dir: Path, seed: int, init: Path | None = None
) -> TrainStageResult:
    """Train one model with the training stage (which resumes from its checkpoints, or finds
    it finished with the same settings). A model trained from scratch uses the tokenizer of
    ``cfg.out_dir/tokenizer`` (`make_tokenizer`); one trained from `init` keeps init's."""
    pretrain = mode == "pretrain"
    return train_stage(
        out_dir, shards, mode, init=init, preset=cfg.preset, augment=False,  # no crop, no flip (module doc)
        vocab_size=cfg.vocab_size, tokenizer_dir=Path(cfg.out_dir) / "tokenizer",
        image_size=0 if init is None else init_image_size(init),  # 0: the preset's; a finetune keeps init's
        epochs=10_000, max_steps=cfg.pretrain_steps if pretrain else cfg.finetune_steps,
        batch_size=cfg.batch_size, lr=cfg.lr if pretrain else cfg.finetune_lr,
        warmup_steps=cfg.warmup_steps if pretrain else 0, schedule="cosine",
        queue_size=cfg.queue_size, momentum=cfg.momentum, alpha=cfg.alpha, seed=seed, device="cpu", num_workers=0,
        mix_units=cfg.mix_units,
        log_every=10, checkpoint_every=max(cfg.pretrain_steps, cfg.finetune_steps), keep_last=1,
    )  # fmt: skip


def round_folder(out: Path, round_index: int) -> Path:
    """Where a bootstrap round's pieces live: round 1 in the folder itself (as before rounds
    existed), round r > 1 in ``round-<r>/`` (as `capfilt run` names its later rounds)."""
    return out if round_index == 1 else out / f"round-{round_index}"


def finetune_recipe(cfg: AblationConfig, round_index: int) -> AblationConfig:
    """`cfg` with the finetune steps and lr of the round: round 1's as configured, later
    rounds BLIP's proportions (`later_finetune_epochs` at `lr x later_finetune_lr_ratio`)."""
    if round_index == 1:
        return cfg
    steps = math.ceil(cfg.later_finetune_epochs * cfg.human_images / cfg.batch_size)
    return dataclasses.replace(cfg, finetune_steps=steps, finetune_lr=cfg.lr * cfg.later_finetune_lr_ratio)


@dataclass
class _CapFiltRound:
    """One CapFilt round's models and stage outputs; `computed` when any model was trained."""

    filter_model: Path
    caption_dir: Path
    filter_dir: Path
    computed: bool


def _capfilt(cfg: AblationConfig, root: Path, world: Path, base: Path) -> _CapFiltRound:
    """Finetune filter + captioner from `base` into ``root/models``, caption and filter the
    web set into ``root/caption`` and ``root/filter`` (each stage skips complete shards)."""
    human, web = list_shards(world / "human"), list_shards(world / "web")
    filt = train_or_resume(cfg, "finetune-filter", human, root / "models" / "filter", cfg.capfilt_seed, init=base)
    capt = train_or_resume(cfg, "finetune-captioner", human, root / "models" / "captioner", cfg.capfilt_seed, init=base)
    caption_cfg = CaptionConfig(strategy=cfg.caption_strategy, top_p=cfg.top_p, num_captions=cfg.num_captions,
                                seed=cfg.world_seed, execution=_EXECUTION)  # fmt: skip
    filter_cfg = FilterConfig(threshold=cfg.threshold, execution=_EXECUTION)
    captions = run_caption(web, root / "caption", Path(capt.final_dir), caption_cfg)
    filtered = run_filter(web, root / "filter", Path(filt.final_dir), filter_cfg, caption_dir=Path(captions.output))
    return _CapFiltRound(Path(filt.final_dir), Path(captions.output), Path(filtered.output),
                         computed=not (filt.skipped and capt.skipped))


# Each row's training set is the assemble stage over the row's inputs, taking these sources
# one after another: every human pair, then every web pair, then every synthetic one, each
# in input order (the F row takes no synthetic caption from the filter's kept shards). No
# dedupe: the rows are the paper's sets as they are. Shards of 2,000 rows, read in 256-row
# groups by the trainer.
_SOURCES = ("human", "web", "synthetic")
_ROW_SOURCES: dict[str, tuple[str, ...]] = {row: _SOURCES for row in ROWS} | {"filter": ("human", "web")}
_ROWS_PER_SHARD = 2000


def _row_inputs(row: str, world: Path, caption_dir: Path, filter_dir: Path) -> list[Path]:
    human, web = list_shards(world / "human"), list_shards(world / "web")
    synthetic, kept = list_shards(caption_dir), list_shards(filter_dir / "kept")
    return {"no_cf": human + web, "filter": human + kept, "captioner": human + web + synthetic,
            "cf": human + kept, "human": human}[row]  # fmt: skip


def build_datasets(out: Path, world: Path, caption_dir: Path, filter_dir: Path, rows: Sequence[str]) -> dict[str, Path]:
    """Assemble each row's training set into ``out/datasets/<row>/<hash>/``; returns the
    folder of each. A rerun finds the shards complete (same inputs, same settings) and
    writes nothing."""
    folders: dict[str, Path] = {}
    for row in rows:
        acfg = AssembleConfig(rows_per_shard=_ROWS_PER_SHARD, dedupe=False, sources=_ROW_SOURCES[row],
                              execution=_EXECUTION)  # fmt: skip
        inputs = _row_inputs(row, world, caption_dir, filter_dir)
        folders[row] = Path(run_assemble(inputs, out / "datasets" / row, acfg).output)
    return folders


def dataset_rows(folder: Path) -> dict[str, int]:
    """Rows of a training set per source, and ``total`` (keys sorted)."""
    counts: Counter[str] = Counter()
    for shard in list_shards(folder):
        counts.update(read_table(shard, "dataset", columns=["source"])["source"].to_pylist())
    return dict(sorted({**counts, "total": counts.total()}.items()))


def evaluate_on_test(cfg: AblationConfig, model: Path, world: Path, out_file: Path) -> EvalResult:
    """Evaluate `model` on the world's test split into `out_file` (reused when its inputs match)."""
    ecfg = EvalConfig(rerank_k=cfg.rerank_k, caption_strategy=cfg.eval_caption_strategy, device="cpu")
    return evaluate_to_file(model, list_shards(world / "test"), out_file, world, cfg=ecfg)


def _capfilt_diagnostics(world: Path, round_: _CapFiltRound, out: Path) -> dict[str, Any]:
    """The filter's noise detection and the captioner's correctness against the truth.

    Besides the filter's ITM verdicts, the ROC-AUC of the same filter model's ITC
    similarity on the web pairs (``itc_roc_auc``) tells whether a weak ITM head or the
    model as a whole limits the filter. Kept in ``out/eval/capfilt.json`` with the name of
    the filter output it scored (its settings hash, which covers the filter model), so a
    rerun reads it back instead of scoring every web pair again.
    """
    path = out / "eval" / "capfilt.json"
    filter_dir = round_.filter_dir
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.pop("filter_output", None) == filter_dir.name:
            return stored
    truth = load_truth(world)
    scored = read_scored_rows(filter_dir)
    diag = {
        "filter": filter_noise_detection(scored, truth),
        "captioner": captioner_correctness(scored.filter(pc.equal(scored["source"], "synthetic")), truth),
    }
    web = pa.concat_tables([read_table(p, "pairs", columns=["key", "caption", "jpg", "status"])
                            for p in list_shards(world / "web")])  # fmt: skip
    web = web.filter(pc.equal(web["status"], "ok"))
    keys = web["key"].to_pylist()
    known = [i for i, k in enumerate(keys) if k in truth.web_kinds]
    itc = pair_itc_scores(round_.filter_model, [web["jpg"][i].as_py() for i in known],
                          [web["caption"][i].as_py() or "" for i in known])  # fmt: skip
    clean = [not truth.is_noisy(keys[i]) for i in known]
    diag["filter"]["itc_roc_auc"] = roc_auc(itc, clean)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"filter_output": filter_dir.name, **diag}, indent=2, allow_nan=True))
    return diag

# --------------------------------------------------------------------------- the experiment


class _Timings:
    """Wall seconds of each piece, kept in ``OUT/timings.json`` across invocations.

    A piece's time is recorded when it is computed; a resumed run keeps the times of
    pieces it found complete, so the file always tells what a fresh run costs.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.values: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def record(self, name: str, seconds: float, computed: bool) -> float:
        if computed or name not in self.values:
            self.values[name] = round(seconds, 1)
            write_atomic(self.path, json.dumps(self.values, indent=2))
        return self.values[name]


def _check_settings(cfg: AblationConfig, out: Path) -> None:
    """Record the experiment's settings in ``OUT/ablation.json`` on the first run; refuse a
    rerun with other settings, whose pieces would silently mix with the folder's own."""
    path = out / SETTINGS_FILE
    wanted = cfg.semantic()
    if not path.is_file():
        write_atomic(path, json.dumps(wanted, indent=2, sort_keys=True))
        return
    # a setting added after the folder was made counts as what the folder was made with:
    # its old behaviour where that differs from today's default, else the default
    saved = {**AblationConfig().semantic(), **_MADE_BEFORE, **json.loads(path.read_text())}
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in changed)
        raise ValueError(
            f"{out} holds an ablation made with other settings ({diffs}); "
            "give another --out, or the folder's settings (see its ablation.json)"
        )


class _Experiment:
    """One invocation over an output folder: trains (or finds) models, keeps the timings."""

    def __init__(self, cfg: AblationConfig, say: Any) -> None:
        self.cfg, self.say = cfg, say
        self.out = Path(cfg.out_dir)
        self.world = self.out / "world"
        self.timings = _Timings(self.out / "timings.json")

    def pretrain(self, shards: list[Path], root: Path, name: str, seed: int) -> Path:
        """Pretrain ``root/models/<name>`` on `shards`, timed as ``[round-r/]train <name>``."""
        t = time.perf_counter()
        result = train_or_resume(self.cfg, "pretrain", shards, root / "models" / name, seed)
        self.timings.record(f"{self._prefix(root)}train {name}", time.perf_counter() - t, not result.skipped)
        return Path(result.final_dir)

    def capfilt_round(self, round_index: int, base: Path) -> tuple[_CapFiltRound, dict[str, Any]]:
        """Round `round_index`'s CapFilt from `base`, and its diagnostics."""
        root = round_folder(self.out, round_index)
        t = time.perf_counter()
        done = _capfilt(finetune_recipe(self.cfg, round_index), root, self.world, base)
        self.timings.record(f"{self._prefix(root)}capfilt (finetune x2, caption, filter)", time.perf_counter() - t,
                            done.computed)  # fmt: skip
        diag = _capfilt_diagnostics(self.world, done, root)
        self.say(f"capfilt round {round_index}: filter ROC-AUC {diag['filter']['roc_auc']:.3f}, "
                 f"captioner exact {diag['captioner']['exact']:.3f}")  # fmt: skip
        return done, diag

    def evaluate(self, model: Path, root: Path, name: str) -> EvalResult:
        path = root / "eval" / f"{name}.json"
        t, fresh = time.perf_counter(), not path.is_file()
        result = evaluate_on_test(self.cfg, model, self.world, path)
        self.timings.record(f"{self._prefix(root)}eval {name}", time.perf_counter() - t, fresh)
        return result

    def _prefix(self, root: Path) -> str:
        return "" if root == self.out else f"{root.name}/"

    def run(self) -> AblationResult:
        cfg, out = self.cfg, self.out
        t = time.perf_counter()
        make_world(cfg, out)
        make_tokenizer(cfg, self.world, out)
        self.timings.record("world + tokenizer", time.perf_counter() - t, computed=False)
        rows = list(cfg.rows)
        # CapFilt's base model is a no-C/F run (same data, same budget), the one of capfilt_seed.
        name = f"no_cf-s{cfg.capfilt_seed}"
        raw = list_shards(self.world / "human") + list_shards(self.world / "web")
        base = no_cf_base = self.pretrain(raw, out, name, cfg.capfilt_seed)
        self.say(f"base model {base} ({self.timings.values[f'train {name}']:.0f} s)")
        diagnostics: list[dict[str, Any]] = []
        for round_index in range(1, cfg.rounds + 1):
            done, diag = self.capfilt_round(round_index, base)
            diagnostics.append(diag)
            root = round_folder(out, round_index)
            if round_index < cfg.rounds:  # the next round's base: this round's C+F model of capfilt_seed
                cf = build_datasets(root, self.world, done.caption_dir, done.filter_dir, ["cf"])["cf"]
                base = self.pretrain(list_shards(cf), root, f"cf-s{cfg.capfilt_seed}", cfg.capfilt_seed)
        # the rows CapFilt makes train on the last round's data; the others do not depend on it
        made = [r for r in rows if r in BOOTSTRAPPED]
        folders = build_datasets(root, self.world, done.caption_dir, done.filter_dir, made)
        folders |= build_datasets(out, self.world, done.caption_dir, done.filter_dir, [r for r in rows if r not in made])
        values: dict[str, dict[str, list[float]]] = {r: {m[0]: [] for m in METRICS} for r in rows}
        for seed in cfg.seeds:
            for row in rows:
                row_root = root if row in BOOTSTRAPPED else out
                name = f"{row}-s{seed}"
                if row == "no_cf" and seed == cfg.capfilt_seed:
                    model = no_cf_base  # CapFilt's base is this row's run: reused, as trained on the raw world shards
                else:
                    model = self.pretrain(list_shards(folders[row]), row_root, name, seed)
                res = self.evaluate(model, row_root, name)
                for label, section, key in METRICS:
                    values[row][label].append(float(getattr(res, section).get(key, float("nan"))))
                self.say(f"{row} seed {seed}: TR@1 {res.retrieval['TR@1']:.1f} IR@1 {res.retrieval['IR@1']:.1f} "
                         f"ITC TR@1 {res.retrieval_itc.get('TR@1', float('nan')):.1f}")  # fmt: skip
        seconds = dict(self.timings.values)
        seconds["total"] = round(sum(seconds.values()), 1)
        return AblationResult(config=dataclasses.asdict(cfg), values=values,
                              dataset_rows={r: dataset_rows(f) for r, f in folders.items()}, capfilt=diagnostics[-1],
                              seconds=seconds, capfilt_rounds=diagnostics[:-1])  # fmt: skip


def run_ablation(cfg: AblationConfig, log: Any = None) -> AblationResult:
    """Run (or resume) the whole experiment; writes ``table.md`` / ``table.json`` in the out folder."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, out)
    result = _Experiment(cfg, log or (lambda msg: None)).run()
    write_atomic(out / "table.json", result.to_json())
    write_atomic(out / "table.md", format_table(result))
    return result


# --------------------------------------------------------------------------- the table


def mean_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaNs ignored)."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def beats(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when mean(a) exceeds mean(b) by more than the sum of both seed spreads."""
    (ma, sa), (mb, sb) = mean_spread(a), mean_spread(b)
    return ma - mb > sa + sb


# One-sided 95% critical values of Student's t by degrees of freedom (1..9); larger: 1.8.
_T95 = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833)


@dataclass(frozen=True)
class Paired:
    """Seed-by-seed differences a - b (seed i of one row against seed i of the other)."""

    mean: float
    sd: float
    wins: int  # seeds where a > b
    n: int
    t: float  # mean / (sd / sqrt(n)); inf when every difference is the same positive value

    @property
    def significant(self) -> bool:
        """One-sided paired t-test at 5%: is a better than b beyond the seed-to-seed noise?"""
        if self.n < 2 or math.isnan(self.t):
            return False
        return self.t > (_T95[self.n - 2] if self.n - 2 < len(_T95) else 1.8)


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Paired comparison of two rows' per-seed values (same seeds, same order; NaN pairs dropped).

    Every row's seed i shares its initialisation and data order seed, so a seed that is
    poor for every row (as seed 4 was in the 5-seed runs) cancels out of the difference.
    """
    d = np.asarray([x - y for x, y in zip(a, b, strict=True) if not (math.isnan(x) or math.isnan(y))], dtype=np.float64)
    n = len(d)
    if n == 0:
        return Paired(float("nan"), float("nan"), 0, 0, float("nan"))
    mean, wins = float(d.mean()), int((d > 0).sum())
    if n == 1:
        return Paired(mean, 0.0, wins, 1, float("nan"))
    sd = float(d.std(ddof=1))
    if sd == 0.0:
        t = math.copysign(math.inf, mean) if mean else float("nan")
    else:
        t = mean / (sd / math.sqrt(n))
    return Paired(mean, sd, wins, n, t)


def format_table(result: AblationResult) -> str:
    """The miniature Table 1 in Markdown: mean ± std over seeds, the paper's numbers beside."""
    labels = [m[0] for m in METRICS]
    n_seeds = len(result.config["seeds"])
    rounds = int(result.config.get("rounds", 1))
    lines = [
        f"Mean ± standard deviation over {n_seeds} seed(s) of the final pretraining "
        f"(retrieval R@k in %, scene hits; B@4 / CIDEr x100; 'exact caps' = generated test captions that "
        f"describe their scene exactly).",
        "",
        "| training data | rows (human/web/synthetic) | " + " | ".join(labels) + " | paper TR@1 / IR@1 | paper B@4 / CIDEr |",
        "|---|---|" + "---|" * len(labels) + "---|---|",
    ]
    for row, metrics in result.values.items():
        size = result.dataset_rows.get(row, {})
        sizes = "/".join(str(size.get(s, 0)) for s in ("human", "web", "synthetic"))
        cells = []
        for label in labels:
            m, s = mean_spread(metrics[label])
            cells.append("n/a" if math.isnan(m) else f"{m:.1f} ± {s:.1f}")
        paper = PAPER_TABLE1.get(row)
        p_ret = f"{paper['TR@1']} / {paper['IR@1']}" if paper else "-"
        p_cap = f"{paper['BLEU-4']} / {paper['CIDEr']}" if paper else "-"
        label = ROW_LABELS[row] + (f", round {rounds}" if rounds > 1 and row in BOOTSTRAPPED else "")
        lines.append(f"| {label} | {sizes} | " + " | ".join(cells) + f" | {p_ret} | {p_cap} |")
    lines += ["", _diagnostics(result), "", _verdicts(result)]
    if result.seconds.get("total"):
        lines += ["", f"Wall time (sum of the pieces in timings.json): {result.seconds['total'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def _diagnostics(result: AblationResult) -> str:
    f, c = result.capfilt.get("filter", {}), result.capfilt.get("captioner", {})
    def pct(x: Any) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"
    rounds = len(result.capfilt_rounds) + 1
    which = f"one run, seed {result.config.get('capfilt_seed', 0)}"
    earlier = ""
    if rounds > 1:
        which = f"round {rounds} of {rounds}, from round {rounds - 1}'s C+F model; " + which
        earlier = " Earlier rounds' filter ROC-AUC: " + ", ".join(
            f"round {i} {r.get('filter', {}).get('roc_auc', float('nan')):.3f}"
            f" (weak {r.get('filter', {}).get('roc_auc_weak_vs_noise', float('nan')):.3f})"
            for i, r in enumerate(result.capfilt_rounds, start=1)
        ) + "."
    return (
        f"CapFilt ({which}): filter ROC-AUC on web noise "
        f"{f.get('roc_auc', float('nan')):.3f} (ITM score; the same model's ITC similarity: "
        f"{f.get('itc_roc_auc', float('nan')):.3f}; by clean kind against the noise: "
        + ", ".join(f"{k.removeprefix('roc_auc_').removesuffix('_vs_noise')} {v:.3f}" for k, v in f.items()
                    if k.startswith("roc_auc_") and k.endswith("_vs_noise"))
        + f"), kept web precision {pct(f.get('precision'))}, recall of clean web "
        f"{pct(f.get('recall'))}, noise rejected {pct(f.get('noise_rejected'))}; keep rate by web kind: "
        + ", ".join(f"{k.removeprefix('keep_rate_')} {pct(v)}" for k, v in f.items() if k.startswith("keep_rate_"))
        + f". Captioner ({_strategy(result.config)}): {pct(c.get('exact'))} of synthetic captions exact, {pct(c.get('true'))} true; "
        f"{pct(c.get('exact_among_kept'))} of the kept ones exact." + earlier
    )


def _strategy(config: dict[str, Any]) -> str:
    strategy = config.get("caption_strategy", "nucleus")
    return f"nucleus, top_p {config.get('top_p', 0.9)}" if strategy == "nucleus" else strategy


def _verdicts(result: AblationResult) -> str:
    v = result.values
    lines = [
        "Checks (\"beats\" = mean difference larger than the sum of both seed spreads; \"paired\" = the "
        "seed-by-seed differences: mean ± sd, seeds won, and whether a one-sided paired t-test at 5% finds "
        "C+F better):"
    ]
    for other in ("no_cf", "human", "filter", "captioner"):
        if "cf" in v and other in v:
            for metric in ("TR@1", "IR@1"):
                ok = beats(v["cf"][metric], v[other][metric])
                diff = mean_spread(v["cf"][metric])[0] - mean_spread(v[other][metric])[0]
                p = paired(v["cf"][metric], v[other][metric])
                verdict = "better" if p.significant else "not shown better"
                lines.append(
                    f"- C+F vs {other} on {metric}: {diff:+.1f} -> {'beats' if ok else 'does not beat'}; "
                    f"paired {p.mean:+.1f} ± {p.sd:.1f}, won {p.wins}/{p.n} seeds -> {verdict}"
                )
    auc = result.capfilt.get("filter", {}).get("roc_auc", float("nan"))
    lines.append(f"- filter ROC-AUC {auc:.3f} -> {'>= 0.9' if auc >= 0.9 else 'below 0.9'}")
    return "\n".join(lines)
