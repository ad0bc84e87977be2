"""run_loop.sh's progress: OUT/status.json at the stage boundaries of a tiny two-iteration loop, as a stage sees
it when it starts (a PYTHON wrapper copies it then) and as the loop leaves it, and a line per stage start."""
import json
import os
import re
import shutil
import subprocess
import sys

from conftest import ROOT

WRAPPER = """#!/bin/bash
# a stage's command line: record the status.json the loop wrote just before starting it
case " $* " in *" generate.py "*|*" rank.py "*|*" train_sppo.py "*)
    {{ echo "$*"; cat "{out}/status.json"; }} >> "{log}";;
esac
exec "{python}" "$@"
"""
STAGE = {"generate.py": "generate", "rank.py": "rank", "train_sppo.py": "train"}


def test_status_json_at_every_stage_start_and_at_the_end(world, tmp_path):
    out, log = tmp_path / "loop", tmp_path / "seen.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER.format(out=out, log=log, python=sys.executable))
    wrapper.chmod(0o755)
    env = dict(os.environ, SPPO_PROGRESS="0", PYTHON=str(wrapper), WORLD=str(world), OUT=str(out), ITERS="2",
               N_PROMPTS="8", K="3", MAX_TOKENS="32", GEN_ARGS="--engine hf --hf-batch-size 6", BATCH="8",
               MICRO_BATCH="8", EPOCHS="1", REPORT_TO="none", OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    lines = log.read_text().splitlines()
    seen = [(lines[i], json.loads(lines[i + 1])) for i in range(0, len(lines), 2)]
    order = [(t, s) for t in (1, 2) for s in ("generate", "rank", "train")]
    assert len(seen) == len(order)
    for (command, status), (t, stage) in zip(seen, order):
        script = next(os.path.basename(a) for a in command.split() if a.endswith(".py"))
        assert STAGE[script] == stage and f"/iter{t}/" in command
        before = ["generate", "rank", "train"][:["generate", "rank", "train"].index(stage)]
        assert {k: status[k] for k in ("iteration", "iterations", "stage", "state", "done")} == \
            {"iteration": t, "iterations": 2, "stage": stage, "state": "running", "done": before}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["started"])
        if t == 1:
            assert status["eta_seconds"] is None  # nothing to estimate from yet
        else:  # what the stages still to run took in iteration 1 (the loop prints them per stage, in seconds)
            took = {s: int(m) for s, m in re.findall(r"\[iter 1\] (\w+): (\d+)s ", p.stdout)}
            assert status["eta_seconds"] == sum(took[s] for s in ("generate", "rank", "train") if s not in before)
    assert sum(line.startswith("[iter 2] ") and " started, ~" in line for line in p.stdout.splitlines()) == 3
    final = json.loads((out / "status.json").read_text())
    assert {k: final[k] for k in ("iteration", "stage", "state", "done", "eta_seconds")} == \
        {"iteration": 2, "stage": "train", "state": "done", "done": ["generate", "rank", "train"], "eta_seconds": 0}
    assert not (out / "status.json.tmp").exists()
    # a rerun finds everything done earlier: it writes no file, and the status stays the finished loop's
    before = (out / "status.json").read_text()
    subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    assert (out / "status.json").read_text() == before
    # iteration 2's checkpoint removed: the rerun's one boundary lists the stages done earlier as done, and has no
    # ETA (this loop timed nothing of iteration 1)
    shutil.rmtree(out / "iter2" / "checkpoint")
    log.write_text("")
    subprocess.run(["bash", os.path.join(ROOT, "run_loop.sh"), "configs/tiny.env"], env=env, cwd=ROOT, check=True,
                   capture_output=True)
    lines = log.read_text().splitlines()
    assert len(lines) == 2 and "train_sppo.py" in lines[0]
    status = json.loads(lines[1])
    assert (status["iteration"], status["stage"], status["state"], status["done"], status["eta_seconds"]) == \
        (2, "train", "running", ["generate", "rank"], None)
