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

A tar compressed whole (gzip, bzip2, xz: what ``tarfile.open(mode="r|*")`` and so the
`webdataset` library read, whatever the file is named) is decompressed as it streams; a
compressed stream that stops early or is corrupt is a cut like any other. A member is
never read into memory on the size its header declares: data arrives in chunks, and a
member over `MAX_MEMBER_BYTES` is read through without being held (yielded with ``None``
as its data), so a forged header costs neither a huge allocation nor the other members.

Reading is pure: nothing is written.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = tarfile.BLOCKSIZE  # 512
_ZERO_BLOCK = bytes(BLOCK)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME,)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
_SKIPPED_TYPES = (tarfile.XGLTYPE, tarfile.GNUTYPE_LONGLINK)  # global pax headers, link targets
_FAST_TYPES = (tarfile.REGTYPE, *_PAX_TYPES, *_LONG_NAME_TYPES)  # parsed by `_header` itself
_CHUNK = 1 << 20  # member data is read (and unwanted data dropped) this much at a time
MAX_MEMBER_BYTES = 256 << 20  # a member larger than this is read through, not held (no image is this big)
_COMPRESSED: tuple[tuple[bytes, Callable[[BinaryIO], BinaryIO]], ...] = (
    (b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb")),  # type: ignore[arg-type, return-value]
    (b"BZh", lambda raw: bz2.BZ2File(raw)),  # type: ignore[return-value]
    (b"\xfd7zXZ\x00", lambda raw: lzma.LZMAFile(raw)),  # type: ignore[return-value]
)
_STREAM_ERRORS = (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError)  # a compressed stream gone bad


@dataclass(frozen=True)
class NotHeld:
    """What `iter_members` gives for a wanted member whose bytes it does not hold: `why`."""

    why: str  # "over 268435456 bytes", "a symbolic link, not a file", ...


_NOT_FILES = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a character device",
              tarfile.BLKTYPE: "a block device", tarfile.FIFOTYPE: "a FIFO"}  # fmt: skip


class TarCutError(Exception):
    """A tar stops (or turns to garbage) before its end-of-archive block.

    `offset` is the byte where reading stopped (for a cut: the file's length; in a
    compressed tar, of the decompressed stream); `what` says what was being read there;
    `members` how many files arrived whole before it; `member` the name of the file whose
    data or padding was cut (None when the cut is at or in a header).
    """

    def __init__(self, offset: int, what: str, members: int, member: str | None = None) -> None:
        self.offset = offset
        self.what = what
        self.members = members
        self.member = member
        super().__init__(f"stops at byte {offset}, {what}, after {members} whole members")


def iter_members(stream: BinaryIO, want: Callable[[str], bool] | None = None,
                 max_bytes: int = MAX_MEMBER_BYTES) -> Iterator[tuple[str, bytes | NotHeld]]:  # fmt: skip
    """``(name, data)`` of every regular file in the tar (those `want` accepts), in order;
    raises `TarCutError` at a cut or a bad header (after the members before it), returns
    at the end-of-archive block. Unwanted members are read through without being held, so
    a big member costs no memory; a wanted one over `max_bytes`, or a link or device under
    a wanted name, comes as `NotHeld` saying why (so it is accounted for, not dropped).
    A gzip / bzip2 / xz compressed tar is decompressed on the way."""
    reader = _Reader(_decompressed(stream))
    members = 0
    long_name: str | None = None  # from a GNU long-name or pax header, for the next member
    pax_size: int | None = None  # a pax header's size (files over 8 GiB), for the next member
    while True:
        block = reader.take(BLOCK)
        if len(block) < BLOCK:
            what = "inside a header" if block else "where a header or the end-of-archive block should be"
            raise TarCutError(reader.pos, what + reader.why(), members)
        if block == _ZERO_BLOCK:
            return
        try:
            info = _header(block)
        except tarfile.HeaderError as exc:
            raise TarCutError(reader.pos - BLOCK, f"at a bad header ({exc})", members) from None
        name = long_name or info.name
        size = info.size if pax_size is None or info.type in _PAX_TYPES else pax_size
        wanted = info.type not in _SKIPPED_TYPES and (not info.isreg() or want is None or want(name))
        keep = wanted and size <= (max_bytes if info.isreg() else _CHUNK)  # pax / long-name data is small
        data = reader.take(size) if keep else b""
        if (len(data) if keep else reader.skip(size)) < size:
            raise TarCutError(reader.pos, f"inside the data of {name!r}{reader.why()}", members, name)
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
                if wanted:
                    yield name, data if keep else NotHeld(f"over {max_bytes} bytes (read through, not held)")
            elif info.type in _NOT_FILES and (want is None or want(name)):
                yield name, NotHeld(f"{_NOT_FILES[info.type]}, not a file")
        if not whole_padding:
            raise TarCutError(reader.pos, f"inside the padding after {name!r}{reader.why()}", members, name)


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


def _decompressed(stream: BinaryIO) -> BinaryIO:
    """`stream`, or a decompressing reader over it when its first bytes are a gzip, bzip2
    or xz signature (read without seeking: the bytes peeked are put back in front)."""
    head = stream.read(6)
    joined = _Prefixed(head, stream)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return opener(joined)  # type: ignore[arg-type]  # a file object all the same
    return joined  # type: ignore[return-value]


class _Prefixed:
    """A binary stream with `head` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self.head = head
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        if self.head:
            cut = len(self.head) if size < 0 else min(size, len(self.head))
            data, self.head = self.head[:cut], self.head[cut:]
            return data
        return self.stream.read(size)

    def readable(self) -> bool:
        return True


class _Reader:
    """A stream read in exact amounts and bounded chunks, counting the bytes it has read;
    a decompression error ends the stream (kept in `error`, so the cut says why)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.pos = 0
        self.error: str | None = None

    def take(self, size: int) -> bytes:
        """Up to `size` bytes (fewer only at the end of the stream); never asks the
        stream for more than one chunk at a time, whatever `size` a header declared."""
        parts, left = [], size
        while left > 0:
            try:
                chunk = self.stream.read(min(left, _CHUNK))
            except _STREAM_ERRORS as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                chunk = b""
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
        while done < size and (chunk := self.take(min(_CHUNK, size - done))):
            done += len(chunk)
        return done

    def why(self) -> str:
        """`` (the decompression error)`` when one ended the stream, else empty."""
        return f" ({self.error})" if self.error else ""


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
