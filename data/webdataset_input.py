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

Every sample key is accounted for, as a row that is ok or failed with its reason:

- a sidecar row img2dataset failed keeps ``"<status>: <error_message>"``;
- a success whose image is not in the tar fails as ``missing_from_tar``, or as
  ``truncated_tar`` when the tar stops early (cut mid-member, no end-of-archive block, a
  bad header): the members that arrived whole before the cut are kept;
- a sample in the tar that the sidecar does not list fails as ``not_in_sidecar``;
- image bytes that do not decode fail as ``undecodable`` (the adapter's decode check).

A tar with no sidecar beside it is its own record: each sample is a success, its URL
from ``KEY.json``. Reading is pure: nothing is written, so reading again gives the
same rows.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from data.images import DEFAULT_MAX_PIXELS
from data.img2dataset import IMAGE_COLUMNS, KEY_COLUMN, SUCCESS, read_img2dataset, to_pairs
from data.schema import SchemaError
from data.storage import location
from data.tar_stream import TarCutError, iter_members

# Failure kinds (the text before the colon of a failed row's ``error``).
MISSING_FROM_TAR = "missing_from_tar"
TRUNCATED_TAR = "truncated_tar"
NOT_IN_SIDECAR = "not_in_sidecar"

TAR_SUFFIX = ".tar"
_KEPT_EXTENSIONS = frozenset(IMAGE_COLUMNS) | {"txt", "json"}
_SAMPLE_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")  # webdataset's rule: key = up to the basename's first dot


@dataclass
class TarSamples:
    """The samples of one tar: key -> {extension: bytes} (images, txt, json only), in tar order."""

    samples: dict[str, dict[str, bytes]] = field(default_factory=dict)
    cut: str | None = None  # why reading stopped before the end-of-archive block (None: it did not)


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
    damaged tar gives the samples read before the damage and `cut` saying where it is."""
    out = TarSamples()
    name = _name(tar)
    with location(tar).open("rb") as stream:  # a URL with the run's storage options
        try:
            for member, data in iter_members(stream, want=lambda member: _sample_part(member) is not None):
                key, extension = _sample_part(member)  # type: ignore[misc]  # wanted: not None
                out.samples.setdefault(key, {}).setdefault(extension, data)
        except TarCutError as exc:
            out.cut = f"{name} {exc}"
    return out


def _sample_part(member: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member that is a sample's image, txt or json, else None."""
    match = _SAMPLE_NAME.match(member)
    if match is None or match.group(2).lower() not in _KEPT_EXTENSIONS:
        return None
    return match.group(1), match.group(2).lower()


def webdataset_rows(tar: str | Path) -> pa.Table:
    """One webdataset shard as img2dataset rows with the image bytes in ``jpg``: the
    sidecar's rows in its order, then the tar's samples it does not list. A row whose
    image cannot be had gets a failure status and message here (module docstring)."""
    samples = read_samples(tar)
    sidecar = sidecar_of(tar)
    if not location(sidecar).is_file():
        return _rows_from_tar(samples)
    table = read_img2dataset(sidecar)  # type: ignore[arg-type]  # a local path or URL

    def column(name: str) -> list[str | None]:
        return _strings(table, name, sidecar)

    joins = column("key" if "key" in table.column_names else KEY_COLUMN)
    own = column(KEY_COLUMN) if KEY_COLUMN in table.column_names else list(joins)
    captions, statuses, messages = column("caption"), column("status"), column("error_message")
    images: list[bytes | None] = []
    for i, key in enumerate(joins):
        sample = samples.samples.get(key or "", {})
        images.append(_image(sample))
        if captions[i] is None and "txt" in sample:
            captions[i] = _text(sample["txt"])
        if statuses[i] == SUCCESS and images[i] is None:
            statuses[i], messages[i] = _why_no_image(samples, key, _name(tar))
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
            meta = _meta(sample)
            _append(cols, key, sample, meta, NOT_IN_SIDECAR, f"{_name(tar)} holds it, {_name(sidecar)} does not list it")
    return _table(cols)


def read_webdataset_pairs(tar: str | Path, source: str = "web", max_pixels: int = DEFAULT_MAX_PIXELS) -> pa.Table:
    """One webdataset shard read in place as ``pairs`` rows (`webdataset_rows` + the one
    img2dataset adapter `data.img2dataset.to_pairs`)."""
    return to_pairs(webdataset_rows(tar), str(tar), source, max_pixels)


def _rows_from_tar(samples: TarSamples) -> pa.Table:
    """A tar without its sidecar: every sample it holds is a success."""
    cols: dict[str, list] = {name: [] for name in ("key", KEY_COLUMN, "image_id", "url", "caption", "status", "error_message", "jpg")}
    for key, sample in samples.samples.items():
        _append(cols, key, sample, _meta(sample), SUCCESS, None)
    return _table(cols)


def _append(cols: dict[str, list], key: str, sample: dict[str, bytes], meta: dict, status: str, message: str | None) -> None:
    """One row for a tar sample: its key (our key from ``KEY.json`` when it has one),
    caption from ``KEY.txt``, URL from ``KEY.json``."""
    cols["key"].append(key)
    cols[KEY_COLUMN].append(_str(meta.get(KEY_COLUMN)) or key)
    cols["image_id"].append(_str(meta.get("image_id")))
    cols["url"].append(_str(meta.get("url")))
    cols["caption"].append(_text(sample["txt"]) if "txt" in sample else _str(meta.get("caption")))
    cols["status"].append(status)
    cols["error_message"].append(message)
    cols["jpg"].append(_image(sample) if status == SUCCESS else None)


def _table(cols: dict[str, list]) -> pa.Table:
    types = {"jpg": pa.binary()}
    return pa.table({name: pa.array(values, types.get(name, pa.string())) for name, values in cols.items()})


def _why_no_image(samples: TarSamples, key: str | None, tar_name: str) -> tuple[str, str]:
    """(status, message) of a sidecar success whose image the tar does not give."""
    if samples.cut is not None:
        return TRUNCATED_TAR, f"no image for {key!r} before the damage: {samples.cut}"
    held = sorted(samples.samples.get(key or "", {}))
    what = f"only {', '.join(held)}" if held else "no member"
    return MISSING_FROM_TAR, f"{tar_name} has {what} for {key!r} (expected one of {', '.join(IMAGE_COLUMNS)})"


def _image(sample: dict[str, bytes]) -> bytes | None:
    return next((sample[ext] for ext in IMAGE_COLUMNS if ext in sample), None)


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
    return None if value is None else str(value)


def _strings(table: pa.Table, name: str, where: str) -> list[str | None]:
    if name not in table.column_names:
        return [None] * table.num_rows
    try:
        return table.column(name).cast(pa.string()).to_pylist()
    except pa.ArrowException as exc:
        raise SchemaError(f"{where}: column {name!r} is not text ({exc}); pass img2dataset's own output") from exc


def _name(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]
