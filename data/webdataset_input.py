"""img2dataset's webdataset output read in place: ``NNNNN.tar`` + sidecar ``NNNNN.parquet``.

img2dataset's webdataset format writes, per shard, a tar holding ``KEY.jpg`` (or
``.png`` / ``.webp``), ``KEY.txt`` (the caption) and ``KEY.json`` for each sample it
fetched, and beside it a sidecar Parquet with one row per input URL (its own columns,
no image bytes; failed fetches are only there) and ``NNNNN_stats.json``. The tar is read
as a stream through fsspec (a path or a URL such as ``s3://``; `data.tar_stream`), never
copied, and joined to the sidecar on img2dataset's ``key``. The result is img2dataset
rows with the image bytes filled in (`webdataset_rows`), which the one img2dataset
adapter (`data.img2dataset.to_pairs`) turns into ``pairs`` rows exactly as it does for
img2dataset's parquet format, so both formats of the same samples give the same rows.

Every sample key, and every member that cannot be one, is accounted for, as a row that
is ok or failed with its reason, with or without a sidecar:

- a sidecar row img2dataset failed keeps ``"<status>: <error_message>"``;
- a success whose image is not in the tar fails as ``missing_from_tar``, or as
  ``truncated_tar`` when the tar stops early (cut mid-member, no end-of-archive block, a
  bad header, not a tar at all, an empty file, a compressed stream cut short): the
  members that arrived whole before the cut are kept;
- a sample in the tar that the sidecar does not list fails as ``not_in_sidecar``;
- a member that cannot be read as a sample part fails as ``bad_member`` (a name that is
  not UTF-8, a size over `data.tar_stream.MAX_MEMBER_BYTES`, a link or device under a
  sample's name), keyed by its sample key
  (non-UTF-8 bytes written ``\\xNN``); the tar's other members are kept;
- a key whose image, caption or JSON appears a second time fails, for the repeat, as
  ``duplicate_key`` under the key ``KEY#2`` (``#3``, ...): the first stays the sample;
- image bytes that do not decode fail as ``undecodable`` (the adapter's decode check).

Keys and extensions follow webdataset (``base_plus_ext``): the key is the member's path up
to the first dot of its basename, the extension everything after it (``KEY.v2.jpg`` is
sample ``KEY``, extension ``v2.jpg``). A sample's image is its ``jpg`` / ``png`` / ``webp``
/ ``jpeg`` member, or else the first member whose extension ends in one of those
(``v2.jpg``), as webdataset's decoders go by the last part; likewise ``txt`` and ``json``.
A member name with no dot (``README``) is no sample part, as in webdataset.

A tar with no sidecar beside it is its own record: each sample is a success, its URL
from ``KEY.json``, and damage it cannot place on a sample (a cut before any member of
the next sample, a file that is no tar) is one ``truncated_tar`` row keyed by the tar's
name, so a damaged tar never reads as fewer samples with no trace. capfilt's own
webdataset export (`data.export`: tar members named by ``stem``, a sidecar with ``stem``
and the D' ``key``) is read back the same way, joined on ``stem``, keyed by the D' key.
Reading is pure: nothing is written, so reading again gives the same rows.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data.images import DEFAULT_MAX_PIXELS
from data.img2dataset import IMAGE_COLUMNS, KEY_COLUMN, SUCCESS, read_img2dataset, to_pairs
from data.schema import SchemaError
from data.shards import parquet_schema
from data.storage import location, open_input
from data.tar_stream import MAX_MEMBER_BYTES, NotHeld, TarCutError, iter_members

# Failure kinds (the text before the colon of a failed row's ``error``).
MISSING_FROM_TAR = "missing_from_tar"
TRUNCATED_TAR = "truncated_tar"
NOT_IN_SIDECAR = "not_in_sidecar"
BAD_MEMBER = "bad_member"
DUPLICATE_KEY = "duplicate_key"

TAR_SUFFIX = ".tar"
_KEPT_EXTENSIONS = frozenset(IMAGE_COLUMNS) | {"txt", "json"}
_SAMPLE_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # webdataset's rule: key = up to the basename's first dot
_EXPORT_COLUMNS = frozenset({"stem", "image", "key", "source"})  # the sidecar of capfilt's own export (data.export)


@dataclass
class TarSamples:
    """The samples of one tar: key -> {extension: bytes} (images, txt, json only), in tar
    order; members that could not join a sample, by the row key they fail under."""

    name: str = ""  # the tar's file name, for messages
    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)  # row key -> (failure kind, message)
    repeats: dict[str, list[str]] = field(default_factory=dict)  # "KEY#2" -> extensions of the repeated members
    cut: str | None = None  # why reading stopped before the end-of-archive block (None: it did not)
    cut_key: str | None = None  # the sample whose member the cut fell in, when it fell in one

    def failed_members(self) -> dict[str, tuple[str, str]]:
        """Row key -> (failure kind, message) of every member that is no sample's part."""
        repeats = {row: (DUPLICATE_KEY, f"{self.name} holds {row.rsplit('#', 1)[0]!r} more than once (repeated "
                         f"{', '.join(extensions)}); the first is the sample: drop the repeat")  # fmt: skip
                   for row, extensions in self.repeats.items()}
        return {**self.problems, **repeats}


def is_webdataset_shard(path: str | Path) -> bool:
    """True for a ``.tar`` path (local or URL)."""
    return str(path).endswith(TAR_SUFFIX)


def sidecar_of(tar: str | Path) -> str:
    """The sidecar Parquet beside a tar: ``.../00042.tar`` -> ``.../00042.parquet``."""
    return str(tar)[: -len(TAR_SUFFIX)] + ".parquet"


def tar_of(sidecar: str | Path) -> str:
    """The tar beside a sidecar: ``.../00042.parquet`` -> ``.../00042.tar``."""
    return str(sidecar).removesuffix(".parquet") + TAR_SUFFIX


def read_samples(tar: str | Path) -> TarSamples:
    """Stream one tar and group its members into samples (webdataset's key rule). A
    damaged tar gives the samples read before the damage and `cut` saying where it is;
    a member that cannot be a sample part is a problem row, the others are kept."""
    name = _name(tar)
    out = TarSamples(name)
    with location(tar).open("rb") as stream:  # a URL with the run's storage options
        try:
            for member, data in iter_members(stream, want=_is_sample_part, max_bytes=MAX_MEMBER_BYTES):
                _add_member(out, member, data)
        except TarCutError as exc:
            out.cut = f"{name} {exc}"
            part = _sample_part(exc.member) if exc.member is not None else None
            out.cut_key = _readable(part[0]) if part is not None else None
    return out


def _add_member(out: TarSamples, member: str, data: bytes | NotHeld) -> None:
    """File one wanted member: into its sample, or as a problem (bad name, too big, repeat)."""
    key, extension = _sample_part(member)  # type: ignore[misc]  # wanted: not None
    readable = _readable(key)
    if readable != key:
        why = f"{out.name} member {_readable(member)!r} has a name that is not UTF-8; rename it in the tar"
        out.problems.setdefault(readable, (BAD_MEMBER, why))
    elif isinstance(data, NotHeld):
        out.problems[key] = (BAD_MEMBER, f"{out.name} member {member!r} is {data.why}; replace it by the file")
    elif extension in out.samples.setdefault(key, {}):
        row = next(f"{key}#{n}" for n in itertools.count(2) if extension not in out.repeats.get(f"{key}#{n}", ()))
        out.repeats.setdefault(row, []).append(extension)
    else:
        out.samples[key][extension] = data


def _is_sample_part(member: str) -> bool:
    return _sample_part(member) is not None


def _sample_part(member: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member that is a sample's image, txt or json, else
    None: the key is up to the basename's first dot, the extension the rest (lower case),
    kept when its last dotted part is an image, txt or json."""
    match = _SAMPLE_NAME.match(member)
    if match is None or match.group(2).lower().rsplit(".", 1)[-1] not in _KEPT_EXTENSIONS:
        return None
    return match.group(1), match.group(2).lower()


def _readable(name: str) -> str:
    """`name` with bytes that were not UTF-8 (surrogate escapes) written as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def webdataset_rows(tar: str | Path) -> pa.Table:
    """One webdataset shard as img2dataset rows with the image bytes in ``jpg``: the
    sidecar's rows in its order, then the tar's samples it does not list, then the
    members no sample holds. A row whose image cannot be had gets a failure status and
    message here (module docstring)."""
    samples = read_samples(tar)
    sidecar = sidecar_of(tar)
    if not location(sidecar).is_file():
        return _rows_from_tar(samples)
    table = _sidecar_rows(sidecar)

    def column(name: str) -> list[str | None]:
        return _strings(table, name, sidecar)

    joins = column("key" if "key" in table.column_names else KEY_COLUMN)
    own = column(KEY_COLUMN) if KEY_COLUMN in table.column_names else list(joins)
    captions, statuses, messages = column("caption"), column("status"), column("error_message")
    failures = samples.failed_members()
    images: list[bytes | None] = []
    for i, key in enumerate(joins):
        sample = samples.samples.get(key or "", {})
        images.append(_part(sample, IMAGE_COLUMNS))
        if captions[i] is None and (text := _part(sample, ("txt",))) is not None:
            captions[i] = _text(text)
        if statuses[i] == SUCCESS and (problem := _problem(samples, key or "", failures)) is not None:
            (statuses[i], messages[i]), images[i] = problem, None
    cols = {
        "key": joins,
        KEY_COLUMN: own,
        "image_id": column("image_id"),
        "url": column("url"),
        "caption": captions,
        "status": statuses,
        "error_message": messages,
        "jpg": images,
    }
    listed = set(joins)
    for key, sample in samples.samples.items():
        if key not in listed:
            _append(cols, key, sample, (NOT_IN_SIDECAR, f"{samples.name} holds it, {_name(sidecar)} does not list it"))
    _append_failed_members(cols, samples, listed)
    return _table(cols)


def read_webdataset_pairs(tar: str | Path, source: str = "web", max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """One webdataset shard read in place as ``pairs`` rows (`webdataset_rows` + the one
    img2dataset adapter `data.img2dataset.to_pairs`)."""
    return to_pairs(webdataset_rows(tar), str(tar), source, max_pixels)


def _sidecar_rows(sidecar: str) -> pa.Table:
    """The sidecar as img2dataset rows: img2dataset's own (`read_img2dataset` checks it),
    or the sidecar of capfilt's own export, whose tar members are named by ``stem``: every
    row a success, joined on ``stem``, keyed by the D' ``key``."""
    if not _EXPORT_COLUMNS <= set(parquet_schema(location(sidecar)).names):
        return read_img2dataset(sidecar)  # type: ignore[arg-type]  # a local path or URL
    table = pq.read_table(open_input(location(sidecar)), columns=["stem", "key", "image_id", "url", "caption"])
    return pa.table({
        "key": table.column("stem"),
        KEY_COLUMN: table.column("key"),
        "image_id": table.column("image_id"),
        "url": table.column("url"),
        "caption": table.column("caption"),
        "status": pa.array([SUCCESS] * table.num_rows, pa.string()),
        "error_message": pa.nulls(table.num_rows, pa.string()),
    })  # fmt: skip


def _rows_from_tar(samples: TarSamples) -> pa.Table:
    """A tar without its sidecar: every sample it holds is a success unless the tar says
    otherwise (`_problem`); then the members no sample holds, and the damage no row holds."""
    cols: dict[str, list] = {name: [] for name in ("key", KEY_COLUMN, "image_id", "url", "caption", "status", "error_message", "jpg")}
    failures = samples.failed_members()
    for key, sample in samples.samples.items():
        _append(cols, key, sample, _problem(samples, key, failures))
    _append_failed_members(cols, samples, set())
    damage = _damage_key(samples)
    if damage is not None:
        why = f"{samples.cut}; the samples after it are lost: copy the tar again from its source"
        _append(cols, damage, {}, (TRUNCATED_TAR, why))
    return _table(cols)


def _append_failed_members(cols: dict[str, list], samples: TarSamples, listed: set[str | None]) -> None:
    """A failed row for each member no sample or sidecar row holds (bad names, repeats)."""
    for key, problem in samples.failed_members().items():
        if key not in listed and key not in samples.samples:
            _append(cols, key, {}, problem)


def _damage_key(samples: TarSamples) -> str | None:
    """The key of a row for the tar's damage when no sample row carries it: the sample the
    cut fell in when none of it arrived, else the tar's name; None without damage, or when
    the cut sample's own row says ``truncated_tar``."""
    if samples.cut is None:
        return None
    cut = samples.samples.get(samples.cut_key) if samples.cut_key is not None else None
    if cut is not None and _part(cut, IMAGE_COLUMNS) is None:
        return None
    return samples.cut_key if samples.cut_key is not None and cut is None else samples.name


def _append(cols: dict[str, list], key: str, sample: dict[str, bytes], problem: tuple[str, str] | None) -> None:
    """One row for a tar sample: its key (our key from ``KEY.json`` when it has one),
    caption from ``KEY.txt``, URL from ``KEY.json``; a success unless `problem` says why not."""
    meta = _meta(sample)
    status, message = problem or (SUCCESS, None)
    cols["key"].append(key)
    exported = _str(meta.get("key")) if meta.get("stem") == key else None  # capfilt's export: the D' key
    cols[KEY_COLUMN].append(_str(meta.get(KEY_COLUMN)) or exported or key)
    cols["image_id"].append(_str(meta.get("image_id")))
    cols["url"].append(_str(meta.get("url")))
    text = _part(sample, ("txt",))
    cols["caption"].append(_text(text) if text is not None else _str(meta.get("caption")))
    cols["status"].append(status)
    cols["error_message"].append(message)
    cols["jpg"].append(_part(sample, IMAGE_COLUMNS) if status == SUCCESS else None)


def _table(cols: dict[str, list]) -> pa.Table:
    types = {"jpg": pa.binary()}
    return pa.table({name: pa.array(values, types.get(name, pa.string())) for name, values in cols.items()})


def _problem(samples: TarSamples, key: str, failures: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(status, message) when the sample `key` cannot be a success: a bad or repeated
    member (`failures`: `TarSamples.failed_members`), or no image (cut off by damage, or
    missing); None when it can."""
    failed = failures.get(key)
    if failed is not None:
        return failed
    sample = samples.samples.get(key, {})
    if _part(sample, IMAGE_COLUMNS) is not None:
        return None
    if samples.cut is not None:
        return TRUNCATED_TAR, f"no image for {key!r} before the damage: {samples.cut}"
    held = sorted(sample)
    what = f"only {', '.join(held)}" if held else "no member"
    return MISSING_FROM_TAR, f"{samples.name} has {what} for {key!r} (expected one of {', '.join(IMAGE_COLUMNS)})"


def _part(sample: dict[str, bytes], kinds: tuple[str, ...]) -> bytes | None:
    """The sample's member of one of `kinds` (``jpg``, ...): an exact extension first, else
    the first whose last dotted part is one (``v2.jpg``), as webdataset's decoders match."""
    exact = next((sample[ext] for ext in kinds if ext in sample), None)
    if exact is not None:
        return exact
    return next((data for ext, data in sample.items() if ext.rsplit(".", 1)[-1] in kinds), None)


def _meta(sample: dict[str, bytes]) -> dict:
    """A sample's ``KEY.json`` as a dict ({} when absent or not a JSON object)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _str(value: object) -> str | None:
    """`value` as text that encodes (a JSON ``"\\udcff"`` escape gives a lone surrogate,
    which no UTF-8 column takes: written as ``\\udcff``)."""
    return None if value is None else str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _strings(table: pa.Table, name: str, where: str) -> list[str | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    try:
        return table.column(name).cast(pa.string()).to_pylist()
    except pa.ArrowException as exc:
        raise SchemaError(f"{where}: column {name!r} is not text ({exc}); pass img2dataset's own output") from exc


def _name(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]
