"""run_loop.sh end to end on the tiny world: two iterations, reruns, a failing stage, a changed setting, a lock."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, read_jsonl
from test_faults import assert_same_loop_outputs, kill_loop_at


def loop_env(world, out, **env):
    """Two small iterations of configs/tiny.env on the HF engine (the vLLM engine has its own tests) that learn:
    2 steps of 4 prompts each, lr 1e-3 from the first step (no warm-up, whose first step runs at lr 0)."""
    return dict(os.environ, SPPO_PROGRESS="0", OMP_NUM_THREADS="1", PYTHON=sys.executable, WORLD=str(world),
                OUT=str(out), ITERS="2", N_PROMPTS="8", K="3", MAX_TOKENS="32", GEN_ARGS="--engine hf", BATCH="4",
                MICRO_BATCH="4", EPOCHS="1", WARMUP="0", LR="1e-3") | env


def loop(world, out, check=True, **env):
    e = loop_env(world, out, **env)
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=e, cwd=ROOT,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"run_loop.sh failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


@pytest.fixture(scope="module")
def learned(world, tmp_path_factory):
    """One uninterrupted run of the loop, shared by the tests below (none of them changes it)."""
    out = tmp_path_factory.mktemp("loop") / "loop"
    return out, loop(world, out)


def test_two_iterations_then_rerun_does_nothing(world, learned):
    out, p = learned
    for t in (1, 2):
        ranked = read_jsonl(out / f"iter{t}" / "ranked.jsonl")
        assert len(ranked) == 8 and all(len(r["win_rate"]) == 3 for r in ranked)
        assert (out / f"iter{t}" / "checkpoint" / "config.json").exists()
        assert not list((out / f"iter{t}").glob("*.jsonl.*")), "shard files are merged and removed"
        assert len(read_jsonl(out / f"iter{t}" / "checkpoint" / "train_log.jsonl")) == 2
    assert read_jsonl(out / "iter2" / "generated.jsonl")[0]["generate"]["model"] == str(out / "iter1" / "checkpoint")
    assert "6 stages run" in p.stdout
    before = {f: os.path.getmtime(f) for f in out.rglob("*") if f.is_file()}
    p = loop(world, out)
    assert "nothing to do" in p.stdout
    assert before == {f: os.path.getmtime(f) for f in out.rglob("*") if f.is_file()}
    # a run directory holds one experiment: another K is refused, naming the setting
    p = loop(world, out, check=False, K="4")
    assert p.returncode == 2 and "was made with K='3', this run has K='4'" in p.stderr
    # what changes no result may change (the first things tried after an out-of-memory error); a dtype may not
    p = loop(world, out, MICRO_BATCH="2", TRAIN_ARGS="--gradient-checkpointing --micro-batch-size 1")
    assert "nothing to do" in p.stdout
    p = loop(world, out, check=False, TRAIN_ARGS="--dtype bf16")
    assert p.returncode == 2 and "this run has TRAIN_ARGS='--dtype bf16'" in p.stderr


def test_iteration_two_samples_from_what_iteration_one_learned(world, learned):
    """Iteration 1's checkpoint is not the base, and iteration 2 sampled from it: both iterations answer the
    same prompts with the same seeds, iteration 1 with the base, so iteration 2's answers differ from them only
    because its policy does."""
    from safetensors.torch import load_file
    out, _ = learned
    base, it1 = load_file(world / "policy" / "model.safetensors"), load_file(out / "iter1" / "checkpoint" / "model.safetensors")
    assert base.keys() == it1.keys()
    assert sum(int((base[k] != it1[k]).sum()) for k in base) > 0.5 * sum(v.numel() for v in base.values())
    g1, g2 = (read_jsonl(out / f"iter{t}" / "generated.jsonl") for t in (1, 2))
    assert [(r["id"], r["generate"]["seed"]) for r in g1] == [(r["id"], r["generate"]["seed"]) for r in g2]
    changed = sum(a != b for r1, r2 in zip(g1, g2) for a, b in zip(r1["responses"], r2["responses"]))
    assert changed >= 6, f"only {changed} of 24 answers changed"


def test_loop_killed_while_training_then_rerun(world, learned, tmp_path):
    """The loop and its running stage SIGKILLed while iteration 1 trains (its first step logged in OUT/iter1/checkpoint.tmp), as a
    scheduler or a lost machine does; the rerun redoes only the training and ends with the outputs of the
    uninterrupted run. (One iteration: what follows a finished iteration is the same loop again.)"""
    out = tmp_path / "loop"
    env = loop_env(world, out, ITERS="1")
    kill_loop_at(env, "train-step", tmp_path)  # step 1 logged in OUT.tmp
    assert (out / "iter1" / "ranked.jsonl").exists() and not (out / "iter1" / "checkpoint").exists()
    p = loop(world, out, ITERS="1")
    assert "[iter 1] rank: done earlier" in p.stdout and "1 stages run" in p.stdout
    assert_same_loop_outputs(world, out, learned[0], iters=(1,))
    assert not [f for f in out.rglob("*") if f.name.endswith((".partial", ".tmp")) or ".jsonl." in f.name]


def test_failing_stage_stops_and_rerun_continues(world, tmp_path):
    out, ranker = tmp_path / "loop", tmp_path / "ranker"
    shutil.copytree(world / "ranker", ranker)
    weights = next(ranker.glob("*.safetensors"))
    hidden = tmp_path / "weights.bak"
    weights.rename(hidden)
    p = loop(world, out, check=False, RANKER=str(ranker), ITERS="1")
    assert p.returncode != 0
    log = out / "iter1" / "logs" / "rank.0.log"
    assert f"stage 'rank' failed (iteration 1); see {log}" in p.stderr
    assert (out / "iter1" / "generated.jsonl").exists() and not (out / "iter1" / "ranked.jsonl").exists()
    hidden.rename(weights)  # fix the cause, rerun: generation is not redone
    p = loop(world, out, RANKER=str(ranker), ITERS="1")
    assert "[iter 1] generate: done earlier" in p.stdout
    assert (out / "iter1" / "checkpoint" / "config.json").exists()


def test_split_prompts_gives_each_iteration_the_next_prompts(world, tmp_path):
    """SPLIT_PROMPTS=1: iteration t answers prompts (t-1)N+1..tN of the one file, as the release's three
    disjoint splits; the setting is part of the run's settings, so a rerun without it is refused."""
    ids = [r["id"] for r in read_jsonl(world / "prompts.jsonl")]
    out = tmp_path / "loop"
    loop(world, out, SPLIT_PROMPTS="1", N_PROMPTS="4", K="2", MAX_TOKENS="8")
    assert [[r["id"] for r in read_jsonl(out / f"iter{t}" / "generated.jsonl")] for t in (1, 2)] == [ids[:4], ids[4:8]]
    p = loop(world, out, check=False, N_PROMPTS="4", K="2", MAX_TOKENS="8")
    assert p.returncode == 2 and "was made with SPLIT_PROMPTS='1', this run has SPLIT_PROMPTS=None" in p.stderr


@pytest.mark.parametrize("env, error", [
    ({"SPLIT_PROMPTS": "1"}, "SPLIT_PROMPTS=1 needs N_PROMPTS, the prompts of each iteration; got ''"),
    ({"SPLIT_PROMPTS": "yes"}, "SPLIT_PROMPTS is 0 or 1; got 'yes'")])
def test_split_prompts_needs_a_count(tmp_path, env, error):
    """(The release config: its N_PROMPTS is empty, all prompts of each iteration's dataset.)"""
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/mistral7b.env"], cwd=ROOT, text=True,
                       env=dict(os.environ, PYTHON="false", OUT=str(tmp_path / "out"), **env), capture_output=True)
    assert p.returncode == 2 and p.stderr.strip() == f"run_loop: {error}"
    assert not (tmp_path / "out").exists()


def test_second_loop_on_the_same_out_is_refused(world, tmp_path):
    import fcntl
    out = tmp_path / "loop"
    out.mkdir()
    with open(out / ".lock", "a") as f:  # what a running loop (or a stage it left running) holds
        fcntl.flock(f, fcntl.LOCK_EX)
        p = loop(world, out, check=False)
    assert p.returncode == 2 and "another run is using" in p.stderr
    assert not (out / "iter1").exists()


@pytest.mark.parametrize("args", [[], ["--help"], ["-h"]])
def test_no_config_prints_the_usage_and_starts_nothing(tmp_path, args):
    """`bash run_loop.sh` alone prints its usage and exits 2: it never falls back to the 7B recipe."""
    env = dict(os.environ, PYTHON="false", OUT=str(tmp_path / "out"))
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), *args], env=env, cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "usage: bash run_loop.sh CONFIG" in p.stdout + p.stderr
    assert "configs/tiny.env" in p.stdout + p.stderr  # the examples come with it
    assert not (tmp_path / "out").exists() and not os.path.exists(os.path.join(ROOT, "runs", "mistral7b"))
