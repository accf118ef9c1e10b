"""Parity with transformers' BLIP on the same random weights (no hub: save_pretrained into tmp).

Reference models are built by transformers itself with random weights, saved, and loaded
by `blip_core.load`; then our export is loaded back by transformers' own classes.
"""

import warnings

import pytest
import torch
import transformers

from blip_core import export_hf, load

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

VOCAB, PAD, CLS, SEP, BOS = 160, 0, 1, 2, 158  # [ENC] = 159

# non-default heads, eps, image / patch sizes, vision width != text width
CONFIGS = {
    "narrow": dict(
        vision=dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=3,
                    image_size=48, patch_size=12, layer_norm_eps=1e-6),
        text=dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=5,
                  layer_norm_eps=1e-7),
    ),
    "wide-text": dict(
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                    image_size=40, patch_size=10),
        text=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=8),
    ),
}


def _hf_config(spec, kind):
    text = dict(spec["text"], vocab_size=VOCAB, max_position_embeddings=40, pad_token_id=PAD,
                bos_token_id=BOS, sep_token_id=SEP, eos_token_id=SEP, is_decoder=True)
    cfg = transformers.BlipConfig(text_config=text, vision_config=spec["vision"], image_text_hidden_size=24)
    cfg.architectures = [kind]
    return cfg


def _build_hf(spec, kind, folder):
    torch.manual_seed(len(kind))
    model = getattr(transformers, kind)(_hf_config(spec, kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)  # peaky distributions: no near-ties for argmax / top-k
            elif "LayerNorm" not in name and "layer_norm" not in name:
                p.normal_(0, 0.1)
        if kind == "BlipForConditionalGeneration":
            model.text_decoder.cls.predictions.bias[SEP] += 3.0  # captions end at varied lengths
    model.save_pretrained(folder)
    return getattr(transformers, kind).from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    spec = CONFIGS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_r = _build_hf(spec, "BlipForImageTextRetrieval", root / "retrieval")
    hf_c = _build_hf(spec, "BlipForConditionalGeneration", root / "captioning")
    ours_r, ours_c = load(root / "retrieval"), load(root / "captioning")
    assert (ours_r.format, ours_c.format) == ("hf-retrieval", "hf-captioning")
    size = spec["vision"]["image_size"]
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    return dict(hf_r=hf_r, hf_c=hf_c, ours_r=ours_r.model, ours_c=ours_c.model, pixels=pixels, root=root, spec=spec)


def _texts():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(SEP + 1, BOS, (3, 9), generator=g)
    ids[:, 0] = BOS + 1  # [ENC] first, as the tokenizer's itm mode gives it
    ids[:, -1] = SEP
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = PAD
    return ids, mask


@torch.no_grad()
def test_itm_and_itc_match(pair):
    ids, mask = _texts()
    hf = pair["hf_r"](input_ids=ids, pixel_values=pair["pixels"], attention_mask=mask)
    ours = pair["ours_r"].itm_probability(pair["pixels"], ids, mask)
    torch.testing.assert_close(ours, hf.itm_score.softmax(-1)[:, 1], atol=1e-5, rtol=0)
    # two captions per image, each image encoded once
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    two = torch.cat([ids, ids.flip(0)])[torch.tensor([0, 3, 1, 4, 2, 5])]
    two_mask = torch.cat([mask, mask.flip(0)])[torch.tensor([0, 3, 1, 4, 2, 5])]
    hf = pair["hf_r"](input_ids=two, pixel_values=pair["pixels"][index], attention_mask=two_mask)
    ours = pair["ours_r"].itm_probability(pair["pixels"], two, two_mask, image_index=index)
    torch.testing.assert_close(ours, hf.itm_score.softmax(-1)[:, 1], atol=1e-5, rtol=0)
    ids[:, 0] = CLS
    hf = pair["hf_r"](input_ids=ids, pixel_values=pair["pixels"], attention_mask=mask, use_itm_head=False)
    torch.testing.assert_close(pair["ours_r"].itc_similarity(pair["pixels"], ids, mask), hf.itm_score,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw", [dict(max_length=12, min_length=4), dict(max_length=15, min_length=2,
                                                                        repetition_penalty=1.3)])
@torch.no_grad()
def test_greedy_and_beam_ids_match(pair, kw):
    px, hf, ours = pair["pixels"], pair["hf_c"], pair["ours_c"]
    assert torch.equal(ours.generate(px, "greedy", **kw), hf.generate(px, **kw))
    assert torch.equal(ours.generate(px, "beam", num_beams=3, **kw), hf.generate(px, num_beams=3, **kw))
    two = ours.generate(px, "beam", num_beams=3, num_captions=2, **kw)
    assert torch.equal(two, hf.generate(px, num_beams=3, num_return_sequences=2, **kw))


@torch.no_grad()
def test_nucleus_matches_same_seed_single_image(pair):
    px, hf, ours = pair["pixels"], pair["hf_c"], pair["ours_c"]
    kw = dict(max_length=14, min_length=3, repetition_penalty=1.1, temperature=0.9)
    batch = ours.generate(px, "nucleus", top_p=0.9, num_captions=2, seeds=[7, 8, 9], **kw)
    for i in range(3):
        torch.manual_seed(7 + i)
        ref = hf.generate(px[i : i + 1], do_sample=True, top_p=0.9, top_k=0, num_return_sequences=2, **kw)
        rows = batch[2 * i : 2 * i + 2]
        assert torch.equal(rows[:, : ref.shape[1]], ref)
        assert bool((rows[:, ref.shape[1] :] == PAD).all())


@torch.no_grad()
def test_prompted_generation_matches(pair):
    px, hf, ours = pair["pixels"], pair["hf_c"], pair["ours_c"]
    prompt = torch.tensor([5, 6, 7])
    processor_ids = torch.cat([torch.tensor([CLS]), prompt, torch.tensor([SEP])])[None].repeat(3, 1)
    ref = hf.generate(px, input_ids=processor_ids, max_length=12, min_length=6)
    assert torch.equal(ours.generate(px, "greedy", max_length=12, min_length=6, prompt_ids=prompt), ref)


@torch.no_grad()
def test_export_loads_in_transformers_and_round_trips(pair, tmp_path):
    px, ours_r, ours_c = pair["pixels"], pair["ours_r"], pair["ours_c"]
    ids, mask = _texts()
    export_hf(ours_r, None, tmp_path / "r", kind="retrieval")
    export_hf(ours_c, None, tmp_path / "c", kind="captioning")
    hf_r = transformers.BlipForImageTextRetrieval.from_pretrained(tmp_path / "r").eval()
    hf_c = transformers.BlipForConditionalGeneration.from_pretrained(tmp_path / "c").eval()
    torch.testing.assert_close(
        hf_r(input_ids=ids, pixel_values=px, attention_mask=mask).itm_score.softmax(-1)[:, 1],
        ours_r.itm_probability(px, ids, mask), atol=1e-5, rtol=0,
    )
    assert torch.equal(hf_c.generate(px, num_beams=3, max_length=12), ours_c.generate(px, "beam", max_length=12,
                                                                                     min_length=0))
    back_r, back_c = load(tmp_path / "r").model, load(tmp_path / "c").model
    assert torch.equal(back_r.itm_probability(px, ids, mask), ours_r.itm_probability(px, ids, mask))
    assert torch.equal(back_c.generate(px, "greedy", max_length=12), ours_c.generate(px, "greedy", max_length=12))
    # the round trip reproduces the HF half bit for bit
    for name, p in back_c.text_decoder.layers.named_parameters():
        assert torch.equal(p, dict(ours_c.text_decoder.layers.named_parameters())[name]), name


def test_export_with_tokenizer_is_a_folder_transformers_processor_loads(tmp_path):
    from blip_core import MED, build_tokenizer, preset

    tok = build_tokenizer(["a red square", "two blue circles on green"], vocab_size=100)
    model = MED(preset("tiny").with_tokenizer(tok)).eval()
    export_hf(model, tok, tmp_path, kind="captioning")
    processor = transformers.BlipProcessor.from_pretrained(tmp_path)
    ids = processor(text="a red square", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.cls_id and ids[0, -1].item() == tok.sep_id
    loaded = load(tmp_path)
    assert loaded.tokenizer is not None and loaded.model.config == model.config


@torch.no_grad()
def test_other_image_size_matches_transformers_interpolation(pair):
    spec = pair["spec"]
    size = spec["vision"]["image_size"] + 2 * spec["vision"]["patch_size"]
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(9))
    ids, mask = _texts()
    ids, mask = ids[:2], mask[:2]
    resized = load(pair["root"] / "retrieval", image_size=size).model  # table resized once, at load
    hf = pair["hf_r"](input_ids=ids, pixel_values=pixels, attention_mask=mask, interpolate_pos_encoding=True)
    torch.testing.assert_close(resized.itm_probability(pixels, ids, mask), hf.itm_score.softmax(-1)[:, 1],
                               atol=1e-5, rtol=0)
    # the checkpoint-sized model interpolates on the fly to the same result
    torch.testing.assert_close(pair["ours_r"].itm_probability(pixels, ids, mask),
                               resized.itm_probability(pixels, ids, mask), atol=1e-6, rtol=0)
