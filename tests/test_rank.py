"""rank.py on the tiny ranker: the probability math, PairRM's exact input format, agreement with llm-blender's
own Blender, batching, shards, resume and bad input."""
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, run_stage, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import pairrm  # noqa: E402
import rank  # noqa: E402
import world as tiny  # noqa: E402
from benchutil import import_llm_blender  # noqa: E402  (the shim that makes llm-blender run under transformers 5)

RANK = "rank.py"


def make_records(world, n, k, seed=0):
    """n records of generate.py's shape: prompts of the tiny world, K toy answers of both kinds each."""
    rng = random.Random(seed)
    prompts = [r["prompt"] for r in read_jsonl(world / "prompts.jsonl")][:n]
    return [{"id": f"r{i:03d}", "prompt": p, "responses": [tiny.make_answer(rng, p, 0.5, 0.3) for _ in range(k)],
             "generate": {"model": "toy", "k": k}} for i, p in enumerate(prompts)]


def rank_cli(world, inp, out, *extra, check=True):
    # One thread: the tiny ranker's matrices are too small to share, and the test machine's cores are busy.
    return run_stage(RANK, "--in", inp, "--out", out, "--ranker", world / "ranker", *extra, check=check,
                     env={"OMP_NUM_THREADS": "1"})


def logit_tol(world, logits):
    """How far two of the tiny ranker's fp32 logits of one pair may differ when the pair shared its forward with
    other pairs (padding, length-sorted batches): each logit off by reordered_fp32 of the largest one."""
    config = json.load(open(world / "ranker" / "backbone" / "config.json"))
    return 2 * reordered_fp32(max(1.0, float(np.abs(logits).max())), forward_sums(config, 128))


def assert_same(a, b, tol):
    """Ranked records equal up to fp32 rounding of different batch shapes: logits to `tol` (logit_tol), the
    probabilities and win rates to a quarter of it (sigma' <= 1/4)."""
    assert [r["id"] for r in a] == [r["id"] for r in b]
    for x, y in zip(a, b):
        assert {k: v for k, v in x.items() if k not in ("logits", "probs", "win_rate")} == \
               {k: v for k, v in y.items() if k not in ("logits", "probs", "win_rate")}
        for key, t in (("logits", tol), ("probs", tol / 4), ("win_rate", tol / 4)):
            np.testing.assert_allclose(x[key], y[key], rtol=0, atol=t)


# -----------------------------------------------------------------------------
# the math

def test_probability_properties():
    rng = np.random.default_rng(0)
    for k in (2, 3, 5, 8):
        M = rng.normal(scale=4, size=(6, k, k))
        M[:, np.arange(k), np.arange(k)] = 0
        for probs in (rank.pairwise_probs, rank.bt_probs):
            P = probs(M)
            assert P.shape == M.shape
            np.testing.assert_allclose(P + np.swapaxes(P, -1, -2), 1, atol=1e-12)
            np.testing.assert_allclose(P[:, np.arange(k), np.arange(k)], 0.5)
            assert ((P > 0) & (P < 1)).all()
            np.testing.assert_allclose(probs(M[2]), P[2])  # one matrix or a stack of them
            W = rank.win_rates(P)
            np.testing.assert_allclose(W.mean(axis=-1), 0.5)  # constant-sum: the average win rate is 1/2
            np.testing.assert_allclose(W, P.mean(axis=-1))
    # without position bias (M_ji = -M_ij) the head-to-head probability is plainly sigmoid(M_ij)
    A = np.triu(rng.normal(size=(4, 4)), 1)
    np.testing.assert_allclose(rank.pairwise_probs(A - A.T), 1 / (1 + np.exp(-(A - A.T))))
    # bt: s_i = mean_j (M_ij - M_ji) over all K, diagonal included (the released compute_prob.py)
    M = rng.normal(size=(5, 5))
    np.fill_diagonal(M, 0)
    s = np.array([sum(M[i, j] - M[j, i] for j in range(5)) / 5 for i in range(5)])
    np.testing.assert_allclose(rank.bt_scores(M), s)
    np.testing.assert_allclose(rank.bt_probs(M), [[1 / (1 + np.exp(s[j] - s[i])) for j in range(5)] for i in range(5)])
    assert np.isfinite(rank.pairwise_probs(np.array([[0, 1e4], [-1e4, 0]]))).all()


# -----------------------------------------------------------------------------
# exactness against llm-blender, in one process (importing llm-blender takes ~10 s)

@pytest.fixture(scope="module")
def ranker(world):
    return pairrm.load_ranker(str(world / "ranker"))


def test_encoding_is_pairrms(ranker):
    """encode_pairs gives llm-blender's tokenize_pair ids, truncation included (long source, long candidates)."""
    _, tok = ranker
    import_llm_blender()
    from llm_blender.blender.blender_utils import tokenize_pair
    long = " ".join(["Cats are soft and quiet."] * 400)  # ~2400 tokens
    pairs = [("Tell me about cats.", "Cats are soft.", "Um, cats are quiet. Hope this helps!"),
             (long, "Cats are soft.", long), (long, long, long), ("Describe dogs.", long, ""),
             ("Describe dogs.", "Dogs are loyal.", "Dogs are loyal.")]
    enc = tokenize_pair(tok, *zip(*pairs))
    want = [ids[mask.bool()].tolist() for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    got = pairrm.encode_pairs(tok, pairs)
    assert got == want
    assert max(map(len, got)) == 2048 and len(got[2]) == 2048


def test_bt_scores_equal_blenders(world, ranker, tmp_path):
    """rank.py --prob-mode bt gives the released pipeline's numbers: llm-blender's own Blender.rank(...,
    return_scores=True, batch_size=1) scores, then compute_prob's P_ij = 1 / (1 + exp(s_j - s_i))."""
    llm_blender = import_llm_blender()
    recs = make_records(world, 6, 4, seed=1)
    write_jsonl(tmp_path / "in.jsonl", recs)
    rank_cli(world, tmp_path / "in.jsonl", tmp_path / "bt.jsonl", "--prob-mode", "bt")
    out = read_jsonl(tmp_path / "bt.jsonl")
    assert out[0]["rank"]["prob_mode"] == "bt" and out[0]["rank"]["k"] == 4

    blender = llm_blender.Blender(llm_blender.BlenderConfig(device="cpu", use_tqdm=False))
    blender.loadranker(str(world / "ranker"), device="cpu", model_name=str(world / "ranker" / "backbone"))
    scores = blender.rank([r["prompt"] for r in recs], [r["responses"] for r in recs], return_scores=True, batch_size=1)
    for r, s in zip(out, scores):
        # llm-blender runs one pair a forward: each logit to logit_tol; a score is a mean of differences of two
        # (2 x), a probability sigma of a difference of two scores (2 x, then / 4)
        tol = 2 * logit_tol(world, r["logits"])
        np.testing.assert_allclose(rank.bt_scores(np.array(r["logits"])), s, rtol=0, atol=tol)
        np.testing.assert_allclose(r["probs"], 1 / (1 + np.exp(s[None, :] - s[:, None])), rtol=0, atol=2 * tol / 4)


def test_alone_equals_in_a_large_batch(world, ranker):
    """A record's matrix does not depend on which other pairs share its forwards (padding, sorting)."""
    model, tok = ranker
    recs = make_records(world, 12, 5, seed=2)
    cells = rank.ordered_pairs(5)
    pairs = [(r["prompt"], r["responses"][i], r["responses"][j]) for r in recs for i, j in cells]
    together = pairrm.pair_logits(model, tok, pairs, batch_size=64)
    alone = pairrm.pair_logits(model, tok, pairs[3 * 20:4 * 20], batch_size=1)
    np.testing.assert_allclose(together[3 * 20:4 * 20], alone, rtol=0, atol=logit_tol(world, alone))
    assert together.dtype == np.float64 and together.shape == (len(pairs),)


# -----------------------------------------------------------------------------
# the stage: output, judge agreement, shards, resume

def test_output_shards_and_resume(world, tmp_path):
    recs = make_records(world, 16, 3)
    inp = tmp_path / "in.jsonl"
    write_jsonl(inp, recs)
    p = rank_cli(world, inp, tmp_path / "whole.jsonl", "--batch-size", 16)
    assert "pairs/s" in p.stderr.splitlines()[-1]
    whole = read_jsonl(tmp_path / "whole.jsonl")
    assert not os.path.exists(tmp_path / "whole.jsonl.partial")
    agree = decided = 0
    for r, src in zip(whole, recs):
        assert {k: r[k] for k in src} == src  # input fields kept
        assert r["rank"] == {"ranker": str(world / "ranker"), "prob_mode": "pairwise", "k": 3}
        M, P, W = np.array(r["logits"]), np.array(r["probs"]), np.array(r["win_rate"])
        assert M.shape == P.shape == (3, 3) and W.shape == (3,)
        assert (np.diag(M) == 0).all() and (M[~np.eye(3, dtype=bool)] != 0).all()
        np.testing.assert_allclose(P, rank.pairwise_probs(M))
        np.testing.assert_allclose(W, P.mean(axis=1))
        # the trained tiny ranker follows the tiny judge
        judge = [tiny.judge_score(y) for y in r["responses"]]
        cells = [(i, j) for i in range(3) for j in range(3) if judge[i] != judge[j]]
        agree += sum((M[i, j] > 0) == (judge[i] > judge[j]) for i, j in cells)
        decided += len(cells)
    assert decided >= 10 and agree >= 0.9 * decided, f"the tiny ranker agrees with the judge on {agree}/{decided}"

    # shards concatenate to the whole, and a killed run resumes: shard 0/2 left 3 finished records and
    # half a line; its rerun keeps them and does the rest
    rank_cli(world, inp, tmp_path / "s1.jsonl", "--shard", "1/2")
    out = tmp_path / "s0.jsonl"
    with open(str(out) + ".partial", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in whole[0::2][:3]) + json.dumps(whole[6])[:40])
    p = rank_cli(world, inp, out, "--shard", "0/2")
    assert "3 already done, 5 to do" in p.stderr
    assert not os.path.exists(str(out) + ".partial")
    parts = read_jsonl(out) + read_jsonl(tmp_path / "s1.jsonl")
    assert_same(sorted(parts, key=lambda r: r["id"]), whole, logit_tol(world, [r["logits"] for r in whole]))

    # resuming with other settings is refused, naming the setting
    p = rank_cli(world, inp, out, "--shard", "0/2", "--prob-mode", "bt", check=False)
    assert p.returncode == 2 and "prob_mode='pairwise'" in p.stderr and "prob_mode='bt'" in p.stderr


# -----------------------------------------------------------------------------
# bad input: one line naming file and line, exit code 2, no output

def bad_cases(world):
    good = make_records(world, 3, 2)
    return {
        "missing": ([good[0], {"id": "x", "prompt": "Describe cats."}], ":2: field 'responses' is missing"),
        "empty": ([{**good[0], "responses": []}], ":1: field 'responses' is empty"),
        "one": ([{**good[0], "responses": ["Cats are soft."]}], ":1: field 'responses' has 1 response"),
        "k_differs": ([good[0], good[1], {**good[2], "responses": ["a", "b", "c"]}],
                      ":3: field 'responses' has 3 responses, the first record has 2"),
        "not_str": ([{**good[0], "responses": ["a", None]}], ":1: field 'responses' item 1 should be str"),
        "not_list": ([{**good[0], "responses": "a b"}], ":1: field 'responses' should be list"),
        "dup_id": ([good[0], good[0]], ":2: field 'id' repeats"),
    }


@pytest.mark.parametrize("case", ["missing", "empty", "one", "k_differs", "not_str", "not_list", "dup_id"])
def test_bad_input(world, tmp_path, case):
    recs, msg = bad_cases(world)[case]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, recs)
    p = rank_cli(world, inp, out, check=False)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {inp}:") and msg in lines[0], p.stderr
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_bad_ranker_and_nan_logits(world, tmp_path, monkeypatch):
    """An incomplete ranker directory, and a ranker that returns NaN, are one-line errors with no output."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(inp, make_records(world, 2, 2))
    broken = tmp_path / "broken"
    shutil.copytree(world / "ranker", broken)
    os.remove(broken / "model.safetensors")
    p = run_stage(RANK, "--in", inp, "--out", out, "--ranker", broken, check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines() == \
        [f"error: --ranker {broken}: incomplete ranker directory (no model.safetensors)"]

    # NaN: in this process (the model-loading path is the one the other tests run as subprocesses)
    from safetensors.torch import load_file, save_file
    weights = load_file(world / "ranker" / "model.safetensors")
    bias = next(k for k in weights if k.startswith("head_layer") and k.endswith("bias"))
    weights[bias][:] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(sys, "argv", ["rank.py", "--in", str(inp), "--out", str(out), "--ranker", str(broken)])
    with pytest.raises(rank.InputError, match=f"^{inp}:1: the ranker gave non-finite logits for record 'r000'$"):
        rank.main()
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
