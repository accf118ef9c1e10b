"""One writer per run folder on object storage: a lease object with an owner and an expiry.

``<run>/.lock`` holds ``{pid, host, since, token, expires}`` (JSON). `hold_lease`:

1. takes it with a conditional create (S3 ``PutObject`` with ``If-None-Match: *``, what
   s3fs's ``pipe_file(mode="create")`` sends); when the object exists and its lease has
   expired (a crashed holder, or a released one), it takes it over with ``If-Match``
   on the ETag it read, so of two processes racing for an expired lease one wins;
2. renews it from a background thread every third of its length (again ``If-Match``
   on the ETag it last wrote); a renewal that finds another owner stops renewing and
   `LeaseLost` is raised when the block ends;
3. releases it at the end by writing it back expired (``expires: 0``), so the object
   stays as the mark of a run folder (`data.run_lock.lock_scope` looks for it) and
   the next writer takes it over at once.

A live holder refuses a second writer with `RunLockedError` naming pid, host, start and
expiry. What is guaranteed where (see docs/ARCHITECTURE.md):

- S3 and S3-compatible stores honouring conditional writes (AWS S3 since 2024, moto,
  recent MinIO): taking, renewing and taking over are atomic compare-and-set.
- Other fsspec stores (``gs://``, ``az://``, ``memory://``): create is exclusive when
  the backend supports ``mode="create"``; renewal and takeover read, compare the owner
  token and write, so two takers of one expired lease within a round trip can both
  believe they won. One writer is then a convention the lease makes visible, not a
  guarantee.
- A holder that stops renewing (frozen, partitioned) loses the lease after `seconds`;
  its later writes are not fenced. Choose `seconds` well above a renewal's round trip.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from data.storage import RemotePath

LOCK_NAME = ".lock"
DEFAULT_LEASE_SECONDS = 60.0
_CONDITIONAL = ("s3", "s3a")  # protocols whose put honours If-None-Match / If-Match (s3fs)


class RunLockedError(RuntimeError):
    """Another live process is writing this run folder."""


class LeaseLost(RuntimeError):
    """The lease expired or was taken over while held (renewals failed)."""


def holder_record(raw: bytes) -> dict | None:
    """The holder record a lock or lease holds ({pid, host, since, ...}), or None for anything else."""
    try:
        info = json.loads(raw or b"{}")
    except ValueError:
        return None
    return info if isinstance(info, dict) and {"pid", "host", "since"} <= info.keys() else None


def describe(info: dict | None) -> str:
    """``pid 12 on host since 2026-...`` (and when the lease runs out), for messages."""
    if info is None:
        return "holder unknown"
    text = f"pid {info['pid']} on {info['host']} since {info['since']}"
    if info.get("expires"):
        text += f", lease valid until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(float(info['expires'])))}"
    return text


class _Precondition(Exception):
    """A conditional write found the object not as expected."""


def _put(lease: RemotePath, record: dict, *, create: bool = False, etag: str | None = None) -> str | None:
    """Write `record` to `lease` only if it does not exist (`create`) or still has `etag`;
    returns the new ETag where the store reports one. _Precondition when the condition fails."""
    data = json.dumps(record, sort_keys=True).encode()
    fs, path = lease.fs, lease.path
    try:
        if lease.protocol in _CONDITIONAL:
            kwargs: dict[str, Any] = {"mode": "create"} if create else {"IfMatch": etag} if etag else {}
            out = fs.pipe_file(path, data, **kwargs)
            return out.get("ETag") if isinstance(out, dict) else fs.info(path).get("ETag")
        if create:
            try:
                fs.pipe_file(path, data, mode="create")
            except (TypeError, NotImplementedError, ValueError):  # a backend without exclusive create
                if fs.exists(path):
                    raise FileExistsError(path) from None
                fs.pipe_file(path, data)
            return None
        current = holder_record(bytes(fs.cat_file(path)))
        if etag is not None and (current or {}).get("token") != etag:
            raise _Precondition(path)
        fs.pipe_file(path, data)
        return None
    except FileExistsError as exc:
        raise _Precondition(path) from exc
    except OSError as exc:
        if "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower():
            raise _Precondition(path) from exc
        raise


def _read(lease: RemotePath) -> tuple[dict | None, str | None]:
    """The lease's record and its version (ETag on S3, the owner token elsewhere); (None, None) if absent."""
    try:
        info = lease.fs.info(lease.path)
        raw = bytes(lease.fs.cat_file(lease.path))
    except FileNotFoundError:
        return None, None
    record = holder_record(raw)
    version = info.get("ETag") if lease.protocol in _CONDITIONAL else (record or {}).get("token")
    return record, version


class _Held:
    """A taken lease: its record, the version last written, and the renewing thread."""

    def __init__(self, lease: RemotePath, record: dict, version: str | None, seconds: float) -> None:
        self.lease, self.record, self.version, self.seconds = lease, record, version, seconds
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {lease}", daemon=True)

    def _version_of(self, etag: str | None) -> str | None:
        return etag if self.lease.protocol in _CONDITIONAL else self.record["token"]

    def renew(self) -> None:
        """Push the expiry `seconds` ahead, if the lease is still ours."""
        record = {**self.record, "expires": time.time() + self.seconds}
        try:
            etag = _put(self.lease, record, etag=self.version)
        except (_Precondition, FileNotFoundError):
            current, _ = _read(self.lease)
            self.lost = f"{self.lease}: lease taken over by {describe(current)} while held"
            self._stop.set()
            return
        self.record, self.version = record, self._version_of(etag)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.renew()
            except OSError:  # a failed round trip: try again next period (the lease has slack)
                continue

    def start(self) -> None:
        self._thread.start()

    def release(self) -> None:
        """Stop renewing; write the lease back expired if it is still ours."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.lost is None:
            try:
                _put(self.lease, {**self.record, "expires": 0}, etag=self.version)
            except (_Precondition, FileNotFoundError):
                pass  # someone took it over after it expired: theirs now


def _owner(seconds: float) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "token": uuid.uuid4().hex, "expires": time.time() + seconds}  # fmt: skip


def take_lease(lease: RemotePath, seconds: float = DEFAULT_LEASE_SECONDS) -> _Held:
    """Take the lease (create it, or take over an expired one); RunLockedError naming the
    live holder otherwise. The caller starts renewal and releases (see `hold_lease`)."""
    record = _owner(seconds)
    held = _Held(lease, record, None, seconds)
    try:
        held.version = held._version_of(_put(lease, record, create=True))
        return held
    except _Precondition:
        pass
    current, version = _read(lease)
    if current is not None and float(current.get("expires") or 0) > time.time():
        raise RunLockedError(
            f"{lease.parent} is in use by another capfilt process ({describe(current)}); wait for it to "
            f"finish or stop it. A holder that dies without releasing frees the lease when it expires."
        )
    try:  # expired (or released, or not a lease record): take it over if nobody did meanwhile
        held.version = held._version_of(_put(lease, record, etag=version) if version else _put(lease, record))
    except (_Precondition, FileNotFoundError):
        now, _ = _read(lease)
        raise RunLockedError(f"{lease.parent} was just taken by another capfilt process ({describe(now)})") from None
    return held


@contextmanager
def hold_lease(lease: RemotePath, seconds: float | None = None) -> Iterator[dict]:
    """Hold `lease` for the `with` block (renewed in the background, released at the end);
    yields the owner record. `seconds`: the lease's length (``$CAPFILT_LEASE_SECONDS``,
    else 60). Raises LeaseLost at the end when the lease was lost while held."""
    seconds = float(seconds or os.environ.get("CAPFILT_LEASE_SECONDS") or DEFAULT_LEASE_SECONDS)
    held = take_lease(lease, seconds)
    held.start()
    try:
        yield held.record
    finally:
        held.release()
    if held.lost:
        raise LeaseLost(held.lost)
