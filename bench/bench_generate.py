"""Generation throughput: generate.py's vLLM engine against its Hugging Face engine, same prompts, K, tokens and
dtype; and vLLM's sampling with our per-request seeds against unseeded sampling on the same prompts. --mode direct:
generate.py against vLLM called directly, as a user would without this project.

    python bench/bench_generate.py --model runs/tiny/world/policy --prompts runs/tiny/world/prompts.jsonl \
        --out bench/results/generate.json [--n-prompts 64] [--k 5] [--max-tokens 64] [--dtype fp32] [--extra='...']
    python bench/bench_generate.py --mode direct --model runs/smollm2/base --prompts examples/smollm2/prompts.jsonl \
        --n-prompts 32 --k 3 --max-tokens 64 --out bench/results/generate_smollm2_cpu.json [--repeats 2]

HF: generate.py --engine hf as its own process (as the loop runs it); its time is the whole process, model
load included. vLLM: generate.py's own engine (generate.vllm_engine, started as generate.py starts it) in this
process, timed from its start; then, on the started engine, rounds of the same rows with our seeds (one per
request: hash(seed, id) + p) and without any (vLLM's batched sampler; a seeded request takes a per-request
generator path, estimated 15-40% slower on a GPU). tokens/s counts the response tokens the engines report.
Every measured point is written to --out as soon as it exists (benchutil.LiveResults).

--mode direct, --repeats rounds, the two sides alternating, each its own process: generate.py --engine vllm as the
loop runs it (its own KV-cache sizing, per-request seeds, chunked prefill off on a CPU; its timer: engine start +
generation), and bench/vllm_direct.py: LLM(model, dtype, seed) and one llm.generate of the same prompts rendered
with the chat template, SamplingParams(n=K), vLLM's defaults otherwise (on a CPU given the KV cache generate.py
sizes for this job, at least one sequence of the model's context: vLLM's own default does not start beside other
work). Both are given the same prompt token ids (checked); tokens/s over the whole process and over engine start +
generation.
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

from benchutil import LiveResults, machine, median

import generate  # noqa: E402  (first: it makes torch's CUDA check NVML-based before torch is imported)
from common import encode_prompt, load_prompts, load_tokenizer, read_jsonl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flags(args):
    return ["--model", args.model, "--prompts", args.prompts, "--limit", str(args.n_prompts), "--k", str(args.k),
            "--max-tokens", str(args.max_tokens), "--dtype", args.dtype, *shlex.split(args.extra)]


def run_generate(args, out, engine="hf"):
    """generate.py --engine ENGINE as its own process, as the loop runs it: the response tokens, the whole
    process's seconds and generate.py's own (engine start + generation)."""
    cmd = [sys.executable, os.path.join(ROOT, "generate.py"), *flags(args), "--out", out, "--engine", engine]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, SPPO_PROGRESS="0"))
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"generate.py --engine {engine} failed:\n{p.stderr[-2000:]}")
    m = re.search(r"(\d+) tokens in ([\d.]+)s", p.stderr)
    tokens, gen_s = int(m.group(1)), float(m.group(2))
    return {"engine": engine, "tokens": tokens, "process_s": round(wall, 2), "generate_s": gen_s,
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


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["engines", "direct"], default="engines", help="engines: generate.py's vLLM "
                    "engine against its HF engine; direct: generate.py against vLLM called directly")
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", default="bench/results/generate.json")
    ap.add_argument("--n-prompts", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", help="both sides' dtype (generate.py --dtype): bf16 on a GPU")
    ap.add_argument("--rounds", type=int, default=2, help="seeded / unseeded rounds on the started vLLM engine")
    ap.add_argument("--repeats", type=int, default=2, help="--mode direct: rounds of both sides, alternating")
    ap.add_argument("--extra", default=None, help="more generate.py flags, one string; give it as --extra='--flag "
                    "value' (default: --mode engines, a CPU's vLLM KV-cache size, '--kv-cache-gb 0.25', and on a GPU "
                    "--extra=; --mode direct, none: generate.py as the loop runs it)")
    return ap


def main():
    args = parser().parse_args()
    if args.extra is None:
        args.extra = "--kv-cache-gb 0.25" if args.mode == "engines" else ""
    command = "python bench/bench_generate.py " + " ".join(
        f"--{k.replace('_', '-')}={v!r}" if k == "extra" else f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    (engines if args.mode == "engines" else direct)(args, command)


def engines(args, command):
    planned = ["hf", "vllm"] + [f"vllm {kind} round {r + 1}" for r in range(args.rounds)
                                for kind in ("seeded", "unseeded")]
    live = LiveResults(args.out, planned, benchmark="generate", command=command, machine=machine(), model=args.model,
                       n_prompts=args.n_prompts, k=args.k, max_tokens=args.max_tokens, dtype=args.dtype, rows=[])
    with tempfile.TemporaryDirectory() as tmp:
        hf = run_generate(args, os.path.join(tmp, "hf.jsonl"))
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


def direct_kv_cache_gb(args):
    """The KV cache to give vLLM called directly: on a CPU what generate.py sizes for this job (its longest prompt
    + --max-tokens, K x the prompts), and at least one sequence of the model's whole context, which vLLM's default
    max_model_len demands to start; on a GPU none (vLLM's default share of the GPU)."""
    import torch
    if torch.cuda.is_available():
        return None
    tok = load_tokenizer(args.model)
    longest = max(len(encode_prompt(tok, r["prompt"])) for r in load_prompts(args.prompts)[: args.n_prompts])
    context = generate.context_length(args.model)
    seq = min(context, longest + args.max_tokens)
    job = generate.cpu_kv_cache_bytes(args.model, args.dtype, args.k * args.n_prompts, seq)
    one = generate.cpu_kv_cache_bytes(args.model, args.dtype, 1, context + 256)  # a block to spare: vLLM rounds
    return max(job, one) / 2**30


def run_direct(args, kv_gb):
    """bench/vllm_direct.py as its own process: its JSON line, with the whole process's seconds."""
    dtype = generate.VLLM_DTYPES[args.dtype]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "vllm_direct.py"), "--model", args.model, "--prompts",
           args.prompts, "--n-prompts", str(args.n_prompts), "--k", str(args.k), "--max-tokens", str(args.max_tokens),
           "--dtype", dtype, *(["--kv-cache-gb", str(kv_gb)] if kv_gb else [])]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if p.returncode != 0:
        sys.exit(f"vllm_direct.py failed:\n{p.stderr[-3000:]}")
    out = json.loads(next(line for line in reversed(p.stdout.splitlines()) if line.startswith("{")))  # vLLM logs too
    busy = out["start_s"] + out["generate_s"]
    return {"side": "vllm direct", "tokens": out["tokens"], "stopped": out["stopped"], "process_s": round(wall, 2),
            "start_s": out["start_s"], "generate_s": out["generate_s"], "start_and_generate_s": round(busy, 2),
            "tokens_per_s_process": round(out["tokens"] / wall, 1),
            "tokens_per_s_start_and_generate": round(out["tokens"] / busy, 1),
            "tokens_per_s_generate": round(out["tokens"] / out["generate_s"], 1)}, out["prompt_token_ids"]


def run_ours(args, tmp):
    """generate.py --engine vllm as the loop runs it: its row, and the prompt token ids it wrote."""
    out = os.path.join(tmp, "generated.jsonl")
    row = run_generate(args, out, "vllm")
    records = [r for _, r in read_jsonl(out)]
    stopped = sum(r == "stop" for x in records for r in x["finish_reasons"])
    return {"side": "generate.py", "tokens": row["tokens"], "stopped": stopped, "process_s": row["process_s"],
            "start_and_generate_s": row["generate_s"], "tokens_per_s_process": row["tokens_per_s_process"],
            "tokens_per_s_start_and_generate": row["tokens_per_s_generate"]}, [x["prompt_token_ids"] for x in records]


def direct(args, command):
    """generate.py against vLLM called directly, --repeats rounds alternating; ratios of the medians."""
    planned = [f"{side} round {r + 1}" for r in range(args.repeats) for side in ("generate.py", "vllm direct")]
    kv_gb = direct_kv_cache_gb(args)
    live = LiveResults(args.out, planned, benchmark="generate direct", command=command, machine=machine(),
                       model=args.model, n_prompts=args.n_prompts, k=args.k, max_tokens=args.max_tokens,
                       dtype=args.dtype, direct_kv_cache_gb=kv_gb and round(kv_gb, 4), rows=[])
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            ours, ids = run_ours(args, tmp)
        theirs, their_ids = run_direct(args, kv_gb)
        if their_ids != ids:
            sys.exit("vllm_direct.py gave vLLM other prompt token ids than generate.py did: not comparable")
        for row in (ours, theirs):
            row.update(round=r + 1, load_average=[round(x, 2) for x in os.getloadavg()])
            live.data["rows"].append(row)
            live.point(f"{row['side']} round {r + 1}")
            print(f"{row['side']} round {r + 1}: {row['tokens']} tokens, process {row['process_s']:.1f}s "
                  f"({row['tokens_per_s_process']} tok/s), start + generate {row['start_and_generate_s']:.1f}s "
                  f"({row['tokens_per_s_start_and_generate']} tok/s)", flush=True)
    rate = {side: {key: median([x[key] for x in live.data["rows"] if x["side"] == side])
                   for key in ("tokens_per_s_process", "tokens_per_s_start_and_generate")}
            for side in ("generate.py", "vllm direct")}
    ratios = {f"ours_over_direct_{key[len('tokens_per_s_'):]}":
              round(rate["generate.py"][key] / rate["vllm direct"][key], 2) for key in rate["generate.py"]}
    print(f"medians of {args.repeats}: {rate}; generate.py / vLLM direct: {ratios}")
    live.finish(medians=rate, **ratios)


if __name__ == "__main__":
    main()
