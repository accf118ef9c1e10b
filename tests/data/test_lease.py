"""The run lock on object storage: a lease object on a real S3 server (moto on 127.0.0.1)
taken with a conditional write, refusing a second writer by name, renewed while held,
released expired, taken over once expired; and the same calls on memory://."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from data.lease import LeaseLost, hold_lease, take_lease
from data.run_lock import LOCK_NAME, RunLockedError, lock_scope, run_lock
from data.storage import location

HOLD = """
import sys, time
from data.run_lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(60)
"""


def _record(run) -> dict:
    return json.loads((location(run) / LOCK_NAME).read_text())


def test_second_writer_on_s3_is_refused_naming_the_holder(s3: str) -> None:
    run = f"{s3}/run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {proc.pid} on .* since .*lease valid until"):
            with run_lock(run):
                pass
    finally:
        proc.kill()
        proc.wait()
    # killed without releasing: the lease is still live until it expires
    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        with run_lock(run):
            pass


def test_expired_lease_is_taken_over_and_release_leaves_it_expired(s3: str) -> None:
    lease = location(s3) / "run" / LOCK_NAME
    stale = {"pid": 1, "host": "gone", "since": "2026-01-01T00:00:00", "token": "old", "expires": time.time() - 5}
    lease.write_text(json.dumps(stale))
    with run_lock(f"{s3}/run") as path:
        held = _record(f"{s3}/run")
        assert path == lease and held["token"] != "old" and held["expires"] > time.time()
        assert lock_scope(f"{s3}/run/caption/abc") == location(f"{s3}/run")  # writers below share it
    assert _record(f"{s3}/run")["expires"] == 0  # released: kept as the run folder's mark, expired
    with run_lock(f"{s3}/run"):  # and taken again at once
        pass


def test_a_create_race_has_one_winner(s3: str) -> None:
    lease = location(s3) / "race" / LOCK_NAME
    first = take_lease(lease, seconds=30)
    with pytest.raises(RunLockedError, match="in use by another capfilt process"):
        take_lease(lease, seconds=30)
    first.release()


def test_lease_is_renewed_while_held(s3: str) -> None:
    run = f"{s3}/renew"
    with hold_lease(location(run) / LOCK_NAME, seconds=1.5) as record:
        first = _record(run)["expires"]
        time.sleep(2.5)  # past the first expiry: renewals every 0.5 s kept it live
        assert _record(run)["expires"] > first and _record(run)["token"] == record["token"]
        with pytest.raises(RunLockedError):
            take_lease(location(run) / LOCK_NAME, seconds=1.5)


def test_a_lease_taken_over_while_held_is_reported_lost(s3: str) -> None:
    lease = location(s3) / "lost" / LOCK_NAME
    with pytest.raises(LeaseLost, match="taken over"):
        with hold_lease(lease, seconds=1.5) as record:
            lease.write_text(json.dumps({**record, "token": "intruder", "pid": 99}))  # not via the lease
            time.sleep(1.2)  # past a renewal (every 0.5 s)
    assert _record(lease.parent)["token"] == "intruder"  # the loser did not release the winner's lease


def test_memory_store_lease(tmp_path) -> None:
    run = "memory://capfilt-lease-test/run"
    with run_lock(run):
        with pytest.raises(RunLockedError, match="pid"):
            with run_lock(run):
                pass
    with run_lock(run):
        pass
