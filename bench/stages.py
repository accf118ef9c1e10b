"""The caption and filter STAGES vs a straightforward transformers loop, on the same shards
and the same weights, in one run; plus the filter stage's peak memory at 1x and 8x shards.

Ours: `tasks.caption.run_caption` / `tasks.filter.run_filter` end to end (Parquet in,
DataLoader decoding, model, Parquet + completion records out). Theirs: the loop users
write today: read the shard with pyarrow, PIL-decode each image, `BlipProcessor`, then
`BlipForConditionalGeneration.generate` / `BlipForImageTextRetrieval(...)` per batch of
the same size, on the model exported with `blip_core.export_hf` and loaded by
transformers' own `from_pretrained`. The filter loop scores every (image, caption) pair,
web and synthetic, as a pair (transformers takes one image per text). Both use fp32 on
CPU (bf16 autocast on CUDA for ours), the same threads, nucleus top_p 0.9, top_k off,
max 20 / min 5 tokens. images/s counts web images.

Checks printed with the table: ITM probabilities of ours vs transformers (max |dp|), and
greedy caption ids of ours vs transformers on the first batch (must be equal).

Usage: PYTHONPATH=. python bench/stages.py --preset tiny --shards 8 --images 64 --batch-size 32
       PYTHONPATH=. python bench/stages.py --preset base --shards 1 --images 8 --batch-size 4 --no-memory
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import transformers
from PIL import Image

import blip_core
from blip_core.med import MED
from blip_core.tokenizer import build_tokenizer
from data.shards import list_shards, read_table, shard_name, write_shard
from tasks.caption import CaptionConfig, run_caption
from tasks.execution import ExecutionConfig
from tasks.filter import FilterConfig, run_filter

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
PROMPT = "a picture of "
MAX_LEN, MIN_LEN, TOP_P = 20, 5, 0.9
WORDS = "a an the red blue green small big dog cat square circle on in grass table two three photo of man woman".split()
_EOS_BIAS = 2.0  # makes random-weight captions end after ~9 words on average (BLIP's are ~10)
SOURCE_PX = {"tiny": 64, "base": 256}  # stored JPEG size; the model resizes to its own size


# ----------------------------------------------------------------------------- timing


class Stopwatch:
    """Wall seconds and this process's CPU seconds (all its threads) since creation.

    On a shared CPU the wall clock mostly measures the neighbours; CPU seconds measure
    the work. Ours runs with workers=0 for the CPU figure so no work hides in children.
    """

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall0, time.process_time() - self.cpu0


# ----------------------------------------------------------------------------- setup


def _peaky(model: MED) -> None:
    """Random init gives near-uniform next-token distributions; sharpen them so captions end."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3)
        model.lm_head.decoder.bias[model.config.text.eos_token_id] += _EOS_BIAS


def _tokenizer(preset: str, rng: np.random.Generator):
    """tiny: a small vocabulary; base: ~30k pieces like bert-base-uncased (the LM head's real cost)."""
    corpus = [" ".join(rng.choice(WORDS, 8)) for _ in range(200)]
    if preset == "tiny":
        return build_tokenizer(corpus, vocab_size=1000)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = {"".join(rng.choice(letters, int(rng.integers(3, 9)))) for _ in range(40_000)}
    return build_tokenizer(corpus + sorted(words), vocab_size=30_522)


def make_models(preset: str, folder: Path) -> tuple[Path, Path, Path]:
    """Ours (MED checkpoint) and the two transformers exports of the same weights."""
    rng = np.random.default_rng(0)
    tokenizer = _tokenizer(preset, rng)
    torch.manual_seed(0)
    model = MED(blip_core.preset(preset).with_tokenizer(tokenizer)).eval()
    _peaky(model)
    ours = blip_core.save(model, tokenizer, folder / "ours")
    retrieval = blip_core.export_hf(model, tokenizer, folder / "hf-retrieval", kind="retrieval")
    captioning = blip_core.export_hf(model, tokenizer, folder / "hf-captioning", kind="captioning")
    return ours, retrieval, captioning


def make_shards(folder: Path, shards: int, images: int, px: int) -> list[Path]:
    """Web pair shards of random JPEGs (photo-like noise) with random captions."""
    rng = np.random.default_rng(1)
    paths = []
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        rows = []
        for i in range(images):
            buffer = io.BytesIO()
            pixels = rng.integers(0, 256, (px // 8, px // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((px, px), Image.BILINEAR).save(buffer, format="JPEG", quality=90)
            key = f"s{s}-{i:05d}"
            rows.append({"key": key, "image_id": key, "source": "web", "caption": " ".join(rng.choice(WORDS, int(rng.integers(4, 14)))),
                         "jpg": buffer.getvalue(), "status": "ok", "width": px, "height": px})
        table = pa.Table.from_pylist(rows, schema=pa.schema([
            ("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
            ("jpg", pa.binary()), ("status", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ]))
        path = folder / shard_name(s)
        write_shard(table, path, kind="pairs")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- transformers loops


def _images(jpgs: list[bytes]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(b)).convert("RGB") for b in jpgs]


def hf_caption(folder: Path, shards: list[Path], batch: int, device: str, greedy: bool = False, limit: int | None = None) -> tuple[float, list[list[int]]]:
    """The loop users write: processor + BlipForConditionalGeneration.generate per batch."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(folder))
    model = BlipForConditionalGeneration.from_pretrained(str(folder)).to(device).eval()
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "top_p": TOP_P, "top_k": 0}
    ids_out: list[list[int]] = []
    clock = Stopwatch()
    for shard in shards:
        rows = read_table(shard, "pairs").to_pylist()
        rows = [r for r in rows if r["status"] == "ok"][:limit]
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            inputs = processor(images=_images([r["jpg"] for r in chunk]), text=[PROMPT] * len(chunk), return_tensors="pt").to(device)
            with torch.no_grad():
                out = model.generate(**inputs, max_length=MAX_LEN, min_length=MIN_LEN, **sampling)
            processor.batch_decode(out, skip_special_tokens=True)
            ids_out += out.tolist()
    return clock.read(), ids_out


def hf_filter(folder: Path, shards: list[Path], captions: Path, batch: int, device: str) -> tuple[float, dict[str, float]]:
    """The loop users write: every (image, caption) pair through BlipForImageTextRetrieval."""
    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(str(folder))
    model = BlipForImageTextRetrieval.from_pretrained(str(folder)).to(device).eval()
    enc_id = processor.tokenizer.convert_tokens_to_ids("[ENC]")
    scores: dict[str, float] = {}
    clock = Stopwatch()
    for shard in shards:
        web = read_table(shard, "pairs").to_pylist()
        jpg = {r["image_id"]: r["jpg"] for r in web}
        syn = read_table(captions / shard.name, "pairs", columns=["key", "image_id", "caption"]).to_pylist()
        pairs = [(r["key"], r["image_id"], r["caption"]) for r in web + syn if (r["caption"] or "").strip()]
        for i in range(0, len(pairs), batch):
            chunk = pairs[i : i + batch]
            inputs = processor(images=_images([jpg[p[1]] for p in chunk]), text=[p[2] for p in chunk],
                               padding=True, truncation=True, max_length=35, return_tensors="pt").to(device)
            inputs["input_ids"][:, 0] = enc_id  # BLIP's ITM reads [ENC] first; transformers never swaps it in
            with torch.no_grad():
                prob = model(**inputs, use_itm_head=True).itm_score.softmax(dim=-1)[:, 1]
            scores.update(zip([p[0] for p in chunk], prob.tolist()))
    return clock.read(), scores


# ----------------------------------------------------------------------------- ours


def ours_caption(model: blip_core.LoadedModel, shards: list[Path], out: Path, execution: ExecutionConfig, strategy: str = "nucleus") -> tuple[float, Path]:
    cfg = CaptionConfig(strategy=strategy, max_length=MAX_LEN, min_length=MIN_LEN, top_p=TOP_P, execution=execution)
    clock = Stopwatch()
    stats = run_caption(shards, out, model, cfg)
    return clock.read(), stats.output


def ours_filter(model: blip_core.LoadedModel, shards: list[Path], captions: Path, out: Path, execution: ExecutionConfig) -> tuple[float, dict[str, float]]:
    clock = Stopwatch()
    stats = run_filter(shards, out, model, FilterConfig(execution=execution), caption_dir=captions)
    seconds = clock.read()
    scores = {}
    for outcome in ("kept", "rejected"):
        for p in list_shards(stats.output / outcome):
            t = read_table(p, "scored", columns=["key", "itm_score"])
            scores.update(zip(t.column("key").to_pylist(), t.column("itm_score").to_pylist()))
    return seconds, scores


def _peak_rss_mb(args: list[str]) -> float:
    """Run this script as a child and return its peak resident memory (MiB)."""
    proc = subprocess.Popen([sys.executable, __file__, *args], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise RuntimeError(f"memory child {args} failed with status {status}")
    return usage.ru_maxrss / 1024


def memory_child(model_dir: Path, shards: list[Path], captions: Path, out: Path, execution: ExecutionConfig) -> None:
    run_filter(shards, out, blip_core.load(model_dir), FilterConfig(execution=execution), caption_dir=captions)


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--images", type=int, default=64, help="images per shard")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=-1, help="ours: DataLoader workers (-1 = auto)")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (best of)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-memory", action="store_true", help="skip the 1x / 8x shards peak-memory children")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--memory-child", nargs=4, metavar=("MODEL", "SHARDS", "CAPTIONS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    execution = ExecutionConfig(batch_size=args.batch_size, num_workers=args.workers, device=args.device, progress=False)
    if args.memory_child:
        model_dir, shards, captions, out = args.memory_child
        memory_child(Path(model_dir), [Path(p) for p in shards.split(",")], Path(captions), Path(out), execution)
        return

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ours_dir, hf_r, hf_c = make_models(args.preset, tmp / "models")
        shards = make_shards(tmp / "web", args.shards, args.images, SOURCE_PX[args.preset])
        model = blip_core.load(ours_dir, device=args.device)
        n = args.shards * args.images

        # correctness: greedy ids on the first batch must match transformers exactly
        first = shards[:1]
        _, hf_ids = hf_caption(hf_c, first, args.batch_size, args.device, greedy=True, limit=args.batch_size)
        _, greedy_dir = ours_caption(model, first, tmp / "greedy", ExecutionConfig(batch_size=args.batch_size, num_workers=0, device=args.device, progress=False), "greedy")
        ours_text = read_table(list_shards(greedy_dir)[0], "pairs", columns=["caption"]).column("caption").to_pylist()[: args.batch_size]
        skip = model.tokenizer.prompt_length(PROMPT)  # bos + prompt tokens
        hf_text = model.tokenizer.decode([ids[skip:] for ids in hf_ids])
        greedy_equal = ours_text == hf_text

        names = ("cap_ours", "cap_hf", "fil_ours", "fil_hf")
        wall = {k: float("inf") for k in names}
        cpu = {k: float("inf") for k in names}

        def keep_best(name: str, seconds: tuple[float, float]) -> None:
            wall[name], cpu[name] = min(wall[name], seconds[0]), min(cpu[name], seconds[1])

        caption_dir = None
        for r in range(args.repeats):  # interleaved, best of: the CPU is shared
            t, out_dir = ours_caption(model, shards, tmp / f"caption{r}", execution)
            caption_dir = caption_dir or out_dir
            keep_best("cap_ours", t)
            keep_best("cap_hf", hf_caption(hf_c, shards, args.batch_size, args.device)[0])
            t, s_ours = ours_filter(model, shards, caption_dir, tmp / f"filter{r}", execution)
            keep_best("fil_ours", t)
            t, s_hf = hf_filter(hf_r, shards, caption_dir, args.batch_size, args.device)
            keep_best("fil_hf", t)
        scored = {k for k, v in s_ours.items() if v is not None}
        assert scored == s_hf.keys(), "ours and transformers scored different rows"
        diff = max(abs(s_ours[k] - s_hf[k]) for k in s_hf)

        memory = {}
        if not args.no_memory:
            for k in sorted({1, args.shards}):
                child = ["--memory-child", str(ours_dir), ",".join(map(str, shards[:k])), str(caption_dir), str(tmp / f"mem{k}"),
                         "--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device,
                         "--threads", str(args.threads)]
                memory[k] = _peak_rss_mb(child)

    rate = {k: (n / wall[k], n / cpu[k]) for k in names}
    result = {
        "preset": args.preset, "device": args.device, "threads": torch.get_num_threads(), "images": n,
        "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "images_per_wall_s": {k: rate[k][0] for k in names}, "images_per_cpu_s": {k: rate[k][1] for k in names},
        "itm_max_abs_diff": diff, "greedy_ids_equal": greedy_equal, "filter_peak_rss_mib": memory,
    }
    print("| preset | stage | images | transformers img/s (wall / CPU-s) | ours img/s (wall / CPU-s) | speed-up (wall / CPU) | check |")
    print("|---|---|---|---|---|---|---|")
    checks = {"cap": f"greedy ids equal: {greedy_equal}", "fil": f"max abs dp {diff:.1e}"}
    labels = {"cap": "caption (nucleus)", "fil": "filter (web + synthetic)"}
    for stage in ("cap", "fil"):
        hf, ours = rate[f"{stage}_hf"], rate[f"{stage}_ours"]
        print(f"| {args.preset} | {labels[stage]} | {n} | {hf[0]:.2f} / {hf[1]:.2f} | {ours[0]:.2f} / {ours[1]:.2f} "
              f"| {ours[0] / hf[0]:.2f}x / {ours[1] / hf[1]:.2f}x | {checks[stage]} |")
    if memory:
        print("filter peak RSS (MiB) by shards: " + ", ".join(f"{k}x: {v:.0f}" for k, v in memory.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
