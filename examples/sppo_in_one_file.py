"""SPPO in one file: one iteration on the tiny world, end to end, in plain view (for a class).

    python examples/sppo_in_one_file.py                    # runs/tiny/world (built first when missing, 2-3 min)
    python examples/sppo_in_one_file.py --world DIR        # another tiny world (examples/tiny/build.py --out DIR)
    python examples/sppo_in_one_file.py --select all       # flags the exercises turn (docs/exercises.md):
    python examples/sppo_in_one_file.py --fresh-reference  #   --select, --fresh-reference, --eta, --loss dpo

One iteration of the loop that run_loop.sh runs (generate.py -> rank.py -> train_sppo.py), on 16 prompts:
    1. sample K answers y_1..y_K ~ pi_t(.|x) for each prompt x          transformers' generate
    2. PairRM on both orders of every pair: M -> P -> W                 pairrm.pair_logits, rank.pairwise_probs,
                                                                        rank.win_rates
    3. log pi_t(y|x) of the trained answers, once, before any update    train_sppo.sequence_logps_unchunked
    4. a few optimizer steps of the mean of                             train_sppo.sppo_loss
           L = ( log pi_theta(y|x) - log pi_t(y|x) - eta (W(y) - 1/2) )^2
    5. one prompt's K answers: W, the target eta (W - 1/2), and the log-ratio before and after
The math is the project's own functions, imported, so there is one copy of it. What the full scripts add
(resuming, sharding, long prompts, FSDP on 8 GPUs, big vocabularies, seeded per-row sampling) is left out;
docs/reading.md says where each piece lives in them. --out DIR also writes what was made, in the stages'
formats: DIR/ranked.jsonl (rank.py's), DIR/reference_logps.jsonl and DIR/steps.jsonl (train_sppo.py's), so
tests/test_one_file.py can check this file against the stages.
"""
import argparse
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common import HelpFormatter, encode_prompt, end_of_turn_id, load_tokenizer, read_jsonl  # noqa: E402
from pairrm import load_ranker, pair_logits  # noqa: E402
from rank import ordered_pairs, pairwise_probs, win_rates  # noqa: E402
from train_sppo import collate, dpo_loss, select_responses, sequence_logps_unchunked, sppo_loss  # noqa: E402

DEFAULT_WORLD = os.path.join(ROOT, "runs", "tiny", "world")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--world", default=DEFAULT_WORLD, help="a tiny world: policy/, ranker/, prompts.jsonl")
    ap.add_argument("--prompts", type=int, default=16, help="the first N training prompts")
    ap.add_argument("--k", type=int, default=5, help="answers sampled per prompt")
    ap.add_argument("--max-tokens", type=int, default=48, help="max new tokens per answer")
    ap.add_argument("--eta", type=float, default=5.0, help="1/beta (the tiny demo's; the release uses 1000)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW, constant (no warm-up: step 1 moves too)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps, each on all the prompts")
    ap.add_argument("--select", choices=["best-worst", "all"], default="best-worst")
    ap.add_argument("--loss", choices=["sppo", "dpo"], default="sppo", help="dpo: the same pairs, train_sppo.dpo_loss")
    ap.add_argument("--fresh-reference", action="store_true", help="exercise: recompute log pi_t at every step")
    ap.add_argument("--show", type=int, default=None, help="the prompt to tabulate (default: widest spread of W)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write ranked.jsonl, reference_logps.jsonl, steps.jsonl here")
    a = ap.parse_args()
    if a.loss == "dpo" and a.select != "best-worst":
        ap.error("--loss dpo compares a winner with a loser: it needs --select best-worst")
    if a.k < 2 or a.prompts < 1 or a.steps < 1 or not (a.show is None or 0 <= a.show < a.prompts):
        ap.error("need --k >= 2, --prompts >= 1, --steps >= 1 and 0 <= --show < --prompts")
    return a


# -----------------------------------------------------------------------------
# 1. sample K answers per prompt from pi_t

@torch.no_grad()
def sample(policy, tok, prompts, a):
    """One record per prompt, as generate.py writes it: the prompt's ids through the chat template, and K answers
    as the ids sampled (ending in the end-of-turn id where the policy stopped) and their text."""
    eot, records = end_of_turn_id(tok), []
    for p in prompts:
        ids = encode_prompt(tok, p["prompt"])
        out = policy.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=True, temperature=0.7, top_p=0.9, top_k=0, num_return_sequences=a.k,
                              max_new_tokens=a.max_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eot)
        answers = [row[:row.index(eot) + 1] if eot in row else row for row in out[:, len(ids):].tolist()]
        records.append({"id": p["id"], "prompt": p["prompt"], "prompt_token_ids": ids, "response_token_ids": answers,
                        "responses": [tok.decode(y, skip_special_tokens=True) for y in answers]})
    return records


# -----------------------------------------------------------------------------
# 2. PairRM on every ordered pair (i, j): M_ij; then P_ij = P(y_i beats y_j | x) and W_i = mean_j P_ij

def rank_all(ranker, rtok, records, k):
    cells = ordered_pairs(k)  # (i, j) for i != j: M_ii is never asked, P_ii = 1/2 by construction
    pairs = [(r["prompt"], r["responses"][i], r["responses"][j]) for r in records for i, j in cells]
    flat = pair_logits(ranker, rtok, pairs, batch_size=8)  # one logit per pair, both orders asked
    for n, r in enumerate(records):
        M = np.zeros((k, k))
        for c, (i, j) in enumerate(cells):
            M[i, j] = flat[n * len(cells) + c]
        P = pairwise_probs(M)  # (sigmoid(M_ij) + 1 - sigmoid(M_ji)) / 2
        r.update(logits=M.tolist(), probs=P.tolist(), win_rate=win_rates(P).tolist())  # W: row means, P_ii included


# -----------------------------------------------------------------------------
# 3 and 4. log pi(y|x) as sums over the answer's tokens; the SPPO loss against log pi_t, fixed before step 1

def logps(policy, examples, pad):
    """[prompts, answers per prompt]: log pi(y|x) of each example's answers, one batch of left-padded rows."""
    batch = collate(examples, range(len(examples)), pad, "cpu")
    return sequence_logps_unchunked(policy, *batch, contextlib.nullcontext).view(len(examples), -1)


def train(policy, examples, W, a, pad):
    """a.steps AdamW steps on all the examples; returns log pi_t (fixed) and one dict per step."""
    opt = torch.optim.AdamW(policy.parameters(), lr=a.lr, weight_decay=0.0)
    target = a.eta * (W - 0.5)  # what each log-ratio is regressed to
    policy.eval()
    with torch.no_grad():
        ref = logps(policy, examples, pad)  # log pi_t(y|x): the starting weights, before any update
    policy.train()
    steps = []
    for s in range(1, a.steps + 1):
        lp = logps(policy, examples, pad)
        anchor = lp.detach() if a.fresh_reference else ref  # the exercise: a reference that moves with the policy
        if a.loss == "sppo":
            loss = sppo_loss(lp, anchor, W, a.eta).mean()  # mean over the trained answers
        else:  # column 0 is the best answer by W, column 1 the worst
            loss = dpo_loss(lp[:, 0] - anchor[:, 0], lp[:, 1] - anchor[:, 1], a.eta).mean()
        ratio = (lp - ref).detach()  # log pi(y|x) - log pi_t(y|x): how far the policy has moved from pi_t
        steps.append({"step": s, "loss": loss.item(), "log_ratio_pos": ratio[target > 0].mean().item(),
                      "log_ratio_neg": ratio[target < 0].mean().item()})
        print(f"step {s}  loss {loss.item():8.4f}  log-ratio: winners {steps[-1]['log_ratio_pos']:+.3f} (mean target "
              f"{target[target > 0].mean():+.3f}), losers {steps[-1]['log_ratio_neg']:+.3f} "
              f"(mean target {target[target < 0].mean():+.3f})")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # as the HF Trainer (and train_sppo.py) do
        opt.step()
        opt.zero_grad()
    return ref, steps


# -----------------------------------------------------------------------------
# 5. one prompt, all K answers: what the judge said and what training did

def all_logps(policy, rec, pad):
    """log pi(y|x) of all K answers of one record (the trained ones and the others)."""
    policy.eval()
    with torch.no_grad():
        return logps(policy, [{"prompt_ids": rec["prompt_token_ids"], "responses": rec["response_token_ids"]}], pad)[0]


def show(rec, picked, before, after, eta):
    print(f"\nprompt {rec['id']}: {rec['prompt']!r}\n"
          f"{'y':>2} {'trained':>7} {'W':>6} {'eta(W-1/2)':>10} {'log pi_t':>9} {'ratio before':>12} "
          f"{'ratio after':>11}  answer")
    for i, y in enumerate(rec["responses"]):
        W = rec["win_rate"][i]
        print(f"{i:>2} {'yes' if i in picked else '':>7} {W:6.3f} {eta * (W - 0.5):+10.3f} {before[i]:9.2f} "
              f"{0.0:+12.3f} {after[i] - before[i]:+11.3f}  {y[:70]!r}")
    print("(ratio = log pi(y|x) - log pi_t(y|x); before the first update the policy is pi_t, so every ratio is 0)")


def main():
    a = parse_args()
    if not os.path.isdir(a.world):
        if a.world != DEFAULT_WORLD:
            sys.exit(f"--world {a.world}: no such directory (build one: python examples/tiny/build.py --out DIR)")
        print(f"building the tiny world into {a.world} (once, 2-3 minutes)")
        subprocess.run([sys.executable, os.path.join(ROOT, "examples", "tiny", "build.py"), "--out", a.world,
                        "--world-version", "2"], check=True)
    torch.manual_seed(a.seed)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    tok = load_tokenizer(os.path.join(a.world, "policy"))
    policy = AutoModelForCausalLM.from_pretrained(os.path.join(a.world, "policy"), dtype=torch.float32).eval()
    pad = tok.pad_token_id
    prompts = [rec for _, rec in read_jsonl(os.path.join(a.world, "prompts.jsonl"))][:a.prompts]

    records = sample(policy, tok, prompts, a)
    print(f"1. sampled K={a.k} answers for each of {len(records)} prompts")
    ranker, rtok = load_ranker(os.path.join(a.world, "ranker"))
    rank_all(ranker, rtok, records, a.k)
    spread = [max(r["win_rate"]) - min(r["win_rate"]) for r in records]
    print(f"2. PairRM: W lies in [{min(min(r['win_rate']) for r in records):.3f}, "
          f"{max(max(r['win_rate']) for r in records):.3f}], mean spread (max - min) per prompt {np.mean(spread):.3f}")

    picked = [select_responses(r["win_rate"], a.select) for r in records]  # best and worst by W, or all K
    examples = [{"prompt_ids": r["prompt_token_ids"], "responses": [r["response_token_ids"][i] for i in p]}
                for r, p in zip(records, picked)]
    W = torch.tensor([[r["win_rate"][i] for i in p] for r, p in zip(records, picked)], dtype=torch.float32)
    n = a.show if a.show is not None else int(np.argmax(spread))
    before = all_logps(policy, records[n], pad)  # under pi_t, all K answers of the prompt shown
    print(f"3-4. {W.numel()} answers trained ({a.select}), {a.loss} loss, eta {a.eta:g}, lr {a.lr:g}"
          + (", reference recomputed at every step" if a.fresh_reference else ""))
    ref, steps = train(policy, examples, W, a, pad)
    show(records[n], picked[n], before.tolist(), all_logps(policy, records[n], pad).tolist(), a.eta)

    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "ranked.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(os.path.join(a.out, "reference_logps.jsonl"), "w") as f:
            f.writelines(json.dumps({"id": r["id"], "response": i, "logp": lp, "tokens": len(r["response_token_ids"][i])})
                         + "\n" for r, p, row in zip(records, picked, ref.tolist()) for i, lp in zip(p, row))
        with open(os.path.join(a.out, "steps.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in steps)


if __name__ == "__main__":
    main()
