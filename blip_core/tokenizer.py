"""BLIP's text tokenizer: BERT WordPiece plus `[DEC]` (decoder bos) and `[ENC]` (ITM first token).

Three encodings of one caption differ only in their first token, as in BLIP:
``text`` starts with ``[CLS]`` (unimodal encoder, ITC), ``itm`` with ``[ENC]``
(image-grounded encoder), ``decoder`` with ``[DEC]`` (image-grounded decoder).
All end with ``[SEP]`` (the decoder's eos) and are right-padded with ``[PAD]``.

The special ids always come from the vocabulary, never from literals, so the same
code serves bert-base-uncased (``[DEC]`` = 30522) and a vocabulary trained here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import BertTokenizer

Mode = Literal["text", "itm", "decoder"]

# The captioner's prompt (BLIP finetunes and samples with it; its tokens are not in the loss).
DEFAULT_PROMPT = "a picture of "

DEC_TOKEN = "[DEC]"
ENC_TOKEN = "[ENC]"
_BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class Tokenizer:
    """A BERT tokenizer that knows BLIP's three first tokens."""

    def __init__(self, bert: BertTokenizer) -> None:
        self.bert = bert
        # Registers both as special (never split, dropped by decode); adds ids only if absent.
        bert.add_special_tokens({"bos_token": DEC_TOKEN, "additional_special_tokens": [ENC_TOKEN]})
        self.pad_id: int = bert.pad_token_id
        self.cls_id: int = bert.cls_token_id
        self.sep_id: int = bert.sep_token_id
        self.unk_id: int = bert.unk_token_id
        self.dec_id: int = bert.convert_tokens_to_ids(DEC_TOKEN)
        self.enc_id: int = bert.convert_tokens_to_ids(ENC_TOKEN)
        self._first_token = {"text": self.cls_id, "itm": self.enc_id, "decoder": self.dec_id}
        # max_length -> a private copy of the Rust tokenizer set to truncate and pad like
        # `bert(..., padding="longest", truncation=True)`; calling it directly skips
        # transformers' per-call Python (a third of encode's time). One copy per length, set
        # up once, so threads sharing this tokenizer never reconfigure one under another.
        self._backends: dict[int, Any] = {}

    @property
    def vocab_size(self) -> int:
        """Number of ids, `[DEC]` and `[ENC]` included (the model's embedding rows)."""
        return len(self.bert)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """Load a tokenizer saved by `save` or a Hugging Face BLIP/BERT tokenizer folder."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").exists() and not (folder / "vocab.txt").exists():
            raise FileNotFoundError(f"{folder}: no tokenizer.json or vocab.txt; save one with Tokenizer.save")
        return cls(BertTokenizer.from_pretrained(str(folder), local_files_only=True))

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer files (tokenizer.json, vocab.txt, configs) into `folder`."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.bert.save_pretrained(str(folder))

    def encode(
        self,
        texts: Sequence[str],
        mode: Mode = "text",
        max_length: int = 35,
        prompt: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenize `prompt + text` for each text; returns (input_ids, attention_mask), both (B, T) long.

        The first token is `[CLS]`, `[ENC]` or `[DEC]` by `mode`; sequences longer than
        `max_length` tokens are truncated (keeping the final `[SEP]`).
        """
        if mode not in self._first_token:
            raise ValueError(f"mode must be one of {sorted(self._first_token)}, got {mode!r}")
        encodings = self._backend(max_length).encode_batch([prompt + t for t in texts])
        if not encodings:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return empty, empty.clone()
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, T)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)  # (B, T)
        input_ids[:, 0] = self._first_token[mode]
        return input_ids, mask

    def _backend(self, max_length: int) -> Any:
        backend = self._backends.get(max_length)
        if backend is None:
            from tokenizers import Tokenizer as RustTokenizer

            backend = RustTokenizer.from_str(self.bert.backend_tokenizer.to_str())
            backend.enable_truncation(max_length=max_length)
            backend.enable_padding(pad_id=self.pad_id, pad_token=self.bert.pad_token)
            self._backends[max_length] = backend
        return backend

    def prompt_length(self, prompt: str) -> int:
        """Tokens the prompt occupies at the start of a decoder sequence, bos included."""
        return 1 + len(self.bert(prompt, add_special_tokens=False)["input_ids"])

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]], strip_prompt: str = "") -> list[str]:
        """Token ids (B, T) -> captions without special tokens and without the leading prompt."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
        texts = self.bert.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        prefix = strip_prompt.strip().lower()
        out = []
        for text in texts:
            text = text.strip()
            if prefix and text.startswith(prefix):
                text = text[len(prefix) :].strip()
            out.append(text)
        return out


def build_tokenizer(captions: Iterable[str], vocab_size: int = 1000, min_frequency: int = 1) -> Tokenizer:
    """A lowercase WordPiece vocabulary of whole words plus single characters, from `captions`.

    For worlds without bert-base-uncased (this machine has no model hub). Deterministic:
    the same captions give the same ids in every process (the `tokenizers` trainer breaks
    frequency ties by hash order, which differs between processes, so it is not used).
    Ids: BERT's five special tokens (`[PAD]` = 0), every character and its `##`
    continuation (so no word is unknown), the most frequent words (ties by spelling),
    then `[DEC]` and `[ENC]`, the order of BLIP's extended bert-base-uncased. The
    captioner prompt is part of the corpus, so it is whole words, not pieces.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in [*captions, DEFAULT_PROMPT]:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({ch for word in counts for ch in word})
    pieces = [*_BERT_SPECIALS, *chars, *(f"##{ch}" for ch in chars)]
    room = max(vocab_size - len(pieces) - 2, 0)
    ranked = sorted((w for w, n in counts.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w))
    tokens = [*pieces, *ranked[:room], DEC_TOKEN, ENC_TOKEN]
    return Tokenizer(BertTokenizer(vocab={tok: i for i, tok in enumerate(tokens)}, do_lower_case=True))
