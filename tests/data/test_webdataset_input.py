"""img2dataset's webdataset format read in place: the same pairs rows as its parquet
format, every sample key accounted for (truncated tars, sidecars that disagree with their
tar, undecodable images), found in folders and globs, read through fsspec URLs."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from webdataset_shards import HTML, Sample, jpeg, samples, tar_bytes, write_parquet_format, write_webdataset_format

from data.ingest import failure_kind
from data.ingest_web import ImportConfig, import_img2dataset
from data.inputs import expand_inputs, expand_item, input_fingerprint, output_name, plan_outputs, read_pairs
from data.shards import read_table
from data.tar_stream import NotHeld, TarCutError, iter_members
from data.webdataset_input import MISSING_FROM_TAR, NOT_IN_SIDECAR, TRUNCATED_TAR, read_samples, read_webdataset_pairs

ROWS = samples(0, 6, failed=(1,), garbage=(4,))  # ok, 404, ok, ok, html, ok


def _by_key(table) -> dict[str, dict]:
    return {r["key"]: r for r in table.to_pylist()}


def _kind(row: dict) -> str:
    return "ok" if row["status"] == "ok" else failure_kind(row["error"])


def test_webdataset_format_gives_the_same_pairs_rows_as_the_parquet_format(tmp_path: Path) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 3, ROWS)
    parquet = write_parquet_format(tmp_path / "parquet", 3, ROWS)
    in_place = read_pairs(tar)
    assert in_place.schema.equals(read_pairs(parquet).schema, check_metadata=False)
    assert in_place.to_pylist() == read_pairs(parquet).to_pylist()
    rows = _by_key(in_place)
    assert list(rows) == [r.key for r in ROWS]  # the sidecar's order, every key once
    assert [_kind(r) for r in rows.values()] == ["ok", "failed_to_download", "ok", "ok", "undecodable", "ok"]
    assert rows["000000001"]["error"] == "failed_to_download: HTTP Error 404: Not Found"
    assert rows["000000000"]["jpg"] == jpeg(0) and rows["000000000"]["caption"] == "photo number 0"
    assert (rows["000000000"]["width"], rows["000000000"]["url"]) == (24, "http://example.com/000000000.jpg")


def test_ingestion_import_of_a_webdataset_folder_gives_the_stage_readers_rows(tmp_path: Path) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    stats = import_img2dataset(tmp_path / "wds", tmp_path / "imported", ImportConfig())
    assert (stats.input, stats.ok) == (6, 4) and stats.failures == {"failed_to_download": 1, "undecodable": 1}
    assert read_table(tmp_path / "imported" / "part-00000.parquet", "pairs").to_pylist() == read_pairs(tar).to_pylist()


def test_our_tar_reader_yields_what_the_webdataset_library_reads(tmp_path: Path) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    ours = read_samples(tar)
    assert ours.cut is None
    theirs = {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")} for s in wds.WebDataset(str(tar), shardshuffle=False)}
    assert ours.samples == theirs and list(ours.samples) == list(theirs)


def _member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """member name -> (start of its header block, end of its data) in a webdataset tar."""
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(data)) as handle:
        return {m.name: (m.offset, m.offset_data + m.size) for m in handle.getmembers()}


@pytest.mark.parametrize(
    "where",
    ["inside the image of the 3rd sample", "inside the header of the 3rd sample", "right after the 2nd sample", "at byte 0"],
)
def test_a_truncated_tar_gives_failed_rows_with_the_reason_not_a_crash(tmp_path: Path, where: str) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    data = tar.read_bytes()
    offsets = _member_offsets(data)
    cut = {
        "inside the image of the 3rd sample": offsets["000000003.jpg"][1] - 100,
        "inside the header of the 3rd sample": offsets["000000003.jpg"][0] + 700,  # in the pax header's data block
        "right after the 2nd sample": offsets["000000003.jpg"][0],  # whole members only, no end-of-archive block
        "at byte 0": 0,
    }[where]
    tar.write_bytes(data[:cut])
    rows = _by_key(read_pairs(tar))
    assert list(rows) == [r.key for r in ROWS]  # every sidecar key accounted for, once
    before = ["000000000", "000000002"] if cut else []
    assert [k for k, r in rows.items() if r["status"] == "ok"] == before
    assert _kind(rows["000000001"]) == "failed_to_download"  # its own reason stays
    for key in ("000000003", "000000004", "000000005"):
        assert _kind(rows[key]) == TRUNCATED_TAR
        assert f"00000.tar stops at byte {cut}" in rows[key]["error"] and key in rows[key]["error"]
    assert rows["000000003"]["jpg"] is None and rows["000000003"]["caption"] == "photo number 3"


def test_tar_reader_names_the_cut_and_keeps_the_members_before_it() -> None:
    data = tar_bytes(ROWS[:3])
    members = []
    with pytest.raises(TarCutError, match=r"stops at byte 2000, inside the data of '000000000\.jpg', after 0 whole members"):
        members += list(iter_members(io.BytesIO(data[:2000])))
    whole = list(iter_members(io.BytesIO(data)))
    assert [name for name, _ in whole][:3] == ["000000000.jpg", "000000000.json", "000000000.txt"]
    corrupt = bytearray(data)
    corrupt[_member_offsets(data)["000000002.jpg"][0] + 50] ^= 0xFF  # a bit flip in a header
    with pytest.raises(TarCutError, match=r"at a bad header \(bad checksum\), after 3 whole members"):
        list(iter_members(io.BytesIO(bytes(corrupt))))


@pytest.mark.parametrize("fmt", ["pax", "ustar", "gnu"])
def test_tar_reader_reads_every_header_format_as_tarfile_does(fmt: str) -> None:
    import tarfile

    names = ["deep/" * 30 + "x.jpg", "short.txt", "caf\u00e9.png", "dir/"] if fmt != "ustar" else ["deep/" * 20 + "x.jpg", "short.txt"]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format={"pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT,
                                                          "gnu": tarfile.GNU_FORMAT}[fmt]) as handle:  # fmt: skip
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name.rstrip("/"))
            if name.endswith("/"):
                info.type = tarfile.DIRTYPE
                handle.addfile(info)
            else:
                info.size = 700 * i + 3
                handle.addfile(info, io.BytesIO(bytes([i]) * info.size))
    data = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as handle:
        expected = [(m.name, handle.extractfile(m).read()) for m in handle.getmembers() if m.isreg()]
    assert list(iter_members(io.BytesIO(data))) == expected and len(expected) == min(len(names), 3)


def test_members_that_are_no_sample_part_are_read_through_without_being_held(tmp_path: Path) -> None:
    import tarfile
    import tracemalloc

    big = 8 << 20
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as handle:
        for name, data in [("000000000.jpg", jpeg(0)), ("000000000.npy", bytes(big)), ("README", b"notes"),
                           ("000000000.seg.png", b"mask"), ("000000000.txt", b"photo number 0")]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            handle.addfile(info, io.BytesIO(data))
    folder = tmp_path / "wds"
    write_webdataset_format(folder, 0, samples(0, 1))
    (folder / "00000.tar").write_bytes(buffer.getvalue())
    tracemalloc.start()
    try:
        got = read_samples(folder / "00000.tar")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # seg.png is the sample's (webdataset: key up to the first dot); jpg stays its image
    assert got.cut is None and got.samples == {"000000000": {"jpg": jpeg(0), "seg.png": b"mask", "txt": b"photo number 0"}}
    assert peak < big // 2  # the 8 MiB member went by in 1 MiB chunks
    assert _kind(_by_key(read_pairs(folder / "00000.tar"))["000000000"]) == "ok"


def test_a_sidecar_that_disagrees_with_its_tar_gives_failed_rows_with_the_reason(tmp_path: Path) -> None:
    stray = Sample(key="000000099", caption="listed, never written", data=jpeg(99))
    listed = [r for r in ROWS if r.key != "000000002"] + [stray]  # drops a tar sample, adds one the tar lacks
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS, sidecar_rows=listed)
    rows = _by_key(read_pairs(tar))
    assert sorted(rows) == sorted({r.key for r in ROWS} | {stray.key})
    assert list(rows)[-1] == "000000002"  # tar samples the sidecar lacks come after its rows
    unlisted, missing = rows["000000002"], rows["000000099"]
    assert _kind(unlisted) == NOT_IN_SIDECAR and "00000.tar holds it, 00000.parquet does not list it" in unlisted["error"]
    assert (unlisted["caption"], unlisted["url"], unlisted["jpg"]) == ("photo number 2", "http://example.com/000000002.jpg", None)
    assert _kind(missing) == MISSING_FROM_TAR and "00000.tar has no member for '000000099'" in missing["error"]
    assert [_kind(rows[k]) for k in ("000000000", "000000003", "000000005")] == ["ok"] * 3


def test_a_sample_without_an_image_member_names_what_the_tar_holds(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    writer = wds.TarWriter(buffer)
    writer.write({"__key__": "000000000", "jpg": jpeg(0), "txt": "ok"})
    writer.write({"__key__": "000000001", "txt": "caption only"})  # image member lost
    writer.close()
    folder = tmp_path / "wds"
    write_webdataset_format(folder, 0, samples(0, 2))
    (folder / "00000.tar").write_bytes(buffer.getvalue())
    rows = _by_key(read_pairs(folder / "00000.tar"))
    assert _kind(rows["000000000"]) == "ok"
    assert rows["000000001"]["error"] == f"{MISSING_FROM_TAR}: 00000.tar has only txt for '000000001' (expected one of jpg, png, webp, jpeg)"


def test_a_tar_without_a_sidecar_is_its_own_record(tmp_path: Path) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    (tmp_path / "wds" / "00000.parquet").unlink()
    rows = _by_key(read_pairs(tar))
    assert list(rows) == [r.key for r in ROWS if r.data is not None]  # failed fetches were never in the tar
    assert [_kind(r) for r in rows.values()] == ["ok", "ok", "ok", "undecodable", "ok"]
    assert rows["000000000"]["url"] == "http://example.com/000000000.jpg"  # from KEY.json
    assert "HTML" in rows["000000004"]["error"]


def test_folders_globs_and_sidecars_name_the_tar_once(tmp_path: Path) -> None:
    folder = tmp_path / "wds"
    tars = [write_webdataset_format(folder, i, samples(10 * i, 2)) for i in range(2)]
    assert expand_item(folder) == tars  # sidecars and NNNNN_stats.json are not inputs
    assert expand_item(folder / "*") == tars
    assert expand_item(folder / "00001.parquet") == [tars[1]]  # a sidecar stands for its tar
    assert expand_inputs([folder / "00000.parquet", folder / "00000.tar", folder]) == tars
    assert [name for _, name in plan_outputs(expand_inputs([folder]))] == ["part-00000.parquet", "part-00001.parquet"]
    assert output_name(Path("s3://bucket/wds/00042.tar")) == "part-00042.parquet"


def test_the_fingerprint_of_a_tar_covers_its_sidecar(tmp_path: Path) -> None:
    tar = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    before = input_fingerprint(tar)
    write_webdataset_format(tmp_path / "wds", 0, ROWS, sidecar_rows=ROWS[:-1])  # same tar bytes
    assert input_fingerprint(tar) != before


def test_a_tar_and_its_sidecar_are_read_through_fsspec_urls(tmp_path: Path) -> None:
    local = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    fs = fsspec.filesystem("memory")
    for name in ("00000.tar", "00000.parquet"):
        fs.pipe(f"/wds-test/{name}", (local.parent / name).read_bytes())
    try:
        remote = read_webdataset_pairs("memory://wds-test/00000.tar")
    finally:
        fs.rm("/wds-test", recursive=True)
    assert remote.to_pylist() == read_pairs(local).to_pylist()


def test_png_and_webp_members_are_images_too(tmp_path: Path) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (1, 2, 3)).save(buffer, format="PNG")
    rows = [Sample(key="000000000", caption="png", data=buffer.getvalue()), Sample(key="000000001", caption="no", data=HTML)]
    folder = tmp_path / "wds"
    write_webdataset_format(folder, 0, rows)
    (folder / "00000.tar").write_bytes(tar_bytes(rows, ext="png"))
    got = _by_key(read_pairs(folder / "00000.tar"))
    assert (got["000000000"]["status"], got["000000000"]["width"], got["000000000"]["height"]) == ("ok", 8, 6)
    assert _kind(got["000000001"]) == "undecodable"
    assert pq.read_schema(folder / "00000.parquet").names[:2] == ["key", "url"]  # the sidecar holds no bytes


def test_a_webdataset_shard_on_s3_is_read_in_place(tmp_path: Path, s3: str) -> None:
    import s3fs

    local = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    tar = local.read_bytes()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    bucket = s3.removeprefix("s3://")
    fs.pipe(f"{bucket}/i2d/00000.parquet", (local.parent / "00000.parquet").read_bytes())
    fs.pipe(f"{bucket}/i2d/00000.tar", tar[: len(tar) // 2])  # an upload that died half way
    remote = _by_key(read_pairs(f"{s3}/i2d/00000.tar"))  # type: ignore[arg-type]
    assert list(remote) == [r.key for r in ROWS]
    assert [_kind(r) for r in remote.values()][:3] == ["ok", "failed_to_download", "ok"]
    assert all(_kind(remote[k]) == TRUNCATED_TAR for k in ("000000004", "000000005"))
    fs.pipe(f"{bucket}/i2d/00000.tar", tar)
    fs.invalidate_cache()
    assert read_pairs(f"{s3}/i2d/00000.tar").to_pylist() == read_pairs(local).to_pylist()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- hostile tars, no sidecar (issue 23)


def _raw_tar(members: list[tuple[bytes | str, bytes]], end: bool = True) -> bytes:
    """A tar of `members` ((name, data); a bytes name is written as is, even if not UTF-8),
    with its end-of-archive blocks unless `end` is False."""
    import tarfile

    out = []
    for name, data in members:
        info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name)
        info.size = len(data)
        out += [info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"), data, bytes(-len(data) % 512)]
    return b"".join(out) + (bytes(1024) if end else b"")


def _link_member(name: str, target: str) -> bytes:
    """A symbolic-link member's header (no data)."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info.tobuf(tarfile.GNU_FORMAT)


def _forged_size(name: str, size: int) -> bytes:
    """A pax header + ustar header declaring a member of `size` bytes, and 1 KiB of its data."""
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    return info.tobuf(format=tarfile.PAX_FORMAT) + bytes(1024)


def _hostile(kind: str) -> bytes:
    import gzip

    whole = tar_bytes(ROWS)
    two = [("000000000.jpg", jpeg(0)), ("000000000.txt", b"zero"), ("000000002.jpg", jpeg(2)), ("000000002.txt", b"two")]
    return {
        "gzip": lambda: gzip.compress(whole, mtime=0),
        "not a tar": lambda: HTML * 20,
        "empty": lambda: b"",
        "cut mid-member": lambda: whole[: _member_offsets(whole)["000000003.jpg"][1] - 100],
        "repeated key": lambda: _raw_tar(two + [("000000000.jpg", jpeg(5)), ("000000000.txt", b"again")]),
        "two dots": lambda: _raw_tar([("000000000.v2.jpg", jpeg(0)), ("000000000.txt", b"zero"), *two[2:]]),
        "name not UTF-8": lambda: _raw_tar([*two[:2], (b"\xff\xfe.jpg", jpeg(9)), *two[2:]]),
        "huge declared size": lambda: _raw_tar(two, end=False) + _forged_size("000000007.jpg", 1 << 40),
        "symbolic link member": lambda: _raw_tar(two, end=False) + _link_member("000000009.jpg", "/etc/passwd") + bytes(1024),
        "JSON not UTF-8": lambda: _raw_tar([*two, ("000000002.json", b'{"url": "\\udcff\\ud800", "key": "\\udcff"}')]),
    }[kind]()


# kind -> the rows `capfilt ingest img2dataset` must write: key -> failure kind ("ok" for a kept sample)
HOSTILE = {
    "gzip": {"000000000": "ok", "000000002": "ok", "000000003": "ok", "000000004": "undecodable", "000000005": "ok"},
    "not a tar": {"00000.tar": TRUNCATED_TAR},
    "empty": {"00000.tar": TRUNCATED_TAR},
    "cut mid-member": {"000000000": "ok", "000000002": "ok", "000000003": TRUNCATED_TAR},
    "repeated key": {"000000000": "ok", "000000002": "ok", "000000000#2": "duplicate_key"},
    "two dots": {"000000000": "ok", "000000002": "ok"},
    "name not UTF-8": {"000000000": "ok", "000000002": "ok", "\\xff\\xfe": "bad_member"},
    "huge declared size": {"000000000": "ok", "000000002": "ok", "000000007": TRUNCATED_TAR},
    "JSON not UTF-8": {"000000000": "ok", "000000002": "ok"},
    "symbolic link member": {"000000000": "ok", "000000002": "ok", "000000009": "bad_member"},
}


@pytest.mark.parametrize("kind", list(HOSTILE))
def test_a_hostile_tar_without_a_sidecar_ends_every_sample_or_its_damage_as_a_row(tmp_path: Path, kind: str) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    folder = tmp_path / "wds"
    folder.mkdir()
    (folder / "00000.tar").write_bytes(_hostile(kind))
    result = CliRunner().invoke(app, ["ingest", "img2dataset", str(folder), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = _by_key(read_table(tmp_path / "out" / "part-00000.parquet", "pairs"))
    assert {key: _kind(row) for key, row in rows.items()} == HOSTILE[kind]
    for key, row in rows.items():
        if _kind(row) not in ("ok", "undecodable"):
            assert "00000.tar" in row["error"] and row["jpg"] is None, row["error"]
    if kind == "JSON not UTF-8":
        assert rows["000000002"]["url"] == "\\udcff\\ud800"  # escaped, not a crash of the whole tar
    if kind == "two dots":
        assert rows["000000000"]["jpg"] == jpeg(0) and rows["000000000"]["caption"] == "zero"
    if kind == "repeated key":
        assert rows["000000000"]["jpg"] == jpeg(0) and "'000000000' more than once (repeated jpg, txt)" in rows["000000000#2"]["error"]


def test_a_forged_member_size_is_never_allocated_and_an_oversized_member_fails_alone(tmp_path: Path,
                                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import tracemalloc

    forged = _forged_size("000000001.jpg", 1 << 40)  # 1 TiB declared, 1 KiB there
    tracemalloc.start()
    try:
        with pytest.raises(TarCutError, match=r"inside the data of '000000001\.jpg'") as cut:
            list(iter_members(io.BytesIO(forged)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20 and cut.value.member == "000000001.jpg"
    members = [("000000000.jpg", jpeg(0)), ("000000000.txt", b"zero"), ("000000001.jpg", jpeg(1) * 40), ("000000001.txt", b"big")]
    assert [(n, isinstance(d, NotHeld)) for n, d in iter_members(io.BytesIO(_raw_tar(members)), max_bytes=len(jpeg(0)) * 2)] == [
        ("000000000.jpg", False), ("000000000.txt", False), ("000000001.jpg", True), ("000000001.txt", False)]
    import data.webdataset_input as wi

    monkeypatch.setattr(wi, "MAX_MEMBER_BYTES", len(jpeg(0)) * 2)
    tar = tmp_path / "00000.tar"
    tar.write_bytes(_raw_tar(members))
    rows = _by_key(read_pairs(tar))
    assert _kind(rows["000000000"]) == "ok" and _kind(rows["000000001"]) == "bad_member"
    assert "member '000000001.jpg' is over" in rows["000000001"]["error"]


def test_the_sidecar_path_gives_the_same_accounting_for_repeats_two_dots_and_bad_names(tmp_path: Path) -> None:
    folder = tmp_path / "wds"
    listed = samples(0, 3)
    write_webdataset_format(folder, 0, listed)
    (folder / "00000.tar").write_bytes(_raw_tar([
        ("000000000.v2.jpg", jpeg(0)), ("000000001.jpg", jpeg(1)), (b"\xff.jpg", jpeg(7)),
        ("000000002.jpg", jpeg(2)), ("000000002.jpg", jpeg(3))]))  # fmt: skip
    rows = _by_key(read_pairs(folder / "00000.tar"))
    assert {k: _kind(r) for k, r in rows.items()} == {
        "000000000": "ok", "000000001": "ok", "000000002": "ok", "000000002#2": "duplicate_key", "\\xff": "bad_member"}
    assert rows["000000000"]["caption"] == "photo number 0"  # from the sidecar


def test_ingest_img2dataset_takes_urls_for_its_folder_and_out(tmp_path: Path, s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs
    from typer.testing import CliRunner

    from flows.cli import app

    local = write_webdataset_format(tmp_path / "wds", 0, ROWS)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    for name in ("00000.tar", "00000.parquet"):
        fs.pipe(f"{s3.removeprefix('s3://')}/i2d/{name}", (local.parent / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ingest", "img2dataset", f"{s3}/i2d", f"{s3}/imported"])
    assert result.exit_code == 0, result.output
    assert read_table(f"{s3}/imported/part-00000.parquet", "pairs").to_pylist() == read_pairs(local).to_pylist()  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wds"]  # nothing written to a local ./s3:/
