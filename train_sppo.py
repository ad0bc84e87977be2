"""Stage 3 of SPPO: train pi_{t+1} from pi_t on ranked responses, and write a checkpoint the next iteration loads.

    python train_sppo.py --model runs/tiny/world/policy --data ranked.jsonl --out runs/tiny/iter1/policy \
        --lr 3e-4 --eta 5 --optimizer adamw --batch-size 32
    # 8 GPUs, the released recipe (parameters sharded with FSDP2, bf16 compute, fp32 master weights):
    torchrun --nproc_per_node 8 train_sppo.py --model mistralai/Mistral-7B-Instruct-v0.2 \
        --data ranked.jsonl --out runs/mistral/iter1/policy --gradient-checkpointing

Input: ranked JSONL records {"id", "prompt", "responses": [K], "win_rate": [K], "probs": KxK (optional), ...}.
Output: OUT/, a save_pretrained directory (safetensors, config, generation config, tokenizer with its chat
template) plus OUT/train_log.jsonl (one line per optimizer step) and OUT/sppo_train.json (settings, stats).
OUT appears only when complete (it is written as OUT.tmp and renamed); a rerun with the same settings and
data finds it and does nothing; with other settings it is refused.

The objective (paper eq. 3.6, eta = 1/beta), per trained response y of prompt x, with W(y) its win rate
against the other samples of pi_t:
    L = ( log pi_theta(y|x) - log pi_t(y|x) - eta * (W(y) - 1/2) )^2
--select best-worst (default, the released code) trains the argmax and argmin of W per prompt;
--select all trains every sampled response (the paper's Algorithm 1). The loss is the mean over the trained
responses of the global batch (--batch-size counts prompts, summed over processes).

Reference log-probs log pi_t(y|x) are computed once, with the starting weights, before the first update, in
exactly the micro-batches the first epoch trains on; so training holds one model, and at step 1 every
log-ratio is 0 and the loss is mean (eta (W - 1/2))^2.

Under torchrun each process computes the reference for its own micro-batches and they are shared; the
global batch of step s is the same set of prompts for any number of processes, so 1 and N processes give
the same losses (up to float summation order). Each process loads the full model on the CPU before it is
sharded: 8 x 28 GB of host memory for a 7B model in fp32.
"""
import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import time

from common import InputError, check_number, check_paths, fault_point, field, main_guard, read_jsonl


# -----------------------------------------------------------------------------
# the loss

def sppo_loss(policy_logps, ref_logps, win_rates, eta):
    """Per-response SPPO squared error, unreduced:  (log pi_theta(y|x) - log pi_t(y|x) - eta (W(y) - 1/2))^2.

    policy_logps, ref_logps: sums of log-probs over the response tokens of y, under the model being trained
    and under pi_t; win_rates: W(y) = P(y beats pi_t | x) in [0, 1]; all of one shape. eta = 1/beta.
    The regression target eta (W - 1/2) asks a response that wins more than half its games to gain
    log-probability in proportion to its margin, and a losing one to lose it.
    """
    return (policy_logps - ref_logps - eta * (win_rates - 0.5)) ** 2


def select_responses(win_rate, how):
    """Indices of the responses trained on: best and worst by W (the release, first index on ties), or all."""
    if how == "all":
        return list(range(len(win_rate)))
    best = max(range(len(win_rate)), key=lambda i: (win_rate[i], -i))
    worst = min(range(len(win_rate)), key=lambda i: (win_rate[i], i))
    return [best, worst]


# -----------------------------------------------------------------------------
# data: checked in full before any model is loaded

def read_ranked(path, select):
    """[{"prompt", "responses", "win_rate"}] from ranked JSONL; every fault is an InputError naming file:line."""
    records, k0 = [], None
    for n, rec in read_jsonl(path):
        prompt = field(path, n, rec, "prompt", str)
        responses = field(path, n, rec, "responses", list)
        if "win_rate" not in rec:
            raise InputError(f"{path}:{n}: field 'win_rate' is missing (rank the responses with rank.py first)")
        win_rate = field(path, n, rec, "win_rate", list)
        k = len(responses)
        if k0 is None:
            k0 = k
        if k != k0:
            raise InputError(f"{path}:{n}: field 'responses' has K={k} responses, the first record has K={k0}")
        if k < (2 if select == "best-worst" else 1):
            raise InputError(f"{path}:{n}: field 'responses' has K={k} responses; --select {select} needs at least 2")
        if not all(isinstance(r, str) for r in responses):
            raise InputError(f"{path}:{n}: field 'responses' should hold strings")
        if len(win_rate) != k:
            raise InputError(f"{path}:{n}: field 'win_rate' has {len(win_rate)} values for K={k} responses")
        for w in win_rate:
            check_number(path, n, "win_rate", w, 0, 1)
        if "probs" in rec:
            probs = field(path, n, rec, "probs", list)
            if len(probs) != k or not all(isinstance(row, list) and len(row) == k for row in probs):
                raise InputError(f"{path}:{n}: field 'probs' should be a {k}x{k} matrix")
            for row in probs:
                for p in row:
                    check_number(path, n, "probs", p, 0, 1)
        records.append({"line": n, "prompt": prompt, "responses": responses, "win_rate": [float(w) for w in win_rate]})
    if not records:
        raise InputError(f"{path}: no records")
    return records


def response_tokens(tok, prompt_ids, prompt, response, eos):
    """The tokens the chat template adds for the assistant turn, ending in exactly one end-of-turn token."""
    full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                   tokenize=False)
    full = tok(full, add_special_tokens=False)["input_ids"]
    if full[:len(prompt_ids)] != prompt_ids:
        raise InputError("the chat template's prompt tokens are not a prefix of its prompt + answer tokens "
                         "(the template or tokenizer merges across the turn boundary); cannot find the answer")
    ids = full[len(prompt_ids):]
    # Some templates put a newline after the end-of-turn token (ChatML); it is not the model's to predict.
    last = max((i for i, t in enumerate(ids) if t in eos), default=None)
    if last is None or tok.decode(ids[last + 1:]).strip():
        raise InputError("the chat template does not end the assistant turn with an end-of-turn token "
                         f"{sorted(eos)}; cannot tell where a response ends")
    ids = ids[:last + 1]
    if sum(t in eos for t in ids) != 1:
        raise InputError("a response contains an end-of-turn token of its own")
    return ids


def tokenize(tok, records, select, max_length, max_prompt_length, eos, path):
    """One example per prompt: its prompt ids, the selected responses' ids, their W. Counts truncations."""
    from generate import encode_prompt  # the exact prompt tokens the policy sampled from
    examples, cut_prompts, cut_responses = [], 0, 0
    for r in records:
        prompt_ids = encode_prompt(tok, r["prompt"])
        picked = select_responses(r["win_rate"], select)
        try:
            answers = [response_tokens(tok, prompt_ids, r["prompt"], r["responses"][i], eos) for i in picked]
        except InputError as e:
            raise InputError(f"{path}:{r['line']}: {e}")
        if len(prompt_ids) > max_prompt_length:
            # Keep the end of a long prompt (the question is usually last), and its BOS.
            keep_bos = prompt_ids[0] == tok.bos_token_id and tok.bos_token_id is not None
            prompt_ids = prompt_ids[:1] * keep_bos + prompt_ids[len(prompt_ids) - max_prompt_length + keep_bos:]
            cut_prompts += 1
        room = max_length - len(prompt_ids)
        cut_responses += sum(len(a) > room for a in answers)
        examples.append({"prompt": prompt_ids, "responses": [a[:room] for a in answers],
                         "win_rate": [r["win_rate"][i] for i in picked]})
    return examples, cut_prompts, cut_responses


def make_schedule(examples, epochs, batch_size, micro, seed):
    """steps[s] = the micro-batches (lists of example indices) of optimizer step s, batch_size // micro of them.

    Each epoch is a seeded permutation cut into consecutive global batches; a batch is sorted by length so a
    micro-batch pads little. Process r of N takes micro-batches r, r+N, ...: the global batch, and each
    micro-batch in it, is the same for any N. A short last batch leaves some micro-batches empty.
    """
    import torch
    length = [max(len(e["prompt"]) + len(a) for a in e["responses"]) for e in examples]
    steps = []
    for epoch in range(epochs):
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(perm), batch_size):
            batch = sorted(perm[start:start + batch_size], key=lambda i: (length[i], i))
            steps.append([batch[j:j + micro] for j in range(0, batch_size, micro)])
    return steps


def collate(examples, ids, pad, device):
    """Left-padded prompt+response rows for the micro-batch, so every response ends at the last column;
    labels mark the response tokens only. Position ids count real tokens, so padding changes nothing."""
    import torch
    rows = [(e["prompt"], a) for e in (examples[i] for i in ids) for a in e["responses"]]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        input_ids[i, width - len(p) - len(a):] = torch.tensor(p + a)
        labels[i, width - len(a):] = torch.tensor(a)
        mask[i, width - len(p) - len(a):] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def sequence_logps(model, input_ids, mask, labels, autocast, chunk_elements=2**24):
    """log pi(y|x): the sum of the response tokens' log-probs, one per row; [rows] float32.

    input_ids, mask, labels: [rows, T] from collate (labels -100 off the response). The model's forward gives
    hidden [rows, T, width], the final norm's output that lm_head reads; position j predicts token j + 1, so
    the M response tokens are predicted by hidden[:, :-1][valid], [M, width], valid = labels[:, 1:] != -100.
    Memory: the logits, [M, vocabulary], are the largest tensor of a step (3,200 tokens x 128,256 x 4 bytes
    = 1.6 GB, and as much again for their gradient), so they are never made whole: logps.token_logps
    computes lm_head + logsumexp + gather over chunks of positions, recomputed chunk by chunk in the
    backward pass. The model itself computes the logits of its last position only (logits_to_keep=1).

    FSDP2: lm_head's weight is read after the model's forward has returned. The model is FSDP's root, whose
    forward gathers the root's parameters (embeddings, final norm, lm_head); by FSDP2's default the root
    keeps them gathered until its backward has reduced their gradients, so this is the full weight, and its
    gradient reaches FSDP as lm_head's own would.
    """
    import torch
    from logps import token_logps
    head = model.get_output_embeddings()  # logits = hidden @ head.weight^T: no bias, soft-capping or scaling
    if head.bias is not None:
        raise ValueError("sequence_logps: lm_head has a bias, which the chunked log-probs do not add")
    valid = labels[:, 1:] != -100
    with autocast():
        hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        if hasattr(head.weight, "full_tensor"):
            raise RuntimeError("lm_head's weight is still sharded after the forward: shard the root model with "
                               "fully_shard's default reshard_after_forward, which keeps it gathered")
        logp = token_logps(hidden[:, :-1][valid], head.weight, labels[:, 1:][valid], chunk_elements)
    row = valid.nonzero()[:, 0]  # the row of each of the M tokens: their sums are the rows' log pi(y|x)
    return torch.zeros(len(labels), dtype=logp.dtype, device=logp.device).index_add(0, row, logp)


def lr_factor(step, total, warmup, kind):
    """Hugging Face's schedules (the release trains with the HF Trainer): step 0 of a warm-up runs at lr 0."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))
    return max(0.0, 1 - progress)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_existing(out, settings):
    """True when OUT is a finished run of these settings; an InputError when it was made otherwise."""
    if not os.path.exists(out):
        return False
    meta = os.path.join(out, "sppo_train.json")
    if not os.path.isfile(meta):
        raise InputError(f"--out {out}: exists and is not a train_sppo.py checkpoint (no sppo_train.json); "
                         "choose another --out or delete it")
    with open(meta) as f:
        old = json.load(f).get("settings", {})
    for name, value in settings.items():
        if old.get(name) != value:
            raise InputError(f"--out {out}: was made with {name}={old.get(name)!r}, this run has {name}={value!r}; "
                             f"use another --out or delete {out}")
    return True


# -----------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="pi_t: checkpoint directory or hub id")
    ap.add_argument("--data", required=True, help="ranked JSONL (rank.py's output)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (pi_{t+1})")
    ap.add_argument("--eta", type=float, default=1000.0, help="1/beta; the release uses beta = 0.001")
    ap.add_argument("--select", choices=["best-worst", "all"], default="best-worst")
    ap.add_argument("--lr", type=float, default=5e-7)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per optimizer step, over all processes")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="prompts per forward pass")
    ap.add_argument("--optimizer", choices=["rmsprop", "adamw"], default="rmsprop")
    ap.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (HF Trainer's "
                    "default, so the release's); 0 turns clipping off")
    ap.add_argument("--max-length", type=int, default=1024, help="max prompt + response tokens")
    ap.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their end")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="compute dtype; auto: bf16 on a GPU, fp32 on a CPU (master weights stay fp32)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    ddp = "RANK" in os.environ  # launched by torchrun
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0

    def print0(*a):
        if master:
            print(*a, file=sys.stderr, flush=True)

    # --- check everything before loading a model
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length", "max_prompt_length"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not (args.lr > 0 and args.eta > 0 and 0 <= args.warmup_ratio < 1 and args.max_grad_norm >= 0):
        raise InputError("need --lr > 0, --eta > 0, 0 <= --warmup-ratio < 1 and --max-grad-norm >= 0")
    if args.max_prompt_length >= args.max_length:
        raise InputError(f"--max-prompt-length {args.max_prompt_length} leaves no room for a response "
                         f"in --max-length {args.max_length}")
    micro = min(args.micro_batch_size, args.batch_size // world) or 1
    if args.batch_size % (micro * world):
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {micro} "
                         f"x {world} processes")
    records = read_ranked(args.data, args.select)
    check_paths([args.data, args.model], args.out)
    import torch  # after the checks: a bad input is reported in a fraction of a second, not after its import
    cuda = torch.cuda.is_available()
    dtype = {"auto": "bf16" if cuda else "fp32"}.get(args.dtype, args.dtype)
    # What decides the weights written: a rerun with these equal has nothing to do.
    settings = {"model": args.model, "data_sha256": file_sha256(args.data),
                **{k: getattr(args, k) for k in ("eta", "select", "lr", "epochs", "batch_size", "optimizer",
                                                 "schedule", "warmup_ratio", "max_grad_norm", "max_length",
                                                 "max_prompt_length", "seed")}, "dtype": dtype}
    if check_existing(args.out, settings):
        print0(f"train: {args.out} exists, nothing to do")
        return
    from generate import load_tokenizer
    tok = load_tokenizer(args.model)
    from transformers import AutoConfig, GenerationConfig
    eos = {tok.eos_token_id}
    try:
        gen_eos = GenerationConfig.from_pretrained(args.model).eos_token_id
        eos |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    except OSError:
        pass  # no generation_config.json: the tokenizer's eos is the end of a turn
    eos.discard(None)
    examples, cut_prompts, cut_responses = tokenize(tok, records, args.select, args.max_length,
                                                    args.max_prompt_length, eos, args.data)
    if cut_prompts or cut_responses:
        print0(f"warning: kept the last {args.max_prompt_length} tokens of {cut_prompts} prompts; cut "
               f"{cut_responses} responses to fit --max-length {args.max_length} (they lose their end-of-turn token)")
    steps = make_schedule(examples, args.epochs, args.batch_size, micro, args.seed)
    n_sel = len(examples[0]["responses"])
    print0(f"train: {len(examples)} prompts, {n_sel} responses each ({args.select}), {len(steps)} steps of "
           f"{args.batch_size} prompts ({args.batch_size // (micro * world)} x {micro} per process x {world}), "
           f"eta {args.eta:g}, lr {args.lr:g}, {args.optimizer}, {dtype}")

    # --- processes, device, model
    if ddp:
        import torch.distributed as dist
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    else:
        device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(args.seed)
    tmp = args.out + ".tmp"
    if master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # what an interrupted run left: start cleanly

    from transformers import AutoModelForCausalLM
    save_dtype = getattr(torch, str(getattr(AutoConfig.from_pretrained(args.model), "dtype", None) or "float32")
                         .replace("torch.", ""))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # fp32 master weights
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    bf16 = dtype == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and not ddp)  # noqa: E731
    if ddp:
        # FSDP2: every decoder layer is its own shard group (gathered just before it runs), then the rest.
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for m in model.modules():
            if type(m).__name__ in (model._no_split_modules or []):
                fully_shard(m, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    model.to(device)
    # Optimizer: torch's defaults, as HF Trainer's optim="rmsprop" / "adamw_torch" with weight decay 0. Made
    # before the first forward: FSDP2 leaves the root's parameters unsharded after a no-grad forward, and a
    # list taken then would hold those views, not the sharded parameters that receive the gradients.
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.RMSprop(params, lr=args.lr) if args.optimizer == "rmsprop"
           else torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0))
    warmup = math.ceil(len(steps) * args.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, len(steps), warmup, args.schedule))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    placeholder = [0]  # an empty micro-batch still runs (weight 0): FSDP's collectives need every process

    def all_reduce(t, op="sum"):
        """The sum (or max) over processes of a CPU tensor; NCCL reduces on the GPU only."""
        if not ddp:
            return t
        x = t.to(device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x.cpu()

    def my_micro_batches(step):
        return [(mb or placeholder, len(mb) > 0) for mb in step[rank::world]]

    # --- reference log-probs, log pi_t(y|x): the first epoch's micro-batches, before any update
    t0 = time.time()
    ref = torch.zeros(len(examples), n_sel, dtype=torch.float64)
    epoch_steps = math.ceil(len(examples) / args.batch_size)
    model.eval()
    with torch.no_grad():
        for step in steps[:epoch_steps]:
            for ids, real in my_micro_batches(step):
                lp = sequence_logps(model, *collate(examples, ids, pad, device), autocast)
                if real:
                    ref[ids] = lp.view(len(ids), n_sel).double().cpu()
    if ddp:
        model.reshard()  # free the root's gathered parameters (the root does not reshard after forward)
        ref = all_reduce(ref)  # each prompt was computed by exactly one process, zeros elsewhere
    win = torch.tensor([e["win_rate"] for e in examples], dtype=torch.float64)
    print0(f"train: reference log-probs of {ref.numel()} responses in {time.time() - t0:.1f}s")

    # --- train
    if master:
        os.makedirs(tmp)
        log = open(os.path.join(tmp, "train_log.jsonl"), "w")
    model.train()
    t_train, total_tokens, final = time.time(), 0, {}
    for s, step in enumerate(steps):
        t1 = time.time()
        n_resp = sum(len(mb) for mb in step) * n_sel  # the global batch's trained responses
        # sums over this process's responses: loss, log-ratio, target, log-ratio of W > 1/2, of W < 1/2, counts
        stats = torch.zeros(8, dtype=torch.float64)
        for ids, real in my_micro_batches(step):
            input_ids, mask, labels = collate(examples, ids, pad, device)
            policy = sequence_logps(model, input_ids, mask, labels, autocast).view(len(ids), n_sel)
            w, r = win[ids].to(device, policy.dtype), ref[ids].to(device, policy.dtype)
            err = sppo_loss(policy, r, w, args.eta)
            # Normalised by the global count, and x world because FSDP averages gradients over processes:
            # the summed gradient is then exactly that of the mean loss over the global batch.
            (err.sum() * (world / n_resp) * real).backward()
            if real:
                ratio, target = (policy - r).detach().double().cpu(), (args.eta * (win[ids] - 0.5))
                pos, neg = target > 0, target < 0
                stats += torch.tensor([err.detach().sum().item(), ratio.sum().item(), target.sum().item(),
                                       ratio[pos].sum().item(), ratio[neg].sum().item(), pos.sum().item(),
                                       neg.sum().item(), mask.sum().item()], dtype=torch.float64)
        stats = all_reduce(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))  # as HF Trainer
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.time() - t1
        total_tokens += int(stats[7])
        final = {"step": s + 1, "epoch": s // epoch_steps + 1, "loss": stats[0].item() / n_resp,
                 "log_ratio": stats[1].item() / n_resp, "target": stats[2].item() / n_resp,
                 "log_ratio_pos": stats[3].item() / max(1, stats[5].item()),
                 "log_ratio_neg": stats[4].item() / max(1, stats[6].item()),
                 "grad_norm": grad_norm.item(), "lr": lr, "tokens": int(stats[7]), "tokens_per_s": stats[7].item() / dt}
        if master:
            log.write(json.dumps(final) + "\n")
            log.flush()
            fault_point("train-step")
        print0(f"step {s + 1}/{len(steps)}  loss {final['loss']:.3e}  log-ratio {final['log_ratio']:+.3f}  "
               f"target {final['target']:+.3f}  (W>1/2 {final['log_ratio_pos']:+.3f}, W<1/2 {final['log_ratio_neg']:+.3f})  "
               f"|g| {final['grad_norm']:.2e}  lr {lr:.1e}  {final['tokens_per_s']:.0f} tok/s")
    train_s = time.time() - t_train

    # --- write OUT.tmp, then rename: OUT exists only when complete
    if ddp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    peak = (torch.cuda.max_memory_allocated(device) if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is in KiB on Linux
    peak = all_reduce(torch.tensor([float(peak)], dtype=torch.float64), "max").item()
    if master:
        # A tied weight (lm_head = embed_tokens) is one parameter under two names: save it once.
        first = {}
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first.setdefault(id(p), n) != n}
        model.save_pretrained(tmp, state_dict={k: v.to(save_dtype) for k, v in state.items() if k not in tied})
        fault_point("checkpoint-weights")
        model.config.dtype = str(save_dtype).replace("torch.", "")  # the tensors', not the fp32 master weights'
        model.config.use_cache = True
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        log.close()
        stats_out = {"steps": len(steps), "prompts": len(examples), "responses_per_prompt": n_sel,
                     "tokens": total_tokens, "train_seconds": round(train_s, 2),
                     "tokens_per_s": round(total_tokens / max(train_s, 1e-9), 1), "final_loss": final.get("loss"),
                     "truncated_prompts": cut_prompts, "truncated_responses": cut_responses, "processes": world,
                     "device": device.type, "peak_memory_gb": round(peak / 2**30, 3),
                     "peak_memory_kind": "cuda allocated" if cuda else "rss"}
        with open(os.path.join(tmp, "sppo_train.json"), "w") as f:
            json.dump({"settings": settings, "stats": stats_out}, f, indent=1)
        for name in os.listdir(tmp):  # on disk before the rename, so not even a power cut leaves OUT half-written
            if os.path.isfile(os.path.join(tmp, name)):
                with open(os.path.join(tmp, name), "rb") as f:
                    os.fsync(f.fileno())
        fault_point("checkpoint-written")
        os.rename(tmp, args.out)
    if ddp:
        dist.barrier()  # without it a process can exit while another still talks to it (gloo aborts)
        dist.destroy_process_group()
    print0(f"train: {len(steps)} steps, {total_tokens} tokens in {train_s:.1f}s ({total_tokens / max(train_s, 1e-9):.0f} "
           f"tokens/s), peak memory {peak / 2**30:.2f} GB ({'CUDA' if cuda else 'RSS'}) -> {args.out}")


if __name__ == "__main__":
    main_guard(main)
