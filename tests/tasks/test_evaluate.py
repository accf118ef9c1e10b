"""The evaluation stage on a tiny synthetic world with a tiny random MED (real model, real files)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import blip_core
from blip_core.config import preset
from blip_core.med import MED
from blip_core.tokenizer import build_tokenizer
from data.schema import SCORED
from data.shards import list_shards, read_table, shard_name, write_shard
from data.synth import SynthConfig, generate_world, load_truth
from data.synth_world import correct_captions, weak_captions
from tasks.evaluate.config import EvalConfig
from tasks.evaluate.measure import evaluate
from tasks.evaluate.run import evaluate_run, evaluate_run_folder
from tasks.evaluate.truth_checks import captioner_correctness, filter_noise_detection


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SynthConfig(seed=3, human_images=20, web_images=40, test_images=12, test_captions=2,
                                    rows_per_shard=100))
    return out


@pytest.fixture(scope="module")
def model_dir(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    captions = [c for p in list_shards(world / "human") for c in read_table(p, "pairs")["caption"].to_pylist()]
    tok = build_tokenizer(captions + ["click here", "img jpg"], vocab_size=200)
    model = MED(preset("tiny").with_tokenizer(tok))
    folder = tmp_path_factory.mktemp("model")
    blip_core.save(model, tok, folder)
    return folder


def _scored_from_truth(world: Path, clean_score: float, noisy_score: float) -> pa.Table:
    truth = load_truth(world)
    web = read_table(list_shards(world / "web")[0], "pairs")
    rows = []
    for r in web.to_pylist():
        clean = not truth.is_noisy(r["key"])
        score = clean_score if clean else noisy_score
        rows.append({**r, "itm_score": score, "keep": score >= 0.5, "threshold": 0.5,
                     "reject_reason": None if score >= 0.5 else "itm_below_threshold"})
        scene = truth.scenes[r["image_id"]]
        # two synthetic captions per image: one exact, one weak-but-true; only the exact kept
        for j, (cap, keep) in enumerate(((correct_captions(scene)[0], True), (weak_captions(scene)[0], False))):
            rows.append({**r, "key": f"{r['key']}-s{j}", "source": "synthetic", "caption": cap,
                         "itm_score": 0.9 if keep else 0.2, "keep": keep, "threshold": 0.5})
    return pa.Table.from_pylist(rows, schema=SCORED)


def test_filter_noise_detection_against_truth(world: Path) -> None:
    truth = load_truth(world)
    perfect = filter_noise_detection(_scored_from_truth(world, 0.9, 0.1), truth)
    assert perfect["roc_auc"] == 1.0 and perfect["precision"] == 1.0 and perfect["recall"] == 1.0
    assert perfect["noise_rejected"] == 1.0 and perfect["unmatched_rows"] == 0
    assert perfect["keep_rate_junk"] == 0.0 and perfect["keep_rate_weak"] == 1.0
    inverted = filter_noise_detection(_scored_from_truth(world, 0.1, 0.9), truth)
    assert inverted["roc_auc"] == 0.0 and inverted["noise_rejected"] == 0.0
    # correct 0.9 > junk 0.3 > weak 0.2 > swapped 0.1: weak beats exactly the swapped share of the noise
    by_kind = {"correct": 0.9, "junk": 0.3, "weak": 0.2, "swapped": 0.1}
    scored = _scored_from_truth(world, 0.9, 0.1)
    web = [r for r in scored.to_pylist() if r["source"] == "web"]
    for r in web:
        r["itm_score"] = by_kind[truth.web_kinds[r["key"]]]
    d = filter_noise_detection(pa.Table.from_pylist(web, schema=SCORED), truth)
    kinds = [truth.web_kinds[r["key"]] for r in web]
    assert d["roc_auc_correct_vs_noise"] == 1.0
    assert d["roc_auc_weak_vs_noise"] == pytest.approx(kinds.count("swapped") / (kinds.count("swapped") + kinds.count("junk")))


def test_captioner_correctness_against_truth(world: Path) -> None:
    scored = _scored_from_truth(world, 0.9, 0.1)
    synthetic = scored.filter(pa.compute.equal(scored["source"], "synthetic"))
    out = captioner_correctness(synthetic, load_truth(world))
    assert out["n"] == 80 and out["exact"] == 0.5 and out["true"] == 1.0
    assert out["exact_among_kept"] == 1.0 and out["keep_rate_exact"] == 1.0 and out["keep_rate_not_exact"] == 0.0


def test_evaluate_tiny_model(world: Path, model_dir: Path, tmp_path: Path) -> None:
    filter_dir = tmp_path / "filter" / "h"
    scored = _scored_from_truth(world, 0.9, 0.1)
    keep = scored["keep"]
    write_shard(scored.filter(keep), filter_dir / "kept" / shard_name(0), "scored")
    write_shard(scored.filter(pa.compute.invert(keep)), filter_dir / "rejected" / shard_name(0), "scored")
    cfg = EvalConfig(rerank_k=4, caption_strategy="greedy", batch_size=5)
    res = evaluate(model_dir, list_shards(world / "test"), world, filter_dir, cfg=cfg)
    assert res.n_images == 12 and res.n_texts == 24
    for table in (res.retrieval, res.retrieval_id):
        for d in ("TR", "IR"):
            assert 0.0 <= table[f"{d}@1"] <= table[f"{d}@5"] <= table[f"{d}@10"] <= 100.0
    # a scene hit includes the same-image hit, so scene recall is never lower
    for k, v in res.retrieval_id.items():
        assert res.retrieval[k] >= v - 1e-9, k
    assert {"BLEU-4", "CIDEr", "scene_exact", "scene_true"} <= set(res.captioning)
    assert set(res.retrieval_itc) == set(res.retrieval)
    assert res.filter_detection is not None and res.filter_detection["roc_auc"] == 1.0
    assert res.captioner is not None and res.captioner["exact"] == 0.5
    assert len(res.examples) == 5 and res.model_fingerprint


def test_evaluate_run_writes_json_and_skips_rerun(world: Path, model_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "final").symlink_to(model_dir, target_is_directory=True)
    (run / "ingest").mkdir()
    (run / "ingest" / "test").symlink_to(world / "test", target_is_directory=True)
    cfg = EvalConfig(rerank_k=2, caption_strategy="greedy", max_images=6)
    first = evaluate_run_folder(run, truth_dir=world, cfg=cfg)
    path = run / "eval" / "metrics.json"
    data = json.loads(path.read_text())
    assert data["n_images"] == 6 and data["fingerprint"] == first.fingerprint
    mtime = path.stat().st_mtime_ns
    again = evaluate_run_folder(run, truth_dir=world, cfg=cfg)
    assert again.retrieval == first.retrieval and path.stat().st_mtime_ns == mtime
    changed = evaluate_run_folder(run, truth_dir=world, cfg=EvalConfig(rerank_k=3, caption_strategy="greedy", max_images=6))
    assert changed.fingerprint != first.fingerprint


def test_evaluate_run_flow_signature(world: Path, model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run" / "eval"
    path = evaluate_run(model=str(model_dir), test=[str(p) for p in list_shards(world / "test")],
                        truth=str(world), out=str(out), cfg=EvalConfig(rerank_k=2, batch_size=8, device="cpu"))
    data = json.loads(Path(path).read_text())
    assert path == out / "metrics.json" and data["settings"]["rerank_k"] == 2 and data["n_images"] == 12
    assert data["filter_detection"] is None  # no filter output in this run folder


def test_empty_test_set_is_a_clear_error(tmp_path: Path, model_dir: Path) -> None:
    empty = tmp_path / shard_name(0)
    write_shard(pa.Table.from_pylist([], schema=SCORED).select(["key", "image_id", "source", "status"]), empty, "pairs")
    with pytest.raises(ValueError, match="no usable test rows"):
        evaluate(model_dir, [empty])


def test_pair_itc_scores_match_the_model(world: Path, model_dir: Path) -> None:
    from blip_core.image import ImageTransform
    from data.images import decode_image
    from tasks.evaluate.retrieval import pair_itc_scores

    web = read_table(list_shards(world / "web")[0], "pairs").slice(0, 6)
    images, texts = web["jpg"].to_pylist(), web["caption"].to_pylist()
    scores = pair_itc_scores(model_dir, images, texts, batch_size=4)
    loaded = blip_core.load(model_dir)
    size = loaded.model.config.vision.image_size
    pixels = torch.stack([ImageTransform(size)(decode_image(b).image) for b in images])
    ids, mask = loaded.tokenizer.encode(texts, "text", 35)
    expected = loaded.model.itc_similarity(pixels, ids, mask).diagonal()
    assert scores.shape == (6,) and torch.allclose(torch.from_numpy(scores), expected, atol=1e-5)
