"""Bridge to Hugging Face transformers' BLIP classes (weights and configs, both ways).

transformers keeps encoder and decoder as separate, unshared models:
- `BlipForImageTextRetrieval` (a filter): `vision_model`, `text_encoder` (BERT layout,
  with cross-attention), `vision_proj`, `text_proj`, `itm_head`;
- `BlipForConditionalGeneration` (a captioner): `vision_model`, `text_decoder.bert`,
  `text_decoder.cls.predictions` (LM head tied to the word embeddings).
Importing one gives half a MED (the other half keeps its initial weights); exporting a
MED writes either, with the shared weights copied into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from blip_core.config import MEDConfig, TextConfig, VisionConfig
from blip_core.med import MED

KINDS = {"retrieval": "BlipForImageTextRetrieval", "captioning": "BlipForConditionalGeneration"}
_TEXT_PREFIX = {"retrieval": "text_encoder.", "captioning": "text_decoder.bert."}

# our attention / FFN module names -> BERT's
_ATTENTION = {"query": "self.query", "key": "self.key", "value": "self.value", "dense": "output.dense",
              "norm": "output.LayerNorm"}
_FFN = {"fc1": "intermediate.dense", "fc2": "output.dense", "norm": "output.LayerNorm"}


def hf_kind(config: dict[str, Any]) -> str | None:
    """`retrieval` / `captioning` for a transformers BLIP `config.json`, else None."""
    for kind, arch in KINDS.items():
        if arch in config.get("architectures", []):
            return kind
    return None


def key_map(model: MED, kind: str) -> dict[str, str]:
    """Our parameter name -> transformers' name, for the half of MED that `kind` holds."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    names: dict[str, str] = {}
    for name, _ in model.vision.named_parameters():
        hf = name.replace("layers.", "encoder.layers.", 1) if name.startswith("layers.") else name
        names[f"vision.{name}"] = f"vision_model.{hf}"
    prefix = _TEXT_PREFIX[kind]
    emb = {"word_embeddings.weight": "word_embeddings.weight", "position_embeddings.weight":
           "position_embeddings.weight", "norm.weight": "LayerNorm.weight", "norm.bias": "LayerNorm.bias"}
    for ours, hf in emb.items():
        names[f"text_encoder.embeddings.{ours}"] = f"{prefix}embeddings.{hf}"
    stack, stack_name = (
        (model.text_encoder, "text_encoder") if kind == "retrieval" else (model.text_decoder, "text_decoder")
    )
    for i, _ in enumerate(stack.layers):
        hf_layer = f"{prefix}encoder.layer.{i}."
        for ours_mod, hf_mod, table in (("self_attn", "attention", _ATTENTION),
                                        ("cross_attn", "crossattention", _ATTENTION), ("ffn", "", _FFN)):
            # the shared modules are named after the encoder (their first owner)
            owner = stack_name if ours_mod == "self_attn" else "text_encoder"
            for ours_p, hf_p in table.items():
                for leaf in ("weight", "bias"):
                    hf_name = f"{hf_layer}{hf_mod + '.' if hf_mod else ''}{hf_p}.{leaf}"
                    names[f"{owner}.layers.{i}.{ours_mod}.{ours_p}.{leaf}"] = hf_name
    if kind == "retrieval":
        for head in ("vision_proj", "text_proj", "itm_head"):
            for leaf in ("weight", "bias"):
                names[f"{head}.{leaf}"] = f"{head}.{leaf}"
    else:
        head = "text_decoder.cls.predictions."
        names.update({
            "lm_head.dense.weight": f"{head}transform.dense.weight",
            "lm_head.dense.bias": f"{head}transform.dense.bias",
            "lm_head.norm.weight": f"{head}transform.LayerNorm.weight",
            "lm_head.norm.bias": f"{head}transform.LayerNorm.bias",
            "lm_head.decoder.bias": f"{head}bias",
        })
    return names


def hf_config(config: MEDConfig, kind: str) -> Any:
    """A transformers `BlipConfig` describing `config` (text `is_decoder=True` so cross-attention exists)."""
    from transformers import BlipConfig

    v, t = config.vision, config.text
    vision = dict(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps, hidden_act="gelu", initializer_range=config.init_std,
    )
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, encoder_hidden_size=v.hidden_size,
        intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, max_position_embeddings=t.max_position_embeddings,
        layer_norm_eps=t.layer_norm_eps, hidden_act="gelu", is_decoder=True,
        pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, sep_token_id=t.eos_token_id,
        eos_token_id=t.eos_token_id, initializer_range=config.init_std,
    )
    cfg = BlipConfig(
        text_config=text, vision_config=vision, image_text_hidden_size=config.embed_dim,
        initializer_range=config.init_std,
    )
    cfg.architectures = [KINDS[kind]]
    return cfg


def med_config_from_hf(config: dict[str, Any], special_ids: dict[str, int] | None = None) -> MEDConfig:
    """Our `MEDConfig` from a transformers BLIP `config.json` dict (its defaults filled in)."""
    from transformers import BlipConfig

    hf = BlipConfig.from_dict(config)
    v, t = hf.vision_config, hf.text_config
    ids = special_ids or {}
    vision = VisionConfig(
        image_size=_square(v.image_size, "image_size"), patch_size=_square(v.patch_size, "patch_size"), hidden_size=v.hidden_size,
        num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
        intermediate_size=v.intermediate_size, layer_norm_eps=v.layer_norm_eps,
    )
    text = TextConfig(
        vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_layers=t.num_hidden_layers,
        num_heads=t.num_attention_heads, intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings, layer_norm_eps=t.layer_norm_eps,
        pad_token_id=t.pad_token_id, bos_token_id=t.bos_token_id, eos_token_id=t.sep_token_id,
        cls_token_id=ids.get("cls", TextConfig.cls_token_id),
        # without a tokenizer in the folder: BLIP's layout puts [ENC] right after [DEC]
        enc_token_id=ids.get("enc", t.bos_token_id + 1),
    )
    for act in (v.hidden_act, t.hidden_act):
        if act != "gelu":
            raise ValueError(f"BLIP config uses activation {act!r}; only exact 'gelu' is supported")
    return MEDConfig(
        vision=vision, text=text, embed_dim=getattr(hf, "image_text_hidden_size", 256),
        init_std=getattr(hf, "initializer_range", MEDConfig.init_std),
    )


def _square(value: Any, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}={value}: only square images/patches are supported")
        value = value[0]
    return int(value)


def _hf_weights(folder: Path) -> dict[str, Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        weights: dict[str, Tensor] = {}
        for name in files:
            weights.update(load_file(str(folder / name)))
        return weights
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors (pytorch_model.bin is not read: never unpickle)")
    return load_file(str(single))


def load_hf_weights(model: MED, folder: Path, kind: str) -> None:
    """Copy a transformers BLIP folder's weights into `model` (the half `kind` holds)."""
    weights = _hf_weights(folder)
    params = dict(model.named_parameters())
    missing = []
    with torch.no_grad():
        for ours, hf in key_map(model, kind).items():
            if hf not in weights:
                missing.append(hf)
                continue
            target = params[ours]
            source = weights[hf]
            if ours == "vision.embeddings.position_embedding" and source.shape != target.shape:
                from blip_core.vit import resize_position_embedding

                source = resize_position_embedding(source, (model.config.vision.grid,) * 2)
            if source.shape != target.shape:
                raise ValueError(f"{folder}: {hf} has shape {tuple(source.shape)}, expected {tuple(target.shape)}")
            target.copy_(source)
    if missing:
        raise ValueError(f"{folder}: weights missing for a {KINDS[kind]}: {missing[:5]}")


def to_hf_model(model: MED, kind: str = "retrieval") -> Any:
    """An in-memory transformers BLIP model (eval mode) holding `model`'s weights for `kind`."""
    import transformers

    cfg = hf_config(model.config, kind)
    with torch.device("meta"):
        hf_model = getattr(transformers, KINDS[kind])(cfg)
    ours = dict(model.named_parameters(remove_duplicate=False))
    state = {hf: ours[name].detach().to("cpu", torch.float32) for name, hf in key_map(model, kind).items()}
    if kind == "captioning":  # tied in HF as well: the same tensors under the decoder's names
        head = "text_decoder.cls.predictions."
        state[f"{head}decoder.bias"] = state[f"{head}bias"]
        state[f"{head}decoder.weight"] = state[f"{_TEXT_PREFIX[kind]}embeddings.word_embeddings.weight"]
    result = hf_model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys or any(not k.endswith("position_ids") for k in result.missing_keys):
        raise RuntimeError(f"HF layout mismatch: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    for name, buf in list(hf_model.named_buffers()):  # non-persistent position ids stay on meta
        if buf.is_meta:
            if not name.endswith("position_ids"):
                raise RuntimeError(f"HF buffer {name} was not materialised")
            owner = hf_model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    hf_model.tie_weights()
    return hf_model.eval()


def export_hf(model: MED, tokenizer: Any | None, folder: str | Path, kind: str = "retrieval") -> Path:
    """Write `folder` as a transformers `BlipForImageTextRetrieval` or `BlipForConditionalGeneration`.

    Shared weights are copied into the unshared HF layout; the tokenizer files and an
    image-processor config go alongside, so transformers' own classes load the folder.
    Rewriting the same folder is safe (files are replaced).
    """
    folder = Path(folder)
    to_hf_model(model, kind).save_pretrained(str(folder))
    _save_image_processor(model.config.vision.image_size, folder)
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder


def _save_image_processor(image_size: int, folder: Path) -> None:
    from transformers import BlipImageProcessor

    from blip_core.image import BLIP_MEAN, BLIP_STD

    BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(BLIP_MEAN),
                       image_std=list(BLIP_STD)).save_pretrained(str(folder))
