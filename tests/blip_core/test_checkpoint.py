"""Our checkpoint folder: exact round trip, tokenizer alongside, resized positions, no pickles."""

import json

import pytest
import torch

from blip_core import load, save
from blip_core.config import preset
from blip_core.med import MED
from blip_core.tokenizer import build_tokenizer

CAPTIONS = ["a red square on a blue field", "two green circles", "a small yellow triangle"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tok = build_tokenizer(CAPTIONS, vocab_size=120)
    torch.manual_seed(0)
    model = MED(preset("tiny").with_tokenizer(tok)).eval()
    with torch.no_grad():
        model.temp.fill_(0.123)
    folder = tmp_path_factory.mktemp("ckpt")
    save(model, tok, folder)
    return model, tok, folder


def test_round_trip_is_exact(saved):
    model, tok, folder = saved
    loaded = load(folder)
    assert loaded.format == "capfilt-med" and len(loaded.fingerprint) == 16
    assert loaded.model.config == model.config
    theirs = dict(loaded.model.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    # sharing and tying survive loading
    m = loaded.model
    assert m.lm_head.decoder.weight is m.text_encoder.embeddings.word_embeddings.weight
    assert m.text_decoder.layers[0].ffn is m.text_encoder.layers[0].ffn
    assert loaded.tokenizer.dec_id == tok.dec_id == m.config.text.bos_token_id
    ids, mask = tok.encode(CAPTIONS, mode="itm", max_length=12)
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.equal(m.itm_probability(pixels, ids, mask), model.itm_probability(pixels, ids, mask))


def test_folder_holds_no_pickles_and_fingerprint_follows_weights(saved, tmp_path):
    model, tok, folder = saved
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    assert json.loads((folder / "config.json").read_text())["format"] == "capfilt-med"
    with torch.no_grad():
        model.itm_head.bias.add_(1.0)
    save(model, tok, tmp_path)
    assert load(tmp_path).fingerprint != load(folder).fingerprint
    with torch.no_grad():
        model.itm_head.bias.sub_(1.0)


def test_loading_at_another_image_size_interpolates_positions(saved):
    _, _, folder = saved
    big = load(folder, image_size=48).model
    assert big.config.vision.image_size == 48
    assert big.vision.embeddings.position_embedding.shape[1] == 1 + 6 * 6
    assert big.encode_image(torch.randn(1, 3, 48, 48)).shape[1] == 37


def test_unknown_folder_is_refused_with_its_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="config.json"):
        load(tmp_path)
