"""The filter's ITM first token (issue 16): `itm_first_token="cls"` reproduces transformers'
`BlipProcessor` + `BlipForImageTextRetrieval` match probability on the same weights, images
and captions; the default (`enc`, BLIP's convention) scores otherwise and keeps the old hash."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from stage_helpers import WORDS, web_shards

import blip_core
from blip_core.tokenizer import build_tokenizer
from data.images import decode_image
from data.shards import list_shards, read_table
from tasks.execution import ExecutionConfig, semantic_settings
from tasks.filter import FilterConfig, filter_settings, run_filter

transformers.logging.set_verbosity_error()
warnings.filterwarnings("ignore")

EXEC = ExecutionConfig(batch_size=3, num_workers=0, progress=False, device="cpu", precision="fp32")
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight transformers retrieval model (save_pretrained) with our tokenizer beside it."""
    folder = tmp_path_factory.mktemp("hf-retrieval")
    tokenizer = build_tokenizer([" ".join(WORDS)] * 4, vocab_size=200)
    text = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=40, pad_token_id=tokenizer.pad_id,
                bos_token_id=tokenizer.dec_id, sep_token_id=tokenizer.sep_id, eos_token_id=tokenizer.sep_id,
                is_decoder=True)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)  # fmt: skip
    config = transformers.BlipConfig(text_config=text, vision_config=vision, image_text_hidden_size=16)
    config.architectures = ["BlipForImageTextRetrieval"]
    torch.manual_seed(0)
    model = transformers.BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():  # larger weights than the init: the first token matters visibly
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
            elif "layer_norm" not in name.lower():
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def webs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return web_shards(tmp_path_factory.mktemp("web"), (4, 3), failed=(), garbage=())


def _scores(folder: Path) -> dict[str, float]:
    rows = [r for o in ("kept", "rejected") for p in list_shards(folder / o) for r in read_table(p, "scored").to_pylist()]
    return {r["key"]: r["itm_score"] for r in rows}


@torch.no_grad()
def _transformers_scores(folder: Path, webs: list[Path]) -> dict[str, float]:
    """What a transformers user gets: BlipProcessor (image + [CLS]-first text) and the ITM head."""
    model = transformers.BlipForImageTextRetrieval.from_pretrained(folder).eval()
    tokenizer = blip_core.load(folder).tokenizer.bert
    image_processor = transformers.BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    out = {}
    for web in webs:
        for r in read_table(web, "pairs").to_pylist():
            inputs = processor(images=decode_image(r["jpg"]).image, text=r["caption"], return_tensors="pt")
            assert int(inputs["input_ids"][0, 0]) == tokenizer.cls_token_id
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs["pixel_values"], use_itm_head=True).itm_score  # fmt: skip
            out[r["key"]] = float(logits.softmax(-1)[0, 1])
    return out


def test_cls_mode_reproduces_transformers_and_enc_differs(tmp_path: Path, hf_folder: Path, webs: list[Path]) -> None:
    loaded = blip_core.load(hf_folder)
    assert loaded.format == "hf-retrieval"
    cls = _scores(run_filter(webs, tmp_path / "cls", loaded, FilterConfig(itm_first_token="cls", execution=EXEC)).output)
    enc = _scores(run_filter(webs, tmp_path / "enc", loaded, FilterConfig(execution=EXEC)).output)
    reference = _transformers_scores(hf_folder, webs)
    assert cls.keys() == enc.keys() == reference.keys() and len(reference) == 7
    assert max(abs(cls[k] - reference[k]) for k in reference) < 1e-4
    assert max(abs(cls[k] - enc[k]) for k in reference) > 0


def test_default_keeps_the_settings_hash_and_cls_changes_it() -> None:
    device = torch.device("cpu")
    default = filter_settings("judge", FilterConfig(execution=EXEC), device, [])
    assert "itm_first_token" not in default  # folders made before the option keep their hash
    before = semantic_settings(FilterConfig(execution=EXEC))
    before.pop("itm_first_token")
    assert {k: v for k, v in default.items() if k in before} == before
    cls = filter_settings("judge", FilterConfig(itm_first_token="cls", execution=EXEC), device, [])
    assert cls["itm_first_token"] == "cls"


def test_an_unknown_first_token_is_refused() -> None:
    with pytest.raises(ValueError, match="itm_first_token"):
        FilterConfig(itm_first_token="sep")  # type: ignore[arg-type]
