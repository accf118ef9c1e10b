"""The three objectives against slow, loop-by-loop computations written here, plus gradient checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from blip_core.losses import (
    diagonal_positives,
    id_positives,
    itc_loss,
    itm_loss,
    lm_loss,
    sample_hard_negatives,
)


def _feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _slow_soft_ce(query: torch.Tensor, q_m: torch.Tensor, bank: torch.Tensor, pos: torch.Tensor, temp: float, alpha: float) -> float:
    total = 0.0
    for i in range(query.shape[0]):
        sims = [float(query[i] @ bank[k]) / temp for k in range(bank.shape[0])]
        sims_m = [float(q_m[i] @ bank[k]) / temp for k in range(bank.shape[0])]
        z = sum(math.exp(s) for s in sims)
        z_m = sum(math.exp(s) for s in sims_m)
        n_pos = sum(bool(p) for p in pos[i])
        for k in range(bank.shape[0]):
            target = alpha * math.exp(sims_m[k]) / z_m + (1 - alpha) * (float(pos[i, k]) / n_pos)
            total -= target * (sims[k] - math.log(z))
    return total / query.shape[0]


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_itc_matches_direct_computation(alpha: float) -> None:
    b, q, e, temp = 3, 5, 8, 0.07
    img, txt = _feats(b, e, 0), _feats(b, e, 1)
    img_m, txt_m = _feats(b, e, 2), _feats(b, e, 3)
    img_bank = torch.cat([img_m, _feats(q, e, 4)])
    txt_bank = torch.cat([txt_m, _feats(q, e, 5)])
    pos = diagonal_positives(b, b + q)
    out = itc_loss(img, txt, img_m, txt_m, img_bank, txt_bank, torch.tensor(temp, dtype=torch.float64), alpha, pos)
    expect_i2t = _slow_soft_ce(img, img_m, txt_bank, pos, temp, alpha)
    expect_t2i = _slow_soft_ce(txt, txt_m, img_bank, pos, temp, alpha)
    assert out["itc_i2t"].item() == pytest.approx(expect_i2t, rel=1e-9)
    assert out["itc_t2i"].item() == pytest.approx(expect_t2i, rel=1e-9)
    assert out["itc"].item() == pytest.approx((expect_i2t + expect_t2i) / 2, rel=1e-9)


def test_itc_retrieval_variant_shares_positives_by_image_id() -> None:
    b, q, e, temp = 4, 4, 6, 0.1
    ids = torch.tensor([7, 7, 3, 9])
    bank_ids = torch.cat([ids, torch.tensor([3, 1, 7, -1])])
    pos = id_positives(ids, bank_ids)
    assert pos.sum(dim=1).tolist() == [3, 3, 2, 1]
    img, txt = _feats(b, e, 10), _feats(b, e, 11)
    img_m, txt_m = img.clone(), txt.clone()
    img_bank, txt_bank = torch.cat([img_m, _feats(q, e, 12)]), torch.cat([txt_m, _feats(q, e, 13)])
    out = itc_loss(img, txt, img_m, txt_m, img_bank, txt_bank, torch.tensor(temp, dtype=torch.float64), 0.4, pos)
    expect = (_slow_soft_ce(img, img_m, txt_bank, pos, temp, 0.4) + _slow_soft_ce(txt, txt_m, img_bank, pos, temp, 0.4)) / 2
    assert out["itc"].item() == pytest.approx(expect, rel=1e-9)


def test_itc_gradients_reach_online_features_and_temp_only() -> None:
    b, e = 3, 4
    img = _feats(b, e, 0).requires_grad_(True)
    txt = _feats(b, e, 1).requires_grad_(True)
    img_m = _feats(b, e, 2).requires_grad_(True)  # would be momentum outputs: must get no gradient
    txt_m = _feats(b, e, 3).requires_grad_(True)
    img_bank, txt_bank = img_m, txt_m
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    out = itc_loss(img, txt, img_m, txt_m, img_bank, txt_bank, temp, 0.4, diagonal_positives(b, b))
    out["itc"].backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert txt.grad is not None and txt.grad.abs().sum() > 0
    assert temp.grad is not None and temp.grad != 0
    # the bank enters the online logits, so it is the caller's job to pass detached momentum features;
    # the targets themselves carry no gradient: compare with targets computed from a detached copy
    img2, txt2 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    out2 = itc_loss(img2, txt2, img_m.detach(), txt_m.detach(), img_bank.detach(), txt_bank.detach(), temp.detach(), 0.4, diagonal_positives(b, b))
    out2["itc"].backward()
    torch.testing.assert_close(img.grad, img2.grad)
    torch.testing.assert_close(txt.grad, txt2.grad)


def test_itc_gradcheck_against_finite_differences() -> None:
    b, e = 2, 3
    img_m, txt_m = _feats(b, e, 2), _feats(b, e, 3)
    bank_i, bank_t = torch.cat([img_m, _feats(2, e, 4)]), torch.cat([txt_m, _feats(2, e, 5)])
    pos = diagonal_positives(b, 4)

    def f(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return itc_loss(img, txt, img_m, txt_m, bank_i, bank_t, torch.tensor(0.2, dtype=torch.float64), 0.4, pos)["itc"]

    assert torch.autograd.gradcheck(f, (_feats(b, e, 0).requires_grad_(), _feats(b, e, 1).requires_grad_()))


def test_hard_negatives_never_pick_a_positive_and_follow_the_softmax() -> None:
    b = 4
    sim = torch.tensor([[5.0, 4.0, 0.0, -9.0]] * b)
    pos = diagonal_positives(b, b)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(b, b)
    for _ in range(400):
        out = sample_hard_negatives(sim, sim.T.clone(), pos, g)
        assert bool(out["neg_text_valid"].all()) and bool(out["neg_image_valid"].all())
        assert not bool(pos[torch.arange(b), out["neg_text"]].any())
        counts[torch.arange(b), out["neg_text"]] += 1
    # row 2 (positive at column 2): columns 0 and 1 have softmax weights ~e^5 : e^4
    assert counts[2, 0] > 2 * counts[2, 1] > 0
    assert counts[2, 3] < 10


def test_hard_negatives_survive_underflow_batch_of_one_and_all_positive_rows() -> None:
    # a softmax that underflows to zero off the diagonal still samples (epsilon)
    sim = torch.diag(torch.full((3,), 1e4))
    out = sample_hard_negatives(sim, sim, diagonal_positives(3, 3), torch.Generator().manual_seed(0))
    assert bool(out["neg_text_valid"].all())
    assert (out["neg_text"] != torch.arange(3)).all()
    # batch of one: no negative exists -> flagged invalid, no crash
    one = sample_hard_negatives(torch.zeros(1, 1), torch.zeros(1, 1), diagonal_positives(1, 1))
    assert not bool(one["neg_text_valid"].any()) and not bool(one["neg_image_valid"].any())
    # retrieval: two captions of one image -> no negative for either
    ids = torch.tensor([5, 5])
    two = sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), id_positives(ids, ids))
    assert not bool(two["neg_text_valid"].any())


def test_itm_matches_direct_computation_and_skips_invalid() -> None:
    g = torch.Generator().manual_seed(1)
    pos_logits = torch.randn(2, 2, generator=g, dtype=torch.float64)
    neg_logits = torch.randn(4, 2, generator=g, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True])

    def ce(row: torch.Tensor, label: int) -> float:
        return -(float(row[label]) - math.log(math.exp(float(row[0])) + math.exp(float(row[1]))))

    terms = [ce(r, 1) for r in pos_logits] + [ce(r, 0) for r, v in zip(neg_logits, valid) if v]
    out = itm_loss(pos_logits, neg_logits, valid)
    assert out["itm"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    # batch of one with no negatives: only the positive counts, finite
    one = itm_loss(pos_logits[:1], neg_logits[:2], torch.tensor([False, False]))
    assert one["itm"].item() == pytest.approx(ce(pos_logits[0], 1), rel=1e-6)


def _slow_lm(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, prompt_len: int, eps: float) -> float:
    total, count = 0.0, 0
    vocab = logits.shape[-1]
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t] == 0 or t < prompt_len:
                continue
            row = [float(x) for x in logits[b, t - 1]]
            lse = math.log(sum(math.exp(x) for x in row))
            logp = [x - lse for x in row]
            target = int(ids[b, t])
            total += -(1 - eps) * logp[target] - eps / vocab * sum(logp)
            count += 1
    return total / count


@pytest.mark.parametrize("prompt_len", [0, 3])
def test_lm_matches_direct_computation(prompt_len: int) -> None:
    g = torch.Generator().manual_seed(2)
    b, t, v = 2, 6, 7
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    ids = torch.randint(1, v, (b, t), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    out = lm_loss(logits, ids, mask, prompt_length=prompt_len)
    assert out["lm"].item() == pytest.approx(_slow_lm(logits, ids, mask, prompt_len, 0.1), rel=1e-5)
    expected_tokens = int(mask[:, max(1, prompt_len):].sum())
    assert int(out["lm_tokens"]) == expected_tokens


def test_lm_ignores_pad_and_prompt_logits() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 6, 5, generator=g, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    lm_loss(logits, ids, mask, prompt_length=2)["lm"].backward()
    grad_per_pos = logits.grad.abs().sum(dim=-1)[0]
    # positions 0 (predicts prompt token 1) and 3..5 (predict pads / nothing) get no gradient
    assert grad_per_pos[0] == 0 and grad_per_pos[3:].abs().sum() == 0
    assert grad_per_pos[1] > 0 and grad_per_pos[2] > 0


def test_lm_normalizer_makes_split_batches_add_up() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 6, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    whole = lm_loss(logits, ids, mask)["lm"]
    n = int(lm_loss(logits, ids, mask)["lm_tokens"])
    halves = [lm_loss(logits[s], ids[s], mask[s], normalizer=n / 2)["lm"] for s in (slice(0, 2), slice(2, 4))]
    assert (halves[0] + halves[1]).item() / 2 == pytest.approx(whole.item(), rel=1e-12)


def test_identical_captions_are_never_drawn_as_hard_negatives() -> None:
    from blip_core.train.objectives import same_caption

    text_ids = torch.tensor([[2, 7, 8, 3], [2, 9, 3, 0], [2, 7, 8, 3], [2, 5, 3, 0]])  # rows 0 and 2 alike
    same = same_caption(text_ids)
    assert same.tolist() == [
        [True, False, True, False],
        [False, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    sims = torch.zeros(4, 4)
    sims[0, 2] = sims[2, 0] = 50.0  # the "hardest" candidate is the duplicate caption
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        negs = sample_hard_negatives(sims, sims, same, gen)
        assert negs["neg_text"][0] != 2 and negs["neg_text"][2] != 0
        assert negs["neg_image"][0] != 2 and negs["neg_image"][2] != 0
