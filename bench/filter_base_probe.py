"""What the CapFilt filter learns from its base: pretrain a base on human + a chosen part of
the web set, finetune a filter from it, and score the web captions against the truth.

This isolates the question behind the miniature Table 1's filter ROC-AUC: which web
captions must the base see, and with how much noise around them, for the filter to
rank true-but-vague ("weak") captions above the noise?

Steps, all on the ablation's default world (`tasks.ablation.AblationConfig`, world seed 0)
and its recipe (tiny preset, 800 pretraining steps x batch 64, filter finetune 1,000
steps at lr 1e-3 on the human pairs):

1. training rows = the human split + the web rows whose true kind is in ``--kinds``
   (correct, weak, swapped, junk), shuffled once over all rows;
2. ``--warm-seed S``: first pretrain a model on the human split of ANOTHER world (seed S,
   same size) and start the base from it; the analog of BLIP's towers starting from
   ImageNet / BERT weights rather than from scratch;
3. pretrain the base, evaluate it on the test set (TR@1 / IR@1, scene hits);
4. finetune the filter from the base on the human split;
5. score every web pair with the base's ITM head and with the filter; print ROC-AUC
   overall and by clean kind against the noise (swapped + junk).

Usage: PYTHONPATH=. python bench/filter_base_probe.py --kinds correct,weak,swapped,junk --out runs/probe-all
       PYTHONPATH=. python bench/filter_base_probe.py --kinds correct,weak --out runs/probe-clean
       PYTHONPATH=. python bench/filter_base_probe.py --warm-seed 1 --out runs/probe-warm
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data.shards import list_shards, read_table, shard_name, write_atomic, write_shard
from data.synth import SynthConfig, generate_world, load_truth
from data.synth_world import CAPTION_KINDS
from tasks import ablation as A
from tasks.execution import ExecutionConfig
from tasks.evaluate.truth_checks import filter_noise_detection, read_scored_rows
from tasks.filter import FilterConfig, run_filter

_SHUFFLE_SEED = 123
_COLUMNS = ["key", "image_id", "source", "caption", "jpg", "status"]
_DONE = "dataset.json"  # written after the shards: the folder is complete


def training_rows(world: Path, kinds: set[str], out: Path, rows_per_shard: int = 2000) -> Path:
    """Write human + the web rows of `kinds`, shuffled over all rows, as pair shards (a
    selection by the truth, which no pipeline stage makes; the ablation's rows are
    `run_assemble`'s)."""
    folder = out / "datasets" / "base"
    if (folder / _DONE).is_file():
        return folder
    truth = load_truth(world)
    web = pa.concat_tables([read_table(p, "pairs", columns=_COLUMNS) for p in list_shards(world / "web")])
    web = web.filter(pa.array([truth.web_kinds.get(k) in kinds for k in web["key"].to_pylist()]))
    human = [read_table(p, "pairs", columns=_COLUMNS) for p in list_shards(world / "human")]
    rows = pa.concat_tables([*human, web])
    rows = rows.take(pa.array(np.random.default_rng(_SHUFFLE_SEED).permutation(rows.num_rows)))
    for i, start in enumerate(range(0, rows.num_rows, rows_per_shard)):
        write_shard(rows.slice(start, rows_per_shard), folder / shard_name(i), "pairs")
    write_atomic(folder / _DONE, json.dumps({"total": rows.num_rows}))
    return folder


def warm_model(cfg: A.AblationConfig, out: Path, seed: int) -> Path:
    """A model pretrained on the human split of another world (same sizes, seed `seed`),
    with the experiment's tokenizer."""
    other = out / f"world-{seed}"
    generate_world(other, SynthConfig(seed=seed, human_images=cfg.human_images, web_images=10, test_images=10,
                                      human_vague_rate=cfg.human_vague_rate))
    return Path(A.train_or_resume(cfg, "pretrain", list_shards(other / "human"), out / "models" / "warm",
                                  cfg.capfilt_seed).final_dir)


def score(model: Path, world: Path, out: Path) -> dict[str, float]:
    """ROC-AUC of `model`'s ITM on the web pairs: overall and by clean kind against the noise."""
    execution = ExecutionConfig(batch_size=256, num_workers=0, device="cpu", progress=False)
    stats = run_filter(list_shards(world / "web"), out, model, FilterConfig(threshold=0.5, execution=execution))
    found = filter_noise_detection(read_scored_rows(Path(stats.output)), load_truth(world))
    return {k: float(v) for k, v in found.items() if k.startswith("roc_auc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(CAPTION_KINDS), help="web caption kinds the base trains on")
    parser.add_argument("--warm-seed", type=int, default=None, help="start the base from another world's human model")
    parser.add_argument("--steps", type=int, default=A.AblationConfig.pretrain_steps, help="base pretraining steps")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    kinds = {k.strip() for k in args.kinds.split(",") if k.strip()}
    if not kinds <= set(CAPTION_KINDS):
        parser.error(f"--kinds must be among {CAPTION_KINDS}, got {sorted(kinds)}")
    torch.set_num_threads(args.threads)
    cfg = A.AblationConfig(out_dir=str(args.out), pretrain_steps=args.steps, threads=args.threads)
    started = time.perf_counter()
    world = A.make_world(cfg, args.out)
    A.make_tokenizer(cfg, world, args.out)  # into args.out/tokenizer, where every pretraining reads it
    init = warm_model(cfg, args.out, args.warm_seed) if args.warm_seed is not None else None
    base = Path(A.train_or_resume(cfg, "pretrain", list_shards(training_rows(world, kinds, args.out)),
                                  args.out / "models" / "base", cfg.capfilt_seed, init=init).final_dir)
    retrieval = A.evaluate_on_test(cfg, base, world, args.out / "eval" / "base.json").retrieval
    filt = Path(A.train_or_resume(cfg, "finetune-filter", list_shards(world / "human"), args.out / "models" / "filter",
                                  cfg.capfilt_seed, init=base).final_dir)
    result = {
        "kinds": sorted(kinds), "warm_seed": args.warm_seed, "steps": args.steps,
        "base TR@1 / IR@1": [round(retrieval["TR@1"], 1), round(retrieval["IR@1"], 1)],
        "base ITM": score(base, world, args.out / "scored-base"),
        "filter ITM": score(filt, world, args.out / "scored-filter"),
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }  # fmt: skip
    (args.out / "probe.json").write_text(json.dumps(result, indent=2))
    print(f"| base trained on | warm start | base TR@1 / IR@1 | base ITM AUC (correct / weak) | filter AUC (correct / weak) |")
    print("|---|---|---|---|---|")
    b, f = result["base ITM"], result["filter ITM"]
    print(f"| human + web {'+'.join(sorted(kinds))} | {args.warm_seed if args.warm_seed is not None else '-'} | "
          f"{retrieval['TR@1']:.1f} / {retrieval['IR@1']:.1f} | "
          f"{b['roc_auc']:.3f} ({b['roc_auc_correct_vs_noise']:.3f} / {b['roc_auc_weak_vs_noise']:.3f}) | "
          f"{f['roc_auc']:.3f} ({f['roc_auc_correct_vs_noise']:.3f} / {f['roc_auc_weak_vs_noise']:.3f}) |")


if __name__ == "__main__":
    main()
