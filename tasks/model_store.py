"""Models on object storage: staged through a local cache folder, since `blip_core` loads
(and saves) only local folders and never imports fsspec.

`local_model(model)` gives a local folder for a model given as a local path (itself) or
as a URL (``s3://bucket/run/models/filter/<id>/final``): the folder's files are
downloaded once into ``<cache>/<digest>/`` and reused while the remote files are the
same (the digest covers the URL and every file's name, size and ETag/mtime), so Dask
workers on machines that share no disk each load the model from the run folder.
`publish_model(local, url)` uploads a trained model folder, its files one object each,
``config.json`` last (what a reader checks first), so a half-uploaded model is not
taken for a whole one by `flows.caching`'s completeness check.

The cache is ``$CAPFILT_MODEL_CACHE``, else ``<tempdir>/capfilt-models`` (each worker's
own temporary folder). A download goes to a private folder first and is moved into
place whole (`blip_core.atomic.replace_folder`), so a killed download is never used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from blip_core.atomic import replace_folder
from data.storage import Location, RemotePath, location

CACHE_ENV = "CAPFILT_MODEL_CACHE"
_FIRST_READ = "config.json"  # the file whose presence says a model folder is whole


def cache_root() -> Path:
    """Where downloaded models are kept on this machine."""
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "capfilt-models")


def _listing(folder: RemotePath) -> list[tuple[str, dict[str, Any]]]:
    """(relative name, info) of every file below `folder`, sorted; FileNotFoundError when none."""
    found = folder.fs.find(folder.path, detail=True)
    base = folder.path.rstrip("/") + "/"
    files = sorted((name[len(base) :], info) for name, info in found.items() if name.startswith(base) and info.get("type") != "directory")
    if not files:
        raise FileNotFoundError(f"{folder}: no such folder, or no model files in it (expected config.json and weights)")
    return files


def _digest(folder: RemotePath, files: list[tuple[str, dict[str, Any]]]) -> str:
    parts = [folder.url] + [f"{name}:{info.get('size')}:{info.get('ETag') or info.get('mtime') or ''}" for name, info in files]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def local_model(model: str | Path | RemotePath) -> Path:
    """A local folder holding `model`: the path itself when local, else the cached download."""
    source = location(model)
    if not isinstance(source, RemotePath):
        return source
    files = _listing(source)

    def download(folder: Path) -> None:
        for name, _ in files:
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            (source / name).download(target)

    return fill_cache(cache_root() / _digest(source, files), _FIRST_READ, download)


def fill_cache(folder: Path, marker: str, fill: Callable[[Path], None]) -> Path:
    """`folder` in the local cache, whole: as it is when ``folder/marker`` exists, else
    `fill` writes a private folder beside it that is then moved into place whole
    (`blip_core.atomic.replace_folder`), so a killed download is never used; when another
    process of this machine finished first, its copy is kept and ours dropped."""
    if (folder / marker).is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    fill(partial)
    if (folder / marker).is_file():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        replace_folder(partial, folder)
    return folder


def publish_model(local: Path, target: Location | str) -> Location:
    """Upload the model folder `local` to `target` when it is a URL (each file one object,
    ``config.json`` last); a local `target` is returned as is (the model was saved there)."""
    target = location(target)
    if not isinstance(target, RemotePath):
        return target
    files = sorted((p for p in Path(local).rglob("*") if p.is_file()), key=lambda p: (p.name == _FIRST_READ, str(p)))
    for path in files:
        (target / path.relative_to(local).as_posix()).upload(path)
    return target
