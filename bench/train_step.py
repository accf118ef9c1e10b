"""Training-step throughput and memory: samples/s and peak memory per mode and preset.

    PYTHONPATH=. python bench/train_step.py --presets tiny base --steps 5 --batch tiny=32 base=4

Each (preset, mode) case runs in a fresh subprocess (clean peak-memory figures) and
drives the trainer's own `TrainStep` (momentum encoders, queue, hard negatives,
AdamW, bf16 autocast on CUDA) on random pixels and random-word captions, with a
BERT-sized vocabulary for base/large. On CUDA it also counts the step's FLOPs with
`torch.utils.flop_counter` and reports model FLOPs utilisation against the H200's
measured bf16 matmul rate (about 790 TFLOP/s, see /work/shared/PITFALLS.md).
Imports only blip_core (the GPU machine has no Prefect or duckdb). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

MODES = ("pretrain", "finetune-filter", "finetune-captioner")
PEAK_BF16_FLOPS = 790e12  # measured bf16 8192^3 matmul on one H200
_BERT_VOCAB = 30522  # pieces before [DEC] / [ENC]
_TINY_VOCAB = 1000
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer(pieces: int) -> Any:
    """A whole-word vocabulary of `pieces` entries (instant; sized like bert-base-uncased for base)."""
    from transformers import BertTokenizer

    from blip_core.tokenizer import Tokenizer

    words = [f"w{i}" for i in range(pieces - len(_SPECIALS))]
    vocab = {token: i for i, token in enumerate([*_SPECIALS, *words, "[DEC]", "[ENC]"])}
    return Tokenizer(BertTokenizer(vocab=vocab, do_lower_case=True)), words


def _batches(batch: int, size: int, words: list[str], seed: int = 0) -> Iterator[dict[str, Any]]:
    rng = random.Random(seed)
    while True:
        yield {
            "pixel_values": torch.randn(batch, 3, size, size),
            "caption": [" ".join(rng.choices(words, k=rng.randint(8, 20))) for _ in range(batch)],
            "image_id": [str(rng.randrange(10**9)) for _ in range(batch)],
        }


def run_case(preset: str, mode: str, batch: int, steps: int, device: str, compile_vit: bool) -> dict[str, Any]:
    """Build the trainer state for one case, time `steps` optimizer steps after 2 warm-up steps."""
    from blip_core.train import TrainConfig
    from blip_core.train.distributed import DistInfo
    from blip_core.train.loop import TrainStep
    from blip_core.train.state import build_state

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    tokenizer, words = _tokenizer(_TINY_VOCAB if preset == "tiny" else _BERT_VOCAB)
    queue = batch * max(1, 57_600 // batch) if 57_600 % batch else 57_600
    cfg = TrainConfig.for_mode(mode, preset=preset, batch_size=batch, queue_size=queue, warmup_steps=0, device=dev.type,
                               compile=compile_vit, progress=False)  # fmt: skip
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
    state = build_state(cfg, info, tokenizer, None)
    step = TrainStep(cfg, state, info, steps_per_epoch=1000, total=10**6)
    data = _batches(batch, cfg.resolved_image_size(), words)
    params = sum(p.numel() for p in state.model.parameters())
    for _ in range(2):
        step.step(data)
    flops = None
    if dev.type == "cuda":
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step.step(data)
        flops = counter.get_total_flops()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        last = step.step(data)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {
        "preset": preset, "mode": mode, "batch": batch, "image_size": cfg.resolved_image_size(), "device": str(dev),
        "params_m": params / 1e6, "step_s": seconds, "samples_per_s": batch / seconds, "peak_gib": peak / 2**30,
        "loss": last["loss"],
    }  # fmt: skip
    if flops is not None:
        out["tflop_per_step"] = flops / 1e12
        out["mfu"] = flops / seconds / PEAK_BF16_FLOPS
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| preset | mode | device | px | batch | params (M) | step (s) | samples/s | peak mem (GiB) | TFLOP/step | MFU |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        tf = f"{r['tflop_per_step']:.2f}" if "tflop_per_step" in r else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
        lines.append(
            f"| {r['preset']} | {r['mode']} | {r['device']} | {r['image_size']} | {r['batch']} | {r['params_m']:.1f} | "
            f"{r['step_s']:.3f} | {r['samples_per_s']:.3g} | {r['peak_gib']:.2f} | {tf} | {mfu} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "base"])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--batch", nargs="+", default=["tiny=32", "base=4"], help="PRESET=BATCH per preset")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case (after 2 warm-up steps)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the ViT")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: PRESET:MODE:BATCH, run in this process
    args = ap.parse_args()
    if args.case:
        preset, mode, batch = args.case.split(":")
        print(json.dumps(run_case(preset, mode, int(batch), args.steps, args.device, args.compile)))
        return
    batches = dict(item.split("=") for item in args.batch)
    rows = []
    for preset in args.presets:
        for mode in args.modes:
            cmd = [sys.executable, __file__, "--case", f"{preset}:{mode}:{batches[preset]}", "--steps", str(args.steps),
                   "--device", args.device, *(["--compile"] if args.compile else [])]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{preset} {mode}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(_table(rows))


if __name__ == "__main__":
    main()
