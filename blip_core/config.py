"""Typed configuration for MED: one dataclass per tower, plus presets.

The config carries the vocabulary size and every special token id the model needs,
so model code never contains a literal token id. Use `MEDConfig.with_tokenizer(tok)`
to take them from a tokenizer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol


class _TokenIds(Protocol):
    """What `MEDConfig.with_tokenizer` reads from a tokenizer."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    enc_id: int
    dec_id: int


@dataclass
class VisionConfig:
    """ViT image encoder (pre-norm blocks, [CLS] token first)."""

    image_size: int = 384  # side of the square input the position embeddings are laid out for
    patch_size: int = 16
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072  # MLP hidden width
    # transformers' BLIP port uses 1e-5 (original BLIP: 1e-6); parity needs the port's value
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    """BERT-style text transformer shared by the encoder and the decoder."""

    vocab_size: int = 30524  # bert-base-uncased 30522 + [DEC] + [ENC]
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # hidden and attention dropout in training (BLIP's med_config: 0.1)
    pad_token_id: int = 0
    cls_token_id: int = 101  # first token of unimodal (ITC) text
    eos_token_id: int = 102  # [SEP]: ends every text and stops generation
    bos_token_id: int = 30522  # [DEC]: first token of decoder input
    enc_token_id: int = 30523  # [ENC]: first token of image-grounded encoder (ITM) input


@dataclass
class MEDConfig:
    """The whole MED: vision tower, text tower and the contrastive / matching heads."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size
    temp_init: float = 0.07  # initial ITC temperature (learnable, clamped to [temp_min, temp_max])
    temp_min: float = 0.001
    temp_max: float = 0.5
    # Std of the truncated-normal init of every Linear / Embedding. BERT's 0.02 suits width
    # 768 (about 1/sqrt(d)); at width 64 it leaves each residual update ~2% of the stream, so
    # every caption's [CLS] starts identical and ITC sits at log(B) for hundreds of steps.
    init_std: float = 0.02

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (nested per tower)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MEDConfig:
        """Inverse of `to_dict`; unknown keys raise so a typo never passes silently."""
        data = dict(data)
        vision = VisionConfig(**data.pop("vision", {}))
        text = TextConfig(**data.pop("text", {}))
        return cls(vision=vision, text=text, **data)

    def check(self) -> None:
        """Raise if a special token id falls outside the vocabulary."""
        t = self.text
        for name in ("pad_token_id", "cls_token_id", "eos_token_id", "bos_token_id", "enc_token_id"):
            value = getattr(t, name)
            if not 0 <= value < t.vocab_size:
                raise ValueError(
                    f"text.{name}={value} is outside vocab_size={t.vocab_size}; "
                    "build the config with MEDConfig.with_tokenizer(tokenizer)"
                )

    def with_tokenizer(self, tokenizer: _TokenIds) -> MEDConfig:
        """A copy whose vocabulary size and special ids come from `tokenizer`."""
        text = dataclasses.replace(
            self.text,
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_id,
            cls_token_id=tokenizer.cls_id,
            eos_token_id=tokenizer.sep_id,
            bos_token_id=tokenizer.dec_id,
            enc_token_id=tokenizer.enc_id,
        )
        return dataclasses.replace(self, text=text)

    def with_image_size(self, image_size: int) -> MEDConfig:
        """A copy laid out for `image_size` px inputs (position embeddings get resized on load)."""
        return dataclasses.replace(self, vision=dataclasses.replace(self.vision, image_size=image_size))


def _tiny() -> MEDConfig:
    # Trains in minutes on a 2-core CPU: 32 px images, 16 patches, 2-layer towers.
    vision = VisionConfig(
        image_size=32, patch_size=8, hidden_size=96, num_layers=2, num_heads=4, intermediate_size=192
    )
    text = TextConfig(
        vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
        max_position_embeddings=64,
        # the layout `build_tokenizer` gives: BERT's specials first, [DEC] and [ENC] last
        cls_token_id=2, eos_token_id=3, bos_token_id=1022, enc_token_id=1023,
    )
    return MEDConfig(vision=vision, text=text, embed_dim=64, init_std=0.1)  # ~1/sqrt(width)


def _base() -> MEDConfig:
    # ViT-B/16 + BERT-base at 384 px (the paper's CapFilt setting).
    return MEDConfig()


def _large() -> MEDConfig:
    # ViT-L/16 + BERT-base at 384 px.
    vision = VisionConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    return MEDConfig(vision=vision)


_PRESETS = {"tiny": _tiny, "base": _base, "large": _large}


def preset(name: str) -> MEDConfig:
    """A fresh `MEDConfig` for `tiny`, `base` or `large`."""
    if name not in _PRESETS:
        raise ValueError(f"unknown MED preset {name!r}; choose one of {sorted(_PRESETS)}")
    return _PRESETS[name]()
