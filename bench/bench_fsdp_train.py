"""Training under FSDP2 across processes: train_sppo.py under torchrun --nproc-per-node N (the loop's training
on N GPUs), then the same global batches in 1 process, at the recipe's settings (RMSprop, gradient checkpointing,
--dtype bf16 on GPUs); tokens/s and peak memory per process.

    python bench/bench_fsdp_train.py --nproc 8 --out bench/results/h100x8/fsdp.json   # on 8 GPUs
    python bench/bench_fsdp_train.py --size tiny --vocab-size 0 --nproc 2 --dtype fp32 --out /tmp/fsdp.json  # CPU

A random Llama of bench_train.py's sizes (1b at Llama-3's vocabulary 128,256: 1.3B parameters) trains --steps
optimizer steps of (micro-batch x N x 2) pairs, 2 micro-batches per process a step; the 1-process run does the
same steps in 2N micro-batches. Both figures are train_sppo.py's own (its sppo_train.json and train_log.jsonl):
tokens/s over the steps, and over the steps after the first (which pays CUDA's and NCCL's first-call costs);
peak memory per process, the highest of the processes (torch.cuda.max_memory_allocated on GPUs, VmHWM on a CPU).
Every measured run is written to --out as soon as it exists (benchutil.LiveResults).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchutil import ROOT, LiveResults, machine

import bench_train  # noqa: E402


def train(args, d, nproc):
    """train_sppo.py on the pairs in d, under torchrun in nproc processes (1: a plain process): its figures."""
    out = os.path.join(d, f"ckpt{nproc}")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)] if nproc > 1 else []
    cmd = [sys.executable, *launch, os.path.join(ROOT, "train_sppo.py"), "--model", os.path.join(d, "policy"),
           "--data", os.path.join(d, "ranked.jsonl"), "--out", out, "--batch-size", str(args.batch_size),
           "--micro-batch-size", str(args.micro_batch_size), "--epochs", "1", "--optimizer", "rmsprop",
           "--gradient-checkpointing", "--dtype", args.dtype, "--max-length", str(args.max_length),
           "--report-to", "none", "--save-every", "0"]
    env = dict(os.environ, SPPO_PROGRESS="0", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if p.returncode != 0:
        raise SystemExit(f"train_sppo.py in {nproc} process(es) failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    with open(os.path.join(out, "sppo_train.json")) as f:
        stats = json.load(f)["stats"]
    with open(os.path.join(out, "train_log.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    later = steps[1:]  # tokens / tokens_per_s: each step's seconds
    after_first = (sum(s["tokens"] for s in later) / sum(s["tokens"] / s["tokens_per_s"] for s in later)
                   if later else None)
    subprocess.run(["rm", "-rf", out])
    return {"processes": stats["processes"], "device": stats["device"], "steps": stats["steps"],
            "tokens": stats["tokens"], "train_s": stats["train_seconds"], "process_s": round(wall, 2),
            "tokens_per_s": stats["tokens_per_s"], "tokens_per_s_after_first": after_first and round(after_first, 1),
            "peak_memory_gb_per_process": stats["peak_memory_gb"], "peak_memory_kind": stats["peak_memory_kind"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="processes (GPUs) of the FSDP2 run")
    ap.add_argument("--size", default="1b", help="bench_train's random model size: " + ", ".join(bench_train.SIZES))
    ap.add_argument("--vocab-size", type=int, default=128256, help="its vocabulary (0: the toy tokenizer's 600)")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="pairs per forward")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps")
    ap.add_argument("--min-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=400, help="response lengths drawn from [min, max] tokens")
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", help="train_sppo.py --dtype (bf16 on GPUs; fp32 on a CPU)")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process (0: torch's default)")
    ap.add_argument("--out", default="bench/results/fsdp_train.json")
    args = ap.parse_args()
    args.batch_size = args.micro_batch_size * args.nproc * 2
    runs = [f"{args.nproc} processes", "1 process"]
    live = LiveResults(args.out, runs, benchmark="fsdp_train", machine=machine(), size=args.size,
                       batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, dtype=args.dtype, rows=[],
                       command="python bench/bench_fsdp_train.py " + " ".join(sys.argv[1:]))
    with tempfile.TemporaryDirectory() as d:
        n = bench_train.random_policy(os.path.join(d, "policy"), args.size, args.vocab_size or None)
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(os.path.join(d, "policy"))
        bench_train.write_data(d, bench_train.make_pairs(tok, args.batch_size * args.steps, args.min_tokens,
                                                         args.max_tokens))
        live.data.update(parameters=n, vocab_size=len(tok), pairs=args.batch_size * args.steps)
        print(f"policy {args.size}: {n / 1e6:.1f}M parameters, vocabulary {len(tok)}; {args.steps} steps of "
              f"{args.batch_size} pairs ({args.min_tokens}-{args.max_tokens} token responses), {args.dtype}")
        for name, nproc in zip(runs, (args.nproc, 1)):
            r = train(args, d, nproc)
            live.point(name, rows=live.data["rows"] + [r])
            print(f"{name}: {r['tokens_per_s']:.0f} tokens/s ({r['tokens_per_s_after_first'] or '-'} after the "
                  f"first step), peak {r['peak_memory_gb_per_process']:.2f} GB per process "
                  f"({r['peak_memory_kind']}), {r['process_s']:.0f}s in all")
    many, one = (r["tokens_per_s_after_first"] or r["tokens_per_s"] for r in live.data["rows"])
    print(f"{args.nproc} processes / 1: {many / one:.2f}x the tokens/s")
    live.finish(speedup=round(many / one, 2))


if __name__ == "__main__":
    main()
