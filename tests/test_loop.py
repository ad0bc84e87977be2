"""run_loop.sh end to end on the tiny world: two iterations, reruns, a failing stage, a changed setting, a lock."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT, read_jsonl


def loop(world, out, check=True, **env):
    """Two small iterations of configs/tiny.env on the HF engine (the vLLM engine has its own tests)."""
    e = dict(os.environ, SPPO_PROGRESS="0", OMP_NUM_THREADS="1", PYTHON=sys.executable, WORLD=str(world), OUT=str(out), ITERS="2",
             N_PROMPTS="8", K="3", MAX_TOKENS="32", GEN_ARGS="--engine hf", BATCH="8", MICRO_BATCH="8",
             EPOCHS="1")
    e.update(env)
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=e, cwd=ROOT,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        raise AssertionError(f"run_loop.sh failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return p


def test_two_iterations_then_rerun_does_nothing(world, tmp_path):
    out = tmp_path / "loop"
    p = loop(world, out)
    for t in (1, 2):
        ranked = read_jsonl(out / f"iter{t}" / "ranked.jsonl")
        assert len(ranked) == 8 and all(len(r["win_rate"]) == 3 for r in ranked)
        assert (out / f"iter{t}" / "checkpoint" / "config.json").exists()
        assert not list((out / f"iter{t}").glob("*.jsonl.*")), "shard files are merged and removed"
    # iteration 2 samples from iteration 1's checkpoint
    assert read_jsonl(out / "iter2" / "generated.jsonl")[0]["generate"]["model"] == str(out / "iter1" / "checkpoint")
    assert "6 stages run" in p.stdout
    before = {f: os.path.getmtime(f) for f in out.rglob("*") if f.is_file()}
    p = loop(world, out)
    assert "nothing to do" in p.stdout
    assert before == {f: os.path.getmtime(f) for f in out.rglob("*") if f.is_file()}
    # a run directory holds one experiment: another K is refused, naming the setting
    p = loop(world, out, check=False, K="4")
    assert p.returncode == 2 and "was made with K='3', this run has K='4'" in p.stderr


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


def test_second_loop_on_the_same_out_is_refused(world, tmp_path):
    import fcntl
    out = tmp_path / "loop"
    out.mkdir()
    with open(out / ".lock", "a") as f:  # what a running loop (or a stage it left running) holds
        fcntl.flock(f, fcntl.LOCK_EX)
        p = loop(world, out, check=False)
    assert p.returncode == 2 and "another run is using" in p.stderr
    assert not (out / "iter1").exists()
