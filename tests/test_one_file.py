"""examples/sppo_in_one_file.py, the class's short file: it runs on the test world, and what it computes is what
the stages compute on the same records: rank.py's M, P and W, and train_sppo.py's reference log-probs and losses."""
import json

import numpy as np
import pytest

from conftest import forward_sums, read_jsonl, reordered_fp32, run_stage
from test_rank import logit_tol

ONE_FILE = "examples/sppo_in_one_file.py"
STEPS = 4


@pytest.fixture(scope="module")
def one_file(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_file")
    p = run_stage(ONE_FILE, "--world", world, "--out", out, "--steps", STEPS)
    return out, p.stdout


def test_one_file_prints_one_prompt_table(one_file):
    out, stdout = one_file
    assert "ratio after" in stdout and f"step {STEPS}  loss" in stdout
    table = stdout[stdout.index("ratio after"):].splitlines()[1:6]  # the K = 5 answers of the prompt shown
    assert [int(row.split()[0]) for row in table] == [0, 1, 2, 3, 4]
    assert sum("yes" in row for row in table) == 2  # its best and its worst are trained


def test_one_file_W_is_rank_py_W(one_file, world, tmp_path):
    """rank.py on the short file's responses gives the same logits M and win rates W; and W is the row mean of
    P with the diagonal 1/2 included (worked here from P, not from rank.win_rates)."""
    out, _ = one_file
    mine = read_jsonl(out / "ranked.jsonl")
    run_stage("rank.py", "--in", out / "ranked.jsonl", "--out", tmp_path / "ranked.jsonl", "--ranker", world / "ranker")
    theirs = read_jsonl(tmp_path / "ranked.jsonl")
    assert [r["id"] for r in mine] == [r["id"] for r in theirs] and len(mine) == 16
    for a, b in zip(mine, theirs):
        assert a["responses"] == b["responses"]
        tol = logit_tol(world, b["logits"])  # other batches of pairs: fp32 rounding; W to a quarter (sigma' <= 1/4)
        np.testing.assert_allclose(a["logits"], b["logits"], rtol=0, atol=tol)
        np.testing.assert_allclose(a["win_rate"], b["win_rate"], rtol=0, atol=tol / 4)
        P = np.array(a["probs"])
        k = len(P)
        assert np.allclose(np.diag(P), 0.5) and np.allclose(P + P.T, 1.0)
        # float64 means of the same float64 numbers: to float64's rounding
        assert a["win_rate"] == pytest.approx([(sum(P[i]) - P[i][i] + 0.5) / k for i in range(k)], abs=1e-12)


def test_one_file_training_is_train_sppo_training(one_file, world, tmp_path):
    """train_sppo.py on the same records, with the short file's optimisation (AdamW at a constant lr, no warm-up,
    one step per epoch on all 16 prompts): the same reference log-probs, the same step-1 loss (the mean of
    (eta (W - 1/2))^2 over the best and the worst of each prompt, worked here from W alone), the same later losses."""
    out, _ = one_file
    records = read_jsonl(out / "ranked.jsonl")
    run_stage("train_sppo.py", "--model", world / "policy", "--data", out / "ranked.jsonl", "--out", tmp_path / "ckpt",
              "--eta", 5, "--lr", 3e-4, "--optimizer", "adamw", "--warmup-ratio", 0, "--schedule", "constant",
              "--batch-size", 16, "--micro-batch-size", 16, "--epochs", STEPS, env={"OMP_NUM_THREADS": "1"})
    theirs, mine = read_jsonl(tmp_path / "ckpt" / "train_log.jsonl"), read_jsonl(out / "steps.jsonl")
    assert len(theirs) == len(mine) == STEPS

    targets = []
    for r in records:
        w = r["win_rate"]
        best, worst = int(np.argmax(w)), int(np.argmin(w))  # numpy's first index on ties, as the release
        targets += [5 * (w[best] - 0.5), 5 * (w[worst] - 0.5)]
    by_hand = float(np.mean(np.square(targets)))
    # fp32 squares of the targets and their mean over 32 terms: a few units of fp32's last place (2^-24 = 6e-8)
    assert mine[0]["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert theirs[0]["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert mine[0]["log_ratio_pos"] == 0 and mine[0]["log_ratio_neg"] == 0

    ref = {(r["id"], r["response"]): r["logp"] for r in read_jsonl(tmp_path / "ckpt" / "reference_logps.jsonl")}
    my_ref = {(r["id"], r["response"]): r["logp"] for r in read_jsonl(out / "reference_logps.jsonl")}
    assert ref.keys() == my_ref.keys() and len(ref) == 32
    # the stage's chunked log-probs of padded micro-batches and the short file's whole logits: fp32 sums in
    # another order (the forward's and the vocabulary's), each log-prob to reordered_fp32 of the largest
    sums = forward_sums(json.load(open(world / "policy" / "config.json")), 96) + 600
    scale = max(abs(v) for v in ref.values())
    for key in ref:
        assert my_ref[key] == pytest.approx(ref[key], abs=reordered_fp32(scale, sums))
    # later steps: the same updates, each adding that rounding to the weights (relative) and to the log-ratios (a
    # difference of two log-probs); a step moves the losses and log-ratios by ~0.1 to 1, far more
    for a, b in zip(mine[1:], theirs[1:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=STEPS * reordered_fp32(1.0, sums))
        assert a["log_ratio_pos"] == pytest.approx(b["log_ratio_pos"], abs=2 * STEPS * reordered_fp32(scale, sums))
        assert a["log_ratio_neg"] == pytest.approx(b["log_ratio_neg"], abs=2 * STEPS * reordered_fp32(scale, sums))


def test_one_file_refuses_a_missing_world(tmp_path):
    p = run_stage(ONE_FILE, "--world", tmp_path / "nowhere", check=False)
    assert p.returncode != 0 and "no such directory" in p.stderr
