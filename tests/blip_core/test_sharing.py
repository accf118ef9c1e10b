"""MED shares everything but self-attention between encoder and decoder, visibly."""

import torch

from blip_core.config import preset
from blip_core.med import MED


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_decoder_layers_are_handed_the_encoder_modules():
    model = MED(preset("tiny"))
    enc, dec = model.text_encoder, model.text_decoder
    assert dec.embeddings is enc.embeddings
    assert model.lm_head.decoder.weight is enc.embeddings.word_embeddings.weight
    for e, d in zip(enc.layers, dec.layers, strict=True):
        assert d.ffn is e.ffn
        assert d.cross_attn is e.cross_attn
        assert d.self_attn is not e.self_attn
        assert not e.causal and d.causal


def test_parameter_count_is_unshared_minus_exactly_the_shared_parts():
    model = MED(preset("tiny"))
    enc, dec = model.text_encoder, model.text_decoder
    # counted as if nothing were shared: every module's own parameters, duplicates included
    unshared = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    shared = _count(enc.embeddings)  # decoder embeddings
    shared += enc.embeddings.word_embeddings.weight.numel()  # the tied LM decoder weight
    shared += sum(_count(layer.cross_attn) + _count(layer.ffn) for layer in enc.layers)
    assert _count(model) == unshared - shared
    # and the decoder owns exactly its self-attentions
    own = sum(_count(layer.self_attn) for layer in dec.layers)
    assert _count(model) == _count(model.vision) + _count(enc) + own + _count(model.lm_head) - (
        enc.embeddings.word_embeddings.weight.numel()
    ) + sum(_count(m) for m in (model.vision_proj, model.text_proj, model.itm_head)) + 1


def test_base_preset_matches_the_papers_shared_size():
    # BLIP reports 252M parameters for ViT-B with "all but self-attention" shared (224 px).
    with torch.device("meta"):
        model = MED(preset("base").with_image_size(224))
    assert abs(_count(model) / 1e6 - 252) < 3
