"""Generation throughput: generate.py's vLLM engine against its Hugging Face engine, same prompts, K, tokens.

    python bench/bench_generate.py --model runs/tiny/world/policy --prompts runs/tiny/world/prompts.jsonl \
        --out bench/results/generate.json [--n-prompts 64] [--k 5] [--max-tokens 64] [--extra='--dtype bf16']

Each engine runs as its own generate.py process (as the loop runs it); the time is the whole process,
engine start included, and tokens/s counts the response tokens both engines report.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from benchutil import machine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_engine(args, engine, out):
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), "--model", args.model, "--prompts", args.prompts,
           "--out", out, "--engine", engine, "--limit", str(args.n_prompts), "--k", str(args.k),
           "--max-tokens", str(args.max_tokens), *shlex.split(args.extra)]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, SPPO_PROGRESS="0"))
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"generate.py --engine {engine} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+)s", p.stderr)
    tokens, gen_s = int(m.group(1)), float(m.group(2))
    return {"engine": engine, "tokens": tokens, "process_s": round(wall, 2), "generate_s": gen_s,
            "tokens_per_s_process": round(tokens / wall, 1), "tokens_per_s_generate": round(tokens / gen_s, 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", default="bench/results/generate.json")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--extra", default="--kv-cache-gb 0.25", help="more generate.py flags, one string; give it "
                    "as --extra='--flag value' (default: a CPU's vLLM KV-cache size; on a GPU: --extra=)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("hf", "vllm"):
            rows.append(run_engine(args, engine, os.path.join(tmp, f"{engine}.jsonl")))
    hf, vl = rows
    result = {"benchmark": "generate", "command": "python bench/bench_generate.py " + " ".join(
                  f"--{k.replace('_', '-')}={v!r}" if k == "extra" else f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
              "machine": machine(), "model": args.model, "n_prompts": args.n_prompts, "k": args.k, "max_tokens": args.max_tokens,
              "rows": rows, "vllm_over_hf_process": round(vl["tokens_per_s_process"] / hf["tokens_per_s_process"], 2),
              "vllm_over_hf_generate": round(vl["tokens_per_s_generate"] / hf["tokens_per_s_generate"], 2)}
    print(f"{'engine':8s} {'tokens':>8s} {'process s':>10s} {'tok/s (process)':>16s} {'tok/s (generate)':>17s}")
    for r in rows:
        print(f"{r['engine']:8s} {r['tokens']:8d} {r['process_s']:10.1f} {r['tokens_per_s_process']:16.1f} "
              f"{r['tokens_per_s_generate']:17.1f}")
    print(f"vLLM / HF: {result['vllm_over_hf_process']}x (whole process), {result['vllm_over_hf_generate']}x (generation only)")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
