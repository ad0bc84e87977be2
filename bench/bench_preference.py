"""Speed of each kind of preference model (preference.py) at the tiny shape: PairRM, a reward model, an LLM judge.

    python bench/bench_preference.py --world runs/tiny/world --out bench/results/preference_tiny_cpu.json

The tiny world's ranker (PairRM-shaped, 0.1M parameters), a reward model of the tiny policy's shape
(LlamaForSequenceClassification, random weights, built here) and the tiny policy as an LLM judge (through vLLM),
each asked every ordered pair of --prompts toy prompts x K toy answers, as rank.py asks them (one pair_logits
call; loading and vLLM's start-up not timed). Reported: ordered pairs per second, and forwards per second (pair
rows for PairRM and the judge, responses for the reward model: K per prompt instead of K(K-1)).
"""
import argparse
import math
import os
import random
import tempfile
import time

from benchutil import machine, write_json

import pairrm  # noqa: E402  (benchutil puts the repository on the path)
import preference  # noqa: E402
from common import encode_chat  # noqa: E402
import world  # noqa: E402


def reward_model(policy, out):
    """A random reward model with the tiny policy's shape, tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification
    config = AutoConfig.from_pretrained(policy)
    config.num_labels, config.pad_token_id, config.architectures = 1, 0, ["LlamaForSequenceClassification"]
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(policy).save_pretrained(out)
    return out


def forward_tokens(model, pairs):
    """The length of each row the model runs for these pairs."""
    if model.kind == "pairrm":
        return [len(r) for r in pairrm.encode_pairs(model.tokenizer, pairs)]
    if model.kind == "judge":
        return [len(model.prompt_ids(x, a, b)) for x, a, b in pairs]
    items = sorted({(x, y) for x, a, b in pairs for y in (a, b)})
    return [len(encode_chat(model.tokenizer, [{"role": "user", "content": x}, {"role": "assistant", "content": y}]))
            for x, y in items]


def parameters(path):
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", default="runs/tiny/world")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--kinds", nargs="+", default=list(preference.KINDS))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = random.Random(0)
    records = [(p, [world.make_answer(rng, p) for _ in range(args.k)]) for p in world.make_prompts(rng, args.prompts)]
    pairs = [(p, ys[i], ys[j]) for p, ys in records for i in range(args.k) for j in range(args.k) if i != j]
    tmp = tempfile.mkdtemp(prefix="bench-preference-")
    paths = {"pairrm": os.path.join(args.world, "ranker"), "judge": os.path.join(args.world, "policy"),
             "reward": reward_model(os.path.join(args.world, "policy"), os.path.join(tmp, "reward"))}
    template = preference.read_judge_template(preference.JUDGE_TEMPLATE)
    result = {"machine": machine(), "prompts": args.prompts, "k": args.k, "pairs": len(pairs), "kinds": {}}
    for kind in args.kinds:
        model = preference.load_preference(paths[kind], kind, "cpu", "fp32", None, template)
        model.pair_logits(pairs[: 2 * args.k])  # warm-up
        t0 = time.time()
        model.pair_logits(pairs)
        dt = time.time() - t0
        tokens = forward_tokens(model, pairs)
        result["kinds"][kind] = {"seconds": dt, "pairs_per_s": len(pairs) / dt, "forwards": len(tokens),
                                 "forwards_per_s": len(tokens) / dt, "mean_tokens_per_forward": sum(tokens) / len(tokens),
                                 "parameters": parameters(paths[kind])}
        print(f"{kind}: {len(pairs)} pairs, {len(tokens)} forwards of {sum(tokens) / len(tokens):.0f} tokens on average "
              f"in {dt:.2f}s: {len(pairs) / dt:.1f} pairs/s, {len(tokens) / dt:.1f} forwards/s", flush=True)
        del model
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
