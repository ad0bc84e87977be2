"""train_sppo.py on the tiny policy: the loss by hand, step 1 equals the reference, training moves the
log-ratios toward their targets, torchrun on 2 CPU processes equals 1 process, the checkpoint reloads,
reruns are idempotent, and bad data is refused before a model loads."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, run_stage, write_jsonl

sys.path.insert(0, os.path.join(ROOT, "examples", "tiny"))
import world as toy  # noqa: E402
from common import InputError  # noqa: E402
from train_sppo import dpo_loss, ipo_loss, read_ranked, select_responses, sppo_loss  # noqa: E402

TRAIN = "train_sppo.py"
# One thread per process: the tiny model gains nothing from more, and on a busy 2-core machine torch's
# default threads oversubscribe it (a single run measured 80x slower).
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Tiny-demo hyperparameters: every step sees all 16 prompts, so the losses of successive steps compare.
TINY = ["--eta", 5, "--lr", 3e-4, "--optimizer", "adamw", "--warmup-ratio", 0, "--batch-size", 16,
        "--micro-batch-size", 4, "--max-length", 96, "--max-prompt-length", 48, "--seed", 1]


def ranked_records(world, n=16, k=4, seed=0):
    """Ranked records as rank.py writes them: toy answers, P from the toy judge's scores, W = row means of P."""
    rng = random.Random(seed)
    prompts = read_jsonl(world / "prompts.jsonl")[:n]
    out = []
    for p in prompts:
        responses = [toy.make_answer(rng, p["prompt"]) for _ in range(k)]
        s = [toy.judge_score(r) + rng.gauss(0, 0.3) for r in responses]
        probs = [[1 / (1 + math.exp(s[j] - s[i])) for j in range(k)] for i in range(k)]
        out.append({"id": p["id"], "prompt": p["prompt"], "responses": responses, "logits": probs, "probs": probs,
                    "win_rate": [sum(row) / k for row in probs], "rank": {"ranker": "toy"}})
    return out


def train(world, data, out, *extra, check=True, nproc=None, spy_log=None, spy_compute=False):
    """train_sppo.py in 1 process, or under torchrun in nproc; spy_log: a file where tests/spy_models.py
    logs how each process built its model (and, with spy_compute, what it computed)."""
    args = ["--model", world / "policy", "--data", data, "--out", out, *TINY, *extra]
    if nproc is None and not spy_log:
        return run_stage(TRAIN, *args, check=check, env=ONE_THREAD)
    spy = [os.path.join(ROOT, "tests", "spy_models.py")] if spy_log else []
    # --standalone: a free port, so test runs side by side on one machine do not collide
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc else []
    cmd = [sys.executable, *launch, *spy, os.path.join(ROOT, TRAIN), *map(str, args)]
    env = dict(os.environ, SPPO_PROGRESS="0", **ONE_THREAD, **({"SPY_LOG": str(spy_log)} if spy_log else {}),
               **({"SPY_COMPUTE": "1"} if spy_compute else {}))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def targets(recs, select, eta=5.0):
    return [eta * (r["win_rate"][i] - 0.5) for r in recs for i in select_responses(r["win_rate"], select)]


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "ranked.jsonl"
    write_jsonl(path, ranked_records(world))
    return path


@pytest.fixture(scope="module")
def trained(world, data, tmp_path_factory):
    """One single-process run of 6 steps on all 4 responses per prompt (the paper's Algorithm 1)."""
    out = tmp_path_factory.mktemp("run") / "ckpt"
    p = train(world, data, out, "--select", "all", "--epochs", 6)
    return out, p


# -----------------------------------------------------------------------------
# the loss, by hand

def test_sppo_loss_by_hand():
    policy, ref = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -19.0, -5.0])
    w = torch.tensor([0.9, 0.2, 0.5])
    # (2 - 1000*0.4)^2, (-1 + 1000*0.3)^2, 0
    assert sppo_loss(policy, ref, w, 1000).tolist() == pytest.approx([398.0 ** 2, 299.0 ** 2, 0.0])
    # best-worst: the argmax and argmin of W, averaged: the released 'sppo' loss, 1/2 [(a_w - ..)^2 + (a_l - ..)^2]
    wr = [0.2, 0.9, 0.5, 0.1]
    assert select_responses(wr, "best-worst") == [1, 3] and select_responses(wr, "all") == [0, 1, 2, 3]
    a = torch.tensor([0.5, 1.0, -1.0, 2.0])
    err = sppo_loss(a, torch.zeros(4), torch.tensor(wr), 10.0)
    best_worst = err[select_responses(wr, "best-worst")].mean().item()
    assert best_worst == pytest.approx(((1.0 - 4.0) ** 2 + (2.0 + 4.0) ** 2) / 2)
    assert err.mean().item() == pytest.approx(((0.5 + 3) ** 2 + (1 - 4) ** 2 + 1 + (2 + 4) ** 2) / 4)
    assert select_responses([0.5, 0.5, 0.5], "best-worst") == [0, 0]  # ties: the first index, as numpy's arg-max/min


def test_baseline_losses_by_hand():
    """The paper's baselines on a pair's log-ratios a_w, a_l (beta = 1/eta): DPO -log sigmoid(beta (a_w - a_l)),
    IPO (a_w - a_l - eta/2)^2; at step 1 (a = 0) log 2 and (eta/2)^2; their gradients by hand."""
    zero = torch.zeros(3)
    assert dpo_loss(zero, zero, 1000.0).tolist() == pytest.approx([math.log(2)] * 3)
    assert ipo_loss(zero, zero, 5.0).tolist() == pytest.approx([6.25] * 3)
    a_w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    a_l = torch.tensor([-1.0, 3.0, 0.5], requires_grad=True)
    eta, d = 4.0, torch.tensor([2.0, -5.0, 0.0])
    dpo_loss(a_w, a_l, eta).sum().backward()
    sig = 1 / (1 + torch.exp(d / eta))  # sigmoid(-beta d)
    assert a_w.grad.tolist() == pytest.approx((-sig / eta).tolist()) and a_l.grad.tolist() == pytest.approx((sig / eta).tolist())
    a_w.grad = a_l.grad = None
    ipo_loss(a_w, a_l, eta).sum().backward()
    assert a_w.grad.tolist() == pytest.approx((2 * (d - eta / 2)).tolist())
    assert a_l.grad.tolist() == pytest.approx((-2 * (d - eta / 2)).tolist())


@pytest.mark.parametrize("loss, first", [("dpo", math.log(2)), ("ipo", 6.25)])
def test_baseline_losses_train(world, data, tmp_path, loss, first):
    """--loss dpo / ipo on the same best/worst pairs: step 1 is log 2 / (eta/2)^2 (eta 5), then the winners'
    log-ratios rise above the losers'."""
    train(world, data, tmp_path / "ckpt", "--loss", loss, "--epochs", 4)
    log = read_jsonl(tmp_path / "ckpt" / "train_log.jsonl")
    # step 1's log-ratios are policy - reference of the same fp32 forward, 0 to the bit, and the loss is a function
    # of them: exact in float64; 1e-5 leaves room only for fp32's rounding of log 2 and 6.25
    assert log[0]["loss"] == pytest.approx(first, rel=1e-5)
    assert log[-1]["loss"] < log[0]["loss"] and log[-1]["log_ratio_pos"] > log[-1]["log_ratio_neg"]
    assert json.load(open(tmp_path / "ckpt" / "sppo_train.json"))["settings"]["loss"] == loss
    p = train(world, data, tmp_path / "other", "--loss", loss, "--select", "all", check=False)
    assert p.returncode == 2 and "needs --select best-worst" in p.stderr


# -----------------------------------------------------------------------------
# a training run

def test_training_moves_log_ratios_toward_targets(world, data, trained):
    out, p = trained
    recs = read_jsonl(data)
    log = read_jsonl(out / "train_log.jsonl")
    assert [x["step"] for x in log] == list(range(1, 7))
    # step 1 runs on the starting weights: the policy is the reference, every log-ratio is 0
    t = targets(recs, "all")
    # the reference pass and step 1 run the same fp32 forward on the same micro-batches: log-ratios 0 to the bit;
    # the loss squares fp32 targets in fp32 (16 units of its last place), the target is float64 (W from JSON)
    assert log[0]["log_ratio"] == 0 and log[0]["log_ratio_pos"] == 0
    assert log[0]["loss"] == pytest.approx(sum(x * x for x in t) / len(t), rel=1e-6)
    assert log[0]["target"] == pytest.approx(sum(t) / len(t), rel=1e-12, abs=1e-15)
    # responses that win more than half their games gain log-probability, losers lose it; the loss falls
    assert log[-1]["log_ratio_pos"] > 0.3 and log[-1]["log_ratio_neg"] < -0.3
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    # linear decay from 3e-4 without warm-up (the release's schedule, warm-up ratio 0 here)
    assert [x["lr"] for x in log] == pytest.approx([3e-4 * (1 - s / 6) for s in range(6)], rel=1e-12)
    assert all(x["tokens_per_s"] > 0 and x["grad_norm"] > 0 and x["tokens"] > 0 for x in log)
    # readable progress and a summary
    lines = p.stderr.splitlines()
    assert sum(line.startswith("step ") and "tok/s" in line for line in lines) == 6
    assert "tokens/s" in lines[-1] and "peak memory" in lines[-1]
    # a complete save_pretrained directory, and no temporary left
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja",
            "train_log.jsonl", "sppo_train.json"} <= names
    assert not os.path.exists(str(out) + ".tmp")
    meta = json.load(open(out / "sppo_train.json"))
    assert meta["settings"]["select"] == "all" and meta["stats"]["steps"] == 6
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"


def test_checkpoint_reloads_and_rerun_is_idempotent(world, data, trained, tmp_path):
    out, _ = trained
    from transformers import AutoModelForCausalLM
    before = AutoModelForCausalLM.from_pretrained(world / "policy").state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    # generate.py samples from it (the HF engine here; vLLM loads the same directory)
    run_stage("generate.py", "--model", out, "--prompts", world / "prompts.jsonl", "--out", tmp_path / "g.jsonl",
              "--engine", "hf", "--limit", 4, "--k", 2, "--max-tokens", 32)
    recs = read_jsonl(tmp_path / "g.jsonl")
    assert len(recs) == 4 and sum(len(x) > 0 for r in recs for x in r["responses"]) >= 6
    # the same run again finds the checkpoint and does nothing; other settings are refused by name
    stamp = os.path.getmtime(out / "model.safetensors")
    p = train(world, data, out, "--select", "all", "--epochs", 6)
    assert p.stderr.strip().splitlines()[-1] == f"train: {out} exists, nothing to do"
    assert os.path.getmtime(out / "model.safetensors") == stamp
    p = train(world, data, out, "--select", "all", "--epochs", 6, "--lr", 1e-4, check=False)
    assert p.returncode == 2 and "lr=0.0003" in p.stderr and "lr=0.0001" in p.stderr


# -----------------------------------------------------------------------------
# the gradient, the schedule, RMSprop and clipping, against a plain re-derivation

def id_records(world, n=8, k=2, seed=3):
    """Ranked records with generate.py's token ids (short toy answers), so the test and the trainer train
    exactly the same tokens."""
    from common import encode_prompt, load_tokenizer
    tok = load_tokenizer(str(world / "policy"))
    recs = ranked_records(world, n=n, k=k, seed=seed)
    for r in recs:
        r["prompt_token_ids"] = encode_prompt(tok, r["prompt"])
        r["response_token_ids"] = [tok.encode(a, add_special_tokens=False)[:20] + [tok.eos_token_id] for a in r["responses"]]
    return recs


def plain_gradient(model, recs, eta):
    """Autograd of the mean SPPO loss over the responses of `recs` at the starting weights (so the policy is
    the reference and every log-ratio is 0): each sequence alone, unpadded, log-probs from the whole logits."""
    model.zero_grad()
    lps, targets = [], []
    for r in recs:
        for ids, w in zip(r["response_token_ids"], r["win_rate"]):
            logits = model(input_ids=torch.tensor([r["prompt_token_ids"] + ids])).logits[0, :-1]
            logp = torch.log_softmax(logits.float(), -1)[-len(ids):]  # the rows that predict the response
            lps.append(logp.gather(-1, torch.tensor(ids)[:, None]).sum())
            targets.append(eta * (w - 0.5))
    lp = torch.stack(lps)
    ((lp - lp.detach() - torch.tensor(targets)) ** 2).mean().backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_rmsprop_run_gradient_warm_up_and_clipping(world, tmp_path):
    """The recipe's optimizer on 8 prompts in 2 steps of 4, warm-up ratio 0.5 (1 step), clipping at 1.0:
    - step 1's grad_norm is the norm of the mean loss's gradient computed here, and step 1 runs at lr 0;
    - the lr-0 step leaves the weights alone, so step 2's gradient is also taken at the starting weights;
    - the weights written are w0 - lr g2c / (sqrt(v) + eps), with g1c, g2c the gradients clipped to norm 1,
      v = 0.99 (0.01 g1c^2) + 0.01 g2c^2 (torch's RMSprop: alpha 0.99, eps 1e-8). RMSprop's first update
      is blind to a gradient's scale; its second is not: without clipping it would differ (checked)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    eta, lr = 5.0, 1e-3
    recs = id_records(world)
    write_jsonl(tmp_path / "ranked.jsonl", recs)
    out = tmp_path / "ckpt"
    run_stage(TRAIN, "--model", world / "policy", "--data", tmp_path / "ranked.jsonl", "--out", out, "--eta", eta,
              "--lr", lr, "--optimizer", "rmsprop", "--warmup-ratio", 0.5, "--batch-size", 4, "--micro-batch-size", 2,
              "--select", "all", "--seed", 42, env=ONE_THREAD)
    log = read_jsonl(out / "train_log.jsonl")
    # the data order: a permutation seeded by --seed, cut into batches of 4 (make_schedule's documented rule)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(42)).tolist()
    model = AutoModelForCausalLM.from_pretrained(world / "policy", dtype=torch.float32)
    g1, g2 = plain_gradient(model, [recs[i] for i in perm[:4]], eta), plain_gradient(model, [recs[i] for i in perm[4:]], eta)
    norm = lambda g: math.sqrt(sum(float((x.double() ** 2).sum()) for x in g.values()))  # noqa: E731
    assert [x["lr"] for x in log] == [0.0, lr]
    # the trainer's gradient comes from padded micro-batches and chunked log-probs, the test's from one unpadded
    # sequence at a time: fp32 sums in another order, each gradient element to reordered_fp32 of the largest term
    # (n ~ forward_sums: 4 layers x 1,300 terms + the vocabulary's 600 in the log-softmax: 8 sqrt(6000) 2^-24 =
    # 3.7e-5 relative), and so their norm
    tol = reordered_fp32(1.0, forward_sums(json.load(open(world / "policy" / "config.json")), 64) + 600)
    assert log[0]["grad_norm"] == pytest.approx(norm(g1), rel=tol)
    assert log[1]["grad_norm"] == pytest.approx(norm(g2), rel=tol)
    t2 = [eta * (w - 0.5) for i in perm[4:] for w in recs[i]["win_rate"]]
    # still at log-ratio 0 (the lr-0 step left the weights as they were): fp32 squares, as above
    assert log[1]["loss"] == pytest.approx(sum(x * x for x in t2) / len(t2), rel=1e-6)
    assert max(norm(g1), norm(g2)) > 2, "the premise: clipping at 1.0 acts"

    def update(clip):
        c1, c2 = ((min(1.0, 1.0 / (norm(g) + 1e-6)) if clip else 1.0) for g in (g1, g2))
        return {n: -lr * c2 * g2[n] / ((0.99 * 0.01 * (c1 * g1[n]) ** 2 + 0.01 * (c2 * g2[n]) ** 2).sqrt() + 1e-8)
                for n in g1}
    w0, w1 = model.state_dict(), load_file(out / "model.safetensors")
    moved = {n: w1[n] - w0[n] for n in w1}

    def rel_err(expected):
        return math.sqrt(sum(float(((moved[n] - expected[n]) ** 2).sum()) for n in moved) /
                         sum(float((expected[n] ** 2).sum()) for n in moved))
    # RMSprop's update is g / sqrt(v) per element: about lr x 10 whatever the gradient's size, so where rounding
    # decides a near-0 gradient's sign the step flips (as in assert_same_weights: 1e-2 of the norm holds ~20
    # flips); elsewhere it is off by twice the gradient's rounding (tol). Unclipped, every element's step
    # changes by the clipping factors' share: far above 1e-2
    assert rel_err(update(clip=True)) < 1e-2
    assert rel_err(update(clip=False)) > 0.05


@pytest.mark.slow
def test_vllm_loads_the_checkpoint(world, trained, tmp_path):
    from conftest import require_vllm
    require_vllm()
    out, _ = trained
    run_stage("generate.py", "--model", out, "--prompts", world / "prompts.jsonl", "--out", tmp_path / "g.jsonl",
              "--engine", "vllm", "--limit", 4, "--k", 2, "--max-tokens", 32, "--kv-cache-gb", 0.1)
    assert len(read_jsonl(tmp_path / "g.jsonl")) == 4


MISMATCH_WORKER = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from train_sppo import Run, check_same_shapes
dist.init_process_group("gloo")
rank = dist.get_rank()
model = torch.nn.Linear(4, 3 if rank == 0 else 5)  # rank 1's model differs from rank 0's
try:
    check_same_shapes(model, Run(rank, 2, torch.device("cpu"), "fp32"))
except RuntimeError as e:
    print(f"rank {rank} refused: {e}", flush=True)
"""


def test_torchrun_shape_mismatch_is_refused_on_every_rank(tmp_path):
    """When a rank's model differs from the one rank 0 loaded, every rank refuses, rank 0 included: a rank 0
    that saw no difference would go on to its first broadcast and wait there for ever."""
    worker = tmp_path / "worker.py"
    worker.write_text(MISMATCH_WORKER)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(worker), ROOT], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert "rank 0 refused" in p.stdout and "rank 1 refused" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


def test_torchrun_two_processes_equal_one(world, data, tmp_path):
    """Best-worst (the default), once in 1 process and once in 2 (gloo, FSDP2): the same global batches, so
    the same losses and gradient norms, and the same weights written. 16 prompts in batches of 12 leave a
    short second batch whose empty micro-batches the processes must still run. A stale OUT.tmp from an
    interrupted run is cleared. Only rank 0 reads the checkpoint: rank 1 builds its model on the meta device
    and receives its shards, so the host holds one full copy of the weights. Each process's optimizer steps one
    tensor at a time."""
    one, two = tmp_path / "one", tmp_path / "two"
    os.makedirs(str(two) + ".tmp")
    open(str(two) + ".tmp/model.safetensors", "w").write("half-written")
    settings = ["--epochs", 2, "--batch-size", 12, "--micro-batch-size", 2]
    train(world, data, one, *settings)
    train(world, data, two, *settings, "--dist-timeout-minutes", 7, nproc=2, spy_log=tmp_path / "spy.jsonl")
    assert sorted(map(json.dumps, read_jsonl(tmp_path / "spy.jsonl"))) == sorted(map(json.dumps, [
        {"rank": 0, "call": "from_pretrained", "meta": False}, {"rank": 1, "call": "from_config", "meta": True},
        # the process group waits 7 minutes, not torch's default (NCCL 10, gloo 30), for rank 0's load and save
        *({"rank": r, "call": "init_process_group", "backend": "gloo", "timeout_s": 420.0} for r in (0, 1)),
        # each process steps its shards one tensor at a time, as one process does: torch's default on a GPU
        # (foreach, None here) would make a temporary of 4 bytes a parameter / processes (BENCHMARKS.md section 10)
        *({"rank": r, "call": "AdamW", "foreach": [False]} for r in (0, 1))]))
    a, b = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    assert len(a) == len(b) == 4
    # step 1 runs on the starting weights, so the policy is the reference: every log-ratio is 0 and the loss
    # is the mean of (eta (W - 1/2))^2 over the best and worst response of the first batch's prompts (the
    # first 12 of a permutation seeded by --seed)
    recs = read_jsonl(data)
    first = torch.randperm(len(recs), generator=torch.Generator().manual_seed(1)).tolist()[:12]
    t = targets([recs[i] for i in first], "best-worst")
    assert a[0]["log_ratio"] == 0 and a[0]["log_ratio_pos"] == 0
    assert a[0]["loss"] == pytest.approx(sum(x * x for x in t) / len(t), rel=1e-6)  # fp32 squares, as above
    # 1 and 2 processes: the same micro-batches in fp32, the gradients summed in another order (FSDP's
    # reduce-scatter): reordered_fp32 relative per step, compounding over the 4 steps' weights
    tol = 4 * reordered_fp32(1.0, forward_sums(json.load(open(world / "policy" / "config.json")), 96) + 600)
    for x, y in zip(a, b):
        for key in ("loss", "log_ratio_pos", "log_ratio_neg", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), (x["step"], key)
        assert x["tokens"] == y["tokens"] and x["lr"] == y["lr"]
    assert_same_weights(one, two, world / "policy")
    assert json.load(open(two / "sppo_train.json"))["stats"]["processes"] == 2
    assert not os.path.exists(str(two) + ".tmp")


def assert_same_weights(a, b, start):
    """Two runs' weights that differ only by fp32 summation order. AdamW moves each weight by about lr a step
    whatever its gradient's size, so the rare gradient element within rounding of 0 can step the other way in
    one run (2 lr apart): compared as norms, |wa - wb| < 1e-2 |wa - w0| (with N weights each moved ~lr per step,
    a flip adds 2/sqrt(N) of the change's norm: 1e-2 holds ~20 of the policy's 930k weights flipped), while a
    lost or doubled step, another data order or a missing state moves every weight."""
    from safetensors.torch import load_file
    w0, wa, wb = (load_file(os.path.join(d, "model.safetensors")) for d in (start, a, b))
    assert wa.keys() == wb.keys() and all(k in wa for k in w0)
    change = sum(float(((wa[k] - w0[k]) ** 2).sum()) for k in w0)
    assert change > 0 and sum(float(((wb[k] - wa[k]) ** 2).sum()) for k in w0) < 1e-2 ** 2 * change


def test_torchrun_bf16_and_gradient_checkpointing_two_processes_equal_one(world, data, tmp_path):
    """The recipe's compute settings through train_sppo.load_model: --dtype bf16 --gradient-checkpointing in 1
    process and in 2. Both run under FSDP2's bf16 policy (one process as a group of one): every parameter cast
    to bf16 for the forward and backward, fp32 master weights, gradients reduced and accumulated in fp32. The
    spy sees it in every process: its linear layers compute in bf16, and their forward runs again inside
    backward (checkpointing); its optimizer steps one tensor at a time.

    So the two runs compute the same bf16 gradient of each micro-batch (same weights, same rows, same kernels)
    and differ only in the order fp32 adds them up (4 micro-batches: one process adds 4, two processes add 2
    and 2 and sum the halves), a relative error of at most 3 x 2^-24 = 1.8e-7 per gradient element; the norm
    adds its own summation over ~1e6 squares in another order, at most log2(1e6) x 2^-24 = 1.2e-6 more. Hence
    step 1's gradient norm to 1e-5 and its loss to float64's rounding (the same forward). The fp32 weights after a step
    then differ by ~2^-24 relative, which bf16 (2^-8 steps) hides except where a weight sits on a rounding
    boundary (a chance of ~2^-16 per weight: ~14 of this policy's 930k weights, each moving its own term of the
    output by 2^-8): step 2's loss and gradient norm to 1e-4, and the weights' difference under 1e-5 of their
    change. (Autocast, which one process used before, rounds in other places than FSDP's policy: its gradient
    norm differed from FSDP's by 0.25-2.7% depending on the machine's kernels.)"""
    settings = ["--epochs", 1, "--batch-size", 8, "--micro-batch-size", 2, "--dtype", "bf16", "--gradient-checkpointing"]
    one, two = tmp_path / "one", tmp_path / "two"
    for out, nproc in ((one, None), (two, 2)):
        train(world, data, out, *settings, nproc=nproc, spy_log=tmp_path / f"{out.name}.spy", spy_compute=True)
        computed = [r for r in read_jsonl(tmp_path / f"{out.name}.spy") if "dtypes" in r]
        assert sorted(r["rank"] for r in computed) == list(range(nproc or 1))
        assert all(r["dtypes"] == ["torch.bfloat16"] and r["in_backward"] > 0 for r in computed), computed
        # one tensor at a time in 1 process as in 2: no foreach temporary of the whole state (BENCHMARKS.md 9-10)
        made = [r for r in read_jsonl(tmp_path / f"{out.name}.spy") if r.get("call") == "AdamW"]
        assert sorted((r["rank"], r["foreach"] == [False]) for r in made) == [(r, True) for r in range(nproc or 1)]
        assert json.load(open(out / "sppo_train.json"))["settings"]["dtype"] == "bf16"
    a, b = read_jsonl(one / "train_log.jsonl"), read_jsonl(two / "train_log.jsonl")
    # step 1's loss: float64 sums of the same fp32 terms, in another order
    assert len(a) == len(b) == 2 and a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-12)
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-5)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], rel=1e-4)
    assert a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=1e-4)
    from safetensors.torch import load_file
    w0 = load_file(world / "policy" / "model.safetensors")
    wa, wb = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    change = sum(float(((wa[k] - w0[k]) ** 2).sum()) for k in w0)
    assert change > 0 and sum(float(((wb[k] - wa[k]) ** 2).sum()) for k in w0) < 1e-5 ** 2 * change


# -----------------------------------------------------------------------------
# bad data: one line, exit 2, no output, before any model loads

@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("win_rate"), "field 'win_rate' is missing"),
    (lambda r: r["win_rate"].pop(), "'win_rate' has 3 values for K=4"),
    (lambda r: r["responses"].pop(), "has K=3 responses, the first record has K=4"),
    (lambda r: r["win_rate"].__setitem__(0, 1.5), "field 'win_rate' has 1.5"),
    (lambda r: r["probs"][1].__setitem__(2, -0.1), "field 'probs' has -0.1"),
    (lambda r: r["probs"].pop(), "'probs' should be a 4x4 matrix"),
], ids=["no-win-rate", "short-win-rate", "k-mismatch", "win-rate-above-1", "negative-prob", "probs-not-kxk"])
def test_bad_records_are_refused(world, tmp_path, change, message):
    recs = ranked_records(world, n=3)
    change(recs[2])
    write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(InputError, match="bad.jsonl:3: "):
        try:
            read_ranked(str(tmp_path / "bad.jsonl"), "best-worst")
        except InputError as e:
            assert message in str(e), str(e)
            raise


def test_token_id_outside_the_vocabulary_is_refused(world, tmp_path):
    """Sampled ids from another tokenizer: one line naming the file, line and field, exit 2, no output."""
    recs = ranked_records(world, n=3)
    for r in recs:
        r["prompt_token_ids"], r["response_token_ids"] = [1, 5, 6], [[7, 2]] * len(r["responses"])
    recs[1]["response_token_ids"][0] = [7, 10**6, 2]
    write_jsonl(tmp_path / "ids.jsonl", recs)
    out = tmp_path / "ckpt"
    p = train(world, tmp_path / "ids.jsonl", out, "--select", "all", check=False)
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and "ids.jsonl:2: field 'response_token_ids' or 'prompt_token_ids' has id 1000000" in err[-1]
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".tmp")


def test_bad_data_cli(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    recs = ranked_records(world, n=3)
    recs[1]["win_rate"][0] = float("nan")
    with open(bad, "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n")  # json writes NaN, as a careless stage might
    out = tmp_path / "ckpt"
    for path, message in [(bad, "bad.jsonl:2: malformed JSON (NaN is not allowed)"), (tmp_path / "empty.jsonl", "no records")]:
        open(tmp_path / "empty.jsonl", "w").close()
        # a missing model would fail too: the data is checked first
        p = run_stage(TRAIN, "--model", tmp_path / "no-model", "--data", path, "--out", out, check=False, env=ONE_THREAD)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".tmp")
