"""Generation throughput: generate.py's vLLM engine against its Hugging Face engine, same prompts, K, tokens and
dtype; and vLLM's sampling with our per-request seeds against unseeded sampling on the same prompts.

    python bench/bench_generate.py --model runs/tiny/world/policy --prompts runs/tiny/world/prompts.jsonl \
        --out bench/results/generate.json [--n-prompts 64] [--k 5] [--max-tokens 64] [--dtype fp32] [--extra='...']

HF: generate.py --engine hf as its own process (as the loop runs it); its time is the whole process, model
load included. vLLM: generate.py's own engine (generate.vllm_engine, started as generate.py starts it) in this
process, timed from its start; then, on the started engine, rounds of the same rows with our seeds (one per
request: hash(seed, id) + p) and without any (vLLM's batched sampler; a seeded request takes a per-request
generator path, estimated 15-40% slower on a GPU). tokens/s counts the response tokens the engines report.
Every measured point is written to --out as soon as it exists (benchutil.LiveResults).
"""
import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from benchutil import LiveResults, machine, median

import generate  # noqa: E402  (first: it makes torch's CUDA check NVML-based before torch is imported)
from common import encode_prompt, load_prompts, load_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(args):
    return ["--model", args.model, "--prompts", args.prompts, "--limit", str(args.n_prompts), "--k", str(args.k),
            "--max-tokens", str(args.max_tokens), "--dtype", args.dtype, *shlex.split(args.extra)]


def run_hf(args, out):
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), *flags(args), "--out", out, "--engine", "hf"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, SPPO_PROGRESS="0"))
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"generate.py --engine hf failed:\n{p.stderr[-2000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+)s", p.stderr)
    tokens, gen_s = int(m.group(1)), float(m.group(2))
    return {"engine": "hf", "tokens": tokens, "process_s": round(wall, 2), "generate_s": gen_s,
            "tokens_per_s_process": round(tokens / wall, 1), "tokens_per_s_generate": round(tokens / gen_s, 1)}


def vllm_rows(args):
    """generate.py's rows for the prompts: [(prompt ids, seed, max new tokens)], sample p of every prompt
    after sample p - 1 of all of them, as generate.py orders them; and the engine those rows need."""
    gargs = generate.parser().parse_args(["--out", "unused", *flags(args)])
    tok = load_tokenizer(args.model)
    prompts = load_prompts(args.prompts)[: args.n_prompts]
    ids = [(r["id"], encode_prompt(tok, r["prompt"])) for r in prompts]
    rows = [(x, generate.sample_seed(gargs.seed, gargs.seed_mode, rid, p), args.max_tokens)
            for p in range(args.k) for rid, x in ids]
    context = generate.context_length(args.model)
    return gargs, rows, lambda: generate.vllm_engine(gargs, len(rows), max(len(x) for _, x in ids), context)


def timed(run, rows, sync):
    sync()
    t0 = time.perf_counter()
    out = run(rows)
    sync()
    seconds = time.perf_counter() - t0
    tokens = sum(len(ids) for ids, _, _ in out)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", default="bench/results/generate.json")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", help="both engines' dtype (generate.py --dtype): bf16 on a GPU")
    ap.add_argument("--rounds", type=int, default=2, help="seeded / unseeded rounds on the started vLLM engine")
    ap.add_argument("--extra", default="--kv-cache-gb 0.25", help="more generate.py flags, one string; give it "
                    "as --extra='--flag value' (default: a CPU's vLLM KV-cache size; on a GPU: --extra=)")
    args = ap.parse_args()
    planned = ["hf", "vllm"] + [f"vllm {kind} round {r + 1}" for r in range(args.rounds) for kind in ("seeded", "unseeded")]
    command = "python bench/bench_generate.py " + " ".join(
        f"--{k.replace('_', '-')}={v!r}" if k == "extra" else f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    live = LiveResults(args.out, planned, benchmark="generate", command=command, machine=machine(), model=args.model,
                       n_prompts=args.n_prompts, k=args.k, max_tokens=args.max_tokens, dtype=args.dtype, rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        hf = run_hf(args, os.path.join(tmp, "hf.jsonl"))
    live.point("hf", rows=[hf])
    print(f"hf: {hf['tokens']} tokens, {hf['process_s']:.1f}s process, {hf['tokens_per_s_generate']:.1f} tok/s generating")

    import torch
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    t0 = time.time()
    gargs, rows, start = vllm_rows(args)
    run = start()
    start_s = time.time() - t0
    first = timed(run, rows, sync)  # seeded, as generate.py samples: the loop's engine, start to finish
    vl = {"engine": "vllm", "tokens": first["tokens"], "start_s": round(start_s, 2), "generate_s": first["seconds"],
          "process_s": round(start_s + first["seconds"], 2), "tokens_per_s_generate": first["tokens_per_s"],
          "tokens_per_s_process": round(first["tokens"] / (start_s + first["seconds"]), 1)}
    live.point("vllm", rows=[hf, vl], vllm_over_hf_process=round(vl["tokens_per_s_process"] / hf["tokens_per_s_process"], 2),
               vllm_over_hf_generate=round(vl["tokens_per_s_generate"] / hf["tokens_per_s_generate"], 2))
    print(f"vllm: start {start_s:.1f}s, {vl['tokens']} tokens, {vl['tokens_per_s_generate']:.1f} tok/s generating; "
          f"vLLM / HF {live.data['vllm_over_hf_generate']}x (generation), {live.data['vllm_over_hf_process']}x (process)")

    # our per-request seeds against none, on the same rows, alternating (the first seeded round above warmed up)
    unseeded = [(ids, None, n) for ids, _, n in rows]
    sampling = {"seeded": [], "unseeded": []}
    for r in range(args.rounds):
        for kind, batch in (("seeded", rows), ("unseeded", unseeded)):
            sampling[kind].append(timed(run, batch, sync))
            rate = {k: median([x["tokens_per_s"] for x in v]) for k, v in sampling.items() if v}
            ratio = rate["unseeded"] / rate["seeded"] if len(rate) == 2 else None
            live.point(f"vllm {kind} round {r + 1}", sampling=sampling, unseeded_over_seeded=ratio and round(ratio, 3))
    print(f"vllm sampling, tokens/s (median of {args.rounds}): seeded {rate['seeded']:.1f}, unseeded "
          f"{rate['unseeded']:.1f}: unseeded / seeded = {ratio:.3f}")
    live.finish()


if __name__ == "__main__":
    main()
