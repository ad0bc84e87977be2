"""evaluate.py: the win-rate math on synthetic outcomes, and the whole stage on the tiny world's models."""
import json

import numpy as np
import pytest

from conftest import read_jsonl, run_stage, write_jsonl
from test_rank import logit_tol
from evaluate import length_controlled_win_rate, outcome, sigmoid, win_rate

EVAL = "evaluate.py"


# -----------------------------------------------------------------------------
# the math

def test_win_rate_counts_ties_half_and_gives_the_standard_error():
    o = [1.0, 0.0, 0.5, 0.5, 1.0]
    wr, se = win_rate(o)
    assert wr == pytest.approx(0.6)
    assert se == pytest.approx(np.std(o, ddof=1) / np.sqrt(5))


def test_outcome_uses_both_orders():
    # a position bias (every first slot +1) cancels; swapping the two responses gives 1 - o; a tie is 1/2
    assert outcome(1.0, 1.0) == 0.5
    assert outcome(2.0, -1.0) + outcome(-1.0, 2.0) == pytest.approx(1.0)
    assert outcome(3.0, -3.0) == pytest.approx(sigmoid(3.0))


def synthetic(rng, n, b0, b1=3.0):
    """Lengths where the model usually writes more than the baseline, and outcomes from the LC model itself:
    P(model wins) = sigmoid(b0 + b1 tanh(d / sd(d))). b0 = 0: length alone explains the wins."""
    len_base = rng.integers(200, 1200, n).astype(float)
    len_model = np.maximum(1.0, len_base + rng.normal(300, 300, n))
    d = len_model - len_base
    p = sigmoid(b0 + b1 * np.tanh(d / d.std(ddof=1)))
    return p, len_model, len_base


def test_length_controlled_win_rate_removes_a_pure_length_effect():
    rng = np.random.default_rng(0)
    p, len_model, len_base = synthetic(rng, 2000, b0=0.0)
    hard = (rng.random(len(p)) < p).astype(float)  # judged wins and losses
    for o in (hard, p):  # and soft outcomes, like PairRM's
        wr, _ = win_rate(o)
        lc, lc_se = length_controlled_win_rate(o, len_model, len_base)
        assert wr > 0.75, "the longer model wins most comparisons"
        assert abs(lc - 0.5) < 0.05, (wr, lc)
        assert 0 < lc_se < 0.03
    # the estimate is honest: 0.5 lies within ~3 standard errors for hard outcomes
    lc, lc_se = length_controlled_win_rate(hard, len_model, len_base)
    assert abs(lc - 0.5) < 3 * lc_se


def test_length_controlled_win_rate_keeps_a_quality_effect():
    rng = np.random.default_rng(1)
    p, len_model, len_base = synthetic(rng, 2000, b0=1.0)
    o = (rng.random(len(p)) < p).astype(float)
    lc, _ = length_controlled_win_rate(o, len_model, len_base)
    assert lc == pytest.approx(sigmoid(1.0), abs=0.04)
    # without any length difference the LC win rate is the raw one
    assert length_controlled_win_rate(o, len_base, len_base)[0] == pytest.approx(win_rate(o)[0], abs=1e-6)


def test_length_controlled_win_rate_is_antisymmetric():
    rng = np.random.default_rng(2)
    p, len_model, len_base = synthetic(rng, 300, b0=0.4)
    lc, se = length_controlled_win_rate(p, len_model, len_base)
    lc_swapped, se_swapped = length_controlled_win_rate(1 - p, len_base, len_model)
    assert lc + lc_swapped == pytest.approx(1.0, abs=1e-9) and se == pytest.approx(se_swapped)


def test_length_controlled_win_rate_stays_finite_when_length_separates_or_all_win():
    d = np.arange(-10, 10, dtype=float) + 0.5
    wins = (d > 0).astype(float)  # perfect separation: without the L2 term b1 would run off to infinity
    lc, se = length_controlled_win_rate(wins, 100 + d, np.full_like(d, 100))
    assert 0.2 < lc < 0.8 and np.isfinite(se)
    lc, _ = length_controlled_win_rate(np.ones(20), 100 + d, np.full_like(d, 100))
    assert lc > 0.99


# -----------------------------------------------------------------------------
# the stage on tiny models

N_PROMPTS = 6


def perturbed_copy(src, dst, scale=0.1, seed=0):
    """A second policy: the tiny one with noise on every weight, so some of its greedy answers differ."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)


def evaluate(ws, *extra, check=True, models=None):
    models = models or [f"base={ws['world'] / 'policy'}", f"iter1={ws['iter1']}"]
    return run_stage(EVAL, "--models", *models, "--ranker", ws["world"] / "ranker", "--out", ws["out"],
                     "--engine", "hf", "--max-tokens", 32, *extra, check=check)


@pytest.fixture(scope="module")
def ws(world, tmp_path_factory):
    """One evaluation of the tiny policy (base) and a perturbed copy (iter1) against base, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("evaluate")
    # prompts without ids: their ids are the SHA-1 of the text, the ids --reference-outputs gives them too
    prompts = [{"prompt": r["prompt"]} for r in read_jsonl(world / "eval_prompts.jsonl")[:N_PROMPTS]]
    write_jsonl(tmp / "eval.jsonl", prompts)
    perturbed_copy(world / "policy", tmp / "iter1")
    ws = {"world": world, "iter1": tmp / "iter1", "tmp": tmp, "prompts": tmp / "eval.jsonl", "out": tmp / "out"}
    ws["first"] = evaluate(ws, "--prompts", ws["prompts"], "--baseline", "base")
    return ws


def test_outputs(ws):
    out = ws["out"]
    res = json.loads((out / "results.json").read_text())
    assert res["baseline"] == "base" and res["n_prompts"] == N_PROMPTS
    assert list(res["models"]) == ["base", "iter1"]
    for name, r in res["models"].items():
        assert set(r) >= {"win_rate", "se", "lc_win_rate", "mean_length", "n"} and r["n"] == N_PROMPTS
        assert 0 <= r["win_rate"] <= 1 and 0 <= r["lc_win_rate"] <= 1
        gen = read_jsonl(out / "outputs" / f"{name}.jsonl")
        assert r["mean_length"] == pytest.approx(np.mean([len(g["responses"][0]) for g in gen]))
        assert gen[0]["generate"]["temperature"] == 0 and gen[0]["generate"]["k"] == 1  # greedy, one each
        ae = json.loads((out / "alpaca_eval" / name / "model_outputs.json").read_text())
        assert ae == [{"instruction": g["prompt"], "output": g["responses"][0], "generator": name} for g in gen]
    # the baseline against itself is 1/2 by definition
    r = res["models"]["base"]
    assert r["win_rate"] == r["lc_win_rate"] == 0.5 and r["se"] == 0
    table = (out / "results.md").read_text()
    assert "| iter1 |" in table and table in ws["first"].stdout
    assert (out / "winrate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the win rates on the dashboard too (--report-to tensorboard, the default): one step per model, in order
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for tag, key in (("eval/win_rate", "win_rate"), ("eval/lc_win_rate", "lc_win_rate")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 1]
        # stored as float32: 2^-24 of a value at most 1
        assert [s.value for s in scalars] == pytest.approx([res["models"][n][key] for n in ("base", "iter1")], abs=1e-7)


def test_judgments_are_pairrm_both_orders(ws):
    """The perturbed model's outcome per prompt is (sigmoid(M(model, base)) + 1 - sigmoid(M(base, model))) / 2,
    with M straight from pairrm.py."""
    from pairrm import load_ranker, pair_logits
    out = ws["out"]
    mine = {r["prompt"]: r["responses"][0] for r in read_jsonl(out / "outputs" / "iter1.jsonl")}
    base = {r["prompt"]: r["responses"][0] for r in read_jsonl(out / "outputs" / "base.jsonl")}
    judged = read_jsonl(out / "judgments" / "iter1_vs_base.jsonl")
    assert len(judged) == N_PROMPTS
    differ = [x for x in base if mine[x] != base[x]]
    assert differ, "the perturbed policy should answer some prompts differently"
    # identical answers tie exactly, whatever the ranker's position bias, without asking it
    assert sum(r["logits"] is not None for r in judged) == len(differ)
    assert all(r["outcome"] == 0.5 for r in judged if r["logits"] is None)
    model, tok = load_ranker(str(ws["world"] / "ranker"))
    m = pair_logits(model, tok, [(x, mine[x], base[x]) for x in differ] + [(x, base[x], mine[x]) for x in differ])
    expect = {(mine[x], base[x]): outcome(a, b) for x, a, b in zip(differ, m[:len(differ)], m[len(differ):])}
    got = sorted(r["outcome"] for r in judged if r["logits"] is not None)
    # evaluate.py batched other pairs together: each logit to logit_tol, an outcome (the mean of two sigmoids)
    # to a quarter of it, and their mean and standard error too
    tol = logit_tol(ws["world"], m) / 4
    assert got == pytest.approx(sorted(expect.values()), abs=tol)
    o = [expect.get((mine[x], base[x]), 0.5) for x in base]
    res = json.loads((out / "results.json").read_text())["models"]["iter1"]
    assert res["win_rate"] == pytest.approx(np.mean(o), abs=tol)
    assert res["se"] == pytest.approx(np.std(o, ddof=1) / np.sqrt(len(o)), abs=tol)


def test_rerun_does_no_work(ws):
    out = ws["out"]
    cached = [out / "outputs" / "base.jsonl", out / "outputs" / "iter1.jsonl",
              out / "judgments" / "iter1_vs_base.jsonl"]
    before = {p: p.stat().st_mtime_ns for p in cached}
    results = (out / "results.json").read_text()
    p = evaluate(ws, "--prompts", ws["prompts"], "--baseline", "base")
    assert p.stderr.count("responses done") == 2 and "generate:" not in p.stderr
    assert "6 cached, 0 to do" in p.stderr
    assert {q: q.stat().st_mtime_ns for q in cached} == before
    assert (out / "results.json").read_text() == results


def test_reference_outputs(ws):
    """An AlpacaEval-style reference file as the baseline; the prompts are its instructions."""
    base = read_jsonl(ws["out"] / "outputs" / "base.jsonl")
    # what the tiny judge prefers (world.py): no "Um," fillers, and a closing "Hope this helps!"
    ref = [{"instruction": r["prompt"], "output": r["responses"][0].replace("Um, ", "") + " Hope this helps!",
            "generator": "polite"} for r in base]
    (ws["tmp"] / "ref.json").write_text(json.dumps(ref))
    p = evaluate(ws, "--reference-outputs", ws["tmp"] / "ref.json", models=[f"base={ws['world'] / 'policy'}"])
    assert "responses done" in p.stderr  # the prompts' ids match the earlier run's: no new generation
    res = json.loads((ws["out"] / "results.json").read_text())
    assert res["baseline"] == "polite" and list(res["models"]) == ["polite", "base"]
    assert res["models"]["polite"]["mean_length"] == pytest.approx(np.mean([len(r["output"]) for r in ref]))
    assert res["models"]["base"]["win_rate"] < 0.5
    assert len(read_jsonl(ws["out"] / "judgments" / "base_vs_polite.jsonl")) == N_PROMPTS

    # a prompt without a reference output is an error that names it
    write_jsonl(ws["tmp"] / "more.jsonl", read_jsonl(ws["prompts"]) + [{"id": "extra1", "prompt": "Describe owls."}])
    p = evaluate(ws, "--reference-outputs", ws["tmp"] / "ref.json", "--prompts", ws["tmp"] / "more.jsonl",
                 models=[f"base={ws['world'] / 'policy'}"], check=False)
    assert p.returncode == 2 and "no output for 1 of 7 prompts (ids extra1)" in p.stderr


@pytest.mark.parametrize("case", ["missing_model", "bad_baseline", "duplicate_name"])
def test_bad_arguments_fail_before_any_work(world, tmp_path, case):
    policy, out = world / "policy", tmp_path / "out"
    models, expect = [f"base={policy}", f"iter1={tmp_path / 'nope'}"], "no such checkpoint directory"
    extra = []
    if case == "bad_baseline":
        models, extra, expect = [f"base={policy}"], ["--baseline", "sft"], "not one of --models"
    elif case == "duplicate_name":
        models, expect = [f"base={policy}", f"base={policy}"], "given twice"
    p = run_stage(EVAL, "--models", *models, "--prompts", world / "eval_prompts.jsonl", "--ranker", world / "ranker",
                  "--out", out, *extra, check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith("error: ") and expect in err[0], p.stderr
    assert not out.exists()
