"""Zero-shot video on the tiny preset: a static clip scores exactly as its image; shapes; batching."""

import copy

import pytest
import torch

from blip_core.config import preset
from blip_core.med import MED
from blip_core.video import (
    caption_videos,
    embed_videos,
    encode_frames,
    video_features,
    video_itc_similarity,
    video_itm_probability,
)

FRAMES = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MED(preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():  # peakier than the init, so differences would show
            if p.dim() >= 2:
                p.mul_(4)
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def texts(model):
    g = torch.Generator().manual_seed(2)
    t = model.config.text
    ids = torch.randint(5, 200, (3, 9), generator=g)
    itc_ids, itm_ids = ids.clone(), ids.clone()
    itc_ids[:, 0], itm_ids[:, 0] = t.cls_token_id, t.enc_token_id
    itc_ids[:, -1] = itm_ids[:, -1] = t.eos_token_id
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0  # one padded text
    return itc_ids, itm_ids, mask


def _static(images: torch.Tensor, n: int = FRAMES) -> torch.Tensor:
    return images[:, None].expand(-1, n, -1, -1, -1).contiguous()  # (B, n, 3, S, S)


def _image_and_static_scores(model, images, texts):
    itc_ids, itm_ids, mask = texts
    with torch.no_grad():
        image = (model.itc_similarity(images, itc_ids, mask), model.itm_probability(images, itm_ids, mask),
                 model.itm_logits(model.encode_image(images), itm_ids, mask))  # fmt: skip
        clip = _static(images)
        video = (video_itc_similarity(model, clip, itc_ids, mask), video_itm_probability(model, clip, itm_ids, mask),
                 model.itm_logits(embed_videos(model, clip).tokens, itm_ids, mask))  # fmt: skip
    return image, video


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
def test_static_clip_scores_exactly_as_its_image(model, images, texts, dtype, atol):
    """n identical frames: ITC similarity, ITM probability and ITM logits equal the image's.
    Float64 shows the identity is exact up to rounding; float32 rounds at ~1e-5 here."""
    m = copy.deepcopy(model).to(dtype)
    (sim, p, logits), (video_sim, video_p, video_logits) = _image_and_static_scores(m, images.to(dtype), texts)
    torch.testing.assert_close(video_sim, sim, rtol=0, atol=atol)
    torch.testing.assert_close(video_p, p, rtol=0, atol=atol)
    torch.testing.assert_close(video_logits, logits, rtol=0, atol=atol * 10)
    other = m.itm_probability(images.to(dtype).flip(0), texts[1], texts[2])
    assert not torch.allclose(video_p, other, atol=1e-3)  # the check can fail


def test_static_clip_captions_as_its_image(model, images):
    kw = {"max_length": 10, "min_length": 3}
    assert torch.equal(caption_videos(model, _static(images), "greedy", **kw), model.generate(images, "greedy", **kw))
    beam = {"num_beams": 3, **kw}
    assert torch.equal(caption_videos(model, _static(images, 4), "beam", **beam), model.generate(images, "beam", **beam))


def test_feature_is_normalised_mean_of_projections_and_tokens_concatenate(model):
    frames = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = embed_videos(model, frames)
        per_frame = torch.stack([model.encode_image(frames[:, f]) for f in range(4)], dim=1)  # (2, 4, 17, Dv)
    tokens = per_frame.shape[2]
    assert embeds.tokens.shape == (2, 4 * tokens, model.config.vision.hidden_size)
    torch.testing.assert_close(embeds.tokens[:, tokens : 2 * tokens], per_frame[:, 1], rtol=0, atol=1e-5)
    expected = torch.nn.functional.normalize(model.vision_proj(per_frame[:, :, 0]).mean(1), dim=-1)
    torch.testing.assert_close(embeds.features, expected, rtol=0, atol=1e-6)
    # not a mean of normalised per-frame features (BLIP projects, averages, then normalises)
    assert embeds.features.shape == (2, model.config.embed_dim)
    torch.testing.assert_close(video_features(model, per_frame), embeds.features, rtol=0, atol=1e-6)


def test_frames_of_several_clips_go_through_the_encoder_once(model):
    calls = []
    handle = model.vision.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            encode_frames(model, torch.randn(5, 8, 3, 32, 32))
    finally:
        handle.remove()
    assert calls == [40]
