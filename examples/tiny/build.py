"""Build the tiny world offline, in seconds, deterministically for a given seed.

    python examples/tiny/build.py --out runs/tiny/world

writes
    OUT/policy/            a Llama-style causal LM (save_pretrained: safetensors, trained byte-level BPE
                           tokenizer, chat template, pad token distinct from eos), briefly trained on the
                           toy answers of world.py so it writes short, varied, readable answers
    OUT/prompts.jsonl      training prompts {"id", "prompt"}
    OUT/eval_prompts.jsonl held-out prompts (no prompt text shared with prompts.jsonl; in world v2 each text
                           --eval-repeats times, under its own id, as the demo judges sampled answers)
    OUT/world.json         {"version": 1 or 2, "seed"}: which of world.py's rules the ranker learned
    OUT/ranker/            the tiny judge: a PairRM-shaped ranker (DeBERTa-v2 backbone, PairRM's special tokens
                           and head, sentencepiece tokenizer) trained on world.judge_score's preference;
                           rank.py --ranker OUT/ranker and llm-blender's Blender().loadranker(OUT/ranker) load it
                           (see ranker.py)
"""
import argparse
import json
import os
import random
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402
from ranker import build_ranker  # noqa: E402

SPECIAL = ["<pad>", "<s>", "</s>", "[INST]", "[/INST]"]
# Mistral-Instruct's layout; [INST] and [/INST] are single tokens so the prompt's tokens are always a
# prefix of prompt + answer (byte-level BPE would otherwise merge across the boundary).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)


def build_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, padding_side="left")


def build_policy(out, seed, steps, version=1, log=print):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    pairs = world.corpus(seed, 4000, version)
    tokenizer = build_tokenizer([p for p, _ in pairs] + [a for _, a in pairs], vocab_size=600)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=2, head_dim=64,  # vLLM's CPU attention wants head_dim >= 32
        max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                           tokenize=False) for p, a in pairs]
    if steps > 0:
        # Plain next-token training on whole conversations (the toy prompts are too easy to need masking).
        enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        labels = ids.masked_fill(mask == 0, -100)

        def batch_loss(g):
            idx = torch.randint(len(texts), (32,), generator=g)
            return model(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx]).loss
        world.fit(model, steps, 3e-3, batch_loss, seed, "policy", log)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_prompts(path, prompts, prefix):
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": f"{prefix}{i:05d}", "prompt": p}) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-prompts", type=int, default=600)
    ap.add_argument("--policy-steps", type=int, default=300, help="0 leaves the policy random")
    ap.add_argument("--world-version", type=int, choices=[1, 2], default=2, help="2: graded preference with "
                    "partial credit and a judge that mildly likes length; 1: two all-or-nothing qualities and a "
                    "decisive judge (the tests' world: verdicts that are easy to check) (world.py)")
    ap.add_argument("--eval-repeats", type=int, default=None, help="copies of each held-out prompt (default: 4 in "
                    "v2, whose answers are judged sampled, so that one draw per prompt does not decide; 1 in v1)")
    args = ap.parse_args()
    repeats = args.eval_repeats or (4 if args.world_version == 2 else 1)
    # One thread: matrices this small gain nothing from more, and on a busy machine each extra thread's
    # synchronisation costs more than the work (8x slower measured with 2 threads on 2 shared cores). It
    # also makes the build bit-for-bit the same on every machine.
    torch.set_num_threads(1)
    t0 = time.time()
    tmp = args.out.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    # Prompts: every (question, topic) text appears in one file only, so eval prompts are held out.
    rng = random.Random(args.seed)
    all_texts = sorted({q.format(t=t) for q in world.QUESTIONS for t in world.TOPICS})
    rng.shuffle(all_texts)
    eval_texts = all_texts[: len(all_texts) // 4]
    train_texts = all_texts[len(all_texts) // 4:]
    write_prompts(f"{tmp}/prompts.jsonl", [rng.choice(train_texts) for _ in range(args.n_prompts)], "p")
    write_prompts(f"{tmp}/eval_prompts.jsonl", [x for x in eval_texts for _ in range(repeats)], "e")

    print(f"building tiny policy ({args.policy_steps} training steps)")
    build_policy(f"{tmp}/policy", args.seed, args.policy_steps, args.world_version)
    print("building tiny ranker (PairRM-shaped, trained on the synthetic preference)")
    build_ranker(f"{tmp}/ranker", args.seed, backbone_path=os.path.join(os.path.abspath(args.out), "ranker", "backbone"),
                 version=args.world_version)
    with open(f"{tmp}/world.json", "w") as f:  # which rule judge_score applies (report.py reads it)
        json.dump({"version": args.world_version, "seed": args.seed}, f)

    shutil.rmtree(args.out, ignore_errors=True)
    os.replace(tmp, args.out)
    print(f"tiny world written to {args.out} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
