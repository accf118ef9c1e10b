from pathlib import Path

import pytest

from blip_core.tokenizer import DEFAULT_PROMPT, Tokenizer, build_tokenizer

CAPTIONS = ["a red circle above a blue square", "a small green triangle on the left", "two shapes"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer(CAPTIONS * 4, vocab_size=300)


def test_special_ids_follow_bert_then_dec_enc(tok: Tokenizer) -> None:
    assert tok.pad_id == 0
    assert (tok.dec_id, tok.enc_id) == (tok.vocab_size - 2, tok.vocab_size - 1)
    assert len({tok.pad_id, tok.cls_id, tok.sep_id, tok.dec_id, tok.enc_id}) == 5


@pytest.mark.parametrize("mode", ["text", "itm", "decoder"])
def test_modes_differ_only_in_first_token(tok: Tokenizer, mode: str) -> None:
    base, mask = tok.encode(CAPTIONS, mode="text")
    ids, mask2 = tok.encode(CAPTIONS, mode=mode)  # type: ignore[arg-type]
    first = {"text": tok.cls_id, "itm": tok.enc_id, "decoder": tok.dec_id}[mode]
    assert (ids[:, 0] == first).all()
    assert (ids[:, 1:] == base[:, 1:]).all() and (mask2 == mask).all()
    lengths = mask.sum(1)
    assert all(ids[i, n - 1] == tok.sep_id for i, n in enumerate(lengths.tolist()))
    assert (ids[mask == 0] == tok.pad_id).all()


def test_words_of_the_corpus_are_not_unknown(tok: Tokenizer) -> None:
    ids, _ = tok.encode(CAPTIONS + [DEFAULT_PROMPT.strip()])
    assert tok.unk_id not in ids.tolist()[0]
    assert tok.prompt_length(DEFAULT_PROMPT) == 4  # [DEC] a picture of


def test_decode_strips_specials_and_prompt(tok: Tokenizer) -> None:
    ids, _ = tok.encode(CAPTIONS, mode="decoder", prompt=DEFAULT_PROMPT)
    assert tok.decode(ids, strip_prompt=DEFAULT_PROMPT) == CAPTIONS
    assert tok.decode(ids)[0] == DEFAULT_PROMPT + CAPTIONS[0]


def test_truncation_keeps_sep(tok: Tokenizer) -> None:
    ids, _ = tok.encode([" ".join(CAPTIONS * 5)], max_length=8)
    assert ids.shape == (1, 8) and ids[0, -1] == tok.sep_id


def test_save_and_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert (again.dec_id, again.enc_id) == (tok.dec_id, tok.enc_id)
    assert (again.encode(CAPTIONS, mode="itm")[0] == tok.encode(CAPTIONS, mode="itm")[0]).all()


def test_missing_folder_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_folder(tmp_path)


def test_bad_mode_is_refused(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        tok.encode(CAPTIONS, mode="decode")  # type: ignore[arg-type]


def test_vocabulary_is_the_same_in_every_process() -> None:
    import subprocess
    import sys

    code = (
        "from blip_core.tokenizer import build_tokenizer;"
        "t = build_tokenizer(['a red circle', 'a blue square', 'two shapes', 'click here'] * 3, vocab_size=80);"
        "print(sorted(t.bert.get_vocab().items(), key=lambda kv: kv[1]))"
    )
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(3)}
    assert len(runs) == 1


def test_unseen_words_fall_back_to_characters(tok: Tokenizer) -> None:
    ids, _ = tok.encode(["a reed circel"])
    assert tok.unk_id not in ids.tolist()[0]
    assert tok.decode(ids) == ["a reed circel"]


def test_encode_equals_transformers_call_on_hostile_text(tok: Tokenizer) -> None:
    """`encode` calls the Rust tokenizer directly; transformers' own call is the reference."""
    import random

    import torch

    rng = random.Random(0)
    words = "a red square ÉCOLE ñandú 中文 emoji😀 IMG_4978.jpg click-here!! tabs\tand\nnewlines".split(" ")
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 40))) for _ in range(200)] + ["", "   "]
    for max_length in (5, 35):
        for mode, prompt in (("text", ""), ("itm", ""), ("decoder", DEFAULT_PROMPT)):
            ids, mask = tok.encode(texts, mode=mode, max_length=max_length, prompt=prompt)  # type: ignore[arg-type]
            ref = tok.bert([prompt + t for t in texts], padding="longest", truncation=True,
                           max_length=max_length, return_tensors="pt")
            expected = ref["input_ids"].long()
            expected[:, 0] = {"text": tok.cls_id, "itm": tok.enc_id, "decoder": tok.dec_id}[mode]
            assert torch.equal(ids, expected) and torch.equal(mask, ref["attention_mask"].long())
    empty_ids, empty_mask = tok.encode([])
    assert empty_ids.shape == empty_mask.shape == (0, 0)
