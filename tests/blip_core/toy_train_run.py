"""Run the trainer on ToyPairs in its own process (kill-and-resume and torchrun tests).

    python tests/blip_core/toy_train_run.py OUT --mode pretrain --steps 30 [--resume] ...
Under torchrun every rank runs this; each rank writes OUT/rank<R>.json with a checksum
of its final weights so the test can compare replicas.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
torch.set_num_threads(1)

from toy_pairs import ToyPairs, all_captions  # noqa: E402

from blip_core import build_tokenizer  # noqa: E402
from blip_core.tokenizer import DEFAULT_PROMPT, Tokenizer  # noqa: E402
from blip_core.train import TrainConfig, train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", default="pretrain")
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--block", type=int, default=8, help="positions per rank block (= per-rank batch)")
    ap.add_argument("--ckpt-every", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--queue", type=int, default=32)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--tokenizer", help="folder: load the tokenizer from it, or build and save it there")
    args = ap.parse_args()
    # build_tokenizer's ids can differ between processes: runs that are compared share one
    if args.tokenizer and Path(args.tokenizer, "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_folder(args.tokenizer)
    else:
        tokenizer = build_tokenizer([*all_captions(), DEFAULT_PROMPT], vocab_size=100)
        if args.tokenizer:
            tokenizer.save(args.tokenizer)
    cfg = TrainConfig.for_mode(
        args.mode, out_dir=args.out, preset="tiny", epochs=50, max_steps=args.steps, batch_size=args.batch,
        queue_size=args.queue, lr=args.lr, warmup_steps=3, log_every=1, checkpoint_every=args.ckpt_every,
        keep_last=2, progress=False, resume=args.resume, device="cpu",
    )
    seen: dict[str, int] = {}

    def factory(rank: int, world: int) -> ToyPairs:
        seen["rank"] = rank
        return ToyPairs(args.samples, 32, seed=3, rank=rank, world_size=world, block=args.block)

    result = train(cfg, factory, tokenizer=tokenizer)
    # replicas: checksum of this rank's final weights
    h = hashlib.sha256()
    for name, p in sorted(result.model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    rank = seen["rank"]
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"weights": h.hexdigest(), "steps": result.steps}))


if __name__ == "__main__":
    main()
