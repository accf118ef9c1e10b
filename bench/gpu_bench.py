"""The GPU benchmark (issue 16): every figure one H200 run should give, in one process.

    PYTHONPATH=. python3 bench/gpu_bench.py --device cuda --out bench/out    # or: bash bench/gpu.sh
    PYTHONPATH=. python3 bench/gpu_bench.py --device cpu --quick --out /tmp/g   # the CPU smoke run

Sections (each runs on its own: one that fails records its error and the others still run):

- `filter_itm`: ITM images/s (2 captions per image, as CapFilt filters web + synthetic),
  ours (`MED.itm_probability`, each image encoded once) vs transformers'
  `BlipForImageTextRetrieval` (pixels repeated per text) on the same random weights,
  bf16 autocast on CUDA for both, at batch sizes doubling until OOM or the cap; and the
  per-sample loop (one transformers call per pair at batch 1, as Data-Juicer's filter
  does): `vs_per_sample` is ours over it.
- `caption`: nucleus captioning (top_p 0.9, top_k off, exactly 20 tokens) images/s, ours
  `MED.generate` vs `BlipForConditionalGeneration.generate`, batch sizes doubling.
- `pipeline`: `tasks.filter.run_filter` on a Parquet shard of photo-like 640x480 JPEGs
  (DataLoader decode workers, pinned uint8 batches, Parquet out) vs the same model on
  the same batches already decoded (by the stage's own loader) and on the device: the
  ratio (model-only seconds / stage seconds) is the pipeline's efficiency.
- `decode`: JPEG decodes/s on one core, PIL full vs reduced (`decode_image(reduce_to=384)`)
  vs `torchvision.io.decode_jpeg(device="cuda")` (nvjpeg) when torchvision and CUDA exist.
- `pretrain_mfu`: one pretrain `TrainStep` (ITC with momentum queue, ITM with hard
  negatives, LM; AdamW) of base MED at 224 px, batch doubling; FLOPs counted by
  `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention of one whole step,
  momentum forward included), with the 6 x params x tokens estimate beside it; MFU
  against 790 TFLOP/s (the H200's measured bf16 matmul rate; "n/a" on CPU).
- `ddp`: the same step wrapped in DistributedDataParallel on a one-rank process group
  (NCCL on CUDA, gloo on CPU) vs unwrapped: the wrapper's overhead.
- peak memory: every section records `torch.cuda.max_memory_allocated` (reset before
  it); on CPU the process's peak RSS so far (monotone, so an upper bound).

`--quick`: the tiny preset and small sizes (the CPU smoke run takes about a minute).
Imports only torch, transformers, pyarrow, numpy, pillow, `blip_core`, `data.shards` /
`data.images` / `data.synth_photo` and `tasks.filter` (no Prefect, duckdb, av, datasets):
the GPU machine has nothing else. Writes OUT/gpu.json and OUT/gpu.md and prints the latter.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

warnings.filterwarnings("ignore")
PEAK_BF16_FLOPS = 790e12  # measured bf16 8192^3 matmul on one H200 (/work/shared/PITFALLS.md)
TOP_P, REP, CAPTION_TOKENS = 0.9, 1.1, 20
SECTION_SECONDS = 45.0  # stop doubling a batch size once one measurement takes longer
# every module the sections import (lazily, inside them): `--check-imports` imports them all
SECTION_MODULES = (
    "blip_core", "blip_core.config", "blip_core.hf", "blip_core.med", "blip_core.image", "blip_core.train",
    "blip_core.train.distributed", "blip_core.train.loop", "blip_core.train.state", "data.images", "data.shards",
    "data.synth_photo", "tasks.execution", "tasks.filter", "tasks.image_batches", "torch.distributed", "torch.nn.parallel",
    "torch.utils.flop_counter", "transformers", "train_step",
)  # fmt: skip


# ----------------------------------------------------------------------------- sizes


def sizes(quick: bool, device: str) -> dict[str, Any]:
    """Every knob of the run in one place: the full GPU run, or the quick (tiny) one."""
    if quick:
        return {"preset": "tiny", "image_size": 0, "itm_batches": [4, 8], "caption_batches": [4, 8],
                "pipeline_images": 32, "pipeline_jpeg": (160, 120), "pipeline_batch": 8,
                "decode_images": 8, "decode_jpeg": (640, 480), "decode_target": 384,
                "train_preset": "tiny", "train_size": 0, "train_batches": [4], "train_steps": 2, "repeats": 3}  # fmt: skip
    return {"preset": "base", "image_size": 384, "itm_batches": [16, 32, 64, 128, 256, 512, 1024],
            "caption_batches": [16, 32, 64, 128, 256, 512], "pipeline_images": 2048, "pipeline_jpeg": (640, 480),
            "pipeline_batch": 256, "decode_images": 64, "decode_jpeg": (1600, 1200), "decode_target": 384,
            "train_preset": "base", "train_size": 224, "train_batches": [32, 64, 128, 256], "train_steps": 3,
            "repeats": 2}  # fmt: skip


# ----------------------------------------------------------------------------- timing and memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best of `repeats` timed calls after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_gib": torch.cuda.max_memory_allocated(device) / 2**30, "peak_kind": "cuda max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_gib": rss / 2**30, "peak_kind": "process peak RSS so far (CPU)"}


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; a no-op on CPU (bf16 on CPU is slow and not what the stages run)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def doubling(batches: list[int], device: torch.device, measure: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """`measure(b)` for each batch size until one runs out of memory or takes too long."""
    rows = []
    for b in batches:
        start = time.perf_counter()
        try:
            rows.append(measure(b))
        except Exception as error:  # noqa: BLE001 - an OOM ends the doubling, anything else is the section's error
            if not is_oom(error):
                raise
            rows.append({"batch": b, "oom": True})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            break
        if time.perf_counter() - start > SECTION_SECONDS:
            break
    return rows


# ----------------------------------------------------------------------------- models


def random_models(name: str, image_size: int, device: torch.device) -> tuple[Any, Any, Any]:
    """Ours (random weights) and transformers' retrieval and captioning models holding the same weights."""
    from blip_core.config import preset
    from blip_core.hf import to_hf_model
    from blip_core.med import MED

    torch.manual_seed(0)
    cfg = preset(name)
    if image_size:
        cfg = cfg.with_image_size(image_size)
    ours = MED(cfg).eval()
    hf_r, hf_c = to_hf_model(ours, "retrieval"), to_hf_model(ours, "captioning")
    return tuple(m.to(device).eval() for m in (ours, hf_r, hf_c))


def itm_inputs(cfg: Any, images: int, device: torch.device, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random pixels and two [ENC]-first captions per image (the second shorter), image-major."""
    t, size = cfg.text, cfg.vision.image_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(t.eos_token_id + 1, t.bos_token_id, (2 * images, 24), generator=g)
    ids[:, 0], ids[:, -1] = t.enc_token_id, t.eos_token_id
    mask = torch.ones_like(ids)
    mask[1::2, 16:] = 0
    return {"pixels": torch.randn(images, 3, size, size, generator=g).to(device), "ids": ids.to(device),
            "mask": mask.to(device), "index": torch.arange(images, device=device).repeat_interleave(2)}  # fmt: skip


# ----------------------------------------------------------------------------- sections


def section_filter_itm(device: torch.device, s: dict[str, Any], models: tuple) -> dict[str, Any]:
    ours, hf_r, _ = models

    def measure(b: int) -> dict[str, Any]:
        x = itm_inputs(ours.config, b, device)
        with torch.inference_mode(), autocast(device):
            t_ours = best_seconds(lambda: ours.itm_probability(x["pixels"], x["ids"], x["mask"], image_index=x["index"]), device, s["repeats"])
            t_hf = best_seconds(lambda: hf_r(input_ids=x["ids"], pixel_values=x["pixels"][x["index"]], attention_mask=x["mask"]).itm_score,
                                device, s["repeats"])  # fmt: skip
            p_ours = ours.itm_probability(x["pixels"], x["ids"], x["mask"], image_index=x["index"])
            p_hf = hf_r(input_ids=x["ids"], pixel_values=x["pixels"][x["index"]], attention_mask=x["mask"]).itm_score.float().softmax(-1)[:, 1]
        diff = (p_ours.float() - p_hf).abs().max().item()
        return {"batch": b, "ours_img_s": b / t_ours, "hf_img_s": b / t_hf, "speedup": t_hf / t_ours, "max_abs_dp": diff}

    rows = doubling(s["itm_batches"], device, measure)
    per_sample = per_sample_itm_img_s(hf_r, ours.config, device, s["repeats"])
    for r in rows:
        if not r.get("oom"):
            r["vs_per_sample"] = r["ours_img_s"] / per_sample
    return {"rows": rows, "per_sample_img_s": per_sample}


def per_sample_itm_img_s(hf_r: Any, cfg: Any, device: torch.device, repeats: int, images: int = 8) -> float:
    """Images/s of the per-sample loop data-processing toolkits run (Data-Juicer's
    image_text_matching_filter): one `BlipForImageTextRetrieval` call per (image, caption)
    pair, batch 1, 2 captions per image; the processor's CPU work is left out, so this is
    the loop's best case on the device."""
    x = itm_inputs(cfg, images, device)

    def loop() -> None:
        for c in range(2 * images):
            i = int(x["index"][c])
            hf_r(input_ids=x["ids"][c : c + 1], pixel_values=x["pixels"][i : i + 1], attention_mask=x["mask"][c : c + 1]).itm_score

    with torch.inference_mode(), autocast(device):
        return images / best_seconds(loop, device, repeats)


def section_caption(device: torch.device, s: dict[str, Any], models: tuple) -> dict[str, Any]:
    ours, _, hf_c = models
    size = ours.config.vision.image_size
    kw = {"max_length": CAPTION_TOKENS, "min_length": CAPTION_TOKENS, "repetition_penalty": REP}

    def measure(b: int) -> dict[str, Any]:
        pixels = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
        seeds = list(range(b))
        with torch.inference_mode(), autocast(device):
            t_ours = best_seconds(lambda: ours.generate(pixels, "nucleus", top_p=TOP_P, seeds=seeds, **kw), device, s["repeats"])
            t_hf = best_seconds(lambda: hf_c.generate(pixels, do_sample=True, top_p=TOP_P, top_k=0, **kw), device, s["repeats"])
            length = ours.generate(pixels, "nucleus", top_p=TOP_P, seeds=seeds, **kw).shape[1]
        return {"batch": b, "ours_img_s": b / t_ours, "hf_img_s": b / t_hf, "speedup": t_hf / t_ours, "tokens": int(length)}

    return {"rows": doubling(s["caption_batches"], device, measure)}


def _pipeline_shard(folder: Path, n: int, width: int, height: int) -> Path:
    """One `pairs` shard of `n` web rows: photo-like JPEGs (32 distinct, cycled, each row's bytes
    made unique by a trailing counter after the JPEG's end, so the filter's content dedupe
    does not merge them) with random captions."""
    from data.shards import shard_name, write_shard
    from data.synth_photo import photo_jpeg

    words = "a an the red blue green small big dog cat square on in grass two photo of man woman".split()
    rng = np.random.default_rng(0)
    distinct = [photo_jpeg(i, width, height) for i in range(min(n, 32))]
    rows = [{"key": f"k{i:06d}", "image_id": f"k{i:06d}", "source": "web", "caption": " ".join(rng.choice(words, 10)),
             "jpg": distinct[i % len(distinct)] + i.to_bytes(4, "little"), "status": "ok", "width": width, "height": height}
            for i in range(n)]  # fmt: skip
    schema = pa.schema([("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                        ("jpg", pa.binary()), ("status", pa.string()), ("width", pa.int32()), ("height", pa.int32())])  # fmt: skip
    path = folder / shard_name(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_shard(pa.Table.from_pylist(rows, schema=schema), path, kind="pairs")
    return path


def _loaded(preset_name: str, image_size: int, device: torch.device) -> Any:
    """A random MED with a word tokenizer (BERT-sized for base), as a stage receives it."""
    import blip_core
    from blip_core.config import preset
    from blip_core.med import MED

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import _BERT_VOCAB, _TINY_VOCAB, _tokenizer

    tokenizer, _ = _tokenizer(_TINY_VOCAB if preset_name == "tiny" else _BERT_VOCAB)
    cfg = preset(preset_name).with_tokenizer(tokenizer)
    if image_size:
        cfg = cfg.with_image_size(image_size)
    torch.manual_seed(0)
    return blip_core.LoadedModel(MED(cfg).eval().to(device), tokenizer, "random-gpu-bench", "capfilt-med")


def section_pipeline(device: torch.device, s: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from blip_core.image import ImageTransform
    from data.shards import read_table
    from tasks.execution import ExecutionConfig, inference_context, resolve_precision, resolve_workers
    from tasks.filter import FilterConfig, run_filter
    from tasks.image_batches import image_batches, index_batches

    n, b = s["pipeline_images"], s["pipeline_batch"]
    shard = _pipeline_shard(tmp / "web", n, *s["pipeline_jpeg"])
    loaded = _loaded(s["preset"], s["image_size"], device)
    model, size = loaded.model, loaded.model.config.vision.image_size
    execution = ExecutionConfig(batch_size=b, num_workers=-1, device=str(device), progress=False)
    cfg = FilterConfig(execution=execution)
    runs = iter(range(100))
    stage_s = best_seconds(lambda: run_filter([shard], tmp / f"filter{next(runs)}", loaded, cfg), device, s["repeats"])

    # the same batches, decoded beforehand by the stage's own loader and kept on the device
    table = read_table(shard, "pairs")
    batches = index_batches(np.arange(n), b)
    on_device = [p for p, _ in image_batches(table.column("jpg").combine_chunks(), batches, ImageTransform(size), execution, device, "reduced")]
    ids, mask = loaded.tokenizer.encode(table.column("caption").to_pylist(), mode="itm", max_length=cfg.max_text_tokens)
    ids, mask = ids.to(device), mask.to(device)

    def model_only() -> None:
        with inference_context(device, resolve_precision("auto", device)):
            for rows, pixels in zip(batches, on_device):
                lo, hi = rows[0], rows[-1] + 1
                width = int(mask[lo:hi].sum(1).max())
                embeds = model.encode_image(pixels)
                model.itm_logits(embeds, ids[lo:hi, :width], mask[lo:hi, :width]).float().softmax(-1)[:, 1].cpu()

    model_s = best_seconds(model_only, device, s["repeats"])
    return {"images": n, "jpeg": "x".join(map(str, s["pipeline_jpeg"])), "batch": b, "model_px": size,
            "decode_workers": resolve_workers(-1, device), "stage_img_s": n / stage_s, "model_only_img_s": n / model_s,
            "efficiency": model_s / stage_s}  # fmt: skip


def section_decode(device: torch.device, s: dict[str, Any]) -> dict[str, Any]:
    from data.images import decode_image
    from data.synth_photo import photo_jpeg

    w, h = s["decode_jpeg"]
    jpegs = [photo_jpeg(i, w, h) for i in range(s["decode_images"])]
    n, target = len(jpegs), s["decode_target"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = best_seconds(lambda: [decode_image(j) for j in jpegs], torch.device("cpu"), s["repeats"])
        reduced = best_seconds(lambda: [decode_image(j, reduce_to=target) for j in jpegs], torch.device("cpu"), s["repeats"])
    finally:
        torch.set_num_threads(threads)
    out: dict[str, Any] = {"images": n, "jpeg": f"{w}x{h}", "reduce_to": target, "pil_full_img_s_per_core": n / full,
                           "pil_reduced_img_s_per_core": n / reduced, "reduced_speedup": full / reduced}  # fmt: skip
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        out["nvjpeg_img_s"] = "n/a (no torchvision)"
        return out
    if device.type != "cuda":
        out["nvjpeg_img_s"] = "n/a (no cuda)"
        return out
    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    gpu = best_seconds(lambda: decode_jpeg(data, device=device), device, s["repeats"])
    out["nvjpeg_img_s"] = n / gpu
    return out


def _train_step(preset_name: str, image_size: int, batch: int, device: torch.device, distributed: bool = False) -> tuple[Any, Any, Any, Any]:
    """The trainer's own pretrain `TrainStep` on random pixels and captions (see bench/train_step.py)."""
    from blip_core.train import TrainConfig
    from blip_core.train.distributed import DistInfo
    from blip_core.train.loop import TrainStep
    from blip_core.train.state import build_state

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import _BERT_VOCAB, _TINY_VOCAB, _batches, _tokenizer

    tokenizer, words = _tokenizer(_TINY_VOCAB if preset_name == "tiny" else _BERT_VOCAB)
    queue = batch * max(1, 57_600 // batch)
    cfg = TrainConfig.for_mode("pretrain", preset=preset_name, batch_size=batch, queue_size=queue, warmup_steps=0,
                               image_size=image_size, device=device.type, progress=False)  # fmt: skip
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    state = build_state(cfg, info, tokenizer, None)
    step = TrainStep(cfg, state, info, steps_per_epoch=1000, total=10**6)
    if distributed:  # one rank: TrainStep wraps only when world_size > 1, so wrap as it would
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index or 0] if device.type == "cuda" else None
        step.objectives = DistributedDataParallel(step.objectives, device_ids=ids, find_unused_parameters=False)
    return cfg, state, step, _batches(batch, cfg.resolved_image_size(), words)


def _analytic_flops(model: Any, batch: int, image_size: int, text_tokens: int) -> float:
    """6 x params x tokens: vision params x image tokens + text params x text tokens x 3 text passes (ITC, ITM, LM)."""
    vision = sum(p.numel() for p in model.vision.parameters())
    text = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision."))
    patches = (image_size // model.config.vision.patch_size) ** 2 + 1
    return 6.0 * batch * (vision * patches + 3 * text * text_tokens)


def section_pretrain_mfu(device: torch.device, s: dict[str, Any]) -> dict[str, Any]:
    def measure(b: int) -> dict[str, Any]:
        cfg, state, step, data = _train_step(s["train_preset"], s["train_size"], b, device)
        for _ in range(2):
            step.step(data)
        counted = None
        try:
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False) as counter:
                step.step(data)
            counted = float(counter.get_total_flops())
        except Exception:  # noqa: BLE001 - the analytic estimate stands in
            counted = None
        sync(device)
        start = time.perf_counter()
        for _ in range(s["train_steps"]):
            last = step.step(data)
        sync(device)
        seconds = (time.perf_counter() - start) / s["train_steps"]
        px = cfg.resolved_image_size()
        analytic = _analytic_flops(state.model, b, px, cfg.text_max_length)
        flops = counted if counted else analytic
        del state, step
        return {"batch": b, "image_px": px, "step_s": seconds, "samples_s": b / seconds,
                "tflop_step_counted": counted / 1e12 if counted else "n/a", "tflop_step_6nd": analytic / 1e12,
                "achieved_tflop_s": flops / seconds / 1e12,
                "mfu": flops / seconds / PEAK_BF16_FLOPS if device.type == "cuda" else "n/a (cpu)", "loss": last["loss"]}  # fmt: skip

    return {"rows": doubling(s["train_batches"], device, measure), "peak_flops": PEAK_BF16_FLOPS}


def section_ddp(device: torch.device, s: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed as dist

    b = s["train_batches"][min(1, len(s["train_batches"]) - 1)]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29_500 + os.getpid() % 1000))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    try:
        seconds = {}
        for wrapped in (False, True):
            _, _, step, data = _train_step(s["train_preset"], s["train_size"], b, device, distributed=wrapped)
            seconds[wrapped] = best_seconds(lambda: step.step(data), device, s["repeats"])
            del step
    finally:
        dist.destroy_process_group()
    return {"backend": backend, "world_size": 1, "batch": b, "plain_step_s": seconds[False], "ddp_step_s": seconds[True],
            "ddp_overhead": seconds[True] / seconds[False] - 1}  # fmt: skip


# ----------------------------------------------------------------------------- driver


def run_section(name: str, device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one section; its error (not raised) and its peak memory go in its record."""
    reset_peak(device)
    start = time.perf_counter()
    try:
        result = {"status": "ok", **fn()}
    except Exception as error:  # noqa: BLE001 - a failing section must not cost the others
        result = {"status": "error", "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-3000:]}
    result["seconds"] = time.perf_counter() - start
    result.update(peak_memory(device))
    print(f"[gpu_bench] {name}: {result['status']} in {result['seconds']:.1f} s", file=sys.stderr, flush=True)
    return result


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "torchvision": tv, "device": str(device), "gpu": gpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(report: dict[str, Any]) -> str:
    env, sec = report["environment"], report["sections"]
    lines = [f"GPU bench ({'quick' if report['quick'] else 'full'}): device {env['device']} {env['gpu'] or ''}, "
             f"torch {env['torch']}, transformers {env['transformers']}, preset {report['sizes']['preset']}, "
             f"wall {report['wall_s']:.0f} s", "",
             "| section | measure | figures | peak mem (GiB) | status |", "|---|---|---|---:|---|"]  # fmt: skip

    def row(name: str, measure: str, figures: str) -> None:
        r = sec[name]
        status = r["status"] if r["status"] in ("ok", "skipped") else f"error: {r['error'][:120]}"
        lines.append(f"| {name} | {measure} | {figures if r['status'] == 'ok' else '-'} | {r['peak_gib']:.2f} | {status} |")

    def per_batch(name: str, keys: list[str]) -> str:
        rows = sec[name].get("rows", [])
        return "; ".join(f"b{r['batch']}: OOM" if r.get("oom") else f"b{r['batch']}: " + " / ".join(_fmt(r[k]) for k in keys) for r in rows)

    row("filter_itm", "ITM img/s ours / transformers (speed-up), ours vs the per-sample loop",
        per_batch("filter_itm", ["ours_img_s", "hf_img_s", "speedup", "vs_per_sample"])
        + f"; per-sample loop {_fmt(sec['filter_itm'].get('per_sample_img_s'))} img/s")
    row("caption", "nucleus 20-token img/s ours / transformers (speed-up)", per_batch("caption", ["ours_img_s", "hf_img_s", "speedup"]))
    p = sec["pipeline"]
    row("pipeline", "filter stage img/s / model-only img/s (efficiency)",
        f"{_fmt(p.get('stage_img_s'))} / {_fmt(p.get('model_only_img_s'))} ({_fmt(p.get('efficiency'))}), "
        f"{p.get('images')} JPEGs {p.get('jpeg')}, batch {p.get('batch')}, {p.get('decode_workers')} workers")
    d = sec["decode"]
    row("decode", "decodes/s: PIL full / reduced per core, nvjpeg",
        f"{_fmt(d.get('pil_full_img_s_per_core'))} / {_fmt(d.get('pil_reduced_img_s_per_core'))}, "
        f"{_fmt(d.get('nvjpeg_img_s'))} ({d.get('jpeg')} to {d.get('reduce_to')})")
    row("pretrain_mfu", "step s / samples/s / TFLOP/s / MFU", per_batch("pretrain_mfu", ["step_s", "samples_s", "achieved_tflop_s", "mfu"]))
    g = sec["ddp"]
    row("ddp", f"{g.get('backend')} 1-rank step s plain / DDP (overhead)",
        f"{_fmt(g.get('plain_step_s'))} / {_fmt(g.get('ddp_step_s'))} ({_fmt(g.get('ddp_overhead'))}), batch {g.get('batch')}")
    return "\n".join(lines) + "\n"


def write_json(out: Path, quick: bool, s: dict[str, Any], device: torch.device, sections: dict[str, Any], start: float) -> dict[str, Any]:
    report = {"quick": quick, "sizes": s, "environment": environment(device), "sections": sections,
              "wall_s": time.perf_counter() - start}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="tiny preset, small sizes")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench/out"))
    parser.add_argument("--sections", nargs="+", default=None, help="run only these sections")
    parser.add_argument("--check-imports", action="store_true", help="import every module the sections use, then exit")
    args = parser.parse_args()
    if args.check_imports:
        import importlib

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        for name in SECTION_MODULES:
            importlib.import_module(name)
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval  # noqa: F401 - lazy in transformers
        print(f"imported {len(SECTION_MODULES)} modules")
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device; use --device cpu")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    s = sizes(args.quick, args.device)
    start = time.perf_counter()
    sections: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models: list[Any] = []

        def with_models(fn: Callable[..., dict[str, Any]]) -> Callable[[], dict[str, Any]]:
            def run() -> dict[str, Any]:
                if not models:
                    models.extend(random_models(s["preset"], s["image_size"], device))
                return fn(device, s, tuple(models))

            return run

        plan = {
            "filter_itm": with_models(section_filter_itm),
            "caption": with_models(section_caption),
            "pipeline": lambda: section_pipeline(device, s, tmp),
            "decode": lambda: section_decode(device, s),
            "pretrain_mfu": lambda: section_pretrain_mfu(device, s),
            "ddp": lambda: section_ddp(device, s),
        }
        for name, fn in plan.items():
            if args.sections and name not in args.sections:
                sections[name] = {"status": "skipped", "error": "not asked for", "peak_gib": float("nan")}
                continue
            if name == "pipeline":
                models.clear()  # free the ITM / caption models before the stage loads its own
            sections[name] = run_section(name, device, fn)
            write_json(args.out, args.quick, s, device, sections, start)  # so far: a run cut short keeps what it measured
    report = write_json(args.out, args.quick, s, device, sections, start)
    table = markdown(report)
    (args.out / "gpu.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
