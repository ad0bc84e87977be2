"""Preference models other than PairRM (preference.py): a reward model and an LLM judge, in rank.py, evaluate.py and
run_loop.sh. Each expected P is re-derived here with plain transformers, one unpadded forward per input."""
import json
import os
import sys

import numpy as np
import pytest

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, require_vllm, run_stage, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "tests"))
from test_loop import loop  # noqa: E402
from test_rank import make_records  # noqa: E402

TEMPLATE = os.path.join(ROOT, "configs", "judge-prompt.txt")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


@pytest.fixture(scope="module")
def reward_dir(world, tmp_path_factory):
    """A tiny reward model: LlamaForSequenceClassification with one output, the tiny policy's tokenizer and chat
    template, random weights (large enough that responses get clearly different scores)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification
    out = tmp_path_factory.mktemp("reward") / "rm"
    config = AutoConfig.from_pretrained(world / "policy")
    config.num_labels, config.pad_token_id, config.initializer_range = 1, 0, 0.2
    config.architectures = ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(world / "policy").save_pretrained(out)
    return out


def hf_rewards(path, chats):
    """r for each [user, assistant] chat: the model's one output, one unpadded row at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for chat in chats:
            ids = tok(tok.apply_chat_template(chat, tokenize=False), add_special_tokens=False, return_tensors="pt")
            out.append(float(model(input_ids=ids["input_ids"]).logits[0, 0]))
    return np.array(out)


def rank(inp, out, ranker, *extra, check=True):
    return run_stage("rank.py", "--in", inp, "--out", out, "--ranker", ranker, *extra, check=check)


def assert_proper(P):
    P = np.asarray(P)
    np.testing.assert_allclose(P + P.T, 1, atol=1e-9)
    np.testing.assert_allclose(np.diag(P), 0.5)
    assert ((P > 0) & (P < 1)).all()


# -----------------------------------------------------------------------------
# a reward model

def test_reward_model_ranks_by_score_differences(world, reward_dir, tmp_path):
    records = make_records(world, 4, 3, seed=1)  # answers of different lengths: the batch is padded
    write_jsonl(tmp_path / "gen.jsonl", records)
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", reward_dir)
    assert "reward ranker" in p.stderr
    ranked = read_jsonl(tmp_path / "ranked.jsonl")
    config = json.loads((reward_dir / "config.json").read_text())
    for rec in ranked:
        r = hf_rewards(reward_dir, [[{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": y}]
                                    for y in rec["responses"]])
        # rank.py scores padded batches, the test one row at a time: fp32 sums in another order. A logit is a
        # difference of two scores (x 2); sigma' <= 1/4 makes that / 4 for a probability, and a mean of them.
        tol = 2 * reordered_fp32(np.abs(r).max(), forward_sums(config, 64))
        assert np.ptp(r) > 1000 * tol, "the scores differ by far more than rounding: the check below means something"
        np.testing.assert_allclose(rec["logits"], r[:, None] - r[None, :], rtol=0, atol=tol)
        np.testing.assert_allclose(rec["probs"], sigmoid(r[:, None] - r[None, :]), rtol=0, atol=tol / 4)
        np.testing.assert_allclose(rec["win_rate"], sigmoid(r[:, None] - r[None, :]).mean(axis=1), rtol=0, atol=tol / 4)
        assert_proper(rec["probs"])
        assert rec["rank"]["ranker_kind"] == "reward"
    # sharding: two shards together are the whole
    for s in (0, 1):
        rank(tmp_path / "gen.jsonl", tmp_path / f"ranked.{s}.jsonl", reward_dir, "--shard", f"{s}/2")
    shards = read_jsonl(tmp_path / "ranked.0.jsonl") + read_jsonl(tmp_path / "ranked.1.jsonl")
    whole = {r["id"]: r for r in ranked}
    assert sorted(r["id"] for r in shards) == sorted(whole)
    for r in shards:  # other batches: within the same rounding as above, twice (each against the exact value)
        np.testing.assert_allclose(r["probs"], whole[r["id"]]["probs"], rtol=0, atol=2 * tol / 4)
    # resuming with another kind (or PairRM's bt formula) is refused in one line, before any model is loaded
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", reward_dir, "--ranker-kind", "judge", check=False)
    assert p.returncode == 2 and "was made with ranker_kind='reward', this run has ranker_kind='judge'" in p.stderr
    p = rank(tmp_path / "gen.jsonl", tmp_path / "other.jsonl", reward_dir, "--prob-mode", "bt", check=False)
    assert p.returncode == 2 and "is a reward model: --prob-mode bt" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "other.jsonl").exists()


def test_reward_model_with_several_outputs_is_refused(world, reward_dir, tmp_path):
    import shutil
    bad = tmp_path / "rm3"
    shutil.copytree(reward_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b", "2": "c"}
    (bad / "config.json").write_text(json.dumps(config))
    write_jsonl(tmp_path / "gen.jsonl", make_records(world, 2, 2))
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", bad, "--ranker-kind", "reward", check=False)
    assert p.returncode == 2 and "num_labels=3" in p.stderr and not (tmp_path / "ranked.jsonl").exists()


def test_evaluate_with_a_reward_model(world, reward_dir, tmp_path):
    """A model against reference outputs, judged by the reward model: each outcome is sigmoid(r_model - r_ref)."""
    prompts = [r["prompt"] for r in read_jsonl(world / "eval_prompts.jsonl")[:4]]
    ref = [{"instruction": x, "output": f"Here is a short note: {x.lower()}", "generator": "ref"} for x in prompts]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    out = tmp_path / "eval"
    run_stage("evaluate.py", "--models", f"base={world / 'policy'}", "--reference-outputs", tmp_path / "ref.json",
              "--ranker", reward_dir, "--out", out, "--engine", "hf", "--max-tokens", 16)
    res = json.loads((out / "results.json").read_text())
    assert res["ranker_kind"] == "reward" and "(reward model)" in (out / "results.md").read_text()
    mine = {r["prompt"]: r["responses"][0] for r in read_jsonl(out / "outputs" / "base.jsonl")}
    chat = lambda x, y: [{"role": "user", "content": x}, {"role": "assistant", "content": y}]  # noqa: E731
    r_model = hf_rewards(reward_dir, [chat(x, mine[x]) for x in prompts])
    r_ref = hf_rewards(reward_dir, [chat(x["instruction"], x["output"]) for x in ref])
    expected = np.where([mine[x] == o["output"] for x, o in zip(prompts, ref)], 0.5, sigmoid(r_model - r_ref))
    config = json.loads((reward_dir / "config.json").read_text())
    scale = max(np.abs(r_model).max(), np.abs(r_ref).max())  # batched against one row: as in the test above
    tol = 2 * reordered_fp32(scale, forward_sums(config, 64)) / 4
    assert res["models"]["base"]["win_rate"] == pytest.approx(expected.mean(), abs=tol)


# -----------------------------------------------------------------------------
# a Python function

RULE = """
import math

def words_minus_questions(prompt, response):
    return len(response.split()) / 4 - prompt.count("?")

def halved(prompt, response):
    return words_minus_questions(prompt, response) / 2
"""


def rule_score(prompt, response):
    """RULE's words_minus_questions, written again: the expected scores do not come from the file under test."""
    return len(response.split()) / 4 - prompt.count("?")


def test_function_probabilities_are_the_sigmoid_of_score_differences(world, tmp_path):
    (tmp_path / "rule.py").write_text(RULE)
    records = make_records(world, 3, 3, seed=3)
    write_jsonl(tmp_path / "gen.jsonl", records)
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", f"{tmp_path / 'rule.py'}:words_minus_questions")
    assert "function ranker" in p.stderr  # WHERE:NAME needs no --ranker-kind
    for rec in read_jsonl(tmp_path / "ranked.jsonl"):
        s = np.array([rule_score(rec["prompt"], y) for y in rec["responses"]])
        assert np.ptp(s) > 0.2, "the scores differ, so the check below means something"
        # float64 throughout: s_i - s_j exact to ~1e-15, and sigmoid's slope is at most 1/4
        np.testing.assert_allclose(rec["logits"], s[:, None] - s[None, :], atol=1e-12)
        np.testing.assert_allclose(rec["probs"], 1 / (1 + np.exp(-(s[:, None] - s[None, :]))), atol=1e-12)
        assert_proper(rec["probs"])
        assert rec["rank"]["ranker_kind"] == "function"
    # package.module:NAME, imported from PYTHONPATH; another function of the same file halves every logit
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "rules.py").write_text(RULE)
    run_stage("rank.py", "--in", tmp_path / "gen.jsonl", "--out", tmp_path / "halved.jsonl", "--ranker",
              "pkg.rules:halved", "--ranker-kind", "function", env={"PYTHONPATH": str(tmp_path)})
    for a, b in zip(read_jsonl(tmp_path / "ranked.jsonl"), read_jsonl(tmp_path / "halved.jsonl")):
        np.testing.assert_allclose(np.array(b["logits"]) * 2, a["logits"], atol=1e-12)


def test_evaluate_with_a_function(world, tmp_path):
    """A model against reference outputs, judged by a function: each outcome is sigmoid(s_model - s_ref)."""
    (tmp_path / "rule.py").write_text(RULE)
    prompts = [r["prompt"] for r in read_jsonl(world / "eval_prompts.jsonl")[:4]]
    ref = [{"instruction": x, "output": "A short reference answer of seven words.", "generator": "ref"}
           for x in prompts]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    out = tmp_path / "eval"
    run_stage("evaluate.py", "--models", f"base={world / 'policy'}", "--reference-outputs", tmp_path / "ref.json",
              "--ranker", f"{tmp_path / 'rule.py'}:words_minus_questions", "--out", out, "--engine", "hf",
              "--max-tokens", 16)
    res = json.loads((out / "results.json").read_text())
    assert res["ranker_kind"] == "function" and "(preference function)" in (out / "results.md").read_text()
    mine = {r["prompt"]: r["responses"][0] for r in read_jsonl(out / "outputs" / "base.jsonl")}
    expected = [0.5 if mine[x] == o["output"] else sigmoid(rule_score(x, mine[x]) - rule_score(x, o["output"]))
                for x, o in zip(prompts, ref)]
    assert res["models"]["base"]["win_rate"] == pytest.approx(np.mean(expected), abs=1e-9)


BAD_FUNCTIONS = {  # name: (file text or None for no file, function, what the error line says)
    "missing file": (None, "score", "no such file"),
    "missing function": (RULE, "scores", "has no function scores"),
    "not a function": (RULE + "scores = 3\n", "scores", "has no function scores (scores is a int)"),
    "syntax error": ("def score(prompt, response)\n    return 1\n", "score", ":1: syntax error"),
    "import error": ("raise RuntimeError('no rules today')\n", "score", "raised RuntimeError: no rules today"),
    "exception": ("def score(prompt, response):\n    return 1 / ('1' not in prompt)\n", "score",
                  "score() on prompt id '{nan}' raised ZeroDivisionError: division by zero"),
    "nan": ("def score(prompt, response):\n    return float('nan') if '1' in prompt else 0.0\n", "score",
            "score() on prompt id '{nan}' returned nan, not a finite number"),
    "infinite": ("def score(prompt, response):\n    return float('inf')\n", "score",
                 "score() on prompt id 'r000' returned inf, not a finite number"),
    "not a number": ("def score(prompt, response):\n    return '0.5'\n", "score",
                     "score() on prompt id 'r000' returned '0.5', not a finite number"),
}


@pytest.mark.parametrize("case", list(BAD_FUNCTIONS))
def test_bad_function_is_one_line(case, world, tmp_path):
    """Each way a function can fail: exit 2, one line naming the file, the function and (once scoring) the prompt
    id, and no output."""
    text, name, says = BAD_FUNCTIONS[case]
    if text is not None:
        (tmp_path / "rule.py").write_text(text)
    records = make_records(world, 3, 2)
    records[1]["prompt"] += " 1"  # only this prompt (id r001) gets the NaN, or the exception
    records[0]["prompt"] = records[0]["prompt"].replace("1", "")
    records[2]["prompt"] = records[2]["prompt"].replace("1", "")
    write_jsonl(tmp_path / "gen.jsonl", records)
    spec = f"{tmp_path / 'rule.py'}:{name}"
    for stage in ("rank", "evaluate"):
        out = tmp_path / f"{stage}.out"
        if stage == "rank":
            p = rank(tmp_path / "gen.jsonl", out, spec, check=False)
        else:  # against reference outputs unlike the policy's answers (identical answers tie without asking)
            write_jsonl(tmp_path / "prompts.jsonl", [{"id": r["id"], "prompt": r["prompt"]} for r in records])
            (tmp_path / "ref.json").write_text(json.dumps([{"instruction": r["prompt"], "output": "Reference."}
                                                           for r in records]))
            p = run_stage("evaluate.py", "--models", f"base={world / 'policy'}", "--prompts",
                          tmp_path / "prompts.jsonl", "--reference-outputs", tmp_path / "ref.json", "--ranker", spec, "--out", out, "--engine",
                          "hf", "--max-tokens", 8, "--report-to", "none", check=False)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, p.stderr[-2000:]
        assert lines[-1].startswith("error: --ranker ") and str(tmp_path / "rule.py") in lines[-1], lines[-1]
        assert says.format(nan="r001") in lines[-1] and "Traceback" not in p.stderr, lines[-1]
        assert sum(line.startswith("error") for line in lines) == 1
        if stage == "rank":
            assert not out.exists() and not os.path.exists(f"{out}.partial")
        else:
            assert not (out / "results.json").exists() and not list((out / "judgments").glob("*.jsonl"))


# -----------------------------------------------------------------------------
# an LLM judge

def hf_judge_logits(path, template, pairs):
    """log p(A) - log p(B) at the judge's first answer token, for each (prompt, first, second): the template filled
    in by hand, through the chat template, one unpadded forward each. Also the tolerance for the same values
    from vLLM (other kernels, other summation orders): log p(A) - log p(B) is the difference of two logits of
    one forward over the whole prompt (the logsumexp cancels)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    a, b = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    out, tol = [], 0.0
    with torch.no_grad():
        for x, y1, y2 in pairs:
            text = template.replace("{prompt}", x).replace("{first}", y1).replace("{second}", y2)
            chat = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
            ids = tok(chat, add_special_tokens=False, return_tensors="pt")["input_ids"]
            logits = model(input_ids=ids).logits[0, -1]
            logp = logits.log_softmax(-1)
            out.append(float(logp[a] - logp[b]))
            tol = max(tol, 2 * reordered_fp32(float(logits.abs().max()), forward_sums(model.config.to_dict(), ids.shape[1])))
    return np.array(out), tol


def test_llm_judge_probabilities_are_the_verdict_softmax_in_both_orders(world, tmp_path):
    require_vllm()
    records = make_records(world, 2, 3, seed=2)
    write_jsonl(tmp_path / "gen.jsonl", records)
    # the tiny policy as the judge (found from its config: a causal LM), in fp32 as the test computes it
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", world / "policy", "--dtype", "fp32")
    assert "judge ranker" in p.stderr
    template = open(TEMPLATE, encoding="utf-8").read()
    for rec in read_jsonl(tmp_path / "ranked.jsonl"):
        k = len(rec["responses"])
        cells = [(i, j) for i in range(k) for j in range(k) if i != j]
        m, tol = hf_judge_logits(world / "policy", template,
                                 [(rec["prompt"], rec["responses"][i], rec["responses"][j]) for i, j in cells])
        M = np.zeros((k, k))
        for (i, j), v in zip(cells, m):
            M[i, j] = v
        S = sigmoid(M)  # softmax over the two verdict tokens, y_i as answer A
        P = (S + 1 - S.T) / 2
        np.fill_diagonal(P, 0.5)
        np.testing.assert_allclose(rec["logits"], M, rtol=0, atol=tol)
        np.testing.assert_allclose(rec["probs"], P, rtol=0, atol=tol / 4)  # sigma' <= 1/4
        assert_proper(rec["probs"])
        assert rec["rank"]["ranker_kind"] == "judge" and len(rec["rank"]["judge_template"]) == 16
    # another template is another experiment: a resume with it is refused
    other = tmp_path / "judge.txt"
    other.write_text("Prompt: {prompt}\nA: {first}\nB: {second}\nBetter (A or B)?")
    p = rank(tmp_path / "gen.jsonl", tmp_path / "ranked.jsonl", world / "policy", "--judge-template", other, check=False)
    assert p.returncode == 2 and "was made with judge_template=" in p.stderr
    other.write_text("no fields")
    p = rank(tmp_path / "gen.jsonl", tmp_path / "x.jsonl", world / "policy", "--judge-template", other, check=False)
    assert p.returncode == 2 and "should contain {prompt} exactly once" in p.stderr


def test_evaluate_with_an_llm_judge(world, tmp_path):
    """A model against reference outputs, judged by the tiny policy: each outcome is the judge's verdict softmax
    averaged over both orders, and the results name the judge's kind."""
    require_vllm()
    prompts = [r["prompt"] for r in read_jsonl(world / "eval_prompts.jsonl")[:3]]
    ref = [{"instruction": x, "output": f"Here is a short note: {x.lower()}", "generator": "ref"} for x in prompts]
    (tmp_path / "ref.json").write_text(json.dumps(ref))
    out = tmp_path / "eval"
    run_stage("evaluate.py", "--models", f"base={world / 'policy'}", "--reference-outputs", tmp_path / "ref.json",
              "--ranker", world / "policy", "--ranker-dtype", "fp32", "--out", out, "--engine", "hf",
              "--max-tokens", 16)
    res = json.loads((out / "results.json").read_text())
    assert res["ranker_kind"] == "judge" and "(LLM judge)" in (out / "results.md").read_text()
    mine = {r["prompt"]: r["responses"][0] for r in read_jsonl(out / "outputs" / "base.jsonl")}
    template = open(TEMPLATE, encoding="utf-8").read()
    m_ab, tol_ab = hf_judge_logits(world / "policy", template, [(x, mine[x], o["output"]) for x, o in zip(prompts, ref)])
    m_ba, tol_ba = hf_judge_logits(world / "policy", template, [(x, o["output"], mine[x]) for x, o in zip(prompts, ref)])
    expected = (sigmoid(m_ab) + 1 - sigmoid(m_ba)) / 2
    assert res["models"]["base"]["win_rate"] == pytest.approx(expected.mean(), abs=max(tol_ab, tol_ba) / 4)


# -----------------------------------------------------------------------------
# the loop, one iteration with each kind (PairRM's: tests/test_loop.py)

@pytest.mark.parametrize("kind", ["reward", "judge"])
def test_loop_runs_with_each_kind(kind, world, reward_dir, tmp_path):
    if kind == "judge":
        require_vllm()
    ranker = reward_dir if kind == "reward" else world / "policy"
    out = tmp_path / "loop"
    loop(world, out, RANKER=str(ranker), ITERS="1", N_PROMPTS="4", K="2", MAX_TOKENS="16", BATCH="4", MICRO_BATCH="4")
    ranked = read_jsonl(out / "iter1" / "ranked.jsonl")
    assert len(ranked) == 4 and all(r["rank"]["ranker_kind"] == kind for r in ranked)
    for r in ranked:
        assert_proper(r["probs"])
    assert (out / "iter1" / "checkpoint" / "config.json").exists()
