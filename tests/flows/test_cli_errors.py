"""Hostile first contact with the stage commands and `capfilt run` (issue 23): each error is
one line on stderr naming the thing and the fix, exit 1; the traceback only with --verbose;
a second run on a locked folder and a device the machine lacks are refused before Prefect
starts."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from data.run_lock import run_lock
from flows.cli import app
from flows.commands.errors import one_line


@pytest.fixture(scope="module")
def model(random_tiny_model: Path) -> Path:
    return random_tiny_model


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic world's web shards."""
    from data.synth import SynthConfig, generate_world

    world = tmp_path_factory.mktemp("world")
    generate_world(world, SynthConfig(human_images=4, web_images=6, test_images=2, rows_per_shard=6))
    return world / "web"


def _fails_in_one_line(args: list[str], *expected: str) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "╭" not in result.output
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_missing_model_folder_says_no_such_folder(tmp_path: Path, web: Path) -> None:
    line = _fails_in_one_line(["caption", "--input", str(web), "--output", str(tmp_path / "out"),
                               "--model", str(tmp_path / "no-model")], "no-model: no such folder")  # fmt: skip
    assert line.startswith("capfilt caption: error: ") and "config.json" not in line


def test_model_path_that_is_a_file_or_not_a_model(tmp_path: Path, web: Path) -> None:
    shard = next(web.glob("*.parquet"))
    _fails_in_one_line(["filter", "--input", str(web), "--output", str(tmp_path / "out"), "--model", str(shard)],
                       "not a folder")  # fmt: skip
    _fails_in_one_line(["filter", "--input", str(web), "--output", str(tmp_path / "out"), "--model", str(web)],
                       "no config.json")  # fmt: skip


def test_missing_input(tmp_path: Path, model: Path) -> None:
    _fails_in_one_line(["filter", "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"),
                        "--model", str(model)], "nothing", "no Parquet or webdataset shards")  # fmt: skip


def test_output_that_cannot_be_written(tmp_path: Path, web: Path, model: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails_in_one_line(["caption", "--input", str(web), "--output", str(blocker / "out"), "--model", str(model)],
                       "a-file", "not a directory")  # fmt: skip


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root writes into read-only folders")  # fmt: skip
def test_read_only_output(tmp_path: Path, web: Path, model: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    _fails_in_one_line(["caption", "--input", str(web), "--output", str(locked / "out"), "--model", str(model)],
                       "permission denied")  # fmt: skip


def test_missing_bucket(s3: str, web: Path, model: Path) -> None:
    _fails_in_one_line(["caption", "--input", str(web), "--output", "s3://capfilt-no-such-bucket-23/out",
                        "--model", str(model)], "capfilt-no-such-bucket-23")  # fmt: skip


def test_missing_model_folder_on_object_storage(s3: str, tmp_path: Path, web: Path) -> None:
    _fails_in_one_line(["filter", "--input", str(web), "--output", str(tmp_path / "out"), "--model", f"{s3}/no-model"],
                       f"{s3}/no-model: no such folder")  # fmt: skip


def test_verbose_shows_the_traceback(tmp_path: Path, web: Path) -> None:
    result = CliRunner().invoke(app, ["caption", "--input", str(web), "--output", str(tmp_path / "out"),
                                      "--model", str(tmp_path / "no-model"), "--verbose"])  # fmt: skip
    assert result.exit_code == 1
    assert isinstance(result.exception, FileNotFoundError) and "no such folder" in str(result.exception)


def test_verbose_before_the_command_too(tmp_path: Path, web: Path) -> None:
    result = CliRunner().invoke(app, ["--verbose", "caption", "--input", str(web), "--output", str(tmp_path / "out"),
                                      "--model", str(tmp_path / "no-model")])  # fmt: skip
    assert result.exit_code == 1 and isinstance(result.exception, FileNotFoundError)
    again = CliRunner().invoke(app, ["caption", "--input", str(web), "--output", str(tmp_path / "out"),
                                     "--model", str(tmp_path / "no-model")])  # fmt: skip
    assert again.exit_code == 1 and not isinstance(again.exception, FileNotFoundError)  # --verbose did not stick


@pytest.mark.parametrize(("exc", "expected"), [
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"), "/mnt/ro/out: read-only file system (the file system is read-only"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/out"), "/srv/out: permission denied (choose a place you may write to"),
    (OSError(errno.ENOSPC, "No space left on device", "/d/x"), "(the disk is full"),
    (PermissionError("Forbidden"), "Forbidden (check the credentials"),
])  # fmt: skip
def test_one_line_names_the_thing_and_the_fix(exc: BaseException, expected: str) -> None:
    assert expected in one_line(exc) and "\n" not in one_line(exc)


def test_refused_credentials_name_the_fix() -> None:
    botocore = pytest.importorskip("botocore.exceptions")
    line = one_line(botocore.NoCredentialsError())
    assert "Unable to locate credentials" in line and "AWS_ACCESS_KEY_ID" in line
    denied = botocore.ClientError({"Error": {"Code": "InvalidAccessKeyId", "Message": "The AWS Access Key Id you "
                                  "provided does not exist in our records."}}, "PutObject")  # fmt: skip
    assert "InvalidAccessKeyId" in one_line(denied) and "credentials" in one_line(denied)


# `capfilt run` through the entry point, reporting whether Prefect was imported (it starts a server).
_RUN = """
import json, sys
sys.argv = ["capfilt", "run", "--config", sys.argv[1]]
from flows.entry import main
try:
    main()
except SystemExit as exc:
    print(json.dumps({"code": exc.code, "prefect": "prefect" in sys.modules}))
"""


def _run_config(tmp_path: Path, web: Path, model: Path, **top: str) -> Path:
    values = {"run_dir": str(tmp_path / "run"), "data": {"web": [str(web)]},
              "model": {"captioner": str(model), "filter": str(model)}, "stages": {"stop_after": "filter"}, **top}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


def _run(config: Path) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _RUN, str(config)], capture_output=True, text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_second_run_on_a_locked_folder_is_refused_before_prefect_starts(tmp_path: Path, web: Path, model: Path) -> None:
    config = _run_config(tmp_path, web, model)
    with run_lock(tmp_path / "run"):
        outcome, stderr = _run(config)
    assert outcome == {"code": 1, "prefect": False}, stderr
    assert len(stderr.strip().splitlines()) == 1 and "in use by another capfilt process" in stderr, stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_that_is_not_there_is_refused_before_prefect_starts(tmp_path: Path, web: Path, model: Path) -> None:
    outcome, stderr = _run(_run_config(tmp_path, web, model, device="cuda"))
    assert outcome == {"code": 1, "prefect": False}, stderr
    assert len(stderr.strip().splitlines()) == 1 and "device 'cuda': this machine has no CUDA GPU" in stderr, stderr


@pytest.mark.slow
def test_a_run_failing_inside_the_flow_prints_no_traceback(tmp_path: Path, model: Path) -> None:
    """An input missing when the flow reads it: Prefect's own failure line keeps its message
    but not its traceback, and the command ends with its one error line."""
    config = _run_config(tmp_path, tmp_path / "no-web", model)
    outcome, stderr = _run(config)
    assert outcome == {"code": 1, "prefect": True}, stderr
    assert "Traceback" not in stderr and 'File "' not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("capfilt run: error: input ") and "no-web" in stderr
    assert len(stderr.strip().splitlines()) <= 4, stderr  # the start line, Prefect's failure line(s), ours


def test_absent_credentials(s3: str, web: Path, model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    line = _fails_in_one_line(["caption", "--input", str(web), "--output", f"{s3}/out", "--model", str(model)], s3)
    assert "credentials" in line.lower(), line
