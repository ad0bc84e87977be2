"""Stage 2 of SPPO: the KxK head-to-head preference matrix of each prompt's responses, by PairRM (or another
preference model: a reward model, an LLM judge or a Python function, --ranker-kind; preference.py,
docs/preference-models.md).

    python rank.py --in runs/tiny/iter1/generated.jsonl --out runs/tiny/iter1/ranked.jsonl --ranker runs/tiny/world/ranker
    # one process per GPU, each on its own shard; merge them in input order afterwards (common.merge_shards):
    CUDA_VISIBLE_DEVICES=3 python rank.py --in gen.jsonl --out ranked.3.jsonl --shard 3/8

Input: generate.py's JSONL {"id", "prompt", "responses": [K strings], ...}. Output: the same records plus
"logits" (KxK raw PairRM logits M, M_ij > 0: y_i beats y_j, diagonal 0), "probs" (KxK P_ij = P(y_i > y_j | x))
and "win_rate" (W_i = mean_j P_ij, diagonal 1/2 included), and the settings under "rank".

Every ordered pair (i, j), i != j, is one PairRM forward row, encoded exactly as PairRM's own tokenize_pair
does. The rows of many prompts are sorted by length and run in large batches (the released code runs
K(K-1) forwards of batch size 1 per prompt).

--prob-mode pairwise (default): P_ij = (sigmoid(M_ij) + 1 - sigmoid(M_ji)) / 2, a true head-to-head
probability from both orders of the pair. --prob-mode bt: the released code's Bradley-Terry shortcut
P_ij = sigmoid(s_i - s_j), s_i = mean_j (M_ij - M_ji), which depends on the other candidates.

Another kind gives its own logits M through the same both-orders formula: a reward model M_ij = r_i - r_j (so
P_ij = sigmoid(r_i - r_j), and mean_j M_ij = r_i - mean(r), the centred reward); a function likewise with its
score s, M_ij = s_i - s_j; an LLM judge M_ij = log p(A) - log p(B) asked with y_i as answer A. --prob-mode bt is
PairRM's release formula and PairRM's only.

PairRM reads the plain prompt as its source. --source-template MODEL gives it what the released code gives
it instead: the prompt through MODEL's chat template, cut before the answer (release_source).
"""
import argparse
import sys
import time

import numpy as np

from common import (HelpFormatter, InputError, ResumableWriter, check_paths, field, load_tokenizer, main_guard,
                    parse_shard, progress, prompt_id, read_jsonl, take_shard)
from pairrm import DTYPES, default_batch_size, sigmoid
from preference import (JUDGE_TEMPLATE, KINDS, check_preference_path, default_dtype_for, detect_kind, load_preference,
                        read_judge_template)
from preference import settings as kind_settings

# -----------------------------------------------------------------------------
# the math: numpy in, numpy out; M, P are [..., K, K]

def pairwise_probs(M):
    """Head-to-head P(y_i > y_j | x) from PairRM logits M (M_ij: y_i in the first slot, y_j in the second).

    P_ij = ( sigmoid(M_ij) + 1 - sigmoid(M_ji) ) / 2: PairRM has a position bias (M_ij != -M_ji), so both
    orders of the pair are averaged. P_ij + P_ji = 1 and P_ii = 1/2 by construction.
    """
    S = sigmoid(M)
    return (S + 1.0 - np.swapaxes(S, -1, -2)) / 2.0


def bt_scores(M):
    """The released code's per-candidate score s_i = (1/K) sum_j (M_ij - M_ji), the diagonal (0) included:
    llm-blender's Blender.rank(return_scores=True)."""
    M = np.asarray(M, dtype=np.float64)
    return (M - np.swapaxes(M, -1, -2)).mean(axis=-1)


def bt_probs(M):
    """The released code's Bradley-Terry shortcut: P_ij = sigmoid(s_i - s_j), s = bt_scores(M).
    Unlike pairwise_probs, P_ij depends on every other candidate of the prompt, not only on y_i and y_j."""
    s = bt_scores(M)
    return sigmoid(s[..., :, None] - s[..., None, :])


def win_rates(P):
    """W_i = (1/K) sum_j P_ij: y_i's win rate against the current policy, P_ii = 1/2 included as released."""
    return np.asarray(P, dtype=np.float64).mean(axis=-1)


PROB_MODES = {"pairwise": pairwise_probs, "bt": bt_probs}


def release_source(tok, prompt):
    """PairRM's source text as the released rank.py makes it: the prompt as a user turn and the answer "None"
    as an assistant turn, through the policy's chat template, cut at the first "None", i.e. just before
    the answer (Mistral-7B-Instruct-v0.2: '<s>[INST] x [/INST]'). A prompt that contains "None" is cut there
    too, as released. (The release also passes `add_generate_prompt=True`, a misspelling that every
    template ignores; it is left out here.)"""
    chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": "None"}]
    return tok.apply_chat_template(chat, tokenize=False).split("None")[0]


def ordered_pairs(k):
    """Every (i, j) with i != j: the off-diagonal cells of the KxK matrix."""
    return [(i, j) for i in range(k) for j in range(k) if i != j]


# -----------------------------------------------------------------------------

def load_records(path):
    """Generated records, checked: each with a string prompt and the same number K >= 2 of string responses."""
    records, seen, k = [], {}, None
    for n, rec in read_jsonl(path):
        prompt = field(path, n, rec, "prompt", str)
        responses = field(path, n, rec, "responses", list)
        if not responses:
            raise InputError(f"{path}:{n}: field 'responses' is empty")
        if len(responses) < 2:
            raise InputError(f"{path}:{n}: field 'responses' has 1 response; ranking needs at least 2")
        bad = next((i for i, r in enumerate(responses) if not isinstance(r, str)), None)
        if bad is not None:
            raise InputError(f"{path}:{n}: field 'responses' item {bad} should be str, got {type(responses[bad]).__name__}")
        if k is None:
            k = len(responses)
        elif len(responses) != k:
            raise InputError(f"{path}:{n}: field 'responses' has {len(responses)} responses, the first record has {k}")
        rid = rec.get("id", prompt_id(prompt))
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise InputError(f"{path}:{n}: field 'id' should be a string, got {type(rid).__name__}")
        rid = rec["id"] = str(rid)
        if rid in seen:
            raise InputError(f"{path}:{n}: field 'id' repeats '{rid}' from line {seen[rid]}")
        seen[rid] = n
        records.append((n, rec))
    if not records:
        raise InputError(f"{path}: no records")
    return records, k


def ranker_kind(args):
    """The preference model's kind (preference.py) and, for a judge, its prompt template; PairRM's own options
    are refused for the other kinds."""
    kind = detect_kind(args.ranker, args.ranker_kind)
    if kind != "pairrm" and (args.prob_mode == "bt" or args.source_template):
        raise InputError(f"--ranker {args.ranker} is a {kind} model: --prob-mode bt and --source-template are PairRM's")
    return kind, read_judge_template(args.judge_template) if kind == "judge" else None


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--in", dest="inp", required=True, help="generate.py's output JSONL")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranker", default="llm-blender/PairRM-hf", help="the preference model: hub id or local "
                    "directory of PairRM, a reward model or an instruct LLM as judge; or a Python function "
                    "FILE.py:NAME or package.module:NAME, NAME(prompt, response) -> score")
    ap.add_argument("--ranker-kind", choices=("auto",) + KINDS, default="auto",
                    help="pairrm, reward, judge or function (default: function for WHERE:NAME, else read from its "
                    "config.json)")
    ap.add_argument("--judge-template", default=JUDGE_TEMPLATE, help="a judge's prompt, with {prompt}, {first} and "
                    "{second} (default: configs/judge-prompt.txt)")
    ap.add_argument("--prob-mode", choices=list(PROB_MODES), default="pairwise", help="bt: PairRM only")
    ap.add_argument("--batch-size", type=int, default=None, help="pair rows per forward (default: 32 cuda, 8 cpu)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on cuda (the release's; ~10x "
                    "closer to fp32 than bf16, measured: BENCHMARKS.md), fp32 on cpu")
    ap.add_argument("--source-template", default=None, metavar="MODEL", help="give PairRM the prompt through MODEL's "
                    "chat template, cut before the answer, as the released rank.py does (default: the plain prompt, "
                    "which is what PairRM was trained on)")
    ap.add_argument("--shard", default="0/1", help="i/n: this process takes records whose position mod n == i")
    ap.add_argument("--write-every", type=int, default=256, help="prompts per scoring call; finished ones are saved")
    return ap


def main():
    args = parser().parse_args()

    # --- check everything before loading a model
    shard = parse_shard(args.shard)
    records, k = load_records(args.inp)
    records = take_shard(records, shard)
    check_paths([args.inp], args.out)
    if args.batch_size is not None and args.batch_size < 1 or args.write_every < 1:
        raise InputError("--batch-size and --write-every must be at least 1")
    template = None
    if args.source_template:
        try:
            template = load_tokenizer(args.source_template)
        except InputError as e:  # load_tokenizer names the flag --model
            raise InputError(str(e).replace("--model ", "--source-template ", 1))
    kind, judge_template = ranker_kind(args)
    settings = {"ranker": args.ranker, "prob_mode": args.prob_mode, "k": k,  # (earlier runs have no key for these:)
                **({"source_template": args.source_template} if template else {}),
                **kind_settings(kind, judge_template)}
    writer = ResumableWriter(args.out, settings, "rank")
    for n, r in records:  # resuming: what was ranked must be these very responses (not an older generation's)
        old = writer.done.get(r["id"])
        if old is not None and (old.get("prompt"), old.get("responses")) != (r["prompt"], r["responses"]):
            was, now = old.get("generate") or {}, r.get("generate") or {}
            name = next((x for x in {**was, **now} if was.get(x) != now.get(x)), None)
            why = f"generated with {name}={now.get(name)!r}, not {was.get(name)!r}" if name else "other responses"
            raise InputError(f"{args.inp}:{n}: record '{r['id']}' is not the one {args.out} ranked ({why}); "
                             "use another --out or delete the old output")
    check_preference_path(args.ranker, kind)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available")
    dtype = args.dtype or default_dtype_for(kind, device)
    batch_size = args.batch_size or default_batch_size(device)
    todo = [(n, r) for n, r in records if r["id"] not in writer.done]
    cells = ordered_pairs(k)
    print(f"rank: {len(records)} prompts in shard {args.shard}, {len(records) - len(todo)} already done, "
          f"{len(todo)} to do, K={k}, {len(todo) * len(cells)} pairs, prob_mode={args.prob_mode}, {kind} ranker",
          file=sys.stderr)

    # --- rank
    source = {r["id"]: release_source(template, r["prompt"]) if template else r["prompt"] for _, r in todo}
    if template:
        cut = sum("None" in r["prompt"] for _, r in todo)
        if cut:
            print(f"warning: {cut} prompts contain 'None'; --source-template cuts PairRM's source there, as the "
                  "release does", file=sys.stderr)
    t0 = time.time()
    if todo:
        ranker = load_preference(args.ranker, kind, device, dtype, batch_size, judge_template)
        for warning in ranker.warnings(list(source.values())):
            print(f"warning: {warning}", file=sys.stderr)
        t0 = time.time()
        bar = progress(total=len(todo) * len(cells), desc="rank", unit="pair")
        for start in range(0, len(todo), args.write_every):
            part = todo[start:start + args.write_every]
            pairs = [(source[r["id"]], r["responses"][i], r["responses"][j]) for _, r in part for i, j in cells]
            flat = ranker.pair_logits(pairs, bar, ids=[r["id"] for _, r in part for _ in cells])
            out = []
            for p, (n, r) in enumerate(part):
                M = np.zeros((k, k))
                for c, (i, j) in enumerate(cells):
                    M[i, j] = flat[p * len(cells) + c]
                if not np.isfinite(M).all():
                    raise InputError(f"{args.inp}:{n}: the ranker gave non-finite logits for record '{r['id']}'")
                P = PROB_MODES[args.prob_mode](M)
                out.append({**r, "logits": M.tolist(), "probs": P.tolist(), "win_rate": win_rates(P).tolist()})
            writer.write(out)
        bar.close()
    writer.close([r["id"] for _, r in records])
    dt = time.time() - t0
    n_pairs = len(todo) * len(cells)
    print(f"rank: {len(todo)} prompts, {n_pairs} pairs in {dt:.1f}s ({n_pairs / max(dt, 1e-9):.1f} pairs/s) "
          f"-> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
