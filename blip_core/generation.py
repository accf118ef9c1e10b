"""Caption generation for MED: greedy, beam search and nucleus sampling with a KV cache.

Semantics follow transformers' `generate` as BLIP's captioner calls it, so the same
weights give the same token ids:
- sequences start with bos (`[DEC]`), then the optional prompt; `max_length` and
  `min_length` count every token including bos and prompt; `[SEP]` ends a caption and
  finished rows are padded with the pad id;
- logits processing order: repetition penalty -> min length -> temperature -> top-k ->
  top-p; beam search applies the processors to log-probabilities and uses
  transformers' vectorised beam search (length penalty on generated tokens,
  `early_stopping=False` heuristic).

The image's cross-attention keys/values are computed once per image and shared by all
steps and by all beams / captions of that image; self-attention keys/values grow in a
preallocated cache. Nucleus sampling draws from one `torch.Generator` per image
(`seeds`), so a caption does not depend on which batch its image was in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from blip_core.attention import KVCache
from blip_core.config import MEDConfig
from blip_core.text import LMHead, TextTransformer

_NEG = -1.0e9  # transformers' beam-search "impossible" score
STRATEGIES = ("greedy", "beam", "nucleus")


class Captioner(Protocol):
    """What decoding needs of a model (`blip_core.med.MED` is one); typed here so that
    this module sits below `med` and `MED.generate` can call it without an import circle."""

    config: MEDConfig
    text_decoder: TextTransformer
    lm_head: LMHead

    def encode_image(self, pixel_values: Tensor) -> Tensor: ...


@dataclass
class DecodeSettings:
    """Everything that shapes a caption besides the image and the weights."""

    max_length: int = 20  # tokens including bos and prompt
    min_length: int = 5  # [SEP] is forbidden while the sequence is shorter than this
    num_beams: int = 3
    top_p: float = 0.9
    top_k: int = 0  # 0 = off (BLIP's released code ran with transformers' default 50)
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0  # beam search: score = sum log p / generated_len ** length_penalty
    num_captions: int = 1


class _CachedDecoder:
    """MED's causal decoder, one step at a time, over `rows` = images x rows_per_image."""

    def __init__(self, model: Captioner, image_embeds: Tensor, rows_per_image: int, max_length: int):
        dec, t = model.text_decoder, model.config.text
        self.model = model
        # projected once per image; each image's rows (beams / captions) share them
        self.image_kv = dec.image_kv(image_embeds)
        rows = image_embeds.shape[0] * rows_per_image
        head_dim = t.hidden_size // t.num_heads
        self.caches = [KVCache.empty(rows, t.num_heads, max_length, head_dim, image_embeds) for _ in dec.layers]

    def step(self, new_ids: Tensor) -> Tensor:
        """Feed `new_ids` (R, T_new); next-token logits (R, V) in float32."""
        hidden = self.model.text_decoder(new_ids, image_kv=self.image_kv, caches=self.caches)
        return self.model.lm_head(hidden[:, -1]).float()

    def reorder(self, rows: Tensor) -> None:
        for cache in self.caches:
            cache.reorder(rows)

    def keep_images(self, images: Tensor, rows_per_image: int) -> None:
        """Drop every image not in `images` (indices into the current images) and its rows."""
        self.image_kv = [(k.index_select(0, images), v.index_select(0, images)) for k, v in self.image_kv]
        self.reorder(_rows_of(images, rows_per_image))


def _rows_of(images: Tensor, rows_per_image: int) -> Tensor:
    """Row indices (image-major) of `images`."""
    offsets = torch.arange(rows_per_image, device=images.device)
    return (images[:, None] * rows_per_image + offsets).reshape(-1)


def _start_ids(model: Captioner, rows: int, prompt_ids: Tensor | None, device: torch.device) -> Tensor:
    """(R, P): bos followed by the prompt tokens (the same prompt for every row)."""
    bos = torch.tensor([model.config.text.bos_token_id], device=device)
    prompt = bos if prompt_ids is None else torch.cat([bos, prompt_ids.reshape(-1).to(device)])
    return prompt[None].expand(rows, -1).contiguous()


def _repetition_penalty(scores: Tensor, seqs: Tensor, penalty: float) -> Tensor:
    """Divide positive / multiply negative scores of every token already in `seqs` (CTRL)."""
    if penalty == 1.0:
        return scores
    seen = scores.gather(1, seqs)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return scores.scatter(1, seqs, seen)


def _process(scores: Tensor, seqs: Tensor, s: DecodeSettings, eos: int) -> Tensor:
    """Repetition penalty then min length (shared by every strategy)."""
    scores = _repetition_penalty(scores, seqs, s.repetition_penalty)
    if seqs.shape[1] < s.min_length:
        scores = scores.clone()
        scores[:, eos] = -float("inf")
    return scores


def _ascending_order(scores: Tensor) -> Tensor:
    """Indices that sort each row ascending. On CPU numpy's sort is several times faster
    than torch's; the sorted values are the same (only exactly tied scores may swap)."""
    if scores.device.type != "cpu":
        return scores.argsort(dim=-1)
    return torch.from_numpy(np.argsort(scores.numpy(), axis=-1))


def _warp(scores: Tensor, s: DecodeSettings) -> Tensor:
    """Temperature, top-k and top-p (nucleus) filtering of (R, V) scores."""
    if s.temperature != 1.0:
        scores = scores / s.temperature
    if s.top_k > 0:
        kth = scores.topk(min(s.top_k, scores.shape[-1])).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if s.top_p < 1.0:
        order = _ascending_order(scores)
        sorted_scores = scores.gather(1, order)
        drop = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - s.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def _sample(probs: Tensor, generators: list[torch.Generator] | None, rows_per_image: int) -> Tensor:
    """One token per row (R,); image i's rows draw from `generators[i]` only.

    Same draw as `torch.multinomial(probs_i, 1, generator=g_i)` (which samples
    `argmax(p / q)` with q ~ Exp(1), one q per vocabulary entry), done for all rows at
    once after each image's exponentials come from its own generator.
    """
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(1)
    q = torch.empty_like(probs)
    for i, g in enumerate(generators):
        q[i * rows_per_image : (i + 1) * rows_per_image].exponential_(generator=g)
    return (probs / q).argmax(dim=-1)


def _greedy_or_sample(
    decoder: _CachedDecoder,
    start: Tensor,
    s: DecodeSettings,
    eos: int,
    pad: int,
    generators: list[torch.Generator] | None,
    sample: bool,
) -> Tensor:
    """Greedy or nucleus decoding; images whose captions all ended leave the batch.

    Dropping finished images is exact: their tokens are final, and every other image
    draws from its own generator (with the global RNG, used without `seeds`, all rows
    stay so the draws follow transformers' order).
    """
    g, dev = s.num_captions, start.device
    seqs = start  # (R, L) every row; `active` rows are the ones still decoding
    unfinished = torch.ones(start.shape[0], dtype=torch.bool, device=dev)
    images = torch.arange(start.shape[0] // g, device=dev)  # images still in the batch
    rows = _rows_of(images, g)
    may_drop = not sample or generators is not None
    logits = decoder.step(start)
    while True:
        scores = _process(logits, seqs.index_select(0, rows), s, eos)
        if sample:
            gens = None if generators is None else [generators[i] for i in images.tolist()]
            nxt = _sample(_warp(scores, s).softmax(dim=-1), gens, g)
        else:
            nxt = scores.argmax(dim=-1)
        nxt = torch.where(unfinished[rows], nxt, torch.full_like(nxt, pad))
        step = torch.full_like(unfinished, pad, dtype=seqs.dtype).index_copy(0, rows, nxt)
        seqs = torch.cat([seqs, step[:, None]], dim=1)
        unfinished[rows] &= nxt != eos
        if seqs.shape[1] >= s.max_length or not bool(unfinished.any()):
            return seqs
        done = ~unfinished[rows].view(-1, g).any(dim=1)  # per image in the batch
        if may_drop and int(done.sum()) * 4 >= len(images):  # shrink when a quarter has ended
            keep = (~done).nonzero().squeeze(1)
            decoder.keep_images(keep, g)
            images, rows = images[keep], _rows_of(images[keep], g)
        logits = decoder.step(seqs[rows, -1:])


def _beam_search(decoder: _CachedDecoder, start: Tensor, s: DecodeSettings, eos: int, pad: int) -> Tensor:
    """transformers' vectorised beam search (early_stopping=False), on our cached decoder."""
    k, prompt_len, dev = s.num_beams, start.shape[1], start.device
    b = start.shape[0] // k
    keep = 2 * k  # candidates kept per step so that k can continue after some end
    # transformers fills unused positions with `pad or eos`: with pad id 0 that is eos
    running = torch.full((b, k, s.max_length), pad or eos, dtype=torch.long, device=dev)
    running[:, :, :prompt_len] = start.view(b, k, prompt_len)
    finished = running.clone()
    run_scores = torch.zeros(b, k, device=dev)
    run_scores[:, 1:] = _NEG  # all beams start identical: only the first may expand
    fin_scores = torch.full((b, k), _NEG, device=dev)
    fin_lengths = torch.zeros(b, k, dtype=torch.long, device=dev)
    is_fin = torch.zeros(b, k, dtype=torch.bool, device=dev)
    can_improve = torch.ones(b, 1, dtype=torch.bool, device=dev)
    top_k_mask = torch.arange(keep, device=dev) < k
    cur = prompt_len
    logits = decoder.step(start)
    while True:
        vocab = logits.shape[-1]
        logp = _process(F.log_softmax(logits, dim=-1), running[:, :, :cur].reshape(b * k, cur), s, eos)
        logp = (logp.view(b, k, vocab) + run_scores[:, :, None]).view(b, k * vocab)
        cand_scores, cand_index = logp.topk(keep, dim=1)  # (B, 2K)
        parent, token = cand_index // vocab, cand_index % vocab
        cand = running.gather(1, parent[:, :, None].expand(-1, -1, s.max_length)).clone()
        cand[:, :, cur] = token
        ends = (token == eos) | (cur + 1 >= s.max_length)

        # beams that continue: the best k candidates that did not end
        cont_scores = cand_scores + ends.float() * _NEG
        pick = cont_scores.topk(k, dim=1).indices
        running = cand.gather(1, pick[:, :, None].expand(-1, -1, s.max_length))
        run_scores = cont_scores.gather(1, pick)
        rows = (parent.gather(1, pick) + torch.arange(b, device=dev)[:, None] * k).reshape(-1)

        # beams that end: merged with the finished ones, best k kept
        just = ends & top_k_mask[None, :]
        end_scores = cand_scores / float(cur + 1 - prompt_len) ** s.length_penalty
        end_scores = end_scores + (~can_improve).float() * _NEG + (~just).float() * _NEG
        merged_scores = torch.cat([fin_scores, end_scores], dim=1)
        best = merged_scores.topk(k, dim=1).indices
        finished = torch.cat([finished, cand], dim=1).gather(1, best[:, :, None].expand(-1, -1, s.max_length))
        fin_scores = merged_scores.gather(1, best)
        cand_lengths = torch.full_like(parent, cur + 1)
        fin_lengths = torch.cat([fin_lengths, cand_lengths], dim=1).gather(1, best)
        is_fin = torch.cat([is_fin, just], dim=1).gather(1, best)

        decoder.reorder(rows)
        cur += 1
        best_running = run_scores[:, :1] / float(cur - prompt_len) ** s.length_penalty
        worst_fin = torch.where(is_fin, fin_scores.min(dim=1, keepdim=True).values, torch.full_like(fin_scores, _NEG))
        can_improve &= (best_running > worst_fin).any(dim=1, keepdim=True)
        if not bool(can_improve.any()) or bool(ends.all()):
            break
        logits = decoder.step(running[:, :, cur - 1].reshape(b * k, 1))
    out = finished[:, : s.num_captions].reshape(b * s.num_captions, s.max_length)
    return out[:, : int(fin_lengths[:, : s.num_captions].max())]


@torch.no_grad()
def generate(model: Captioner, pixel_values: Tensor, strategy: str = "greedy", **settings) -> Tensor:
    """Caption ids (B * num_captions, L) of the images `pixel_values` (B, 3, H, W); the
    settings are `generate_from_embeds`'s."""
    return generate_from_embeds(model, model.encode_image(pixel_values), strategy, **settings)


@torch.no_grad()
def generate_from_embeds(
    model: Captioner,
    image_embeds: Tensor,
    strategy: str = "greedy",
    max_length: int = 20,
    min_length: int = 5,
    num_beams: int = 3,
    top_p: float = 0.9,
    top_k: int = 0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    num_captions: int = 1,
    seeds: list[int] | None = None,
    prompt_ids: Tensor | None = None,
) -> Tensor:
    """Caption ids (B * num_captions, L), image-major, bos first, pad after `[SEP]`, for
    the vision tokens `image_embeds` (B, T, Dv) the decoder cross-attends to: one image's
    (T = 1 + N) or a video's frames concatenated (T = n (1 + N), `blip_core.video`).

    `prompt_ids` (P,) are tokens that follow bos for every image (no `[CLS]`/`[SEP]`).
    `seeds` (nucleus only): one seed per image; image i's captions depend only on its
    pixels, the weights, the settings and `seeds[i]` (batched matmuls may round the last
    bit differently at another batch size, which changes a draw with negligible odds).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    s = DecodeSettings(
        max_length, min_length, num_beams, top_p, top_k, temperature, repetition_penalty, length_penalty,
        num_captions,
    )
    b = image_embeds.shape[0]
    if strategy == "greedy" and num_captions != 1:
        raise ValueError("greedy decoding gives one caption per image; use nucleus or beam for num_captions > 1")
    if strategy == "beam" and num_captions > num_beams:
        raise ValueError(f"num_captions={num_captions} exceeds num_beams={num_beams}")
    if seeds is not None and len(seeds) != b:
        raise ValueError(f"got {len(seeds)} seeds for {b} images; pass one seed per image")
    t = model.config.text
    device = image_embeds.device
    rows_per_image = num_beams if strategy == "beam" else num_captions
    start = _start_ids(model, b * rows_per_image, prompt_ids, device)
    if start.shape[1] >= max_length:
        raise ValueError(f"max_length={max_length} leaves no room after bos + {start.shape[1] - 1} prompt tokens")
    decoder = _CachedDecoder(model, image_embeds, rows_per_image, max_length)
    if strategy == "beam":
        return _beam_search(decoder, start, s, t.eos_token_id, t.pad_token_id)
    generators = None
    if seeds is not None:
        generators = [torch.Generator(device=device).manual_seed(int(x)) for x in seeds]
    return _greedy_or_sample(
        decoder, start, s, t.eos_token_id, t.pad_token_id, generators, sample=strategy == "nucleus"
    )
