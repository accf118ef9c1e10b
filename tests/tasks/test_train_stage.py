"""train_stage on the synthetic world: losses fall, reruns skip, finetunes start from the pretrained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from blip_core import load
from blip_core.train import CheckpointMismatchError
from blip_core.train.metrics import read_metrics
from data.synth import SynthConfig, generate_world
from tasks.train import expand_shards, train_stage


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(out, SynthConfig(seed=1, human_images=320, web_images=8, test_images=16, rows_per_shard=160))
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_pretrain_on_synthetic_pairs_drives_losses_down_then_finetunes(world: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    common = dict(batch_size=16, queue_size=64, warmup_steps=3, log_every=2, checkpoint_every=20, progress=False,
                  device="cpu", grad_clip=5.0)  # fmt: skip
    pre = train_stage(tmp_path / "pretrain", [world / "human"], "pretrain", preset="tiny", max_steps=40, lr=2e-3,
                      **common)  # fmt: skip
    assert not pre.skipped and pre.steps == 40
    rows = read_metrics(tmp_path / "pretrain" / "metrics.jsonl")
    first, last = rows[:4], rows[-4:]
    for part in ("itc", "itm", "lm"):
        assert _mean(last, part) < _mean(first, part), part
    assert (tmp_path / "pretrain" / "tokenizer" / "tokenizer.json").is_file()
    loaded = load(pre.final_dir)
    assert loaded.model.config.vision.image_size == 32

    again = train_stage(tmp_path / "pretrain", [world / "human"], "pretrain", preset="tiny", max_steps=40, lr=2e-3,
                        **common)  # fmt: skip
    assert again.skipped and again.final_dir == pre.final_dir
    with pytest.raises(CheckpointMismatchError, match="lr"):
        train_stage(tmp_path / "pretrain", [world / "human"], "pretrain", preset="tiny", max_steps=40, lr=1e-3,
                    **common)  # fmt: skip

    # the test split has 5 captions per image: retrieval positives share the image id
    filt = train_stage(tmp_path / "filter", [world / "test"], "finetune-filter", init=pre.final_dir, max_steps=3,
                       lr=1e-4, **{**common, "queue_size": 16})  # fmt: skip
    cap = train_stage(tmp_path / "captioner", [world / "human"], "finetune-captioner", init=pre.final_dir,
                      max_steps=3, lr=1e-4, **common)  # fmt: skip
    for result, parts in ((filt, {"itc", "itm"}), (cap, {"lm"})):
        assert parts <= set(result.last_metrics)
        record = json.loads((Path(result.final_dir) / "training.json").read_text())
        assert record["train_config"]["init"] == pre.final_dir
        assert load(result.final_dir).tokenizer.vocab_size == loaded.tokenizer.vocab_size
    assert json.loads((Path(cap.final_dir) / "training.json").read_text())["train_config"]["prompt"] == "a picture of "


def test_missing_shards_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        expand_shards([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no part-"):
        expand_shards([tmp_path / "empty"])


def test_capfilt_train_cli(world: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    runner = CliRunner()
    help_text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    for option in ("--mode", "--data", "--out", "--init", "--preset", "--resume", "--steps", "--queue-size"):
        assert option in help_text
    args = ["train", "--mode", "finetune-captioner", "--data", str(world / "human"), "--out", str(tmp_path / "cli"),
            "--steps", "2", "--batch-size", "8", "--no-progress", "--device", "cpu"]  # fmt: skip
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert json.loads(done.output[done.output.index("{"):])["steps"] == 2
    bad = runner.invoke(app, [*args[:2], "sideways", *args[3:]])
    assert bad.exit_code != 0 and "--mode must be one of" in bad.output


@pytest.mark.slow
def test_train_stage_under_torchrun_shares_one_tokenizer(world: Path, tmp_path: Path) -> None:
    import os
    import socket
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "stage.py"
    script.write_text(
        "import sys, torch\n"
        "torch.set_num_threads(1)\n"
        "from tasks.train import train_stage\n"
        "r = train_stage(sys.argv[1], [sys.argv[2]], 'pretrain', preset='tiny', max_steps=3, batch_size=8,\n"
        "                queue_size=16, warmup_steps=1, progress=False, device='cpu')\n"
        "import os, pathlib\n"
        "pathlib.Path(sys.argv[1] + '-rank' + os.environ['RANK']).write_text(str(r.steps))\n"  # ranks share stdout
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(script), str(tmp_path / "ddp"), str(world / "human")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [(tmp_path / f"ddp-rank{rank}").read_text() for rank in (0, 1)] == ["3", "3"]
    assert load(tmp_path / "ddp" / "final").tokenizer.vocab_size == load(
        tmp_path / "ddp" / "checkpoints" / "step-00000003").tokenizer.vocab_size
    assert not (tmp_path / "ddp" / "tokenizer.tmp").exists()



def test_stage_tokenizer_counts_the_captioner_prompt_once(world: Path, tmp_path: Path) -> None:
    import pyarrow as pa

    from blip_core.tokenizer import build_tokenizer
    from data.shards import list_shards, read_table, write_shard
    from tasks.train import stage_tokenizer

    # "picture" (once here, once in the prompt) ties with "ab" and loses on spelling; counting
    # the prompt twice would rank it first and shift every word id after it
    captions = ["picture", "ab", "ab"]
    rows = read_table(list_shards(world / "human")[0], "pairs").slice(0, 3)
    shard = tmp_path / "pairs" / "part-00000.parquet"
    write_shard(rows.set_column(rows.schema.get_field_index("caption"), "caption", pa.array(captions)), shard, "pairs")
    built = stage_tokenizer(tmp_path / "tok", [shard], vocab_size=200)
    assert built.bert.get_vocab() == build_tokenizer(captions, vocab_size=200).bert.get_vocab()
    assert built.bert.convert_tokens_to_ids("ab") < built.bert.convert_tokens_to_ids("picture")
    assert stage_tokenizer(tmp_path / "tok", [], vocab_size=200).bert.get_vocab() == built.bert.get_vocab()  # read back
