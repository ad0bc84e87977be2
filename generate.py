r"""Stage 1 of SPPO: sample K responses per prompt from the current policy.

    python generate.py --model runs/tiny/world/policy --prompts runs/tiny/world/prompts.jsonl --out gen.jsonl
    # one process per GPU, each on its own shard; merge them in prompt order afterwards (common.merge_shards):
    CUDA_VISIBLE_DEVICES=3 python generate.py --model mistralai/Mistral-7B-Instruct-v0.2 \
        --prompts UCLA-AGI/data-mistral-7b-instruct-sppo-iter1 --out gen.3.jsonl --shard 3/8

Input: JSONL {"id", "prompt"} or {"id", "messages": [{"role", "content"}, ...]} (a conversation ending in the
user turn to answer), or a hub dataset with a `prompt` column. Output: one record per prompt,
{"id", "prompt" (or "messages"), "responses": [K strings], "finish_reasons", "prompt_token_ids",
"response_token_ids": [K lists], "generate": {settings}}. The ids are the truth: `prompt_token_ids` is what the
engine was given and `response_token_ids[k]` what it sampled, ending in the end-of-turn id where the policy
stopped on it (not where --max-tokens cut it). train_sppo.py trains on these ids; re-tokenising the text would
not give them back (a decoded space, or an answer that merges with the template's last token, changes the ids).

Seeds. --seed-mode prompt (default): each prompt samples from its own stream, seeded by hash(seed, id), so
a response depends only on its prompt and the seed, never on batching, sharding or resuming (on a GPU, in vLLM's
batch-invariant mode only: run_loop.sh's BATCH_INVARIANT=1), and no two prompts share a stream. --seed-mode release: the released SPPO code's scheme, one pass per sample index p
with seed + 50*p for every prompt (in vLLM, prompts with equal seeds then draw correlated samples).
"""
import argparse
import hashlib
import os
import re
import sys
import time

from common import (HelpFormatter, InputError, ResumableWriter, check_paths, encode_prompt, load_prompts, load_tokenizer,
                    main_guard, parse_shard, progress, take_shard)

# Before anything imports torch: its CUDA check then asks NVML instead of initialising CUDA. A CUDA initialised in
# this process before vLLM starts its engine process makes that process (forked) die with "CUDA error:
# initialization error"; vLLM sets the same when it is imported, which can be too late (vllm_engine).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def prompt_seed(seed, rid):
    """A 60-bit seed for one prompt; vLLM gives its j-th sample seed + j, so streams stay far apart."""
    return int(hashlib.sha256(f"{seed}:{rid}".encode()).hexdigest()[:15], 16)


def sample_seed(seed, seed_mode, rid, p):
    """The seed of sample p of prompt rid: its own stream (prompt), or the release's seed + 50 p for every
    prompt (the released generate.py's p * 50, with --seed 0)."""
    return seed + 50 * p if seed_mode == "release" else prompt_seed(seed, rid) + p


def cpu_kv_cache_bytes(model, dtype, seqs, seq_len, floor=64 << 20, share=0.25):
    """The KV cache a CPU job needs: bytes per token (2 (K and V) x layers x KV heads x head dim x dtype bytes)
    x the sequences of one engine call (at most vLLM's 256 at a time) x seq_len rounded up to whole 256-token
    blocks; at least floor and one sequence, at most share of the memory available now. Printed on stderr."""
    import psutil
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(model).get_text_config()
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    auto = str(getattr(c, "dtype", None) or "float32").replace("torch.", "")
    size = {"bf16": 2, "fp16": 2, "fp32": 4}.get(dtype) or {"bfloat16": 2, "float16": 2}.get(auto, 4)
    per_token = 2 * c.num_hidden_layers * kv_heads * head_dim * size
    tokens = -(-seq_len // 256) * 256
    need = per_token * min(seqs, 256) * tokens
    ceiling = int(psutil.virtual_memory().available * share)
    chosen = min(max(need, floor, per_token * tokens), ceiling)
    print(f"generate: vLLM KV cache {chosen / 2**30:.3f} GiB on the CPU ({per_token} bytes/token x {min(seqs, 256)} "
          f"sequences x {tokens} tokens = {need / 2**30:.3f} GiB; at least {floor / 2**20:.0f} MiB, at most "
          f"{share:.0%} of the {ceiling / share / 2**30:.1f} GiB available); --kv-cache-gb sets it", file=sys.stderr)
    return chosen


def context_length(model):
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(model), "max_position_embeddings", None) or 1 << 30


def is_memory_error(reason):
    """Whether vLLM's start-up error is about memory (the KV cache, the context it must hold, running out), which
    the memory flags fix; anything else (a CUDA initialisation error, an unsupported model) they would not."""
    return bool(re.search(r"memory|kv[ _-]?cache|max_model_len|max-model-len|out of memory|\boom\b|num_gpu_blocks|"
                          r"cache blocks", reason, re.IGNORECASE))


# -----------------------------------------------------------------------------
# engines: each takes rows [(prompt_ids, seed, max_new_tokens)] and returns [(sampled ids, text, finish_reason)]

VLLM_DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # --dtype -> vLLM's name


def vllm_engine(args, seqs_per_call, longest_prompt, context):
    """vLLM, started for a job of calls of up to seqs_per_call sequences whose prompts are at most
    longest_prompt tokens, for a model of `context` tokens. Any failure to start is one InputError, naming the
    flags that size its memory when it is about memory."""
    # vLLM decides fork or spawn for its engine process by torch.cuda.is_initialized(), which a CUDA check without
    # NVML leaves False while initialising the driver: the forked engine then dies ("CUDA error: initialization
    # error"). So no torch.cuda call here: vLLM is imported first, and its platform says whether this is a CPU.
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform
    cpu = current_platform.is_cpu()
    dtype = VLLM_DTYPES[args.dtype]
    kw = dict(model=args.model, dtype=dtype, seed=args.seed, tensor_parallel_size=args.tensor_parallel_size,
              max_model_len=args.max_model_len, enforce_eager=args.enforce_eager)
    if cpu:
        # On a CPU the engine's extra process only adds start-up time (~20 s) and compilation takes a
        # minute: longer than a tiny model's whole run.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kw["enforce_eager"] = True
        # A step that splits a prompt's prefill (chunked prefill: the step's prompt tokens exceed
        # max_num_batched_tokens, 4096 on a CPU) makes vLLM rewind that request's seeded generator with set_offset,
        # which only CUDA generators have: "CPU Generator does not use offset". Without chunking a prompt is
        # prefilled whole (vLLM then raises the step's budget to at least max_model_len) or waits for the next step.
        kw["enable_chunked_prefill"] = False
    if args.kv_cache_gb:
        kw["kv_cache_memory_bytes"] = int(args.kv_cache_gb * 2**30)
    elif cpu and args.gpu_memory_utilization is None:
        # vLLM's CPU default reserves --gpu-memory-utilization (0.9) of the machine's memory and refuses to
        # start when other work holds some: size the cache for this job instead, and the context to match
        # (vLLM demands room for one sequence of max_model_len, by default the model's whole context).
        kw["max_model_len"] = args.max_model_len or min(context, longest_prompt + args.max_tokens)
        kw["kv_cache_memory_bytes"] = cpu_kv_cache_bytes(args.model, args.dtype, seqs_per_call, kw["max_model_len"])
    else:
        kw["gpu_memory_utilization"] = args.gpu_memory_utilization or 0.9  # vLLM's default
    try:
        llm = LLM(**{k: v for k, v in kw.items() if v is not None})
    except Exception as e:  # one line, and the flags to change only when it is about memory
        reason = " ".join(str(e).split())[:400] or type(e).__name__  # pydantic's errors span lines
        hint = (" -- set its memory with --kv-cache-gb G (the KV cache, in GiB), --gpu-memory-utilization F (the "
                "share of GPU memory, or of CPU memory without --kv-cache-gb) or --max-model-len N (the longest "
                "prompt + response)") if is_memory_error(reason) else " (vLLM's log above has the details)"
        raise InputError(f"vLLM could not start the engine for {args.model}: {type(e).__name__}: {reason}{hint}") from None

    def run(rows):
        params = [SamplingParams(n=1, seed=seed, temperature=args.temperature, top_p=args.top_p,
                                 max_tokens=max_new, skip_special_tokens=True) for _, seed, max_new in rows]
        outs = llm.generate([{"prompt_token_ids": ids} for ids, _, _ in rows], params, use_tqdm=False)
        # token_ids end with the EOS id when the policy stopped on it; the text leaves it out
        return [(list(o.outputs[0].token_ids), o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]
    return run


def hf_engine(args, tok):
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor
    dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos if eos is not None else tok.eos_token_id])

    class RowSampler(LogitsProcessor):
        """Temperature + top-p sampling with one torch.Generator per row, by the Gumbel-max trick: the
        argmax of log p + Gumbel noise is a sample from p. Greedy decoding of these scores therefore samples,
        and each row's draw depends only on its own seed, not on which prompts share the batch. (top_k=0:
        transformers' default top_k=50 would make the HF engine sample a different distribution from vLLM.)"""

        def __init__(self, seeds):
            self.gens = [torch.Generator(device).manual_seed(s) for s in seeds]  # on the GPU: no host draws

        def __call__(self, input_ids, scores):
            if args.temperature == 0:
                return scores
            logp = torch.log_softmax(scores.float() / args.temperature, dim=-1)
            if args.top_p < 1:
                sorted_logp, order = logp.sort(dim=-1, descending=True)
                before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
                drop = (before >= args.top_p).scatter(-1, order, before >= args.top_p)
                logp = logp.masked_fill(drop, -float("inf"))
            u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.gens])
            return logp - torch.log(-torch.log(u.clamp_min(1e-20)))

    @torch.no_grad()
    def run(rows):
        width = max(len(ids) for ids, _, _ in rows)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids, _, _ in rows], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _, _ in rows], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, top_k=None, top_p=None,
                             temperature=None, max_new_tokens=max(m for _, _, m in rows), pad_token_id=pad,
                             eos_token_id=list(eos), logits_processor=[RowSampler([s for _, s, _ in rows])])
        results = []
        for (prompt_ids, _, max_new), new in zip(rows, out[:, width:].tolist()):
            end = next((i for i, t in enumerate(new[:max_new]) if t in eos), None)
            ids = new[:end + 1] if end is not None else new[:max_new]  # the EOS the policy stopped on is kept
            results.append((ids, decode_response(tok, prompt_ids, ids), "stop" if end is not None else "length"))
        return results
    return run


def encode_record(tok, r, source):
    """What the policy is given for a prompt record: its one user turn, or its conversation (`messages`), through
    the chat template. A template that refuses a conversation (a system turn, roles out of order) is an InputError."""
    if "prompt" in r:
        return encode_prompt(tok, r["prompt"])
    try:
        return encode_prompt(tok, r["messages"])
    except InputError:
        raise
    except Exception as e:  # jinja2's TemplateError, raised by the template's own checks (raise_exception)
        raise InputError(f"{source}: id '{r['id']}': field 'messages': the chat template refuses it "
                         f"({type(e).__name__}: {e})".split("\n")[0])


def decode_response(tok, prompt_ids, ids):
    """The text of sampled ids as vLLM's detokenizer gives it: decoded after the prompt's last tokens, so a
    first token '▁Sure' reads ' Sure' (decoding it alone drops the space), control tokens left out."""
    context = prompt_ids[-4:]
    before = tok.decode(context, skip_special_tokens=True)
    text = tok.decode(context + ids, skip_special_tokens=True)
    return text[len(before):] if text.startswith(before) else tok.decode(ids, skip_special_tokens=True)


def pick_engine(name):
    if name != "auto":
        return name
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        return "hf"


# -----------------------------------------------------------------------------

def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory or hub id")
    ap.add_argument("--prompts", required=True, help="JSONL of {id, prompt} or {id, messages}, or a hub dataset "
                    "with a prompt column")
    ap.add_argument("--out", required=True)
    ap.add_argument("--k", type=int, default=5, help="responses per prompt")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-tokens", type=int, default=2048, help="max new tokens per response")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seed-mode", choices=["prompt", "release"], default="prompt")
    ap.add_argument("--engine", choices=["auto", "vllm", "hf"], default="auto")
    ap.add_argument("--shard", default="0/1", help="i/n: this process takes prompts whose position mod n == i")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first N prompts (before --limit and sharding; "
                    "run_loop.sh's SPLIT_PROMPTS gives each iteration the next N_PROMPTS)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (after --skip, before sharding)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto")
    ap.add_argument("--write-every", type=int, default=1000, help="prompts per engine call; finished ones are saved")
    ap.add_argument("--hf-batch-size", type=int, default=64, help="HF engine: sequences per generate() call")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=None, help="vLLM: the share of GPU memory it "
                    "may take (default 0.9); on a CPU, the share of the machine's memory, used only when given")
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="vLLM KV-cache size in GiB (default: on a GPU "
                    "what --gpu-memory-utilization leaves; on a CPU the job's need, 64 MiB to 25%% of available memory)")
    ap.add_argument("--max-model-len", type=int, default=None, help="vLLM: the longest prompt + response (default: "
                    "the model's context; on a CPU without --kv-cache-gb, the longest prompt + --max-tokens)")
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs (faster start)")
    return ap


def main():
    args = parser().parse_args()
    if args.k < 1:
        raise InputError(f"--k {args.k}: need at least 1 response per prompt")

    # --- check everything before loading a model
    shard = parse_shard(args.shard)
    records = load_prompts(args.prompts)
    if args.skip < 0 or (args.skip and args.skip >= len(records)):
        raise InputError(f"{args.prompts}: {len(records)} prompts, none left after --skip {args.skip}")
    records = records[args.skip:][: args.limit]
    records = take_shard(records, shard)
    check_paths([args.prompts], args.out)
    engine = pick_engine(args.engine)
    settings = {"model": args.model, "engine": engine, "k": args.k, "temperature": args.temperature,
                "top_p": args.top_p, "max_tokens": args.max_tokens, "seed": args.seed, "seed_mode": args.seed_mode}
    writer = ResumableWriter(args.out, settings, "generate")
    for r in records:
        old = writer.done.get(r["id"])
        if old is not None and (old.get("prompt"), old.get("messages")) != (r.get("prompt"), r.get("messages")):
            raise InputError(f"{args.prompts}: the prompt of id '{r['id']}' is not the one {args.out} answered; "
                             "use another --out or delete it")
    tok = load_tokenizer(args.model)

    # Prompts longer than the context cannot be answered: skip them, say how many.
    ctx = min(context_length(args.model), args.max_model_len or 1 << 30)
    todo, skipped, keep = [], 0, []
    for r in records:
        ids = encode_record(tok, r, args.prompts)
        if len(ids) >= ctx:
            skipped += 1
            continue
        keep.append(r["id"])
        if r["id"] not in writer.done:
            todo.append((r, ids))
    if skipped:
        print(f"warning: skipped {skipped} prompts longer than the model's context ({ctx} tokens)", file=sys.stderr)
    print(f"generate: {len(keep)} prompts in shard {args.shard}, {len(keep) - len(todo)} already done, "
          f"{len(todo)} to do, K={args.k}, engine={engine}", file=sys.stderr)

    # --- generate
    t0, n_tokens = time.time(), 0
    if todo:
        if engine == "vllm":
            chunk = args.write_every
            run = vllm_engine(args, args.k * min(chunk, len(todo)), max(len(ids) for _, ids in todo), ctx)
        else:
            run = hf_engine(args, tok)
            chunk = max(1, min(args.write_every, args.hf_batch_size // args.k))
        bar = progress(total=len(todo), desc="generate", unit="prompt")
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            rows = []
            for p in range(args.k):
                for r, ids in part:
                    seed = sample_seed(args.seed, args.seed_mode, r["id"], p)
                    rows.append((ids, seed, min(args.max_tokens, ctx - len(ids))))
            results = run(rows)
            out = []
            for i, (r, prompt_ids) in enumerate(part):
                mine = results[i::len(part)]  # sample p of prompt i is row p * len(part) + i
                out.append({**r, "responses": [m[1] for m in mine],  # r: id, and its prompt or messages
                            "finish_reasons": [m[2] for m in mine], "prompt_token_ids": prompt_ids,
                            "response_token_ids": [m[0] for m in mine]})
                n_tokens += sum(len(m[0]) for m in mine)
            writer.write(out)
            bar.update(len(part))
        bar.close()
    writer.close(keep)
    dt = time.time() - t0
    print(f"generate: {len(todo)} prompts, {len(todo) * args.k} responses, {n_tokens} tokens in {dt:.1f}s "
          f"({n_tokens / max(dt, 1e-9):.0f} tokens/s) -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main_guard(main)
