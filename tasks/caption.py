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

Repeated images (img2dataset-style rows, the same bytes once per human caption) get one
sample per row, as before: each row's seed derives from its own key, so their synthetic
captions differ, and the stage generates once per row. (The filter, whose score depends
on the image only, encodes such an image once.) One image loader streams all shards of
a run (`tasks.image_batches.ImageStream`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from data.inputs import expand_inputs, input_fingerprint, ok_mask, plan_outputs, read_pairs
from data.storage import Location, location
from tasks.execution import (
    inference_context,
    load_stage_model,
    progress_bar,
    Resolved,
    resolve_device,
    resolve_execution,
    resolve_precision,
    semantic_settings,
)
from tasks.image_batches import ImageStream, Planned, ShardImages, index_batches
from tasks.executor import PlanItem, stream_shards
from tasks.stage_config import STRATEGIES, CaptionConfig
from tasks.lifecycle import ShardJob, ShardOutput, ShardStats, StageStats, run_shard, stage_dir

_SEED_BYTES = 8
_SEED_MASK = (1 << 63) - 1


def derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed from (run seed, row key): the same row samples the same text in any run."""
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:_SEED_BYTES], "little") & _SEED_MASK


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


@dataclass
class _CaptionShard:
    """One shard's rows as the caption stage reads them, and its batches of ok-status rows."""

    src: Location
    name: str
    web: pa.Table
    todo: np.ndarray  # (R,) web rows with an ok status
    batches: list[list[int]]


@dataclass
class Captioner:
    """What every shard of one caption run shares: the model on its device and the
    settings (a `tasks.executor.StageRunner`)."""

    loaded: Any
    cfg: CaptionConfig
    device: torch.device
    precision: str
    transform: Any
    prompt_ids: torch.Tensor  # (P,)
    resolved: Resolved  # batch size and workers for this machine

    @classmethod
    def build(cls, model: Any, cfg: CaptionConfig) -> Captioner:
        from blip_core.image import ImageTransform

        device = resolve_device(cfg.execution.device)
        loaded = _load(model, device)
        sequences = cfg.num_captions * (cfg.num_beams if cfg.strategy == "beam" else 1)  # generated per image
        resolved = resolve_execution(cfg.execution, device, loaded.model.config.vision, copies=sequences, stage="caption")
        return cls(loaded, cfg, device, resolve_precision(cfg.execution.precision, device),
                   ImageTransform(loaded.model.config.vision.image_size), _prompt_ids(loaded.tokenizer, cfg.prompt, device),
                   resolved)  # fmt: skip

    def read(self, item: PlanItem) -> Planned:
        """Read one shard and batch its captionable rows; the images go to the stage's `ImageStream`."""
        web = read_pairs(location(item.src))
        todo = np.flatnonzero(ok_mask(web))
        batches = index_batches(todo, self.resolved.batch_size)
        images = ShardImages(web.column("jpg").combine_chunks(), batches)
        return Planned(_CaptionShard(location(item.src), item.name, web, todo, batches), images)

    def work(self, shard: _CaptionShard, images: Iterator[tuple[torch.Tensor, list[str]]]) -> ShardOutput:
        """The stage's own work: sample captions for every decodable web image of the shard."""
        cfg, device, web = self.cfg, self.device, shard.web
        keys = web.column("key").to_pylist()
        captioned: list[np.ndarray] = []
        texts: list[str] = []
        undecodable = 0
        with progress_bar(len(shard.todo), f"caption {shard.name}", cfg.execution.progress) as bar, inference_context(device, self.precision):
            for rows, (pixels, errors) in zip(shard.batches, images):
                good = np.array([not e for e in errors])
                undecodable += int((~good).sum())
                rows = np.asarray(rows)[good]
                if len(rows):
                    good_pixels = pixels[torch.from_numpy(good).to(device)]
                    texts += _generate_batch(self.loaded, good_pixels, [keys[r] for r in rows], self.prompt_ids, cfg)
                    captioned.append(rows)
                bar.update(len(errors))
        done = np.concatenate(captioned) if captioned else np.zeros(0, dtype=np.int64)
        table = _synthetic_rows(web, done, texts, self.loaded.fingerprint, cfg.num_captions)
        counts = {"input": web.num_rows, "kept": len(done), "rejected": 0, "failed": web.num_rows - len(done),
                  "undecodable": undecodable, "captions": table.num_rows}  # fmt: skip
        extra = {"source": str(shard.src), "producer": self.loaded.fingerprint}
        return ShardOutput(tables={"captions": table}, counts=counts, extra=extra, images=len(shard.todo))

    def stream(self, plans: list[Callable[[], Planned]], pending: Callable[[int], bool] = lambda i: True) -> ImageStream:
        """The one image loader of this caption run, over the shards `plans` read."""
        return ImageStream(plans, self.transform, self.resolved.num_workers, self.device, self.cfg.decode, pending)


def caption_job(item: PlanItem, dst_dir: Location, digest: str, work: Callable[[], ShardOutput]) -> ShardJob:
    """The lifecycle job for one web shard: ``dst_dir/<name>`` (dst_dir is the settings-hash folder)."""
    src = location(item.src)
    return ShardJob(name=item.name, source=str(src), outputs={"captions": location(dst_dir) / item.name}, kind="pairs",
                    fingerprint=input_fingerprint(src), digest=digest, work=work)  # fmt: skip


def caption_shard(
    src: Location, dst_dir: Location, model: Any, cfg: CaptionConfig, digest: str, name: str | None = None
) -> ShardStats:
    """Caption one web shard into ``dst_dir/<name>`` through a loader of its own; skipped (the
    model not even loaded) when its completion record matches the input bytes and `digest`.
    `model`: a `LoadedModel` or a folder."""
    item = PlanItem(0, str(src), name or location(src).name)

    def work() -> ShardOutput:
        captioner = Captioner.build(model, cfg)
        with captioner.stream([partial(captioner.read, item)]) as stream:
            return captioner.work(*stream.take(0))

    return run_shard(caption_job(item, dst_dir, digest, work))


def plan_caption(inputs: list[Location], out_dir: Location, model: Any, cfg: CaptionConfig) -> tuple[StageStats, list[PlanItem]]:
    """The caption stage's plan: its settings-hash folder (``stage.json`` written) and one
    `PlanItem` per shard. The flow's plan step and `run_caption` both use it."""
    device = resolve_device(cfg.execution.device)
    loaded = _load(model, device)
    items = [PlanItem(i, str(src), name) for i, (src, name) in enumerate(plan_outputs(expand_inputs(inputs)))]
    folder, digest = stage_dir(out_dir, caption_settings(loaded.fingerprint, cfg, device))
    return StageStats(stage="caption", output=folder, settings_hash=digest), items


def run_caption(inputs: list[Location], out_dir: Location, model: Any, cfg: CaptionConfig) -> StageStats:
    """Caption every web shard in `inputs` into ``out_dir/<settings-hash>/``; complete shards
    are skipped, so rerunning after a crash finishes the job."""
    captioner = Captioner.build(model, cfg)
    stats, plan = plan_caption(inputs, out_dir, captioner.loaded, cfg)
    return stream_shards(captioner, caption_job, stats, plan)  # a bad input shard does not stop the others
