"""vLLM called directly, as a user samples K answers per prompt without this project: `LLM(model, dtype, seed)`
and one `llm.generate` call on the prompts rendered with the model's chat template, with
`SamplingParams(n=K, ...)`; vLLM's defaults for everything else. bench_generate.py --mode direct runs it as its
own process, against generate.py.

    python bench/vllm_direct.py --model runs/smollm2/base --prompts examples/smollm2/prompts.jsonl \
        --n-prompts 32 --k 3 --max-tokens 64 --dtype float32 [--kv-cache-gb 1.0]

--kv-cache-gb: on a CPU vLLM's default reserves 90% of the machine's memory and refuses to start when other work
holds some of it, so a CPU user has to size the cache. Prints one JSON line: the seconds to start the engine and
to generate, the response tokens, and every prompt's token ids (for the check that both sides were given the same).
"""
import argparse
import json
import time


def main():
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSONL of {id, prompt}")
    ap.add_argument("--n-prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams
    with open(args.prompts) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: args.n_prompts]
    kw = {"kv_cache_memory_bytes": int(args.kv_cache_gb * 2**30)} if args.kv_cache_gb else {}
    t1 = time.perf_counter()
    llm = LLM(model=args.model, dtype=args.dtype, seed=args.seed, **kw)
    t2 = time.perf_counter()
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    params = SamplingParams(n=args.k, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens)
    outs = llm.generate(texts, params, use_tqdm=False)
    t3 = time.perf_counter()
    print(json.dumps({"imports_s": round(t1 - t0, 2), "start_s": round(t2 - t1, 2), "generate_s": round(t3 - t2, 2),
                      "tokens": sum(len(c.token_ids) for o in outs for c in o.outputs),
                      "stopped": sum(c.finish_reason == "stop" for o in outs for c in o.outputs),
                      "prompt_token_ids": [list(o.prompt_token_ids) for o in outs]}))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which imports this module again
    main()
