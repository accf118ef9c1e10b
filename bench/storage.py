"""Caption + filter with the run folder and the inputs on S3 vs on local disk (issue 15).

    PYTHONPATH=. python bench/storage.py --shards 4 --rows 64 --repeats 2

Same web shards (photo-like JPEGs, `data.synth_photo`), same tiny random MED, same
settings; one run folder on the local disk and one on a local S3 server (moto's server
mode on 127.0.0.1, started here, as the tests do) with the web shards and the model
uploaded to the bucket. Each repeat runs caption then filter into a fresh run folder on
each side, interleaved (local, S3, local, S3, ...); the best wall time per stage counts.
The S3 side pays: the model download into the local cache (first repeat only; the
cache is kept, as a worker keeps it), reading every input twice (fingerprint + rows),
one upload per shard and per record, and a listing per folder. The tiny model keeps the
compute small, so the ratio is close to the worst case: with ViT-B models the stage is
compute-bound and the ratio tends to 1. Checks in the same run: both sides' shards are
byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow as pa
import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port; the AWS variables point at it."""
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(exe if exe.is_file() else shutil.which("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    return proc, endpoint


_PAIRS = pa.schema([("key", pa.string()), ("image_id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                    ("jpg", pa.binary()), ("url", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                    ("sha256", pa.string()), ("status", pa.string()), ("error", pa.string())])  # fmt: skip


def web_shards(folder: Path, shards: int, rows: int, size: int) -> list[Path]:
    from data.shards import shard_name, write_shard
    from data.synth_photo import photo_jpeg

    paths = []
    for s in range(shards):
        items = []
        for r in range(rows):
            i = s * rows + r
            data = photo_jpeg(i, size, size * 3 // 4)
            items.append({"key": f"w{i:05d}", "image_id": f"img{i:05d}", "source": "web", "caption": "a photo of a thing",
                          "jpg": data, "url": f"http://example.com/{i}.jpg", "width": size, "height": size * 3 // 4,
                          "sha256": hashlib.sha256(data).hexdigest(), "status": "ok", "error": None})  # fmt: skip
        path = folder / shard_name(s)
        write_shard(pa.Table.from_pylist(items, schema=_PAIRS), path, kind="pairs")
        paths.append(path)
    return paths


def tiny_model(folder: Path) -> Path:
    import blip_core
    from blip_core.med import MED

    torch.manual_seed(0)
    tokenizer = blip_core.build_tokenizer(["a photo of a thing on the grass"] * 4 + ["a picture of"], vocab_size=200)
    blip_core.save(MED(blip_core.preset("tiny").with_tokenizer(tokenizer)), tokenizer, folder)
    return folder


def upload(local: Path, target) -> None:
    for path in sorted(local.rglob("*")):
        if path.is_file():
            (target / path.relative_to(local).as_posix()).upload(path)


def caption_filter(run, web, model, batch: int) -> dict[str, float]:
    """Wall seconds of each stage into the run folder `run`; returns them and the outputs."""
    from data.layout import RunLayout
    from tasks.caption import CaptionConfig, run_caption
    from tasks.execution import ExecutionConfig
    from tasks.filter import FilterConfig, run_filter

    execution = ExecutionConfig(batch_size=batch, num_workers=0, progress=False)
    layout = RunLayout(run)
    start = time.perf_counter()
    caption = run_caption([web], layout.stage("caption"), model, CaptionConfig(execution=execution))
    middle = time.perf_counter()
    filtered = run_filter([web], layout.stage("filter"), model, FilterConfig(execution=execution), caption_dir=caption.output)
    end = time.perf_counter()
    return {"caption": middle - start, "filter": end - middle, "outputs": (caption.output, filtered.output)}


def shard_bytes(folder) -> dict[str, bytes]:
    from data.shards import list_shards

    found = {}
    for sub in ("", "kept", "rejected", "failed"):
        here = folder / sub if sub else folder
        found.update({f"{sub}/{p.name}": p.read_bytes() for p in list_shards(here)})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=64, help="images per shard")
    parser.add_argument("--size", type=int, default=320, help="JPEG width (height 3/4 of it)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import fsspec

    from data.storage import location

    proc, endpoint = start_moto()
    work = Path(tempfile.mkdtemp(prefix="capfilt-bench-storage-"))
    os.environ["CAPFILT_MODEL_CACHE"] = str(work / "model-cache")
    try:
        bucket = f"capfilt-bench-{uuid.uuid4().hex[:8]}"
        fsspec.filesystem("s3").mkdir(bucket)
        web_local = work / "web"
        web_shards(web_local, args.shards, args.rows, args.size)
        model_local = tiny_model(work / "model")
        root = location(f"s3://{bucket}")
        upload(web_local, root / "web")
        upload(model_local, root / "model")
        input_mb = sum(p.stat().st_size for p in web_local.glob("*.parquet")) / 1e6
        best = {side: {"caption": float("inf"), "filter": float("inf")} for side in ("local", "s3")}
        outputs = {}
        for r in range(args.repeats):
            for side in ("local", "s3"):
                if side == "local":
                    got = caption_filter(work / f"run-{r}", web_local, model_local, args.batch)
                else:
                    got = caption_filter(root / f"run-{r}", root / "web", root / "model", args.batch)
                outputs[side] = got.pop("outputs")
                for stage, seconds in got.items():
                    best[side][stage] = min(best[side][stage], seconds)
        same = all(shard_bytes(a) == shard_bytes(b) for a, b in zip(outputs["local"], outputs["s3"]))
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    images = args.shards * args.rows
    print(f"# {args.shards} shards x {args.rows} images ({args.size}x{args.size * 3 // 4} JPEG, {input_mb:.1f} MB of input), "
          f"tiny MED, batch {args.batch}, {args.threads} torch thread(s), best of {args.repeats}; endpoint {endpoint}")  # fmt: skip
    print(f"{'stage':<16}{'local img/s':>12}{'S3 img/s':>12}{'S3 / local':>12}")
    for stage in ("caption", "filter"):
        local, s3 = images / best["local"][stage], images / best["s3"][stage]
        print(f"{stage:<16}{local:>12.1f}{s3:>12.1f}{s3 / local:>12.2f}")
    total_local = images / (best["local"]["caption"] + best["local"]["filter"])
    total_s3 = images / (best["s3"]["caption"] + best["s3"]["filter"])
    print(f"{'caption+filter':<16}{total_local:>12.1f}{total_s3:>12.1f}{total_s3 / total_local:>12.2f}")
    print(f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
