"""Training throughput and memory: train_sppo.py against TRL's DPOTrainer(loss_type="sppo_hard"), the nearest
maintained trainer, with its reference model held (its default) and with precompute_ref_log_probs=True.

    python bench/bench_train.py --out bench/results/train_cpu.json   # narrow random Llama, vocabularies 32k and 128k
    python bench/bench_train.py --model medium --vocab-sizes 600 --out ...   # a wider model, toy vocabulary

Same model, same best/worst pairs (hard targets: W = 1 for the winner, 0 for the loser), same global batch,
micro-batch, optimizer (AdamW), learning rate schedule, gradient clipping, max length and gradient
checkpointing (on for both: TRL's DPOConfig turns it on by default, and the released recipe trains with it).
The default shape is the recipes' real vocabularies (Mistral's 32,000, Llama-3's 128,256) on a narrow model
(2 layers, width 128), where the output layer dominates a step as it does for a 7B model at long responses,
with responses of 20 to 800 tokens. For each vocabulary, first, in this process, both losses are computed on
the same 8 pairs with a policy that differs from its reference: TRL's sppo_hard sums the winner's and the
loser's squared errors where train_sppo.py averages them, so TRL's loss must be exactly 2x ours. Then each
trainer runs in its own fresh process, --repeats times, round-robin; tokens/s = prompt + response tokens of
the trained rows / (reference log-probs + training) seconds, and peak memory is the process's peak RSS (also
given above its RSS after the imports, which differ: TRL imports more; the ratios use that).

    python bench/bench_train.py --model runs/smollm2/base --prompts examples/smollm2/prompts.jsonl \
        --min-tokens 64 --max-tokens 128 --max-length 256 --nprocs 1,2 --cores 2 --out ...   # a real checkpoint

--model DIR trains a checkpoint with its own tokenizer and chat template (--prompts: its prompts instead of toy
questions). --nprocs 1,2 runs each trainer in one process and in two under torchrun, as run_loop.sh launches
train_sppo.py with GPUS=2 (FSDP2; TRL's Trainer: DDP through accelerate; gloo on a CPU), one global batch per
step either way; seconds are rank 0's, memory every rank's, and ours is compared with TRL at the same count.
--cores N shares N threads among a run's processes, so that 1 and 2 processes use the same cores.
"""
import argparse
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from benchutil import ROOT, LiveResults, machine, median, table

# A Llama-style policy: hidden, layers, heads (head_dim 64), MLP width
SIZES = {"tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256),
         "narrow": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
         "medium": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1408),
         "100m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, intermediate_size=2816),
         "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, intermediate_size=8192)}
# Llama-3.2-1B's layers (1.07B parameters; its 128k-token embedding adds 0.26B: --vocab-size 128256)


def rss_mb(field="VmRSS"):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def pad_tokenizer(path, size):
    """Give the saved byte-level BPE tokenizer in `path` exactly `size` tokens: unused ones ("<unused7>") after
    its own, which no text encodes to (no merge makes them) but which decode, so that a model with a real
    vocabulary (Llama-3's 128,256) can sample any id and generate.py / vLLM can turn it into text."""
    from transformers import AutoTokenizer
    file = os.path.join(path, "tokenizer.json")
    with open(file) as f:
        state = json.load(f)
    vocab = state["model"]["vocab"]
    n = len(AutoTokenizer.from_pretrained(path))
    if n != len(vocab) or n > size:
        raise ValueError(f"{path}: cannot pad a tokenizer of {n} tokens ({len(vocab)} in its BPE vocabulary) to {size}")
    vocab.update({f"<unused{i}>": i for i in range(n, size)})
    with open(file, "w") as f:
        json.dump(state, f, ensure_ascii=False)


def random_policy(out, size, vocab_size=None, seed=0, layers=None):
    """A randomly initialised Llama of the given size with the tiny world's kind of tokenizer and chat template
    (600 tokens; vocab_size: a larger embedding and output layer, and as many tokens in the tokenizer, the
    extra ones unused by any text; layers: this many instead of the size's)."""
    import torch
    import world
    from build import build_tokenizer
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM
    pairs = world.corpus(seed, 2000)
    tok = build_tokenizer([p for p, _ in pairs] + [a for _, a in pairs], vocab_size=600)
    if vocab_size and vocab_size > len(tok):
        tok.save_pretrained(out)
        pad_tokenizer(out, vocab_size)
        tok = AutoTokenizer.from_pretrained(out)
    shape = {**SIZES[size], **({"num_hidden_layers": layers} if layers else {})}
    config = LlamaConfig(vocab_size=len(tok), **shape, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def make_pairs(tok, n, lo, hi, seed=0, prompts=None):
    """n (prompt, winner, loser): toy answers cut to a length drawn uniformly from [lo, hi] tokens; the prompts
    are toy questions, or the first n of the JSONL file `prompts` ({"id", "prompt"}: a real model's own)."""
    import world
    from common import load_prompts
    rng = random.Random(seed)
    if prompts:
        path = prompts
        prompts = [r["prompt"] for r in load_prompts(path)][:n]
        if len(prompts) < n:
            raise SystemExit(f"--prompts {path}: {len(prompts)} prompts, --n-prompts asks for {n}")
    out = []
    for prompt in prompts or world.make_prompts(rng, n):
        texts = []
        for _ in range(2):
            target, text = rng.randint(lo, hi), ""
            while len(tok(text)["input_ids"]) < target:
                text += " " + world.make_answer(rng, prompt)
            texts.append(tok.decode(tok(text.strip())["input_ids"][:target]).strip())
        out.append((prompt, *texts))
    return out


def write_data(d, pairs):
    with open(os.path.join(d, "ranked.jsonl"), "w") as f:
        for i, (p, w, l) in enumerate(pairs):
            f.write(json.dumps({"id": f"b{i}", "prompt": p, "responses": [w, l], "win_rate": [1.0, 0.0]}) + "\n")
    with open(os.path.join(d, "pref.json"), "w") as f:
        json.dump([{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": w}],
                    "rejected": [{"role": "assistant", "content": l}]} for p, w, l in pairs], f)


def trl_config(a, out, precompute, **kw):
    """TRL's settings for the same step as ours: under torchrun each of its processes takes micro-batches of
    the global batch, so that one optimizer step sees batch_size pairs whatever the number of processes."""
    from trl import DPOConfig
    world = int(os.environ.get("WORLD_SIZE", 1))
    micro = min(a["micro_batch_size"], a["batch_size"] // world) or 1  # as train_sppo.check_args picks it
    return DPOConfig(output_dir=out, loss_type="sppo_hard", beta=1 / a["eta"], precompute_ref_log_probs=precompute,
                     per_device_train_batch_size=micro, gradient_accumulation_steps=a["batch_size"] // (micro * world),
                     learning_rate=a["lr"], num_train_epochs=1, optim="adamw_torch", lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, max_length=a["max_length"], seed=42,
                     use_cpu=not a["cuda"], bf16=a["cuda"], report_to="none", save_strategy="no", logging_steps=1,
                     disable_tqdm=True, dataloader_num_workers=0,
                     gradient_checkpointing=a["gradient_checkpointing"], **kw)


def trl_trainer(a, model, d, precompute, pairs=None, ref_model=None, **kw):
    """TRL's trainer on DIR/pref.json, read as a dataset on disk (in HF_DATASETS_CACHE): its precompute pass
    writes the reference log-probs next to the dataset's files on rank 0 and every rank reads them back, so
    under torchrun they must share that directory (an in-memory dataset has a temporary one per process)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer
    ds = Dataset.from_json(os.path.join(d, "pref.json"), cache_dir=os.environ.get("HF_DATASETS_CACHE"))
    ds = ds.select(range(pairs)) if pairs else ds
    return DPOTrainer(model=model, ref_model=ref_model, args=trl_config(a, os.path.join(d, "trl_out"), precompute, **kw),
                      train_dataset=ds, processing_class=AutoTokenizer.from_pretrained(a["model"]))


# -----------------------------------------------------------------------------
# the workers: one trainer per fresh process (or per torchrun process); each writes its rank's JSON

def worker(kind, d):
    """One trainer in this process (one of torchrun's, under torchrun): writes its rank's JSON to
    DIR/result.RANK.json (a file: torchrun's processes share one stdout, where lines can interleave)."""
    with open(os.path.join(d, "args.json")) as f:
        a = json.load(f)
    if kind == "check":
        return print(json.dumps(check_losses(a, d)))
    import torch
    # Both sides import the same libraries (TRL, the model's code) before the baseline RSS is read, so "above
    # imports" is the memory of the training itself.
    import trl  # noqa: F401
    from transformers import LlamaForCausalLM  # noqa: F401
    base = rss_mb()
    rank = int(os.environ.get("RANK", 0))
    if kind == "ours":
        seconds, init_s, peak_gpu, steps = ours_worker(a, d, rank)
        # train_sppo.py's group (gloo on a CPU) is gone by now: it destroys it when it finishes
        sharded = int(os.environ.get("WORLD_SIZE", 1)) > 1
        how = f"FSDP2 on {'nccl' if a['cuda'] else 'gloo'}" if sharded else "one process"
    else:
        from transformers import AutoModelForCausalLM
        # no precompute reuse across runs; one directory for all of a run's processes
        os.environ["HF_DATASETS_CACHE"] = os.path.join(d, f"cache_{kind}_{os.environ.get('BENCH_RUN', time.time())}")
        model = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32)
        t0 = time.perf_counter()
        trainer = trl_trainer(a, model, d, precompute=kind == "trl-precompute")  # precompute happens here
        init_s = time.perf_counter() - t0
        how = str(trainer.accelerator.distributed_type).split(".")[-1]  # NO, MULTI_CPU (DDP), MULTI_GPU
        if torch.distributed.is_initialized():
            how += f" on {torch.distributed.get_backend()}"
        trainer.train()
        steps = trainer.state.global_step
        if a["cuda"]:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if a["cuda"] else None
    peak = rss_mb("VmHWM")  # not ru_maxrss: Linux starts a child's at its parent's RSS (the bench's own, here)
    with open(os.path.join(d, f"result.{rank}.json"), "w") as f:
        json.dump({"rank": rank, "distributed": how, "torch_threads": torch.get_num_threads(), "steps": steps,
                   "seconds": seconds, "init_s": init_s, "peak_rss_mb": peak, "rss_after_imports_mb": base,
                   "peak_gpu_gb": peak_gpu}, f)


def ours_worker(a, d, rank):
    """train_sppo.py's main in this process, as its command line runs it: (reference + training seconds,
    reference seconds, peak GPU GB, optimizer steps), from rank 0 (None on the others: it alone prints and writes)."""
    import io
    import runpy
    from contextlib import redirect_stderr
    out = os.path.join(d, "ours_ckpt")
    sys.argv = ["train_sppo.py", "--model", a["model"], "--data", os.path.join(d, "ranked.jsonl"), "--out", out,
                "--eta", str(a["eta"]), "--lr", str(a["lr"]), "--batch-size", str(a["batch_size"]),
                "--micro-batch-size", str(a["micro_batch_size"]), "--optimizer", "adamw", "--warmup-ratio", "0",
                "--max-length", str(a["max_length"]), "--max-prompt-length", str(a["max_length"] // 2)]
    if a["gradient_checkpointing"]:
        sys.argv.append("--gradient-checkpointing")
    err = io.StringIO()
    with redirect_stderr(err):
        runpy.run_path(os.path.join(ROOT, "train_sppo.py"), run_name="__main__")
    if rank:
        return None, None, None, None
    with open(os.path.join(out, "sppo_train.json")) as f:
        stats = json.load(f)["stats"]
    ref_s = float(err.getvalue().split("reference log-probs of")[1].split(" in ")[1].split("s")[0])
    return ref_s + stats["train_seconds"], ref_s, stats["peak_memory_gb"] if a["cuda"] else None, stats["steps"]


# -----------------------------------------------------------------------------

def check_losses(a, d, n=8):
    """TRL's sppo_hard loss and train_sppo.py's on the same n pairs (or all, if fewer), policy != reference:
    {"ours", "trl", "pairs", ...}. "ours" is computed on the token ids TRL trains on, so that the two losses must
    agree whatever the tokenisations; "ours_own_tokens" on train_sppo.py's own, and "trl_extra" the tokens TRL's
    responses add to ours (a chat template that writes "\n" after its end-of-turn token: TRL trains on the whole
    rendered turn, train_sppo.py up to and with the end-of-turn token)."""
    import torch
    import train_sppo
    from common import load_tokenizer
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(a["model"])
    ref = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(a["model"], dtype=torch.float32).eval()
    with torch.no_grad():  # a policy that has moved away from its reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    records = [dict(line=i + 1, **json.loads(s)) for i, s in enumerate(open(os.path.join(d, "ranked.jsonl")))][:n]
    n = len(records)  # fewer when the run has fewer pairs
    settings = argparse.Namespace(select="best-worst", max_length=a["max_length"], truncation="ours",
                                  max_prompt_length=a["max_length"] // 2, data="ranked.jsonl")
    examples, _, _ = train_sppo.tokenize(tok, records, settings)
    win = torch.tensor([[1.0, 0.0]] * n, dtype=torch.float32)

    def our_loss(examples):
        batch = train_sppo.collate(examples, list(range(n)), tok.pad_token_id, "cpu")
        plain = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
        lp, lr_ = (train_sppo.sequence_logps(m, *batch, plain).view(n, 2) for m in (policy, ref))
        return train_sppo.sppo_loss(lp, lr_, win.to(lp.dtype), a["eta"]).mean().item()
    with torch.no_grad():
        a_cpu = {**a, "cuda": False, "micro_batch_size": n, "batch_size": n}
        trainer = trl_trainer(a_cpu, policy, d, False, pairs=n, ref_model=ref)
        theirs = trainer.compute_loss(trainer.model, next(iter(trainer.get_train_dataloader()))).item()
        rows = list(trainer.train_dataset)  # TRL's token ids, in the order of ranked.jsonl
        trl_examples = [{"prompt_ids": r["prompt_ids"], "responses": [r["chosen_ids"], r["rejected_ids"]]}
                        for r in rows]
        both = [(o, t) for e, x in zip(examples, trl_examples) for o, t in zip(e["responses"], x["responses"])]
        extra, same_start = [t[len(o):] for o, t in both], all(t[:len(o)] == o for o, t in both)
        return {"ours": our_loss(trl_examples), "trl": theirs, "pairs": n, "ours_own_tokens": our_loss(examples),
                "same_prompts": [e["prompt_ids"] for e in examples] == [x["prompt_ids"] for x in trl_examples],
                "trl_extra": {"tokens": sum(map(len, extra)), "responses": len(extra), "ours_is_prefix": same_start,
                              "texts": sorted({tok.decode(x) for x in extra if x})}}


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="narrow", help="a checkpoint directory, or a random model size: "
                    + ", ".join(SIZES))
    ap.add_argument("--vocab-sizes", default="32000,128256", help="random model: its vocabularies, one run each")
    ap.add_argument("--n-prompts", type=int, default=16, help="pairs (TRL takes ~10 minutes for 16 at 128k on one "
                    "CPU core)")
    ap.add_argument("--min-tokens", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=800)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts (pairs) per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="prompts (pairs) per forward")
    ap.add_argument("--eta", type=float, default=1000.0, help="1/beta (TRL's beta = 1/eta)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=1)
    # TRL's DPOConfig turns gradient checkpointing on by default, and the released recipe trains with it:
    # both sides get the same setting, or the memory and speed comparison measures checkpointing, not trainers.
    ap.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    ap.add_argument("--runs", default="ours,trl,trl-precompute")
    ap.add_argument("--nprocs", default="1", help="processes per run, e.g. 1,2: each run once per count; more than 1 "
                    "under torchrun (gloo on a CPU: train_sppo.py's FSDP2, TRL's DDP)")
    ap.add_argument("--cores", type=int, default=None, help="share this many threads among each run's processes "
                    "(--cores 2: 1 process x 2 threads, 2 processes x 1 thread), instead of --threads each")
    ap.add_argument("--prompts", default=None, help="a JSONL of {id, prompt}: the first --n-prompts as the pairs' "
                    "prompts (default: toy questions)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the workers (0: torch's default); "
                    "on a shared machine more threads than free cores slow TRL down up to 7x (measured), so 1")
    ap.add_argument("--out", default="bench/results/train.json")
    ap.add_argument("--workdir", default=None, help="keep the models and data here (default: a temporary directory)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    return ap


def bench_one(args, d, vocab_size, cuda, live):
    """Every run of --runs on one model (a random one of this vocabulary, or --model's), each measured point
    appended to live's results as soon as it exists."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    model = args.model
    if model in SIZES:
        model = os.path.join(d, "policy")
        random_policy(model, args.model, vocab_size)
    a = {"model": model, "eta": args.eta, "lr": args.lr, "batch_size": args.batch_size,
         "micro_batch_size": args.micro_batch_size, "max_length": args.max_length, "cuda": cuda,
         "gradient_checkpointing": args.gradient_checkpointing}
    with open(os.path.join(d, "args.json"), "w") as f:
        json.dump(a, f)
    tok = AutoTokenizer.from_pretrained(model)
    pairs = make_pairs(tok, args.n_prompts, args.min_tokens, args.max_tokens, prompts=args.prompts)
    write_data(d, pairs)
    from common import encode_prompt
    lens = [(len(encode_prompt(tok, p)), len(tok(w)["input_ids"]) + 1, len(tok(l)["input_ids"]) + 1) for p, w, l in pairs]
    tokens = sum(2 * p + w + l for p, w, l in lens)  # both rows of every pair, prompt + response (+ end of turn)
    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    print(f"\nmodel {args.model}, vocabulary {config.vocab_size}: {n_params / 1e6:.1f}M parameters; {len(pairs)} pairs, "
          f"responses {min(min(w, l) for _, w, l in lens)}-{max(max(w, l) for _, w, l in lens)} tokens, {tokens} "
          f"tokens in all; batch {args.batch_size} pairs, micro-batch {args.micro_batch_size}; {'cuda' if cuda else 'cpu'}")

    check = worker_run("check", d, args)  # its own process: this one stays small
    ours, theirs = check["ours"], check["trl"]
    name = f"vocabulary {vocab_size or args.model}"  # as main planned it
    result = {"model": args.model, "vocab_size": config.vocab_size, "parameters": n_params, "pairs": len(pairs),
              "tokens": tokens, "loss_check": {**check, "ratio": theirs / ours}}
    live.data["results"].append(result)
    live.point(f"{name}: loss check")
    extra = check["trl_extra"]
    print(f"loss check ({check['pairs']} pairs, policy != reference, W = 1 / 0, TRL's token ids): ours {ours:.6g}, "
          f"TRL sppo_hard {theirs:.6g}, "
          f"TRL / ours = {theirs / ours:.6f} (expected 2: TRL sums the two squared errors, we average them)")
    if extra["tokens"] or not check["same_prompts"]:
        print(f"tokens: TRL's {extra['responses']} responses have {extra['tokens']} more tokens than ours "
              f"({extra['texts']} after ours: {extra['ours_is_prefix']}), prompts equal: {check['same_prompts']}; "
              f"ours on its own tokens {check['ours_own_tokens']:.6g}")
    if abs(theirs / ours - 2) > 1e-4:
        raise SystemExit("the losses disagree: not timing")
    runs = [(r, n) for n in nprocs(args) for r in args.runs.split(",")]
    result["workers"] = {point_name(r, n): [] for r, n in runs}
    for i in range(args.repeats):  # each run in its own fresh process(es), round-robin
        for r, n in runs:
            result["workers"][point_name(r, n)].append(worker_run(r, d, args, n))
            live.point(f"{name}: {point_name(r, n)} #{i + 1}")
    result["rows"] = summarise(result.pop("workers"), tokens, cuda)
    live.point(f"{name}: summary")


def nprocs(args):
    return [int(n) for n in args.nprocs.split(",")]


def threads_per_process(args, n):
    """OMP_NUM_THREADS for each of n processes: --cores shared out among them, else --threads each."""
    return max(1, args.cores // n) if args.cores else args.threads


def point_name(run, n):
    return run if n == 1 else f"{run} x{n}"


def worker_run(kind, d, args, n=1):
    """One worker in a fresh process, or n of them under torchrun (gloo on a CPU, as run_loop.sh launches
    train_sppo.py with GPUS > 1): the seconds of rank 0, every rank's memory, the wall time of the whole launch."""
    env = dict(os.environ, TQDM_DISABLE="1", SPPO_PROGRESS="0", TOKENIZERS_PARALLELISM="false",
               BENCH_RUN=str(time.time_ns()))
    threads = threads_per_process(args, n)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    launch = [sys.executable]
    if n > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
    for old in glob.glob(os.path.join(d, "result.*.json")):
        os.remove(old)
    t0 = time.perf_counter()
    p = subprocess.run([*launch, os.path.abspath(__file__), "--worker", kind, "--dir", d],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"worker {kind} x{n} failed (exit {p.returncode}; -9: killed, out of memory?):\n"
                         f"{p.stdout[-1000:]}\n{p.stderr[-3000:]}")
    subprocess.run(["rm", "-rf", os.path.join(d, "ours_ckpt"), os.path.join(d, "trl_out")])
    if kind == "check":
        return json.loads(p.stdout.strip().splitlines()[-1])
    ranks = []
    for rank in range(n):
        with open(os.path.join(d, f"result.{rank}.json")) as f:
            ranks.append(json.load(f))
    return {**ranks[0], "run": kind, "processes": n, "threads": threads, "process_s": round(wall, 2),
            "peak_rss_mb": [r["peak_rss_mb"] for r in ranks],
            "rss_after_imports_mb": [r["rss_after_imports_mb"] for r in ranks],
            "load_average": [round(x, 2) for x in os.getloadavg()]}


NAMES = {"ours": "train_sppo.py", "trl": "TRL DPOTrainer sppo_hard (ref model)",
         "trl-precompute": "TRL sppo_hard, precompute_ref_log_probs"}


def summarise(results, tokens, cuda):
    """Medians per (processes, run), and ours against each at the same number of processes: speed-up
    (tokens/s) and memory ratio (GPU memory, or RSS above the imports summed over the processes on a CPU)."""
    rows = []
    for xs in results.values():
        n, r = xs[0]["processes"], xs[0]["run"]
        s = median([x["seconds"] for x in xs])
        peaks = [median([x["peak_rss_mb"][i] for x in xs]) for i in range(n)]
        above = [p - median([x["rss_after_imports_mb"][i] for x in xs]) for i, p in enumerate(peaks)]
        rows.append({"run": NAMES[r], "processes": n, "threads": xs[0]["threads"], "seconds": s,
                     "tokens_per_s": tokens / s, "process_s": median([x["process_s"] for x in xs]),
                     "peak_rss_mb": peaks[0] if n == 1 else peaks, "peak_rss_mb_sum": sum(peaks),
                     "above_imports_mb": sum(above), "peak_gpu_gb": xs[0]["peak_gpu_gb"], "all": xs})
    for row in rows:
        mine = next(x for x in rows if x["processes"] == row["processes"])  # ours comes first at each count
        one = next((x for x in rows if x["run"] == row["run"] and x["processes"] == 1), None)
        row["ours_speedup"] = mine["tokens_per_s"] / row["tokens_per_s"]
        row["ours_memory_ratio"] = (mine["peak_gpu_gb"] / row["peak_gpu_gb"] if cuda
                                    else mine["above_imports_mb"] / row["above_imports_mb"])
        row["over_one_process"] = one and row["tokens_per_s"] / one["tokens_per_s"]
        each = [row["peak_rss_mb"]] if row["processes"] == 1 else row["peak_rss_mb"]
        row["peak_rss_each"] = " / ".join(f"{p:.0f}" for p in each)
    cols = [("processes", "procs", "{}"), ("threads", "threads", "{}"), ("run", "run", "{}"),
            ("seconds", "s (median)", "{:.1f}"), ("tokens_per_s", "tokens/s", "{:.0f}"),
            ("process_s", "process s", "{:.1f}"), ("peak_rss_each", "peak RSS MB each", "{}"),
            ("above_imports_mb", "above imports MB (sum)", "{:.0f}")]
    if cuda:
        cols.append(("peak_gpu_gb", "peak GPU GB", "{:.2f}"))
    table(rows, cols + [("ours_speedup", "ours x faster", "{:.2f}"), ("ours_memory_ratio", "ours / its memory",
                         "{:.2f}"), ("over_one_process", "x 1 process", "{:.2f}")])
    return rows


def main():
    args = parser().parse_args()
    if args.worker:
        return worker(args.worker, args.dir)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    vocabs = [int(v) for v in args.vocab_sizes.split(",")] if args.model in SIZES else [None]
    command = "python bench/bench_train.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v not in (None, False) and k not in ("worker", "dir", "gradient_checkpointing")
        and not (k == "vocab_sizes" and args.model not in SIZES) and not (k == "threads" and args.cores))
    planned = [f"vocabulary {v or args.model}: {point}" for v in vocabs for point in
               ["loss check", *(f"{point_name(r, n)} #{i + 1}" for i in range(args.repeats) for n in nprocs(args)
                                for r in args.runs.split(",")), "summary"]]
    live = LiveResults(args.out, planned, benchmark="train", machine=machine(), results=[],
                       command=command + ("" if args.gradient_checkpointing else " --no-gradient-checkpointing"))
    for v in vocabs:
        with tempfile.TemporaryDirectory() as tmp:
            d = os.path.join(args.workdir, str(v)) if args.workdir else tmp
            os.makedirs(d, exist_ok=True)
            bench_one(args, d, v, cuda, live)
    live.finish()

if __name__ == "__main__":
    main()
