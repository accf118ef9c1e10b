"""Where a run's files live: a local path or an fsspec URL, behind the few calls the code uses.

`location(x)` turns what a user gives (``runs/demo``, ``/abs/path``, ``file:///abs``,
``s3://bucket/run``, ``gs://...``, ``az://...``, ``memory://...``) into a location:

- a local path (or ``file://`` URL) is a plain `pathlib.Path`, so everything local
  behaves exactly as it always did (temporary name + rename, flock, memory maps);
- any other URL is a `RemotePath`: the small part of the `Path` API the run code uses
  (``/``, ``name``, ``parent``, ``with_name``, ``is_file``, ``is_dir``, ``glob``,
  ``iterdir``, ``stat().st_size``, ``read_bytes``, ``unlink``, ...), done through the
  fsspec filesystem of its protocol.

Writes on object storage have no rename: `data.shards.atomic_path` writes a local
temporary file and uploads it in one PUT (or one multipart upload, which the store
publishes whole on completion), so a reader sees the old object or the new one, never
half; the completion record is written after the data and readers trust only records.

Credentials and endpoints come the standard way: the fsspec backend's own environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` for s3fs), or storage options set once per process with
`configure` (the run config's ``storage.options``). Options travel with a `RemotePath`
when it is pickled (to Dask workers), but never into its text: ``str(p)`` is the bare
URL, so records, reports and logs hold no secret.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Union

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_OPTIONS: dict[str, dict[str, Any]] = {}  # protocol -> fsspec storage options (`configure`)
# Listings are not cached: another process (a Dask worker, a second run) may have written
# since, and a stale listing would hide a finished shard or show a deleted one.
_DEFAULTS: dict[str, dict[str, Any]] = {"s3": {"use_listings_cache": False}}


ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME}: an environment variable's value
_SECRET_WORDS = ("secret", "password", "token", "key", "credential", "sas", "signature")
_NOT_SECRET = {"use_listings_cache", "listings_expiry_time", "default_block_size", "default_cache_type",
               "signature_version"}  # fmt: skip


# Values that are secrets whatever their option's name: an AWS access key id, a URL with a
# password, a signed URL's signature or token (S3 presigned, Azure SAS, GCS signed).
_SECRET_VALUES = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b|://[^/\s:@]+:[^/\s@]+@"
                            r"|[?&](X-Amz-Signature|X-Amz-Security-Token|X-Goog-Signature|sig|token|access_token)=",
                            re.IGNORECASE)  # fmt: skip


def _is_secret_name(name: str) -> bool:
    name = name.lower()
    return name not in _NOT_SECRET and any(word in name for word in _SECRET_WORDS)


def is_secret_value(text: str) -> bool:
    """True for text that is a secret whatever field holds it (an AWS access key id, a URL with a password)."""
    return bool(_SECRET_VALUES.search(text))


def literal_secrets(value: Any, where: str) -> Iterator[str]:
    """The dotted places under `value` (dicts and lists, at any depth) that hold a literal
    secret: a secret-like option name (key, secret, token, password, ...) whose value is not
    a ``${ENV_VAR}`` reference, or a value that is a secret whatever its name (an AWS access
    key id, a URL with a password)."""
    if isinstance(value, Mapping):
        for name, item in value.items():
            place = f"{where}.{name}"
            literal = isinstance(item, (str, bytes, int)) and not isinstance(item, bool)
            if _is_secret_name(str(name)) and literal and not (isinstance(item, str) and ENV_REFERENCE.fullmatch(item)):
                yield place
            else:
                yield from literal_secrets(item, place)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from literal_secrets(item, f"{where}[{index}]")
    elif isinstance(value, str) and is_secret_value(value):
        yield where


@dataclass
class StorageConfig:
    """fsspec storage options per protocol, for run folders and inputs given as URLs (the
    run config's ``storage:`` block), e.g. ``{"s3": {"endpoint_url": "http://127.0.0.1:9000",
    "key": "${MY_KEY}", "secret": "${MY_SECRET}"}}``. A secret-like option (key, secret,
    token, password, ...), at any depth (``client_kwargs``, lists), must be a ``${ENV_VAR}``
    reference, resolved from the environment when used, and no value may be an access key
    id or a URL with a password (`literal_secrets`): the config is stored with the run (Prefect parameters, results), so it never
    holds a secret. With no options the backends' own environment applies (``AWS_*``)."""

    __pydantic_config__ = {"extra": "forbid"}

    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol -> fsspec storage options; secrets as ${ENV_VAR}

    def __post_init__(self) -> None:
        for place in literal_secrets(self.options, "storage.options"):
            raise ValueError(
                f"{place}: give a secret as an environment reference (\"${{MY_VAR}}\") or through the "
                "backend's own variables (AWS_SECRET_ACCESS_KEY, ...), not its value: the run config is "
                "stored with the run (Prefect's database, run records)"
            )

    def resolved(self) -> dict[str, dict[str, Any]]:
        """The options with every ``${VAR}`` replaced by its value (KeyError naming a missing one)."""
        return {protocol: {name: _resolve(value, f"storage.options.{protocol}.{name}") for name, value in opts.items()}
                for protocol, opts in self.options.items()}  # fmt: skip


def _resolve(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, f"{where}[{i}]") for i, v in enumerate(value)]
    match = ENV_REFERENCE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return value
    if match.group(1) not in os.environ:
        raise KeyError(f"{where}: environment variable {match.group(1)} is not set")
    return os.environ[match.group(1)]


def configure(options: Mapping[str, Mapping[str, Any]]) -> None:
    """Set this process's fsspec storage options per protocol (``{"s3": {"endpoint_url": ...}}``);
    locations made afterwards use them. An empty mapping clears them."""
    _OPTIONS.clear()
    _OPTIONS.update({str(protocol): dict(opts) for protocol, opts in options.items()})


def is_url(item: str | os.PathLike[str] | RemotePath) -> bool:
    """True for ``scheme://...`` text or a `RemotePath` (``file://`` included)."""
    return isinstance(item, RemotePath) or bool(_URL.match(str(item)))


def is_remote(item: Any) -> bool:
    """True for a location that is not on the local disk."""
    return isinstance(item, RemotePath) or (isinstance(item, str) and is_url(item) and not item.startswith("file://"))


def location(item: str | os.PathLike[str] | RemotePath) -> Location:
    """A local `Path` for a path or ``file://`` URL, a `RemotePath` for any other URL."""
    if isinstance(item, (RemotePath, Path)):
        return item
    text = os.fspath(item)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    protocol = match.group(1).lower()
    if protocol in ("file", "local"):
        return Path(text[match.end() :] or "/")
    return RemotePath(text, _OPTIONS.get(protocol))


@dataclass(frozen=True)
class RemoteStat:
    """What `RemotePath.stat` reports (the fields the run code reads)."""

    st_size: int
    st_mtime: float = 0.0

    @property
    def st_mtime_ns(self) -> int:
        return int(self.st_mtime * 1e9)


class RemotePath:
    """A file or folder on an fsspec filesystem, addressed by URL, with a `Path`-like API.

    Folders on object stores are key prefixes: `mkdir` is a no-op there and a folder
    exists once something is written below it.
    """

    __slots__ = ("url", "options")

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        match = _URL.match(url)
        if match is None:
            raise ValueError(f"{url!r} is not a URL (scheme://...)")
        protocol = match.group(1).lower()
        rest = posixpath.normpath(url[match.end() :]).lstrip("/") if url[match.end() :] else ""
        rest = "" if rest == "." else rest
        self.url = f"{protocol}://{rest}"
        self.options = dict(options or {})

    # ------------------------------------------------------------------ naming

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def key(self) -> str:
        """The path after ``scheme://`` (``bucket/run/x``)."""
        return self.url.split("://", 1)[1]

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (instances are cached by fsspec per protocol and options)."""
        import fsspec

        return fsspec.filesystem(self.protocol, **{**_DEFAULTS.get(self.protocol, {}), **self.options})

    @property
    def path(self) -> str:
        """The filesystem's own path for this location (what fsspec calls take)."""
        return self.fs._strip_protocol(self.url)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"  # options (maybe secrets) are never shown

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < str(other)

    def __truediv__(self, other: str | os.PathLike[str]) -> RemotePath:
        return self._child(os.fspath(other))

    def joinpath(self, *parts: str) -> RemotePath:
        out = self
        for part in parts:
            out = out / part
        return out

    def _child(self, rel: str) -> RemotePath:
        return RemotePath(f"{self.url.rstrip('/')}/{rel.lstrip('/')}", self.options)

    @property
    def name(self) -> str:
        return self.key.rstrip("/").rpartition("/")[2]

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def parent(self) -> RemotePath:
        head = self.key.rstrip("/").rpartition("/")[0]
        return RemotePath(f"{self.protocol}://{head}", self.options) if head else self

    @property
    def parents(self) -> list[RemotePath]:
        out, here = [], self
        while here.parent != here:
            here = here.parent
            out.append(here)
        return out

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.key.split("/") if p)

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.with_name(self.stem + suffix)

    def is_absolute(self) -> bool:
        return True

    def resolve(self) -> RemotePath:
        return self

    def absolute(self) -> RemotePath:
        return self

    def expanduser(self) -> RemotePath:
        return self

    def as_posix(self) -> str:
        return self.url

    def relative_to(self, other: RemotePath | str) -> PurePosixPath:
        """The part below `other`; ValueError when this is not inside it (as `Path` does)."""
        base = str(other).rstrip("/") + "/"
        if not self.url.startswith(base):
            raise ValueError(f"{self.url} is not inside {other}")
        return PurePosixPath(self.url[len(base) :])

    # ------------------------------------------------------------------ queries

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        return bool(self.fs.isdir(self.path))

    def stat(self) -> RemoteStat:
        """Size (and modification time where the store reports one); FileNotFoundError if absent."""
        info = self.fs.info(self.path)
        if info.get("type") == "directory":
            return RemoteStat(st_size=0)
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created") or 0.0
        seconds = mtime.timestamp() if hasattr(mtime, "timestamp") else float(mtime)
        return RemoteStat(st_size=int(info["size"]), st_mtime=seconds)

    def iterdir(self) -> Iterator[RemotePath]:
        """The entries directly below this folder (none when it does not exist)."""
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        own = self.path.rstrip("/")
        return iter(sorted(self._from_fs(n) for n in names if n.rstrip("/") != own))

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """Entries below this folder matching `pattern` (fsspec glob rules, ``**`` recursive)."""
        return iter(sorted(self._from_fs(n) for n in self.fs.glob(f"{self.path.rstrip('/')}/{pattern}")))

    def rglob(self, pattern: str) -> Iterator[RemotePath]:
        return self.glob(f"**/{pattern}")

    def _from_fs(self, fs_path: str) -> RemotePath:
        """A location for a path the filesystem returned (same protocol and options)."""
        rel = fs_path.rstrip("/")
        own = self.path.rstrip("/")
        if rel.startswith(own + "/"):
            return self._child(rel[len(own) + 1 :])
        return RemotePath(self.fs.unstrip_protocol(rel), self.options)

    # ------------------------------------------------------------------ IO

    def open(self, mode: str = "rb", **kwargs: Any) -> IO[Any]:
        return self.fs.open(self.path, mode, **kwargs)

    def read_bytes(self) -> bytes:
        return bytes(self.fs.cat_file(self.path))

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """One PUT of the whole object (atomic on object stores)."""
        self.fs.pipe_file(self.path, bytes(data))
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Folders are key prefixes on object stores: nothing to make (memory:// keeps a marker)."""
        if self.protocol in ("memory",):
            self.fs.makedirs(self.path, exist_ok=True)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def upload(self, local: Path) -> None:
        """Put the local file `local` here (one PUT, or a multipart upload published whole)."""
        self.fs.put_file(str(local), self.path)

    def download(self, local: Path) -> None:
        """Copy this file to the local path `local`."""
        self.fs.get_file(self.path, str(local))

    def __reduce__(self) -> tuple[Any, ...]:
        return (RemotePath, (self.url, self.options))


Location = Union[Path, RemotePath]


def is_inside(path: Location, folder: Location) -> bool:
    """True when `path` is `folder` or lies below it: local paths with every link resolved
    (a link out of `folder` is outside it), URLs compared as text."""
    if isinstance(path, RemotePath) or isinstance(folder, RemotePath):
        return str(path) == str(folder) or str(path).startswith(str(folder).rstrip("/") + "/")
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def list_files(folder: Location, pattern: str) -> list[Location]:
    """Sorted files (not folders) below `folder` matching the glob `pattern` (``**`` recursive);
    [] when the folder does not exist. On object storage one listing, no request per file."""
    if isinstance(folder, RemotePath):
        found = folder.fs.glob(f"{folder.path.rstrip('/')}/{pattern}", detail=True)
        return sorted(folder._from_fs(name) for name, info in found.items() if info.get("type") != "directory")
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(pattern) if p.is_file())


def open_input(path: Location) -> Any:
    """What pyarrow readers are given: a local path as is (memory-mapped, as before), a
    remote file opened for reading (the caller closes it, or the reader does with force)."""
    return path.open("rb") if isinstance(path, RemotePath) else path


def arrow_filesystem(path: Location) -> tuple[Any, str]:
    """A pyarrow filesystem and the path within it, for pyarrow datasets over `path`."""
    import pyarrow.fs as pafs

    if isinstance(path, RemotePath):
        return pafs.PyFileSystem(pafs.FSSpecHandler(path.fs)), path.path
    return pafs.LocalFileSystem(), str(path)
