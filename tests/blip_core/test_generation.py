"""Generation on the tiny preset: cache correctness, lengths, seeding per image, prompts."""

import pytest
import torch

from blip_core.config import preset
from blip_core.med import MED


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MED(preset("tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():  # peakier distributions than the init's near-uniform ones
            if p.dim() >= 2:
                p.mul_(4)
        m.lm_head.decoder.bias[m.config.text.eos_token_id] = 6.0  # captions end at varied lengths
    return m


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _strip(row: torch.Tensor, pad: int) -> list[int]:
    ids = row.tolist()
    while ids and ids[-1] == pad:
        ids.pop()
    return ids


def test_greedy_equals_uncached_argmax_decoding(model, pixels):
    out = model.generate(pixels, "greedy", max_length=12, min_length=3)
    t = model.config.text
    image = model.encode_image(pixels)
    seqs = torch.full((4, 1), t.bos_token_id)
    done = torch.zeros(4, dtype=torch.bool)
    with torch.no_grad():
        while seqs.shape[1] < out.shape[1]:
            logits = model.lm_logits(image, seqs)[:, -1]
            if seqs.shape[1] < 3:
                logits[:, t.eos_token_id] = -float("inf")
            nxt = torch.where(done, t.pad_token_id, logits.argmax(-1))
            seqs = torch.cat([seqs, nxt[:, None]], 1)
            done |= nxt == t.eos_token_id
    assert torch.equal(out, seqs)


def test_lengths_count_bos_and_min_length_holds(model, pixels):
    t = model.config.text
    out = model.generate(pixels, "greedy", max_length=9, min_length=6)
    assert out.shape[1] <= 9 and bool((out[:, 0] == t.bos_token_id).all())
    for row in out:
        ids = _strip(row, t.pad_token_id)
        if t.eos_token_id in ids:
            assert ids.index(t.eos_token_id) >= 5  # position 5 is the 6th token
            assert ids[-1] == t.eos_token_id
    ended = [t.eos_token_id in row.tolist() for row in model.generate(pixels, "greedy", max_length=12, min_length=2)]
    assert any(ended), "the fixture should make some captions end early"


def test_nucleus_caption_does_not_depend_on_its_batch(model, pixels):
    pad = model.config.text.pad_token_id
    kw = dict(max_length=12, min_length=3, top_p=0.9, repetition_penalty=1.1, num_captions=2)
    together = model.generate(pixels, "nucleus", seeds=[10, 11, 12, 13], **kw)
    assert together.shape[0] == 8
    for i in (0, 3):
        alone = model.generate(pixels[i : i + 1], "nucleus", seeds=[10 + i], **kw)
        for c in range(2):
            assert _strip(alone[c], pad) == _strip(together[2 * i + c], pad)
    again = model.generate(pixels, "nucleus", seeds=[10, 11, 12, 13], **kw)
    assert torch.equal(again, together)
    other = model.generate(pixels, "nucleus", seeds=[20, 21, 22, 23], **kw)
    assert not torch.equal(other, together)


def test_beam_search_returns_its_best_beams(model, pixels):
    out = model.generate(pixels, "beam", num_beams=3, num_captions=2, max_length=10, min_length=3)
    assert out.shape[0] == 8 and out.shape[1] <= 10
    assert not torch.equal(out[0::2], out[1::2])  # two distinct beams per image


def test_prompt_follows_bos(model, pixels):
    prompt = torch.tensor([7, 8, 9])
    out = model.generate(pixels[:2], "greedy", max_length=10, min_length=1, prompt_ids=prompt)
    assert out[:, 1:4].tolist() == [[7, 8, 9]] * 2


def test_bad_arguments_are_named(model, pixels):
    with pytest.raises(ValueError, match="strategy"):
        model.generate(pixels, "topk")
    with pytest.raises(ValueError, match="one seed per image"):
        model.generate(pixels, "nucleus", seeds=[1])
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(pixels, "beam", num_beams=2, num_captions=3)
