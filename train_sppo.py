r"""Stage 3 of SPPO: train pi_{t+1} from pi_t on ranked responses, and write a checkpoint the next iteration loads.

    python train_sppo.py --model runs/tiny/world/policy --data runs/tiny/iter1/ranked.jsonl \
        --out runs/tiny/iter1/checkpoint --eta 5 --lr 1e-4 --optimizer adamw --batch-size 32
    # 8 GPUs, the released recipe (parameters sharded with FSDP2, bf16 compute, fp32 master weights):
    torchrun --nproc_per_node 8 train_sppo.py --model mistralai/Mistral-7B-Instruct-v0.2 \
        --data runs/mistral7b/iter1/ranked.jsonl --out runs/mistral7b/iter1/checkpoint --gradient-checkpointing

Input: ranked JSONL records {"id", "prompt", "responses": [K], "win_rate": [K], "probs": KxK (optional),
"prompt_token_ids", "response_token_ids": [K] (generate.py's; optional)}.
Output: OUT/, a save_pretrained directory (safetensors, config, generation config, tokenizer with its chat
template and its own files) plus OUT/train_log.jsonl (one line per optimizer step), OUT/reference_logps.jsonl
(log pi_t(y|x) of every trained response) and OUT/sppo_train.json (settings, stats). OUT appears only when
complete (it is written as OUT.tmp and renamed); a rerun with the same settings and data finds it and does
nothing; with other settings it is refused. Every --save-every steps the training state goes to OUT.state/ (sharded,
torch.distributed.checkpoint): a rerun after a kill resumes from it (save_state, load_state). --report-to sends each
step's metrics to TensorBoard (OUT's directory/tensorboard) or W&B as well. docs/long-runs.md tells both.

The objective (paper eq. 3.6, eta = 1/beta), per trained response y of prompt x, with W(y) its win rate
among the K samples of pi_t, its own P(y > y) = 1/2 included as released (rank.win_rates; docs/glossary.md):
    L = ( log pi_theta(y|x) - log pi_t(y|x) - eta * (W(y) - 1/2) )^2
--select best-worst (default, the released code) trains the argmax and argmin of W per prompt;
--select all trains every sampled response (the paper's Algorithm 1). The loss is the mean over the trained
responses of the global batch (--batch-size counts prompts, summed over processes). --loss dpo / ipo train the
paper's iterative baselines on the same best/worst pairs instead (dpo_loss, ipo_loss; beta = 1/eta).

What is trained is what was sampled: a record from generate.py carries the token ids the policy was given and
the ids it sampled, and those are trained exactly (no end-of-turn added where --max-tokens cut a response).
A record without ids (data made elsewhere) is encoded as DPO codebases do: the prompt through the chat
template, the response on its own, then the end-of-turn token.

Reference log-probs log pi_t(y|x) are computed once, with the starting weights, before the first update, in
exactly the micro-batches the first epoch trains on; so training holds one model, and at step 1 every
log-ratio is 0 and the loss is mean (eta (W - 1/2))^2.

Under torchrun each process computes the reference for its own micro-batches and they are shared; the
global batch of step s is the same set of prompts for any number of processes, so 1 and N processes give
the same losses (up to float summation order). Only rank 0 reads the checkpoint; the others build the model on
the meta device and receive their shards from it (load_model), so the host holds one full copy of the
weights, not one per process (8 x 28 GB for a 7B model in fp32).

--lora-r R trains a LoRA adapter (peft) on the frozen pi_t instead of every weight: pi_t is still the reference
(the adapter starts at zero), OUT is the merged model, an ordinary checkpoint, and OUT/adapter/ the adapter alone
in PEFT's format; the training states hold the adapter only. docs/lora.md tells when and how.
"""
import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import resource
import shutil
import sys
import time
import warnings

from common import (HelpFormatter, InputError, check_number, check_paths, check_settings, encode_prompt, encode_text,
                    end_of_turn_id, fault_point, field, load_tokenizer, main_guard, open_reporter, read_jsonl)


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


# The paper's baselines, on the same selected pairs and with the same reference pi_t: iterative DPO and IPO.
# ratio_w, ratio_l: log pi_theta(y|x) - log pi_t(y|x) of the best and the worst response by W; beta = 1/eta.

def dpo_loss(ratio_w, ratio_l, eta):
    """DPO:  -log sigmoid( beta (ratio_w - ratio_l) ): the winner's log-ratio pushed above the loser's.
    At step 1 both ratios are 0 and the loss is log 2."""
    import torch
    return -torch.nn.functional.logsigmoid((ratio_w - ratio_l) / eta)


def ipo_loss(ratio_w, ratio_l, eta):
    """IPO:  ( ratio_w - ratio_l - 1/(2 beta) )^2: the gap regressed to a fixed margin eta/2. At step 1 the loss
    is (eta/2)^2. The ratios are sums over the response tokens, as for SPPO and as the released trainer computes
    its "ipo" loss (uclaml/SPPO sppo/trainer.py: average_log_prob=False), so the margin is in nats per response.
    TRL's DPOTrainer (loss_type="ipo", 1.16) divides each completion's log-prob by its token count first, as the
    IPO authors do: a margin in nats per token, which a long response reaches with a smaller change per token."""
    return (ratio_w - ratio_l - eta / 2) ** 2


PAIR_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss}


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
    """Ranked records [{"line", "id", "prompt", "responses", "win_rate", "prompt_token_ids"?, "response_token_ids"?}];
    every fault is an InputError naming file:line and field."""
    records, k0 = [], None
    for n, rec in read_jsonl(path):
        prompt = field(path, n, rec, "prompt", str)
        responses = field(path, n, rec, "responses", list)
        if "win_rate" not in rec:
            raise InputError(f"{path}:{n}: field 'win_rate' is missing (rank the responses with rank.py first)")
        win_rate = field(path, n, rec, "win_rate", list)
        k = len(responses)
        k0 = k if k0 is None else k0
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
        out = {"line": n, "id": str(rec.get("id", n)), "prompt": prompt, "responses": responses,
               "win_rate": [float(w) for w in win_rate]}
        if "prompt_token_ids" in rec or "response_token_ids" in rec:
            out["prompt_token_ids"] = token_ids(path, n, rec, "prompt_token_ids")
            out["response_token_ids"] = [token_ids(path, n, {"response_token_ids": x}, "response_token_ids")
                                         for x in field(path, n, rec, "response_token_ids", list)]
            if len(out["response_token_ids"]) != k:
                raise InputError(f"{path}:{n}: field 'response_token_ids' has {len(out['response_token_ids'])} "
                                 f"lists for K={k} responses")
        records.append(out)
    if not records:
        raise InputError(f"{path}: no records")
    return records


def token_ids(path, n, rec, name):
    ids = field(path, n, rec, name, list)
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
        raise InputError(f"{path}:{n}: field '{name}' should hold token ids (non-negative integers)")
    return ids


def encode_example(tok, rec, picked, eot):
    """(prompt ids, [ids of each picked response]): the sampled ids when the record has them, else the
    prompt through the chat template and each response encoded on its own, then the end-of-turn token.
    Never prompt + answer as one string: where the template's last token and the answer's first merge, the
    answer's tokens could not be found again."""
    if "response_token_ids" in rec:
        return rec["prompt_token_ids"], [rec["response_token_ids"][i] for i in picked]
    return encode_prompt(tok, rec["prompt"]), [encode_text(tok, rec["responses"][i]) + [eot] for i in picked]


def truncate(prompt_ids, responses, max_length, max_prompt_length, bos):
    """Cut to the length limits: a long prompt keeps its end (the question is usually last) and its BOS, and
    each response keeps what fits after the prompt (losing its end-of-turn token)."""
    if len(prompt_ids) > max_prompt_length:
        keep_bos = bos is not None and prompt_ids[0] == bos
        prompt_ids = prompt_ids[:1] * keep_bos + prompt_ids[len(prompt_ids) - max_prompt_length + keep_bos:]
    room = max_length - len(prompt_ids)
    return prompt_ids, [a[:room] for a in responses]


def truncate_release(prompt_ids, responses, max_length, max_prompt_length):
    """The released trainer's rule (TRL DPOTrainer.tokenize_row of 2024, truncation_mode keep_end), for
    --truncation release: nothing is cut unless the prompt plus the LONGER response exceeds max_length; then
    the prompt keeps its last max_prompt_length tokens (BOS is cut with the rest), and if that is still too
    long, every response is cut to max_length - max_prompt_length tokens (the shorter one only if it is longer
    than that), even where the prompt left more room. Ours (truncate) never lets a prompt exceed its budget."""
    longer = max(len(a) for a in responses)
    if len(prompt_ids) + longer > max_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    if len(prompt_ids) + longer > max_length:
        responses = [a[:max_length - max_prompt_length] for a in responses]
    return prompt_ids, responses


def tokenize(tok, records, args):
    """One example per prompt: {"id", "prompt_ids", "responses": [ids], "picked": [indices], "win_rate"}, and
    counts of what was cut or skipped. A prompt whose picked responses cannot all be encoded is skipped (and
    counted by reason); a token id outside the vocabulary is an error (data from another tokenizer)."""
    eot, vocab = end_of_turn_id(tok), len(tok)  # len(tok) is a call into the tokenizer: once, not per token
    examples, skipped = [], {}
    counts = {"from_generate": 0, "encoded_from_text": 0, "cut_prompts": 0, "cut_responses": 0}
    for r in records:
        picked = select_responses(r["win_rate"], args.select)
        try:
            prompt_ids, answers = encode_example(tok, r, picked, eot)
        except InputError as e:
            skipped[str(e)] = skipped.get(str(e), 0) + 1
            continue
        if any(len(a) == 0 for a in answers):
            skipped["a response has no tokens"] = skipped.get("a response has no tokens", 0) + 1
            continue
        bad = next((t for t in prompt_ids + sum(answers, []) if t >= vocab), None)
        if bad is not None:
            raise InputError(f"{args.data}:{r['line']}: field 'response_token_ids' or 'prompt_token_ids' has id {bad}, "
                             f"outside --model's vocabulary of {vocab} (generated with another tokenizer?)")
        if args.truncation == "release":
            cut_ids, cut_answers = truncate_release(prompt_ids, answers, args.max_length, args.max_prompt_length)
        else:
            cut_ids, cut_answers = truncate(prompt_ids, answers, args.max_length, args.max_prompt_length,
                                            tok.bos_token_id)
        counts["cut_prompts"] += len(cut_ids) < len(prompt_ids)
        counts["cut_responses"] += sum(len(a) < len(b) for a, b in zip(cut_answers, answers))
        counts["from_generate" if "response_token_ids" in r else "encoded_from_text"] += len(picked)
        examples.append({"id": r["id"], "prompt_ids": cut_ids, "responses": cut_answers, "picked": picked,
                         "win_rate": [r["win_rate"][i] for i in picked]})
    return examples, counts, skipped


def make_schedule(examples, epochs, batch_size, micro, seed):
    """steps[s] = the micro-batches (lists of example indices) of optimizer step s, batch_size // micro of them.

    Each epoch is a seeded permutation cut into consecutive global batches; a batch is sorted by length so a
    micro-batch pads little. Process r of N takes micro-batches r, r+N, ...: the global batch, and each
    micro-batch in it, is the same for any N. A short last batch leaves some micro-batches empty.
    """
    import torch
    length = [max(len(e["prompt_ids"]) + len(a) for a in e["responses"]) for e in examples]
    steps = []
    for epoch in range(epochs):
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for start in range(0, len(perm), batch_size):
            batch = sorted(perm[start:start + batch_size], key=lambda i: (length[i], i))
            steps.append([batch[j:j + micro] for j in range(0, batch_size, micro)])
    return steps


def collate(examples, ids, pad, device):
    """The micro-batch `ids` as left-padded rows, one per (prompt, trained response), prompt-major.

    Returns input_ids, attention_mask, labels, each [rows, width] with rows = len(ids) x responses per prompt
    and width = the longest prompt + response. Every response ends at the last column, so the log-probs need
    only the last columns' logits; labels are -100 except on response tokens. Example, pad 0, prompt
    [1, 5, 6] and responses [7, 2] and [8, 9, 2]:
        input_ids  [[0, 1, 5, 6, 7, 2],    mask [[0, 1, 1, 1, 1, 1],    labels [[-100, -100, -100, -100, 7, 2],
                    [1, 5, 6, 8, 9, 2]]          [1, 1, 1, 1, 1, 1]]              [-100, -100, -100, 8, 9, 2]]
    """
    import torch
    rows = [(e["prompt_ids"], a) for e in (examples[i] for i in ids) for a in e["responses"]]
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        input_ids[i, width - len(p) - len(a):] = torch.tensor(p + a)
        labels[i, width - len(a):] = torch.tensor(a)
        mask[i, width - len(p) - len(a):] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def sequence_logps(model, input_ids, mask, labels, autocast=contextlib.nullcontext, chunk_elements=2**24):
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
    gradient reaches FSDP as lm_head's own would. FSDP2 warns that the root "returned a view tensor": that is
    hidden_states[0], the first layer's input as FSDP's pre-forward hook hands it on (a view its autograd
    function makes); only hidden_states[-1] is read here and nothing writes into either, and
    tests/test_logps.py's FSDP test finds 2 processes' gradients equal to 1 process's, tied embeddings included.
    """
    import torch
    from logps import token_logps
    head = model.get_output_embeddings()
    if head.bias is not None or getattr(model.config, "final_logit_softcapping", None):
        # logits are not hidden @ weight^T alone (Gemma-2 caps them): the plain computation, whole logits
        return sequence_logps_unchunked(model, input_ids, mask, labels, autocast)
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


def sequence_logps_unchunked(model, input_ids, mask, labels, autocast=contextlib.nullcontext):
    """sequence_logps for heads the chunked path cannot express (a bias, Gemma-2's logit soft-capping): the
    logits of the last n positions whole (n = the longest response), then gather - logsumexp."""
    n = int((labels != -100).sum(-1).max())
    with autocast():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       logits_to_keep=n + 1).logits[:, :-1].float()
    targets = labels[:, -n:]
    logp = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return logp.masked_fill(targets == -100, 0.0).sum(-1)


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


# -----------------------------------------------------------------------------
# the phases of a run, in the order main() calls them

@dataclasses.dataclass
class Run:
    """Where this process stands: torchrun's rank and world size, its device, the compute dtype."""
    rank: int
    world: int
    device: object
    dtype: str

    @property
    def sharded(self):
        """The model is under FSDP2: with N processes, and in bf16 with one too (a group of one), so that bf16
        computes alike whatever the number of processes: FSDP2's policy casts every parameter to bf16 for the
        forward and backward, and reduces and accumulates the gradients in fp32 on the fp32 master weights.
        (Autocast, the one-process alternative, keeps norms, embeddings and softmax in fp32 and rounds elsewhere:
        its losses differ from FSDP2's by several bf16 steps, by how much depending on the machine's kernels.)"""
        return self.world > 1 or self.dtype == "bf16"

    @property
    def master(self):
        return self.rank == 0

    def print(self, *a):
        if self.master:
            print(*a, file=sys.stderr, flush=True)

    def all_reduce(self, t, op="sum"):
        """The sum (or max) over processes of a CPU tensor; NCCL reduces on the GPU only."""
        if not self.sharded:
            return t
        import torch.distributed as dist
        x = t.to(self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return x.cpu()

    @property
    def memory_kind(self):
        return "CUDA allocated" if self.device.type == "cuda" else "RSS"

    def local_peak_memory(self):
        """Bytes: the most this process held (CUDA memory allocated, or resident memory on a CPU)."""
        import torch
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else peak_rss()

    def peak_memory(self):
        """Bytes: the most any process held."""
        import torch
        return self.all_reduce(torch.tensor([float(self.local_peak_memory())], dtype=torch.float64), "max").item()

    def finish(self):
        if self.sharded:
            import torch.distributed as dist
            dist.barrier()  # without it a process can exit while another still talks to it (gloo aborts)
            dist.destroy_process_group()

    def micro_batches(self, step):
        """This process's share of a step: (example indices, real?). An empty micro-batch still runs on a
        placeholder with weight 0: FSDP's collectives need every process in every forward."""
        return [(mb or [0], len(mb) > 0) for mb in step[self.rank::self.world]]


def peak_rss():
    """Bytes: this process's peak resident memory. VmHWM where Linux has it: ru_maxrss starts from the RSS of
    the parent at fork (Linux carries it across exec), so a process started by a large one reports at least that."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def start_processes(dtype_arg, timeout_minutes):
    """One process, or torchrun's N: the process group (NCCL on GPUs, gloo on CPUs), device and dtype.

    The group's timeout bounds how long a process waits in a collective for the others. Rank 0 alone reads the
    checkpoint while the others wait in a broadcast, and alone converts, writes and syncs it (14-18 GB for a 7B
    model) while they wait in a barrier: NCCL's default of 10 minutes would let a slow filesystem kill the job
    and lose the iteration's training, so it is a setting (--dist-timeout-minutes)."""
    import datetime
    import torch
    import torch.distributed as dist
    cuda = torch.cuda.is_available()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    run = Run(rank, world, device, {"auto": "bf16" if cuda else "fp32"}.get(dtype_arg, dtype_arg))
    if run.sharded:
        if cuda:
            torch.cuda.set_device(device)
        # torchrun's processes meet at its rendezvous; one process without torchrun is a group of one in memory
        alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                **alone)
    return run


def load_model(args, run):
    """pi_t in fp32 master weights on run.device; under torchrun, and in bf16 in one process too (Run.sharded),
    sharded with FSDP2 (each decoder layer its own group, gathered just before it runs, then the rest), bf16
    compute where asked.

    Under torchrun only rank 0 reads the checkpoint; the other ranks build the model on the meta device (no
    memory) and receive each group's weights from rank 0 just before it is sharded (from_rank0), so a
    process never holds more than its shards, one group in full, and (rank 0) the rest of the loaded model:
    the host holds one full copy of the weights, not one per process (8 x 28 GB for a 7B model in fp32).

    --lora-r: the model frozen, with a fp32 LoRA adapter (add_lora) that is sharded and trained like any weight."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    # LoRA in bf16: the frozen weights stay as stored (a 7B model in 14 GB, not 28); only the adapter is fp32
    stored = checkpoint_dtype(args.model) if args.lora_r and run.dtype == "bf16" else torch.float32
    kw = dict(dtype=stored, attn_implementation=args.attn_implementation)  # None: transformers' default
    if run.master:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kw)
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model), **kw)
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora_r:
        model = add_lora(model, args, run)
    if not run.sharded:
        return model.to(run.device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    check_same_shapes(model, run)
    bf16 = run.dtype == "bf16"
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    groups = [m for m in model.modules() if type(m).__name__ in (model._no_split_modules or [])] + [model]
    for m in groups:  # decoder layers first, then the root (embeddings, final norm, lm_head)
        from_rank0(m, run)
        fully_shard(m, mp_policy=mp)  # each process keeps its shard; the full tensors are freed
    return model


def checkpoint_dtype(model):
    """The dtype the checkpoint's weights are stored in (its config's), fp32 where it names none."""
    import torch
    from transformers import AutoConfig
    stored = getattr(AutoConfig.from_pretrained(model), "dtype", None) or "float32"
    return getattr(torch, str(stored).replace("torch.", ""))


def add_lora(model, args, run):
    """The model with a LoRA adapter (peft) on --lora-targets, everything else frozen: W x + (alpha/r) B A x, with B
    zero at the start, so the model is still pi_t (the reference log-probs are its own). A target that matches no
    module is refused before anything is written, with the names the model's linear layers have."""
    import torch
    from peft import LoraConfig, get_peft_model
    targets = args.lora_targets.split(",")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in targets if t != "all-linear" and t not in names]
    if missing:
        raise InputError(f"--lora-targets {args.lora_targets}: no module named {', '.join(missing)}; "
                         f"{type(model).__name__}'s linear layers are {', '.join(sorted(names))}")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets)
    model = get_peft_model(model, config)  # the adapter in fp32 (peft's autocast_adapter_dtype); A from torch's seed
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    run.print(f"train: LoRA r {args.lora_r}, alpha {args.lora_alpha:g} on {args.lora_targets}: {trainable:,} trainable "
              f"parameters of {total:,} ({100 * trainable / total:.2f}%)")
    return model


def merge_lora(state, scale, dtype):
    """A PeftModel's full state dict -> the plain model's in `dtype`, each adapted weight merged: W + scale B A
    (scale = alpha / r), computed in fp32, then cast. Each tensor leaves `state` as its replacement is made: under
    FSDP, where `state` is a gathered copy, the host never holds both whole models."""
    out = {}
    for key in [k for k in state if ".lora_A." not in k and ".lora_B." not in k]:
        t = state.pop(key)
        if key.endswith(".base_layer.weight"):
            m = key[:-len("base_layer.weight")]
            a, b = state[m + "lora_A.default.weight"], state[m + "lora_B.default.weight"]
            t = t.float() + scale * (b.float() @ a.float())
        out[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = t.to(dtype)
    return out


def check_same_shapes(model, run):
    """Rank 0's loaded model and the others' meta models must list the same tensors in the same order, or
    the broadcasts of from_rank0 would pair the wrong tensors (or hang): refuse clearly instead, on every
    rank (rank 0 alone would see no difference and wait in its first broadcast)."""
    import torch
    import torch.distributed as dist
    mine = [(n, tuple(t.shape), str(t.dtype)) for n, t in [*model.named_parameters(), *model.named_buffers()]]
    theirs = [mine]
    dist.broadcast_object_list(theirs, src=0)
    if run.all_reduce(torch.tensor([float(theirs[0] != mine)]), "max").item():
        raise RuntimeError(f"rank {run.rank}: a model built from {type(model).__name__}'s config does not have the "
                           "parameters and buffers of the one rank 0 loaded from the checkpoint")


def from_rank0(group, run):
    """Rank 0's values of the parameters and buffers of `group` that no sharded subgroup owns, broadcast to
    every rank, on run.device. On the other ranks they replace meta tensors: memory is given just here. Buffers
    are sent too: those outside the state dict (the rotary embedding's inv_freq) are computed in __init__, and
    on the meta device they were not. A tied weight (lm_head = embed_tokens, one Parameter under two names)
    is sent once and stays one Parameter."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    done = {}  # id(old tensor) -> its replacement

    def own(m):  # m and its submodules, leaving out those already sharded (their tensors are settled)
        yield m
        for child in m.children():
            if not isinstance(child, FSDPModule):
                yield from own(child)
    with torch.no_grad():
        for m in own(group):
            for store in (m._parameters, m._buffers):
                for name, t in store.items():
                    if t is None:
                        continue
                    if id(t) not in done:
                        data = torch.empty_like(t, device=run.device) if t.is_meta else t.detach().to(run.device)
                        dist.broadcast(data, src=0)
                        is_param = isinstance(t, torch.nn.Parameter)
                        done[id(t)] = torch.nn.Parameter(data, t.requires_grad) if is_param else data
                    store[name] = done[id(t)]


def make_optimizer(model, args, total_steps):
    """torch's RMSprop or AdamW with their defaults (HF Trainer's optim="rmsprop" / "adamw_torch", weight decay
    0) and HF's schedule. Made before the first forward: FSDP2 leaves the root's parameters unsharded after a
    no-grad forward, and a list taken then would hold those views, not the sharded parameters that learn."""
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    # One tensor at a time (torch's default on a CPU), in one process as under FSDP: the default on a GPU (foreach)
    # makes a temporary of the whole (sharded) optimizer state, 4 bytes a parameter / processes, which is the peak
    # on one GPU (29 GB more for 7B) and for 70B over 16 GPUs (70.6 GB against the forward's 69.2; BENCHMARKS.md
    # sections 9-10). The same math; the cost is dispatch, ~0.15 ms a tensor, 1-2% of a step (section 10).
    opt = (torch.optim.RMSprop(params, lr=args.lr, foreach=False) if args.optimizer == "rmsprop"
           else torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, foreach=False))
    warmup = math.ceil(total_steps * args.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, warmup, args.schedule))
    return params, opt, sched


def reference_logps(model, examples, first_epoch, pad, run):
    """log pi_t(y|x) of every trained response, [prompts, responses per prompt] float64, computed with the
    starting weights in exactly the micro-batches the first epoch trains on (so step 1's log-ratios are 0)."""
    import torch
    ref = torch.zeros(len(examples), len(examples[0]["responses"]), dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for step in first_epoch:
            for ids, real in run.micro_batches(step):
                lp = sequence_logps(model, *collate(examples, ids, pad, run.device))
                if real:
                    ref[ids] = lp.view(len(ids), -1).double().cpu()
    if run.sharded:
        model.reshard()  # free the root's gathered parameters (the root does not reshard after forward)
    model.train()
    return run.all_reduce(ref)  # each prompt was computed by exactly one process, zeros elsewhere


@dataclasses.dataclass
class StepStats:
    """Sums over a step's trained responses (then over processes), for the log line."""
    loss: float = 0.0
    log_ratio: float = 0.0
    target: float = 0.0
    log_ratio_pos: float = 0.0  # responses with W > 1/2 (target > 0)
    log_ratio_neg: float = 0.0  # responses with W < 1/2
    n_pos: int = 0
    n_neg: int = 0
    tokens: int = 0

    def all_reduce(self, run):
        import torch
        total = run.all_reduce(torch.tensor(dataclasses.astuple(self), dtype=torch.float64)).tolist()
        return StepStats(*total)


def train_step(model, examples, step, ref, win, pad, args, run):
    """Forward and backward over this process's micro-batches of one optimizer step (the update is the
    caller's). The mean loss over the global batch's trained responses is what the gradients are of."""
    stats = StepStats()
    n_resp = sum(len(mb) for mb in step) * ref.shape[1]  # the global batch's trained responses
    for ids, real in run.micro_batches(step):
        input_ids, mask, labels = collate(examples, ids, pad, run.device)
        policy = sequence_logps(model, input_ids, mask, labels).view(len(ids), -1)
        r, w = ref[ids].to(run.device, policy.dtype), win[ids].to(run.device, policy.dtype)
        if args.loss == "sppo":
            err = sppo_loss(policy, r, w, args.eta)  # [prompts, responses]
        else:  # a pair loss per prompt, counted once for each of its two responses: the mean is per prompt
            err = PAIR_LOSSES[args.loss](policy[:, 0] - r[:, 0], policy[:, 1] - r[:, 1], args.eta)[:, None].expand(-1, 2)
        # Normalised by the global count, and x world because FSDP averages gradients over processes:
        # the summed gradient is then exactly that of the mean loss over the global batch.
        (err.sum() * (run.world / n_resp) * real).backward()
        if real:
            ratio, target = (policy - r).detach().double().cpu(), args.eta * (win[ids] - 0.5)
            pos, neg = target > 0, target < 0
            stats.loss += err.detach().sum().item()
            stats.log_ratio += ratio.sum().item()
            stats.target += target.sum().item()
            stats.log_ratio_pos += ratio[pos].sum().item()
            stats.log_ratio_neg += ratio[neg].sum().item()
            stats.n_pos += int(pos.sum())
            stats.n_neg += int(neg.sum())
            stats.tokens += int(mask.sum())
    return stats.all_reduce(run), n_resp


def optimizer_step(params, opt, sched, max_grad_norm):
    """Clip the gradient norm (as HF Trainer), update, advance the schedule: (norm before clipping, lr used)."""
    import torch
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    lr = sched.get_last_lr()[0]
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm.item(), lr


def step_log(s, epoch_steps, stats, n_resp, grad_norm, lr, seconds):
    """The named metrics of one step, as train_log.jsonl records them."""
    return {"step": s + 1, "epoch": s // epoch_steps + 1, "loss": stats.loss / n_resp,
            "log_ratio": stats.log_ratio / n_resp, "target": stats.target / n_resp,
            "log_ratio_pos": stats.log_ratio_pos / max(1, stats.n_pos),
            "log_ratio_neg": stats.log_ratio_neg / max(1, stats.n_neg),
            "grad_norm": grad_norm, "lr": lr, "tokens": int(stats.tokens), "tokens_per_s": stats.tokens / seconds}


def save_checkpoint(model, tok, args, run, tmp, meta):
    """OUT.tmp as a save_pretrained directory in the starting checkpoint's dtype, synced, then renamed to OUT:
    OUT exists only when complete. Every process must call it (FSDP gathers the full weights)."""
    if run.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    if not run.master:
        return
    save_dtype = checkpoint_dtype(args.model)
    tied = tied_names(model)  # save a tied weight once
    for k in tied:
        state.pop(k, None)
    if args.lora_r:  # the adapter alone (PEFT's format), then the merged model: an ordinary checkpoint
        model.save_pretrained(os.path.join(tmp, "adapter"), state_dict=state)
        weights, model = merge_lora(state, args.lora_alpha / args.lora_r, save_dtype), model.get_base_model()
    else:  # cast tensor by tensor, letting each gathered fp32 tensor go as its copy is made: the host holds one
        weights = {k: state.pop(k).to(save_dtype) for k in list(state)}  # full copy at most (a 70B's rank 0: 282 GB)
    model.save_pretrained(tmp, state_dict=weights)
    fault_point("checkpoint-weights")
    model.config.dtype = str(save_dtype).replace("torch.", "")  # the tensors', not the fp32 master weights'
    model.config.use_cache = True
    model.config.save_pretrained(tmp)
    save_tokenizer(tok, args.model, tmp)
    with open(os.path.join(tmp, "sppo_train.json"), "w") as f:
        json.dump(meta, f, indent=1)
    for name in os.listdir(tmp):  # on disk before the rename, so not even a power cut leaves OUT half-written
        if os.path.isfile(os.path.join(tmp, name)):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
    fault_point("checkpoint-written")
    os.rename(tmp, args.out)


def tied_names(model):
    """{second name: first name} of each tied weight (lm_head = embed_tokens: one parameter under two names)."""
    first = {}
    return {n: first[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
            if first.setdefault(id(p), n) != n}


def save_tokenizer(tok, model, out):
    """tok.save_pretrained, plus the tokenizer's own files that it does not rewrite (a sentencepiece
    tokenizer.model, say), copied from the starting checkpoint so tools that need them find them."""
    from transformers.utils import cached_file
    tok.save_pretrained(out)
    for name in tok.vocab_files_names.values():
        if not os.path.exists(os.path.join(out, name)):
            src = cached_file(model, name, _raise_exceptions_for_missing_entries=False,
                              _raise_exceptions_for_connection_errors=False)
            if src:
                shutil.copy(src, os.path.join(out, name))


# -----------------------------------------------------------------------------
# the training state: what a killed run resumes from (OUT.state/step-N, written with torch.distributed.checkpoint)
#
# OUT.state/step-N holds everything that decides steps N+1, N+2, ...: the weights and the optimizer state (each
# process writes its own shards, nothing is gathered), the schedule's state, each process's random state, the
# reference log-probs (not recomputed) and, in train_state.json, the settings, the step reached (the position
# in the data schedule, which make_schedule derives from the settings) and the log lines so far.

STATE_NAME = re.compile(r"step-(\d+)")


def latest_state(out, settings, run):
    """The newest complete training state an interrupted run left in OUT.state, or None. A save cut short
    (OUT.state/step-N.tmp) is never read (rank 0 removes it); a state of other settings is refused, as a
    finished OUT is."""
    root = out + ".state"
    if not os.path.isdir(root):
        return None
    names = os.listdir(root)
    if run.master:
        for name in names:
            if name.endswith(".tmp"):
                shutil.rmtree(os.path.join(root, name))
    done = [n for n in names if STATE_NAME.fullmatch(n)]
    if not done:
        return None
    path = os.path.join(root, max(done, key=lambda n: int(STATE_NAME.fullmatch(n)[1])))
    with open(os.path.join(path, "train_state.json")) as f:
        check_settings(json.load(f)["settings"], settings, f"--out {out}: the training state {path}",
                       f"use another --out or delete {root}")
    return path


def rng_state(run):
    """This process's random state (dropout draws from it)."""
    import torch
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(run.device)}
                                              if run.device.type == "cuda" else {})}


def save_state(out, step, model, opt, sched, ref, history, seconds, settings, run):
    """The training state after `step` optimizer steps, as OUT.state/step-N. Every process calls it and writes
    its own shards (DCP); it is written as step-N.tmp and renamed when complete, and only then is the previous
    state removed: a kill at any moment leaves the last complete state in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    t0, root = time.time(), out + ".state"
    final, tmp = os.path.join(root, f"step-{step}"), os.path.join(root, f"step-{step}.tmp")
    model_state, opt_state = get_state_dict(model, opt, options=state_options(model))  # FSDP: this process's shards
    model_state = {k: v for k, v in model_state.items() if k not in tied_names(model)}  # a tied weight once
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: as meant
        dcp.save({"model": model_state, "optimizer": opt_state, "scheduler": sched.state_dict(), "ref": ref,
                  "rng": {f"rank{run.rank}": rng_state(run)}}, checkpoint_id=tmp, no_dist=not run.sharded)
    if not run.master:  # dcp.save returns once every process's shards and the index (.metadata) are written
        return
    fault_point("state-shards")
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump({"settings": settings, "step": step, "processes": run.world, "train_seconds": seconds,
                   "log": history}, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    for name in os.listdir(root):
        if name != os.path.basename(final) and STATE_NAME.fullmatch(name):
            shutil.rmtree(os.path.join(root, name))
    run.print(f"train: training state after step {step} -> {final} ({time.time() - t0:.1f}s)")


def state_options(model):
    """The weights a training state holds: the trained ones. With LoRA the frozen model is not saved (it is --model,
    read again on resume) and so not expected back (strict only when every weight is trained)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=all(p.requires_grad for p in model.parameters()))


def load_state(path, model, opt, sched, ref_shape, run):
    """Restore what save_state wrote into the model, optimizer and schedule just made: (step, ref, log lines,
    training seconds so far). On another number of processes DCP reshards the weights and optimizer state
    (the global batches do not depend on it); the random state of a process that did not exist then is rank 0's."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    with open(os.path.join(path, "train_state.json")) as f:
        meta = json.load(f)
    mine = f"rank{run.rank if run.rank < meta['processes'] else 0}"
    tied = tied_names(model)  # saved once
    options = state_options(model)
    model_state, opt_state = get_state_dict(model, opt, options=options)  # to load into (the optimizer's state made)
    state = {"model": {k: v for k, v in model_state.items() if k not in tied}, "optimizer": opt_state,
             "scheduler": sched.state_dict(), "ref": torch.zeros(ref_shape, dtype=torch.float64),
             "rng": {mine: rng_state(run)}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not run.sharded)
    state["model"].update({name: state["model"][first] for name, first in tied.items() if first in state["model"]})
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options)
    sched.load_state_dict(state["scheduler"])
    model.train()  # as reference_logps leaves it (from_pretrained gives eval mode: no dropout)
    torch.set_rng_state(state["rng"][mine]["cpu"])
    if run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng"][mine]["cuda"], run.device)
    if meta["processes"] != run.world:
        run.print(f"train: the state was saved by {meta['processes']} processes, this run has {run.world}: weights "
                  "and optimizer state resharded; the data order is the same, dropout's random draws are not")
    return meta["step"], state["ref"], meta["log"], meta["train_seconds"]


def remove_state(out, run):
    """OUT.state, once OUT is complete: nothing is left to resume."""
    if run.master and os.path.isdir(out + ".state"):
        shutil.rmtree(out + ".state")


# -----------------------------------------------------------------------------

def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # what to train, on what, into where
    ap.add_argument("--model", required=True, help="pi_t: checkpoint directory or hub id")
    ap.add_argument("--data", required=True, help="ranked JSONL (rank.py's output)")
    ap.add_argument("--out", required=True, help="checkpoint directory to write (pi_{t+1})")
    # the objective
    ap.add_argument("--eta", type=float, default=1000.0, help="1/beta; the release uses beta = 0.001")
    ap.add_argument("--select", choices=["best-worst", "all"], default="best-worst",
                    help="train the best and worst response per prompt (the release) or all K (Algorithm 1)")
    ap.add_argument("--loss", choices=["sppo", *PAIR_LOSSES], default="sppo", help="dpo, ipo: the paper's "
                    "iterative baselines on the same best/worst pairs, pi_t as reference, beta = 1/eta")
    # optimisation (the released recipe's defaults)
    ap.add_argument("--lr", type=float, default=5e-7, help="peak learning rate")
    ap.add_argument("--epochs", type=int, default=1, help="passes over the data")
    ap.add_argument("--batch-size", type=int, default=64, help="prompts per optimizer step, over all processes")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="prompts per forward pass")
    ap.add_argument("--optimizer", choices=["rmsprop", "adamw"], default="rmsprop", help="torch's, default settings")
    ap.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear", help="after warm-up")
    ap.add_argument("--warmup-ratio", type=float, default=0.1, help="share of the steps spent warming up")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (HF Trainer's "
                    "default, so the release's); 0 turns clipping off")
    ap.add_argument("--seed", type=int, default=42, help="the data order")
    # lengths
    ap.add_argument("--max-length", type=int, default=1024, help="max prompt + response tokens")
    ap.add_argument("--max-prompt-length", type=int, default=512, help="longer prompts keep their end")
    ap.add_argument("--truncation", choices=["ours", "release"], default="ours", help="ours: a prompt over "
                    "--max-prompt-length always keeps its BOS and end, responses fill the rest (truncate); release: "
                    "the released trainer's rule, cutting only when prompt + the longer response exceed --max-length "
                    "(truncate_release)")
    # compute
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                    help="compute dtype; auto: bf16 on a GPU, fp32 on a CPU (master weights stay fp32)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--dist-timeout-minutes", type=float, default=60, help="under torchrun: how long a process "
                    "waits for the others in a collective (rank 0 alone loads and saves the checkpoint meanwhile; "
                    "torch's NCCL default, 10, is too short for a 7B save on a slow filesystem)")
    ap.add_argument("--attn-implementation", default=None, choices=["eager", "sdpa"], help="passed to "
                    "from_pretrained (default: transformers' choice: sdpa where the model has it). Gemma-2 needs "
                    "eager: sdpa skips its attention-logit soft-capping. (flash_attention_2 is not offered: it needs "
                    "the flash-attn package, built for the exact torch and CUDA, which requirements/cuda.txt does "
                    "not install)")
    # LoRA (docs/lora.md)
    ap.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank on the frozen model "
                    "and write the merged model (plus OUT/adapter/, PEFT's format); 0: train every weight")
    ap.add_argument("--lora-alpha", type=float, default=16.0, help="the adapter's scale is alpha / r")
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapter's input (0 keeps step "
                    "1's log-ratios at 0)")
    ap.add_argument("--lora-targets", default="all-linear", help="comma-separated module names (q_proj,v_proj), or "
                    "all-linear: every linear layer but the output head (the attention and MLP projections)")
    # long runs
    ap.add_argument("--save-every", type=int, default=50, help="optimizer steps between training states "
                    "(OUT.state/, sharded with torch.distributed.checkpoint) that a rerun resumes from; 0: none. The "
                    "recipe's ~312 steps per iteration save 6 times; one save of a 7B model is ~58 GB")
    ap.add_argument("--report-to", choices=["tensorboard", "wandb", "none"], default="tensorboard",
                    help="where each step's metrics also go, to watch a run live (OUT's directory/tensorboard); "
                    "a reporter that cannot start warns and the run goes on")
    return ap


def check_args(args, world):
    """Settings that cannot work, refused before anything loads; returns the micro-batch size per process."""
    for name in ("epochs", "batch_size", "micro_batch_size", "max_length", "max_prompt_length"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    if not (args.lr > 0 and args.eta > 0 and 0 <= args.warmup_ratio < 1 and args.max_grad_norm >= 0
            and args.dist_timeout_minutes > 0 and args.save_every >= 0):
        raise InputError("need --lr > 0, --eta > 0, 0 <= --warmup-ratio < 1, --max-grad-norm >= 0, "
                         "--dist-timeout-minutes > 0 and --save-every >= 0")
    if not (args.lora_r >= 0 and args.lora_alpha > 0 and 0 <= args.lora_dropout < 1):
        raise InputError("need --lora-r >= 0, --lora-alpha > 0 and 0 <= --lora-dropout < 1")
    if args.loss != "sppo" and args.select != "best-worst":
        raise InputError(f"--loss {args.loss} compares a winner with a loser: it needs --select best-worst")
    if args.max_prompt_length >= args.max_length:
        raise InputError(f"--max-prompt-length {args.max_prompt_length} leaves no room for a response "
                         f"in --max-length {args.max_length}")
    micro = min(args.micro_batch_size, args.batch_size // world) or 1
    if args.batch_size % (micro * world):
        raise InputError(f"--batch-size {args.batch_size} is not a multiple of --micro-batch-size {micro} "
                         f"x {world} processes")
    return micro


def run_settings(args, dtype):
    """What decides the weights written: a rerun with these equal has nothing to do."""
    h = hashlib.sha256()
    with open(args.data, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return {"model": args.model, "data_sha256": h.hexdigest(),
            # (earlier runs have none of these keys: they were all sppo, ours, transformers' attention, no LoRA)
            **({"loss": args.loss} if args.loss != "sppo" else {}),
            **({"truncation": args.truncation} if args.truncation != "ours" else {}),
            **({"attn_implementation": args.attn_implementation} if args.attn_implementation else {}),
            **({k: getattr(args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")}
               if args.lora_r else {}),
            **{k: getattr(args, k) for k in ("eta", "select", "lr", "epochs", "batch_size", "optimizer", "schedule",
                                             "warmup_ratio", "max_grad_norm", "max_length", "max_prompt_length",
                                             "seed")}, "dtype": dtype}


def finished_earlier(out, settings):
    """True when OUT is a finished run of these settings; an InputError when it was made otherwise."""
    if not os.path.exists(out):
        return False
    meta = os.path.join(out, "sppo_train.json")
    if not os.path.isfile(meta):
        raise InputError(f"--out {out}: exists and is not a train_sppo.py checkpoint (no sppo_train.json); "
                         "choose another --out or delete it")
    with open(meta) as f:
        check_settings(json.load(f).get("settings", {}), settings, f"--out {out}", f"use another --out or delete {out}")
    return True


def load_examples(tok, records, args, run):
    """The examples to train, with a warning for each kind of cut or skipped response."""
    examples, counts, skipped = tokenize(tok, records, args)
    for why, n in skipped.items():
        run.print(f"warning: skipped {n} prompts: {why}")
    if counts["cut_prompts"] or counts["cut_responses"]:
        run.print(f"warning: kept the last {args.max_prompt_length} tokens of {counts['cut_prompts']} prompts; cut "
                  f"{counts['cut_responses']} responses to fit --max-length {args.max_length} (they lose their "
                  "end-of-turn token)")
    if not examples:
        raise InputError(f"{args.data}: nothing left to train ({sum(skipped.values())} prompts skipped)")
    return examples, {**counts, "skipped_prompts": skipped}


def write_reference_logps(path, examples, ref):
    """OUT/reference_logps.jsonl: what pi_t assigned to each trained sample, for teaching and debugging."""
    with open(path, "w", encoding="utf-8") as f:
        for e, row in zip(examples, ref.tolist()):
            for i, a, lp in zip(e["picked"], e["responses"], row):
                f.write(json.dumps({"id": e["id"], "response": i, "logp": lp, "tokens": len(a)}) + "\n")


def start_log(tmp, examples, ref, history, run):
    """OUT.tmp with reference_logps.jsonl and train_log.jsonl holding the steps done so far (a resumed run's,
    from its state: the steps after it are appended, none doubled); rank 0's open log, None elsewhere."""
    if not run.master:
        return None
    os.makedirs(tmp)
    write_reference_logps(os.path.join(tmp, "reference_logps.jsonl"), examples, ref)
    log = open(os.path.join(tmp, "train_log.jsonl"), "w")
    log.writelines(json.dumps(h) + "\n" for h in history)
    return log


def log_step(last, n_steps, log, report, run):
    """One step's metrics, everywhere they go: train_log.jsonl, the console, and the reporter (TensorBoard, W&B)."""
    if not run.master:
        return
    log.write(json.dumps(last) + "\n")
    log.flush()
    fault_point("train-step")
    print(f"step {last['step']}/{n_steps}  loss {last['loss']:.3e}  log-ratio {last['log_ratio']:+.3f}  "
          f"target {last['target']:+.3f}  (W>1/2 {last['log_ratio_pos']:+.3f}, W<1/2 {last['log_ratio_neg']:+.3f})"
          f"  |g| {last['grad_norm']:.2e}  lr {last['lr']:.1e}  {last['tokens_per_s']:.0f} tok/s",
          file=sys.stderr, flush=True)
    report({f"train/{k}": v for k, v in last.items() if k not in ("step", "epoch")}
           | {"train/peak_memory_gb": run.local_peak_memory() / 2**30}, last["step"])


def report_dir(out):
    """Where TensorBoard writes: OUT's directory/tensorboard (run_loop.sh: one run per iteration,
    `tensorboard --logdir runs/NAME` shows them side by side); W&B writes its own wandb/ beside it."""
    return os.path.join(os.path.dirname(os.path.abspath(out)), "tensorboard")


def start_reporter(args, settings, examples, data_stats, start, run):
    """The run's reporter (common.open_reporter: TensorBoard under OUT's directory/tensorboard, or W&B), the
    iteration's data already sent (at step 0): prompts, what was cut or skipped, and the distribution of the
    trained responses' win rates W. A resumed run hides the steps after its state that the killed run had logged."""
    kind = args.report_to if run.master else "none"
    report = open_reporter(kind, report_dir(args.out), args.out, settings, purge_step=start + 1 if start else None)
    if not start:
        w = sorted(x for e in examples for x in e["win_rate"])
        report({"data/prompts": len(examples), "data/responses": len(w), "data/cut_prompts": data_stats["cut_prompts"],
                "data/cut_responses": data_stats["cut_responses"],
                "data/skipped_prompts": sum(data_stats["skipped_prompts"].values()),
                "data/win_rate_mean": sum(w) / len(w),
                **{f"data/win_rate_p{q}": w[round(q / 100 * (len(w) - 1))] for q in (0, 10, 50, 90, 100)}}, 0)
    return report


def main():
    args = parser().parse_args()
    micro = check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    records = read_ranked(args.data, args.select)
    check_paths([args.data, args.model], args.out)
    run = start_processes(args.dtype, args.dist_timeout_minutes)  # imports torch: after the checks, so bad input fails in a blink
    settings = run_settings(args, run.dtype)
    if finished_earlier(args.out, settings):
        remove_state(args.out, run)  # left by a kill between OUT's rename and the state's removal
        return run.print(f"train: {args.out} exists, nothing to do")
    resume = latest_state(args.out, settings, run)  # OUT.state/step-N of an interrupted run, or None
    tok = load_tokenizer(args.model)
    examples, data_stats = load_examples(tok, records, args, run)
    steps = make_schedule(examples, args.epochs, args.batch_size, micro, args.seed)
    epoch_steps = math.ceil(len(examples) / args.batch_size)
    run.print(f"train: {len(examples)} prompts, {len(examples[0]['responses'])} responses each ({args.select}), "
              f"{len(steps)} steps of {args.batch_size} prompts ({args.batch_size // (micro * run.world)} x {micro} "
              f"per process x {run.world}), eta {args.eta:g}, lr {args.lr:g}, {args.optimizer}, {run.dtype}")
    import torch
    torch.manual_seed(args.seed)
    tmp = args.out + ".tmp"
    if run.master and os.path.exists(tmp):
        shutil.rmtree(tmp)  # what an interrupted run left: made again below (from its training state, if any)
    model = load_model(args, run)
    params, opt, sched = make_optimizer(model, args, len(steps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    # log pi_t(y|x), once, before any update; a resumed run takes them, and all it had reached, from its state
    t0, shape = time.time(), (len(examples), len(examples[0]["responses"]))
    if resume:
        start, ref, history, seconds = load_state(resume, model, opt, sched, shape, run)
        run.print(f"train: resumed after step {start}/{len(steps)} from {resume} in {time.time() - t0:.1f}s")
    else:
        start, history, seconds = 0, [], 0.0
        ref = reference_logps(model, examples, steps[:epoch_steps], pad, run)
        run.print(f"train: reference log-probs of {ref.numel()} responses in {time.time() - t0:.1f}s")
    win = torch.tensor([e["win_rate"] for e in examples], dtype=torch.float64)
    log = start_log(tmp, examples, ref, history, run)
    report = start_reporter(args, settings, examples, data_stats, start, run)

    # minimise (log pi(y|x) - log pi_t(y|x) - eta (W(y) - 1/2))^2, one optimizer step per global batch;
    # every --save-every steps, the training state that a rerun resumes from
    t_train = time.time() - seconds
    for s in range(start, len(steps)):
        t1 = time.time()
        stats, n_resp = train_step(model, examples, steps[s], ref, win, pad, args, run)
        grad_norm, lr = optimizer_step(params, opt, sched, args.max_grad_norm)
        history.append(step_log(s, epoch_steps, stats, n_resp, grad_norm, lr, time.time() - t1))
        log_step(history[-1], len(steps), log, report, run)
        if args.save_every and (s + 1) % args.save_every == 0 and s + 1 < len(steps):
            save_state(args.out, s + 1, model, opt, sched, ref, history, time.time() - t_train, settings, run)
    train_s = time.time() - t_train

    # OUT.tmp, then OUT
    if run.master:
        log.close()
    report.close()
    total_tokens = sum(h["tokens"] for h in history)
    peak = run.peak_memory()
    stats = {"steps": len(steps), "prompts": len(examples), "responses_per_prompt": ref.shape[1],
             "tokens": total_tokens, "train_seconds": round(train_s, 2), "final_loss": history[-1]["loss"],
             "tokens_per_s": round(total_tokens / max(train_s, 1e-9), 1), **data_stats, "processes": run.world,
             "device": run.device.type, "peak_memory_gb": round(peak / 2**30, 3), "peak_memory_kind": run.memory_kind}
    save_checkpoint(model, tok, args, run, tmp, {"settings": settings, "stats": stats})
    remove_state(args.out, run)
    run.finish()
    run.print(f"train: {len(steps)} steps, {total_tokens} tokens in {train_s:.1f}s ({total_tokens / max(train_s, 1e-9):.0f} "
              f"tokens/s), peak memory {peak / 2**30:.2f} GB ({run.memory_kind}) -> {args.out}")


def allocator_defaults(environ):
    """Expandable segments unless the user configured torch's CUDA allocator: micro-batches of varying width
    otherwise fragment its cache until a step that fits runs out of memory. Before torch starts CUDA."""
    if "PYTORCH_ALLOC_CONF" not in environ and "PYTORCH_CUDA_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


if __name__ == "__main__":
    allocator_defaults(os.environ)
    main_guard(main)
