"""The caption stage: the captioner writes synthetic captions for every web image
(BLIP's CapFilt "Cap"): nucleus sampling with top_p 0.9 by default, beam or greedy
selectable, the prompt "a picture of " fed to the decoder and stripped from the text.

Per input web shard ``part-N`` it writes ``<out>/<settings-hash>/part-N.parquet`` (kind
``pairs``): one row per (image, candidate) with ``source = synthetic``, the candidate
index, ``producer`` = the captioner's weight fingerprint, the web row's ``image_id`` and
image bytes, and ``key = f"{web key}/syn{candidate}"``. Web rows whose status is failed,
or whose bytes do not decode, are not captioned and are counted as failed, so the
completion record holds kept (captioned images) + rejected (0) + failed = input.

Each image samples with its own generator seeded from (run seed, web key), and a shard
is always generated whole in the same batches, so a rerun after a crash writes the same
text byte for byte; a complete shard (same input bytes, same settings) is skipped.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.shards import CompletionRecord, file_fingerprint, is_complete, read_completion, write_completion, write_shard
from tasks.common import (
    ExecutionConfig,
    ShardStats,
    StageStats,
    Timer,
    check_accounting,
    derive_seed,
    expand_inputs,
    image_batches,
    index_batches,
    inference_context,
    load_stage_model,
    ok_mask,
    plan_outputs,
    progress_bar,
    read_pairs,
    resolve_device,
    resolve_precision,
    run_each_shard,
    semantic_settings,
    stage_dir,
)

STRATEGIES = ("nucleus", "beam", "greedy")


@dataclass
class CaptionConfig:
    """Caption stage settings; all but `execution` enter the output folder's hash."""

    strategy: str = "nucleus"  # nucleus | beam | greedy
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
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.num_captions < 1:
            raise ValueError(f"num_captions must be >= 1, got {self.num_captions}")
        if self.strategy == "greedy" and self.num_captions > 1:
            raise ValueError("greedy decoding gives one caption per image; use nucleus for num_captions > 1")


def _load(model: Any, device: torch.device) -> Any:
    return load_stage_model(model, device, role="captioner", wrong_format="hf-retrieval")


def caption_settings(fingerprint: str, cfg: CaptionConfig, device: torch.device) -> dict[str, Any]:
    """What the caption text depends on: captioner weights, sampling settings, seed, precision."""
    return {
        "stage": "caption",
        "captioner": fingerprint,
        **semantic_settings(cfg),
        "precision": resolve_precision(cfg.execution.precision, device),
    }


def _generate_batch(
    loaded: Any, pixels: torch.Tensor, keys: list[str], prompt_ids: torch.Tensor, cfg: CaptionConfig
) -> list[str]:
    """Captions for a batch of images, image-major: image 0's candidates first."""
    ids = loaded.model.generate(
        pixels,
        strategy=cfg.strategy,
        max_length=cfg.max_length,
        min_length=cfg.min_length,
        num_beams=cfg.num_beams,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        temperature=cfg.temperature,
        repetition_penalty=cfg.repetition_penalty,
        num_captions=cfg.num_captions,
        seeds=[derive_seed(cfg.seed, key) for key in keys],
        prompt_ids=prompt_ids,
    )  # (B * num_captions, L), bos and prompt first
    return loaded.tokenizer.decode(ids[:, 1 + len(prompt_ids) :].cpu())


def _prompt_ids(tokenizer: Any, prompt: str, device: torch.device) -> torch.Tensor:
    """The prompt's tokens (P,), without [DEC] (generate puts bos first) and without [SEP]."""
    ids, mask = tokenizer.encode([prompt], mode="decoder", max_length=64)  # (1, T)
    return ids[0, 1 : int(mask.sum()) - 1].to(device)


def _synthetic_rows(web: pa.Table, captioned: np.ndarray, texts: list[str], fingerprint: str, k: int) -> pa.Table:
    """One pairs row per (captioned web row, candidate), image-major."""
    take = pa.array(np.repeat(captioned, k))
    candidate = np.tile(np.arange(k, dtype=np.int32), len(captioned))
    base = web.take(take)
    keys = pc.binary_join_element_wise(
        base.column("key"), pa.array([f"syn{c}" for c in candidate], pa.string()), "/"
    )
    n = base.num_rows
    columns = {
        "key": keys,
        "image_id": base.column("image_id"),
        "source": pa.array(["synthetic"] * n, pa.string()),
        "caption": pa.array(texts, pa.string()),
        "jpg": base.column("jpg"),
        "url": base.column("url"),
        "width": base.column("width"),
        "height": base.column("height"),
        "sha256": base.column("sha256"),
        "status": pa.array(["ok"] * n, pa.string()),
        "candidate": pa.array(candidate, pa.int32()),
        "producer": pa.array([fingerprint] * n, pa.string()),
    }
    return pa.table(columns)


def caption_shard(
    src: Path, dst_dir: Path, model: Any, cfg: CaptionConfig, digest: str, name: str | None = None
) -> ShardStats:
    """Caption one web shard into ``dst_dir/<name>`` (dst_dir is the settings-hash folder).

    Skips the shard when its completion record matches the input bytes and `digest`.
    `model` is a `blip_core.LoadedModel` or a model folder. The data file is written
    atomically and the record after it, so a rerun after a crash redoes it whole.
    """
    src = Path(src)
    name = name or src.name
    dst = Path(dst_dir) / name
    fingerprint = file_fingerprint(src)
    if is_complete(dst, fingerprint, digest):
        return ShardStats(shard=name, source=str(src), counts=dict(read_completion(dst).counts), skipped=True)
    device = resolve_device(cfg.execution.device)
    precision = resolve_precision(cfg.execution.precision, device)
    loaded = _load(model, device)
    from blip_core.image import ImageTransform

    transform = ImageTransform(loaded.model.config.vision.image_size)
    prompt_ids = _prompt_ids(loaded.tokenizer, cfg.prompt, device)
    with Timer() as timer:
        web = read_pairs(src)
        todo = np.flatnonzero(ok_mask(web))
        keys = web.column("key").to_pylist()
        captioned: list[np.ndarray] = []
        texts: list[str] = []
        undecodable = 0
        batches = index_batches(todo, cfg.execution.batch_size)
        jpg = web.column("jpg").combine_chunks()
        with progress_bar(len(todo), f"caption {name}", cfg.execution.progress) as bar, inference_context(device, precision):
            for rows, (pixels, errors) in zip(batches, image_batches(jpg, batches, transform, cfg.execution, device)):
                good = np.array([not e for e in errors])
                undecodable += int((~good).sum())
                rows = np.asarray(rows)[good]
                if len(rows):
                    texts += _generate_batch(loaded, pixels[torch.from_numpy(good).to(device)], [keys[r] for r in rows], prompt_ids, cfg)
                    captioned.append(rows)
                bar.update(len(errors))
        done = np.concatenate(captioned) if captioned else np.zeros(0, dtype=np.int64)
        table = _synthetic_rows(web, done, texts, loaded.fingerprint, cfg.num_captions)
        counts = {
            "input": web.num_rows,
            "kept": len(done),
            "rejected": 0,
            "failed": web.num_rows - len(done),
            "undecodable": undecodable,
            "captions": table.num_rows,
        }
        check_accounting(counts, str(src))
        write_shard(table, dst, kind="pairs")
        record = CompletionRecord(
            shard=name, kind="pairs", counts=counts, input_fingerprint=fingerprint, settings_hash=digest,
            extra={"source": str(src), "producer": loaded.fingerprint},
        )
        write_completion(dst, record)
    return ShardStats(shard=name, source=str(src), counts=counts, seconds=timer.seconds, images=len(todo))


def run_caption(inputs: list[Path], out_dir: Path, model: Any, cfg: CaptionConfig) -> StageStats:
    """Caption every web shard in `inputs` into ``out_dir/<settings-hash>/``; complete shards
    are skipped, so rerunning after a crash finishes the job."""
    device = resolve_device(cfg.execution.device)
    loaded = _load(model, device)
    plan = plan_outputs(expand_inputs(inputs))
    folder, digest = stage_dir(out_dir, caption_settings(loaded.fingerprint, cfg, device))
    stats = StageStats(stage="caption", output=folder, settings_hash=digest)
    jobs = [(src, functools.partial(caption_shard, src, folder, loaded, cfg, digest, name=name)) for src, name in plan]
    return run_each_shard(stats, jobs)  # a bad input shard does not stop the others
