"""Peak memory and speed of one SPPO training step (forward + backward + AdamW step) for three ways of computing
the response log-probs, at a large vocabulary where the logits dominate:

    full      the model's logits at every position [rows, T, V], log_softmax, gather (a plain HF step)
    unchunked train_sppo's previous sequence_logps: logits of the response positions only (logits_to_keep),
              gather - logsumexp, [rows, n, V] at once
    chunked   train_sppo.sequence_logps: lm_head + logsumexp + gather over chunks of positions, recomputed
              in the backward pass (logps.token_logps)

    python bench/bench_logps_memory.py --out bench/results/logps_memory_cpu.json       # vocab 128256 and 32000

A random Llama (2 layers, width 64, untied lm_head), 16 rows (8 prompts x 2 responses) of ~280 tokens
(prompts of 60-100 tokens, responses of 170-230), fp32 on the CPU, one micro-batch. Each (method, vocabulary)
runs in its own fresh process: peak RSS is that process's resource.getrusage maximum (model, AdamW state and
all), measured through a first step and --steps more; tokens/s = prompt + response tokens / seconds of a step,
the median of the --steps timed steps.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from benchutil import ROOT, machine, median, table, write_json

METHODS = ["full", "unchunked", "chunked"]


def full_logps(model, input_ids, mask, labels, autocast):
    """The plain step: all logits, a log-softmax copy of them, gather the labels' log-probs."""
    with autocast():
        logits = model(input_ids=input_ids, attention_mask=mask,
                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1].float()
    targets = labels[:, 1:]
    logp = logits.log_softmax(-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(targets == -100, 0.0).sum(-1)


def child(method, vocab, steps):
    """One process, one method: build the model and batch, run 1 + steps training steps, print JSON."""
    import contextlib
    import random
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from train_sppo import collate, peak_rss, sequence_logps, sequence_logps_unchunked, sppo_loss
    torch.set_num_threads(1)
    fn = {"full": full_logps, "unchunked": sequence_logps_unchunked, "chunked": sequence_logps}[method]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(1, vocab) for _ in range(n)]  # noqa: E731
    examples = [{"prompt_ids": ids(rng.randint(60, 100)), "responses": [ids(rng.randint(170, 230)) for _ in range(2)]}
                for _ in range(8)]
    input_ids, mask, labels = collate(examples, list(range(8)), 0, "cpu")
    ref, win = torch.full((16,), -2000.0), torch.rand(16, generator=torch.Generator().manual_seed(0))
    rss0 = peak_rss() / 2**30  # VmHWM: ru_maxrss would start from the parent's RSS
    times = []
    for _ in range(1 + steps):
        t0 = time.perf_counter()
        lp = fn(model, input_ids, mask, labels, contextlib.nullcontext)
        sppo_loss(lp, ref, win, 1000.0).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = peak_rss() / 2**30
    print(json.dumps({"method": method, "vocab": vocab, "rows": len(labels), "tokens": int(mask.sum()),
                      "response_tokens": int((labels != -100).sum()), "peak_rss_gb": round(peak, 3),
                      "rss_before_step_gb": round(rss0, 3), "step_s": [round(t, 3) for t in times],
                      "tokens_per_s": round(int(mask.sum()) / median(times[1:]), 1)}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 32000])
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "VOCAB"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], int(a.child[1]), a.steps)
    rows = []
    for vocab in a.vocab:
        for method in a.methods:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, str(vocab),
                                "--steps", str(a.steps)], capture_output=True, text=True, cwd=ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
            if p.returncode != 0:
                sys.exit(f"{method} at vocab {vocab} failed:\n{p.stderr[-3000:]}")
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            full = next((r for r in rows if r["vocab"] == vocab and r["method"] == "full"), None)
            rows[-1]["peak_vs_full"] = round(rows[-1]["peak_rss_gb"] / full["peak_rss_gb"], 3) if full else None
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table(rows, [("vocab", "vocab", "{}"), ("method", "method", "{}"), ("peak_rss_gb", "peak RSS GB", "{:.2f}"),
                 ("peak_vs_full", "x full", "{:.2f}"), ("rss_before_step_gb", "RSS before GB", "{:.2f}"),
                 ("tokens_per_s", "tokens/s", "{:.0f}")])
    if a.out:
        write_json(a.out, {"benchmark": "logps_memory", "command": "python " + " ".join(sys.argv),
                           "machine": machine(), "results": rows})


if __name__ == "__main__":
    main()
