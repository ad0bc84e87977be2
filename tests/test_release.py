"""The release-exact settings (configs/mistral7b-release.env), each against the released code's own formula on
fixed inputs: the formulas of uclaml/SPPO (scripts/rank.py, scripts/compute_prob.py, scripts/generate.py) and
of the TRL DPOTrainer.tokenize_row its trainer copies are restated here as oracles. Plus the Gemma-2 config and
evaluate.py's AlpacaEval alignment check. Pure functions, one tiny PairRM run."""
import os
import shlex
import subprocess

import numpy as np
import pytest

from conftest import ROOT, read_jsonl, run_stage, write_jsonl
import evaluate  # noqa: E402
import generate  # noqa: E402
import rank  # noqa: E402
import train_sppo  # noqa: E402
from common import load_tokenizer  # noqa: E402

# -----------------------------------------------------------------------------
# probabilities: PROB_MODE=bt

M = np.array([[0.0, 2.31, -1.07, 4.9, 0.2],
              [-1.8, 0.0, 0.55, 3.3, -2.6],
              [1.25, -0.4, 0.0, 1.9, 0.01],
              [-5.2, -3.05, -2.2, 0.0, -0.7],
              [0.35, 2.75, -0.15, 1.1, 0.0]])


def released_probs(M, dtype=np.float32):
    """llm-blender's scores (float32, as Blender.rank returns them), then compute_prob.py's double loop."""
    s = (M - M.T).mean(axis=-1).astype(dtype)
    k = len(s)
    return np.array([[1 / (1 + np.exp(s[j] - s[i])) for j in range(k)] for i in range(k)])


def test_bt_probs_equal_the_release_to_float32_rounding():
    P = rank.bt_probs(M)
    assert np.abs(P - released_probs(M)).max() < 1e-6  # the release rounds s to float32 (1.6e-7 on real data)
    assert np.abs(P - released_probs(M, np.float64)).max() < 1e-12  # ... and that is the only difference
    # the release's W: probability rows summed, over K; best and worst: argmax / argmin of its scores s
    W = rank.win_rates(P)
    assert np.allclose(W, released_probs(M).sum(axis=1) / 5, rtol=0, atol=1e-6)  # the same float32 rounding of s
    s = (M - M.T).mean(axis=-1)
    assert train_sppo.select_responses(W.tolist(), "best-worst") == [int(s.argmax()), int(s.argmin())]
    # ours (pairwise) is a different matrix: P_ij depends only on M_ij and M_ji
    assert np.abs(rank.pairwise_probs(M) - P).max() > 0.05


# -----------------------------------------------------------------------------
# seeds: SEED_MODE=release

def test_release_seeds_are_p_times_50_for_every_prompt():
    # scripts/generate.py: for p in range(pairs): SamplingParams(seed=p * 50) for all prompts at once
    for rid in ("a", "b", "0123456789abcdef"):
        assert [generate.sample_seed(0, "release", rid, p) for p in range(5)] == [0, 50, 100, 150, 200]
    assert generate.sample_seed(0, "prompt", "a", 0) != generate.sample_seed(0, "prompt", "b", 0)


# -----------------------------------------------------------------------------
# PairRM's source: --source-template MODEL

def released_source(tokenizer, text):
    """scripts/rank.py's apply_template, restated: a user turn and an assistant turn "None", rendered, cut at
    the first "None" (its misspelled add_generate_prompt is passed on to the template, which ignores it)."""
    chat = [{"role": "user", "content": text}, {"role": "assistant", "content": "None"}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generate_prompt=True).split("None")[0]


PROMPTS = ["Explain gravity.", "Is x None or 0 in Python?", "  padded prompt \n", "a literal </s> and [INST] in text"]

# Public chat templates: Mistral-7B-Instruct-v0.2's of Dec 2023 (the one SPPO used) and Gemma-2-it's.
MISTRAL_2023 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
          "{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
          "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{'<start_of_turn>model\n'}}{% endif %}")


@pytest.mark.parametrize("template, expect", [
    (None, "<s>[INST]Explain gravity.[/INST]"),  # the tiny policy's own template
    (MISTRAL_2023, "<s>[INST] Explain gravity. [/INST]"),
    (GEMMA2, "<s><start_of_turn>user\nExplain gravity.<end_of_turn>\n<start_of_turn>model\n"),
])
def test_source_template_is_the_released_string(world, template, expect):
    tok = load_tokenizer(str(world / "policy"))
    if template:
        tok.chat_template = template
    assert rank.release_source(tok, PROMPTS[0]) == expect
    for p in PROMPTS:
        assert rank.release_source(tok, p) == released_source(tok, p)
    assert rank.release_source(tok, PROMPTS[1]).endswith("Is x ")  # cut at the prompt's own "None", as released


def test_rank_gives_pairrm_the_templated_source(world, tmp_path):
    """rank.py --source-template: PairRM reads release_source(prompt), in fp16 when asked, and the setting is
    recorded with the records."""
    import torch
    from pairrm import default_batch_size, load_ranker, pair_logits
    recs = [{"id": "a", "prompt": "Say hi.", "responses": ["Hi! Hope this helps!", "Um, hi."]},
            {"id": "b", "prompt": "Is None a value?", "responses": ["Um, yes.", "Yes, it is. Hope this helps!"]}]
    write_jsonl(tmp_path / "gen.jsonl", recs)
    out = tmp_path / "ranked.jsonl"
    p = run_stage("rank.py", "--in", tmp_path / "gen.jsonl", "--out", out, "--ranker", world / "ranker",
                  "--device", "cpu", "--dtype", "fp16", "--source-template", world / "policy")
    assert "1 prompts contain 'None'" in p.stderr
    got = read_jsonl(out)
    assert got[0]["rank"]["source_template"] == str(world / "policy")
    model, tokenizer = load_ranker(str(world / "ranker"), "cpu", "fp16")
    assert {t.dtype for t in model.parameters()} == {torch.float16}  # llm-blender's .half()
    tok = load_tokenizer(str(world / "policy"))
    # the pairs as rank.py scores them (one call for both records, its CPU batch size): the same fp16
    # computation on the same machine, so the same numbers (fp16 rounds to 2^-11: another batching could
    # flip a rounding and move a logit by far more than fp32 would)
    pairs = [(released_source(tok, r["prompt"]), r["responses"][i], r["responses"][j])
             for r in recs for i, j in ((0, 1), (1, 0))]
    m = pair_logits(model, tokenizer, pairs, batch_size=default_batch_size("cpu"))
    assert [x for g in got for x in (g["logits"][0][1], g["logits"][1][0])] == m.tolist()


# -----------------------------------------------------------------------------
# truncation: --truncation release

def trl_keep_end(prompt, chosen, rejected, max_length, max_prompt_length):
    """TRL DPOTrainer.tokenize_row (2024, truncation_mode keep_end), as sppo/trainer.py has it, on token lists
    (BOS and EOS already added): the chosen, rejected and prompt-only rows, each cut by the same two tests."""
    rows = [{"prompt_input_ids": list(prompt), "input_ids": list(chosen)},
            {"prompt_input_ids": list(prompt), "input_ids": list(rejected)}, {"prompt_input_ids": list(prompt)}]
    longer = max(len(chosen), len(rejected))
    for row in rows:
        if len(row["prompt_input_ids"]) + longer > max_length:
            row["prompt_input_ids"] = row["prompt_input_ids"][-max_prompt_length:]
    for row in rows[:2]:
        if len(row["prompt_input_ids"]) + longer > max_length:
            row["input_ids"] = row["input_ids"][: max_length - max_prompt_length]
    return rows


def test_truncate_release_is_trls_rule():
    for n_prompt in range(1, 14):
        for n_w in range(1, 14):
            for n_l in range(1, 14):
                prompt, w, l = list(range(100, 100 + n_prompt)), list(range(n_w)), list(range(50, 50 + n_l))
                rows = trl_keep_end(prompt, w, l, 10, 4)
                got_prompt, (got_w, got_l) = train_sppo.truncate_release(prompt, [w, l], 10, 4)
                assert rows[0]["prompt_input_ids"] == rows[1]["prompt_input_ids"] == rows[2]["prompt_input_ids"]
                want = rows[0]["prompt_input_ids"], rows[0]["input_ids"], rows[1]["input_ids"]
                assert (got_prompt, got_w, got_l) == want


def test_truncation_rules_differ_where_the_release_lets_a_prompt_run_long():
    bos, prompt = 1, [1, 11, 12, 13, 14, 15]  # 6 tokens, max_prompt_length 4, max_length 10
    w, l = [21, 22, 23], [31, 32]
    assert train_sppo.truncate_release(prompt, [w, l], 10, 4) == (prompt, [w, l])  # 6 + 3 fits: nothing cut
    assert train_sppo.truncate(prompt, [w, l], 10, 4, bos) == ([1, 13, 14, 15], [w, l])  # BOS + the end
    long_w = list(range(40, 52))  # 12 tokens: the prompt is cut, BOS with it, then both answers to 10 - 4
    assert train_sppo.truncate_release(prompt, [long_w, l], 10, 4) == ([12, 13, 14, 15], [long_w[:6], l])
    assert train_sppo.truncate(prompt, [long_w, l], 10, 4, bos) == ([1, 13, 14, 15], [long_w[:6], l])
    short = [1, 11, 12]  # a short prompt: the release still cuts answers to 6 where ours leaves them 7
    assert train_sppo.truncate_release(short, [long_w, l], 10, 4) == (short, [long_w[:6], l])
    assert train_sppo.truncate(short, [long_w, l], 10, 4, bos) == (short, [long_w[:7], l])


def test_train_flags_reach_settings_and_model(world):
    import torch
    args = train_sppo.parser().parse_args(["--model", str(world / "policy"), "--data", os.devnull, "--out", "x",
                                           "--truncation", "release", "--attn-implementation", "eager"])
    settings = train_sppo.run_settings(args, "fp32")
    assert settings["truncation"] == "release" and settings["attn_implementation"] == "eager"
    default = train_sppo.parser().parse_args(["--model", "m", "--data", os.devnull, "--out", "x"])
    assert "truncation" not in train_sppo.run_settings(default, "fp32")  # runs made before the flag still match
    model = train_sppo.load_model(args, train_sppo.Run(0, 1, torch.device("cpu"), "fp32"))
    assert model.config._attn_implementation == "eager"


# -----------------------------------------------------------------------------
# the configs

def config(name):
    """Every variable the configs set, as run_loop.sh sees it (sourced by bash, the environment cleared)."""
    names = sorted({line.split("=", 1)[0] for f in ("mistral7b", "mistral7b-release", "gemma2-9b")
                    for line in open(os.path.join(ROOT, "configs", f + ".env")) if line[:1].isupper() and "=" in line})
    script = f'source configs/{name}.env; for v in {" ".join(names)}; do echo "$v=${{!v}}"; done'
    out = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PATH": os.environ["PATH"]}).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def test_release_config_sets_back_only_the_deviations():
    ours, release = config("mistral7b"), config("mistral7b-release")
    differ = {k for k in ours.keys() | release.keys() if ours.get(k) != release.get(k)}
    assert differ == {"OUT", "SEED_MODE", "PROB_MODE", "RANK_ARGS", "TRAIN_ARGS"}
    assert (release["SEED_MODE"], release["PROB_MODE"]) == ("release", "bt")
    r = rank.parser().parse_args(["--in", "i", "--out", "o", *shlex.split(release["RANK_ARGS"])])
    assert (r.source_template, r.dtype) == ("mistralai/Mistral-7B-Instruct-v0.2", "fp16")
    t = train_sppo.parser().parse_args(["--model", "m", "--data", "d", "--out", "o",
                                        *shlex.split(release["TRAIN_ARGS"])])
    assert (t.truncation, t.dtype, t.gradient_checkpointing) == ("release", "bf16", True)


def test_gemma_config_is_the_recipe_with_gemmas_needs():
    ours, gemma = config("mistral7b"), config("gemma2-9b")
    differ = {k for k in ours.keys() | gemma.keys() if ours.get(k) != gemma.get(k)}
    assert differ == {"MODEL", "OUT", "GEN_ARGS", "MICRO_BATCH", "TRAIN_ARGS"}
    assert gemma["MODEL"] == "google/gemma-2-9b-it" and gemma["BATCH"] == "64" and gemma["MICRO_BATCH"] == "4"
    t = train_sppo.parser().parse_args(["--model", "m", "--data", "d", "--out", "o", *shlex.split(gemma["TRAIN_ARGS"])])
    assert (t.attn_implementation, t.dtype) == ("eager", "bf16")
    g = generate.parser().parse_args(["--model", "m", "--prompts", "p", "--out", "o", *shlex.split(gemma["GEN_ARGS"])])
    assert g.dtype == "bf16"


# -----------------------------------------------------------------------------
# evaluate.py: when AlpacaEval's own LC would misread the exported outputs

def test_alpaca_eval_alignment_check():
    ref = {f"instruction {i}": "out" for i in range(805)}
    order = list(ref)
    assert not evaluate.alpaca_eval_misaligned(ref, order)
    assert evaluate.alpaca_eval_misaligned(ref, order[:100])  # --limit 100
    assert evaluate.alpaca_eval_misaligned(ref, order[1:] + order[:1])  # another order
    assert evaluate.alpaca_eval_misaligned(None, order)  # no reference: cannot tell
    assert evaluate.alpaca_eval_misaligned(dict(list(ref.items())[:60]), order[:60])  # not AlpacaEval's set
