"""Paths and URLs on every command (issue 23): each path argument goes through
`data.storage.location`; a command that works on local files only refuses a URL in one
line, and none turns ``s3://b/x`` into a local folder ``s3:/b/x``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

LOCAL_ONLY = [
    ["synth", "s3://b/world"],
    ["synth", "--videos", "s3://b/clips"],
    ["ingest", "web", "s3://b/urls.parquet", "out"],
    ["ingest", "web", "urls.parquet", "s3://b/out"],
    ["ingest", "human", "s3://b/coco.json", "out"],
    ["ingest", "videos", "clips", "s3://b/out"],
    ["train", "--mode", "pretrain", "--data", "x", "--out", "s3://b/model"],
    ["train", "--mode", "pretrain", "--data", "x", "--out", "m", "--init", "s3://b/model"],
    ["ablation", "--out", "s3://b/ablation"],
    ["evaluate", "--videos", "s3://b/clips", "--model", "m"],
]


@pytest.mark.parametrize("args", LOCAL_ONLY, ids=lambda a: " ".join(a[:2]))
def test_a_local_only_command_refuses_a_url_and_writes_no_local_s3_folder(args: list[str], tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())  # typer's box, unwrapped
    assert result.exit_code == 2 and "is a URL; this command reads and writes local files only" in text, result.output
    assert list(tmp_path.iterdir()) == []
