"""The trainer: losses fall, SIGKILL + resume is bit-exact, 2-process DDP, clear errors, momentum, schedules."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from blip_core import build_tokenizer, load
from blip_core.config import preset
from blip_core.med import MED
from blip_core.momentum import FeatureQueue, MomentumEncoders, QueueSizeError
from blip_core.tokenizer import DEFAULT_PROMPT
from blip_core.train import (
    CheckpointError,
    CheckpointMismatchError,
    EmptyDatasetError,
    NonFiniteLossError,
    TrainConfig,
    latest_checkpoint,
    train,
)
from blip_core.train.metrics import read_metrics
from blip_core.train.schedule import alpha_at, lr_at

sys.path.insert(0, str(Path(__file__).resolve().parent))
from toy_pairs import ToyPairs, all_captions  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "toy_train_run.py"
PY = sys.executable


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer([*all_captions(), DEFAULT_PROMPT], vocab_size=100)


def _cfg(out: Path, mode: str = "pretrain", **kw) -> TrainConfig:
    base = dict(out_dir=str(out), preset="tiny", epochs=20, batch_size=8, queue_size=32, lr=1e-3,
                warmup_steps=2, log_every=1, checkpoint_every=1000, progress=False, device="cpu")
    return TrainConfig.for_mode(mode, **{**base, **kw})


def _toy(n: int, **kw):
    return lambda rank, world: ToyPairs(n, 32, seed=1, rank=rank, world_size=world, block=8, **kw)


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


# -- learning -----------------------------------------------------------------------------------


def test_tiny_pretrain_drives_all_three_losses_down(tmp_path: Path, tokenizer) -> None:
    torch.set_num_threads(1)
    cfg = _cfg(tmp_path / "run", batch_size=16, lr=2e-3, grad_clip=5.0, max_steps=60, log_every=2)
    result = train(cfg, _toy(256), tokenizer=tokenizer)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, 61, 2))
    first, last = rows[:5], rows[-5:]
    for part in ("itc", "itm", "lm"):
        assert _mean(last, part) < _mean(first, part) - 0.05, part
    assert _mean(last, "lm") < 0.5 * _mean(first, "lm")
    # the final model is a blip_core folder the stages can load
    loaded = load(result.final_dir)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == tokenizer.vocab_size
    for name, p in result.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], p), name
    assert json.loads((result.final_dir / "training.json").read_text())["steps"] == 60


def test_captioner_and_filter_modes_run_and_batch_of_one_is_safe(tmp_path: Path, tokenizer) -> None:
    torch.set_num_threads(1)
    cap = train(_cfg(tmp_path / "cap", "finetune-captioner", max_steps=2), _toy(32), tokenizer=tokenizer)
    assert set(cap.last_metrics) >= {"lm", "loss"} and "itc" not in cap.last_metrics
    filt = train(_cfg(tmp_path / "filt", "finetune-filter", max_steps=2), _toy(32), tokenizer=tokenizer)
    assert set(filt.last_metrics) >= {"itc", "itm"} and "lm" not in filt.last_metrics
    one = train(_cfg(tmp_path / "one", batch_size=1, queue_size=4, max_steps=3), _toy(8), tokenizer=tokenizer)
    assert all(torch.isfinite(torch.tensor(v)) for v in one.last_metrics.values())


# -- exact resume ---------------------------------------------------------------------------------


def _run(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([PY, str(RUNNER), str(out), *extra], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.02)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_is_bit_identical(tmp_path: Path, tokenizer) -> None:
    tokenizer.save(tmp_path / "tok")
    args = ("--steps", "20", "--ckpt-every", "4", "--tokenizer", str(tmp_path / "tok"))
    reference = _run(tmp_path / "ref", *args)
    _finish(reference)

    out = tmp_path / "killed"
    proc = _run(out, *args)  # killed a little after its second checkpoint (the poll's latency), mid-step
    _wait_for(out / "checkpoints" / "step-00000008", proc)
    proc.send_signal(signal.SIGKILL)  # at once: on an idle machine the 12 steps left take under 0.3 s
    proc.wait()
    proc = _run(out, *args, "--resume")  # killed the moment a checkpoint is renamed into place
    _wait_for(out / "checkpoints" / "step-00000012", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # what a kill in the middle of writing leaves: a half-built checkpoint and a cut metrics line
    partial = out / "checkpoints" / ".tmp-step-00000016"
    partial.mkdir(exist_ok=True)
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "lo')
    _finish(_run(out, *args, "--resume"))

    ref_ckpt, got_ckpt = latest_checkpoint(tmp_path / "ref" / "checkpoints"), latest_checkpoint(out / "checkpoints")
    assert ref_ckpt.name == got_ckpt.name == "step-00000020"
    for name in ("model.safetensors", "momentum.safetensors", "queue.safetensors", "optimizer.safetensors"):
        ref, got = load_file(ref_ckpt / name), load_file(got_ckpt / name)
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), f"{name}:{key}"
    assert (tmp_path / "ref" / "final" / "model.safetensors").read_bytes() == (out / "final" / "model.safetensors").read_bytes()
    # metrics read as one uninterrupted run with the same losses
    ref_rows, got_rows = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got_rows] == list(range(1, 21))
    assert [r["loss"] for r in got_rows] == [r["loss"] for r in ref_rows]
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_last


# -- DDP ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(RUNNER), str(out), *extra]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-4000:]


def _no_key_bias(name: str, value: torch.Tensor) -> torch.Tensor:
    """The parameter without its attention key bias: softmax ignores a constant added to
    every key, so that bias's true gradient is 0 and AdamW turns float noise into full
    lr-sized steps, which differ between 2 ranks and 1 process (measured: 5.6e-5 apart)."""
    if name.endswith("key.bias"):
        return value[:0]
    if name.endswith("qkv.bias"):  # ViT: [q | k | v]
        q, _, v = value.chunk(3)
        return torch.cat([q, v])
    return value


@pytest.mark.slow
def test_two_process_ddp_replicas_agree_and_lm_only_matches_single_process(tmp_path: Path, tokenizer) -> None:
    tokenizer.save(tmp_path / "tok")
    tok = ("--tokenizer", str(tmp_path / "tok"))
    # pretrain on 2 ranks: replicas identical, losses fall
    _torchrun(tmp_path / "ddp", "--steps", "16", "--batch", "4", "--block", "4", "--samples", "64", "--lr", "2e-3",
              "--ckpt-every", "100", *tok)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["steps"] == 16
    rows = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert _mean(rows[-4:], "lm") < _mean(rows[:4], "lm")
    assert _mean(rows[-4:], "loss") < _mean(rows[:4], "loss")
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000016" / "rng-rank1.safetensors").is_file()

    # LM only: 2 ranks x 4 equals 1 process x 8 on the same samples
    common = ("--mode", "finetune-captioner", "--steps", "6", "--block", "4", "--samples", "48", "--ckpt-every", "100", *tok)
    _torchrun(tmp_path / "lm2", *common, "--batch", "4")
    single = subprocess.run([PY, str(RUNNER), str(tmp_path / "lm1"), *common, "--batch", "8"],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True, timeout=300)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    two, one = load(tmp_path / "lm2" / "final").model.state_dict(), load(tmp_path / "lm1" / "final").model.state_dict()
    for name in one:
        torch.testing.assert_close(_no_key_bias(name, two[name]), _no_key_bias(name, one[name]), atol=2e-5, rtol=1e-4, msg=name)
    rows2, rows1 = read_metrics(tmp_path / "lm2" / "metrics.jsonl"), read_metrics(tmp_path / "lm1" / "metrics.jsonl")
    for a, b in zip(rows2, rows1):
        assert a["lm"] == pytest.approx(b["lm"], rel=1e-5)


# -- errors ---------------------------------------------------------------------------------------


def test_resume_with_other_options_names_them(tmp_path: Path, tokenizer) -> None:
    train(_cfg(tmp_path / "r", max_steps=2, checkpoint_every=1), _toy(32), tokenizer=tokenizer)
    with pytest.raises(CheckpointError, match="resume"):
        train(_cfg(tmp_path / "r", max_steps=2), _toy(32), tokenizer=tokenizer)  # no resume=True
    with pytest.raises(CheckpointMismatchError, match=r"batch_size: checkpoint 8 vs now 4"):
        train(_cfg(tmp_path / "r", max_steps=2, batch_size=4, resume=True), _toy(32), tokenizer=tokenizer)
    with pytest.raises(CheckpointMismatchError, match=r"max_steps: checkpoint 2 vs now 4"):
        train(_cfg(tmp_path / "r", max_steps=4, resume=True), _toy(32), tokenizer=tokenizer)
    again = train(_cfg(tmp_path / "r", max_steps=2, resume=True, log_every=5), _toy(32), tokenizer=tokenizer)
    assert again.steps == 2 and again.last_checkpoint.name == "step-00000002"


def test_nan_loss_stops_names_the_step_and_keeps_last_good_checkpoint(tmp_path: Path, tokenizer) -> None:
    probe = ToyPairs(16, 32, seed=1)
    probe.set_epoch(1)
    position = [s["key"] for s in probe].index("k-5")
    bad_step = 2 + position // 8 + 1  # two steps per epoch; the poison starts in epoch 1
    cfg = _cfg(tmp_path / "nan", max_steps=6, checkpoint_every=2)
    with pytest.raises(NonFiniteLossError, match=rf"step {bad_step} .*step-00000002"):
        train(cfg, _poison_from_epoch(1, 5), tokenizer=tokenizer)
    assert latest_checkpoint(tmp_path / "nan" / "checkpoints").name == "step-00000002"
    assert not (tmp_path / "nan" / "final").exists()


def _poison_from_epoch(epoch: int, index: int):
    class Poisoned(ToyPairs):
        def sample(self, i: int):  # type: ignore[override]
            s = super().sample(i)
            if self.epoch >= epoch and i == index:
                s["pixel_values"] = torch.full_like(s["pixel_values"], float("nan"))
            return s

    return lambda rank, world: Poisoned(16, 32, seed=1, rank=rank, world_size=world, block=8)


def test_huge_epoch_count_with_max_steps_is_cheap(tmp_path: Path, tokenizer) -> None:
    result = train(_cfg(tmp_path / "h", "finetune-captioner", epochs=10**9, max_steps=3), _toy(16), tokenizer=tokenizer)
    assert result.steps == 3


def test_empty_dataset_and_bad_queue_size_are_clear(tmp_path: Path, tokenizer) -> None:
    with pytest.raises(EmptyDatasetError, match="fewer than one step of batch_size 8"):
        train(_cfg(tmp_path / "e"), _toy(5), tokenizer=tokenizer)
    with pytest.raises(QueueSizeError, match="queue size 30 is not a multiple of the global batch 8"):
        train(_cfg(tmp_path / "q", queue_size=30), _toy(16), tokenizer=tokenizer)


def test_from_scratch_needs_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        train(_cfg(tmp_path / "t"), _toy(16))


# -- momentum, queue, schedule --------------------------------------------------------------------


def test_momentum_is_an_ema_without_gradients(tokenizer) -> None:
    torch.manual_seed(0)
    model = MED(preset("tiny").with_tokenizer(tokenizer))
    momentum = MomentumEncoders(model, decay=0.9)
    assert all(not p.requires_grad for p in momentum.parameters())
    before = {n: p.clone() for n, p in momentum.averaged_state().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    momentum.update(model)
    online = dict(model.named_parameters())
    for name, old in before.items():
        torch.testing.assert_close(momentum.averaged_state()[name], 0.9 * old + 0.1 * online[name])
    assert not any(n.startswith(("lm_head", "itm_head", "text_decoder")) for n in before)
    px = torch.randn(2, 3, 32, 32)
    assert not momentum.image_features(px).requires_grad


def test_queue_wraps_and_rejects_bad_batches() -> None:
    q = FeatureQueue(4, 3, torch.Generator().manual_seed(0))
    a = torch.eye(3)[:2]
    q.enqueue(a, a, torch.tensor([1, 2]))
    q.enqueue(a * 2, a * 2, torch.tensor([3, 4]))
    q.enqueue(a * 3, a * 3, torch.tensor([5, 6]))
    assert q.ids.tolist() == [5, 6, 3, 4] and int(q.ptr) == 2
    img, _, ids = q.bank(a, a, torch.tensor([7, 8]))
    assert img.shape == (6, 3) and ids.tolist() == [7, 8, 5, 6, 3, 4]
    with pytest.raises(QueueSizeError):
        q.enqueue(torch.zeros(3, 3), torch.zeros(3, 3), torch.zeros(3, dtype=torch.long))


def test_schedules() -> None:
    cfg = TrainConfig.for_mode("pretrain", warmup_steps=10, lr=1e-3, warmup_lr=0.0, min_lr=1e-5, decay_rate=0.5)
    assert lr_at(cfg, 0, 0, 100) == 0.0 and lr_at(cfg, 5, 0, 100) == pytest.approx(5e-4)
    assert lr_at(cfg, 50, 2, 100) == pytest.approx(2.5e-4)
    cos = TrainConfig.for_mode("finetune-filter", lr=1e-3, min_lr=0.0)
    assert cos.warmup_steps == 0 and cos.schedule == "cosine"
    assert lr_at(cos, 0, 0, 100) == pytest.approx(1e-3) and lr_at(cos, 50, 0, 100) == pytest.approx(5e-4)
    assert lr_at(cos, 100, 0, 100) == pytest.approx(0.0, abs=1e-12)
    assert alpha_at(cfg, 0, 20) == 0.0 and alpha_at(cfg, 10, 20) == pytest.approx(0.2) and alpha_at(cfg, 99, 20) == 0.4


def test_mode_defaults_follow_blip() -> None:
    pre, filt, cap = (TrainConfig.for_mode(m, preset="base") for m in ("pretrain", "finetune-filter", "finetune-captioner"))
    assert pre.objectives == ("itc", "itm", "lm") and pre.resolved_image_size() == 224 and pre.lr == 3e-4
    assert filt.objectives == ("itc", "itm") and filt.retrieval and filt.resolved_image_size() == 384
    assert cap.objectives == ("lm",) and cap.prompt == DEFAULT_PROMPT and cap.lr == 1e-5
    assert pre.weight_decay == 0.05 and pre.momentum == 0.995 and pre.queue_size == 57_600 and pre.alpha == 0.4
    with pytest.raises(TypeError, match="unknown TrainConfig fields"):
        TrainConfig.for_mode("pretrain", learning_rate=1.0)


def test_activation_checkpointing_changes_memory_not_results(tmp_path: Path, tokenizer) -> None:
    plain = train(_cfg(tmp_path / "a", max_steps=2), _toy(16), tokenizer=tokenizer)
    recomputed = train(_cfg(tmp_path / "b", max_steps=2, activation_checkpointing=True), _toy(16), tokenizer=tokenizer)
    for name, p in plain.model.state_dict().items():
        torch.testing.assert_close(recomputed.model.state_dict()[name], p, rtol=0, atol=1e-6, msg=name)


def test_finetune_from_a_hugging_face_blip_folder(tmp_path: Path, tokenizer) -> None:
    from blip_core.hf import export_hf

    torch.manual_seed(0)
    export_hf(MED(preset("tiny").with_tokenizer(tokenizer)), tokenizer, tmp_path / "hf", kind="retrieval")
    cfg = _cfg(tmp_path / "ft", "finetune-filter", init=str(tmp_path / "hf"), image_size=32, max_steps=2)
    result = train(cfg, _toy(16))
    assert result.steps == 2 and {"itc", "itm"} <= set(result.last_metrics)
    assert load(result.final_dir).format == "capfilt-med"
