"""The README's formulas, pinned by numbers worked out by hand (or by a plain re-derivation here, never by the
function under test): P from a position-biased M, W, the Bradley-Terry shortcut, the DPO and IPO losses away
from step 1, the LC fit on cases whose answer is known in closed form, the seeds of both modes, the learning
-rate schedule and prompt ids. Properties that a wrong formula also has (P_ij + P_ji = 1, P_ii = 1/2) are
tested in test_rank.py; here the values themselves. Pure functions only: no model loads.

Tolerances: the hand-worked values carry 10 significant digits (1e-9); float64 identities hold to 1e-12; the LC
fit stops when Newton's step is under 1e-10 (1e-6 leaves room for that and the closed form's own rounding); fp32
results (the losses) to 1e-6, 16 units of fp32's last place of values near 1. All hold on any machine."""
import hashlib
import json
import math

import numpy as np
import pytest

import evaluate
import generate
import rank
from common import load_prompts
from train_sppo import dpo_loss, ipo_loss, lr_factor

# A PairRM-like matrix with a position bias: the first slot is favoured (M_01 = 2 and M_10 = 1 are both > 0).
M = np.array([[0.0, 2.0, 1.0],
              [1.0, 0.0, -0.5],
              [0.5, 1.5, 0.0]])
# sigmoid(2) = 0.8807970780, sigmoid(1) = 0.7310585786, sigmoid(0.5) = 0.6224593312, sigmoid(1.5) = 0.8175744762,
# sigmoid(-0.5) = 0.3775406688, sigmoid(0) = 0.5
P = np.array([[0.5, 0.5748692497, 0.5542996237],   # (0.8807970780 + 1 - 0.7310585786) / 2, (0.7310585786 + 1 - 0.6224593312) / 2
              [0.4251307503, 0.5, 0.2799830963],   # (0.7310585786 + 1 - 0.8807970780) / 2, (0.3775406688 + 1 - 0.8175744762) / 2
              [0.4457003763, 0.7200169037, 0.5]])  # (0.6224593312 + 1 - 0.7310585786) / 2, (0.8175744762 + 1 - 0.3775406688) / 2


def test_pairwise_probs_from_both_orders_of_a_biased_matrix():
    """P_ij = (sigmoid(M_ij) + 1 - sigmoid(M_ji)) / 2. (sigmoid((M_ij - M_ji) / 2) has the same symmetries but
    gives P_01 = sigmoid(0.5) = 0.622.)"""
    np.testing.assert_allclose(rank.pairwise_probs(M), P, rtol=0, atol=1e-9)


def test_evaluate_outcome_is_the_same_head_to_head_probability():
    assert evaluate.outcome(2.0, 1.0) == pytest.approx(0.5748692497, abs=1e-9)
    assert evaluate.outcome(-0.5, 1.5) == pytest.approx(0.2799830963, abs=1e-9)


def test_win_rates_are_row_means_with_the_diagonal():
    # W_0 = (0.5 + 0.5748692497 + 0.5542996237) / 3, ...
    np.testing.assert_allclose(rank.win_rates(P), [0.5430562911, 0.4017046155, 0.5552390933], rtol=0, atol=1e-9)


def test_bt_probs_by_hand():
    """s_i = mean_j (M_ij - M_ji), the diagonal included: s_0 = (0 + 1 + 0.5) / 3 = 0.5, s_1 = (-1 + 0 - 2) / 3 = -1,
    s_2 = (-0.5 + 2 + 0) / 3 = 0.5; P_ij = sigmoid(s_i - s_j): sigmoid(1.5) = 0.8175744762."""
    np.testing.assert_allclose(rank.bt_scores(M), [0.5, -1.0, 0.5], rtol=0, atol=1e-12)
    np.testing.assert_allclose(rank.bt_probs(M), [[0.5, 0.8175744762, 0.5],
                                                  [0.1824255238, 0.5, 0.1824255238],
                                                  [0.5, 0.8175744762, 0.5]], rtol=0, atol=1e-9)


def test_dpo_and_ipo_losses_away_from_step_one():
    """DPO: -log sigmoid((a_w - a_l) / eta) = log(1 + exp(-(a_w - a_l) / eta)); IPO: (a_w - a_l - eta / 2)^2."""
    import torch
    a_w, a_l = torch.tensor([1.0, 0.5, -2.0]), torch.tensor([-1.0, 0.5, 2.0])
    # eta 4: d = 2, 0, -4: log(1 + e^-0.5) = 0.4740769842, log 2 = 0.6931471806, log(1 + e^1) = 1.3132616875
    assert dpo_loss(a_w, a_l, 4.0).tolist() == pytest.approx([0.4740769842, 0.6931471806, 1.3132616875], abs=1e-6)
    # eta 4: (2 - 2)^2, (0 - 2)^2, (-4 - 2)^2
    assert ipo_loss(a_w, a_l, 4.0).tolist() == pytest.approx([0.0, 4.0, 36.0], abs=1e-6)


# -----------------------------------------------------------------------------
# the length-controlled win rate: LC = sigmoid(b0) of o ~ sigmoid(b0 + b1 tanh(d / sd(d)))

def test_lc_with_two_symmetric_length_groups_is_known_in_closed_form():
    """Half the prompts 40 characters longer (the model wins 4 of 5), half 40 shorter (wins 2 of 5). z takes
    two values +a and -a, so the unpenalised fit matches each group's mean: b0 + b1 a = logit(0.8) = ln 4,
    b0 - b1 a = logit(0.4) = ln(2/3), so b0 = ln(8/3) / 2 and LC = sqrt(8/3) / (1 + sqrt(8/3)) = 0.6202041029,
    while the raw win rate is 0.6."""
    wins_long, wins_short = [1, 1, 1, 1, 0] * 40, [1, 1, 0, 0, 0] * 40
    o = np.array(wins_long + wins_short, dtype=float)
    len_base = np.full(len(o), 100.0)
    len_model = len_base + np.array([40.0] * 200 + [-40.0] * 200)
    r = math.sqrt(8 / 3)
    lc, se = evaluate.length_controlled_win_rate(o, len_model, len_base, l2=0.0)
    assert lc == pytest.approx(r / (1 + r), abs=1e-6) and se > 0
    # the default penalty (0.1 on b1) moves it a little with 400 prompts, not the answer
    assert evaluate.length_controlled_win_rate(o, len_model, len_base)[0] == pytest.approx(r / (1 + r), abs=2e-3)


def test_lc_with_unequal_groups_uses_tanh_of_d_over_its_sample_sd():
    """Two groups of different sizes and lengths: z_g = tanh(d_g / sd(d)) (sd with ddof 1), and the fit through
    both group means: b1 = (logit o_1 - logit o_2) / (z_1 - z_2), b0 = logit o_1 - b1 z_1."""
    d = np.array([30.0] * 60 + [-10.0] * 40)
    o = np.array([1, 1, 1, 1, 1, 0] * 10 + [1, 0, 0, 0] * 10, dtype=float)  # means 5/6 and 1/4
    sd = math.sqrt(sum((x - d.mean()) ** 2 for x in d) / (len(d) - 1))
    z1, z2 = math.tanh(30 / sd), math.tanh(-10 / sd)
    logit = lambda p: math.log(p / (1 - p))  # noqa: E731
    b1 = (logit(5 / 6) - logit(1 / 4)) / (z1 - z2)
    b0 = logit(5 / 6) - b1 * z1
    lc, _ = evaluate.length_controlled_win_rate(o, 200 + d, np.full(len(d), 200.0), l2=0.0)
    assert lc == pytest.approx(1 / (1 + math.exp(-b0)), abs=1e-6)


# -----------------------------------------------------------------------------
# seeds, the schedule, prompt ids

def test_seeds_of_both_modes():
    # release: seed + 50 p for every prompt (the released generate.py's p * 50, offset by --seed)
    for rid in ("a", "b", "0123456789abcdef"):
        assert [generate.sample_seed(3, "release", rid, p) for p in range(3)] == [3, 53, 103]
    # prompt: hash(seed, id) + p, a stream per prompt
    first = {(s, rid): generate.sample_seed(s, "prompt", rid, 0) for s in (0, 3) for rid in ("a", "b")}
    assert len(set(first.values())) == 4, "each (seed, id) starts its own stream"
    assert [generate.sample_seed(3, "prompt", "a", p) - first[3, "a"] for p in range(3)] == [0, 1, 2]


def test_lr_factor_warm_up_and_linear_decay_at_named_steps():
    """Hugging Face's linear schedule, 10 steps, 2 of warm-up: step s (0-based) of the warm-up runs at s / 2, so
    step 0 at lr 0; after it 1 - (s - 2) / 8."""
    assert [lr_factor(s, 10, 2, "linear") for s in range(11)] == pytest.approx(
        [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0])
    assert lr_factor(0, 10, 0, "linear") == 1.0 and lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)  # progress 4/8: (1 + cos(pi / 2)) / 2
    assert lr_factor(1, 10, 2, "constant") == 0.5 and lr_factor(7, 10, 2, "constant") == 1.0


def test_prompt_ids_are_the_first_16_hex_digits_of_sha1(tmp_path):
    texts = ["Tell me about cats.", "Describe rivers, in \u00fcmlauts and \u4e2d\u6587."]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": t} for t in texts] + [{"id": "x", "prompt": "kept"}]))
    ids = [r["id"] for r in load_prompts(str(path))]
    assert ids == [hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] for t in texts] + ["x"]
