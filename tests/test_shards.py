"""The loop's sharded stages: every merged output is in the order of its input whatever the number of shards (so
one process, N GPUs and N nodes train on the same batches), and the first shard to fail stops its stage at once,
stops its siblings and leaves OUT free for a rerun."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, forward_sums, read_jsonl, reordered_fp32, write_jsonl
from test_faults import assert_same_ranked
from test_loop import loop
from test_slurm import executable


def merge(out, order, *shards):
    return subprocess.run([sys.executable, "common.py", "merge-shards", out, order, *shards], cwd=ROOT,
                          capture_output=True, text=True)


def test_merged_shards_follow_the_input_order_whatever_each_shard_skipped(tmp_path):
    """Ten prompts in three shards (position mod 3); shard 1 skipped p4 (too long for the context) and shard 2 is
    a resumed one whose records came back in another order. The merge lists the rest in the prompts' order."""
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": f"p{i}", "prompt": f"question {i}"} for i in range(10)])
    shards = [tmp_path / f"out.{s}" for s in range(3)]
    write_jsonl(shards[0], [{"id": f"p{i}"} for i in (0, 3, 6, 9)])
    write_jsonl(shards[1], [{"id": f"p{i}"} for i in (1, 7)])
    write_jsonl(shards[2], [{"id": f"p{i}"} for i in (8, 2, 5)])
    p = merge(tmp_path / "out", prompts, *shards)
    assert p.returncode == 0, p.stderr
    assert [r["id"] for r in read_jsonl(tmp_path / "out")] == ["p0", "p1", "p2", "p3", "p5", "p6", "p7", "p8", "p9"]
    assert not (tmp_path / "out.tmp").exists()


def test_a_merge_of_records_the_input_lacks_is_refused(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"id": "a", "prompt": "x"}])
    write_jsonl(tmp_path / "out.0", [{"id": "a"}, {"id": "b"}])
    p = merge(tmp_path / "out", prompts, tmp_path / "out.0")
    assert p.returncode == 2 and f"out.0:2: field 'id' has 'b', which {prompts} does not have" in p.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_one_and_two_shards_give_the_same_files_and_losses(world, tmp_path):
    """The loop on one process (GPUS=0) and on two (GPUS=2: two shards per stage and two training processes; on a
    CPU they run on it) over 9 prompts, the third too long for the policy's 512-token context, so generate.py's
    shard 0 skips it: the same records in the same order (the prompts' order without the skipped one) and the same
    training losses. Concatenating shard 0's records, then shard 1's, or taking them in turn, gives another order,
    so other batches and other losses."""
    prompts = tmp_path / "prompts.jsonl"
    rows = read_jsonl(world / "prompts.jsonl")[:8]
    rows.insert(2, {"id": "long", "prompt": " ".join(["cats"] * 600)})
    write_jsonl(prompts, rows)
    want = [r["id"] for r in rows if r["id"] != "long"]
    env = dict(PROMPTS=str(prompts), N_PROMPTS="9", ITERS="1")
    one, two = tmp_path / "one", tmp_path / "two"
    loop(world, one, GPUS="0", **env)
    loop(world, two, GPUS="2", **env)
    assert [r["id"] for r in read_jsonl(two / "iter1" / "generated.jsonl")] == want
    assert (one / "iter1" / "generated.jsonl").read_text() == (two / "iter1" / "generated.jsonl").read_text()
    ranked = [read_jsonl(out / "iter1" / "ranked.jsonl") for out in (one, two)]
    assert [r["id"] for r in ranked[1]] == want
    assert_same_ranked(world, *ranked)
    # the losses: the same batches; two processes sum the gradients in another order, so equal to fp32's rounding
    # of that over the 2 steps (as test_resume.assert_same_run)
    a, b = ([r["loss"] for r in read_jsonl(out / "iter1" / "checkpoint" / "train_log.jsonl")] for out in (one, two))
    config = json.load(open(world / "policy" / "config.json"))
    tol = 2 * reordered_fp32(1.0, forward_sums(config, 256) + 600)  # 256: MAX_LENGTH
    assert len(a) == len(b) == 2 and all(abs(x - y) <= tol * max(1.0, abs(x)) for x, y in zip(a, b)), (a, b, tol)


# A stand-in for $PYTHON: the loop's own common.py calls run for real; shard S_FAIL of generate.py fails after half a
# second, every other stage process forks a child (as vLLM starts its engine process: it inherits the lock on OUT),
# records both pids in SPY_PIDS and sleeps; training and ranking then finish at once.
SPY = """#!{python}
import os, sys, time
args = sys.argv[1:]
if args[:1] == ["common.py"]:
    os.execv(sys.executable, [sys.executable, *args])
out = args[args.index("--out") + 1]
if any(a.endswith("generate.py") for a in args) and os.environ.get("SPY_SLEEP"):
    if args[args.index("--shard") + 1] == os.environ.get("SPY_FAIL"):
        time.sleep(0.5)
        sys.exit("error: boom")
    child = os.fork()
    if child == 0:
        time.sleep(float(os.environ["SPY_SLEEP"]))
        os._exit(0)
    with open(os.environ["SPY_PIDS"], "a") as f:
        f.write(f"{{os.getpid()}} {{child}}\\n")
    time.sleep(float(os.environ["SPY_SLEEP"]))
if any(a.endswith("train_sppo.py") for a in args):
    os.makedirs(out)
else:
    open(out, "w").close()
"""


def spy_loop(tmp_path, timeout=60, **env):
    executable(tmp_path / "python", SPY.format(python=sys.executable))
    e = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE", "VLLM_CACHE"))}
    e.update(PYTHON=str(tmp_path / "python"), OUT=str(tmp_path / "run"), ITERS="1", HOME=str(tmp_path / "home"),
             WORLD=str(tmp_path / "world"), SPY_PIDS=str(tmp_path / "pids"), **env)
    t0 = time.time()
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=e, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return p, time.time() - t0


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_the_first_failed_shard_stops_the_stage_and_its_siblings_and_frees_out(tmp_path):
    """Four shards: shard 2 fails in half a second while the others (and the process each started) would run for
    five minutes. The loop exits within seconds naming shard 2's log, the other shards and their children are
    gone, and the lock on OUT is free: a rerun starts at once and finishes the stage."""
    import fcntl
    p, took = spy_loop(tmp_path, GPUS="4", SPY_FAIL="2/4", SPY_SLEEP="300")
    assert p.returncode == 1, p.stderr
    log = tmp_path / "run" / "iter1" / "logs" / "generate.2.log"
    assert "shard 2/4 of 'generate' exited with 1" in p.stderr
    assert f"stage 'generate' failed (iteration 1); see {log}" in p.stderr and "error: boom" in p.stderr
    assert took < 30, f"the failure was reported after {took:.0f} s"
    pids = [int(x) for x in open(tmp_path / "pids").read().split()]
    assert len(pids) == 6
    deadline = time.time() + 5  # (an orphan is reaped by init a moment after the loop exits)
    while any(alive(pid) for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], "a sibling shard or its child still runs"
    with open(tmp_path / "run" / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError while anything holds it
        fcntl.flock(f, fcntl.LOCK_UN)
    p, _ = spy_loop(tmp_path, GPUS="4")
    assert p.returncode == 0, p.stderr
    assert "3 stages run" in p.stdout


def test_a_filesystem_without_locks_is_named_not_blamed_on_another_run(tmp_path):
    """flock on Lustre mounted without -o flock fails with ENOSYS: the loop says so (a stand-in flock answers as
    util-linux's does there), not that another run holds OUT."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(bin_dir / "flock", "#!/usr/bin/env bash\necho \"flock: 9: Function not implemented\" >&2\nexit 1\n")
    p, _ = spy_loop(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}")
    assert p.returncode == 2
    assert "cannot lock" in p.stderr and "Function not implemented" in p.stderr and "another run" not in p.stderr
    assert not (tmp_path / "run" / "iter1").exists()
