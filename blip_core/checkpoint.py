"""Checkpoint folders: `config.json` + `model.safetensors` + tokenizer files.

`save` writes our format; `load` reads it or a local transformers BLIP folder
(`BlipForImageTextRetrieval` = a filter, `BlipForConditionalGeneration` = a captioner),
told apart by `config.json`. Weights are only read with safetensors: nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from blip_core.atomic import atomic_path
from blip_core.config import MEDConfig
from blip_core.med import MED

FORMAT = "capfilt-med"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class LoadedModel:
    """What `load` returns. `format`: `capfilt-med`, `hf-retrieval` or `hf-captioning`."""

    model: MED
    tokenizer: Any | None  # blip_core.tokenizer.Tokenizer when the folder holds tokenizer files
    fingerprint: str  # sha256 of the weights file(s), 16 hex chars
    format: str


def state_dict_for_saving(model: MED) -> dict[str, torch.Tensor]:
    """Every parameter once under its first (encoder-side) name; shared/tied aliases are dropped."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}


def save(model: MED, tokenizer: Any | None, folder: str | Path) -> Path:
    """Write `folder/config.json`, `folder/model.safetensors` and the tokenizer files.

    Each file is written to a temporary name and renamed, so an interrupted save never
    leaves a half-written weights file under the real name; rerunning overwrites.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state_dict_for_saving(model), str(tmp), metadata={"format": FORMAT})
    if tokenizer is not None:
        tokenizer.save(folder)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "med": model.config.to_dict()}
    with atomic_path(folder / CONFIG_FILE) as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def fingerprint(paths: list[Path]) -> str:
    """sha256 over the bytes of `paths` in order, 16 hex chars."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _load_tokenizer(folder: Path) -> Any | None:
    if not ((folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists()):
        return None
    from blip_core.tokenizer import Tokenizer

    return Tokenizer.from_folder(folder)


def _resize_for(config: MEDConfig, image_size: int | None) -> MEDConfig:
    return config if image_size is None else config.with_image_size(image_size)


def _load_ours(folder: Path, raw: dict[str, Any], image_size: int | None) -> MED:
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / CONFIG_FILE}: format_version {raw.get('format_version')} is not {FORMAT_VERSION}")
    saved = MEDConfig.from_dict(raw["med"])
    config = _resize_for(saved, image_size)
    try:
        weights = load_file(str(folder / WEIGHTS_FILE))
    except SafetensorError as exc:
        raise ValueError(f"{folder / WEIGHTS_FILE}: not a readable safetensors file ({exc})") from exc
    pos = "vision.embeddings.position_embedding"
    if config.vision.grid != saved.vision.grid:
        from blip_core.vit import resize_position_embedding

        weights[pos] = resize_position_embedding(weights[pos], (config.vision.grid,) * 2)
    with torch.device("meta"):
        model = MED(config)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty gives every module its own tensor
    expected = set(state_dict_for_saving(model))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(f"{folder / WEIGHTS_FILE}: missing {missing[:5]}, unexpected {extra[:5]}")
    shapes = model.state_dict()
    wrong = [
        f"{k} {tuple(v.shape)} (config says {tuple(shapes[k].shape)})"
        for k, v in weights.items()
        if v.shape != shapes[k].shape
    ]
    if wrong:
        raise ValueError(
            f"{folder / WEIGHTS_FILE}: tensors do not match {folder / CONFIG_FILE}: {wrong[:3]}; "
            "the config and the weights come from different models"
        )
    model.load_state_dict(weights, strict=False)  # aliases of shared weights are absent by design
    return model


def _load_hf(folder: Path, raw: dict[str, Any], kind: str, tokenizer: Any | None, image_size: int | None) -> MED:
    from blip_core.hf import load_hf_weights, med_config_from_hf

    ids = None if tokenizer is None else {"cls": tokenizer.cls_id, "enc": tokenizer.enc_id}
    config = _resize_for(med_config_from_hf(raw, ids), image_size)
    model = MED(config)  # the half transformers does not hold keeps its initial weights
    load_hf_weights(model, folder, kind)
    return model


def load(folder: str | Path, device: str | torch.device = "cpu", image_size: int | None = None) -> LoadedModel:
    """Load our checkpoint folder or a transformers BLIP folder; the model is in eval mode.

    `image_size`: lay the model out for this input size (position embeddings are
    interpolated from the checkpoint's grid); default: the checkpoint's own size.
    """
    from blip_core.hf import hf_kind

    folder = Path(folder)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        what = "not a folder" if folder.exists() else "no such folder"
        raise FileNotFoundError(f"{folder}: {what}; give a model folder (ours, or a transformers BLIP folder)")
    if not config_path.exists():
        raise FileNotFoundError(f"{folder}: no {CONFIG_FILE}; not a checkpoint folder")
    raw = json.loads(config_path.read_text())
    tokenizer = _load_tokenizer(folder)
    if raw.get("format") == FORMAT:
        model, fmt = _load_ours(folder, raw, image_size), FORMAT
        weight_files = [folder / WEIGHTS_FILE]
    else:
        kind = hf_kind(raw)
        if kind is None:
            raise ValueError(
                f"{config_path}: neither a capfilt checkpoint (format={FORMAT!r}) nor a transformers "
                f"BlipForImageTextRetrieval / BlipForConditionalGeneration config"
            )
        model, fmt = _load_hf(folder, raw, kind, tokenizer, image_size), f"hf-{kind}"
        weight_files = sorted(folder.glob("model*.safetensors"))
    model = model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=fingerprint(weight_files), format=fmt)
