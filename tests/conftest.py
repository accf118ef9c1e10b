"""Test-wide setup: the shared helper modules (tests/tasks/stage_helpers.py,
tests/data/webdataset_shards.py, ...) importable from every test folder, also when a
single test file is run (pytest itself only adds the folder of the file it collects);
and fixtures every test package shares: one real S3-compatible server per session.

`s3_server` starts moto's server mode (``moto_server -H 127.0.0.1 -p PORT``, the way
s3fs's own tests do) on a free loopback port; `s3` points the standard AWS environment
variables at it for one test (monkeypatched, so nothing leaks into other tests), makes a
fresh bucket and yields ``s3://<bucket>``. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

for _folder in ("tasks", "data"):
    _path = str(Path(__file__).parent / _folder)
    if _path not in sys.path:
        sys.path.append(_path)

S3_ACCESS_KEY = "capfilt-test-key"
S3_SECRET_KEY = "capfilt-test-secret-do-not-write-me"  # tests check it never lands in a run folder


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _moto_command() -> list[str]:
    found = Path(sys.executable).with_name("moto_server")
    if found.is_file():
        return [str(found)]
    on_path = shutil.which("moto_server")
    if on_path is None:
        pytest.fail("moto_server not installed: `pip install 'moto[server]'` (a test dependency)")
    return [on_path]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint URL of a moto S3 server started for this session (stopped at its end)."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*_moto_command(), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    try:
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def s3_env(endpoint: str) -> dict[str, str]:
    """The standard AWS variables that point s3fs / boto3 at `endpoint`."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture
def s3_secret() -> str:
    """The secret key the `s3` fixture sets (tests check no run file holds it)."""
    return S3_SECRET_KEY


def _bucket(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import fsspec
    import s3fs

    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made before the variables changed
    bucket = f"capfilt-test-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3", use_listings_cache=False).mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>`` on the session's moto server, with the AWS variables set."""
    import s3fs

    yield _bucket(s3_server, monkeypatch)
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_module(s3_server: str) -> Iterator[str]:
    """`s3` for a whole test module (one bucket, the AWS variables set until the module ends)."""
    import s3fs

    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _bucket(s3_server, monkeypatch)
    s3fs.S3FileSystem.clear_instance_cache()
