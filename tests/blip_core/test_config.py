"""MEDConfig presets, dict round trip and tokenizer-driven ids."""

import json
from dataclasses import dataclass

import pytest

from blip_core.config import MEDConfig, preset


@pytest.mark.parametrize("name", ["tiny", "base", "large"])
def test_preset_round_trips_through_json(name):
    cfg = preset(name)
    assert MEDConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_presets_have_the_papers_shapes():
    base, large = preset("base"), preset("large")
    assert (base.vision.hidden_size, base.vision.num_layers, base.vision.patch_size) == (768, 12, 16)
    assert (large.vision.hidden_size, large.vision.num_layers, large.vision.num_heads) == (1024, 24, 16)
    assert base.text.vocab_size == 30524 and base.vision.image_size == 384
    assert preset("tiny").vision.hidden_size != preset("tiny").text.hidden_size


def test_unknown_preset_and_unknown_keys_fail_loudly():
    with pytest.raises(ValueError, match="tiny"):
        preset("huge")
    with pytest.raises(TypeError):
        MEDConfig.from_dict({"vision": {"widht": 3}})


def test_with_tokenizer_takes_every_special_id():
    @dataclass
    class Ids:
        vocab_size: int = 77
        pad_id: int = 1
        cls_id: int = 2
        sep_id: int = 3
        enc_id: int = 4
        dec_id: int = 5

    t = preset("tiny").with_tokenizer(Ids()).text
    assert (t.vocab_size, t.pad_token_id, t.cls_token_id, t.eos_token_id, t.enc_token_id, t.bos_token_id) == (
        77, 1, 2, 3, 4, 5,
    )


def test_special_ids_outside_the_vocabulary_are_refused():
    from blip_core.med import MED

    cfg = preset("tiny")
    cfg.text.bos_token_id = cfg.text.vocab_size
    with pytest.raises(ValueError, match="bos_token_id"):
        MED(cfg)


def test_tiny_init_gives_captions_distinct_itc_features() -> None:
    """At width 64, BERT's 0.02 init makes every caption's [CLS] feature nearly the same
    (ITC then sits at log(B) for hundreds of steps); the tiny preset's init_std must not."""
    import dataclasses

    import torch

    from blip_core import MED
    from blip_core.tokenizer import build_tokenizer

    captions = ["a red circle on the left", "two shapes", "a small blue square above a green triangle", "click here"]
    tok = build_tokenizer(captions * 2, vocab_size=200)
    ids, mask = tok.encode(captions, mode="text")
    spread = {}
    for std in (0.02, preset("tiny").init_std):
        torch.manual_seed(0)
        model = MED(dataclasses.replace(preset("tiny"), init_std=std).with_tokenizer(tok)).eval()
        with torch.no_grad():
            feats = model.text_features(model.encode_text(ids, mask))  # (4, E)
        spread[std] = feats.std(0).mean().item()
    assert spread[preset("tiny").init_std] > 10 * spread[0.02]
    assert spread[preset("tiny").init_std] > 0.02
