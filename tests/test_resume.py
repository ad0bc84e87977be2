"""Training that resumes mid-iteration: train_sppo.py --save-every N writes its training state (OUT.state/step-N,
torch.distributed.checkpoint), and a rerun after a kill goes on from it to the run it would have been.

Kills are placed with the SPPO_FAULT hook (common.fault_point): train-step:3 SIGKILLs the process that logged step 3
(rank 0) before it saves its state; state-shards:2 kills it inside the second save, its shards written but not its
train_state.json, not renamed. The expected values are uninterrupted runs of the same settings: the losses in
train_log.jsonl (all but the throughput) and the weights written.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, write_jsonl
from test_train import assert_same_weights, ranked_records

# 16 prompts, 8 per step, 2 epochs: 4 steps, a state after each. A linear schedule, so a resumed run that lost the
# schedule's state would step at the wrong lr; AdamW, whose moments a resumed run must carry over.
SETTINGS = ["--eta", 5, "--lr", 3e-4, "--optimizer", "adamw", "--warmup-ratio", 0, "--schedule", "linear",
            "--batch-size", 8, "--micro-batch-size", 4, "--max-length", 96, "--max-prompt-length", 48, "--seed", 1,
            "--epochs", 2, "--save-every", 1, "--report-to", "none"]


def train(policy, data, out, fault=None, nproc=1, extra=(), check=True):
    """train_sppo.py in one process or under torchrun (gloo); a run given a fault must die of it."""
    args = ["--model", policy, "--data", data, "--out", out, *SETTINGS, *extra]
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  "--nproc_per_node", str(nproc)]
    env = {k: v for k, v in os.environ.items() if k != "SPPO_FAULT"}
    env.update(SPPO_PROGRESS="0", OMP_NUM_THREADS="1", **({"SPPO_FAULT": fault} if fault else {}))
    p = subprocess.run([*launch, os.path.join(ROOT, "train_sppo.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=env)
    if fault:  # one process: killed by the signal; torchrun: it reports the failure of rank 0 and stops the rest
        assert p.returncode == (-signal.SIGKILL if nproc == 1 else 1), f"{fault} not reached:\n{p.stderr[-3000:]}"
    elif check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out):
    """train_log.jsonl without the throughput (a timing)."""
    log = read_jsonl(os.path.join(out, "train_log.jsonl"))
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log]


def assert_same_run(out, ref, start, same_processes=True):
    """The resumed run's log and weights equal the uninterrupted run's. On as many processes: the same operations
    on the same values in the same order, so equal to the bit on one machine (1e-6 = 16 units of fp32's last
    place: a step that went otherwise would move them by far more). On another number of processes: the gradients
    are summed in another order, so to fp32's rounding of that (reordered_fp32, over 4 steps), and the weights
    as test_train.assert_same_weights compares them."""
    a, b = losses(out), losses(ref)
    assert [r["step"] for r in a] == [1, 2, 3, 4], "a step lost or doubled in train_log.jsonl"
    tol = 1e-6 if same_processes else 4 * reordered_fp32(1.0, forward_sums(json.load(open(start / "config.json")), 96) + 600)
    for x, y in zip(a, b):
        for key in x:
            assert x[key] == pytest.approx(y[key], rel=tol, abs=tol), (x["step"], key)
    if same_processes:
        wa, wb = load_file(os.path.join(out, "model.safetensors")), load_file(os.path.join(ref, "model.safetensors"))
        assert wa.keys() == wb.keys()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= tol
    else:
        assert_same_weights(out, ref, start)
    assert not os.path.exists(f"{out}.state") and not os.path.exists(f"{out}.tmp"), "a finished run leaves no state"


@pytest.fixture(scope="module")
def data(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("resume") / "ranked.jsonl"
    write_jsonl(path, ranked_records(world))
    return path


@pytest.fixture(scope="module")
def dropout_policy(world, tmp_path_factory):
    """The tiny policy with attention dropout 0.1: training then draws random numbers at every step, and a
    resumed run matches only if it restored the random state of the run it continues."""
    policy = tmp_path_factory.mktemp("dropout") / "policy"
    shutil.copytree(world / "policy", policy)
    config = json.load(open(policy / "config.json"))
    config["attention_dropout"] = 0.1
    json.dump(config, open(policy / "config.json", "w"))
    return policy


@pytest.fixture(scope="module")
def uninterrupted(dropout_policy, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "ckpt"
    train(dropout_policy, data, out)
    return out


def test_killed_mid_training_resumes_the_same_run(dropout_policy, data, uninterrupted, tmp_path):
    """Killed after logging step 3: the state of step 2 is the last complete one. The rerun takes the weights, the
    AdamW moments, the lr schedule, the random state and the reference log-probs from it, drops step 3 from the
    log and runs steps 3 and 4 again: the same losses and weights as the run that was never killed."""
    out = tmp_path / "ckpt"
    train(dropout_policy, data, out, fault="train-step:3")
    assert sorted(os.listdir(f"{out}.state")) == ["step-2"], "one state kept: the last complete one"
    assert len(read_jsonl(f"{out}.tmp/train_log.jsonl")) == 3 and not out.exists()
    # other settings are refused, and leave the state as it was
    p = train(dropout_policy, data, out, extra=["--lr", 1e-4], check=False)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr[-2000:]
    assert "step-2: was made with lr=0.0003, this run has lr=0.0001" in p.stderr
    assert sorted(os.listdir(f"{out}.state")) == ["step-2"]
    p = train(dropout_policy, data, out)
    assert "resumed after step 2/4" in p.stderr and "reference log-probs of" not in p.stderr, "not recomputed"
    assert_same_run(out, uninterrupted, dropout_policy)


def test_kill_while_saving_leaves_the_previous_state(dropout_policy, data, uninterrupted, tmp_path):
    """Killed inside the second save: step-2.tmp holds its shards and index but no train_state.json. It is never
    read (and is removed), step-1 was kept until step-2 would have been complete, and the rerun resumes from it."""
    out = tmp_path / "ckpt"
    train(dropout_policy, data, out, fault="state-shards:2")
    assert sorted(os.listdir(f"{out}.state")) == ["step-1", "step-2.tmp"]
    assert os.path.exists(f"{out}.state/step-2.tmp/.metadata")
    p = train(dropout_policy, data, out)
    assert "resumed after step 1/4" in p.stderr
    assert_same_run(out, uninterrupted, dropout_policy)


@pytest.mark.slow
def test_two_processes_killed_then_resumed_on_two_and_on_one(world, data, tmp_path):
    """Two processes (gloo, FSDP2: each writes only its own shards) killed after step 3, resumed once on two
    processes and once, from a copy of the same state, on one: DCP reshards the weights and optimizer state, and the
    global batches do not depend on the number of processes, so both equal one uninterrupted process to float
    summation order. (The tiny policy has no dropout: its random draws cannot carry over to another count.)"""
    ref, two, one = tmp_path / "ref", tmp_path / "two", tmp_path / "one"
    train(world / "policy", data, ref)
    train(world / "policy", data, two, fault="train-step:3", nproc=2)
    state = f"{two}.state/step-2"
    assert sorted(os.listdir(state)) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.json"]
    assert json.load(open(f"{state}/train_state.json"))["processes"] == 2
    shutil.copytree(f"{two}.state", f"{one}.state")
    p = train(world / "policy", data, two, nproc=2)
    assert "resumed after step 2/4" in p.stderr
    assert_same_run(two, ref, world / "policy", same_processes=False)
    p = train(world / "policy", data, one)
    assert "resumed after step 2/4" in p.stderr and "saved by 2 processes, this run has 1" in p.stderr
    assert_same_run(one, ref, world / "policy", same_processes=False)
