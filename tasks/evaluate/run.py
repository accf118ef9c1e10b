"""The evaluation's entry points that write ``eval/metrics.json``: for given files, for a
run folder, and for the flow. The JSON records the fingerprint of the model, the test
shards, the truth and stage outputs and the settings, so a rerun with the same inputs
returns the stored result instead of recomputing it. Every path may be a URL
(`data.storage`): a model there is loaded from its local copy (`tasks.model_store`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from data.layout import MODEL_ENTRY, RunLayout
from data.shards import file_fingerprint, list_shards, settings_hash, write_atomic
from data.storage import Location, location, list_files
from tasks.evaluate.config import EvalConfig, semantic_settings
from tasks.evaluate.measure import evaluate
from tasks.evaluate.result import EvalResult


def _inputs_fingerprint(model_dir: Path, test_shards: Sequence[Location], cfg: EvalConfig, extra: Sequence[Location]) -> str:
    weights = sorted(Path(model_dir).glob("*.safetensors")) + sorted(Path(model_dir).glob("*.bin"))
    parts = {
        "model": [file_fingerprint(p) for p in weights],
        "test": [file_fingerprint(location(p)) for p in test_shards],
        "extra": [file_fingerprint(p) for folder in extra for p in list_files(location(folder), "**/*.parquet")],
        "settings": semantic_settings(cfg),
    }
    return settings_hash(parts)


def evaluate_to_file(
    model_dir: Location,
    test_shards: Sequence[Location],
    out_file: Location,
    truth_dir: Path | None = None,
    filter_dir: Location | None = None,
    caption_dir: Location | None = None,
    cfg: EvalConfig | None = None,
) -> EvalResult:
    """`evaluate`, then write its JSON to `out_file` atomically, with an input fingerprint.

    The fingerprint covers the model weights, the test shards, the truth / filter /
    caption files and the semantic settings; when `out_file` already holds a result
    with the same fingerprint, it is returned and nothing is recomputed (a rerun is
    free and safe).
    """
    from tasks.model_store import local_model

    cfg = cfg or EvalConfig()
    extra = [location(p) for p in (filter_dir, caption_dir, truth_dir) if p is not None]
    local = local_model(model_dir)
    fingerprint = _inputs_fingerprint(local, test_shards, cfg, extra)
    out_file = location(out_file)
    if out_file.is_file():
        try:
            stored = EvalResult.from_json(out_file.read_text())
            if stored.fingerprint == fingerprint:
                return stored
        except (json.JSONDecodeError, TypeError):
            pass  # unreadable or an older format: recompute and overwrite
    result = evaluate(local, test_shards, truth_dir, filter_dir, caption_dir, cfg)
    result.model_dir = str(model_dir)  # the model as named, not this machine's copy
    result.fingerprint = fingerprint
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_file, result.to_json())
    return result


def evaluate_run_folder(
    run_dir: Path,
    truth_dir: Path | None = None,
    cfg: EvalConfig | None = None,
    model_name: str = "final",
) -> EvalResult:
    """Evaluate the run's ``model_name`` model on ``ingest/test`` into ``eval/metrics.json``.

    The model, and the filter and caption outputs whose noise detection and correctness
    are measured, are those the latest run used (``current.json``, see `data.layout`);
    `truth_dir` defaults to the run's truth folder when it has one.
    """
    layout = RunLayout(location(run_dir))  # a local folder or a URL
    test_shards = list_shards(layout.ingest("test"))
    if not test_shards:
        raise FileNotFoundError(f"{layout.ingest('test')}: no test shards; ingest a test set first")
    model = layout.current(MODEL_ENTRY + model_name) or layout.models / model_name
    return evaluate_to_file(
        model, test_shards, layout.metrics,
        truth_dir if truth_dir is not None else layout.truth_dir(),
        layout.current_stage("filter"), layout.current_stage("caption"), cfg,
    )  # fmt: skip


def evaluate_run(
    model: str | Path,
    test: Sequence[str | Path],
    truth: str | Path | None = None,
    out: str | Path | None = None,
    cfg: EvalConfig | None = None,
    filter_dir: str | Path | None = None,
    caption_dir: str | Path | None = None,
) -> Location:
    """The flow's entry point: evaluate `model` on `test` into ``<out>/metrics.json``.

    `out` is the run's ``eval`` folder (default: ``eval`` beside the model's ``models``
    folder). Unless given, the filter and caption outputs are the current
    ``filter/<hash>`` and ``caption/<hash>`` folders of the run that holds `out`, so the
    filter's noise detection and the captioner's correctness are measured whenever
    `truth` is known. Returns the JSON's path; rerun-safe (see `evaluate_to_file`).
    """
    model_dir = location(model)
    out_dir = location(out) if out is not None else model_dir.parent.parent / "eval"
    layout = RunLayout(out_dir.parent)
    out_file = out_dir / layout.metrics.name
    evaluate_to_file(
        model_dir, [location(p) for p in test], out_file,
        Path(truth) if truth else None,
        location(filter_dir) if filter_dir else layout.current_stage("filter"),
        location(caption_dir) if caption_dir else layout.current_stage("caption"),
        cfg or EvalConfig(),
    )
    return out_file
