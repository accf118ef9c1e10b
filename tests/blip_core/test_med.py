"""MED's three modes, masks and cached decoding on the tiny preset."""

import pytest
import torch

from blip_core.attention import KVCache
from blip_core.config import preset
from blip_core.med import MED


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MED(preset("tiny")).eval()


def _ids(model, rows=2, length=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    t = model.config.text
    return torch.randint(t.eos_token_id + 1, t.vocab_size - 2, (rows, length), generator=g)


def test_shapes_of_every_mode(model):
    cfg = model.config
    pixels = torch.randn(3, 3, 32, 32)
    ids = _ids(model, 3)
    image = model.encode_image(pixels)
    assert image.shape == (3, 1 + cfg.vision.grid**2, cfg.vision.hidden_size)
    assert model.encode_text(ids).shape == (3, 7, cfg.text.hidden_size)
    assert model.itm_logits(image, ids).shape == (3, 2)
    assert model.lm_logits(image, ids).shape == (3, 7, cfg.text.vocab_size)
    feats = model.image_features(image)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3))
    assert model.itc_similarity(pixels[:2], ids).shape == (2, 3)


def test_unimodal_mode_ignores_the_image_and_grounded_mode_does_not(model):
    ids = _ids(model)
    a, b = model.encode_image(torch.randn(2, 3, 32, 32)), model.encode_image(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(model.itm_logits(a, ids), model.itm_logits(b, ids))
    assert torch.equal(model.encode_text(ids), model.encode_text(ids))


def test_padding_does_not_change_real_tokens(model):
    ids = _ids(model, 1, 5)
    padded = torch.cat([ids, torch.full((1, 3), model.config.text.pad_token_id)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    torch.testing.assert_close(model.itm_logits(image, padded, mask), model.itm_logits(image, ids))
    torch.testing.assert_close(model.lm_logits(image, padded, mask)[:, :5], model.lm_logits(image, ids))


def test_decoder_is_causal(model):
    ids = _ids(model, 1, 6)
    changed = ids.clone()
    changed[0, 4] = ids[0, 4] + 1
    image = model.encode_image(torch.randn(1, 3, 32, 32))
    a, b = model.lm_logits(image, ids), model.lm_logits(image, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_cached_decoding_matches_full_forward(model):
    ids = _ids(model, 2, 6)
    image = model.encode_image(torch.randn(2, 3, 32, 32))
    full = model.lm_logits(image, ids)
    dec, t = model.text_decoder, model.config.text
    caches = [KVCache.empty(2, t.num_heads, 6, t.hidden_size // t.num_heads, image) for _ in dec.layers]
    kv = dec.image_kv(image)
    steps = [model.lm_head(dec(ids[:, :2], image_kv=kv, caches=caches))]
    for i in range(2, 6):
        steps.append(model.lm_head(dec(ids[:, i : i + 1], image_kv=kv, caches=caches)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_image_index_scores_each_image_once(model):
    ids = _ids(model, 4)
    pixels = torch.randn(2, 3, 32, 32)
    for index in (torch.tensor([0, 0, 1, 1]), torch.tensor([1, 0, 0, 1])):  # shared keys / gathered keys
        expanded = model.itm_probability(pixels[index], ids)
        torch.testing.assert_close(model.itm_probability(pixels, ids, image_index=index), expanded)


def test_first_only_is_the_first_row_of_the_full_output(model):
    ids = _ids(model, 3)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    image = model.encode_image(torch.randn(3, 3, 32, 32))
    full = model.grounded_text(image, ids, mask)
    torch.testing.assert_close(model.grounded_text(image, ids, mask, first_only=True), full[:, :1])
    torch.testing.assert_close(model.encode_text(ids, mask, first_only=True), model.encode_text(ids, mask)[:, :1])


def test_other_image_sizes_resize_position_embeddings(model):
    out = model.encode_image(torch.randn(1, 3, 48, 48))
    assert out.shape[1] == 1 + 6 * 6
