"""A streaming tar reader that says where a damaged tar stops.

`iter_members(stream)` reads a tar front to back from any binary file object (a local
file or an fsspec stream from ``s3://``, no seeking) and yields ``(name, bytes)`` for each
regular file, pax and GNU long names resolved. Headers are parsed by the standard
library (`tarfile.TarInfo.frombuf`, checksum checked) or, for the common ustar entries,
by a lean equivalent (the whole walk 2x faster, docs/BENCHMARKS.md); the walk is ours, because
`tarfile`'s own stream mode (and the `webdataset` library, which uses it) ends
*silently* when a tar is cut inside or right before a header: the samples after the cut
would vanish unaccounted. Here any stop before the end-of-archive block raises
`TarCutError` with the byte offset and what was cut, after yielding every member that
arrived whole.

Reading is pure: nothing is written.
"""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
_ZERO_BLOCK = bytes(BLOCK)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME,)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_SKIPPED_TYPES = (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK)  # global pax headers, link targets
_FAST_TYPES = (tarfile.REGTYPE, *_PAX_TYPES, *_LONG_NAME_TYPES)  # parsed by `_header` itself
_SKIP_CHUNK = 1 << 20  # unwanted member data is read and dropped this much at a time


class TarCutError(Exception):
    """A tar stops (or turns to garbage) before its end-of-archive block.

    `offset` is the byte where reading stopped (for a cut: the file's length); `what` says
    what was being read there; `members` how many files arrived whole before it.
    """

    def __init__(self, offset: int, what: str, members: int) -> None:
        self.offset = offset
        self.what = what
        self.members = members
        super().__init__(f"stops at byte {offset}, {what}, after {members} whole members")


def iter_members(stream: BinaryIO, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file in the tar (those `want` accepts), in order;
    raises `TarCutError` at a cut or a bad header (after the members before it), returns
    at the end-of-archive block. Unwanted members are read through without being held,
    so a big member of another kind costs no memory."""
    reader = _Reader(stream)
    members = 0
    long_name: str | None = None  # from a GNU long-name or pax header, for the next member
    pax_size: int | None = None  # a pax header's size (files over 8 GiB), for the next member
    while True:
        block = reader.take(BLOCK)
        if len(block) < BLOCK:
            what = "inside a header" if block else "where a header or the end-of-archive block should be"
            raise TarCutError(reader.pos, what, members)
        if block == _ZERO_BLOCK:
            return
        try:
            info = _header(block)
        except tarfile.HeaderError as exc:
            raise TarCutError(reader.pos - BLOCK, f"at a bad header ({exc})", members) from None
        name = long_name or info.name
        size = info.size if pax_size is None or info.type in _PAX_TYPES else pax_size
        keep = info.type not in _SKIPPED_TYPES and (not info.isreg() or want is None or want(name))
        data = reader.take(size) if keep else b""
        if (len(data) if keep else reader.skip(size)) < size:
            raise TarCutError(reader.pos, f"inside the data of {name!r}", members)
        whole_padding = len(reader.take(-size % BLOCK)) == -size % BLOCK
        if info.type in _PAX_TYPES:
            pax = _pax_records(data)
            long_name = pax.get("path", long_name)
            pax_size = int(pax["size"]) if pax.get("size", "").isdigit() else pax_size
        elif info.type in _LONG_NAME_TYPES:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type not in _SKIPPED_TYPES:
            long_name, pax_size = None, None
            if info.isreg():
                members += 1
                if keep:
                    yield name, data
        if not whole_padding:
            raise TarCutError(reader.pos, f"inside the padding after {name!r}", members)


def _header(block: bytes) -> tarfile.TarInfo:
    """A header block parsed: the common case (POSIX ustar magic, octal fields, a regular,
    pax or long-name entry, unsigned checksum right) here, anything else by
    `tarfile.TarInfo.frombuf`, which raises HeaderError for a bad block."""
    kind = block[156:157]
    try:
        size = int(block[124:136].split(b"\0", 1)[0].strip(), 8)
        stored = int(block[148:156].split(b"\0", 1)[0].strip(), 8)
    except ValueError:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    fast = kind in _FAST_TYPES and block[257:265] == tarfile.POSIX_MAGIC
    if not fast or stored != sum(block) - sum(block[148:156]) + 8 * 0x20:
        return tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    info = tarfile.TarInfo((prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape"))
    info.size, info.type = size, kind
    return info


class _Reader:
    """A stream read in exact amounts, counting the bytes it has read."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pos = 0

    def take(self, size: int) -> bytes:
        """Up to `size` bytes (fewer only at the end of the stream)."""
        parts, left = [], size
        while left > 0:
            chunk = self.stream.read(left)
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = b"".join(parts)
        self.pos += len(data)
        return data

    def skip(self, size: int) -> int:
        """Read `size` bytes without keeping them; returns how many there were."""
        done = 0
        while done < size and (chunk := self.take(min(_SKIP_CHUNK, size - done))):
            done += len(chunk)
        return done


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's ``"<len> <key>=<value>\\n"`` records as a dict."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            break
        if length <= 0:
            break
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records
